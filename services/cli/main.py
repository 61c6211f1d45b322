"""`orderpipe`: run, demo and operate the pipeline.

User mistakes (unreachable broker, stale data folder, unknown order) end with one clear line
and a non-zero exit code, never a traceback.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from services.cli import (
    bench_cmd, console_cmd, db_cmd, deploy_cmd, dlt_cmd, held_cmd, ops_cmd, orders_cmd, schemas_cmd, stock_cmd, tail_cmd,
    workers_cmd,
)
from services.tools.brokers import BROKER_KINDS
from services.runtime.settings import InvalidSettings, Settings, checked_settings, invalid_settings, settings_model

app = typer.Typer(help="orderpipe: a Kafka-based, event-sourced order processing pipeline.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
topics_app = typer.Typer(help="Create and inspect the declared topics.", no_args_is_help=True)
app.add_typer(topics_app, name="topics")
app.add_typer(schemas_cmd.app, name="schemas")
app.add_typer(db_cmd.app, name="db")
app.add_typer(deploy_cmd.app, name="deploy")  # `orderpipe deploy topics|scaling`
app.add_typer(tail_cmd.app)  # `orderpipe tail TOPIC`
app.add_typer(dlt_cmd.app, name="dlt")  # `orderpipe dlt list|show|replay|purge|audit`
app.add_typer(ops_cmd.app)  # `orderpipe lag`
app.add_typer(orders_cmd.app, name="orders")  # `orderpipe orders list --state FAILED --since 1h`
app.add_typer(held_cmd.app, name="held")  # `orderpipe held list`, `orderpipe held release --group G --key K`
app.add_typer(workers_cmd.app)  # `orderpipe workers`, `orderpipe alerts`
app.add_typer(console_cmd.app, name="console")  # `orderpipe console hash-password --name ada --role operator`
app.add_typer(stock_cmd.app, name="stock")  # `orderpipe stock add SKU-009 500 --reason 'delivery 4711'`
app.add_typer(bench_cmd.app)  # `orderpipe bench`
topics_app.command("describe")(ops_cmd.topics_describe)
console = Console()
err = Console(stderr=True, soft_wrap=True)  # an error stays one line, however long

def fail(message: str, code: int = 1) -> None:
    err.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code)


# the kinds declared once, in services/tools/brokers (typer wants an Enum for its choices)
BrokerKind = Enum("BrokerKind", {kind: kind for kind in BROKER_KINDS}, type=str)


BrokerOption = Annotated[BrokerKind, typer.Option(
    "--broker", envvar="ORDERPIPE_BROKER", case_sensitive=False,
    help="Local broker to start when KAFKA_BOOTSTRAP_SERVERS is unset: embedded (Tansu, in memory, needs only "
         "Python) or kafka (Apache Kafka in <data-dir>/kafka, durable; needs Java 17+ and Maven).")]
DataDir = Annotated[Path, typer.Option("--data-dir", help="Folder for the SQLite databases, invoices, mail and logs.",
                                       envvar="ORDERPIPE_DATA_DIR")]


# -- running the pipeline ---------------------------------------------------------------------

@app.command()
def up(
    data_dir: DataDir = Path(".data"),
    broker: BrokerOption = BrokerKind.embedded,
    fresh: Annotated[bool, typer.Option(help="Delete the data folder first (required after an embedded run).")] = False,
    api_port: Annotated[int, typer.Option(help="Port of the orders HTTP API.", envvar="ORDERPIPE_API_PORT")] = 8000,
    status_port: Annotated[int, typer.Option(help="Port of the order-status view (Faust web).")] = 6066,
    console_port: Annotated[int, typer.Option(help="Port of the ops web console.",
                                              envvar="ORDERPIPE_CONSOLE_PORT")] = 8010,
) -> None:
    """Start the whole pipeline (a local broker unless KAFKA_BOOTSTRAP_SERVERS is set) until Ctrl-C.

    With --broker kafka, stopping and starting again on the same --data-dir continues where it
    left off: orders accepted and not yet finished complete after the restart."""
    from services.pipeline.stack import Stack

    stack = Stack(_settings_of_every_service(), data_dir=data_dir, broker=broker.value, fresh=fresh, api_port=api_port,
                  status_port=status_port, console_port=console_port, progress=_progress)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    # Ctrl-C stops everything gracefully, also when `up` was started with SIGINT ignored (a
    # shell's background job): Python then installs no KeyboardInterrupt handler of its own.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with console.status("starting broker, topics and services..."):
            info = _start_stack(stack)
        _print_stack(info)
        console.print("[green]pipeline is running[/]; press Ctrl-C to stop")
        while not stop.is_set():
            for name in stack.supervisor.poll():
                err.print(f"[red]{name} keeps crashing and was given up on; see {info.log_dir / (name + '.log')}[/]")
                stop.set()
            stop.wait(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        console.print("stopping...")
        stack.stop()
        console.print("stopped")


def _settings_of_every_service() -> Settings:
    """Settings, every service's own checked too: `up` and `demo` start them all."""
    from services import registry

    return checked_settings(s.settings for s in registry.SERVICES)


