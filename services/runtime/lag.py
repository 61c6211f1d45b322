"""How far behind a process is: consumer lag per assigned partition, and the outbox backlog.

Consumer lag comes from librdkafka's own statistics (`statistics.interval.ms` + `stats_cb`).
librdkafka delivers them from inside `consume()`, that is on the consumer loop's thread, so
nothing here touches the Consumer from another thread (it is not safe to), and nothing costs a
request to the broker: the end offsets are the ones the fetcher already knows.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable

from prometheus_client import Gauge

log = logging.getLogger(__name__)

STATS_INTERVAL_MS = 5_000
_INVALID = -1001  # librdkafka's RD_KAFKA_OFFSET_INVALID

CONSUMER_LAG = Gauge(
    "orderpipe_consumer_lag",
    "Messages not yet done in an assigned partition: end offset (last stable offset under read_committed) minus "
    "the offset stored after the last committed batch (or the committed offset, or the log start).",
    ["group", "topic", "partition"])
OUTBOX_BACKLOG = Gauge("orderpipe_outbox_backlog", "Outbox rows not yet acknowledged by the broker.", ["service"])


def partition_lags(stats: dict) -> dict[tuple[str, int], int]:
    """(topic, partition) -> lag for the partitions this consumer is assigned, from one statistics
    document; a partition whose offsets are not known yet is left out."""
    lags: dict[tuple[str, int], int] = {}
    for topic, t in stats.get("topics", {}).items():
        for number, p in t.get("partitions", {}).items():
            if int(number) < 0 or not p.get("desired"):  # -1: librdkafka's internal UA partition
                continue
            end = p.get("ls_offset", _INVALID)
            if end is None or end < 0:
                continue
            done = next((o for o in (p.get("stored_offset"), p.get("committed_offset"), p.get("lo_offset"))
                         if o is not None and o >= 0), None)
            if done is not None:
                lags[(topic, int(number))] = max(0, end - done)
    return lags


class ConsumerStats:
    """The consumer's `stats_cb`: sets the lag gauges of its group, and remembers when the loop
    last polled (the liveness heartbeat: statistics only arrive while the loop calls consume)."""

    def __init__(self, group: str, clock: Callable[[], float] = time.monotonic):
        self.group = group
        self.clock = clock
        self.last_seen = clock()
        self._labelled: set[tuple[str, int]] = set()

    def __call__(self, raw: str) -> None:
        self.last_seen = self.clock()
        try:
            lags = partition_lags(json.loads(raw))
        except (ValueError, TypeError, AttributeError) as exc:
            log.warning("unreadable librdkafka statistics", extra={"group": self.group, "error": repr(exc)})
            return
        for topic, partition in self._labelled - lags.keys():  # revoked: no stale series
            CONSUMER_LAG.remove(self.group, topic, str(partition))
        for (topic, partition), lag in lags.items():
            CONSUMER_LAG.labels(self.group, topic, str(partition)).set(lag)
        self._labelled = set(lags)

    def check_polling(self, max_silence_s: float) -> None:
        """For /healthz: raise when the loop has not polled for `max_silence_s` (a stuck handler)."""
        silent = self.clock() - self.last_seen
        if silent > max_silence_s:
            raise RuntimeError(f"the consumer loop has not polled for {silent:.0f} s")

    def consumer_overrides(self) -> dict:
        return {"statistics.interval.ms": STATS_INTERVAL_MS, "stats_cb": self}
