"""The SLA: an order with a step not finished `sla_s` after it was created is flagged once.

The worker's timer finds such orders (`SlaWatch`: an index by deadline, kept by the fold) and
sends each to the SLA topic; the fold sets the flag, so the table is written only by stream
processing. The wiring is in app.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from datetime import datetime, timedelta

from streams.order_status.status import FINAL_ORDER_STATES, OrderStatus

DEFAULT_SLA_S = 300.0


def default_sla_check_interval(sla_s: float) -> float:
    return min(max(sla_s / 10, 0.5), 30.0)


class SlaWatch:
    """The orders that can still pass their SLA (not final, not flagged), by deadline.

    Kept up to date by the fold, so a timer tick looks only at orders whose deadline passed,
    not at the whole table: scanning 100,000 stored statuses on every tick blocked the event
    loop for minutes, and the worker lost its group membership."""

    def __init__(self, sla_s: float):
        self.sla = timedelta(seconds=sla_s)
        self.deadlines: dict[bytes, datetime] = {}
        self.partitions: set[int] | None = None  # the assignment the index was built for

    def note(self, status: OrderStatus) -> None:
        key = status.order_id.encode()
        if status.state in FINAL_ORDER_STATES or status.sla_deadline is not None:
            self.deadlines.pop(key, None)
        else:
            self.deadlines[key] = status.created_at + self.sla

    async def rebuild(self, items: Iterable[tuple[bytes, dict]], partitions: set[int]) -> None:
        self.deadlines.clear()
        for n, (key, stored) in enumerate(items, 1):
            if stored.get("state") not in FINAL_ORDER_STATES and stored.get("sla_deadline") is None:
                self.deadlines[key] = datetime.fromisoformat(stored["created_at"]) + self.sla
            if n % 1000 == 0:
                await asyncio.sleep(0)
        self.partitions = set(partitions)

    def due(self, now: datetime) -> list[bytes]:
        """Keys whose deadline passed; they leave the index (the fold re-adds what stays open)."""
        keys = [k for k, deadline in self.deadlines.items() if deadline <= now]
        for k in keys:
            del self.deadlines[k]
        return keys
