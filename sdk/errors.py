"""Exceptions raised by the clients; the class says what the caller should do next.

UroRecsError                 base: .code, .message, .request_id
├── RequestRejected          fix the request before sending it again
│   ├── BadRequest           also too_large, unsupported_version, unknown_op
│   ├── UnknownModel
│   └── Unsupported
├── TryAgainLater            retryable; the client already retried within its budget
│   ├── Overloaded
│   ├── Unavailable
│   └── WorkerLost
├── DeadlineExceeded         also a builtin TimeoutError
└── ServerError              internal, or a reply that breaks the contract
"""

from __future__ import annotations

from typing import Any

from uro_recs.core.protocol import Error, ErrorCode, RequestId


class UroRecsError(Exception):
    """A request failed; `code` is the protocol error code."""

    def __init__(self, code: ErrorCode, message: str, request_id: RequestId | None = None):
        super().__init__(f"{code.value}: {message}")
        self.code = code
        self.message = message
        self.request_id = request_id

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (self.code, self.message, self.request_id)


class RequestRejected(UroRecsError):
    """The server refused the request as asked; sending it again will not help."""


class BadRequest(RequestRejected):
    """Malformed, too large, of an unsupported protocol version, or an unknown op."""


class UnknownModel(RequestRejected):
    """No model of that name is served."""


class Unsupported(RequestRejected):
    """The model cannot do this op (e.g. similar_items without embeddings)."""


class TryAgainLater(UroRecsError):
    """A transient failure; the same request may succeed later."""


class Overloaded(TryAgainLater):
    """The model's queue is full."""


class Unavailable(TryAgainLater):
    """The broker is draining or the model has no live worker."""


class WorkerLost(TryAgainLater):
    """The worker died while handling the request."""


class DeadlineExceeded(UroRecsError, TimeoutError):
    """The time budget ran out, on the server or waiting for its reply."""


class ServerError(UroRecsError):
    """A server-side bug, or a reply that breaks the protocol."""


_BY_CODE: dict[ErrorCode, type[UroRecsError]] = {
    ErrorCode.BAD_REQUEST: BadRequest,
    ErrorCode.TOO_LARGE: BadRequest,
    ErrorCode.UNSUPPORTED_VERSION: BadRequest,
    ErrorCode.UNKNOWN_OP: BadRequest,
    ErrorCode.UNKNOWN_MODEL: UnknownModel,
    ErrorCode.UNSUPPORTED: Unsupported,
    ErrorCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    ErrorCode.OVERLOADED: Overloaded,
    ErrorCode.UNAVAILABLE: Unavailable,
    ErrorCode.WORKER_LOST: WorkerLost,
    ErrorCode.INTERNAL: ServerError,
}


def error_from_reply(error: Error, request_id: RequestId | None = None) -> UroRecsError:
    """The exception for an error reply."""
    return _BY_CODE.get(error.code, ServerError)(error.code, error.message, request_id)
