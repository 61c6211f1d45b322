"""Crash harness: run the whole pipeline, SIGKILL its workers while orders flow, check every outcome.

Used by `tests/e2e/test_crash.py` (a few hundred orders in `make test`) and by `make chaos`
(the same run, longer: more orders, more kills). The size comes from the environment:

    ORDERPIPE_CHAOS_ORDERS   orders to place                       (default 300)
    ORDERPIPE_CHAOS_KILLS    SIGKILLs per process                  (default 3)
    ORDERPIPE_CHAOS_RATE     orders placed per second              (default 15)
    ORDERPIPE_CHAOS_SEED     seed of the orders and kill schedule  (default 20261123)
    ORDERPIPE_CHAOS_CANCEL_SHARE  share of orders cancelled        (default 0.2)

How a run goes (everything in the main thread: the supervisor's children get a parent-death
signal tied to the thread that spawned them, so restarts must come from a long-lived thread):
1. the stack starts (`services.pipeline.stack.Stack`: broker, SMTP sink, orders API and relay, the
   four consumer services, the order-status view), each on its own database;
2. orders are placed through the HTTP API at a steady rate, and a share of them cancelled
   (`POST /orders/{id}/cancel`) at a random moment within 3 s of being placed;
3. the victims (orders relay, inventory, email, invoice, analytics) are SIGKILLed at random
   times from the seeded schedule, and each kill waits until the victim's current incarnation
   has made progress, so it lands on a working process rather than one still starting. E-mail
   kills prefer (for up to 3 s) a moment when a mail was accepted by the SMTP sink but its row
   is not committed, relay kills one with rows not yet marked published; the supervisor
   restarts every victim (its auto-restart, with its backoff);
4. when the databases say every order went through every step, the order-status view must show
   every order final; then `check_outcomes` looks at the effects themselves.

The schedule is seeded, so a run is repeatable in what it does; when a kill lands relative to
the work in flight is genuinely random (it depends on timing).

The same run with the brokers failing instead of the workers (`BrokerRun`, at the end; Apache
Kafka only): `tests/e2e/test_kafka_broker_failures.py` (`make chaos-kafka`) SIGKILLs and freezes
nodes of a three-node cluster, `tests/e2e/test_kafka_outage.py` takes the whole cluster away for
a minute. Orders come from a thread of their own there, every check above applies, and every
consumer group's committed offsets must reach the end offsets (`wait_for_zero_lag`).
"""

from __future__ import annotations

import os
import random
import re
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from decimal import Decimal
from email.parser import BytesParser
from email.policy import default as default_policy
from itertools import cycle
from pathlib import Path

import httpx
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient
from sqlalchemy import MetaData, create_engine, func, select, text
from sqlalchemy.engine import Engine

from services import registry
from services.analytics.tables import per_minute, per_sku
from services.email.mailer import message_id_for
from services.email.tables import cancelled_orders as emails_cancelled, sent_emails
from services.inventory.settings import InventorySettings
from services.inventory.tables import reservations, stock
from services.invoice.tables import credit_notes, invoices
from services.orders.tables import orders as orders_table
from services.orders.tables import outbox as orders_outbox
from services.pipeline.demo import CANCELLED, FINAL_STATES, SampleOrder, sample_orders
from services.pipeline.stack import Stack, StackInfo
from services.tools.brokers import LocalKafka
from services.tools.brokers.quirks import end_offsets
from services.runtime.db import inbox_table, make_engine
from services.runtime.settings import Settings
from services.runtime.topology import (
    ANALYTICS_RECORDED, EMAIL_SENT, INVOICES_ISSUED, ORDERS_CANCELLED, ORDERS_COMPENSATED, ORDERS_CREATED,
    STATUS_INPUTS, STOCK_REJECTED, STOCK_RESERVED,
)

SERVICE_NAMES = tuple(s.name for s in registry.SERVICES)

VICTIMS = ("orders-relay", "inventory", "email", "invoice", "analytics")
CONSUMERS = ("inventory", "email", "invoice", "analytics")
# Every consumer compensates a cancelled order: one StepCompensated each.
COMPENSATORS = tuple(s.name for s in registry.SERVICES if any(e.event_type() == "OrderCancelled" for e in s.handlers))
INBOX = inbox_table(MetaData())  # the runtime's inbox table, for reading only

# Short group timeouts: a SIGKILLed consumer never leaves its group, so its partitions wait for
# the session timeout and the rebalance. Batches stay small enough for the poll interval
# (100 invoice PDFs took longer than 6 s on a loaded 2-core machine).
STACK_ENV = {
    "ORDERPIPE_SESSION_TIMEOUT_MS": "3000",
    "ORDERPIPE_MAX_POLL_INTERVAL_MS": "6000",
    "ORDERPIPE_CONSUMER_BATCH_SIZE": "50",
    "ORDERPIPE_RELAY_BATCH_SIZE": "50",
    "ORDERPIPE_LOG_JSON": "false",
}


@dataclass(frozen=True)
class ChaosPlan:
    orders: int = 300
    kills_per_process: int = 3
    rate: float = 15.0
    seed: int = 20261123
    cancel_share: float = 0.2  # of the orders, cancelled within 3 s of being placed

    @classmethod
    def from_env(cls, **defaults) -> ChaosPlan:
        """The plan from the ORDERPIPE_CHAOS_* variables; unset ones from `defaults`, then the
        class defaults (a broker run has a smaller default size than the crash test)."""
        base, env = cls(**defaults), os.environ
        return cls(orders=int(env.get("ORDERPIPE_CHAOS_ORDERS", base.orders)),
                   kills_per_process=int(env.get("ORDERPIPE_CHAOS_KILLS", base.kills_per_process)),
                   rate=float(env.get("ORDERPIPE_CHAOS_RATE", base.rate)),
                   seed=int(env.get("ORDERPIPE_CHAOS_SEED", base.seed)),
                   cancel_share=float(env.get("ORDERPIPE_CHAOS_CANCEL_SHARE", base.cancel_share)))

    @property
    def placing_s(self) -> float:
        return self.orders / self.rate

    @property
    def budget_s(self) -> float:
        """How long the run may take before it counts as stuck (restarts back off up to 5 s)."""
        return 120 + 2 * self.placing_s + 15 * self.kills_per_process

    @property
    def timeout_s(self) -> int:
        return int(self.budget_s + 180)


@dataclass
class Kill:
    victim: str
    at_s: float  # since the first order was placed
    pid: int
    in_flight: int = 0  # e-mail: mails accepted by the sink, row not committed; relay: unpublished rows


