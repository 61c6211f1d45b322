"""Every built-in event topic, declared once, and the shape of a consumer group's topics.

The event topics are contracts, like the schemas: services, tests, `orderpipe topics create`
and the deploy manifests all read them here, so a topic's name, partition count and policies
cannot drift. A topic of an event type only one service defines is declared in that service's
package and joins these when it registers (services/runtime/contracts.py). The consumer groups are not listed here but derived from the services'
declarations (services/registry.py: `GROUPS`, `all_topics()`). Each group gets its own retry
chain and dead-letter topic per input topic (`<topic>.<group>.retry.<n>`, `<topic>.<group>.dlt`),
so a failure in one group never replays the event to the others.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

DAY_MS = 24 * 60 * 60 * 1000

ORDERS_CREATED = "orders.created"
STOCK_RESERVED = "stock.reserved"
STOCK_REJECTED = "stock.rejected"
EMAIL_SENT = "email.sent"
INVOICES_ISSUED = "invoices.issued"
ANALYTICS_RECORDED = "analytics.recorded"
ORDERS_STATUS = "orders.status"
ORDERS_CANCELLED = "orders.cancelled"
ORDERS_COMPENSATED = "orders.compensated"
STOCK_ADJUSTED = "stock.adjusted"
# Operators' record of every dead-letter replay and purge (JSON, one partition: one total order).
AUDIT = "orderpipe.audit"
# One small JSON notice per failure a group routes to a retry or dead-letter topic
# (services/runtime/failure_notices.py): how the order-status view learns of failures.
FAILURES = "orderpipe.failures"
# The order-status worker's Faust app id: its consumer group, and the prefix of the topics it owns.
ORDER_STATUS_APP = "order-status"


def sla_topic_name(app_id: str) -> str:
    """The topic an order-status worker's SLA timer sends through (streams/order_status/sla.py)."""
    return f"{app_id}-sla-exceeded"


DEFAULT_PARTITIONS = 6
DEFAULT_RETRY_DELAYS_S = (1.0, 10.0, 60.0)


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int = DEFAULT_PARTITIONS
    cleanup_policy: str = "delete"  # "compact" only ever to save space: nothing depends on compaction
    retention_ms: int = 7 * DAY_MS
    key: str = "order_id"
    event_types: tuple[str, ...] = ()
    writer: str = ""
    doc: str = ""

    def config(self) -> dict[str, str]:
        cfg = {"cleanup.policy": self.cleanup_policy}
        if self.cleanup_policy == "delete":
            cfg["retention.ms"] = str(self.retention_ms)
        return cfg


@dataclass(frozen=True)
class ConsumerGroup:
    """One service's consumer group: the topics it reads and its retry policy."""

    name: str
    inputs: tuple[str, ...]
    retry_delays_s: tuple[float, ...] = DEFAULT_RETRY_DELAYS_S
    outputs: tuple[str, ...] = field(default=())

    def retry_topic(self, source: str, attempt: int) -> str:
        return f"{source}.{self.name}.retry.{attempt}"

    def dlt_topic(self, source: str) -> str:
        return f"{source}.{self.name}.dlt"

    def retry_topics(self, source: str) -> list[str]:
        return [self.retry_topic(source, n) for n in range(1, len(self.retry_delays_s) + 1)]

    def parking_topic(self, source: str) -> str:
        """Where `orderpipe dlt replay` puts dead letters that were replayed too often already."""
        return f"{source}.{self.name}.parking"


# The built-in event topics; a service's own event types add theirs when its declaration
# registers them (services/runtime/contracts.py), so these three are lists read at call time.
EVENT_TOPICS: list[TopicSpec] = [
    # The writer of each is the service that declares it emits the event (registry.all_topics()).
    TopicSpec(ORDERS_CREATED, event_types=("OrderCreated",), doc="Every accepted order."),
    TopicSpec(STOCK_RESERVED, event_types=("StockReserved",), doc="Stock was reserved for every line of the order."),
    TopicSpec(STOCK_REJECTED, event_types=("StockRejected",),
              doc="The order was rejected whole: some line was out of stock."),
    TopicSpec(EMAIL_SENT, event_types=("ConfirmationEmailSent",),
              doc="The confirmation e-mail was accepted by the SMTP server."),
    TopicSpec(INVOICES_ISSUED, event_types=("InvoiceIssued",),
              doc="An invoice PDF was issued (only for orders whose stock was reserved)."),
    TopicSpec(ANALYTICS_RECORDED, event_types=("OrderRecorded",), doc="The order was added to the analytics rollups."),
    TopicSpec(ORDERS_CANCELLED, event_types=("OrderCancelled",),
              doc="Every cancelled order (at most one event per order)."),
    TopicSpec(ORDERS_COMPENSATED, event_types=("StepCompensated",),
              doc="What each service undid for a cancelled order: one event per service and order."),
    # Not an order's topic: keyed by SKU. The order-status view reads it with the others and skips it.
    TopicSpec(STOCK_ADJUSTED, key="sku", event_types=("StockAdjusted",),
              doc="Stock put in by hand (`orderpipe stock add`): one event per addition, with its audit record."),
    TopicSpec(ORDERS_STATUS, cleanup_policy="compact", event_types=("OrderStatus",), writer="order-status (Faust)",
              doc="The latest status of every order (compacted, keyed by order id)."),
]

