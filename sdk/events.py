"""An interaction event as the SDK takes it: validated once, then a `recs_events` row (for the
direct database path, sdk/ingest.py) or a wire map (for the broker's `ingest` op).

No database or socket code here, so the clients can import it cheaply.
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from uro_recs.protocol import ITEM_KINDS, MAX_EVENT_NAME_CHARS

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND: Final = timedelta(microseconds=1)


class InvalidEvent(ValueError):
    pass


@dataclass(frozen=True)
class Event:
    """One interaction: `user_id` did `event` ("play", "view", "save", ...) to an item."""

    user_id: uuid.UUID | str
    item_kind: str  # "avatar", "map" or "prop"
    item_id: uuid.UUID | str
    event: str
    occurred_at: datetime  # timezone-aware; with the other fields, the event's identity
    weight: float = 1.0  # its label weight in training; negative weights cancel others

    def row(self) -> tuple[uuid.UUID, str, uuid.UUID, str, datetime, float]:
        """The validated row, or InvalidEvent saying what is wrong."""
        try:
            user = self.user_id if isinstance(self.user_id, uuid.UUID) else uuid.UUID(self.user_id)
            item = self.item_id if isinstance(self.item_id, uuid.UUID) else uuid.UUID(self.item_id)
        except (ValueError, TypeError, AttributeError) as exc:
            raise InvalidEvent(f"user_id and item_id must be UUIDs: {self}") from exc
        if self.item_kind not in ITEM_KINDS:
            raise InvalidEvent(f"item_kind must be one of {ITEM_KINDS}, got {self.item_kind!r}")
        if not 1 <= len(self.event) <= MAX_EVENT_NAME_CHARS:
            raise InvalidEvent(f"event must be 1 to {MAX_EVENT_NAME_CHARS} characters")
        if self.occurred_at.tzinfo is None:
            raise InvalidEvent("occurred_at must be timezone-aware")
        if not math.isfinite(self.weight):
            raise InvalidEvent("weight must be a finite number")
        return user, self.item_kind, item, self.event, self.occurred_at, float(self.weight)

    def wire(self) -> dict[str, Any]:
        """The event as the `ingest` op carries it (docs/PROTOCOL.md)."""
        user, kind, item, event, occurred_at, weight = self.row()
        occurred_at_us = (occurred_at - _EPOCH) // _MICROSECOND
        if occurred_at_us < 0:
            raise InvalidEvent("occurred_at must not be before 1970")
        return {
            "user_id": str(user),
            "item_kind": kind,
            "item_id": str(item),
            "event": event,
            "occurred_at_us": occurred_at_us,
            "weight": weight,
        }
