"""The gRPC channel to one adamd server and the adamd.v1 service's calls on it that carry no
tensor stream of their own: models, hyperparameters, membership, snapshots, state (the pushes
and pulls go through client/_transport/)."""

from __future__ import annotations

from typing import Any

import grpc

from adamd.client._tls import TLSConfig, channel_credentials
from adamd.client._transport.streams import SERVICE
from adamd.protocol.frames import MAX_MESSAGE_BYTES, identity
from adamd.v1 import adamd_pb2 as pb

CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2_000),
]


def open_channel(target: str, tls: bool | TLSConfig | None) -> grpc.Channel:
    """A channel to `target`: plaintext, or TLS (`tls`: True, or a TLSConfig; see Client)."""
    if tls:
        return grpc.secure_channel(target, channel_credentials(tls), options=CHANNEL_OPTIONS)
    return grpc.insecure_channel(target, options=CHANNEL_OPTIONS)


class ServiceCalls:
    """The service's calls on `channel`, each a gRPC multi-callable: the streamed ones
    (create, load_state, add_group) take the frames of adamd.protocol.frames, get_state
    answers with them."""

    def __init__(self, channel: grpc.Channel):
        ser = lambda m: m.SerializeToString()
        info = pb.ModelInfo.FromString
        self.create: Any = channel.stream_unary(SERVICE + "CreateModel", identity, info)
        self.get_state: Any = channel.unary_stream(SERVICE + "GetState", ser, identity)
        self.load_state: Any = channel.stream_unary(SERVICE + "LoadState", identity, info)
        self.add_group: Any = channel.stream_unary(SERVICE + "AddParamGroup", identity, info)
        self.set_hyper: Any = channel.unary_unary(SERVICE + "SetHyperparams", ser, info)
        self.describe: Any = channel.unary_unary(SERVICE + "DescribeModel", ser, info)
        self.list_models: Any = channel.unary_unary(
            SERVICE + "ListModels", ser, pb.ListModelsReply.FromString
        )
        self.delete: Any = channel.unary_unary(
            SERVICE + "DeleteModel", ser, pb.DeleteReply.FromString
        )
        self.snapshot: Any = channel.unary_unary(
            SERVICE + "Snapshot", ser, pb.SnapshotInfo.FromString
        )
        self.join: Any = channel.unary_unary(SERVICE + "Join", ser, pb.JoinReply.FromString)
        self.leave: Any = channel.unary_unary(SERVICE + "Leave", ser, pb.LeaveReply.FromString)
