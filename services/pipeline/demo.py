"""`orderpipe demo`: place sample orders through the HTTP API and check every outcome."""

from __future__ import annotations

import random
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass

import httpx
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from services import registry
from services.tools.brokers.quirks import end_offsets
from services.inventory.catalog import CATALOG
from services.runtime.settings import Settings

FINAL_STATES = {"COMPLETED", "FAILED"}
CANCELLED = "CANCELLED"
# Cancelled sample orders are cancelled this long after they were placed, at random: before,
# while and after the services handle them.
CANCEL_WITHIN_S = 3.0
# With --fail-rate, one order in REFUSED_EVERY has an address the SMTP server refuses for good
# (the sink refuses the reserved .invalid domain): its e-mail is dead-lettered, so the order is
# expected to end STALLED, never COMPLETED. Never the same order as a sold-out one (i % 20 == 19).
REFUSED_EVERY = 25


def demo_env(fail_rate: float) -> dict[str, str]:
    """Environment for the stack's processes: the e-mail fault injection."""
    return {"ORDERPIPE_EMAIL_FAIL_RATE": str(fail_rate)} if fail_rate else {}


@dataclass(frozen=True)
class SampleOrder:
    body: dict
    expected: str  # COMPLETED; FAILED when it asks for a SKU that is never stocked; STALLED when
    #                its e-mail address is refused (dead-lettered); CANCELLED when it is cancelled
    cancel_after_s: float | None = None  # cancelled this long after it was placed


def sample_orders(n: int, seed: int = 7, reject_every: int = 20, refuse_every: int = 0,
                  cancel_share: float = 0.0) -> list[SampleOrder]:
    """Deterministic sample orders; every `reject_every`-th one includes the sold-out SKU, and
    with `refuse_every`, every such one has an address the SMTP server refuses. A `cancel_share`
    of the others (rejected ones too) is cancelled within CANCEL_WITHIN_S of being placed."""
    rng = random.Random(seed)
    cancel_rng = random.Random(seed + 1)  # its own: the orders stay the same whatever the share
    stocked = [item for item in CATALOG if item.stocked]
    sold_out = [item for item in CATALOG if not item.stocked]
    orders = []
    for i in range(n):
        items = rng.sample(stocked, rng.randint(1, 3))
        rejected = reject_every > 0 and sold_out and i % reject_every == reject_every - 1
        refused = refuse_every > 0 and not rejected and i % refuse_every == refuse_every // 2
        if rejected:
            items.append(sold_out[0])
        body = {
            "customer_id": f"customer-{rng.randint(1, 500):04d}",
            "customer_email": f"customer{i}@example.invalid" if refused else f"customer{i}@example.com",
            "currency": "EUR",
            "lines": [{"sku": it.sku, "quantity": rng.randint(1, 4), "unit_price": str(it.unit_price)} for it in items],
        }
        cancel_after = (round(cancel_rng.uniform(0, CANCEL_WITHIN_S), 2)
                        if not refused and cancel_rng.random() < cancel_share else None)
        expected = CANCELLED if cancel_after is not None else "FAILED" if rejected else "STALLED" if refused \
            else "COMPLETED"
        orders.append(SampleOrder(body, expected, cancel_after))
    return orders


