"""The failure-notice contract: what a consumer group tells the order-status view when it routes
a failed message to a retry or dead-letter topic, and how the view reads it back.

The copy itself goes to the group's own retry or dead-letter topic (consumer.py), for the group
and its operators. Beside it, the runtime writes one small JSON notice to `orderpipe.failures`
(topology.FAILURES), keyed by the order id, so that the view reads one topic for every group's
failures instead of every retry and dead-letter topic. Both are acked before the failed
message's offset is stored: a crash in between writes both again, and the view folds a notice
read twice once (its fold input's id is fixed per failure: inputs.failure_input).

Only messages of topics keyed by order id get a notice: the view folds orders, and a copy of
another topic's message (stock.adjusted is keyed by SKU) said nothing to it before either.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Literal

from services.runtime import topology

Kind = Literal["retry", "dlt"]


class NotANotice(ValueError):
    """Bytes on the failures topic that are not a notice (the view logs and skips them)."""


@dataclass(frozen=True)
class FailureNotice:
    order_id: str
    group: str           # the consumer group that failed
    source: str          # the topic the event was first published to
    topic: str           # where the copy went: a retry tier or the dead-letter topic
    kind: Kind
    attempt: int         # the failed attempt's number (1: the first delivery)
    event_id: str        # the original event's id (the copy keeps it)
    error_type: str      # module-qualified exception type
    error: str           # the exception's message (cut to failure_headers.MESSAGE_LIMIT)
    reason: str | None   # dead letters only: "not retryable" / "retries exhausted after N attempts"
    at: str              # when it failed, ISO 8601 UTC

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()


def keyed_by_order(topic: str) -> bool:
    """Whether failures of `topic`'s events get a notice: an event topic keyed by order id (read
    at call time: a service's own topics join when it registers, services/runtime/contracts.py)."""
    return any(t.name == topic and t.key == "order_id" for t in topology.EVENT_TOPICS)


def read_notice(value: bytes | None) -> FailureNotice:
    """A notice from the failures topic; raises NotANotice for anything else."""
    try:
        data = json.loads(value or b"")
        notice = FailureNotice(**data)
    except (ValueError, TypeError) as exc:
        raise NotANotice(f"not a failure notice: {exc}") from None
    if notice.kind not in ("retry", "dlt"):
        raise NotANotice(f"a failure notice's kind is retry or dlt, not {notice.kind!r}")
    if not isinstance(notice.attempt, int) or isinstance(notice.attempt, bool):
        raise NotANotice(f"a failure notice's attempt is a number, not {notice.attempt!r}")
    if not all(isinstance(v, str) and v for v in (notice.order_id, notice.group, notice.source, notice.topic)):
        raise NotANotice("a failure notice names its order, group, source and topic")
    return notice
