"""The same-host fast path: shared-memory parameters and gradients instead of gRPC streams.

It engages by itself when client and server share a host (every test here runs on loopback), must
give bitwise the results of the gRPC path, fall back to gRPC whenever it cannot be used, never let
a pull see a step half-written, and never leave files behind in /dev/shm.
"""

from __future__ import annotations

import signal
import subprocess
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from adamd.client import Client, RemoteAdam
from adamd.protocol.shared_files import host_id
from adamd.server import Daemon
from adamd.server.transport.same_host import SameHost
from adamd.v1 import adamd_pb2 as pb

from .. import workers
from ..conftest import assert_bitwise_equal, running_daemon
from ..processes import serve

SHM = Path("/dev/shm")


def _train(client: Client, name: str, steps: int) -> dict[str, torch.Tensor]:
    client.create_model(name, workers.initial_params(), lr=workers.LR)
    for step in range(steps):
        client.push_grad(name, workers.rank_grads(0, step), version=step)
    return client.pull_params(name)


def test_default_transport_uses_shared_memory_and_equals_grpc_bitwise(
    daemon: Daemon, model_name: str
) -> None:
    shm_name, grpc_name = model_name + "-shm", model_name + "-grpc"
    with Client(daemon.grpc_address) as fast, Client(daemon.grpc_address, transport="grpc") as slow:
        via_shm = _train(fast, shm_name, 6)
        via_grpc = _train(slow, grpc_name, 6)
        assert daemon.same_host.session_count(shm_name) == 1  # the default engaged by itself
        assert daemon.same_host.session_count(grpc_name) == 0  # transport="grpc" never attaches
        assert fast.same_host(shm_name) and not slow.same_host(grpc_name)  # as the client says
        # Pulls of either model through either client agree too.
        assert_bitwise_equal(fast.pull_params(grpc_name), slow.pull_params(shm_name))
    assert_bitwise_equal(via_shm, via_grpc)
    assert_bitwise_equal(via_shm, workers.reference([[0]] * 6))
    a, b = daemon.registry.get(shm_name), daemon.registry.get(grpc_name)
    for p_a, p_b in zip(a.params.values(), b.params.values()):
        for key, value in a.optimizer.state[p_a].items():
            assert torch.equal(value, b.optimizer.state[p_b][key]), key
    assert daemon.same_host.session_count(shm_name) == 0  # close() detached


def test_a_server_without_shared_memory_serves_over_grpc(model_name: str) -> None:
    with running_daemon(shm=False) as d, Client(d.grpc_address) as c:
        assert _train(c, model_name, 3).keys() == workers.SHAPES.keys()
        assert torch.equal(c.pull_params(model_name)["w"], workers.reference([[0]] * 3)["w"])


def test_pulls_never_see_a_step_half_written(daemon: Daemon, model_name: str) -> None:
    """Async pushes from one thread while another pulls through shared memory as fast as it can:
    every pull must equal, bitwise, the reference parameters of the version it reports."""
    steps = 30
    reference = [workers.reference([[0]] * v) for v in range(steps + 1)]
    with Client(daemon.grpc_address) as pusher, Client(daemon.grpc_address) as puller:
        pusher.create_model(model_name, workers.initial_params(), mode="async", lr=workers.LR)
        seen: list[tuple[int, dict[str, torch.Tensor]]] = []
        done = threading.Event()

        def pull_loop() -> None:
            while not done.is_set():
                r = puller.pull(model_name)
                seen.append((r.version, r.params))

        with ThreadPoolExecutor(1) as pool:
            reader = pool.submit(pull_loop)
            for step in range(steps):
                pusher.push_grad(model_name, workers.rank_grads(0, step), version=step)
            done.set()
            reader.result(timeout=60)
        assert daemon.same_host.session_count(model_name) == 2
    assert len({v for v, _ in seen}) > 1  # the reads really overlapped the steps
    for version, params in seen:
        assert_bitwise_equal(params, reference[version])


def test_concurrent_pushes_from_one_client_do_not_share_the_gradient_file(
    daemon: Daemon, model_name: str
) -> None:
    """Two ranks of a sync round pushed from two threads of one Client: the first holds the
    session's gradient file until the round completes, so the second must stream instead."""
    with Client(daemon.grpc_address) as c:
        c.create_model(model_name, workers.initial_params(), world_size=2, lr=workers.LR)
        with ThreadPoolExecutor(2) as pool:
            for step in range(3):
                futures = [
                    pool.submit(
                        c.push_grad, model_name, workers.rank_grads(r, step), version=step, rank=r
                    )
                    for r in (0, 1)
                ]
                assert all(f.result(timeout=60).contributors == 2 for f in futures)
        assert_bitwise_equal(c.pull_params(model_name), workers.reference([[0, 1]] * 3))


