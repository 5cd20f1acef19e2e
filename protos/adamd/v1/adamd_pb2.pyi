from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    FLOAT32: _ClassVar[DType]
    FLOAT16: _ClassVar[DType]
    BFLOAT16: _ClassVar[DType]
    FLOAT64: _ClassVar[DType]
    COMPLEX64: _ClassVar[DType]
    COMPLEX128: _ClassVar[DType]

class Mode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODE_UNSPECIFIED: _ClassVar[Mode]
    SYNC: _ClassVar[Mode]
    ASYNC: _ClassVar[Mode]

class Encoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ENCODING_RAW: _ClassVar[Encoding]
    ENCODING_INT8_BLOCKWISE: _ClassVar[Encoding]
DTYPE_UNSPECIFIED: DType
FLOAT32: DType
FLOAT16: DType
BFLOAT16: DType
FLOAT64: DType
COMPLEX64: DType
COMPLEX128: DType
MODE_UNSPECIFIED: Mode
SYNC: Mode
ASYNC: Mode
ENCODING_RAW: Encoding
ENCODING_INT8_BLOCKWISE: Encoding

class TensorSpec(_message.Message):
    __slots__ = ("name", "dtype", "shape", "encoding", "block")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    BLOCK_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    encoding: Encoding
    block: int
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., encoding: _Optional[_Union[Encoding, str]] = ..., block: _Optional[int] = ...) -> None: ...

class HyperValue(_message.Message):
    __slots__ = ("number", "flag", "none", "tensor", "list")
    NUMBER_FIELD_NUMBER: _ClassVar[int]
    FLAG_FIELD_NUMBER: _ClassVar[int]
    NONE_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    LIST_FIELD_NUMBER: _ClassVar[int]
    number: float
    flag: bool
    none: bool
    tensor: ScalarTensor
    list: HyperList
    def __init__(self, number: _Optional[float] = ..., flag: bool = ..., none: bool = ..., tensor: _Optional[_Union[ScalarTensor, _Mapping]] = ..., list: _Optional[_Union[HyperList, _Mapping]] = ...) -> None: ...

class ScalarTensor(_message.Message):
    __slots__ = ("value", "shape", "dtype")
    VALUE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    value: float
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: DType
    def __init__(self, value: _Optional[float] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[_Union[DType, str]] = ...) -> None: ...

class HyperList(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[HyperValue]
    def __init__(self, items: _Optional[_Iterable[_Union[HyperValue, _Mapping]]] = ...) -> None: ...

class ParamGroup(_message.Message):
    __slots__ = ("params", "options")
    class OptionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: HyperValue
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[HyperValue, _Mapping]] = ...) -> None: ...
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    params: _containers.RepeatedScalarFieldContainer[str]
    options: _containers.MessageMap[str, HyperValue]
    def __init__(self, params: _Optional[_Iterable[str]] = ..., options: _Optional[_Mapping[str, HyperValue]] = ...) -> None: ...

class ModelConfig(_message.Message):
    __slots__ = ("model", "params", "groups", "world_size", "mode", "max_staleness", "round_timeout_s", "exist_ok", "elastic", "lease_s", "layout", "master_dtype")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    MAX_STALENESS_FIELD_NUMBER: _ClassVar[int]
    ROUND_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    EXIST_OK_FIELD_NUMBER: _ClassVar[int]
    ELASTIC_FIELD_NUMBER: _ClassVar[int]
    LEASE_S_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    MASTER_DTYPE_FIELD_NUMBER: _ClassVar[int]
    model: str
    params: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    groups: _containers.RepeatedCompositeFieldContainer[ParamGroup]
    world_size: int
    mode: Mode
    max_staleness: int
    round_timeout_s: float
    exist_ok: bool
    elastic: bool
    lease_s: float
    layout: str
    master_dtype: DType
    def __init__(self, model: _Optional[str] = ..., params: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., groups: _Optional[_Iterable[_Union[ParamGroup, _Mapping]]] = ..., world_size: _Optional[int] = ..., mode: _Optional[_Union[Mode, str]] = ..., max_staleness: _Optional[int] = ..., round_timeout_s: _Optional[float] = ..., exist_ok: bool = ..., elastic: bool = ..., lease_s: _Optional[float] = ..., layout: _Optional[str] = ..., master_dtype: _Optional[_Union[DType, str]] = ...) -> None: ...

