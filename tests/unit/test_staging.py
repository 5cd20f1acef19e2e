"""Staging memory without CUDA (pin=False): one flat buffer per gradient set with a view per
parameter, sets for param groups added later, and chunked copies through a bounce buffer (the
path a model's initial values and a reader's copies take on CUDA). The page-locked variants are
tested in test_gpu_path.py."""

from __future__ import annotations

import itertools

import pytest
import torch

from adamd.server.core.registry import ModelRegistry, ModelSpec
from adamd.server.core.staging import ALIGN, GradSet, StagingPool, copy_in_chunks, layout

PARAMS = {
    "w": torch.zeros(33, 7),
    "half": torch.zeros(5, dtype=torch.bfloat16),
    "c": torch.zeros(3, dtype=torch.complex64),
    "d": torch.zeros(2, 2, dtype=torch.float64),
    "empty": torch.zeros(0),
    "scalar": torch.zeros(()),
}


def test_a_set_is_one_flat_buffer_with_aligned_disjoint_views() -> None:
    gs = GradSet(PARAMS, pin=False)
    offsets, total = layout(PARAMS)
    assert gs.nbytes == total
    bufs = gs.take(list(PARAMS))
    spans = []
    for (name, p), buf in zip(PARAMS.items(), bufs):
        assert buf.shape == p.shape and buf.dtype == p.dtype and buf.is_contiguous(), name
        assert offsets[name] % ALIGN == 0
        spans.append((buf.data_ptr(), buf.data_ptr() + buf.numel() * buf.element_size()))
    base = gs.buffers["w"].data_ptr()
    spans = sorted(s for s in spans if s[0] != s[1])  # (a view of no bytes points anywhere)
    assert all(base <= a and b <= base + total for a, b in spans)  # all in the one buffer
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans))  # none overlaps another
    for name, buf in zip(PARAMS, bufs):  # writes land where each view says
        buf.fill_(1 + list(PARAMS).index(name))
    for name, buf in zip(PARAMS, bufs):
        assert torch.all(buf == 1 + list(PARAMS).index(name)), name


def test_a_param_group_added_later_gets_a_buffer_and_stale_idle_sets_are_dropped() -> None:
    params = {"w": torch.zeros(10)}
    pool = StagingPool(params, pin=False)
    old = pool.acquire()
    params["new"] = torch.zeros(4)  # add_param_group adds to the model's dict
    (buf,) = old.take(["new"])  # a set in use when the group came: a buffer of its own
    assert buf.shape == (4,) and old.nbytes == layout({"w": params["w"]})[1] + 16
    pool.release(old)
    fresh = pool.acquire()  # the idle old-layout set is dropped, not handed out
    assert fresh is not old and fresh.names == {"w", "new"} and pool.sets == 1
    pool.release(fresh)
    pool.close()
    assert pool.sets == 0


@pytest.mark.parametrize("download", [False, True], ids=["upload", "download"])
@pytest.mark.parametrize(
    "dtype,shape",
    [
        (torch.float32, (1000, 3)),
        (torch.bfloat16, (777,)),
        (torch.complex64, (13, 5)),
        (torch.float64, ()),
        (torch.float32, (0, 4)),
    ],
)
def test_copy_in_chunks_copies_every_byte_through_a_small_bounce(
    download: bool, dtype: torch.dtype, shape: tuple[int, ...]
) -> None:
    g = torch.Generator().manual_seed(0)
    src = (
        torch.randn(shape, generator=g).to(dtype)
        if dtype.is_floating_point
        else torch.randn(shape, dtype=dtype, generator=g)
    )
    dst = torch.full_like(src, 7)
    bounce = torch.zeros(2 * 97, dtype=torch.uint8)  # 97-byte halves: pieces end mid-element
    copy_in_chunks(src, dst, bounce, download=download)
    assert torch.equal(dst, src)


def test_copy_in_chunks_refuses_mismatched_tensors() -> None:
    with pytest.raises(ValueError):
        copy_in_chunks(torch.zeros(3), torch.zeros(4), torch.zeros(8, dtype=torch.uint8))
    with pytest.raises(ValueError):
        copy_in_chunks(torch.zeros(3), torch.zeros(3), torch.zeros(1, dtype=torch.uint8))


def test_create_stages_initial_values_in_ordinary_host_memory() -> None:
    """N ranks racing to create a model hold N host copies until commit, none of them pinned
    (on CUDA the commit copies through one small pinned bounce buffer per registry)."""
    registry = ModelRegistry(torch.device("cpu"))
    spec = ModelSpec("m", [("w", (64, 64), torch.float32)], [{"params": ["w"]}], exist_ok=True)
    pending = [registry.begin_create(spec) for _ in range(3)]
    for p in pending:
        assert not any(t.is_pinned() for t in p.tensors.values())
