"""`orderpipe dlt`: inspect, replay and purge dead letters; every replay and purge is audited.

    orderpipe dlt list                                   # counts per group and exception type
    orderpipe dlt list --group email --since 2h          # the messages, as a table (--json for scripts)
    orderpipe dlt show orders.created.email.dlt:0:17     # one message: value, headers, traceback
    orderpipe dlt replay --group email --dry-run         # what would move where
    orderpipe dlt replay --group email --yes             # back into email's retry chain only
    orderpipe dlt purge --group email --key ORDER_ID --yes
    orderpipe dlt audit

The logic lives in services/ops; this module parses options and prints.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from services.ops.errors import OpsError
from services.runtime.settings import Settings

app = typer.Typer(help="Inspect, replay and purge dead letters (every replay and purge is audited).",
                  no_args_is_help=True)
console = Console()
err = Console(stderr=True)

EXIT_INTERRUPTED = 130

Group = Annotated[str | None, typer.Option("--group", "-g", help="Consumer group, e.g. email (default: all groups).")]
RequiredGroup = Annotated[str, typer.Option("--group", "-g", help="Consumer group whose dead letters to handle.")]
Source = Annotated[str | None, typer.Option("--topic", help="Only the dead letters from this input topic, "
                                            "e.g. stock.reserved (default: all of the group's inputs).")]
Since = Annotated[str | None, typer.Option(help="Dead-lettered at or after: ISO 8601 (UTC if no zone) or a "
                                           "duration ago (30m, 2h, 7d).")]
Until = Annotated[str | None, typer.Option(help="Dead-lettered at or before (same formats as --since).")]
ExcType = Annotated[str | None, typer.Option("--exception", help="Exception type, full or its last part, "
                                             "e.g. MailRejected.")]
Key = Annotated[str | None, typer.Option("--key", "--order-id", help="Message key, i.e. the order id.")]
EventType = Annotated[str | None, typer.Option("--event-type", help="Event type, e.g. OrderCreated.")]
Limit = Annotated[int | None, typer.Option("--limit", "-n", min=1, help="At most N messages (oldest first per "
                                           "partition); run again to continue.")]
IncludeHandled = Annotated[bool, typer.Option("--include-handled", help="Also messages already replayed, parked "
                                              "or purged (skipped by default).")]
AsJson = Annotated[bool, typer.Option("--json", help="JSON for scripts (one object per line).")]
Yes = Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")]
DryRun = Annotated[bool, typer.Option("--dry-run", help="Show what would happen; change nothing.")]
Timeout = Annotated[float, typer.Option(help="Seconds to wait for the broker.")]


def fail(message: str, code: int = 1) -> None:
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


@contextmanager
def ops_errors() -> Iterator[None]:
    """User-facing problems end as one line and exit 1, never as a traceback."""
    from confluent_kafka import KafkaException

    from services.runtime.codec import RegistryRefused

    try:
        yield
    except (OpsError, RegistryRefused) as exc:
        fail(str(exc))
    except KafkaException as exc:
        reason = exc.args[0].str() if exc.args and hasattr(exc.args[0], "str") else str(exc)
        fail(f"Kafka: {reason}")


def clients(timeout: float = 10.0):
    from services.ops.audit import ops_clients

    return ops_clients(Settings(), timeout)


def _table(*columns: str, **kwargs) -> Table:
    """The first column (a REF or run id) never breaks; long values wrap instead of ending in '…'."""
    table = Table(**kwargs)
    for n, name in enumerate(columns):
        table.add_column(name, no_wrap=n == 0, overflow="fold")
    return table


def _when(dl) -> str:
    at = dl.dead_lettered_at
    return at.strftime("%Y-%m-%d %H:%M:%S") if at else "-"


def _short_type(name: str) -> str:
    return name.rsplit(".", 1)[-1]


# -- list ---------------------------------------------------------------------------------------


@app.command("list")
def list_(
    group: Group = None, topic: Source = None, since: Since = None, until: Until = None, exception: ExcType = None,
    key: Key = None, event_type: EventType = None, include_handled: IncludeHandled = False, limit: Limit = None,
    counts: Annotated[bool, typer.Option("--counts", help="Counts per group and exception type, even with "
                                         "filters.")] = False,
    as_json: AsJson = False, timeout: Timeout = 10.0,
) -> None:
    """Dead letters not yet handled: counts per group and exception type without filters, else the messages."""
    from services.ops.reprocess import collect

    from services.ops.reprocess import selection

    with ops_errors():
        sel = selection(group, topic, since, until, exception, key, event_type, include_handled, limit)
        summary = counts or (sel.filter.empty and group is None and topic is None and limit is None)
        with clients(timeout) as (kafka, audit):
            snap = collect(kafka, audit, sel)
    if summary:
        _print_counts(snap, as_json, include_handled)
    else:
        _print_messages(snap, as_json, include_handled)


def _print_counts(snap, as_json: bool, include_handled: bool) -> None:
    counts = Counter((dl.group, dl.ref.topic, dl.exception_type) for dl, _ in snap.letters)
    if as_json:
        for (g, t, exc), n in sorted(counts.items()):
            typer.echo(json.dumps({"group": g, "topic": t, "exception_type": exc, "count": n}))
        return
    what = "dead letters" if include_handled else "unhandled dead letters"
    if not counts:
        console.print(f"no {what}" + (f" ({snap.skipped_handled} handled)" if snap.skipped_handled else ""))
        return
    table = _table("group", "dead-letter topic", "exception type", "count", title=what)
    for (g, t, exc), n in sorted(counts.items()):
        table.add_row(g, t, exc, str(n))
    console.print(table)
    console.print(f"{sum(counts.values())} in total; `orderpipe dlt list --group G` lists them, "
                  f"`orderpipe dlt show REF` shows one", highlight=False)


def _print_messages(snap, as_json: bool, include_handled: bool) -> None:
    if as_json:
        for dl, handled in snap.letters:
            typer.echo(json.dumps(dl.summary(handled if include_handled else None)))
        return
    if not snap.letters:
        console.print("no matching dead letters" + ("" if include_handled else " (not yet handled)"))
        return
    # REF says the group and the topic; `--json` has every field, `dlt show REF` everything
    table = _table("REF", "dead-lettered (UTC)", "key", "attempt", "error")
    if include_handled:
        table.add_column("handled")
    for dl, handled in snap.letters:
        row = [str(dl.ref), _when(dl), dl.key_text, str(dl.attempt or "-"),
               f"{_short_type(dl.exception_type)}: {dl.exception_message[:100]}"]
        table.add_row(*row, *(["yes" if handled else "no"] if include_handled else []))
    console.print(table)
    more = " (limit reached; there may be more)" if snap.truncated else ""
    console.print(f"{len(snap.letters)} dead letter(s){more}", highlight=False)


# -- show ---------------------------------------------------------------------------------------


@app.command("show", no_args_is_help=True)
def show(
    ref: Annotated[str, typer.Argument(help="TOPIC:PARTITION:OFFSET, e.g. orders.created.email.dlt:0:17 "
                                       "(first column of `dlt list`).")],
    as_json: AsJson = False, timeout: Timeout = 10.0,
) -> None:
    """One message, decoded, with all its headers and the traceback."""
    from services.ops.broker import json_default
    from services.ops.deadletters import Ref
    from services.ops.reprocess import read_dead_letter
    from services.runtime.codec import codec_from_settings
    from services.runtime.envelope import headers_to_dict

    with ops_errors():
        where = Ref.parse(ref)
        with clients(timeout) as (kafka, audit):
            dl, dlt, handled = read_dead_letter(kafka, audit, where)
        record: dict[str, Any] = dl.summary(handled)
        if dlt is None:
            record["group"] = None
        headers = headers_to_dict(list(dl.headers))
        record["headers"] = headers
        try:
            decoded = codec_from_settings(Settings()).decode(dl.value)
            record.update(value_type=decoded.event_type, schema_id=decoded.schema_id, value=decoded.record)
        except Exception as exc:  # a dead letter often is exactly the message that does not decode
            record.update(value=None, value_error=str(exc), value_size=len(dl.value or b""),
                          value_hex=(dl.value or b"")[:64].hex())
    if as_json:
        typer.echo(json.dumps(record, default=json_default, ensure_ascii=False))
        return
    state_text = {None: "", True: ", handled", False: ", not handled"}[handled]
    console.print(f"[bold]{where}[/]  (group {record['group'] or '-'}, dead-lettered {_when(dl)} UTC{state_text})",
                  highlight=False)
    console.print(f"key: {dl.key_text}   event: {dl.event_type or '-'}   event id: {dl.event_id or '-'}",
                  highlight=False, soft_wrap=True)
    console.print(f"exception: {dl.exception_type}: {dl.exception_message}", highlight=False, soft_wrap=True)
    console.print(f"reason: {record['reason'] or '-'}   attempt: {dl.attempt or '-'}   replays: {dl.replay_count}",
                  highlight=False)
    if record.get("value") is not None:
        console.print(f"value ({record['value_type']}, schema id {record['schema_id']}):", highlight=False)
        typer.echo(json.dumps(record["value"], default=json_default, indent=2, ensure_ascii=False))
    else:
        console.print(f"value: cannot decode ({record['value_error']}); {record['value_size']} bytes, "
                      f"first 64 as hex: {record['value_hex']}", highlight=False, soft_wrap=True)
    console.print("headers:")
    for name, value in headers.items():
        if name != "x-exception-traceback":
            typer.echo(f"  {name}: {value}")
    console.print("traceback:")
    typer.echo(dl.traceback or "  (none)")


# -- replay and purge ---------------------------------------------------------------------------




def _describe_plan(plan) -> None:
    """What the plan does, before the table of items (the console's dead-letter page says the same)."""
    topics = ", ".join(t.name for t in plan.selection.targets)
    skipped = plan.left_alone()
    console.print(f"{len(plan.items)} dead letter(s) selected in {topics}"
                  + (f" (left alone: {', '.join(skipped)})" if skipped else ""), highlight=False, soft_wrap=True)
    if plan.snapshot.truncated:
        console.print("(limit reached; run again to continue)")
    for what, n, destination in plan.moves():
        console.print(f"  {what} {n} -> {destination}", highlight=False, soft_wrap=True)


def _print_items(plan) -> None:
    table = _table("REF", "key", "exception", "replays", "action", "to")
    for item in plan.items:
        dl = item.dead_letter
        table.add_row(str(dl.ref), dl.key_text, _short_type(dl.exception_type), str(dl.replay_count), item.action,
                      item.destination or "-")
    console.print(table)


def _confirm(question: str, yes: bool) -> None:
    if yes:
        return
    if not sys.stdin.isatty():
        fail("not confirmed: stdin is not a terminal; pass --yes to confirm")
    if not typer.confirm(question, default=False):
        fail("not confirmed; nothing was changed")


@contextmanager
def graceful_interrupt() -> Iterator[threading.Event]:
    """The first Ctrl-C (or SIGTERM) asks the run to stop after the batch in flight, so its
    progress is recorded; a second Ctrl-C interrupts at once."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def on_signal(signum, _frame):
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        err.print("stopping after the current batch (Ctrl-C again to stop at once)...")

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _carry_out(plan, kafka, audit, rate: float | None, *, verb: str, dry_run: bool, yes: bool,
               dry_run_note: str, question: str) -> None:
    """What replay and purge share once the plan is made: show it, stop on an empty plan or a
    dry run, ask (unless --yes), then run it."""
    _describe_plan(plan)
    if not plan.items:
        console.print(f"nothing to {verb}")
        return
    if dry_run:
        _print_items(plan)
        console.print(f"dry run: {dry_run_note}")
        return
    _confirm(question, yes)
    _run(plan, kafka, audit, rate)


def _run(plan, kafka, audit, rate: float | None) -> None:
    from services.ops.reprocess import Reprocessor

    with graceful_interrupt() as stop:
        try:
            outcome = Reprocessor(kafka, audit).execute(plan, rate=rate, stop=stop.is_set)
        except KeyboardInterrupt:
            fail("interrupted; progress up to the last acknowledged batch is recorded. "
                 "Run the same command again to continue.", EXIT_INTERRUPTED)
    run = outcome.run
    verb = "replayed" if plan.action == "replay" else "purged"
    done = run.count - run.parked
    message = f"{verb} {done}" + (f", parked {run.parked}" if run.parked else "") + \
        f" of {len(plan.items)} (run {run.run_id}; see `orderpipe dlt audit`)"
    if outcome.outcome == "interrupted":
        fail(f"interrupted: {message}. Run the same command again to continue; what is done is skipped.",
             EXIT_INTERRUPTED)
    if not outcome.ok:
        fail(f"{outcome.outcome}: {message}")
    console.print(message, highlight=False)
    _report_held_keys(plan)


def _report_held_keys(plan) -> None:
    """A dead letter may be the head a held key waits for (ordered retries): a purge releases
    the key, a replay releases it when it succeeds. Say which, from the groups' databases."""
    from services.ops.held_keys import held_behind, release_purged

    if plan.action == "purge":
        heads, problems = release_purged(Settings(), plan)
        for h in heads:
            console.print(f"{h.group}: key {h.key} released (its head was purged): its {h.waiting} waiting "
                          "event(s) run next", highlight=False)
    else:
        heads, problems = held_behind(Settings(), plan)
        for h in heads:
            console.print(f"{h.group}: key {h.key} is held behind a replayed dead letter: its {h.waiting} waiting "
                          "event(s) run once the replay succeeds", highlight=False)
    for problem in problems:
        err.print(f"[yellow]warning:[/] could not check the keys held behind these dead letters ({problem}); "
                  "see `orderpipe held list`", highlight=False, soft_wrap=True)


@app.command("replay")
def replay(
    group: RequiredGroup, topic: Source = None, since: Since = None, until: Until = None, exception: ExcType = None,
    key: Key = None, event_type: EventType = None, include_handled: IncludeHandled = False, limit: Limit = None,
    to: Annotated[str, typer.Option("--to", help="retry: the group's first retry topic, due now (only this group "
                                    "sees the messages); original: the original topic (EVERY group sees them).")]
    = "retry",
    rate: Annotated[str | None, typer.Option(help="At most this many messages per second, e.g. 50/s or 600/min.")]
    = None,
    max_replays: Annotated[int, typer.Option("--max-replays", min=0, help="A message already replayed this many "
                                             "times goes to the parking topic instead.")] = 3,
    dry_run: DryRun = False, yes: Yes = False, timeout: Timeout = 10.0,
) -> None:
    """Put dead letters back: into the group's retry chain (default) or onto the original topic."""
    from services.ops.reprocess import REPLAY_TO, collect, parse_rate, plan_replay, selection

    with ops_errors():
        if to not in REPLAY_TO:
            raise OpsError(f"--to must be one of: {', '.join(REPLAY_TO)}")
        per_second = parse_rate(rate)
        sel = selection(group, topic, since, until, exception, key, event_type, include_handled, limit)
        if to == "original":
            from services import registry
            from services.runtime import topology

            readers = sorted({g.name for g in registry.GROUPS for t in sel.targets if t.source in g.inputs}
                             | ({"order-status"} if any(t.source in topology.STATUS_INPUTS for t in sel.targets)
                                else set()))
            err.print(f"[yellow]warning:[/] --to original puts the messages back on "
                      f"{', '.join(sorted({t.source for t in sel.targets}))}: every group reading it "
                      f"({', '.join(readers)}) sees them again. Groups that already handled an event skip it "
                      f"by its event id.", highlight=False, soft_wrap=True)
        with clients(timeout) as (kafka, audit):
            plan = plan_replay(collect(kafka, audit, sel), sel, to=to, max_replays=max_replays)
            _carry_out(plan, kafka, audit, per_second, verb="replay", dry_run=dry_run, yes=yes,
                       dry_run_note="nothing was sent, nothing recorded",
                       question=f"Replay {len(plan.items)} dead letter(s)?")


@app.command("purge")
def purge(
    group: RequiredGroup, topic: Source = None, since: Since = None, until: Until = None, exception: ExcType = None,
    key: Key = None, event_type: EventType = None, limit: Limit = None, dry_run: DryRun = False, yes: Yes = False,
    timeout: Timeout = 10.0,
) -> None:
    """Mark the selected dead letters handled without replaying them; nothing else is touched."""
    from services.ops.reprocess import collect, plan_purge

    from services.ops.reprocess import selection

    with ops_errors():
        sel = selection(group, topic, since, until, exception, key, event_type, False, limit)
        with clients(timeout) as (kafka, audit):
            plan = plan_purge(collect(kafka, audit, sel), sel)
            _carry_out(plan, kafka, audit, None, verb="purge", dry_run=dry_run, yes=yes,
                       dry_run_note="nothing was changed, nothing recorded",
                       question=f"Purge {len(plan.items)} dead letter(s)? They will not be replayed.")


# -- audit --------------------------------------------------------------------------------------


@app.command("audit")
def audit_(
    as_json: AsJson = False,
    every: Annotated[bool, typer.Option("--all", help="Every record (started, each batch, final), not one line "
                                        "per run.")] = False,
    limit: Annotated[int | None, typer.Option("--limit", "-n", min=1, help="Only the last N.")] = None,
    timeout: Timeout = 10.0,
) -> None:
    """Every replay and purge (and cancel from the console): who, when, host, selection, count, first and last offsets, outcome."""
    from services.ops.audit import runs

    with ops_errors():
        with clients(timeout) as (_, audit):
            records = audit.read()
    shown = records if every else runs(records)
    if limit:
        shown = shown[-limit:]
    if as_json:
        for record in shown:
            typer.echo(json.dumps(record))
        return
    if not shown:
        console.print("no replays or purges recorded yet")
        return
    table = _table("run", "action", "outcome", "who", "started (UTC)", "count", "first .. last", "selection")
    table.columns[0].min_width = 12  # run ids are what people copy from here
    for r in shown:
        sel = r.get("selection", {})
        what = ", ".join(sel.get("topics", [])) + "".join(f" {k}={v}" for k, v in sel.get("filter", {}).items())
        if sel.get("to"):
            what += f" to={sel['to']}"
        count = f"{r.get('count', 0)}" + (f" ({r['parked']} parked)" if r.get("parked") else "")
        table.add_row(r.get("run_id", "?"), r.get("action", "?"), r.get("outcome", "?"),
                      f"{r.get('user')}@{r.get('host')}", str(r.get("started_at", ""))[:19].replace("T", " "),
                      count, f"{r.get('first') or '-'} .. {r.get('last') or '-'}", what)
    console.print(table)