class FailureTopics:
    """What the retry chains did, read from the topics: which orders each group dead-lettered
    (read as the dead-letter topics fill), and how many retry and dead-letter copies exist. The
    demo checks the view's final states against this record of what happened."""

    def __init__(self, bootstrap_servers: str, client_config: dict[str, str]):
        self.config = {"bootstrap.servers": bootstrap_servers, **client_config}
        self.specs = [t for t in registry.all_topics() if ".retry." in t.name or t.name.endswith(".dlt")]
        self.dead: dict[str, set[str]] = defaultdict(set)  # group -> dead-lettered order ids
        self.reader = Consumer({**self.config, "group.id": f"demo-{uuid.uuid4().hex[:8]}", "log_level": 0,
                                "enable.auto.commit": False, "isolation.level": "read_committed"})
        self.reader.assign([TopicPartition(t.name, p, OFFSET_BEGINNING) for t in self.specs
                            if t.name.endswith(".dlt") for p in range(t.partitions)])
        self.baseline = self._counts()  # a real cluster may hold copies from earlier runs

    def poll(self) -> None:
        for msg in self.reader.consume(500, 0.1):
            if not msg.error() and msg.key():
                group = dict(msg.headers() or []).get("x-group", b"?").decode()
                self.dead[group].add(msg.key().decode())

    def copies(self) -> dict[str, tuple[int, int]]:
        """Per group: (retry copies, dead letters) written since this reader started."""
        now = self._counts()
        return {g: (retried - self.baseline[g][0], dead - self.baseline[g][1]) for g, (retried, dead) in now.items()}

    def _counts(self) -> dict[str, tuple[int, int]]:
        sizes = self._sizes()

        def messages(topics: list[str]) -> int:
            return sum(count for (topic, _), count in sizes.items() if topic in topics)

        return {g.name: (messages([t for s in g.inputs for t in g.retry_topics(s)]),
                         messages([g.dlt_topic(s) for s in g.inputs])) for g in registry.GROUPS}

    def _sizes(self) -> dict[tuple[str, int], int]:
        """Messages in each partition of the retry and dead-letter topics, from end offsets that are
        right on both brokers (a counter of its own: the reader keeps its assignment)."""
        counter = Consumer({**self.config, "group.id": f"demo-count-{uuid.uuid4().hex[:8]}", "log_level": 0,
                            "enable.auto.commit": False})
        try:
            ends = end_offsets(counter, [(t.name, p) for t in self.specs for p in range(t.partitions)])
        finally:
            counter.close()
        return {part: end - low for part, (low, end) in ends.items()}

    def close(self) -> None:
        self.reader.close()


def place_all(client: httpx.Client, orders: list[SampleOrder], progress: Progress) -> dict[str, SampleOrder]:
    """Place the orders, and cancel those to be cancelled when their moment comes (between
    placements, then waiting for the last ones)."""
    task = progress.add_task("placing orders", total=len(orders))
    to_cancel = sum(1 for order in orders if order.cancel_after_s is not None)
    cancel_task = progress.add_task("cancelling orders", total=to_cancel) if to_cancel else None
    placed: dict[str, SampleOrder] = {}
    due: list[tuple[float, str]] = []  # (when, order id)

    def cancel_due(until: float) -> None:
        due.sort()
        while due and due[0][0] <= until:
            when, order_id = due.pop(0)
            time.sleep(max(0.0, when - time.monotonic()))
            client.post(f"/orders/{order_id}/cancel", json={"reason": "demo: the customer changed their mind"},
                        headers={"Idempotency-Key": f"demo-cancel-{order_id}"}).raise_for_status()
            progress.advance(cancel_task)

    for order in orders:
        r = client.post("/orders", json=order.body)
        r.raise_for_status()
        order_id = r.json()["order_id"]
        placed[order_id] = order
        if order.cancel_after_s is not None:
            due.append((time.monotonic() + order.cancel_after_s, order_id))
        progress.advance(task)
        cancel_due(time.monotonic())
    cancel_due(float("inf"))
    return placed


def wait_for_final(client: httpx.Client, placed: dict[str, SampleOrder], timeout: float, progress: Progress,
                   failures: FailureTopics | None = None) -> dict[str, dict]:
    task = progress.add_task("waiting for outcomes", total=len(placed))
    final: dict[str, dict] = {}
    deadline = time.monotonic() + timeout
    while len(final) < len(placed) and time.monotonic() < deadline:
        if failures:
            failures.poll()
        for order_id in [o for o in placed if o not in final]:
            view = client.get(f"/orders/{order_id}").json()
            if _final_state(order_id, view, failures):
                final[order_id] = view
                progress.advance(task)
        if len(final) < len(placed):
            time.sleep(0.5)
    for order_id in placed:  # whatever did not finish: keep its last view for the summary
        if order_id not in final:
            final[order_id] = client.get(f"/orders/{order_id}").json()
    return final


def _step_states(order_id: str, view: dict, failures: FailureTopics | None) -> dict[str, str]:
    """The view's step states, with "dead_lettered" for a step the view still shows pending but
    whose group dead-lettered the order (the view does not read dead-letter topics yet)."""
    steps = {name: s.get("state", "?") for name, s in view.get("steps", {}).items()}
    if failures is None:
        return steps
    return {name: "dead_lettered" if state == "pending" and order_id in failures.dead[name] else state
            for name, state in steps.items()}


