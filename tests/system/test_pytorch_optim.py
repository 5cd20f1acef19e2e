"""PyTorch's own optimizer test suite, run against RemoteAdam on a live adamd server.

PyTorch's `test/test_optim.py` (class `TestOptimRenewed`) tests every optimizer in its
`optim_db` (`torch.testing._internal.common_optimizers`, shipped in the torch wheel). Here that
database holds one entry: Adam's own `OptimizerInfo` (its configurations, error inputs, scheduler
combinations and tolerances) with `optim_cls` a RemoteAdam bound to the session's daemon and a
fresh model name per construction. The file itself is PyTorch's, unmodified, and is not part of
this repository (see tests/third_party/pytorch/README.md): this module loads it from
$ADAMD_PYTORCH_TEST_OPTIM, else ~/.cache/adamd/pytorch/test_optim.py, and is skipped, saying
so, when neither holds it. It runs on CPU only (the CUDA variant class is not collected).

What cannot apply to a remote optimizer is in one place, below: `UNSUPPORTED_IMPLS` (dropped from
the OptimizerInfo's `supported_impls`, so PyTorch's own input generator leaves it out) and
`SKIPS` (test name -> one-line reason). PyTorch's decorators skip the CUDA-only and
large-memory tests by themselves.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import itertools
import os
import sys
import types
import unittest
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch

from adamd.client import Client
from adamd.client import RemoteAdam as _RemoteAdam

from ..processes import serve as _serve

pytestmark = [
    pytest.mark.slow,
    # ReduceLROnPlateau.step(loss) with a loss that requires grad: torch warns the same for a
    # local Adam; PyTorch's own CI does not turn warnings into errors as this project's does.
    pytest.mark.filterwarnings(
        "ignore:Converting a tensor with requires_grad=True to a scalar:UserWarning"
    ),
]

SOURCE = Path(
    os.environ.get("ADAMD_PYTORCH_TEST_OPTIM")
    or Path.home() / ".cache" / "adamd" / "pytorch" / "test_optim.py"
)

# Implementations RemoteAdam refuses, removed from the OptimizerInfo's supported_impls.
UNSUPPORTED_IMPLS = {
    "differentiable": "no autograd graph crosses the wire (RemoteAdam raises ValueError)",
}
# Tests of TestOptimRenewed that cannot apply to a remote optimizer: name -> reason.
SKIPS = {
    "test_fused_error_on_params_on_meta": "meta tensors hold no data to send to a server",
}


class RemoteAdam(_RemoteAdam):
    """RemoteAdam on the session's daemon, one new model per optimizer (PyTorch's tests build
    many optimizers over the same tensors; each gets its own server-side Adam, as each local
    Adam has its own state)."""

    client: ClassVar[Client | None] = None
    _models: ClassVar[Iterator[int]] = itertools.count()

    def __init__(self, params: Any, *args: Any, **kwargs: Any) -> None:
        if RemoteAdam.client is None:
            raise RuntimeError("the session daemon fixture did not run")
        super().__init__(
            params,
            *args,
            client=RemoteAdam.client,
            model=f"torch-suite-{next(RemoteAdam._models)}",
            **kwargs,
        )


@contextlib.contextmanager
def serve_process(data: Path) -> Iterator[str]:
    with _serve("--device", "cpu", tmp=data) as (proc, grpc_address, _http, _lines):
        yield grpc_address
        proc.terminate()
        proc.communicate(timeout=30)


def _remote_optim_info() -> Any:
    from torch.testing._internal import common_optimizers

    adam = next(o for o in common_optimizers.optim_db if o.optim_cls is torch.optim.Adam)
    info = copy.copy(adam)
    info.optim_cls = RemoteAdam  # type: ignore[assignment]
    info.supported_impls = tuple(i for i in adam.supported_impls if i not in UNSUPPORTED_IMPLS)
    return info


def _load_suite(path: Path) -> types.ModuleType:
    """Import PyTorch's test_optim.py with optim_db = [RemoteAdam's info].

    The file imports three sibling suites from PyTorch's test/optim/ (LR schedulers, SWA, the
    differentiable optimizers), which test other things; placeholders stand in for them while it
    imports, so they are neither needed nor collected."""
    from torch.testing._internal import common_optimizers

    placeholders = {
        "optim": [],
        "optim.test_lrscheduler": ["TestLRScheduler"],
        "optim.test_optim": ["TestDifferentiableOptimizer"],
        "optim.test_swa_utils": ["TestSWAUtils"],
    }
    saved_modules = {name: sys.modules.get(name) for name in placeholders}
    saved_db = common_optimizers.optim_db
    try:
        for name, classes in placeholders.items():
            module = types.ModuleType(name)
            module.__path__ = []  # type: ignore[attr-defined]
            for cls in classes:
                setattr(module, cls, type(cls, (), {"__doc__": "not run: see test_pytorch_optim"}))
            sys.modules[name] = module
        common_optimizers.optim_db = [_remote_optim_info()]
        spec = importlib.util.spec_from_file_location("pytorch_test_optim", path)
        assert spec is not None and spec.loader is not None
        suite = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(suite)
        return suite
    finally:
        common_optimizers.optim_db = saved_db
        for name, saved in saved_modules.items():
            if saved is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = saved


if not SOURCE.is_file():
    pytest.skip(
        f"PyTorch's test/test_optim.py is not at {SOURCE} (set ADAMD_PYTORCH_TEST_OPTIM; see"
        " tests/third_party/pytorch/README.md)",
        allow_module_level=True,
    )
_suite = _load_suite(SOURCE)
TestOptimRenewedCPU = _suite.TestOptimRenewedCPU
for _name in dir(TestOptimRenewedCPU):
    _base = next((s for s in SKIPS if _name.startswith(s + "_")), None)
    if _base is not None:
        _method = getattr(TestOptimRenewedCPU, _name)
        setattr(TestOptimRenewedCPU, _name, unittest.skip(SKIPS[_base])(_method))


@pytest.fixture(scope="module", autouse=True)
def _bind_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """`adamd serve` in its own process, as in deployment: an in-process daemon would run the
    suite's global step hooks (register_optimizer_step_pre_hook) around its own Adam steps too."""
    data = tmp_path_factory.mktemp("torch-suite")
    with serve_process(data) as address, Client(address) as client:
        RemoteAdam.client = client
        try:
            yield
        finally:
            RemoteAdam.client = None