def _progress(line: str) -> None:
    console.log(line)


def _start_stack(stack):
    from services.pipeline.stack import StackError
    from services.tools.brokers import BrokerUnavailable

    try:
        return stack.start()
    except (StackError, BrokerUnavailable) as exc:
        fail(str(exc))


def _print_stack(info) -> None:
    table = Table(title="orderpipe", show_header=False)
    what = {"embedded": "embedded Tansu, in memory", "kafka": f"local Apache Kafka, logs in {info.data_dir / 'kafka'}",
            "external": "external"}[info.broker]
    table.add_row("broker", f"{info.bootstrap_servers} ({what}, cluster {info.cluster_id})")
    table.add_row("orders API", f"{info.api_url}  (POST /orders, GET /orders/{{id}}, /docs)")
    table.add_row("order-status view", f"{info.status_url}/status/{{id}}/")
    table.add_row("ops console", info.console_url)
    if info.console_login:
        table.add_row("ops console login", f"{info.console_login[0]}, password {info.console_login[1]} (made for "
                                           "this run; ORDERPIPE_CONSOLE_USERS chooses the users)")
    if info.smtp:
        table.add_row("SMTP sink", f"{info.smtp}, mail stored in {info.maildir}")
    table.add_row("health, metrics", ", ".join(f"{n} {url}" for n, url in info.health.items())
                  + "  (/healthz, /readyz, /metrics; orders-api and order-status on their own ports)")
    table.add_row("data folder", str(info.data_dir))
    table.add_row("logs", str(info.log_dir))
    table.add_row("processes", ", ".join(f"{n} ({pid})" for n, pid in info.processes.items()))
    console.print(table)


@app.command()
def demo(
    orders: Annotated[int, typer.Option("--orders", "-n", min=1, help="How many sample orders to place.")] = 100,
    data_dir: DataDir = Path(".data/demo"),
    broker: BrokerOption = BrokerKind.embedded,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for every order to finish.")] = 120.0,
    seed: Annotated[int, typer.Option(help="Random seed for the sample orders.")] = 7,
    fail_rate: Annotated[float, typer.Option(
        min=0.0, max=1.0, help="Share of e-mail sends that fail transiently (retried); with it, one order in 25 "
                               "has an address the SMTP server refuses (dead-lettered).")] = 0.0,
    cancel_share: Annotated[float, typer.Option(
        min=0.0, max=1.0, help="Share of orders cancelled at a random moment within 3 s of being placed "
                               "(POST /orders/{id}/cancel); each must end CANCELLED with every step compensated.")] = 0.1,
) -> None:
    """Start the pipeline on a fresh data folder, place sample orders, and check every outcome."""
    from services.pipeline.demo import demo_env, run_demo
    from services.pipeline.stack import Stack

    stack = Stack(_settings_of_every_service(), data_dir=data_dir, broker=broker.value, fresh=True,
                  extra_env=demo_env(fail_rate),
                  progress=_progress)
    try:
        with console.status("starting broker, topics and services..."):
            info = _start_stack(stack)
        _print_stack(info)
        ok = run_demo(info, orders=orders, timeout=timeout, seed=seed, console=console, fail_rate=fail_rate,
                      cancel_share=cancel_share)
    finally:
        stack.stop()
    raise typer.Exit(0 if ok else 1)


