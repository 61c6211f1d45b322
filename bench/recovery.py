"""Order-status recovery: how long the order-status view takes to answer again after a crash,
for N orders (100,000 in the full run), using `streams.order_status.process.measure_recovery`.

1. N OrderCreated events are produced to orders.created on a fresh local broker of the run's
   kind (embedded Tansu or Apache Kafka: `run(..., broker=)`);
2. a worker folds them (the fold rate, events/s, is reported too) and is then SIGKILLed;
3. a worker with the `memory://` store starts: it rebuilds the whole table from the changelog
   (the worst case: every record replayed);
4. a worker restarts on the killed worker's RocksDB folder (the default store): it only
   catches up on what the store had not persisted.
Each time is from spawn to "ready and counts every order".
"""

from __future__ import annotations

import gc
import time
from pathlib import Path

import httpx

from bench import consumers
from bench.common import environment
from services import registry
from services.runtime.admin import ensure_topics
from services.tools.brokers import local_broker
from services.runtime.settings import Settings
from services.runtime.topology import ORDERS_CREATED


NO_SLA = ("--sla-s", "86400")


def _count(url: str) -> int:
    try:
        r = httpx.get(f"{url}/status/", params={"limit": 0, "scope": "local"}, timeout=60)
        return r.json()["count"] if r.status_code == 200 else -1
    except httpx.HTTPError:
        return -1


def run(orders: int, workdir: Path, log=print, timeout: float = 1200.0, broker: str = "embedded") -> dict:
    try:
        from streams.order_status.process import WorkerProcess, measure_recovery
    except ImportError as exc:
        return {"available": False, "orders": orders,
                "reason": f"streams.order_status offers no recovery measurement ({exc}); not measured"}
    workdir = Path(workdir) / "recovery"
    workdir.mkdir(parents=True, exist_ok=True)
    kind = broker
    broker = local_broker(kind, workdir / "broker").start(progress=log)
    out: dict = {"available": True, "function": "streams.order_status.process.measure_recovery", "orders": orders,
                 "broker": kind}
    # The workers inherit our environment: give them the broker's client settings, as `orderpipe up`
    # does (on Tansu a 100 ms fetch wait; Faust's own 1,500 ms made the fold 4x slower there).
    try:
        with environment(dict(getattr(broker, "client_env", None) or {})):
            bootstrap = broker.bootstrap_servers
            ensure_topics({"bootstrap.servers": bootstrap}, registry.all_topics())
            consumers.produce_orders(Settings(KAFKA_BOOTSTRAP_SERVERS=bootstrap), ORDERS_CREATED, orders)
            log(f"recovery: folding {orders:,} orders into the order-status table")
            # A day's SLA: these orders never get past OrderCreated, and the section measures
            # recovery, not 100,000 SLA alerts.
            first = WorkerProcess(bootstrap, workdir / "store-1", workdir / "worker-1.log", extra_args=NO_SLA)
            try:
                ready_s = first.wait_ready(300)
                ready_at = time.monotonic()
                deadline = ready_at + timeout
                while (count := _count(first.url)) < orders:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"the first worker folded {count} of {orders} orders in {timeout:g} s")
                    time.sleep(1.0)
                fold_s = time.monotonic() - ready_at
                out["fold"] = {"ready_s": round(ready_s, 2), "seconds": round(fold_s, 2),
                               "events_per_s": round(orders / fold_s, 1)}
            finally:
                first.kill()  # a crash: no flush, no commit, no leaving the group
            for label, data_dir, store in (("memory_store", workdir / "store-memory", "memory://"),
                                           ("rocksdb_restart", workdir / "store-1", None)):
                log(f"recovery: restart with {store or 'the killed worker’s RocksDB store'}")
                report = measure_recovery(bootstrap, data_dir, store=store, expected_orders=orders, timeout=timeout,
                                          log_path=workdir / f"{label}.log", extra_args=NO_SLA)
                try:
                    out[label] = {"store": report.store, "ready_s": round(report.ready_s, 2),
                                  "complete_s": round(report.complete_s, 2), "orders_counted": report.orders}
                finally:
                    report.worker.stop()
            out["seconds"] = out["memory_store"]["complete_s"]
    except Exception as exc:  # the section reports what went wrong; the others still count
        out.update(available=False, reason=f"measurement failed: {type(exc).__name__}: {str(exc)[:400]}")
    finally:
        gc.collect()  # the feeder's and admin's clients go first: no reconnect noise once it stops
        broker.stop()
    return out