def _final_state(order_id: str, view: dict, failures: FailureTopics | None) -> str | None:
    """The order's final state, or None while it is still moving. FAILED is final at once but an
    order is only settled when no step is pending (a FAILED order still sends its e-mail);
    STALLED when the rest is settled and a step was dead-lettered; CANCELLED once every step's
    compensation is done."""
    if view.get("state") == CANCELLED:
        compensations = [s.get("compensation") for s in view.get("steps", {}).values() if s.get("compensation")]
        if "dead_lettered" in compensations:
            return f"{CANCELLED} (a compensation dead-lettered)"
        return CANCELLED if all(c == "done" for c in compensations) else None
    steps = _step_states(order_id, view, failures)
    if any(state in ("pending", "retrying") for state in steps.values()):
        return None
    if view.get("state") in FINAL_STATES | {"STALLED"}:
        return view["state"]
    return "STALLED" if "dead_lettered" in steps.values() else None


def run_demo(info, *, orders: int, timeout: float, seed: int, console: Console, fail_rate: float = 0.0,
             cancel_share: float = 0.0) -> bool:
    samples = sample_orders(orders, seed, refuse_every=REFUSED_EVERY if fail_rate else 0, cancel_share=cancel_share)
    started = time.monotonic()
    failures = FailureTopics(info.bootstrap_servers, Settings().extra_client_config)
    try:
        with httpx.Client(base_url=info.api_url, timeout=10) as client, Progress(console=console) as progress:
            placed = place_all(client, samples, progress)
            final = wait_for_final(client, placed, timeout, progress, failures)
        elapsed = time.monotonic() - started
        failures.poll()
        copies = failures.copies()
    finally:
        failures.close()
    states = {order_id: _final_state(order_id, view, failures) or f"{view.get('state')} (not settled)"
              for order_id, view in final.items()}
    step_states = {order_id: _step_states(order_id, view, failures) for order_id, view in final.items()}

    steps = Table(title="final state per service")
    steps.add_column("service")
    state_names = sorted({s for v in step_states.values() for s in v.values()})
    for name in state_names:
        steps.add_column(name, justify="right")
    for step in (g.name for g in registry.GROUPS):
        counts = Counter(v.get(step, "missing") for v in step_states.values())
        steps.add_row(step, *(str(counts.get(n, 0)) for n in state_names))
    console.print(steps)

    chains = Table(title="retries and dead letters (copies in each group's topics)")
    for column in ("group", "retried", "dead-lettered"):
        chains.add_column(column, justify="left" if column == "group" else "right")
    for group_name, (retried, dead) in copies.items():
        chains.add_row(group_name, str(retried), str(dead))
    console.print(chains)

    outcome = Table(title=f"{len(placed)} orders in {elapsed:.1f} s")
    outcome.add_column("order state")
    outcome.add_column("expected", justify="right")
    outcome.add_column("got", justify="right")
    expected = Counter(o.expected for o in placed.values())
    got = Counter(states.values())
    for state in sorted(set(expected) | set(got), key=str):
        outcome.add_row(str(state), str(expected.get(state, 0)), str(got.get(state, 0)))
    console.print(outcome)

    wrong = {oid: state for oid, state in states.items() if state != placed[oid].expected}
    if wrong:
        for oid, state in list(wrong.items())[:10]:
            console.print(f"[red]order {oid}: expected {placed[oid].expected}, got {state}[/]")
        console.print(f"[bold red]{len(wrong)} of {len(placed)} orders did not reach their expected final state[/]")
        return False
    stalled = f", {expected['STALLED']} stalled (e-mail address refused, dead-lettered)" if expected["STALLED"] else ""
    cancelled = ""
    if expected[CANCELLED]:
        views = [final[oid] for oid, order in placed.items() if order.expected == CANCELLED]
        credited = sum(1 for v in views if v["steps"].get("invoice", {}).get("compensation_detail", "")
                       .startswith("credit note"))
        released = sum(1 for v in views if v["steps"].get("inventory", {}).get("compensation_detail", "")
                       .startswith("released"))
        cancelled = (f", {expected[CANCELLED]} cancelled: stock released for {released}, "
                     f"{credited} credit note{'s' if credited != 1 else ''}")
    console.print(f"[bold green]all {len(placed)} orders reached their expected final state[/] "
                  f"({expected['COMPLETED']} completed, {expected['FAILED']} rejected for stock{stalled}{cancelled})")
    return True
