"""adamd benchmark harness: `python -m bench` measures adamd side by side with the
raw gRPC ceiling, PyTorch's RPC parameter server and a local fused Adam step, and writes BENCHMARKS.md."""
