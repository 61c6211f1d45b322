"""`orderpipe bench`: measure the pipeline against the raw Kafka client, in one run.

The benchmark code lives in `bench/` at the top of a source checkout (it is not part of the
services); this command runs it and fails with one clear line when it is not there or the
`bench` extra (matplotlib, pyinstrument) is not installed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from enum import Enum

import typer

# One command; register it with `app.add_typer(bench_cmd.app)` (no name: `bench` joins the top level).
app = typer.Typer()


class BenchBroker(str, Enum):  # services.tools.brokers.BROKER_KINDS
    embedded = "embedded"
    kafka = "kafka"


@app.command("bench")
def bench(
    quick: Annotated[bool, typer.Option("--quick", help="Smaller sizes: ~10 minutes instead of ~20.")] = False,
    smoke: Annotated[bool, typer.Option("--smoke", help="Tiny sizes: proves every section runs (tests).")] = False,
    broker: Annotated[BenchBroker, typer.Option(
        "--broker", case_sensitive=False,
        help="The local broker every section runs on: embedded (Tansu, in memory; results latest.json) or kafka "
             "(Apache Kafka, one KRaft node; needs Java 17+ and Maven; results latest-kafka.json).")] = BenchBroker.embedded,
    out: Annotated[Path | None, typer.Option(
        "--out", help="Where to write bench-<time>.json/.png and latest.json/.png, -kafka in the names on "
                      "Apache Kafka (default: bench/results).")] = None,
    soak: Annotated[float | None, typer.Option(
        help="Seconds of fixed offered load in the end-to-end run, for the memory check (e.g. 300).")] = None,
    only: Annotated[str | None, typer.Option(
        help="Comma-separated sections: raw, relay, consumer, naive, ordering, bullmq, e2e, recovery.")] = None,
    rate: Annotated[float | None, typer.Option(help="Offered load of the latency phase, orders/s (150: the p99 target's rate).")] = None,
    profile: Annotated[bool, typer.Option(
        "--profile", help="pyinstrument the consumer cases (not the naive ones), py-spy the end-to-end processes.")] = False,
    postgres_url: Annotated[str | None, typer.Option(
        help="PostgreSQL server to create scratch databases on.", envvar="ORDERPIPE_BENCH_POSTGRES_URL")] = None,
    note: Annotated[str | None, typer.Option(help="Added to the machine note in the results.")] = None,
) -> None:
    """Benchmark: raw client ceiling, relay, idempotent consumers (SQLite, PostgreSQL), naive baseline,
    end to end (orders/s, latency, memory), on one local broker (--broker). Prints a table, writes JSON
    and a PNG chart."""
    from rich.console import Console

    err = Console(stderr=True)
    try:
        from bench.run import RESULTS_DIR, SECTIONS, run_bench
    except ModuleNotFoundError as exc:
        missing = exc.name or str(exc)
        hint = ("run it from a source checkout of orderpipe (bench/ is not installed with the services)"
                if missing.startswith("bench") else "install the bench extra: pip install -e '.[bench]'")
        err.print(f"[bold red]error:[/] cannot load the benchmark ({exc}); {hint}")
        raise typer.Exit(1) from None
    if quick and smoke:
        err.print("[bold red]error:[/] choose one of --quick and --smoke")
        raise typer.Exit(2)
    sections = SECTIONS if not only else tuple(s.strip() for s in only.split(",") if s.strip())
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        err.print(f"[bold red]error:[/] unknown sections {', '.join(sorted(unknown))}; choose from {', '.join(SECTIONS)}")
        raise typer.Exit(2)
    from services.tools.brokers import BrokerUnavailable

    try:
        run_bench(profile="smoke" if smoke else "quick" if quick else "full", out_dir=out or RESULTS_DIR, soak=soak,
                  sections=sections, postgres_url=postgres_url, profile_hot=profile, note=note, e2e_rate=rate,
                  broker=broker.value)
    except BrokerUnavailable as exc:  # no Java or Maven for --broker kafka, a port taken
        err.print(f"[bold red]error:[/] {exc}")
        raise typer.Exit(1) from None
