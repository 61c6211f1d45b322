"""The order-status worker's `/ready` answers 200 only once its RocksDB store is restored.

The promise (README, "The order-status view", Recovery; "Health and metrics": `/ready` is 503
while rebalancing or restoring its table): a restarted worker answers `/ready` only once the
table is restored, and then answers as before. Until now only "weak"ly tested:
`test_killed_worker_restarts_and_answers_as_before` waits for answers after `/ready`, so an
early 200 followed by a wrong answer would go unnoticed.

How: a RocksDB worker folds a few thousand status changes (1,200 orders, 6,900 input events, each
a changelog record), every order is awaited final, its status recorded, and the worker is stopped
(SIGTERM). Then, one after the other and each alone in the group:
- a worker on the same data folder (RocksDB files, plus the changelog's tail), and
- a worker on a fresh, empty data folder, which must restore every order from the changelog.
From the moment each process is spawned, two threads poll it as fast as it answers: one asks
`/ready`, the other cycles `GET /status/{id}/` through a sample of the orders. Every observation
records when its request was sent and when its answer came (one monotonic clock), so the check is
causal, not a time bound: a lookup sent after a `/ready` 200 had been received (with no later
`/ready` answer saying otherwise received before the lookup was sent) must answer 200 with the
order's final status, exactly as recorded; never 404, never another state. Besides, a lookup is
guarded by the same readiness check as `/ready` (it answers 503 while not ready), so no lookup may
answer a wrong status at any time. After ready, every sampled order must have answered its final
status, and in the end the whole table must equal what the first worker had.

Runs on the run's broker (a fresh one per test, as in test_order_status_stream.py).
"""

from __future__ import annotations