@dataclass
class ChaosReport:
    plan: ChaosPlan
    database: str
    placed: dict[str, SampleOrder] = field(default_factory=dict)
    cancelled: set[str] = field(default_factory=set)  # order ids whose cancel was answered 202
    final: dict[str, dict] = field(default_factory=dict)
    kills: list[Kill] = field(default_factory=list)
    skipped_kills: Counter = field(default_factory=Counter)
    orphan_mails: set[str] = field(default_factory=set)  # Message-IDs caught between SMTP accept and commit
    seconds: dict[str, float] = field(default_factory=dict)
    mails_received: int = 0
    resent: Counter = field(default_factory=Counter)  # Message-ID -> extra copies at the sink
    republished: Counter = field(default_factory=Counter)  # topic -> extra copies of an event
    lag: dict[str, int] = field(default_factory=dict)  # group -> messages past its committed offsets, at the end

    def render(self) -> str:
        per_victim = Counter(k.victim for k in self.kills)
        lines = [
            f"crash run on {self.database}: {self._orders_line()}",
            "  SIGKILLs: " + ", ".join(f"{v} {per_victim[v]}" for v in VICTIMS)
            + (f" (not fired, work already done: {dict(self.skipped_kills)})" if self.skipped_kills else ""),
            "  kill times (s) [work in flight]: "
            + ", ".join(f"{k.victim}@{k.at_s:.1f}" + (f"[{k.in_flight}]" if k.in_flight else "") for k in self.kills),
            *self._effect_lines("a killed relay"),
            self._lag_line(),
            "  timing (s): " + ", ".join(f"{k} {v:.1f}" for k, v in self.seconds.items()),
        ]
        return "\n".join(lines)

    def _orders_line(self) -> str:
        return (f"{len(self.placed)} orders ({sum(o.expected == 'FAILED' for o in self.placed.values())} rejected "
                f"for stock, {len(self.cancelled)} cancelled), seed {self.plan.seed}")

    def _lag_line(self) -> str:
        return ("  committed offsets at the end offsets: "
                + ", ".join(f"{group} {lag}" for group, lag in self.lag.items()) + " behind")

    def _effect_lines(self, republisher: str) -> list[str]:
        mail = (f"  e-mail: {self.mails_received} received for {len(self.placed)} orders; "
                f"{sum(self.resent.values())} resends of {len(self.resent)} Message-IDs, each the same Message-ID "
                f"as its original")
        if self.kills:
            mail += (f"; {len(self.orphan_mails)} mails seen accepted-but-uncommitted at a kill, each resent "
                     f"unless its order's cancel was read first")
        return [f"  events published again by {republisher} (absorbed by the inboxes): "
                + (", ".join(f"{t} {n}" for t, n in sorted(self.republished.items())) or "none"), mail]


# -- databases --------------------------------------------------------------------------------


@contextmanager
def service_databases(kind: str, postgres_url: str | None = None) -> Iterator[dict[str, str]]:
    """`ORDERPIPE_<SERVICE>_DATABASE_URL` for each service: empty for SQLite (files in the data
    folder), else fresh PostgreSQL databases, dropped afterwards."""
    if kind == "sqlite":
        yield {}
        return
    admin = make_engine(postgres_url, isolation_level="AUTOCOMMIT")
    names = {s: f"orderpipe_crash_{s}_{uuid.uuid4().hex[:8]}" for s in SERVICE_NAMES}
    try:
        with admin.connect() as conn:
            for name in names.values():
                conn.execute(text(f'CREATE DATABASE "{name}"'))
        prefix = postgres_url.rsplit("/", 1)[0]
        yield {f"ORDERPIPE_{s.upper()}_DATABASE_URL": f"{prefix}/{name}" for s, name in names.items()}
    finally:
        with admin.connect() as conn:
            for name in names.values():
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def settings_with(data_dir: Path, database_env: dict[str, str], bootstrap: str | None = None) -> Settings:
    """The settings the stack's processes get; with `bootstrap`, on that Kafka cluster (the stack
    then starts no broker of its own)."""
    overrides = {k.removeprefix("ORDERPIPE_").lower(): v for k, v in database_env.items()}
    if bootstrap:
        overrides["KAFKA_BOOTSTRAP_SERVERS"] = bootstrap
    return Settings(data_dir=data_dir, **overrides)


def reader_engine(url: str) -> Engine:
    """For watching a database from outside without disturbing it. On SQLite a plain engine:
    the services' engines start every transaction with BEGIN IMMEDIATE (the write lock), which
    an observer polling several times a second must not take."""
    if url.startswith("sqlite"):
        return create_engine(url, connect_args={"timeout": 30})
    return make_engine(url)


class Observer:
    """Reads the services' databases and the SMTP sink's maildir."""

    def __init__(self, settings: Settings, maildir: Path):
        self.engines = {s: reader_engine(settings.database_url(s)) for s in SERVICE_NAMES}
        self.maildir = maildir
        self._mail_ids: dict[str, str] = {}  # .eml file name -> Message-ID (files never change)
        self._parser = BytesParser(policy=default_policy)

    def close(self) -> None:
        for engine in self.engines.values():
            engine.dispose()

    def progress(self) -> dict[str, int]:
        """A counter per victim that grows when it does work."""
        out = {}
        with self.engines["orders"].connect() as conn:
            out["orders-relay"] = conn.execute(
                select(func.count()).where(orders_outbox.c.published_at.is_not(None))).scalar_one()
        for s in CONSUMERS:
            with self.engines[s].connect() as conn:
                out[s] = conn.execute(select(func.count()).select_from(INBOX)).scalar_one()
        return out

    def unpublished_orders(self) -> int:
        with self.engines["orders"].connect() as conn:
            return conn.execute(select(func.count()).where(orders_outbox.c.published_at.is_(None))).scalar_one()

    def sent_message_ids(self) -> set[str]:
        """Confirmations and cancellation mails committed (a cancellation's Message-ID is its document)."""
        with self.engines["email"].connect() as conn:
            return (set(conn.execute(select(sent_emails.c.message_id)).scalars())
                    | set(conn.execute(select(emails_cancelled.c.document)).scalars()))

    def stock_decisions(self) -> int:
        """StockReserved and StockRejected events inventory staged: each is one more input of invoice
        (an order cancelled before inventory read it has none)."""
        with self.engines["inventory"].connect() as conn:
            return conn.execute(text("SELECT count(*) FROM outbox WHERE type IN ('StockReserved', 'StockRejected')")
                                ).scalar_one()

    def mails(self) -> list[str]:
        """Message-ID of every mail the sink stored, in arrival order (resends included)."""
        if not self.maildir.is_dir():
            return []
        names = sorted(p.name for p in self.maildir.glob("*.eml") if not p.name.startswith("."))
        for name in names:
            if name not in self._mail_ids:
                with open(self.maildir / name, "rb") as fh:
                    self._mail_ids[name] = self._parser.parse(fh, headersonly=True)["Message-ID"]
        return [self._mail_ids[n] for n in names]

    def in_flight_mails(self) -> set[str]:
        """Accepted by the SMTP sink, not (yet) committed in the email database."""
        return set(self.mails()) - self.sent_message_ids()


