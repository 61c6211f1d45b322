"""The event only the loyalty service defines, and its contract: model, topic and schema folder."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from services.runtime.contracts import EventContract
from services.runtime.events import Event
from services.runtime.topology import TopicSpec

POINTS_AWARDED = "loyalty.points"


class PointsAwarded(Event):
    customer_id: str
    points: int
    awarded_at: datetime


CONTRACTS = (
    EventContract(PointsAwarded,
                  TopicSpec(POINTS_AWARDED, event_types=("PointsAwarded",), writer="loyalty",
                            doc="The customer was credited loyalty points for the order."),
                  schemas=Path(__file__).resolve().parent / "schemas"),
)