def test_add_param_group_mid_run_moves_to_a_new_layout(daemon: Daemon, model_name: str) -> None:
    torch.manual_seed(0)
    body, head = torch.nn.Linear(6, 5), torch.nn.Linear(5, 2)
    local_body, local_head = torch.nn.Linear(6, 5), torch.nn.Linear(5, 2)
    local_body.load_state_dict(body.state_dict())
    local_head.load_state_dict(head.state_dict())
    remote = RemoteAdam(body.parameters(), lr=0.01, server=daemon.grpc_address, model=model_name)
    local = torch.optim.Adam(local_body.parameters(), lr=0.01, fused=True)
    x = torch.randn(16, 6)

    def step(modules: tuple[torch.nn.Module, ...], opt: torch.optim.Optimizer) -> None:
        opt.zero_grad()
        out = x
        for m in modules:
            out = m(out)
        out.square().mean().backward()
        opt.step()

    try:
        for i in range(6):
            if i == 3:  # the head joins: a new parameter layout on the server
                before = {f for f in daemon.same_host.files() if model_name in f}
                remote.add_param_group({"params": head.parameters(), "lr": 0.02})
                local.add_param_group({"params": local_head.parameters(), "lr": 0.02})
            step((body, head), remote)
            step((local_body, local_head), local)
        assert daemon.same_host.session_count(model_name) == 1
        assert not before & set(daemon.same_host.files())  # the old layout's files are gone
        assert not any(Path(f).exists() for f in before)
    finally:
        remote.close()
    for a, b in zip(
        [*body.parameters(), *head.parameters()],
        [*local_body.parameters(), *local_head.parameters()],
    ):
        assert torch.equal(a, b)


def test_delete_and_stop_leave_no_files(model_name: str) -> None:
    with running_daemon() as d:
        with Client(d.grpc_address) as c:
            _train(c, model_name, 2)
            first = d.same_host.files()
            _train(c, model_name + "-2", 2)
            both = d.same_host.files()
            assert len(first) == 2 and len(both) == 4
            assert all(Path(f).exists() for f in both)
            c.delete_model(model_name)
            assert not any(Path(f).exists() for f in first)
        assert len(d.same_host.files()) == 1  # the second model's parameters: sessions detached
    assert not any(Path(f).exists() for f in both)


def test_files_of_a_killed_server_are_removed_by_the_next(tmp_path: Path, model_name: str) -> None:
    with serve("--device", "cpu", tmp=tmp_path) as (proc, address, _, _), Client(address) as c:
        _train(c, model_name, 1)
        pid = proc.pid
        left = sorted(SHM.glob(f"adamd-{pid}-*"))
        assert len(left) == 2  # parameters + this session's gradients
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    assert all(f.exists() for f in left)  # nobody cleaned up after kill -9
    with running_daemon() as d:
        assert d.same_host.remove_orphans() == []  # start() already did it
    assert not any(f.exists() for f in left)


def _attach(same_host: SameHost, name: str, host: str) -> pb.AttachReply:
    try:
        return same_host.attach(pb.AttachRequest(model=name, host_id=host))
    finally:
        same_host.stop()


def test_a_server_with_another_shm_mount_counts_as_another_host(
    daemon: Daemon, tmp_path: Path, model_name: str
) -> None:
    """Containers on one node share the boot id but not /dev/shm: they must not attach."""
    with Client(daemon.grpc_address, transport="grpc") as c:
        c.create_model(model_name, workers.initial_params(), lr=workers.LR)
    other = SameHost(daemon.registry, root=str(tmp_path))
    reply = _attach(other, model_name, host_id())
    assert not reply.accepted and "different hosts" in reply.reason
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs, as a container's small /dev/shm (needs root and mount rights)."""
    mount = tmp_path / "shm"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_a_full_shm_mount_declines_the_session_instead_of_crashing(
    daemon: Daemon, small_tmpfs: Path, model_name: str
) -> None:
    """Writing into pages a full tmpfs cannot back is SIGBUS; the files are reserved up front."""
    big = {"w": torch.randn(1024, 1024)}  # 4 MiB of parameters, 1 MiB of room
    with Client(daemon.grpc_address, transport="grpc") as c:
        c.create_model(model_name, big, lr=workers.LR)
        small = SameHost(daemon.registry, root=str(small_tmpfs))
        reply = _attach(small, model_name, host_id(str(small_tmpfs)))
        assert not reply.accepted and "no room" in reply.reason
        assert list(small_tmpfs.iterdir()) == []
        assert torch.equal(c.pull_params(model_name)["w"], big["w"])
        c.push_grad(model_name, {"w": torch.ones(1024, 1024)}, version=0)  # and it still trains
        assert not torch.equal(c.pull_params(model_name)["w"], big["w"])