# -- the run ----------------------------------------------------------------------------------


class CrashRun:
    def __init__(self, stack: Stack, info: StackInfo, settings: Settings, plan: ChaosPlan, database: str):
        self.stack = stack
        self.supervisor = stack.supervisor
        # Every SIGKILL here is deliberate: restart as often as it takes (the backoff stays).
        self.supervisor.max_restarts = 10**6
        self.info = info
        self.settings = settings
        self.plan = plan
        self.rng = random.Random(plan.seed)
        self.observer = Observer(settings, info.maildir)
        self.report = self._new_report(plan, database)
        self.samples = sample_orders(plan.orders, seed=plan.seed, cancel_share=plan.cancel_share)
        self._unplaced = iter(self.samples)
        self._cancels: list[tuple[float, str]] = []  # (when, order id): cancels still to send

    def _new_report(self, plan: ChaosPlan, database: str) -> ChaosReport:
        return ChaosReport(plan, database)

    # What the run does while orders flow, and its name in the report's timing line.
    phase = "placing and killing"

    def run(self) -> ChaosReport:
        try:
            with httpx.Client(base_url=self.info.api_url, timeout=10) as client:
                started = time.monotonic()
                self._place_and_disrupt(client)
                self.report.seconds[self.phase] = time.monotonic() - started
                mark = time.monotonic()
                self._wait_for_final(client)
                self.report.seconds["until all final"] = time.monotonic() - mark
        finally:
            self.observer.close()
        return self.report

    def _schedule(self) -> dict[str, list[float]]:
        """Per victim, its kill times (seconds after the first order), uniform over the first three
        quarters of the placing, so that a kill postponed while its victim restarts still lands
        while orders flow."""
        window = (2.0, max(0.75 * self.plan.placing_s, 5.0))
        return {victim: sorted(self.rng.uniform(*window) for _ in range(self.plan.kills_per_process))
                for victim in VICTIMS}

    def _all_sent(self) -> bool:
        return len(self.report.placed) == len(self.samples) and not self._cancels

    def _work_done(self, progress: dict[str, int]) -> dict[str, bool]:
        """Per victim: nothing is left for it to do for the orders placed and cancelled so far."""
        n, cancelled = len(self.report.placed), len(self.report.cancelled)
        all_sent = self._all_sent()
        done = {s: all_sent and progress[s] >= n + cancelled for s in ("inventory", "email", "analytics")}
        # each order, its stock decision (if inventory made one) and its cancellation
        done["invoice"] = (all_sent and done["inventory"]
                           and progress["invoice"] >= n + cancelled + self.observer.stock_decisions())
        done["orders-relay"] = all_sent and self.observer.unpublished_orders() == 0
        return done

    def _place_due(self, client: httpx.Client, elapsed: float) -> None:
        """Place the orders due `elapsed` seconds after the first one (at the plan's rate), and
        send the cancels that are due."""
        while len(self.report.placed) < min(len(self.samples), int(elapsed * self.plan.rate) + 1):
            order = next(self._unplaced)
            r = client.post("/orders", json=order.body)
            r.raise_for_status()
            assert r.status_code == 202, f"POST /orders answered {r.status_code}: {r.text[:200]}"
            order_id = r.json()["order_id"]
            self.report.placed[order_id] = order
            if order.cancel_after_s is not None:
                self._cancels.append((time.monotonic() + order.cancel_after_s, order_id))
        self._cancels.sort()
        while self._cancels and self._cancels[0][0] <= time.monotonic():
            _, order_id = self._cancels.pop(0)
            r = client.post(f"/orders/{order_id}/cancel", json={"reason": "crash test"})
            assert r.status_code == 202, f"POST /orders/{order_id}/cancel answered {r.status_code}: {r.text[:200]}"
            self.report.cancelled.add(order_id)

    def _place_and_disrupt(self, client: httpx.Client) -> None:
        self._place_and_kill(client)

    def _place_and_kill(self, client: httpx.Client) -> None:
        schedule = self._schedule()
        started = time.monotonic()
        deadline = started + self.plan.budget_s
        baseline = self.observer.progress()  # where each victim's current incarnation started
        progress, done, last_look = baseline, self._work_done(baseline), 0.0
        waiting_since: dict[str, float] = {}
        while True:
            now = time.monotonic()
            elapsed = now - started
            self._poll_supervisor()
            self._place_due(client, elapsed)
            if now - last_look >= 0.1:
                progress, last_look = self.observer.progress(), now
                done = self._work_done(progress)
            running = self.supervisor.pids()
            for victim, times in schedule.items():
                if not times or times[0] > elapsed:
                    continue
                if done[victim]:
                    times.pop(0)
                    self.report.skipped_kills[victim] += 1
                    continue
                if victim not in running or progress[victim] <= baseline[victim]:
                    continue  # restarting, or not working yet: the kill waits for it
                # Prefer (for up to 3 s) a moment with work in flight: for e-mail, a mail accepted by
                # the sink whose row is not committed; for the relay, rows not marked published.
                in_flight = 0
                if victim in ("email", "orders-relay"):
                    waiting_since.setdefault(victim, now)
                    in_flight = (len(self.observer.in_flight_mails()) if victim == "email"
                                 else self.observer.unpublished_orders())
                    if not in_flight and now - waiting_since[victim] < 3.0:
                        continue
                    del waiting_since[victim]
                times.pop(0)
                self._kill(victim, elapsed, in_flight)
                baseline[victim] = self.observer.progress()[victim]
            if (not any(schedule.values()) and all(done.values())
                    and set(VICTIMS) <= set(self.supervisor.pids())):
                return
            if now > deadline:
                raise AssertionError(f"crash run stuck after {self.plan.budget_s:.0f} s: progress {progress}, "
                                     f"placed {len(self.report.placed)}, kills left {schedule}, "
                                     f"running {sorted(self.supervisor.pids())}; logs in {self.info.log_dir}")
            time.sleep(0.02)

    def _kill(self, victim: str, elapsed: float, in_flight: int) -> None:
        pid = self.supervisor.pids()[victim]
        self.supervisor.kill(victim)
        self.report.kills.append(Kill(victim, elapsed, pid, in_flight))
        while victim in self.supervisor.pids():  # reaped: it can no longer commit anything
            time.sleep(0.01)
        if victim == "email":
            # What the sink accepted and the database never got: these must be sent again, with
            # the same Message-ID, and only these may be. Read once nothing changes any more: the
            # sink may still be storing a mail whose DATA came just before the kill, and a
            # PostgreSQL backend may finish a COMMIT it received just before its client died.
            seen, stable_since = self.observer.in_flight_mails(), time.monotonic()
            while time.monotonic() - stable_since < 0.5:
                time.sleep(0.1)
                if (now := self.observer.in_flight_mails()) != seen:
                    seen, stable_since = now, time.monotonic()
            self.report.orphan_mails |= seen

    def _poll_supervisor(self) -> None:
        dead = self.supervisor.poll()
        if dead:
            raise AssertionError(f"supervisor gave up on {dead}; logs in {self.info.log_dir}")

    def _wait_for_final(self, client: httpx.Client) -> None:
        """Every order as the order-status view shows it through the orders API, once final (the
        databases are done by now; the view may still be catching up)."""
        deadline = time.monotonic() + max(120.0, 0.1 * len(self.report.placed))
        pending = list(self.report.placed)

        def ask(order_id: str) -> dict:
            return client.get(f"/orders/{order_id}").json()

        with ThreadPoolExecutor(8) as pool:
            while pending and time.monotonic() < deadline:
                self._poll_supervisor()
                for order_id, view in zip(list(pending), pool.map(ask, list(pending))):
                    if settled(view):
                        self.report.final[order_id] = view
                        pending.remove(order_id)
                if pending:
                    time.sleep(0.5)
            for order_id, view in zip(pending, pool.map(ask, pending)):
                self.report.final[order_id] = view