class CreateFrame(_message.Message):
    __slots__ = ("header", "tensor", "offset", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: ModelConfig
    tensor: int
    offset: int
    data: bytes
    def __init__(self, header: _Optional[_Union[ModelConfig, _Mapping]] = ..., tensor: _Optional[int] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("model", "version", "mode", "world_size", "device", "params", "groups", "max_staleness", "round_timeout_s", "created", "skipped_steps", "elastic", "lease_s", "layout", "master_dtype", "worker_dtypes")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    MAX_STALENESS_FIELD_NUMBER: _ClassVar[int]
    ROUND_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_STEPS_FIELD_NUMBER: _ClassVar[int]
    ELASTIC_FIELD_NUMBER: _ClassVar[int]
    LEASE_S_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    MASTER_DTYPE_FIELD_NUMBER: _ClassVar[int]
    WORKER_DTYPES_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    mode: Mode
    world_size: int
    device: str
    params: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    groups: _containers.RepeatedCompositeFieldContainer[ParamGroup]
    max_staleness: int
    round_timeout_s: float
    created: bool
    skipped_steps: int
    elastic: bool
    lease_s: float
    layout: str
    master_dtype: DType
    worker_dtypes: _containers.RepeatedScalarFieldContainer[DType]
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., mode: _Optional[_Union[Mode, str]] = ..., world_size: _Optional[int] = ..., device: _Optional[str] = ..., params: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., groups: _Optional[_Iterable[_Union[ParamGroup, _Mapping]]] = ..., max_staleness: _Optional[int] = ..., round_timeout_s: _Optional[float] = ..., created: bool = ..., skipped_steps: _Optional[int] = ..., elastic: bool = ..., lease_s: _Optional[float] = ..., layout: _Optional[str] = ..., master_dtype: _Optional[_Union[DType, str]] = ..., worker_dtypes: _Optional[_Iterable[_Union[DType, str]]] = ...) -> None: ...

class GroupUpdate(_message.Message):
    __slots__ = ("group", "options")
    class OptionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: HyperValue
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[HyperValue, _Mapping]] = ...) -> None: ...
    GROUP_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    group: int
    options: _containers.MessageMap[str, HyperValue]
    def __init__(self, group: _Optional[int] = ..., options: _Optional[_Mapping[str, HyperValue]] = ...) -> None: ...

class PushHeader(_message.Message):
    __slots__ = ("model", "grads", "version", "rank", "push_id", "found_inf", "loss", "scalars", "hyper_updates", "session")
    class ScalarsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    GRADS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    PUSH_ID_FIELD_NUMBER: _ClassVar[int]
    FOUND_INF_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    SCALARS_FIELD_NUMBER: _ClassVar[int]
    HYPER_UPDATES_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    model: str
    grads: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    version: int
    rank: int
    push_id: str
    found_inf: bool
    loss: float
    scalars: _containers.ScalarMap[str, float]
    hyper_updates: _containers.RepeatedCompositeFieldContainer[GroupUpdate]
    session: str
    def __init__(self, model: _Optional[str] = ..., grads: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., version: _Optional[int] = ..., rank: _Optional[int] = ..., push_id: _Optional[str] = ..., found_inf: bool = ..., loss: _Optional[float] = ..., scalars: _Optional[_Mapping[str, float]] = ..., hyper_updates: _Optional[_Iterable[_Union[GroupUpdate, _Mapping]]] = ..., session: _Optional[str] = ...) -> None: ...