@app.command()
def run(process: Annotated[str, typer.Argument(
        help="A process a service declares, e.g. orders-api, orders-relay or a consumer service such as "
             "inventory (an unknown name lists them all).", metavar="PROCESS")]) -> None:
    """Run one service process in the foreground (what `up` supervises; use it to run your own).
    The process builds itself from the environment's settings (its composition root is
    `run` of its Process in services/<service>/service.py)."""
    from services import registry
    from services.runtime.codec import RegistryRefused
    from services.runtime.errors import Misconfigured
    from services.runtime.logs import setup_logging

    known = registry.processes()
    if process == "ops-console":  # no service's: the operators' web console (services/console)
        from services.console.process import main as run_console

        run_console()
        return
    if process not in known:
        fail(f"unknown service {process!r}; choose one of: {', '.join([*known, 'ops-console'])}")
    settings = checked_settings([registry.service_of(process).settings])
    setup_logging(process, settings.log_level, settings.log_json)
    if not settings.kafka_bootstrap_servers:
        fail("KAFKA_BOOTSTRAP_SERVERS is not set: start everything with `orderpipe up`, or export it")
    try:
        known[process].run(settings)
    except (Misconfigured, RegistryRefused) as exc:
        fail(str(exc))


# -- operating it -----------------------------------------------------------------------------

@app.command()
def status(
    order_id: Annotated[str, typer.Argument(help="The order id returned by POST /orders.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the raw JSON.")] = False,
) -> None:
    """Show where an order is: its overall state and every step."""
    from services.orders.api import StatusClient, StatusUnavailable

    settings = Settings()
    try:
        view = StatusClient(settings.status_url).get(order_id)
    except StatusUnavailable as exc:
        fail(f"{exc} (set ORDERPIPE_STATUS_URL to the order-status view, e.g. http://127.0.0.1:6066)")
    if view is None:
        fail(f"order {order_id} is unknown to the order-status view (not placed, or not yet processed)", 2)
    if as_json:
        console.print_json(json.dumps(view))
        return
    table = Table(title=f"order {order_id}: {view['state']}" + (f" ({view['reason']})" if view.get("reason") else ""))
    steps = view.get("steps", {})
    cancelled = any(s.get("compensation") for s in steps.values())  # then each step says what it undid
    for column in ("step", "state", "attempts", "detail", "last error", "updated",
                   *(("compensation", "what it undid") if cancelled else ())):
        table.add_column(column)
    for step, s in steps.items():
        undone = (s.get("compensation") or "", s.get("compensation_detail") or "") if cancelled else ()
        table.add_row(step, s.get("state", ""), str(s.get("attempts", 0)), s.get("detail") or "",
                      s.get("last_error") or "", s.get("updated_at") or "", *undone)
    console.print(table)


@topics_app.command("create")
def topics_create() -> None:
    """Create every declared topic (idempotent: existing topics are left alone)."""
    from services import registry
    from services.runtime.admin import ensure_topics
    from services.tools.brokers import BrokerUnavailable, wait_for_broker

    settings = Settings()
    if not settings.kafka_bootstrap_servers:
        fail("KAFKA_BOOTSTRAP_SERVERS is not set; export it (host:port of your Kafka cluster)")
    try:
        wait_for_broker(settings.kafka_bootstrap_servers, timeout=10, client_config=settings.extra_client_config)
    except BrokerUnavailable as exc:
        fail(str(exc))
    results = ensure_topics({"bootstrap.servers": settings.kafka_bootstrap_servers, **settings.extra_client_config},
                            registry.all_topics())
    for r in results:
        console.print(f"{'created' if r.created else 'exists '}  {r.name}")
    console.print(f"{sum(r.created for r in results)} created, {sum(not r.created for r in results)} already existed")


@topics_app.command("list")
def topics_list() -> None:
    """List the declared topics with partitions, cleanup policy and writer."""
    from services import registry

    table = Table("topic", "partitions", "cleanup", "retention (days)", "written by")
    for t in registry.all_topics():
        days = "" if t.cleanup_policy == "compact" else f"{t.retention_ms / 86_400_000:g}"
        table.add_row(t.name, str(t.partitions), t.cleanup_policy, days, t.writer)
    console.print(table)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
    except (ValidationError, InvalidSettings) as error:
        if isinstance(error, ValidationError) and settings_model(error) is None:
            raise  # not the operator's settings: a bug, keep its trace
        for line in error.lines if isinstance(error, InvalidSettings) else invalid_settings(error):
            print(f"orderpipe: {line}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