def settled(view: dict) -> bool:
    """Final in the view: FAILED or COMPLETED with no step pending, or CANCELLED with every
    compensation done."""
    steps = view.get("steps", {}).values()
    if view.get("state") == CANCELLED:
        return all(s.get("compensation") in (None, "done") for s in steps)
    return view.get("state") in FINAL_STATES and all(s.get("state") != "pending" for s in steps)


def read_events(bootstrap: str, expected: dict[str, int], idle_s: float = 2.0) -> dict[str, dict[str, Counter]]:
    """Per topic: order id -> Counter of event ids, read until each topic shows `expected`
    distinct event ids and then `idle_s` with nothing new (end offsets are not used: the embedded
    broker's ListOffsets is unreliable)."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"crash-reader-{uuid.uuid4().hex[:8]}",
                         "enable.auto.commit": False, "isolation.level": "read_committed", "log_level": 0})
    out: dict[str, dict[str, Counter]] = {t: defaultdict(Counter) for t in expected}
    distinct: Counter = Counter()
    try:
        metadata = consumer.list_topics(timeout=10)
        consumer.assign([TopicPartition(t, p, OFFSET_BEGINNING)
                         for t in expected for p in metadata.topics[t].partitions])
        last_new, deadline = time.monotonic(), time.monotonic() + 60
        while time.monotonic() < deadline and (
                any(distinct[t] < n for t, n in expected.items()) or time.monotonic() - last_new < idle_s):
            for m in consumer.consume(500, 0.2):
                if m.error():
                    continue
                event_id = dict(m.headers() or ())["event_id"].decode()
                per_order = out[m.topic()][m.key().decode()]
                distinct[m.topic()] += event_id not in per_order
                per_order[event_id] += 1
                last_new = time.monotonic()
    finally:
        consumer.close()
    return out


# -- the checks -------------------------------------------------------------------------------


def check_outcomes(report: ChaosReport, settings: Settings, info: StackInfo) -> None:
    placed = report.placed
    reserved = {oid for oid, order in placed.items() if order.expected == "COMPLETED"}
    cancelled = {oid for oid, order in placed.items() if order.expected == CANCELLED}
    rejected = set(placed) - reserved - cancelled
    assert rejected and reserved, "the sample must have orders of both kinds"
    assert cancelled == report.cancelled, "every cancel was sent and answered 202"
    assert cancelled or not report.plan.cancel_share, "the sample must have cancelled orders"

    # The effects and the events first: when they hold and the view is wrong, the fault is the
    # order-status worker's, and the message below shows what the view says of each step.
    engines = {s: reader_engine(settings.database_url(s)) for s in SERVICE_NAMES}
    try:
        _check_orders(engines["orders"], placed)
        _check_stock(engines["inventory"], settings, placed, reserved)
        _check_invoices(engines["invoice"], info.data_dir, reserved, cancelled)
        _check_emails(engines["email"], engines["orders"], info.maildir, placed, cancelled, report)
        _check_analytics(engines["analytics"], {oid: order for oid, order in placed.items() if oid not in cancelled})
        _check_outboxes_published(engines)
    finally:
        for engine in engines.values():
            engine.dispose()
    _check_events(info.bootstrap_servers, report, reserved, rejected, cancelled)
    _check_no_dead_letters(info.bootstrap_servers)
    _check_no_unplanned_exits(info.log_dir)

    wrong = {oid: (placed[oid].expected, view.get("state")) for oid, view in report.final.items()
             if view.get("state") != placed[oid].expected}
    if wrong:
        steps = {oid: report.final[oid].get("steps") for oid in list(wrong)[:3]}
        raise AssertionError(
            f"{len(wrong)} orders did not reach their final state in the view, although every effect and event "
            f"is there (expected, got): {list(wrong.items())[:5]}; their steps: {steps}; "
            + _view_diagnosis(info, list(wrong)[:3]))
    for oid in rejected:
        assert "SKU-OUT" in report.final[oid]["reason"]
        assert report.final[oid]["steps"]["invoice"]["state"] == "skipped"


def _view_diagnosis(info: StackInfo, order_ids: list[str]) -> str:
    """What tells a stuck order-status worker (behind: lag) from one that skipped an input (not
    behind): its lag now, each order's partition, and its log lines about folds, commits and
    rebalances."""
    from streams.order_status.fold import partition_of

    lag = committed_lag(info.bootstrap_servers).get(STATUS_GROUP, {})
    partitions = {oid: partition_of(oid.encode()) for oid in order_ids}
    log_file = info.log_dir / "order-status.log"
    notable = re.compile(r"fold_|not committing|commit refused|rebalanc|[Rr]evok|[Aa]ssign|Traceback|ERROR")
    lines = [line.rstrip() for line in log_file.read_text(errors="replace").splitlines() if notable.search(line)] \
        if log_file.exists() else ["(no order-status.log)"]
    return (f"order-status lag now: {lag or 'none'}; partitions of those orders: {partitions}; "
            f"order-status log ({len(lines)} notable lines, last 40):\n" + "\n".join(lines[-40:]))


def _check_orders(engine: Engine, placed) -> None:
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(orders_table)).scalar_one() == len(placed)
        assert conn.execute(select(func.count()).where(orders_outbox.c.published_at.is_(None))).scalar_one() == 0


def _check_outboxes_published(engines: dict[str, Engine]) -> None:
    """Every outbox row of every service is on its topic: nothing waits in an outbox."""
    for service, engine in engines.items():
        with engine.connect() as conn:
            waiting = conn.execute(text("SELECT count(*) FROM outbox WHERE published_at IS NULL")).scalar_one()
        assert waiting == 0, f"{service}: {waiting} outbox rows never published"


def _check_no_dead_letters(bootstrap: str) -> None:
    """These runs inject no failure (SKU-OUT is a rejection, not an error): a dead letter means
    a message the pipeline failed on. Retry topics are covered by the zero-lag check."""
    reader = Consumer({"bootstrap.servers": bootstrap, "group.id": f"dlt-reader-{uuid.uuid4().hex[:8]}",
                       "enable.auto.commit": False, "log_level": 0})
    try:
        metadata = reader.list_topics(timeout=15).topics
        parts = [(t, p) for t in sorted(metadata) if t.endswith(".dlt") for p in metadata[t].partitions]
        assert parts, "no dead-letter topics found: the check would prove nothing"
        counts = Counter({t: end - low for (t, _), (low, end) in end_offsets(reader, parts).items() if end > low})
    finally:
        reader.close()
    assert not counts, f"dead letters after the run: {dict(counts)}"


def _quantities(bodies) -> Counter:
    wanted: Counter = Counter()
    for body in bodies:
        for line in body["lines"]:
            wanted[line["sku"]] += line["quantity"]
    return wanted


def _check_stock(engine: Engine, settings: Settings, placed, reserved: set[str]) -> None:
    wanted = _quantities(placed[oid].body for oid in reserved)
    with engine.connect() as conn:
        levels = {row.sku: row for row in conn.execute(select(stock))}
        by_order = {r.order_id for r in conn.execute(select(reservations.c.order_id))}
    assert by_order == reserved, "reservations exist for exactly the reserved orders"
    for sku, row in levels.items():
        initial = settings.of(InventorySettings).initial_stock if sku != "SKU-OUT" else 0
        assert (row.available, row.reserved) == (initial - wanted.get(sku, 0), wanted.get(sku, 0)), \
            f"{sku}: stock must be initial minus the reserved quantities"


def _check_invoices(engine: Engine, data_dir: Path, reserved: set[str], cancelled: set[str]) -> None:
    """One invoice per reserved order (and per cancelled one invoiced before its cancel reached
    invoice), a credit note for exactly each invoiced cancelled order; both numbered without gaps."""
    with engine.connect() as conn:
        rows = conn.execute(select(invoices).order_by(invoices.c.number)).all()
        notes = conn.execute(select(credit_notes).order_by(credit_notes.c.number)).all()
    invoiced = [r.order_id for r in rows]
    assert len(invoiced) == len(set(invoiced)), "one invoice per order at most"
    assert set(invoiced) - cancelled == reserved, "exactly one invoice per reserved order, none for rejected ones"
    assert sorted(n.order_id for n in notes) == sorted(set(invoiced) & cancelled), "one credit note per credited order"
    assert [r.number for r in rows] == list(range(1, len(rows) + 1)), "invoice numbers are gapless"
    assert [n.number for n in notes] == list(range(1, len(notes) + 1)), "credit note numbers are gapless"
    for r in [*rows, *notes]:
        assert (data_dir / "invoices" / r.pdf_path).read_bytes().startswith(b"%PDF")


def _check_emails(email: Engine, orders: Engine, maildir: Path, placed, cancelled: set[str],
                  report: ChaosReport) -> None:
    """One confirmation per order (none for a cancelled one whose cancel e-mail read first), one
    cancellation mail per cancelled order; each Message-ID derived from its event's id."""
    with email.connect() as conn:
        rows = conn.execute(select(sent_emails)).all()
        cancellation_mails = dict(conn.execute(select(emails_cancelled.c.order_id, emails_cancelled.c.document)).all())
    with orders.connect() as conn:  # each order's event ids (published rows are kept 24 h)
        event_ids = {(kind, oid): eid for kind, oid, eid in conn.execute(
            select(orders_outbox.c.type, orders_outbox.c.aggregateid, orders_outbox.c.id))}
    confirmed = {r.order_id for r in rows}
    assert set(placed) - cancelled <= confirmed <= set(placed), "one sent_emails row per order not cancelled"
    for r in rows:
        assert r.message_id == message_id_for(event_ids["OrderCreated", r.order_id]), \
            "Message-ID derived from the event id"
        assert r.recipient == placed[r.order_id].body["customer_email"]
    assert set(cancellation_mails) == cancelled, "one cancellation mail per cancelled order"
    for order_id, message_id in cancellation_mails.items():
        assert message_id == message_id_for(event_ids["OrderCancelled", order_id])
    recipients = {r.message_id: r.recipient for r in rows} | {
        mid: placed[oid].body["customer_email"] for oid, mid in cancellation_mails.items()}
    # A confirmation the sink accepted just before a kill, for an order whose cancel then reached
    # e-mail before the redelivered OrderCreated did: it is never committed nor sent again (the
    # order is cancelled by then), and the customer has it and the cancellation mail after it.
    unconfirmed = {message_id_for(event_ids["OrderCreated", oid]): placed[oid].body["customer_email"]
                   for oid in cancelled - confirmed}
    overtaken = unconfirmed.keys() & report.orphan_mails
    recipients |= {mid: unconfirmed[mid] for mid in overtaken}

    parser = BytesParser(policy=default_policy)
    received: dict[str, list] = defaultdict(list)
    for path in sorted(p for p in maildir.glob("*.eml") if not p.name.startswith(".")):
        msg = parser.parsebytes(path.read_bytes(), headersonly=True)
        received[msg["Message-ID"]].append((msg["To"], msg["Subject"]))
    missing, extra = set(recipients) - set(received), set(received) - set(recipients)
    assert not missing, f"committed mails the sink never received: {sorted(missing)[:3]}"
    assert not extra, (f"mails at the sink that no committed row explains: {sorted(extra)[:3]} "
                       f"(caught in flight at a kill: {sorted(extra & report.orphan_mails)[:3]})")
    for message_id, copies in received.items():
        assert len(set(copies)) == 1, f"copies of {message_id} differ: {copies}"
        assert copies[0][0] == recipients[message_id]
    report.mails_received = sum(len(c) for c in received.values())
    report.resent = Counter({mid: len(c) - 1 for mid, c in received.items() if len(c) > 1})
    missed = {mid for mid in report.orphan_mails - overtaken if len(received[mid]) < 2}
    assert not missed, f"mails accepted before a crash but not committed were not resent: {sorted(missed)[:3]}"
    # ... and nothing else was: a resend is only for a mail a kill caught between send and commit,
    # once per e-mail kill at most
    unexplained = set(report.resent) - report.orphan_mails
    assert not unexplained, f"mails sent twice that no kill caught in flight: {sorted(unexplained)[:3]}"
    email_kills = sum(k.victim == "email" for k in report.kills)
    assert all(n <= email_kills for n in report.resent.values()), f"a mail resent too often: {report.resent}"


