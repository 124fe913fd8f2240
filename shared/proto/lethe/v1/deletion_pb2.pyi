from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Status(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STATUS_UNSPECIFIED: _ClassVar[Status]
    RECEIVED: _ClassVar[Status]
    DISPATCHED: _ClassVar[Status]
    APPLIED_ON_DEVICES: _ClassVar[Status]
    APPLIED_GLOBALLY: _ClassVar[Status]
    VERIFIED: _ClassVar[Status]
    FAILED: _ClassVar[Status]
STATUS_UNSPECIFIED: Status
RECEIVED: Status
DISPATCHED: Status
APPLIED_ON_DEVICES: Status
APPLIED_GLOBALLY: Status
VERIFIED: Status
FAILED: Status

class RecordSelector(_message.Message):
    __slots__ = ("kinds", "from_ts", "to_ts")
    KINDS_FIELD_NUMBER: _ClassVar[int]
    FROM_TS_FIELD_NUMBER: _ClassVar[int]
    TO_TS_FIELD_NUMBER: _ClassVar[int]
    kinds: _containers.RepeatedScalarFieldContainer[str]
    from_ts: float
    to_ts: float
    def __init__(self, kinds: _Optional[_Iterable[str]] = ..., from_ts: _Optional[float] = ..., to_ts: _Optional[float] = ...) -> None: ...

class SubmitDeletionRequest(_message.Message):
    __slots__ = ("subject_id", "selectors", "idempotency_key")
    SUBJECT_ID_FIELD_NUMBER: _ClassVar[int]
    SELECTORS_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    subject_id: str
    selectors: _containers.RepeatedCompositeFieldContainer[RecordSelector]
    idempotency_key: str
    def __init__(self, subject_id: _Optional[str] = ..., selectors: _Optional[_Iterable[_Union[RecordSelector, _Mapping]]] = ..., idempotency_key: _Optional[str] = ...) -> None: ...

class SubmitDeletionResponse(_message.Message):
    __slots__ = ("request_id", "request")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    request: DeletionRequest
    def __init__(self, request_id: _Optional[str] = ..., request: _Optional[_Union[DeletionRequest, _Mapping]] = ...) -> None: ...

class GetDeletionRequest(_message.Message):
    __slots__ = ("request_id",)
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    def __init__(self, request_id: _Optional[str] = ...) -> None: ...

class ListDeletionsRequest(_message.Message):
    __slots__ = ("page_size", "page_token", "status")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    status: Status
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., status: _Optional[_Union[Status, str]] = ...) -> None: ...

class ListDeletionsResponse(_message.Message):
    __slots__ = ("requests", "next_page_token")
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    requests: _containers.RepeatedCompositeFieldContainer[DeletionRequest]
    next_page_token: str
    def __init__(self, requests: _Optional[_Iterable[_Union[DeletionRequest, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class WatchDeletionRequest(_message.Message):
    __slots__ = ("request_id",)
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    def __init__(self, request_id: _Optional[str] = ...) -> None: ...

class StatusChange(_message.Message):
    __slots__ = ("request_id", "seq", "status", "reason", "at", "detail_json", "attempt")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    DETAIL_JSON_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    seq: int
    status: Status
    reason: str
    at: float
    detail_json: str
    attempt: int
    def __init__(self, request_id: _Optional[str] = ..., seq: _Optional[int] = ..., status: _Optional[_Union[Status, str]] = ..., reason: _Optional[str] = ..., at: _Optional[float] = ..., detail_json: _Optional[str] = ..., attempt: _Optional[int] = ...) -> None: ...

class Receipt(_message.Message):
    __slots__ = ("body", "signature", "key_id")
    BODY_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    body: bytes
    signature: bytes
    key_id: str
    def __init__(self, body: _Optional[bytes] = ..., signature: _Optional[bytes] = ..., key_id: _Optional[str] = ...) -> None: ...

class DeletionRequest(_message.Message):
    __slots__ = ("request_id", "app", "subject_id", "subject_hash", "selectors", "idempotency_key", "status", "failure_reason", "attempts", "max_attempts", "next_attempt_at", "created_at", "updated_at", "history", "receipt", "details_json")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    APP_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_ID_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_HASH_FIELD_NUMBER: _ClassVar[int]
    SELECTORS_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    FAILURE_REASON_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    MAX_ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_ATTEMPT_AT_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    RECEIPT_FIELD_NUMBER: _ClassVar[int]
    DETAILS_JSON_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    app: str
    subject_id: str
    subject_hash: str
    selectors: _containers.RepeatedCompositeFieldContainer[RecordSelector]
    idempotency_key: str
    status: Status
    failure_reason: str
    attempts: int
    max_attempts: int
    next_attempt_at: float
    created_at: float
    updated_at: float
    history: _containers.RepeatedCompositeFieldContainer[StatusChange]
    receipt: Receipt
    details_json: str
    def __init__(self, request_id: _Optional[str] = ..., app: _Optional[str] = ..., subject_id: _Optional[str] = ..., subject_hash: _Optional[str] = ..., selectors: _Optional[_Iterable[_Union[RecordSelector, _Mapping]]] = ..., idempotency_key: _Optional[str] = ..., status: _Optional[_Union[Status, str]] = ..., failure_reason: _Optional[str] = ..., attempts: _Optional[int] = ..., max_attempts: _Optional[int] = ..., next_attempt_at: _Optional[float] = ..., created_at: _Optional[float] = ..., updated_at: _Optional[float] = ..., history: _Optional[_Iterable[_Union[StatusChange, _Mapping]]] = ..., receipt: _Optional[_Union[Receipt, _Mapping]] = ..., details_json: _Optional[str] = ...) -> None: ...