class PushFrame(_message.Message):
    __slots__ = ("header", "tensor", "offset", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: PushHeader
    tensor: int
    offset: int
    data: bytes
    def __init__(self, header: _Optional[_Union[PushHeader, _Mapping]] = ..., tensor: _Optional[int] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class PushReply(_message.Message):
    __slots__ = ("version", "applied", "found_inf", "contributors", "duplicate", "partial")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    APPLIED_FIELD_NUMBER: _ClassVar[int]
    FOUND_INF_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTORS_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    PARTIAL_FIELD_NUMBER: _ClassVar[int]
    version: int
    applied: bool
    found_inf: bool
    contributors: int
    duplicate: bool
    partial: bool
    def __init__(self, version: _Optional[int] = ..., applied: bool = ..., found_inf: bool = ..., contributors: _Optional[int] = ..., duplicate: bool = ..., partial: bool = ...) -> None: ...

class PullRequest(_message.Message):
    __slots__ = ("model", "names", "if_newer_than", "wait_for_version", "wait_timeout_s", "wire_dtype", "session", "chunk_bytes")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    NAMES_FIELD_NUMBER: _ClassVar[int]
    IF_NEWER_THAN_FIELD_NUMBER: _ClassVar[int]
    WAIT_FOR_VERSION_FIELD_NUMBER: _ClassVar[int]
    WAIT_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    WIRE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    model: str
    names: _containers.RepeatedScalarFieldContainer[str]
    if_newer_than: int
    wait_for_version: int
    wait_timeout_s: float
    wire_dtype: DType
    session: str
    chunk_bytes: int
    def __init__(self, model: _Optional[str] = ..., names: _Optional[_Iterable[str]] = ..., if_newer_than: _Optional[int] = ..., wait_for_version: _Optional[int] = ..., wait_timeout_s: _Optional[float] = ..., wire_dtype: _Optional[_Union[DType, str]] = ..., session: _Optional[str] = ..., chunk_bytes: _Optional[int] = ...) -> None: ...

class PullHeader(_message.Message):
    __slots__ = ("version", "tensors", "not_modified")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    NOT_MODIFIED_FIELD_NUMBER: _ClassVar[int]
    version: int
    tensors: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    not_modified: bool
    def __init__(self, version: _Optional[int] = ..., tensors: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., not_modified: bool = ...) -> None: ...

class PullFrame(_message.Message):
    __slots__ = ("header", "tensor", "offset", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: PullHeader
    tensor: int
    offset: int
    data: bytes
    def __init__(self, header: _Optional[_Union[PullHeader, _Mapping]] = ..., tensor: _Optional[int] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class GetStateRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class ParamState(_message.Message):
    __slots__ = ("param", "tensors")
    class TensorsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    PARAM_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    param: str
    tensors: _containers.ScalarMap[str, int]
    def __init__(self, param: _Optional[str] = ..., tensors: _Optional[_Mapping[str, int]] = ...) -> None: ...

class StateHeader(_message.Message):
    __slots__ = ("model", "groups", "states", "tensors", "version")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    STATES_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    model: str
    groups: _containers.RepeatedCompositeFieldContainer[ParamGroup]
    states: _containers.RepeatedCompositeFieldContainer[ParamState]
    tensors: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    version: int
    def __init__(self, model: _Optional[str] = ..., groups: _Optional[_Iterable[_Union[ParamGroup, _Mapping]]] = ..., states: _Optional[_Iterable[_Union[ParamState, _Mapping]]] = ..., tensors: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., version: _Optional[int] = ...) -> None: ...

class StateFrame(_message.Message):
    __slots__ = ("header", "tensor", "offset", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: StateHeader
    tensor: int
    offset: int
    data: bytes
    def __init__(self, header: _Optional[_Union[StateHeader, _Mapping]] = ..., tensor: _Optional[int] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class GroupHeader(_message.Message):
    __slots__ = ("model", "group", "params", "layout")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    model: str
    group: ParamGroup
    params: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    layout: str
    def __init__(self, model: _Optional[str] = ..., group: _Optional[_Union[ParamGroup, _Mapping]] = ..., params: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., layout: _Optional[str] = ...) -> None: ...

class GroupFrame(_message.Message):
    __slots__ = ("header", "tensor", "offset", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: GroupHeader
    tensor: int
    offset: int
    data: bytes
    def __init__(self, header: _Optional[_Union[GroupHeader, _Mapping]] = ..., tensor: _Optional[int] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class SetHyperparamsRequest(_message.Message):
    __slots__ = ("model", "updates")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    UPDATES_FIELD_NUMBER: _ClassVar[int]
    model: str
    updates: _containers.RepeatedCompositeFieldContainer[GroupUpdate]
    def __init__(self, model: _Optional[str] = ..., updates: _Optional[_Iterable[_Union[GroupUpdate, _Mapping]]] = ...) -> None: ...

class ModelRef(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsReply(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ...) -> None: ...

class DeleteReply(_message.Message):
    __slots__ = ("deleted",)
    DELETED_FIELD_NUMBER: _ClassVar[int]
    deleted: bool
    def __init__(self, deleted: bool = ...) -> None: ...

class SnapshotInfo(_message.Message):
    __slots__ = ("model", "version", "path", "bytes", "seconds")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    path: str
    bytes: int
    seconds: float
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., path: _Optional[str] = ..., bytes: _Optional[int] = ..., seconds: _Optional[float] = ...) -> None: ...

class AttachRequest(_message.Message):
    __slots__ = ("model", "host_id", "rank")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    HOST_ID_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    model: str
    host_id: str
    rank: int
    def __init__(self, model: _Optional[str] = ..., host_id: _Optional[str] = ..., rank: _Optional[int] = ...) -> None: ...

class AttachReply(_message.Message):
    __slots__ = ("accepted", "session", "params_path", "tensors", "offsets", "nbytes", "reason", "grads_path", "nonce", "worker_dtypes")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    PARAMS_PATH_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    OFFSETS_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    GRADS_PATH_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    WORKER_DTYPES_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    session: str
    params_path: str
    tensors: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    offsets: _containers.RepeatedScalarFieldContainer[int]
    nbytes: int
    reason: str
    grads_path: str
    nonce: bytes
    worker_dtypes: _containers.RepeatedScalarFieldContainer[DType]
    def __init__(self, accepted: bool = ..., session: _Optional[str] = ..., params_path: _Optional[str] = ..., tensors: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., offsets: _Optional[_Iterable[int]] = ..., nbytes: _Optional[int] = ..., reason: _Optional[str] = ..., grads_path: _Optional[str] = ..., nonce: _Optional[bytes] = ..., worker_dtypes: _Optional[_Iterable[_Union[DType, str]]] = ...) -> None: ...

class DetachRequest(_message.Message):
    __slots__ = ("model", "session")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    model: str
    session: str
    def __init__(self, model: _Optional[str] = ..., session: _Optional[str] = ...) -> None: ...

class DetachReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class JoinRequest(_message.Message):
    __slots__ = ("model", "rank")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    model: str
    rank: int
    def __init__(self, model: _Optional[str] = ..., rank: _Optional[int] = ...) -> None: ...

class JoinReply(_message.Message):
    __slots__ = ("rank", "lease_s", "version")
    RANK_FIELD_NUMBER: _ClassVar[int]
    LEASE_S_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    rank: int
    lease_s: float
    version: int
    def __init__(self, rank: _Optional[int] = ..., lease_s: _Optional[float] = ..., version: _Optional[int] = ...) -> None: ...

class LeaveRequest(_message.Message):
    __slots__ = ("model", "rank")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    model: str
    rank: int
    def __init__(self, model: _Optional[str] = ..., rank: _Optional[int] = ...) -> None: ...

class LeaveReply(_message.Message):
    __slots__ = ("left",)
    LEFT_FIELD_NUMBER: _ClassVar[int]
    left: bool
    def __init__(self, left: bool = ...) -> None: ...

class OpenBulkRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class OpenBulkReply(_message.Message):
    __slots__ = ("accepted", "reason", "port", "ticket")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    TICKET_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    reason: str
    port: int
    ticket: bytes
    def __init__(self, accepted: bool = ..., reason: _Optional[str] = ..., port: _Optional[int] = ..., ticket: _Optional[bytes] = ...) -> None: ...

class BulkStep(_message.Message):
    __slots__ = ("push", "pull")
    PUSH_FIELD_NUMBER: _ClassVar[int]
    PULL_FIELD_NUMBER: _ClassVar[int]
    push: PushHeader
    pull: PullRequest
    def __init__(self, push: _Optional[_Union[PushHeader, _Mapping]] = ..., pull: _Optional[_Union[PullRequest, _Mapping]] = ...) -> None: ...

class BulkError(_message.Message):
    __slots__ = ("code", "kind", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    kind: str
    message: str
    def __init__(self, code: _Optional[int] = ..., kind: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...
