"""Chunk sizes: a pull asks for its reply's chunk size (PullRequest.chunk_bytes), the server keeps
it within 64 KiB .. 4 MiB - 64 KiB so every frame fits a stock 4 MiB receive limit, and
`serve --chunk-bytes` is the size for requests that ask none. Also the allocator setting."""

from __future__ import annotations

import torch

from adamd.client import Client
from adamd.protocol.allocator import tune_malloc
from adamd.protocol.frames import (
    MAX_CHUNK_BYTES,
    MIN_CHUNK_BYTES,
    STOCK_MESSAGE_LIMIT,
    decode_frame,
)
from adamd.server import Daemon
from adamd.v1 import adamd_pb2 as pb

from ..conftest import running_daemon

N = 3 << 20  # 12 MiB of float32


def _frame_sizes(c: Client, model: str, asked: int) -> list[tuple[int, int]]:
    """(data bytes, message bytes) of each frame of a pull asking `asked` bytes per chunk."""
    req = pb.PullRequest(model=model, chunk_bytes=asked)
    return [(decode_frame(raw).data.nbytes, len(raw)) for raw in c._pull(req)]


def test_a_pull_gets_the_chunks_it_asks_for_within_the_limits(
    daemon: Daemon, model_name: str
) -> None:
    w = torch.randn(N)
    with Client(daemon.grpc_address, transport="grpc", chunk_bytes=256 << 10) as c:
        c.create_model(model_name, {"w": w})
        for asked, want in [
            (256 << 10, 256 << 10),
            (1 << 20, 1 << 20),
            (1, MIN_CHUNK_BYTES),
            (1 << 30, MAX_CHUNK_BYTES),
            (0, MAX_CHUNK_BYTES),  # the server's default
            ((1 << 20) + 3, 1 << 20),  # whole elements of every dtype
        ]:
            sizes = _frame_sizes(c, model_name, asked)
            assert {d for d, _ in sizes[:-1]} == {want}, asked
            assert sum(d for d, _ in sizes) == w.numel() * 4
            assert max(m for _, m in sizes) < STOCK_MESSAGE_LIMIT
        # The client asks its own chunk_bytes, and its pulls and pushes are exact either way.
        out = {"w": torch.empty(N)}
        assert torch.equal(c.pull(model_name, out=out).params["w"], w)
        c.push_grad(model_name, {"w": torch.ones(N)})
        after = c.pull_params(model_name)["w"]
        assert torch.equal(
            c.pull(model_name, wire_dtype=torch.bfloat16).params["w"],
            after.to(torch.bfloat16).float(),
        )


def test_serve_chunk_bytes_is_the_default_for_pulls_that_ask_none(model_name: str) -> None:
    with running_daemon(chunk_bytes=128 << 10, http_port=-1) as d, Client(d.grpc_address) as c:
        c.create_model(model_name, {"w": torch.randn(N)})
        sizes = _frame_sizes(c, model_name, 0)
        assert {s for s, _ in sizes[:-1]} == {128 << 10}
        assert {s for s, _ in _frame_sizes(c, model_name, 1 << 20)[:-1]} == {1 << 20}
        # A client given no chunk_bytes asks none, so the server's setting applies to it.
        assert c._pull_chunk == 0 and c.chunk_bytes == MAX_CHUNK_BYTES
        with Client(d.grpc_address, chunk_bytes=1 << 20) as asking:
            assert asking._pull_chunk == 1 << 20


def test_the_allocator_thresholds_are_raised_at_import() -> None:
    assert tune_malloc() is True  # glibc here; client and server imports already set them


def test_serve_chunk_bytes_outside_the_limits_is_refused_naming_the_field() -> None:
    import pytest

    from adamd.server.config import ConfigError, ServerConfig

    for bad in (MIN_CHUNK_BYTES - 1, MAX_CHUNK_BYTES + 1):
        with pytest.raises(ConfigError, match="chunk_bytes"):
            ServerConfig(chunk_bytes=bad)
    assert ServerConfig().chunk_bytes == MAX_CHUNK_BYTES