def _check_analytics(engine: Engine, placed) -> None:
    bodies = [order.body for order in placed.values()]
    with engine.connect() as conn:
        orders, units, revenue = conn.execute(
            select(func.sum(per_minute.c.orders), func.sum(per_minute.c.units), func.sum(per_minute.c.revenue))).one()
        sku_units = dict(conn.execute(select(per_sku.c.sku, per_sku.c.units).where(per_sku.c.units != 0)).all())
    assert orders == len(placed), "analytics counts every order not cancelled once"
    assert units == sum(line["quantity"] for b in bodies for line in b["lines"])
    lines = [line for b in bodies for line in b["lines"]]
    assert Decimal(revenue) == sum(Decimal(line["unit_price"]) * line["quantity"] for line in lines)
    assert sku_units == dict(_quantities(bodies))


def _check_events(bootstrap: str, report: ChaosReport, reserved: set[str], rejected: set[str],
                  cancelled: set[str]) -> None:
    """Each step emitted its event once per order (a cancelled order's step: once if it ran before
    the cancel reached it, else never), and each service one StepCompensated per cancelled order.
    A step done twice would emit a second event with a new event id; a relay killed between the
    broker's ack and its commit republishes the same event id, which is allowed (the inboxes
    absorb it) and counted."""
    everyone = reserved | rejected | cancelled
    expected = {ORDERS_CREATED: everyone, STOCK_RESERVED: reserved, STOCK_REJECTED: rejected,
                EMAIL_SENT: everyone - cancelled, INVOICES_ISSUED: reserved, ANALYTICS_RECORDED: everyone - cancelled,
                ORDERS_CANCELLED: cancelled, ORDERS_COMPENSATED: cancelled}
    per_order = {ORDERS_COMPENSATED: len(COMPENSATORS)}  # one per service; elsewhere one per order
    events = read_events(bootstrap, {topic: len(orders) * per_order.get(topic, 1) for topic, orders in expected.items()})
    for topic, orders in expected.items():
        got = set(events[topic])
        assert orders <= got <= orders | cancelled, f"{topic}: an event for exactly the expected orders"
        if topic in (ORDERS_CANCELLED, ORDERS_COMPENSATED):
            assert got == orders, f"{topic}: an event for exactly the cancelled orders"
        wrong = {oid: dict(ids) for oid, ids in events[topic].items() if len(ids) != per_order.get(topic, 1)}
        assert not wrong, f"{topic}: a step emitted more or fewer events for an order: {list(wrong.items())[:3]}"
        report.republished[topic] = sum(n - 1 for ids in events[topic].values() for n in ids.values())


