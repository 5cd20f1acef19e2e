"""The CUDA path of a model's step: per-model streams, graph capture and replay of the fused
step, and the lock that keeps other device work out of a capture."""