# Read and written by the operators' CLI (`orderpipe dlt`), never by the services. Its retention
# outlives the dead-letter topics': the replay/purge records there also say which dead letters
# were handled (see services/ops/handled.py).
OPS_TOPICS: tuple[TopicSpec, ...] = (
    TopicSpec(AUDIT, partitions=1, retention_ms=365 * DAY_MS, key="run id", writer="orderpipe dlt (operators)",
              doc="One JSON record per dead-letter replay or purge step: who, when, host, filter, count, offsets, "
                  "outcome."),
)

# The two topics the order-status worker owns, named as Faust names them (streams/order_status:
# the table's changelog `<app id>-<table>-changelog`, and `sla_topic_name` above). Faust would
# create them as the worker starts, but a worker that creates topics and joins at once can be
# assigned without them on a loaded broker; it then rebalances when its metadata refresh sees
# them, ~10 s later, and re-reads from its last commit. Declared here, `orderpipe up`,
# `orderpipe topics create` and the deploy manifests create them before any worker joins.
STATUS_OWN_TOPICS: tuple[TopicSpec, ...] = (
    TopicSpec(f"{ORDER_STATUS_APP}-order-status-changelog", cleanup_policy="compact", writer="order-status (Faust)",
              doc="The order-status table's changelog (JSON): the worker's state, restored when it starts."),
    TopicSpec(sla_topic_name(ORDER_STATUS_APP), writer="order-status (Faust timer)",
              doc="Orders found unfinished after the SLA: from the worker's timer to the worker that owns the order."),
)

# Written by every consumer group beside each retry or dead-letter copy, read by the order-status
# view. The view used to read the 40-odd retry and dead-letter topics themselves: every fetch of
# the worker then named ~300 partitions, nearly all empty, and answering them was most of the
# Apache Kafka broker's fetch work (README, Performance). Partitioned as the order topics (the
# view's table is co-partitioned with its inputs).
FAILURES_TOPIC = TopicSpec(FAILURES, writer="every consumer group (runtime)",
                           doc="One JSON notice per failure routed to a retry or dead-letter topic, keyed by order "
                               "id: group, source and target topics, attempt, error. The order-status view's input.")

# The declared topics whose values are JSON, not Avro events (`orderpipe tail` shows them as JSON).
JSON_TOPICS: frozenset[str] = frozenset({FAILURES, AUDIT, *(t.name for t in STATUS_OWN_TOPICS)})

# The Faust order-status view reads every event topic and the failure notices; and its own SLA
# topic (STATUS_OWN_TOPICS).
STATUS_INPUTS: list[str] = [t.name for t in EVENT_TOPICS if t.name != ORDERS_STATUS]

# Which topic each event type is published to (one event type per topic).
TOPIC_FOR_EVENT: dict[str, str] = {t: spec.name for spec in EVENT_TOPICS for t in spec.event_types}


def topics_for(groups: Iterable[ConsumerGroup]) -> list[TopicSpec]:
    """Event topics, the retry, dead-letter and parking topics of `groups`, the failure notices,
    the order-status worker's own topics, and the operators' audit topic."""
    topics = list(EVENT_TOPICS)
    for g in groups:
        for source in g.inputs:
            partitions = next(t.partitions for t in EVENT_TOPICS if t.name == source)
            topics += [TopicSpec(name, partitions=partitions, writer=f"{g.name} (retry)",
                                 doc=f"{g.name}'s retry tier for {source}") for name in g.retry_topics(source)]
            topics.append(TopicSpec(g.dlt_topic(source), partitions=partitions, retention_ms=28 * DAY_MS,
                                    writer=f"{g.name} (dead letters)", doc=f"{g.name}'s dead letters from {source}"))
            topics.append(TopicSpec(g.parking_topic(source), partitions=partitions, retention_ms=90 * DAY_MS,
                                    writer="orderpipe dlt replay",
                                    doc=f"{g.name}'s dead letters from {source} replayed too often; for a human"))
    return [*topics, FAILURES_TOPIC, *STATUS_OWN_TOPICS, *OPS_TOPICS]