def _check_no_unplanned_exits(log_dir: Path) -> None:
    """Every exit the supervisor logged was one of our SIGKILLs: no process crashed by itself."""
    exits = re.compile(r"--- supervisor \S+: pid \d+ exited with (.+)")
    unplanned = [f"{log.stem}: {m.group(1)}" for log in sorted(log_dir.glob("*.log"))
                 for m in exits.finditer(log.read_text(errors="replace")) if m.group(1) != "signal SIGKILL"]
    assert not unplanned, f"processes exited on their own: {unplanned}"


# -- broker failures --------------------------------------------------------------------------
#
# The same pipeline and the same checks, with the brokers failing instead of the workers: a
# node of a three-node Apache Kafka SIGKILLed and restarted, or frozen (SIGSTOP) past the
# broker session timeout and thawed (`tests/e2e/test_kafka_broker_failures.py`, `make
# chaos-kafka`), or every node down for a minute (`tests/e2e/test_kafka_outage.py`). No process
# of the pipeline is killed, so none may exit: each must ride out the failure by itself.

# Production's client settings (Kafka's defaults); plain-text logs for a human reading them.
BROKER_STACK_ENV = {"ORDERPIPE_LOG_JSON": "false"}
STATUS_GROUP = "order-status"  # the order-status worker's app id = its consumer group


@dataclass
class BrokerFault:
    kind: str  # "SIGKILL" (then started again), "SIGSTOP" (then SIGCONT), "outage" (every node SIGKILLed)
    nodes: tuple[int, ...]
    why: str  # what the node was when it was chosen
    at_s: float  # since the first order was placed
    down_s: float = 0.0  # until it was started again / thawed
    back_s: float = 0.0  # until it answered and was registered again
    healed_s: float = 0.0  # until the cluster was whole again (see BrokerRun.healed)

    def render(self) -> str:
        nodes = "node " + ",".join(map(str, self.nodes))
        return (f"{self.kind} {nodes} ({self.why}) at {self.at_s:.1f} s: down {self.down_s:.1f} s, "
                f"registered again after {self.back_s:.1f} s, whole again after {self.healed_s:.1f} s")


