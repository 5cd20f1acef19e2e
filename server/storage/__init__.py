"""Models on disk: the snapshot manager (periodic, durable, on stop), the snapshot file format,
plain PyTorch checkpoint import/export, and a sharded model's export."""
