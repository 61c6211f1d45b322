"""Envelope headers carried by every message we produce.

The event id is the dedup key everywhere (inbox rows, Message-IDs); the correlation id is the
order id (a StockAdjusted's: its SKU, the event's key); the causation id is the event id of the
message that caused this one.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from datetime import UTC, datetime

EVENT_ID = "event_id"
EVENT_TYPE = "event_type"
SCHEMA_VERSION = "schema_version"
CORRELATION_ID = "correlation_id"
CAUSATION_ID = "causation_id"
PRODUCED_AT = "produced_at"
TRACEPARENT = "traceparent"

Headers = list[tuple[str, bytes]]


# Ids come from `random.getrandbits` (Mersenne Twister, seeded from os.urandom and reseeded in
# every forked child) rather than uuid.uuid4() / os.urandom, which make a system call per id:
# two per event on a consumer's hot path. The ids must be unique, not unguessable.
_bits = random.getrandbits


def new_event_id() -> str:
    """A random (version 4) UUID as text."""
    n = (_bits(128) & ~(0xF000 << 64) | (0x4000 << 64)) & ~(0xC000 << 48) | (0x8000 << 48)
    h = f"{n:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def new_traceparent(trace_id: str | None = None) -> str:
    """W3C trace context: version-traceid-parentid-flags. A child keeps the trace id."""
    return f"00-{trace_id or f'{_bits(128):032x}'}-{_bits(64):016x}-01"


def trace_id_of(traceparent: str | None) -> str | None:
    parts = (traceparent or "").split("-")
    return parts[1] if len(parts) == 4 and len(parts[1]) == 32 else None


@dataclass(frozen=True)
class Envelope:
    event_id: str
    event_type: str
    schema_version: int
    correlation_id: str
    causation_id: str | None = None
    produced_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    traceparent: str = field(default_factory=new_traceparent)

    def header_items(self) -> list[tuple[str, str]]:
        """The envelope as (name, text) pairs: what the outbox stores and the relay sends."""
        items = [
            (EVENT_ID, self.event_id),
            (EVENT_TYPE, self.event_type),
            (SCHEMA_VERSION, str(self.schema_version)),
            (CORRELATION_ID, self.correlation_id),
            (PRODUCED_AT, self.produced_at.isoformat()),
            (TRACEPARENT, self.traceparent),
        ]
        if self.causation_id:
            items.append((CAUSATION_ID, self.causation_id))
        return items

    def to_headers(self) -> Headers:
        return [(name, value.encode()) for name, value in self.header_items()]

    def child(self, event_type: str, schema_version: int) -> Envelope:
        """The envelope of an event caused by this one: same correlation and trace."""
        return Envelope(
            event_id=new_event_id(),
            event_type=event_type,
            schema_version=schema_version,
            correlation_id=self.correlation_id,
            causation_id=self.event_id,
            traceparent=new_traceparent(trace_id_of(self.traceparent)),
        )


def headers_to_dict(headers: Headers | None) -> dict[str, str]:
    """Last value wins; undecodable header bytes are shown escaped rather than raising."""
    out: dict[str, str] = {}
    for key, value in headers or ():
        if value is None:
            continue
        out[key] = value.decode("utf-8", "backslashreplace") if isinstance(value, bytes) else str(value)
    return out
