"""The committed generated stubs are what the committed .proto generates (with the pinned grpcio-tools)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GENERATED = ["adamd_pb2.py", "adamd_pb2.pyi", "adamd_pb2_grpc.py"]


def test_generated_stubs_are_fresh(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-I",
            str(ROOT / "protos"),
            f"--python_out={tmp_path}",
            f"--pyi_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            str(ROOT / "protos/adamd/v1/adamd.proto"),
        ],
        check=True,
    )
    for name in GENERATED:
        fresh = (tmp_path / "adamd/v1" / name).read_text()
        committed = (ROOT / "protos/adamd/v1" / name).read_text()
        assert fresh == committed, f"protos/adamd/v1/{name} is stale: run `make protos`"


def test_adapter_serves_every_method_of_the_proto() -> None:
    import torch

    from adamd.server.core.registry import ModelRegistry
    from adamd.server.dataplane import DataPlane
    from adamd.server.operations import Operations
    from adamd.server.transport.grpc_service import OptimizerService
    from adamd.v1 import adamd_pb2 as pb

    methods = {m.name for m in pb.DESCRIPTOR.services_by_name["Optimizer"].methods}
    service = OptimizerService(DataPlane(Operations(ModelRegistry(torch.device("cpu")))))
    registered = set(service.handler()._method_handlers)  # type: ignore[attr-defined]
    assert {f"/adamd.v1.Optimizer/{m}" for m in methods} == registered
