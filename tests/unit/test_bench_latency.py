"""The soak's latency per minute (bench/e2e.py): what tells a stable latency from a drifting one
or from bursts, so each minute must hold exactly the orders due in it."""

from __future__ import annotations

from bench.e2e import latency_per_minute


def test_each_order_counts_in_the_minute_it_was_due_and_unfinished_ones_in_none():
    t0 = 1000.0
    sent = {"a": t0 + 1, "b": t0 + 59.9, "c": t0 + 60.0, "d": t0 + 130.0, "lost": t0 + 61.0}
    final = {"a": ("COMPLETED", t0 + 1.2), "b": ("COMPLETED", t0 + 61.9), "c": ("FAILED", t0 + 60.5),
             "d": ("COMPLETED", t0 + 131.0)}

    minutes = latency_per_minute(sent, final, t0)

    assert [(m["minute"], m["orders"]) for m in minutes] == [(1, 2), (2, 1), (3, 1)]
    assert minutes[0]["p99_s"] > 1.9 and minutes[1]["p50_s"] == 0.5 and minutes[2]["p50_s"] == 1.0
