"""The parts of health and metrics that need no broker: lag from librdkafka's statistics, the
readiness cache, liveness of the loop, and the orders API's /metrics."""

from __future__ import annotations

import json

import pytest
from prometheus_client import REGISTRY

from services.runtime.health import Health
from services.runtime.lag import ConsumerStats, partition_lags


def _partition(desired=True, ls=100, stored=-1001, committed=-1001, lo=0) -> dict:
    return {"desired": desired, "ls_offset": ls, "stored_offset": stored, "committed_offset": committed,
            "lo_offset": lo, "hi_offset": ls}


def _stats(partitions: dict[str, dict], topic: str = "orders.created") -> str:
    return json.dumps({"topics": {topic: {"partitions": partitions}}})


def test_lag_is_end_offset_minus_what_is_done():
    lags = partition_lags(json.loads(_stats({
        "0": _partition(stored=90, committed=80),       # stored after the last batch: the freshest
        "1": _partition(committed=40),                   # nothing stored since the assignment
        "2": _partition(lo=7),                           # nothing committed yet: from the log start
        "3": _partition(desired=False, committed=1),     # not assigned to this member
        "4": _partition(ls=-1001, committed=5),          # end offset unknown yet
        "-1": _partition(committed=1),                   # librdkafka's internal partition
    })))
    assert lags == {("orders.created", 0): 10, ("orders.created", 1): 60, ("orders.created", 2): 93}


def _lag(group: str, partition: str) -> float | None:
    return REGISTRY.get_sample_value("orderpipe_consumer_lag",
                                     {"group": group, "topic": "orders.created", "partition": partition})


def test_revoked_partitions_leave_no_stale_series():
    stats = ConsumerStats("unit-lag")
    stats(_stats({"0": _partition(stored=95), "1": _partition(stored=50)}))
    assert (_lag("unit-lag", "0"), _lag("unit-lag", "1")) == (5, 50)
    stats(_stats({"0": _partition(stored=99), "1": _partition(desired=False, stored=50)}))
    assert (_lag("unit-lag", "0"), _lag("unit-lag", "1")) == (1, None)
    stats("not json")  # logged, never raised into librdkafka's callback


def test_liveness_fails_when_the_loop_stops_polling():
    now = [0.0]
    stats = ConsumerStats("unit-live", clock=lambda: now[0])
    now[0] = 50.0
    stats.check_polling(60)
    now[0] = 61.0
    with pytest.raises(RuntimeError, match="has not polled for 61 s"):
        stats.check_polling(60)
    stats(_stats({}))  # statistics arrive only from inside consume(): the loop polled
    stats.check_polling(60)


def test_readiness_is_cached_so_probes_cannot_load_the_broker_or_database():
    now, calls = [0.0], []

    def database():
        calls.append(now[0])
        if now[0] >= 5:
            raise ConnectionError("refused")

    health = Health({"database": database}, cache_s=2.0, clock=lambda: now[0])
    assert health.ready() == (True, {"database": "ok"})
    now[0] = 1.9
    assert health.ready()[0] and len(calls) == 1
    now[0] = 5.0
    ok, checks = health.ready()
    assert not ok and checks["database"] == "ConnectionError: refused" and len(calls) == 2


def test_orders_api_serves_metrics(tmp_path):
    from fastapi.testclient import TestClient

    from services.orders.api import StatusClient, create_app
    from services.runtime.codec import Codec, EmbeddedRegistry
    from services.runtime.db import make_engine

    engine = make_engine(f"sqlite:///{tmp_path / 'orders.db'}")
    try:
        client = TestClient(create_app(engine, Codec(EmbeddedRegistry()), StatusClient("http://127.0.0.1:9")))
        answer = client.get("/metrics")
        assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/plain")
        assert "python_info" in answer.text
    finally:
        engine.dispose()
