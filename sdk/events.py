"""An interaction event as the SDK takes it: validated once, then a `recs_events` row (for the
direct database path, pipeline/ingest.py) or a wire map (for the broker's `ingest` op).

No database or socket code here, so the clients can import it cheaply.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from uro_recs.core import protocol
from uro_recs.core.protocol import IngestEvent

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

    def validated(self) -> IngestEvent:
        """The event checked by the protocol's own rules (`protocol.parse_event`), or
        InvalidEvent saying what is wrong. UUIDs may be given in any form `uuid.UUID` reads."""
        try:
            user = self.user_id if isinstance(self.user_id, uuid.UUID) else uuid.UUID(self.user_id)
            item = self.item_id if isinstance(self.item_id, uuid.UUID) else uuid.UUID(self.item_id)
        except (ValueError, TypeError, AttributeError) as exc:
            raise InvalidEvent(f"user_id and item_id must be UUIDs: {self}") from exc
        if not isinstance(self.occurred_at, datetime) or self.occurred_at.tzinfo is None:
            raise InvalidEvent("occurred_at must be a timezone-aware datetime")
        wire = {
            "user_id": str(user),
            "item_kind": self.item_kind,
            "item_id": str(item),
            "event": self.event,
            "occurred_at_us": (self.occurred_at - _EPOCH) // _MICROSECOND,
            "weight": self.weight,
        }
        try:
            return protocol.parse_event(wire)
        except protocol.ProtocolError as exc:
            raise InvalidEvent(exc.message) from None

    def row(self) -> tuple[uuid.UUID, str, uuid.UUID, str, datetime, float]:
        """The validated `recs_events` row (for the direct database path)."""
        return self.validated().row()

    def wire(self) -> dict[str, Any]:
        """The validated event as the `ingest` op carries it (docs/PROTOCOL.md)."""
        return self.validated().wire()
