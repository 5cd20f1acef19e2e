"""How the client moves tensors besides gRPC: the bulk-data channel and same-host shared memory."""
