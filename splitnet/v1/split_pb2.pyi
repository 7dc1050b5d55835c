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
    INT8: _ClassVar[DType]
DTYPE_UNSPECIFIED: DType
FLOAT32: DType
FLOAT16: DType
BFLOAT16: DType
INT8: DType

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data", "scale", "zero_point", "channels")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    ZERO_POINT_FIELD_NUMBER: _ClassVar[int]
    CHANNELS_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    scale: float
    zero_point: int
    channels: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ..., scale: _Optional[float] = ..., zero_point: _Optional[int] = ..., channels: _Optional[_Iterable[int]] = ...) -> None: ...

class SessionSpec(_message.Message):
    __slots__ = ("job", "client_id", "arch", "cut", "num_classes", "input_shape", "feature_shape", "bottleneck", "lr", "momentum", "weight_decay", "grad_codec", "seed", "lr_schedule", "width", "init_from_job", "head_cut")
    JOB_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    ARCH_FIELD_NUMBER: _ClassVar[int]
    CUT_FIELD_NUMBER: _ClassVar[int]
    NUM_CLASSES_FIELD_NUMBER: _ClassVar[int]
    INPUT_SHAPE_FIELD_NUMBER: _ClassVar[int]
    FEATURE_SHAPE_FIELD_NUMBER: _ClassVar[int]
    BOTTLENECK_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    MOMENTUM_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_DECAY_FIELD_NUMBER: _ClassVar[int]
    GRAD_CODEC_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    LR_SCHEDULE_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    INIT_FROM_JOB_FIELD_NUMBER: _ClassVar[int]
    HEAD_CUT_FIELD_NUMBER: _ClassVar[int]
    job: str
    client_id: str
    arch: str
    cut: str
    num_classes: int
    input_shape: _containers.RepeatedScalarFieldContainer[int]
    feature_shape: _containers.RepeatedScalarFieldContainer[int]
    bottleneck: int
    lr: float
    momentum: float
    weight_decay: float
    grad_codec: str
    seed: int
    lr_schedule: LrSchedule
    width: float
    init_from_job: str
    head_cut: str
    def __init__(self, job: _Optional[str] = ..., client_id: _Optional[str] = ..., arch: _Optional[str] = ..., cut: _Optional[str] = ..., num_classes: _Optional[int] = ..., input_shape: _Optional[_Iterable[int]] = ..., feature_shape: _Optional[_Iterable[int]] = ..., bottleneck: _Optional[int] = ..., lr: _Optional[float] = ..., momentum: _Optional[float] = ..., weight_decay: _Optional[float] = ..., grad_codec: _Optional[str] = ..., seed: _Optional[int] = ..., lr_schedule: _Optional[_Union[LrSchedule, _Mapping]] = ..., width: _Optional[float] = ..., init_from_job: _Optional[str] = ..., head_cut: _Optional[str] = ...) -> None: ...

class LrSchedule(_message.Message):
    __slots__ = ("kind", "milestones", "gamma", "warmup_epochs", "epochs", "steps_per_epoch")
    KIND_FIELD_NUMBER: _ClassVar[int]
    MILESTONES_FIELD_NUMBER: _ClassVar[int]
    GAMMA_FIELD_NUMBER: _ClassVar[int]
    WARMUP_EPOCHS_FIELD_NUMBER: _ClassVar[int]
    EPOCHS_FIELD_NUMBER: _ClassVar[int]
    STEPS_PER_EPOCH_FIELD_NUMBER: _ClassVar[int]
    kind: str
    milestones: _containers.RepeatedScalarFieldContainer[int]
    gamma: float
    warmup_epochs: float
    epochs: int
    steps_per_epoch: int
    def __init__(self, kind: _Optional[str] = ..., milestones: _Optional[_Iterable[int]] = ..., gamma: _Optional[float] = ..., warmup_epochs: _Optional[float] = ..., epochs: _Optional[int] = ..., steps_per_epoch: _Optional[int] = ...) -> None: ...

class Session(_message.Message):
    __slots__ = ("session_id", "last_step_id", "job_steps_applied", "resumed", "u_shaped")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    LAST_STEP_ID_FIELD_NUMBER: _ClassVar[int]
    JOB_STEPS_APPLIED_FIELD_NUMBER: _ClassVar[int]
    RESUMED_FIELD_NUMBER: _ClassVar[int]
    U_SHAPED_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    last_step_id: int
    job_steps_applied: int
    resumed: bool
    u_shaped: bool
    def __init__(self, session_id: _Optional[str] = ..., last_step_id: _Optional[int] = ..., job_steps_applied: _Optional[int] = ..., resumed: _Optional[bool] = ..., u_shaped: _Optional[bool] = ...) -> None: ...