import bisect
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from streams.order_status.process import WorkerProcess
from test_order_status_stream import (  # noqa: F401 - broker and start_worker are fixtures
    broker,
    check_final,
    listing,
    make_orders,
    messages_of,
    produce,
    start_worker,
    wait_final,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

PER_KIND = 300  # 1,200 orders, 6,900 input events: a changelog record each
SAMPLE = 40     # orders looked up in the tight loop, ten of each kind
ROUNDS_AFTER_READY = 3  # full rounds of the sample answered after ready before the watch ends
WAIT_S = 600.0  # a fail-safe against hanging forever, never a bound on how fast anything must be


@dataclass(frozen=True)
class Seen:
    """One answer: when its request was sent and its answer received (time.monotonic)."""

    sent: float
    received: float
    what: str            # "ready" or an order id
    status: int | None   # None: no HTTP answer (connection refused while the process starts)
    body: dict | str | None


class Watch:
    """Polls a worker from its spawn: /ready in one thread, the sample's lookups in another."""

    def __init__(self, worker: WorkerProcess, sample: list[str], final: dict[str, dict]):
        self.worker, self.sample, self.final = worker, sample, final
        self.ready: list[Seen] = []
        self.lookups: list[Seen] = []
        self.stop = threading.Event()
        self.errors: list[BaseException] = []
        self.threads = [threading.Thread(target=self._guard, args=(self._poll_ready,), daemon=True),
                        threading.Thread(target=self._guard, args=(self._poll_lookups,), daemon=True)]

    def __enter__(self) -> Watch:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(60)

    def _guard(self, poll) -> None:
        try:
            with httpx.Client(base_url=self.worker.url, timeout=30.0) as http:
                poll(http)
        except BaseException as exc:  # noqa: BLE001 - surfaced by the test
            self.errors.append(exc)

    @staticmethod
    def _get(http: httpx.Client, path: str, what: str) -> Seen:
        sent = time.monotonic()
        try:
            r = http.get(path)
        except httpx.TransportError:
            return Seen(sent, time.monotonic(), what, None, None)
        received = time.monotonic()
        try:
            body = r.json()
        except ValueError:
            body = r.text[:300]
        return Seen(sent, received, what, r.status_code, body)

    def _poll_ready(self, http: httpx.Client) -> None:
        while not self.stop.is_set():
            self.ready.append(self._get(http, "/ready", "ready"))

    def _poll_lookups(self, http: httpx.Client) -> None:
        while not self.stop.is_set():
            for order_id in self.sample:
                self.lookups.append(self._get(http, f"/status/{order_id}/", order_id))

    # -- what was seen --

    def correct(self, seen: Seen) -> bool:
        return seen.status == 200 and seen.body == self.final[seen.what]

    def wrong(self, seen: Seen) -> bool:
        """An answer that is not a refusal (no connection, 503) and not the final status."""
        return seen.status not in (None, 503) and not self.correct(seen)

    def first_ready(self) -> Seen | None:
        return next((s for s in list(self.ready) if s.status == 200), None)

    def done(self) -> bool:
        """Ready was seen, and then every sampled order answered correctly ROUNDS_AFTER_READY times."""
        ready = self.first_ready()
        if ready is None:
            return False
        after = Counter(s.what for s in list(self.lookups) if s.sent >= ready.received and self.correct(s))
        return all(after[o] >= ROUNDS_AFTER_READY for o in self.sample)

    def report(self, label: str) -> str:
        start = self.worker.started
        ready = self.first_ready()
        statuses = Counter(s.status for s in self.lookups)
        wrong = [s for s in self.lookups if self.wrong(s)]
        flips = sum(1 for a, b in zip(self.ready, self.ready[1:]) if a.status == 200 and b.status == 503)
        reasons = Counter(s.body.get("reason") for s in self.ready if isinstance(s.body, dict) and s.status == 503)
        return (f"{label}: first /ready 200 received {ready.received - start:.2f}s after spawn"
                f" ({len(self.ready)} /ready polls, 503 reasons {dict(reasons)}, 200->503 flips {flips});"
                f" {len(self.lookups)} lookups by answer {dict(statuses)}, wrong answers {len(wrong)}")


def watch_restart(start_worker, data_dir: Path, sample: list[str], final: dict[str, dict], label: str) -> Watch:
    worker = start_worker(data_dir, store="rocksdb://")
    watch = Watch(worker, sample, final)
    with watch:
        deadline = time.monotonic() + WAIT_S
        while not watch.done():
            assert worker.proc.poll() is None, f"{label}: worker exited\n{worker.log_tail()}"
            assert not watch.errors, watch.errors
            assert time.monotonic() < deadline, f"{label}: no ready and final answers\n{worker.log_tail()}"
            time.sleep(0.1)
    assert not watch.errors, watch.errors
    return watch


def assert_ready_implies_restored(watch: Watch, label: str) -> None:
    start = watch.worker.started
    # Causal: the lookups sent after a /ready 200 had been received (and before any later /ready
    # answer said otherwise) must answer the final status.
    answers = [s for s in watch.ready if s.status is not None]
    times = [s.received for s in answers]
    lies = []
    for seen in watch.lookups:
        i = bisect.bisect_right(times, seen.sent)
        said = answers[i - 1] if i else None
        if said is not None and said.status == 200 and not watch.correct(seen):
            lies.append(f"/ready 200 received at {said.received - start:.3f}s, then GET /status/{seen.what}/ "
                        f"sent at {seen.sent - start:.3f}s answered {seen.status} {str(seen.body)[:200]}")
    assert not lies, f"{label}: {len(lies)} lookups after /ready said 200 did not answer the final status:\n" + \
        "\n".join(lies[:10]) + f"\n{watch.report(label)}\n{watch.worker.log_tail(60)}"
    # A lookup passes the same readiness check as /ready: any 404 or other state is an answer
    # given while the worker called itself ready, whether or not our /ready poll caught it.
    wrong = [f"sent at {s.sent - start:.3f}s, GET /status/{s.what}/ answered {s.status} {str(s.body)[:200]}"
             for s in watch.lookups if watch.wrong(s)]
    assert not wrong, f"{label}: {len(wrong)} lookups answered something other than a refusal or the final " \
        f"status:\n" + "\n".join(wrong[:10]) + f"\n{watch.report(label)}"
    # Not vacuous: ready was reached and, after it, every sampled order answered its final status.
    ready = watch.first_ready()
    assert ready is not None
    answered = {s.what for s in watch.lookups if s.sent >= ready.received and watch.correct(s)}
    assert answered == set(watch.sample)


def test_ready_is_answered_only_after_the_rocksdb_store_is_restored(broker, start_worker, tmp_path: Path) -> None:
    orders = make_orders(per_kind=PER_KIND)
    messages = messages_of(orders)
    first = start_worker(tmp_path / "store", store="rocksdb://")
    produce(broker.bootstrap_servers, messages)
    check_final(orders, wait_final(first, orders, deadline_s=WAIT_S))
    everything = listing(first)
    assert everything["count"] == len(orders)
    final = {s["order_id"]: s for s in everything["statuses"]}
    assert first.stop() == 0
    by_kind: dict[str, list[str]] = {}
    for order_id, kind in orders.items():
        by_kind.setdefault(kind, []).append(order_id)
    sample = [o for ids in by_kind.values() for o in ids[:SAMPLE // len(by_kind)]]
    print(f"{len(orders)} orders from {len(messages)} events folded and final; restarting")

    for label, data_dir in (("same data folder", first.data_dir), ("fresh data folder", tmp_path / "fresh")):
        watch = watch_restart(start_worker, data_dir, sample, final, label)
        print(watch.report(label))
        assert_ready_implies_restored(watch, label)
        # The whole table is back, exactly.
        restored = listing(watch.worker)
        assert restored["count"] == len(orders)
        assert {s["order_id"]: s for s in restored["statuses"]} == final
        assert watch.worker.stop() == 0
