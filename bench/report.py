"""The bench's outputs: a rich table on the terminal, a JSON file and a PNG chart."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from bench.common import broker_label

# Issue #18's targets for the 2-core machine (performance, round 2), each with how it is
# measured: "x BullMQ" figures are ratios to section (g) of the same run; the SQLite real-effect
# targets are 4 times round 1's last figures (inventory 2,800 and analytics 3,200 events/s);
# CPU-ms per order counts every process of the stack, the broker too, except the load generator
# and the SMTP sink.
TARGETS = {
    # key: (label, target, higher is better)
    "consumer.sqlite.noop": ("idempotent consumer, SQLite, no-op, x BullMQ's no-op jobs/s", 2.0, True),
    "consumer.postgresql.noop": ("idempotent consumer, PostgreSQL, no-op, x BullMQ's no-op jobs/s", 2.0, True),
    "consumer.postgresql.inventory": ("inventory on PostgreSQL, x BullMQ's PostgreSQL jobs/s", 2.0, True),
    "consumer.postgresql.analytics": ("analytics on PostgreSQL, x BullMQ's PostgreSQL jobs/s", 2.0, True),
    "consumer.sqlite.inventory": ("inventory on SQLite, events/s", 11_200, True),
    "consumer.sqlite.analytics": ("analytics on SQLite, events/s", 12_800, True),
    "e2e.cpu_ms": ("end to end, CPU-ms per completed order (all but the load generator and SMTP sink)", 5.0, False),
    "e2e.capacity": ("end to end, sustained orders/s", 300, True),
    "e2e.p99": ("end to end p99 placed-to-COMPLETED, s", 0.25, False),
}
TARGET_P99_RATE = 150  # orders/s offered, open loop, for the p99 target (the bench's default --rate)
NOT_PRODUCT = ("bench (load generator)", "smtp-sink")  # left out of the CPU-ms per order target


def rows(result: dict) -> list[dict]:
    """Every throughput figure with its ceiling: (section, what, per_s, ceiling name, ratio)."""
    raw = result.get("raw", {})
    produce, consume = raw.get("produce", {}), raw.get("consume", {})
    out: list[dict] = []

    def ratio(a, b):
        return round(a / b, 6) if a and b else None  # naive PostgreSQL vs raw consume: ~0.0001

    def add(section, what, fig, unit, ceiling_name=None, ceiling=None, value=None):
        ceiling = ceiling or {}
        value = fig.get("per_s") if value is None else value
        out.append({"section": section, "what": what, "value": value, "unit": unit, "vs": ceiling_name or "",
                    "ratio": ratio(value, ceiling.get("per_s")), "per_cpu_s": fig.get("per_cpu_s"),
                    "cpu_ratio": ratio(fig.get("per_cpu_s"), ceiling.get("per_cpu_s")),
                    "broker_us_per_msg": fig.get("broker_us_per_msg")})

    if produce:
        add("a", "raw produce (confluent-kafka)", produce, "msg/s")
    if consume:
        add("a", "raw consume (confluent-kafka)", consume, "msg/s")
    for db, fig in result.get("relay", {}).items():
        if "per_s" in fig:
            add("b", f"outbox relay, {db}", fig, "rows/s", "raw produce", produce)
    for db, cases in result.get("consumer", {}).items():
        for effect, fig in cases.items():
            if "per_s" in fig:
                add("c", f"idempotent consumer, {db}, {effect}", fig, "events/s", "raw consume", consume)
    for db, cases in result.get("naive", {}).items():
        for effect, fig in cases.items():
            if "per_s" in fig:
                add("e", f"naive (1 tx + 1 commit per msg), {db}, {effect}", fig, "events/s", "raw consume", consume)
    for db, cases in result.get("ordering", {}).items():
        for name, fig in cases.items():
            if "per_s" in fig:
                add("f", f"ordering per key, {db}, no-op, {name}", fig, "events/s", "raw consume", consume)
    peer = result.get("bullmq", {})
    if peer.get("available"):
        for case in BULLMQ_CASES:
            fig = peer.get(case, {})
            if "per_s" in fig:
                add("g", f"{bullmq_label(peer)}, {BULLMQ_CASES[case]}", fig, "jobs/s")
    cap = result.get("e2e", {}).get("capacity", {})
    if cap:
        add("d", "end to end, POST accepted", {}, "orders/s", "raw produce", produce, cap["post_per_s"])
        add("d", "end to end, POST to COMPLETED (whole run)", {}, "orders/s", "raw produce", produce,
            cap["completed_per_s"])
        add("d", "end to end, POST to COMPLETED (sustained)", {}, "orders/s", "raw produce", produce,
            cap["sustained_per_s"])
    return out


# (g) the peer: its cases, and which orderpipe consumer figure (c) is held against which of them
BULLMQ_CASES = {"noop": "no-op jobs", "postgresql": "PostgreSQL jobs (dedup + outbox row, 1 tx per job)"}
BULLMQ_SHORT = {"noop": "no-op", "postgresql": "PostgreSQL, dedup + outbox"}
BULLMQ_PAIRS = (  # (database, orderpipe effect, BullMQ case)
    ("sqlite", "noop", "noop"),
    ("postgresql", "noop", "noop"),
    ("postgresql", "noop", "postgresql"),  # the same rows per message: an inbox (dedup) row and an outbox row
    ("postgresql", "inventory", "postgresql"),
    ("postgresql", "analytics", "postgresql"),
)


def bullmq_label(peer: dict) -> str:
    versions = peer.get("versions", {})
    return f"BullMQ {versions.get('bullmq', '5')} on Redis {versions.get('redis', '?')}"


def _total_cpu_per_s(fig: dict) -> float | None:
    """Messages per CPU-second of the measuring process and the broker (Tansu, Kafka, Redis)
    together; the PostgreSQL server is in neither."""
    cpu = (fig.get("cpu_s") or 0) + (fig.get("broker_cpu_s") or 0)
    return fig["count"] / cpu if cpu and fig.get("count") else None


def bullmq_ratios(result: dict) -> list[dict]:
    """Each orderpipe consumer figure (c) over the matching BullMQ figure (g) of the same run:
    per wall-second, per CPU-second of the consumer process (Python vs Node), and per CPU-second
    of that process and the broker together (Tansu or Kafka vs Redis). A pair whose side was not
    run says why in `missing`."""
    sections = result["meta"].get("sections", [])
    peer = result.get("bullmq") or {}
    skipped = result.get("skipped", [])
    out = []
    for db, effect, case in BULLMQ_PAIRS:
        ours = result.get("consumer", {}).get(db, {}).get(effect, {})
        theirs = peer.get(case, {}) if peer.get("available") else {}
        missing = []
        if "per_s" not in ours:
            if "consumer" not in sections:
                missing.append("orderpipe: the consumer section was not run (--only)")
            elif db == "postgresql" and any(s.startswith("PostgreSQL cases") for s in skipped):
                missing.append("orderpipe: PostgreSQL not reachable")
            else:
                missing.append(f"orderpipe: no {db} {effect} figure")
        if "per_s" not in theirs:
            if "bullmq" not in sections:
                missing.append("BullMQ: the bullmq section was not run (--only)")
            elif not peer.get("available"):
                missing.append(f"BullMQ: skipped ({peer.get('reason', 'not run')})")
            else:
                missing.append(f"BullMQ: {peer.get(f'{case}_skipped', f'no {case} figure')}")

        def ratio(a, b):
            return round(a / b, 3) if a and b else None

        out.append({"orderpipe": f"consumer, {db}, {effect}", "bullmq": BULLMQ_SHORT[case],
                    "database": db, "effect": effect, "case": case,
                    "orderpipe_per_s": ours.get("per_s"), "bullmq_per_s": theirs.get("per_s"),
                    "ratio": None if missing else ratio(ours["per_s"], theirs["per_s"]),
                    "cpu_ratio": None if missing else ratio(ours.get("per_cpu_s"), theirs.get("per_cpu_s")),
                    "total_cpu_ratio": None if missing else ratio(_total_cpu_per_s(ours), _total_cpu_per_s(theirs)),
                    "missing": "; ".join(missing)})
    return out


def targets(result: dict) -> list[dict]:
    out = []
    consumer = result.get("consumer", {})
    e2e = result.get("e2e", {})
    peer = result.get("bullmq") or {}

    def per_s(db: str, effect: str):
        return consumer.get(db, {}).get(effect, {}).get("per_s")

    def x_bullmq(db: str, effect: str, case: str):
        ours, theirs = per_s(db, effect), peer.get(case, {}).get("per_s") if peer.get("available") else None
        return round(ours / theirs, 3) if ours and theirs else None

    cpu = e2e.get("capacity", {}).get("cpu_ms_per_order") or {}
    values = {
        "consumer.sqlite.noop": x_bullmq("sqlite", "noop", "noop"),
        "consumer.postgresql.noop": x_bullmq("postgresql", "noop", "noop"),
        "consumer.postgresql.inventory": x_bullmq("postgresql", "inventory", "postgresql"),
        "consumer.postgresql.analytics": x_bullmq("postgresql", "analytics", "postgresql"),
        "consumer.sqlite.inventory": per_s("sqlite", "inventory"),
        "consumer.sqlite.analytics": per_s("sqlite", "analytics"),
        "e2e.cpu_ms": round(sum(v for k, v in cpu.items() if k not in NOT_PRODUCT), 2) if cpu else None,
        "e2e.capacity": e2e.get("capacity", {}).get("sustained_per_s"),
        "e2e.p99": e2e.get("latency", {}).get("p99_s"),
    }
    for key, (label, target, higher) in TARGETS.items():
        value = values[key]
        met = None if value is None else (value >= target if higher else value <= target)
        note = ""
        if key == "e2e.p99" and e2e.get("latency"):
            offered = e2e["latency"]["offered_per_s"]
            note = f"at {offered:g} orders/s offered"
            if offered != TARGET_P99_RATE:
                note += f" (the target is at {TARGET_P99_RATE}: --rate {TARGET_P99_RATE})"
                met = None  # measured at another rate: says nothing about the target
            if e2e["latency"].get("overloaded"):
                note += " (above the measured capacity)"
        if key.startswith("consumer.") and "x BullMQ" in label and value is None:
            note = "(needs the consumer and bullmq sections of one run)"
        out.append({"key": key, "label": label, "target": target, "value": value, "met": met, "note": note})
    return out


def ordering_costs(result: dict) -> dict:
    """Per database, what ordered retries per key cost (section f): the throughput with them on
    over the throughput with them off, without failures and with them, and what ordering did
    when events failed (held with it on; out of order without it)."""
    from bench.ordering import CASES, case_name  # the case names the section writes

    out = {}
    for db, cases in result.get("ordering", {}).items():
        on, off, on_failing, off_failing = (cases.get(case_name(o, f), {}) for o, f in CASES)

        def ratio(a, b, key="per_s"):
            return round(a[key] / b[key], 3) if a.get(key) and b.get(key) else None

        out[db] = {"no_failures_on_off": ratio(on, off), "failures_on_off": ratio(on_failing, off_failing),
                   "no_failures_on_off_cpu": ratio(on, off, "per_cpu_s"),
                   "failures_on_off_cpu": ratio(on_failing, off_failing, "per_cpu_s"),
                   "rounds": on.get("rounds", 1), "events_per_order": on_failing.get("events_per_order"),
                   "failing_orders": on_failing.get("failing_orders"), "orders": on_failing.get("orders"),
                   "retry_delay_s": on_failing.get("retry_delay_s"), "held": on_failing.get("held"),
                   "out_of_order_on": on_failing.get("out_of_order"),
                   "out_of_order_off": off_failing.get("out_of_order")}
    return out


def _pct(x) -> str:
    """A ratio as a percentage; small ones (a consumer vs the raw client) with more digits."""
    return "" if x is None else f"{x:.1%}" if x >= 0.01 else f"{x:.3%}"


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and value < 100:
        return f"{value:,.2f}"
    return f"{value:,.0f}"


def print_report(result: dict, console: Console | None = None) -> None:
    console = console or Console()
    meta = result["meta"]
    table = Table(title=f"orderpipe bench ({meta['profile']}) on {broker_label(meta.get('broker', '?'))} - "
                        f"{meta['machine']['cpus']} CPUs, load avg at start {meta['machine']['load_avg']}")
    for col, justify in (("", "left"), ("figure", "left"), ("per second", "right"), ("unit", "left"),
                         ("ratio to raw", "right"), ("per CPU-second", "right"), ("CPU ratio", "right"),
                         ("broker CPU µs/msg", "right"), ("vs (same broker, same run)", "left")):
        table.add_column(col, justify=justify)
    for r in result["rows"]:
        table.add_row(r["section"], r["what"], _fmt(r["value"]), r["unit"], _pct(r["ratio"]),
                      _fmt(r.get("per_cpu_s")), _pct(r.get("cpu_ratio")), _fmt(r.get("broker_us_per_msg")), r["vs"])
    console.print(table)

    for key in ("latency", "latency_sustainable"):
        lat = result.get("e2e", {}).get(key)
        if lat:
            console.print(
                f"end-to-end latency at {lat['offered_per_s']:g} orders/s offered for {lat['seconds']:g} s "
                f"({lat['orders']} orders, {lat['incomplete']} incomplete"
                f"{', ABOVE CAPACITY: measures the backlog' if lat.get('overloaded') else ''}): "
                f"p50 {lat['p50_s']:.3f} s, p95 {lat['p95_s']:.3f} s, p99 {lat['p99_s']:.3f} s, "
                f"max {lat['max_s']:.3f} s; POST p50 {lat['post_p50_s'] * 1000:.1f} ms")
            if lat.get("per_minute"):
                console.print("  per minute, p50 / p99 s: " + ", ".join(
                    f"{m['p50_s']:.2f}/{m['p99_s']:.2f}" for m in lat["per_minute"]))
    cap = result.get("e2e", {}).get("capacity")
    if cap:
        console.print("where the CPU goes (capacity phase, CPU ms per completed order): " + ", ".join(
            f"{name} {ms:.1f}" for name, ms in cap["cpu_ms_per_order"].items()))
    mem = result.get("e2e", {}).get("memory", {}).get("per_process")
    if mem:
        mt = Table(title="memory per process (end-to-end run)")
        for col in ("process", "peak RSS MB", "growth MB (last vs middle third)", "slope MB/min", "restarts",
                    "verdict"):
            mt.add_column(col)
        for name, m in sorted(mem.items()):
            g = m["latency_phase"]
            mt.add_row(name, f"{m['peak_rss_mb']:.0f}", _fmt(g.get("growth_mb")), _fmt(g.get("slope_mb_per_min")),
                       str(m["restarts"]), m["verdict"])
        console.print(mt)
    for d, cases in result.get("naive", {}).items():
        noop = cases.get("noop", {}).get("per_s")
        batched = result.get("consumer", {}).get(d, {}).get("noop", {}).get("per_s")
        if noop and batched:
            console.print(f"batching buys x{batched / noop:.1f} on {d} (no-op effect)")
    for d, cost in (result.get("ordering_cost") or ordering_costs(result)).items():
        if cost["no_failures_on_off"] and cost["failures_on_off"]:
            cpu = {k: "" if cost.get(f"{k}_cpu") is None else f" (x{cost[f'{k}_cpu']:.2f} per CPU-second)"
                   for k in ("no_failures_on_off", "failures_on_off")}
            console.print(
                f"ordering per key costs on {d} (no-op service, {cost['events_per_order']} events per order; "
                f"throughput with ordered_retries on / off, best of {cost['rounds']} round"
                f"{'s' if cost['rounds'] != 1 else ''}): x{cost['no_failures_on_off']:.2f}"
                f"{cpu['no_failures_on_off']} when nothing fails, the lookup of each batch's held keys; "
                f"x{cost['failures_on_off']:.2f}{cpu['failures_on_off']} over the whole run when "
                f"{cost['failing_orders']:,} of {cost['orders']:,} orders fail once and are retried after "
                f"{cost['retry_delay_s']:g} s, the cost of holding {cost['held']:,} later events in the database "
                f"and releasing them one transaction each ({cost['out_of_order_on']} ran out of order; with it off "
                f"{cost['out_of_order_off']:,} ran before their order's failed event)")
    rec = result.get("recovery")
    if rec:
        if rec.get("available"):
            console.print(
                f"order-status view, {rec['orders']:,} orders: folded at {rec['fold']['events_per_s']:,.0f} events/s; "
                f"after a crash answers every order again in {rec['memory_store']['complete_s']:.1f} s "
                f"(memory:// store, full changelog replay) / {rec['rocksdb_restart']['complete_s']:.1f} s "
                f"(restart on its RocksDB store)")
        else:
            console.print(f"order-status recovery ({rec['orders']:,} orders): {rec['reason']}")
    peer = result.get("bullmq")
    if peer is not None:
        print_bullmq(result, console)
    tt = Table(title="targets")
    for col in ("target", "goal", "measured", "met"):
        tt.add_column(col)
    for t in result["targets"]:
        goal = f"{'>=' if TARGETS[t['key']][2] else '<='} {_fmt(t['target'])}"
        met = {True: "[green]yes[/]", False: "[red]no[/]", None: "not measured"}[t["met"]]
        tt.add_row(f"{t['label']} {t['note']}".strip(), goal, _fmt(t["value"]), met)
    console.print(tt)
    for skipped in result.get("skipped", []):
        console.print(f"[yellow]skipped:[/] {escape(skipped)}")
    broker = meta.get("broker")
    console.print(f"broker: {broker['description'] if isinstance(broker, dict) else broker}")
    console.print(f"machine: {meta['machine_note']}")


def _x(ratio) -> str:
    return "" if ratio is None else f"x{ratio:.2f}"


def print_bullmq(result: dict, console: Console) -> None:
    """(g): what BullMQ did, and each orderpipe consumer figure as a ratio to it."""
    peer = result["bullmq"]
    if not peer.get("available"):
        console.print(f"(g) BullMQ: skipped, {escape(peer.get('reason', 'not run'))}")
        return
    settings = peer.get("settings", {})
    for case, what in BULLMQ_CASES.items():
        fig = peer.get(case)
        if fig:
            pool = f", pg pool of {settings.get('pg_pool')}" if case == "postgresql" else ""
            console.print(
                f"(g) {bullmq_label(peer)} (Node {peer['versions'].get('node')}), {what}, concurrency "
                f"{settings.get('concurrency')}{pool}: "
                f"{fig['per_s']:,.0f} jobs/s, {fig.get('per_cpu_s') or 0:,.0f} per Node CPU-second, Redis "
                f"{_fmt(fig.get('broker_us_per_msg'))} µs CPU per job ({fig['count']:,} jobs after the first; "
                f"added at {fig['add']['per_s']:,.0f} jobs/s)")
        elif f"{case}_skipped" in peer:
            console.print(f"(g) {bullmq_label(peer)}, {what}: not run, {escape(peer[f'{case}_skipped'])}")
    ratios = result.get("bullmq_ratios") or bullmq_ratios(result)
    rt = Table(title=f"orderpipe vs {bullmq_label(peer)}, same run (x > 1: orderpipe does more)")
    missing = any(r["missing"] for r in ratios)
    for col, justify in (("orderpipe (c)", "left"), ("events/s", "right"), ("BullMQ (g)", "left"),
                         ("jobs/s", "right"), ("ratio", "right"), ("per process CPU-s", "right"),
                         ("per CPU-s incl. broker", "right"), *((("not compared", "left"),) if missing else ())):
        rt.add_column(col, justify=justify)
    for r in ratios:
        rt.add_row(r["orderpipe"], _fmt(r["orderpipe_per_s"]), r["bullmq"], _fmt(r["bullmq_per_s"]), _x(r["ratio"]),
                   _x(r["cpu_ratio"]), _x(r["total_cpu_ratio"]), *((escape(r["missing"]),) if missing else ()))
    console.print(rt)


def write_json(result: dict, path: Path) -> None:
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")


def write_chart(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tput = [r for r in result["rows"] if r["value"]]
    mem = result.get("e2e", {}).get("memory", {})
    lat = result.get("e2e", {}).get("latency")
    fig, axes = plt.subplots(1, 3, figsize=(20, 7), gridspec_kw={"width_ratios": [2.2, 0.8, 1.4]})

    ax = axes[0]
    colors = {"a": "#555555", "b": "#1f77b4", "c": "#2ca02c", "d": "#d62728", "e": "#ff7f0e", "f": "#9467bd",
              "g": "#8c564b"}
    labels = [r["what"] + (f"  ({_pct(r['ratio'])} of raw)" if r["ratio"] else "") for r in tput]
    ax.barh(range(len(tput)), [r["value"] for r in tput], color=[colors[r["section"]] for r in tput])
    ax.set_yticks(range(len(tput)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("per second (log scale)")
    for i, r in enumerate(tput):
        ax.text(r["value"], i, f" {r['value']:,.0f}", va="center", fontsize=7)
    ax.set_title("throughput: (a) raw client, (b) relay, (c) idempotent consumer, (e) naive, "
                 "(f) ordered retries on/off, (g) BullMQ, (d) end to end",
                 fontsize=9)

    ax = axes[1]
    if lat:
        e2e = result.get("e2e", {})
        runs = {f"shipped, {lat['offered_per_s']:g}/s": lat}
        if e2e.get("latency_sustainable"):
            runs[f"shipped, {e2e['latency_sustainable']['offered_per_s']:g}/s"] = e2e["latency_sustainable"]
        names = ["p50", "p95", "p99", "max"]
        width = 0.8 / len(runs)
        for j, (run, l) in enumerate(runs.items()):
            vals = [l["p50_s"], l["p95_s"], l["p99_s"], l["max_s"]]
            xs = [i + j * width for i in range(len(names))]
            ax.bar(xs, vals, width=width, label=run)
            for x, v in zip(xs, vals):
                ax.text(x, v, f"{v:.2f}", ha="center", va="bottom", fontsize=6)
        ax.set_xticks([i + width * (len(runs) - 1) / 2 for i in range(len(names))], names)
        ax.axhline(TARGETS["e2e.p99"][1], color="black", linestyle="--", linewidth=0.8,
                   label=f"target p99 {TARGETS['e2e.p99'][1]:g} s")
        ax.legend(fontsize=7)
        ax.set_yscale("log")
        ax.set_title("placed-to-COMPLETED latency (s, log scale) at the offered load", fontsize=9)

    ax = axes[2]
    for name, series in sorted(mem.get("samples", {}).items()):
        if series:
            ax.plot([t for t, _ in series], [mb for _, mb in series], label=name, linewidth=1)
    for mark, t in mem.get("marks", {}).items():
        ax.axvline(t, color="grey", linestyle=":", linewidth=0.8)
        ax.text(t, ax.get_ylim()[1] if ax.lines else 0, mark.replace("_", " "), rotation=90, fontsize=6,
                va="top", color="grey")
    ax.set_xlabel("seconds")
    ax.set_ylabel("RSS MB")
    ax.set_title("RSS per process during the end-to-end run", fontsize=9)
    if ax.lines:
        ax.legend(fontsize=7)
    meta = result["meta"]
    fig.suptitle(f"orderpipe bench {meta['started_at']} ({meta['profile']}) on "
                 f"{broker_label(meta.get('broker', '?'))}: {meta['machine_note']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
