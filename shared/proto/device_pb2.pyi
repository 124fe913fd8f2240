from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

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
    __slots__ = ("adapter", "steps", "seed", "model_version", "ledger")
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    LEDGER_FIELD_NUMBER: _ClassVar[int]
    adapter: bytes
    steps: int
    seed: int
    model_version: int
    ledger: bytes
    def __init__(self, adapter: _Optional[bytes] = ..., steps: _Optional[int] = ..., seed: _Optional[int] = ..., model_version: _Optional[int] = ..., ledger: _Optional[bytes] = ...) -> None: ...

class TrainSharedReply(_message.Message):
    __slots__ = ("delta", "seconds_per_step", "samples", "tokens", "loss", "model_version", "holdings")
    DELTA_FIELD_NUMBER: _ClassVar[int]
    SECONDS_PER_STEP_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    HOLDINGS_FIELD_NUMBER: _ClassVar[int]
    delta: bytes
    seconds_per_step: float
    samples: int
    tokens: int
    loss: float
    model_version: int
    holdings: Holdings
    def __init__(self, delta: _Optional[bytes] = ..., seconds_per_step: _Optional[float] = ..., samples: _Optional[int] = ..., tokens: _Optional[int] = ..., loss: _Optional[float] = ..., model_version: _Optional[int] = ..., holdings: _Optional[_Union[Holdings, _Mapping]] = ...) -> None: ...

class Holdings(_message.Message):
    __slots__ = ("salt", "subject_hashes")
    SALT_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_HASHES_FIELD_NUMBER: _ClassVar[int]
    salt: str
    subject_hashes: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, salt: _Optional[str] = ..., subject_hashes: _Optional[_Iterable[str]] = ...) -> None: ...

class UnlearnRequest(_message.Message):
    __slots__ = ("request_id", "subject_hash", "selectors_json")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_HASH_FIELD_NUMBER: _ClassVar[int]
    SELECTORS_JSON_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    subject_hash: str
    selectors_json: str
    def __init__(self, request_id: _Optional[str] = ..., subject_hash: _Optional[str] = ..., selectors_json: _Optional[str] = ...) -> None: ...

class UnlearnReply(_message.Message):
    __slots__ = ("held", "shared_edit", "measurements", "personal_version_before", "personal_version_after", "shared_version", "records_deleted", "holdings")
    class MeasurementsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    HELD_FIELD_NUMBER: _ClassVar[int]
    SHARED_EDIT_FIELD_NUMBER: _ClassVar[int]
    MEASUREMENTS_FIELD_NUMBER: _ClassVar[int]
    PERSONAL_VERSION_BEFORE_FIELD_NUMBER: _ClassVar[int]
    PERSONAL_VERSION_AFTER_FIELD_NUMBER: _ClassVar[int]
    SHARED_VERSION_FIELD_NUMBER: _ClassVar[int]
    RECORDS_DELETED_FIELD_NUMBER: _ClassVar[int]
    HOLDINGS_FIELD_NUMBER: _ClassVar[int]
    held: bool
    shared_edit: bytes
    measurements: _containers.ScalarMap[str, float]
    personal_version_before: int
    personal_version_after: int
    shared_version: int
    records_deleted: int
    holdings: Holdings
    def __init__(self, held: _Optional[bool] = ..., shared_edit: _Optional[bytes] = ..., measurements: _Optional[_Mapping[str, float]] = ..., personal_version_before: _Optional[int] = ..., personal_version_after: _Optional[int] = ..., shared_version: _Optional[int] = ..., records_deleted: _Optional[int] = ..., holdings: _Optional[_Union[Holdings, _Mapping]] = ...) -> None: ...

class AnnounceRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
