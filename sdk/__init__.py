"""Python client for uro-recs: `Client` (blocking) and `AsyncClient` (asyncio).

with Client("ipc:///run/uro-recs/client.sock", model="als") as client:
    rec = client.recommend(42, n=20)
"""

from uro_recs.core.protocol import Id

from .client import DEFAULT_TIMEOUT, AsyncClient, Client, ClientState, RetryPolicy
from .errors import (
    BadRequest,
    DeadlineExceeded,
    Overloaded,
    RequestRejected,
    ServerError,
    TryAgainLater,
    Unavailable,
    UnknownModel,
    Unsupported,
    UroRecsError,
    WorkerLost,
    error_from_reply,
)
from .events import Event, InvalidEvent
from .results import ModelInfo, Prediction, Recommendation, SimilarItems

__all__ = [
    "DEFAULT_TIMEOUT",
    "AsyncClient",
    "BadRequest",
    "Client",
    "ClientState",
    "DeadlineExceeded",
    "Event",
    "Id",
    "InvalidEvent",
    "ModelInfo",
    "Overloaded",
    "Prediction",
    "Recommendation",
    "RequestRejected",
    "RetryPolicy",
    "ServerError",
    "SimilarItems",
    "TryAgainLater",
    "Unavailable",
    "UnknownModel",
    "Unsupported",
    "UroRecsError",
    "WorkerLost",
    "error_from_reply",
]
