"""Run the benchmark: `python -m bench.run [--quick|--smoke] [--broker embedded|kafka] [--out DIR] [--soak S]`.

Sections (all in one run, on one kind of local broker throughout: `--broker embedded`, Tansu in
memory, the default, or `--broker kafka`, Apache Kafka on one KRaft node; a fresh instance for
a-c/e/f, one for d, one for recovery, so no section pays for another's data; bullmq runs on none,
between them):
  raw       (a) confluent-kafka produce and consume: the ceiling
  relay     (b) outbox rows -> broker acks (OutboxRelay.publish_batch), SQLite and PostgreSQL
  consumer  (c) the real ServiceConsumer, SQLite and PostgreSQL, no-op and real effects
  naive     (e) one transaction and one offset commit per message
  ordering  (f) what ordering per key costs: ordered retries on vs off, without and with failures
  bullmq    (g) the peer: BullMQ 5 workers on a Redis of its own (no-op jobs; jobs with one
                PostgreSQL transaction each), each consumer figure of (c) as a ratio to it
  e2e       (d) the whole pipeline (Stack): orders/s POST to COMPLETED, latency, memory
  recovery      order-status recovery time, when streams.order_status offers a function for it
Writes bench/results/bench-<timestamp>.json and .png, and latest.json / latest.png; on Apache
Kafka bench-<timestamp>-kafka.json and latest-kafka.json / .png.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import shutil
import tempfile
import uuid
from datetime import UTC, datetime
from pathlib import Path

from rich.console import Console

from bench import consumers, e2e, ordering, peer, raw, recovery, relay
from bench.common import (BROKERS, DEFAULT_POSTGRES_URL, OutsideCpu, broker_cpu_clock, broker_meta,
                          client_settings, machine_info, postgres_reachable, results_suffix, scratch_postgres,
                          sizes_for)
from bench.report import (bullmq_ratios, ordering_costs, print_report, rows, targets, write_chart,
                          write_json)
from services.tools.brokers import BrokerUnavailable, local_broker
from services.runtime.settings import Settings

SECTIONS = ("raw", "relay", "consumer", "naive", "ordering", "bullmq", "e2e", "recovery")
RESULTS_DIR = Path(__file__).resolve().parent / "results"
EFFECTS = ("noop", "analytics", "inventory")
WARM_UP_MESSAGES = 50_000  # before the sections on a fresh broker (a JVM's JIT); at most raw_messages


def _versions() -> dict:
    import confluent_kafka
    import fastavro
    import sqlalchemy

    return {"python": platform.python_version(), "confluent_kafka": confluent_kafka.version()[0],
            "librdkafka": confluent_kafka.libversion()[0], "sqlalchemy": sqlalchemy.__version__,
            "fastavro": fastavro.__version__}


def machine_note(info: dict, extra: str | None, outside_cores: float | None = None) -> str:
    """One line on the machine. `outside_cores`: what other work used during the run (OutsideCpu);
    without it (the note written at start) the load average at start decides."""
    load = info["load_avg"][0]
    note = f"{info['cpus']} CPUs ({info['cpu_model'] or 'unknown CPU'}), load average {load:.2f} at start"
    shared = load >= 0.5 if outside_cores is None else outside_cores >= 0.2
    if outside_cores is not None:
        note += f"; other work used {outside_cores:.2f} of {info['cpus']} cores on average during the run"
    if shared:
        note += "; the machine was shared with other work, so absolute figures are low and noisy, ratios measured in the same run still hold"
    return f"{note}; {extra}" if extra else note


def run_bench(*, profile: str = "full", out_dir: Path = RESULTS_DIR, soak: float | None = None,
              sections: tuple[str, ...] = SECTIONS, postgres_url: str | None = None, profile_hot: bool = False,
              note: str | None = None, console: Console | None = None, broker: str = "embedded",
              **size_overrides) -> dict:
    """Every section on a local broker of kind `broker` ("embedded" or "kafka"). Raises
    BrokerUnavailable (KafkaUnavailable: no Java or Maven) before measuring anything."""
    if broker not in BROKERS:
        raise ValueError(f"unknown broker {broker!r}: use one of {', '.join(BROKERS)}")
    console = console or Console()
    if broker == "kafka":  # no Java or Maven: say so before anything is measured
        from services.tools.brokers.apache_kafka import check_java, kafka_libs

        check_java()
        kafka_libs(progress=console.print)
    if not console.is_terminal and console.width < 160:  # a log file or a pipe: keep the tables readable
        console.width = 160
    log = console.print
    sizes = sizes_for(profile, **size_overrides)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    postgres_url = postgres_url or os.environ.get("ORDERPIPE_BENCH_POSTGRES_URL") or DEFAULT_POSTGRES_URL
    started = datetime.now(UTC)
    info = machine_info()
    result: dict = {"meta": {"started_at": started.isoformat(timespec="seconds"), "profile": profile,
                             "soak_s": soak, "sizes": sizes.as_dict(), "machine": info,
                             "machine_note": machine_note(info, note), "versions": _versions(),
                             "broker": broker_meta(broker), "sections": list(sections)},
                    "skipped": []}
    pg_problem = postgres_reachable(postgres_url)
    databases = ["sqlite"] + ([] if pg_problem else ["postgresql"])
    if pg_problem:
        result["skipped"].append(f"PostgreSQL cases: not reachable at {postgres_url} ({pg_problem})")
    workdir = Path(tempfile.mkdtemp(prefix="orderpipe-bench-"))
    profiles: dict[str, str] = {}

    def db_url(db: str, label: str):
        if db == "sqlite":
            from contextlib import nullcontext

            return nullcontext(f"sqlite:///{workdir / f'{label}-{uuid.uuid4().hex[:6]}.db'}")
        return scratch_postgres(postgres_url, label)

    log(f"broker: {result['meta']['broker']['description']}")
    outside = OutsideCpu()
    outside.mark("start")
    needs_broker = {"raw", "relay", "consumer", "naive", "ordering"} & set(sections)
    try:
        if needs_broker:
            local = local_broker(broker, workdir / "broker")
            try:
                local.start(progress=log)
                # the client settings `orderpipe up` gives its processes on this broker (quirks.py)
                settings = Settings(KAFKA_BOOTSTRAP_SERVERS=local.bootstrap_servers, log_json=False,
                                    **client_settings(local))
                result["meta"]["client_settings"] = {
                    "max_poll_interval_ms": settings.max_poll_interval_ms,
                    "fetch_wait_max_ms": settings.fetch_wait_max_ms,
                    "from_broker": dict(getattr(local, "client_env", {}) or {})}
                broker_cpu = broker_cpu_clock(local)
                warm = min(sizes.raw_messages, WARM_UP_MESSAGES)
                log(f"warming up the broker: {warm:,} messages produced and consumed, not measured")
                raw.warm_broker(settings, warm, settings.consumer_batch_size)
                if "raw" in sections:
                    log(f"(a) raw client: {sizes.raw_messages:,} messages")
                    result["raw"] = raw.run(settings, sizes.raw_messages, settings.consumer_batch_size, broker_cpu)
                if "relay" in sections:
                    result["relay"] = {}
                    for db in databases:
                        log(f"(b) relay on {db}: {sizes.relay_rows:,} rows")
                        with db_url(db, "relay") as url:
                            result["relay"][db] = relay.run(settings, url, sizes.relay_rows, broker_cpu)
                if {"consumer", "naive"} & set(sections):
                    topic = f"bench.orders.{uuid.uuid4().hex[:8]}"
                    # extra events: a consumer's last batch is then full rather than waiting out its poll timeout
                    count = max(sizes.consumer_messages, sizes.naive_messages) + 2 * settings.consumer_batch_size
                    log(f"pre-producing {count:,} OrderCreated events")
                    consumers.produce_orders(settings, topic, count)
                    cases = []
                    if "consumer" in sections:
                        for db in databases:
                            cases += [(db, e, False, False) for e in EFFECTS]
                            cases.append((db, "noop", False, True))
                    if "naive" in sections:
                        cases += [(db, "noop", True, False) for db in databases]
                    for db, effect, naive, with_relay in cases:
                        n = sizes.naive_messages if naive else sizes.consumer_messages
                        key = effect + (" + relay thread" if with_relay else "")
                        log(f"({'e' if naive else 'c'}) {'naive' if naive else 'idempotent'} consumer on {db}, "
                            f"{key}: {n:,} events")
                        profiler = None
                        if profile_hot and not with_relay:
                            from pyinstrument import Profiler

                            profiler = Profiler(interval=0.0005)
                        with db_url(db, effect) as url:
                            fig = consumers.run_case(settings, topic, consumers.Case(effect, url, n, naive, with_relay),
                                                     profiler=profiler, broker_cpu=broker_cpu)
                        result.setdefault("naive" if naive else "consumer", {}).setdefault(db, {})[key] = fig
                        if profiler is not None:
                            name = f"profile-{'naive' if naive else 'consumer'}-{db}-{effect}"
                            (out_dir / f"{name}.txt").write_text(profiler.output_text(unicode=False, color=False))
                            (out_dir / f"{name}.html").write_text(profiler.output_html())
                            profiles[name] = str(out_dir / f"{name}.txt")
                if "ordering" in sections:
                    log(f"(f) ordered retries per key: pre-producing {sizes.ordering_orders:,} orders of "
                        f"{ordering.EVENTS_PER_ORDER} events each")
                    feed = ordering.produce_feed(settings, sizes.ordering_orders)
                    result["ordering"] = {}
                    for db in databases:
                        runs: dict[str, list[dict]] = {}
                        for n in range(sizes.ordering_rounds):
                            for ordered, failing in ordering.cases(n):
                                name = ordering.case_name(ordered, failing)
                                log(f"(f) {name} on {db}, round {n + 1} of {sizes.ordering_rounds}: "
                                    f"{len(feed.events):,} events")
                                with db_url(db, "ordering") as url:
                                    runs.setdefault(name, []).append(ordering.run_case(
                                        settings, feed, url, ordered=ordered, failures=failing,
                                        broker_cpu=broker_cpu))
                        result["ordering"][db] = {name: ordering.best(figs) for name, figs in runs.items()}
            finally:
                gc.collect()  # the sections' leftover clients go first: no reconnect noise once it stops
                local.stop()
        outside.mark("clients_end")
        if "bullmq" in sections:  # after the broker has stopped: the peer has the machine as (c) had it
            result["bullmq"] = peer.run(sizes.bullmq_jobs, sizes.bullmq_pg_jobs, postgres_url=postgres_url,
                                        pg_problem=pg_problem, workdir=workdir, pg_pool=sizes.bullmq_pg_pool,
                                        log=log)
            if not result["bullmq"]["available"]:
                result["skipped"].append(f"bullmq (g): {result['bullmq']['reason']}")
            elif "postgresql_skipped" in result["bullmq"]:
                result["skipped"].append(f"bullmq (g) PostgreSQL jobs: {result['bullmq']['postgresql_skipped']}; "
                                         "only the no-op case ran")
        outside.mark("bullmq_end")
        if "e2e" in sections:
            log("(d) end to end on the whole stack")
            result["e2e"] = e2e.run(sizes, workdir, soak=soak, log=log, profile_dir=out_dir if profile_hot else None,
                                    broker=broker)
        outside.mark("e2e_end")
        if "recovery" in sections:
            log(f"order-status recovery: {sizes.recovery_orders:,} orders")
            result["recovery"] = recovery.run(sizes.recovery_orders, workdir, log=log, broker=broker)
        outside.mark("recovery_end")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    result["rows"] = rows(result)
    result["targets"] = targets(result)
    if "ordering" in result:
        result["ordering_cost"] = ordering_costs(result)
    if "bullmq" in sections:
        result["bullmq_ratios"] = bullmq_ratios(result)
    result["meta"]["finished_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    result["meta"]["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    # what other work used meanwhile, in cores: the load average counts the bench's own processes
    result["meta"]["outside_cpu_cores"] = {
        "whole_run": outside.cores("start", "recovery_end"),
        # the broker sections, ordering (f) included (key kept as older results have it)
        "raw_relay_consumer_naive": outside.cores("start", "clients_end") if needs_broker else None,
        "bullmq": outside.cores("clients_end", "bullmq_end") if "bullmq" in sections else None,
        "e2e": outside.cores("bullmq_end", "e2e_end") if "e2e" in sections else None,
        "recovery": outside.cores("e2e_end", "recovery_end") if "recovery" in sections else None}
    result["meta"]["machine_note"] = machine_note(info, note, result["meta"]["outside_cpu_cores"]["whole_run"])
    if profiles:
        result["profiles"] = profiles
    stamp = started.strftime("%Y%m%dT%H%M%SZ") + results_suffix(broker)
    json_path, png_path = out_dir / f"bench-{stamp}.json", out_dir / f"bench-{stamp}.png"
    write_json(result, json_path)
    chart_error = None
    try:
        write_chart(result, png_path)
    except ImportError as exc:  # matplotlib is in the `bench` extra
        chart_error = f"no chart: {exc} (pip install -e '.[bench]')"
        result["skipped"].append(chart_error)
        write_json(result, json_path)
    latest = f"latest{results_suffix(broker)}"
    for src, name in ((json_path, f"{latest}.json"), (png_path, f"{latest}.png")):
        if src.exists():
            shutil.copyfile(src, out_dir / name)
    print_report(result, console)
    log(f"wrote {json_path}" + ("" if chart_error else f" and {png_path}") + f" (copied to {latest}.*)")
    result["paths"] = {"json": str(json_path), "png": None if chart_error else str(png_path),
                       "latest_json": str(out_dir / f"{latest}.json")}
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--quick", action="store_const", const="quick", dest="profile", help="smaller sizes (~4 min on a 2-core machine)")
    group.add_argument("--smoke", action="store_const", const="smoke", dest="profile", help="tiny sizes (tests)")
    parser.add_argument("--broker", choices=BROKERS, default="embedded",
                        help="the local broker every section runs on: embedded (Tansu, in memory; results "
                             "latest.json) or kafka (Apache Kafka, one KRaft node, needs Java 17+ and Maven; "
                             "results latest-kafka.json)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    parser.add_argument("--soak", type=float, default=None, help="seconds of fixed load for the memory check, e.g. 300")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections of {','.join(SECTIONS)}")
    parser.add_argument("--postgres-url", default=None)
    parser.add_argument("--profile", action="store_true", dest="profile_hot",
                        help="pyinstrument the consumer cases and py-spy the end-to-end processes during the capacity "
                             "phase; writes profile-*.txt/html and py-spy-*.txt next to the results")
    parser.add_argument("--note", default=None, help="added to the machine note in the results")
    parser.add_argument("--rate", type=float, default=None, help="offered load of the latency phase, orders/s")
    parser.add_argument("--consumer-messages", type=int, default=None)
    parser.add_argument("--ordering-orders", type=int, default=None,
                        help="orders (3 events each) per ordered-retries case (10,000 in the full run)")
    parser.add_argument("--bullmq-jobs", type=int, default=None,
                        help="jobs per BullMQ case, no-op and PostgreSQL (section bullmq; 20,000 in the full run)")
    parser.add_argument("--recovery-orders", type=int, default=None,
                        help="orders in the order-status recovery section (100,000 in the full run)")
    args = parser.parse_args(argv)
    sections = tuple(s.strip() for s in args.only.split(",") if s.strip())
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections: {', '.join(sorted(unknown))}")
    try:
        run_bench(profile=args.profile or "full", out_dir=args.out, soak=args.soak, sections=sections,
                  postgres_url=args.postgres_url, profile_hot=args.profile_hot, note=args.note, broker=args.broker,
                  e2e_rate=args.rate, consumer_messages=args.consumer_messages, recovery_orders=args.recovery_orders,
                  ordering_orders=args.ordering_orders, bullmq_jobs=args.bullmq_jobs,
                  bullmq_pg_jobs=args.bullmq_jobs)
    except BrokerUnavailable as exc:  # no Java or Maven for --broker kafka, a port taken: one line
        parser.exit(1, f"error: {exc}\n")


if __name__ == "__main__":
    main()