@dataclass
class BrokerRunReport(ChaosReport):
    title: str = "broker run"
    nodes: int = 1
    faults: list[BrokerFault] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what the scenario saw while the brokers were down

    def render(self) -> str:
        lines = [f"{self.title} on {self.database}, {self.nodes}-node Apache Kafka: {self._orders_line()}",
                 *(f"  {fault.render()}" for fault in self.faults),
                 *(f"  {note}" for note in self.notes),
                 *self._effect_lines("a relay whose acks did not come"),
                 self._lag_line(),
                 "  timing (s): " + ", ".join(f"{k} {v:.1f}" for k, v in self.seconds.items())]
        return "\n".join(lines)


class BrokerRun(CrashRun):
    """Orders are placed from a thread of their own while the main thread breaks the brokers:
    starting a Kafka node blocks until it is registered, and must happen on the main thread (a
    node's parent-death signal is tied to the thread that spawned it). Subclasses implement
    `disrupt`; when it returns and every order is placed, the run waits until the databases show
    every order through every step, then for the order-status view, as the crash run does."""

    phase = "placing with broker faults"
    title = "broker run"

    def __init__(self, stack: Stack, info: StackInfo, settings: Settings, plan: ChaosPlan, database: str,
                 kafka: LocalKafka):
        super().__init__(stack, info, settings, plan, database)
        self.supervisor.max_restarts = 0  # nothing is killed here: an exit is a failure (see _poll_supervisor)
        self.kafka = kafka
        self.report.title, self.report.nodes = self.title, kafka.size
        self.pids = self.supervisor.pids()
        self.admin = AdminClient({"bootstrap.servers": kafka.bootstrap_servers, "log_level": 0})
        self._started = time.monotonic()
        self._stop_placing = threading.Event()
        self._placer_error: BaseException | None = None

    def _new_report(self, plan: ChaosPlan, database: str) -> ChaosReport:
        return BrokerRunReport(plan, database)

    @property
    def budget_s(self) -> float:
        """How long placing, faults and catching up may take before the run counts as stuck."""
        return 180 + 2 * self.plan.placing_s

    def disrupt(self) -> None:
        raise NotImplementedError

    def elapsed(self) -> float:
        return time.monotonic() - self._started

    def _place_and_disrupt(self, client: httpx.Client) -> None:
        self._started = time.monotonic()
        placer = threading.Thread(target=self._place_all, name="placer", daemon=True)
        placer.start()
        try:
            self.disrupt()
            self.wait_until("every order placed", lambda: not placer.is_alive(), self.plan.placing_s + 60)
        finally:
            self._stop_placing.set()
            placer.join()
        self._poll_supervisor()
        self.wait_until("the databases show every order through every step",
                        lambda: all(self._work_done(self.observer.progress()).values()),
                        max(0.0, self._started + self.budget_s - time.monotonic()))

    def _place_all(self) -> None:
        try:
            with httpx.Client(base_url=self.info.api_url, timeout=10) as client:
                while not self._all_sent() and not self._stop_placing.is_set():
                    self._place_due(client, self.elapsed())
                    time.sleep(0.02)
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            self._placer_error = exc

    def _poll_supervisor(self) -> None:
        """No process of the pipeline may exit (nothing kills them here), and the orders API must
        keep accepting orders."""
        self.supervisor.poll()
        if self.supervisor.pids() != self.pids:
            gone = sorted(n for n, pid in self.pids.items() if self.supervisor.pids().get(n) != pid)
            raise AssertionError(f"processes exited during the broker faults: {gone}; logs in {self.info.log_dir}")
        if self._placer_error is not None:
            raise AssertionError(f"placing an order failed: {self._placer_error!r}") from self._placer_error

    def idle(self, seconds: float) -> None:
        """Wait, watching the processes and the placer."""
        until = time.monotonic() + seconds
        while (remaining := until - time.monotonic()) > 0:
            self._poll_supervisor()
            time.sleep(min(0.1, remaining))

    def wait_until(self, what: str, condition, timeout: float, every: float = 0.2) -> float:
        """Poll `condition` until it holds; its seconds. Raises after `timeout`."""
        start = time.monotonic()
        while True:
            self._poll_supervisor()
            if condition():
                return time.monotonic() - start
            if time.monotonic() - start > timeout:
                raise AssertionError(f"{what}: not within {timeout:.0f} s (at {self.elapsed():.0f} s of the run); "
                                     f"logs in {self.info.log_dir}, Kafka's under {self.kafka.data_dir}")
            time.sleep(every)

    def pipeline_working(self) -> bool:
        """The relay and every consumer have done work."""
        return all(n > 0 for n in self.observer.progress().values())

    def _registered(self) -> bool:
        try:
            return len(self.admin.list_topics(timeout=5).brokers) == self.kafka.size
        except KafkaException:
            return False

    def healed(self) -> bool:
        """Every node registered, and every partition of every topic led with all its replicas in sync."""
        try:
            metadata = self.admin.list_topics(timeout=5)
        except KafkaException:
            return False
        if len(metadata.brokers) < self.kafka.size:
            return False
        return all(t.error is None and p.leader >= 0 and p.error is None and len(p.isrs) == len(p.replicas)
                   for t in metadata.topics.values() for p in t.partitions.values())

    def input_leader(self) -> tuple[int, str]:
        """The node leading the most partitions of orders.created (the pipeline's input)."""
        partitions = self.admin.list_topics(ORDERS_CREATED, timeout=10).topics[ORDERS_CREATED].partitions
        leaders = Counter(partitions[p].leader for p in sorted(partitions) if partitions[p].leader >= 0)
        node, led = leaders.most_common(1)[0]
        return node, f"leader of {led}/{len(partitions)} {ORDERS_CREATED} partitions"

    def _leads(self, node: int) -> int | None:
        """How many orders.created partitions the cluster's metadata says `node` leads (None: no answer).

        Asked of the other nodes only, through a new client: `node` may be frozen, and a client
        that picks its open, silent connection for the request waits out its socket timeout."""
        others = ",".join(n.address for n in self.kafka.nodes if n.node_id != node and n.running)
        admin = AdminClient({"bootstrap.servers": others, "log_level": 0})
        try:
            partitions = admin.list_topics(ORDERS_CREATED, timeout=5).topics[ORDERS_CREATED].partitions
        except KafkaException:
            return None
        return sum(p.leader == node for p in partitions.values())

    def coordinator(self, group: str) -> tuple[int, str]:
        """The node coordinating a consumer group (its members' heartbeats and commits)."""
        found = self.admin.describe_consumer_groups([group], request_timeout=10)[group].result(timeout=15)
        return found.coordinator.id, f"coordinator of group {group}"


