"""The public surface: what `adamd.client` exports, and the two exception trees kept in step."""

from __future__ import annotations

import grpc

import adamd.client
from adamd.client import _exceptions as client_errors
from adamd.server import errors as server_errors


def test_public_api_is_pinned() -> None:
    assert sorted(adamd.client.__all__) == [
        "Aborted",
        "AdamdError",
        "AlreadyExists",
        "Client",
        "DeadlineExceeded",
        "DuplicatePush",
        "FailedPrecondition",
        "InvalidArgument",
        "LimitExceeded",
        "ModelInfo",
        "NonFiniteGradient",
        "NotFound",
        "PermissionDenied",
        "PullResult",
        "PushResult",
        "RemoteAdam",
        "StalePush",
        "TLSConfig",
        "Unauthenticated",
        "Unavailable",
    ]
    from adamd.client import Client, RemoteAdam  # the contract's import line

    assert Client and RemoteAdam


def test_every_server_error_has_a_client_twin_with_the_same_status() -> None:
    for cls in vars(server_errors).values():
        if (
            isinstance(cls, type)
            and issubclass(cls, server_errors.ServerError)
            and cls is not server_errors.ServerError
        ):
            kind = cls("x").kind
            twin = client_errors.KINDS[kind]
            assert twin.code == cls.code, kind  # type: ignore[attr-defined]


def test_unknown_kind_falls_back_to_status_code() -> None:
    class FakeError(grpc.RpcError):
        def code(self) -> grpc.StatusCode:
            return grpc.StatusCode.NOT_FOUND

        def details(self) -> str:
            return "gone"

        def trailing_metadata(self) -> tuple[()]:
            return ()

    err = client_errors.from_rpc_error(FakeError())
    assert isinstance(err, client_errors.NotFound) and str(err) == "gone"
