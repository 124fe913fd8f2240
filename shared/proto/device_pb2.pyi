from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatusReply(_message.Message):
    __slots__ = ("records", "subjects", "trained_through", "block", "bursts", "export", "personal_version", "shared_version", "pending")
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    SUBJECTS_FIELD_NUMBER: _ClassVar[int]
    TRAINED_THROUGH_FIELD_NUMBER: _ClassVar[int]
    BLOCK_FIELD_NUMBER: _ClassVar[int]
    BURSTS_FIELD_NUMBER: _ClassVar[int]
    EXPORT_FIELD_NUMBER: _ClassVar[int]
    PERSONAL_VERSION_FIELD_NUMBER: _ClassVar[int]
    SHARED_VERSION_FIELD_NUMBER: _ClassVar[int]
    PENDING_FIELD_NUMBER: _ClassVar[int]
    records: int
    subjects: int
    trained_through: int
    block: int
    bursts: int
    export: str
    personal_version: int
    shared_version: int
    pending: int
    def __init__(self, records: _Optional[int] = ..., subjects: _Optional[int] = ..., trained_through: _Optional[int] = ..., block: _Optional[int] = ..., bursts: _Optional[int] = ..., export: _Optional[str] = ..., personal_version: _Optional[int] = ..., shared_version: _Optional[int] = ..., pending: _Optional[int] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("prompts", "max_new_tokens", "temperature", "top_k", "top_p", "seed")
    PROMPTS_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    prompts: _containers.RepeatedScalarFieldContainer[str]
    max_new_tokens: int
    temperature: float
    top_k: int
    top_p: float
    seed: int
    def __init__(self, prompts: _Optional[_Iterable[str]] = ..., max_new_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ...) -> None: ...

class GenerateReply(_message.Message):
    __slots__ = ("texts", "finish_reasons")
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASONS_FIELD_NUMBER: _ClassVar[int]
    texts: _containers.RepeatedScalarFieldContainer[str]
    finish_reasons: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, texts: _Optional[_Iterable[str]] = ..., finish_reasons: _Optional[_Iterable[str]] = ...) -> None: ...

class TrainSharedRequest(_message.Message):
    __slots__ = ("adapter", "steps", "seed", "model_version")
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    adapter: bytes
    steps: int
    seed: int
    model_version: int
    def __init__(self, adapter: _Optional[bytes] = ..., steps: _Optional[int] = ..., seed: _Optional[int] = ..., model_version: _Optional[int] = ...) -> None: ...

class TrainSharedReply(_message.Message):
    __slots__ = ("delta", "seconds_per_step", "samples", "tokens", "loss", "model_version")
    DELTA_FIELD_NUMBER: _ClassVar[int]
    SECONDS_PER_STEP_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    delta: bytes
    seconds_per_step: float
    samples: int
    tokens: int
    loss: float
    model_version: int
    def __init__(self, delta: _Optional[bytes] = ..., seconds_per_step: _Optional[float] = ..., samples: _Optional[int] = ..., tokens: _Optional[int] = ..., loss: _Optional[float] = ..., model_version: _Optional[int] = ...) -> None: ...