class BrokerChaosRun(BrokerRun):
    """`plan.kills_per_process` SIGKILLs of one node at a time, each restarted after a few
    seconds, and one freeze (SIGSTOP) halfway through, held until the cluster has fenced the node
    (its broker session timed out) and moved its leaderships, then a little longer. Victims
    alternate: the leader of most orders.created partitions (first), then a consumer group's
    coordinator (order-status, inventory, email, ...). The next fault waits until the cluster is
    whole again (every replica back in sync): a second node down before that would leave
    partitions below min.insync.replicas, which stalls writes rather than testing anything new."""

    phase = "placing with broker kills"
    title = "broker chaos run"
    FROZEN_AFTER_FENCED_S = 2.0

    @property
    def budget_s(self) -> float:
        return super().budget_s + 60 * (self.plan.kills_per_process + 1)

    def disrupt(self) -> None:
        self.wait_until("the pipeline working before the first fault", self.pipeline_working, 120)
        groups = cycle((STATUS_GROUP, *CONSUMERS))
        faults = ["input leader" if i % 2 == 0 else next(groups) for i in range(self.plan.kills_per_process)]
        faults.insert(len(faults) // 2, "freeze")
        for fault in faults:
            self.idle(self.rng.uniform(2.0, 4.0))
            if fault == "freeze":
                self._freeze(*self.input_leader())
            else:
                self._kill(*(self.input_leader() if fault == "input leader" else self.coordinator(fault)))

    def _kill(self, node: int, why: str) -> None:
        fault = BrokerFault("SIGKILL", (node,), why, self.elapsed())
        start = time.monotonic()
        self.kafka.kill(node)
        # Down for a few seconds: sometimes back before the cluster fenced it (6 s), sometimes after.
        self.idle(self.rng.uniform(3.0, 8.0))
        fault.down_s = time.monotonic() - start
        self.kafka.restart(node)
        fault.back_s = time.monotonic() - start
        self.wait_until(f"the cluster whole again after SIGKILL of node {node}", self.healed, 120)
        fault.healed_s = time.monotonic() - start
        self.report.faults.append(fault)

    def _freeze(self, node: int, why: str) -> None:
        fault = BrokerFault("SIGSTOP", (node,), why, self.elapsed())
        start = time.monotonic()
        self.kafka.freeze(node)
        try:
            # Its sockets stay open and nothing answers; after broker.session.timeout.ms (6 s)
            # without a heartbeat the controller fences it and elects other leaders.
            fenced = self.wait_until(f"frozen node {node} fenced (no orders.created partition led by it)",
                                     lambda: self._leads(node) == 0, 60)
            fault.why += f"; fenced, its leaderships moved after {fenced:.1f} s"
            self.idle(self.FROZEN_AFTER_FENCED_S)
        finally:
            self.kafka.thaw(node)
        fault.down_s = time.monotonic() - start
        self.wait_until(f"node {node} registered again after the thaw", self._registered, 60)
        fault.back_s = time.monotonic() - start
        self.wait_until(f"the cluster whole again after node {node} was thawed", self.healed, 120)
        fault.healed_s = time.monotonic() - start
        self.report.faults.append(fault)


def group_topics() -> dict[str, list[str]]:
    """What each consumer group reads: the services' inputs and their retry topics (see
    ServiceConsumer.topics), and the order-status worker's inputs (streams/order_status/app.py)."""
    from services.runtime.topology import FAILURES, sla_topic_name

    out = {g.name: [t for source in g.inputs for t in (source, *g.retry_topics(source))] for g in registry.GROUPS}
    out[STATUS_GROUP] = [*STATUS_INPUTS, FAILURES, sla_topic_name(STATUS_GROUP)]
    return out


def committed_lag(bootstrap: str) -> dict[str, dict[tuple[str, int], int]]:
    """Per consumer group: each partition whose committed offset is short of its end offset, and
    by how much (nothing committed counts from the log start). Read with OffsetFetch: no group is
    joined, nothing is disturbed."""
    config = {"bootstrap.servers": bootstrap, "enable.auto.commit": False, "log_level": 0}
    reader = Consumer({**config, "group.id": f"lag-reader-{uuid.uuid4().hex[:8]}"})
    try:
        metadata = reader.list_topics(timeout=10).topics
        wanted = {g: [(t, p) for t in topics if t in metadata for p in sorted(metadata[t].partitions)]
                  for g, topics in group_topics().items()}
        ends = end_offsets(reader, [tp for parts in wanted.values() for tp in parts])
        out: dict[str, dict[tuple[str, int], int]] = {}
        for group, parts in wanted.items():
            member = Consumer({**config, "group.id": group})
            try:
                committed = member.committed([TopicPartition(t, p) for t, p in parts], timeout=10)
            finally:
                member.close()
            out[group] = {}
            for tp in committed:
                low, end = ends[(tp.topic, tp.partition)]
                behind = end - (tp.offset if tp.offset >= 0 else low)
                if behind > 0:
                    out[group][(tp.topic, tp.partition)] = behind
        return out
    finally:
        reader.close()


def wait_for_zero_lag(bootstrap: str, report: ChaosReport, timeout: float = 60.0) -> None:
    """Every group's committed offsets reach the end offsets of everything it reads (the services
    commit every second, the Faust worker every 2.8 s): no consumer is stuck or behind."""
    deadline = time.monotonic() + timeout
    while True:
        lag = committed_lag(bootstrap)
        report.lag = {group: sum(parts.values()) for group, parts in lag.items()}
        if not any(report.lag.values()):
            return
        if time.monotonic() > deadline:
            behind = {g: dict(list(parts.items())[:4]) for g, parts in lag.items() if parts}
            raise AssertionError(f"consumer groups still behind after {timeout:.0f} s: {behind}")
        time.sleep(1.0)


def check_services_ready(info: StackInfo, timeout: float = 60.0) -> None:
    """Every relay and consumer process live and ready again (/healthz, /readyz), and the
    order-status worker ready (/ready)."""
    urls = [f"{base}{path}" for base in info.health.values() for path in ("/healthz", "/readyz")]
    urls.append(f"{info.status_url}/ready")
    deadline = time.monotonic() + timeout
    pending = urls
    while pending:
        pending = [u for u in pending if _status_code(u) != 200]
        if pending and time.monotonic() > deadline:
            raise AssertionError(f"not healthy and ready {timeout:.0f} s after the brokers came back: {pending}")
        if pending:
            time.sleep(0.5)


def _status_code(url: str) -> int:
    try:
        return httpx.get(url, timeout=5).status_code
    except httpx.HTTPError:
        return 0