class TrainStep(_message.Message):
    __slots__ = ("session_id", "step_id", "features", "labels", "received_step_id", "output_grad")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_STEP_ID_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_GRAD_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    step_id: int
    features: Tensor
    labels: _containers.RepeatedScalarFieldContainer[int]
    received_step_id: int
    output_grad: Tensor
    def __init__(self, session_id: _Optional[str] = ..., step_id: _Optional[int] = ..., features: _Optional[_Union[Tensor, _Mapping]] = ..., labels: _Optional[_Iterable[int]] = ..., received_step_id: _Optional[int] = ..., output_grad: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class TrainResult(_message.Message):
    __slots__ = ("step_id", "grad", "loss", "correct", "duplicate", "job_steps_applied", "durable_step_id", "lr", "output")
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    GRAD_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    CORRECT_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    JOB_STEPS_APPLIED_FIELD_NUMBER: _ClassVar[int]
    DURABLE_STEP_ID_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    step_id: int
    grad: Tensor
    loss: float
    correct: int
    duplicate: bool
    job_steps_applied: int
    durable_step_id: int
    lr: float
    output: Tensor
    def __init__(self, step_id: _Optional[int] = ..., grad: _Optional[_Union[Tensor, _Mapping]] = ..., loss: _Optional[float] = ..., correct: _Optional[int] = ..., duplicate: _Optional[bool] = ..., job_steps_applied: _Optional[int] = ..., durable_step_id: _Optional[int] = ..., lr: _Optional[float] = ..., output: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class InferRequest(_message.Message):
    __slots__ = ("session_id", "request_id", "features")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    request_id: int
    features: Tensor
    def __init__(self, session_id: _Optional[str] = ..., request_id: _Optional[int] = ..., features: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class Prediction(_message.Message):
    __slots__ = ("request_id", "logits")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    LOGITS_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    logits: Tensor
    def __init__(self, request_id: _Optional[int] = ..., logits: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class CloseRequest(_message.Message):
    __slots__ = ("session_id", "received_step_id")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_STEP_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    received_step_id: int
    def __init__(self, session_id: _Optional[str] = ..., received_step_id: _Optional[int] = ...) -> None: ...

class CloseReply(_message.Message):
    __slots__ = ("steps_applied",)
    STEPS_APPLIED_FIELD_NUMBER: _ClassVar[int]
    steps_applied: int
    def __init__(self, steps_applied: _Optional[int] = ...) -> None: ...

class FlushRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class FlushReply(_message.Message):
    __slots__ = ("durable_step_id",)
    DURABLE_STEP_ID_FIELD_NUMBER: _ClassVar[int]
    durable_step_id: int
    def __init__(self, durable_step_id: _Optional[int] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: str
    def __init__(self, job: _Optional[str] = ...) -> None: ...

class JobStats(_message.Message):
    __slots__ = ("job", "steps_applied", "sessions_open", "checkpoints_written", "client_last_step")
    class ClientLastStepEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    JOB_FIELD_NUMBER: _ClassVar[int]
    STEPS_APPLIED_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_OPEN_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINTS_WRITTEN_FIELD_NUMBER: _ClassVar[int]
    CLIENT_LAST_STEP_FIELD_NUMBER: _ClassVar[int]
    job: str
    steps_applied: int
    sessions_open: int
    checkpoints_written: int
    client_last_step: _containers.ScalarMap[str, int]
    def __init__(self, job: _Optional[str] = ..., steps_applied: _Optional[int] = ..., sessions_open: _Optional[int] = ..., checkpoints_written: _Optional[int] = ..., client_last_step: _Optional[_Mapping[str, int]] = ...) -> None: ...

class StatsReply(_message.Message):
    __slots__ = ("steps_applied", "steps_duplicate", "steps_rejected", "infer_batches", "bytes_in", "bytes_out", "sessions_open", "jobs")
    STEPS_APPLIED_FIELD_NUMBER: _ClassVar[int]
    STEPS_DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    STEPS_REJECTED_FIELD_NUMBER: _ClassVar[int]
    INFER_BATCHES_FIELD_NUMBER: _ClassVar[int]
    BYTES_IN_FIELD_NUMBER: _ClassVar[int]
    BYTES_OUT_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_OPEN_FIELD_NUMBER: _ClassVar[int]
    JOBS_FIELD_NUMBER: _ClassVar[int]
    steps_applied: int
    steps_duplicate: int
    steps_rejected: int
    infer_batches: int
    bytes_in: int
    bytes_out: int
    sessions_open: int
    jobs: _containers.RepeatedCompositeFieldContainer[JobStats]
    def __init__(self, steps_applied: _Optional[int] = ..., steps_duplicate: _Optional[int] = ..., steps_rejected: _Optional[int] = ..., infer_batches: _Optional[int] = ..., bytes_in: _Optional[int] = ..., bytes_out: _Optional[int] = ..., sessions_open: _Optional[int] = ..., jobs: _Optional[_Iterable[_Union[JobStats, _Mapping]]] = ...) -> None: ...
