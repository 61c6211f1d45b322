"""A smoke run of the benchmark (`orderpipe bench --smoke`): tiny sizes, every section.

It proves the bench runs end to end and writes complete results; it asserts no timings (the
figures mean nothing at these sizes and on a shared machine), only that every section is
there with positive numbers, and that the JSON and the chart are written.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os

import pytest
from rich.console import Console

from conftest import DEFAULT_POSTGRES_URL

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]


def _positive(fig: dict, *keys: str) -> None:
    for key in keys:
        assert isinstance(fig.get(key), (int, float)) and fig[key] > 0, f"{key} not positive in {fig}"


def test_bench_smoke_writes_every_section(tmp_path, monkeypatch):
    from bench.common import postgres_reachable
    from bench.run import run_bench

    monkeypatch.delenv("KAFKA_BOOTSTRAP_SERVERS", raising=False)  # the bench runs on the embedded broker
    pg_url = os.environ.get("ORDERPIPE_TEST_POSTGRES_URL") or DEFAULT_POSTGRES_URL
    pg_problem = postgres_reachable(pg_url)
    if pg_problem and os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"PostgreSQL not reachable at {pg_url}: {pg_problem}", pytrace=False)

    out = io.StringIO()
    result = run_bench(profile="smoke", out_dir=tmp_path, postgres_url=pg_url,
                       console=Console(file=out, width=200))

    databases = ["sqlite"] + ([] if pg_problem else ["postgresql"])
    if pg_problem:
        assert any("PostgreSQL" in s for s in result["skipped"])  # said, not silently left out

    _positive(result["raw"]["produce"], "count", "per_s", "per_cpu_s")
    _positive(result["raw"]["consume"], "count", "per_s", "per_cpu_s")
    for db in databases:
        _positive(result["relay"][db], "count", "per_s")
        for case in ("noop", "analytics", "inventory", "noop + relay thread"):
            _positive(result["consumer"][db][case], "count", "per_s", "per_cpu_s")
        _positive(result["naive"][db]["noop"], "count", "per_s")

    e2e = result["e2e"]
    assert e2e["latency"]["incomplete"] == 0 and e2e["latency"]["post_errors"] == 0
    _positive(e2e["latency"], "orders", "p50_s", "p95_s", "p99_s")
    assert e2e["latency"]["p50_s"] <= e2e["latency"]["p95_s"] <= e2e["latency"]["p99_s"]
    assert e2e["capacity"]["incomplete"] == 0
    _positive(e2e["capacity"], "orders", "post_per_s", "completed_per_s", "sustained_per_s",
              "cpu_ms_per_order_total")
    memory = e2e["memory"]["per_process"]
    for process in ("broker", "orders-api", "orders-relay", "inventory", "email", "invoice", "analytics",
                    "order-status"):
        _positive(memory[process], "peak_rss_mb")
        assert memory[process]["verdict"]

    assert "available" in result["recovery"] and (result["recovery"]["available"] or result["recovery"]["reason"])
    assert {t["key"] for t in result["targets"]} == {"consumer.sqlite.noop", "consumer.postgresql.noop",
                                                     "e2e.capacity", "e2e.p99"}
    assert all(r["ratio"] > 0 for r in result["rows"] if r["vs"])

    written = json.loads((tmp_path / "latest.json").read_text())
    assert written["e2e"]["latency"]["p99_s"] == e2e["latency"]["p99_s"]
    if importlib.util.find_spec("matplotlib"):
        assert (tmp_path / "latest.png").stat().st_size > 10_000
    else:
        assert any("chart" in s for s in result["skipped"])
    assert "targets" in out.getvalue()  # the table was printed
