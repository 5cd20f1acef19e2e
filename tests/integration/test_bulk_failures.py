"""The bulk-data channel's failures against a real daemon on loopback: BulkError is its own
exception, not a grpc.RpcError, and Client.call still maps it to the client's exceptions (by the
server's error kind) and retries it where it is transient, a push under its push id (applied once).

The server runs without the same-host path (shm=False), so a default Client takes the channel."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import TYPE_CHECKING

import grpc
import pytest
import torch

from adamd.client import Client, InvalidArgument, NonFiniteGradient, NotFound, Unavailable
from adamd.client._exceptions import from_rpc_error
from adamd.client._failed_call import FailedCall
from adamd.client._retry import transient
from adamd.client._transport.bulk import BulkError
from adamd.client._wire import push_header
from adamd.protocol.frames import spec_of

from ..conftest import assert_bitwise_equal, running_daemon, snapshot

if TYPE_CHECKING:
    from adamd.server import Daemon


@pytest.fixture(scope="module")
def net_daemon() -> Iterator[Daemon]:
    with running_daemon(shm=False, http_port=-1) as d:
        yield d


def test_bulk_error_is_a_failed_call_not_a_grpc_error() -> None:
    assert not issubclass(BulkError, grpc.RpcError)
    assert issubclass(BulkError, FailedCall)
    err = BulkError(grpc.StatusCode.INVALID_ARGUMENT, "gradient 'w' holds nan", "NonFiniteGradient")
    assert (err.code(), err.details(), err.kind) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "gradient 'w' holds nan",
        "NonFiniteGradient",
    )
    mapped = from_rpc_error(err)
    assert type(mapped) is NonFiniteGradient and mapped.code == grpc.StatusCode.INVALID_ARGUMENT
    assert type(from_rpc_error(BulkError(grpc.StatusCode.NOT_FOUND, "no model"))) is NotFound
    # A server's cancel counts as UNAVAILABLE (retried), a local one does not.
    assert transient(BulkError(grpc.StatusCode.CANCELLED, "")) == grpc.StatusCode.UNAVAILABLE
    local = BulkError(grpc.StatusCode.CANCELLED, "Locally cancelled by application!")
    assert transient(local) == grpc.StatusCode.CANCELLED


def test_a_refused_bulk_push_is_raised_as_the_clients_exception(
    net_daemon: Daemon, model_name: str
) -> None:
    with Client(net_daemon.grpc_address) as c:
        c.create_model(model_name, {"w": torch.zeros(10)}, lr=0.1)
        c.push_grad(model_name, {"w": torch.ones(10)})
        assert c._bulk is not None and c._bulk.usable()
        before = snapshot(net_daemon.registry.get(model_name))
        bad = torch.ones(10)
        bad[3] = float("nan")
        # What the channel itself raises: a BulkError with the server's code and kind.
        header = push_header(model_name, [spec_of("w", bad)])
        with pytest.raises(BulkError) as raw:
            c._bulk.push(header, [bad], None, c.chunk_bytes)
        assert not isinstance(raw.value, grpc.RpcError)
        assert raw.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert raw.value.kind == "NonFiniteGradient"
        # Through the Client: mapped by its kind, and not retried (the channel stays on).
        with pytest.raises(NonFiniteGradient) as err:
            c.push_grad(model_name, {"w": bad})
        assert not isinstance(err.value, grpc.RpcError) and err.value.__cause__ is None
        with pytest.raises(InvalidArgument, match="shape"):
            c.push_grad(model_name, {"w": torch.ones(3)})
        with pytest.raises(NotFound):
            c.push_grad(model_name + "-missing", {"w": torch.ones(10)})
        assert c._bulk.usable()
        assert_bitwise_equal(snapshot(net_daemon.registry.get(model_name)), before)


def test_a_dropped_bulk_connection_is_retried_and_the_push_applied_once(
    net_daemon: Daemon, model_name: str
) -> None:
    with (
        Client(net_daemon.grpc_address) as c,
        Client(net_daemon.grpc_address, transport="grpc") as plain,
    ):
        c.create_model(model_name, {"w": torch.zeros(10)}, lr=0.1)
        c.push_grad(model_name, {"w": torch.ones(10)})
        bulk = c._bulk
        assert bulk is not None and len(bulk._idle) == 1
        kept = bulk._idle[0]
        # The connection kept for the next call is cut: its push fails there as
        # BulkError(UNAVAILABLE), which Client.call retries on a new connection.
        kept.sock.shutdown(socket.SHUT_RDWR)
        pushed = c.push_grad(model_name, {"w": torch.ones(10)}, push_id="p-retried")
        assert (pushed.version, pushed.applied, pushed.duplicate) == (2, True, False)
        assert bulk.usable() and len(bulk._idle) == 1 and bulk._idle[0] is not kept
        # The same push id again (over gRPC): the server applied it once.
        again = plain.push_grad(model_name, {"w": torch.ones(10)}, push_id="p-retried")
        assert (again.version, again.duplicate) == (2, True)
        assert net_daemon.registry.get(model_name).version == 2


def test_a_bulk_failure_past_the_retry_deadline_is_unavailable(
    net_daemon: Daemon, model_name: str
) -> None:
    with Client(net_daemon.grpc_address, retry_timeout=0.0) as c:
        c.create_model(model_name, {"w": torch.zeros(10)}, lr=0.1)
        c.push_grad(model_name, {"w": torch.ones(10)})
        assert c._bulk is not None and len(c._bulk._idle) == 1
        c._bulk._idle[0].sock.shutdown(socket.SHUT_RDWR)
        with pytest.raises(Unavailable, match="bulk connection"):
            c.push_grad(model_name, {"w": torch.ones(10)})
        assert net_daemon.registry.get(model_name).version == 1
