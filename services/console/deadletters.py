"""The console's dead-letter pages and the audit log, read and carried out through the same code
as `orderpipe dlt` (services/ops/reprocess.py, deadletters.py, audit.py, held_keys.py):

- GET  /dead-letters            the filters of `dlt list`; counts per group and exception type
                                without filters, else the messages (each REF links to its page);
- GET  /dead-letters/{ref}      one message as `dlt show` reads it: headers, exception, traceback,
                                the decoded value;
- POST /dead-letters/preview    (operators) the dry run of a replay or purge of the selection, and
                                a confirmation form repeating it;
- POST /dead-letters/run        (operators, confirm=yes) the run, at the rate asked, recorded in the
                                audit topic with the console user's name (source "console");
- GET  /audit                   the audit log as `dlt audit` shows it, newest first.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import quote, urlencode

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse
from starlette.concurrency import run_in_threadpool

from services.console import html
from services.ops.errors import OpsError

log = logging.getLogger("orderpipe.console")

# The filters of `orderpipe dlt list` (form field = CLI option without the dashes).
FILTERS = ("group", "topic", "since", "until", "exception", "key", "event_type", "include_handled", "limit")
LABELS = {"group": "Group", "topic": "Input topic", "since": "Since", "until": "Until", "exception": "Exception type",
          "key": "Key (order id)", "event_type": "Event type", "include_handled": "Include handled",
          "limit": "Limit"}
HINTS = {"topic": "e.g. stock.reserved", "since": "ISO 8601 or 30m, 2h, 7d", "until": "ISO 8601 or 30m, 2h, 7d",
         "exception": "e.g. MailRejected", "event_type": "e.g. OrderCreated"}


class Refused(Exception):
    """A mistake in what was asked (a filter, a REF, a rate): one line, status 400."""


def problem_of(exc: BaseException) -> str | None:
    """The one line `orderpipe dlt` prints for a user-facing problem (dlt_cmd.ops_errors), or None."""
    from confluent_kafka import KafkaException

    from services.runtime.codec import RegistryRefused

    if isinstance(exc, (OpsError, RegistryRefused, Refused)):
        return str(exc)
    if isinstance(exc, KafkaException):
        reason = exc.args[0].str() if exc.args and hasattr(exc.args[0], "str") else str(exc)
        return f"Kafka: {reason}"
    return None


def filters_of(params: Mapping[str, str]) -> dict[str, str]:
    """The filters set in a query or form, trimmed; empty ones left out."""
    out = {name: str(params.get(name, "")).strip() for name in FILTERS}
    out = {k: v for k, v in out.items() if v}
    if "include_handled" in out:
        out["include_handled"] = "1" if out["include_handled"].lower() in ("1", "on", "yes", "true") else ""
    return {k: v for k, v in out.items() if v}


def _int(text: str | None, name: str, minimum: int) -> int | None:
    if text is None or text == "":
        return None
    try:
        value = int(text)
    except ValueError:
        raise Refused(f"bad {name} {text!r}: a whole number, at least {minimum}") from None
    if value < minimum:
        raise Refused(f"bad {name} {text!r}: a whole number, at least {minimum}")
    return value


def selection_of(f: Mapping[str, str], include_handled: bool | None = None):
    """`reprocess.selection` from the form, exactly as `orderpipe dlt` builds it from its options."""
    from services.ops.reprocess import selection

    return selection(f.get("group"), f.get("topic"), f.get("since"), f.get("until"), f.get("exception"),
                     f.get("key"), f.get("event_type"),
                     bool(f.get("include_handled")) if include_handled is None else include_handled,
                     _int(f.get("limit"), "limit", 1))


def _short_type(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def _when(dl) -> str:
    at = dl.dead_lettered_at
    return at.strftime("%Y-%m-%d %H:%M:%S") if at else "-"


def ref_link(ref) -> html.Markup:
    return html.link("/dead-letters/" + quote(str(ref), safe=":"), str(ref))


def _hidden(values: Mapping[str, object]) -> str:
    return "".join(f'<input type="hidden" name="{html.attr(k)}" value="{html.attr(v)}">'
                   for k, v in values.items() if v not in (None, ""))


# -- rendering ---------------------------------------------------------------------------------


def filter_form(f: Mapping[str, str]) -> str:
    from services import registry

    groups = "".join(f'<option value="{html.attr(g.name)}"{" selected" if f.get("group") == g.name else ""}>'
                     f'{html.escape(g.name)}</option>' for g in registry.GROUPS)
    fields = [f'<label>{LABELS["group"]} <select name="group"><option value="">all groups</option>{groups}'
              f'</select></label>']
    for name in ("topic", "since", "until", "exception", "key", "event_type"):
        fields.append(f'<label>{LABELS[name]} <input name="{name}" value="{html.attr(f.get(name, ""))}" '
                      f'placeholder="{html.attr(HINTS.get(name, ""))}"></label>')
    fields.append(f'<label>{LABELS["limit"]} <input name="limit" type="number" min="1" size="6" '
                  f'value="{html.attr(f.get("limit", ""))}"></label>')
    fields.append(f'<label><input type="checkbox" name="include_handled" value="1"'
                  f'{" checked" if f.get("include_handled") else ""}> {LABELS["include_handled"]}</label>')
    return ('<form method="get" action="/dead-letters" class="filters"><p>' + " ".join(fields)
            + ' <button>Show</button> <a href="/dead-letters">clear</a></p></form>')


def counts_view(snap, include_handled: bool) -> str:
    from collections import Counter

    counts = Counter((dl.group, dl.ref.topic, dl.exception_type) for dl, _ in snap.letters)
    what = "dead letters" if include_handled else "unhandled dead letters"
    if not counts:
        return f"<p>no {html.escape(what)}" + (f" ({snap.skipped_handled} handled)" if snap.skipped_handled else "") \
            + "</p>"
    rows = [(html.link("/dead-letters?" + urlencode({"group": g, "exception": exc}), g), t, exc, n)
            for (g, t, exc), n in sorted(counts.items())]
    return (f"<h2>{html.escape(what.capitalize())}</h2>"
            + html.table(("group", "dead-letter topic", "exception type", "count"), rows, numeric=(3,))
            + f"<p>{sum(counts.values())} in total; pick a group (or a row) to list them.</p>")


def messages_view(snap, include_handled: bool) -> str:
    if not snap.letters:
        return "<p>no matching dead letters" + ("" if include_handled else " (not yet handled)") + "</p>"
    headers = ["REF", "group", "topic", "dead-lettered (UTC)", "key", "event type", "attempt", "exception"]
    if include_handled:
        headers.append("handled")
    rows = []
    for dl, handled in snap.letters:
        row = [ref_link(dl.ref), dl.group, dl.source, _when(dl), dl.key_text, dl.event_type or "-",
               dl.attempt or "-", f"{_short_type(dl.exception_type)}: {dl.exception_message[:100]}"]
        rows.append(row + (["yes" if handled else "no"] if include_handled else []))
    more = " (limit reached; there may be more)" if snap.truncated else ""
    return html.table(headers, rows) + f"<p>{len(snap.letters)} dead letter(s){html.escape(more)}</p>"


def action_form(f: Mapping[str, str], session) -> str:
    """Replay or purge of the current selection: first the dry run (operators only)."""
    if not session.user.may_change:
        return "<p>Only operators replay or purge dead letters.</p>"
    if not f.get("group"):
        return "<p>To replay or purge, pick a group first (as `orderpipe dlt replay --group`).</p>"
    return f"""<h2>Replay or purge this selection</h2>
<form method="post" action="/dead-letters/preview">{html.csrf_field(session)}{_hidden(f)}
<p><label>Action <select name="action"><option value="replay">replay</option><option value="purge">purge</option>
</select></label>
<label>Replay to <select name="to"><option value="retry">retry: the group's first retry topic (only this group)
</option><option value="original">original: the original topic (EVERY group sees them)</option></select></label>
<label>Rate <input name="rate" size="8" placeholder="50/s, 600/min"></label>
<label>Max replays <input name="max_replays" type="number" min="0" size="4" value="3"></label>
<button>Preview (dry run)</button></p></form>"""


def plan_digest(plan) -> str:
    """What the confirmation is for: the run refuses a plan that differs from the preview's."""
    # sorted: partitions are read concurrently, so the order of the items differs between reads
    text = "\n".join(sorted(f"{i.dead_letter.ref} {i.action} {i.destination}" for i in plan.items))
    return hashlib.sha256(f"{plan.action}\n{text}".encode()).hexdigest()[:20]


def describe_plan(plan) -> str:
    """What `dlt replay/purge --dry-run` prints (dlt_cmd._describe_plan and _print_items)."""
    topics = ", ".join(t.name for t in plan.selection.targets)
    skipped = plan.left_alone()
    out = [f"<p>{len(plan.items)} dead letter(s) selected in {html.escape(topics)}"
           + (f" (left alone: {html.escape(', '.join(skipped))})" if skipped else "") + "</p>"]
    if plan.snapshot.truncated:
        out.append("<p>(limit reached; run again to continue)</p>")
    moves = [f"<li>{html.escape(what)} {n} → {html.escape(destination)}</li>" for what, n, destination in plan.moves()]
    if moves:
        out.append("<ul>" + "".join(moves) + "</ul>")
    rows = [(ref_link(i.dead_letter.ref), i.dead_letter.key_text, _short_type(i.dead_letter.exception_type),
             i.dead_letter.replay_count, i.action, i.destination or "-") for i in plan.items]
    if rows:
        out.append(html.table(("REF", "key", "exception", "replays", "action", "to"), rows, numeric=(3,)))
    return "".join(out)


def held_keys_view(heads, problems, plan, *, done: bool) -> str:
    """dlt_cmd._report_held_keys: which held keys a purge releases, or a replay leaves waiting."""
    lines = []
    for h in heads:
        if plan.action == "purge":
            verb = "released" if done else "would be released"
            lines.append(f"{h.group}: key {h.key} {verb} (its head {'was' if done else 'is'} purged): its "
                         f"{h.waiting} waiting event(s) run next")
        else:
            lines.append(f"{h.group}: key {h.key} is held behind a replayed dead letter: its {h.waiting} waiting "
                         "event(s) run once the replay succeeds")
    out = "".join(f"<p>{html.escape(line)}</p>" for line in lines)
    for p in problems:
        out += html.problem(f"could not check the keys held behind these dead letters ({p}); "
                            "see `orderpipe held list`")
    return out


def original_warning(sel) -> str:
    """What `dlt replay --to original` warns on stderr."""
    from services import registry
    from services.runtime import topology

    readers = sorted({g.name for g in registry.GROUPS for t in sel.targets if t.source in g.inputs}
                     | ({"order-status"} if any(t.source in topology.STATUS_INPUTS for t in sel.targets) else set()))
    return html.problem(f"warning: replay to original puts the messages back on "
                        f"{', '.join(sorted({t.source for t in sel.targets}))}: every group reading it "
                        f"({', '.join(readers)}) sees them again. Groups that already handled an event skip it "
                        f"by its event id.")


# -- the pages ---------------------------------------------------------------------------------


def register(app: FastAPI, ctx) -> None:
    def page(title: str, body: str, session, status: int = 200, here: str = "/dead-letters") -> HTMLResponse:
        return HTMLResponse(html.page(title, body, session, here=here), status_code=status)

    def read(work: Callable[[Any, Any], Any]) -> Any:
        with ctx.kafka_clients() as (kafka, audit):
            return work(kafka, audit)

    @app.get("/dead-letters", response_class=HTMLResponse)
    def dead_letters(request: Request) -> HTMLResponse:
        from services.ops.reprocess import collect

        session = ctx.session_of(request)
        f = filters_of(request.query_params)
        form = filter_form(f)
        try:
            sel = selection_of(f)
        except Exception as exc:
            if (text := problem_of(exc)) is None:
                raise
            return page("Dead letters", html.problem(text) + form, session, 400)
        summary = sel.filter.empty and not f.get("group") and not f.get("topic") and sel.limit is None
        try:
            snap = read(lambda kafka, audit: collect(kafka, audit, sel))
        except Exception as exc:
            if (text := problem_of(exc)) is None:
                raise
            return page("Dead letters", form + html.problem(text), session, 503)
        view = counts_view(snap, sel.include_handled) if summary else messages_view(snap, sel.include_handled)
        return page("Dead letters", form + view + ("" if summary else action_form(f, session)), session)

    @app.get("/dead-letters/{ref}", response_class=HTMLResponse)
    def dead_letter(request: Request, ref: str) -> HTMLResponse:
        from services.ops.broker import json_default
        from services.ops.deadletters import Ref
        from services.ops.reprocess import read_dead_letter
        from services.runtime.codec import codec_from_settings
        from services.runtime.envelope import headers_to_dict

        session = ctx.session_of(request)
        try:
            where = Ref.parse(ref)
            dl, dlt, handled = read(lambda kafka, audit: read_dead_letter(kafka, audit, where))
        except Exception as exc:
            if (text := problem_of(exc)) is None:
                raise
            return page("Dead letter", html.problem(text), session, 400 if isinstance(exc, OpsError) else 503)
        try:
            decoded = codec_from_settings(ctx.settings).decode(dl.value)
            text = json.dumps(decoded.record, default=json_default, indent=2, ensure_ascii=False)
            value = (f"<h2>Value ({html.escape(decoded.event_type)}, schema id {html.escape(decoded.schema_id)})</h2>"
                     f"<pre>{html.escape(text)}</pre>")
        except Exception as exc:  # a dead letter often is exactly the message that does not decode
            value = (f"<h2>Value</h2><p>cannot decode ({html.escape(exc)}); {len(dl.value or b'')} bytes, "
                     f"first 64 as hex: <code>{html.escape((dl.value or b'')[:64].hex())}</code></p>")
        state = {None: "unknown", True: "handled", False: "not handled"}[handled]
        facts = html.table(("group", "dead-lettered (UTC)", "key", "event type", "event id", "attempt", "replays",
                            "reason", "state"),
                           [(dlt.group.name if dlt else "-", _when(dl), dl.key_text, dl.event_type or "-",
                             dl.event_id or "-", dl.attempt or "-", dl.replay_count, dl.header("x-reason") or "-",
                             state)])
        headers = headers_to_dict(list(dl.headers))
        rows = [(k, v) for k, v in headers.items() if k != "x-exception-traceback"]
        body = (facts
                + f"<h2>Exception</h2><p><strong>{html.escape(dl.exception_type)}</strong>: "
                  f"{html.escape(dl.exception_message)}</p>"
                + f"<h2>Traceback</h2><pre>{html.escape(dl.traceback or '(none)')}</pre>"
                + value
                + "<h2>Headers</h2>" + html.table(("header", "value"), rows, empty="no headers"))
        if dlt is not None:
            body += "<p>" + html.link("/dead-letters?" + urlencode({"group": dlt.group.name, "key": dl.key_text}),
                                      "this key's dead letters (to replay or purge)") + "</p>"
        return page(str(where), body, session)

    def plan_of(f: Mapping[str, str], form: Mapping[str, str], kafka, audit):
        """The plan `dlt replay` or `dlt purge` makes from the same options."""
        from services.ops.reprocess import parse_rate
        from services.ops.reprocess import REPLAY_TO, collect, plan_purge, plan_replay

        action = form.get("action", "")
        if action not in ("replay", "purge"):
            raise Refused("action must be replay or purge")
        if not f.get("group"):
            raise Refused("pick a group: replay and purge work on one group's dead letters")
        if action == "purge":
            sel = selection_of(f, include_handled=False)
            return plan_purge(collect(kafka, audit, sel), sel), sel, None
        to = form.get("to") or "retry"
        if to not in REPLAY_TO:
            raise Refused(f"to must be one of: {', '.join(REPLAY_TO)}")
        rate = parse_rate(form.get("rate") or None)
        max_replays = _int(form.get("max_replays") or "3", "max replays", 0)
        sel = selection_of(f)
        return plan_replay(collect(kafka, audit, sel), sel, to=to, max_replays=max_replays), sel, rate

    def options_of(form: Mapping[str, str], plan, sel) -> dict[str, str]:
        """The selection and options, as the confirmation repeats them: times made absolute, so
        `since=2h` means the same two hours at the run as at the preview."""
        f = filters_of(form)
        if sel.filter.since:
            f["since"] = sel.filter.since.isoformat()
        if sel.filter.until:
            f["until"] = sel.filter.until.isoformat()
        f["action"] = plan.action
        if plan.action == "replay":
            f.update(to=plan.options["to"], max_replays=str(plan.options["max_replays"]),
                     rate=(form.get("rate") or "").strip())
        return f

    def preview_body(session, form, plan, sel, rate) -> str:
        from services.ops.held_keys import held_heads

        body = f"<h2>Dry run: {html.escape(plan.action)}</h2>"
        if plan.action == "replay" and plan.options["to"] == "original":
            body += original_warning(sel)
        body += describe_plan(plan)
        if not plan.items:
            return body + f"<p>nothing to {html.escape(plan.action)}</p>"
        body += held_keys_view(*held_heads(ctx.settings, plan), plan, done=False)
        note = ("nothing was sent, nothing recorded" if plan.action == "replay"
                else "nothing was changed, nothing recorded")
        body += f"<p>dry run: {note}.</p>"
        question = (f"Replay {len(plan.items)} dead letter(s)" + (f" at {rate:g} per second" if rate else "") + "?"
                    if plan.action == "replay"
                    else f"Purge {len(plan.items)} dead letter(s)? They will not be replayed.")
        return body + f"""<h2>Confirm</h2>
<form method="post" action="/dead-letters/run">{html.csrf_field(session)}{_hidden(options_of(form, plan, sel))}
<input type="hidden" name="plan" value="{html.attr(plan_digest(plan))}">
<p><label><input type="checkbox" name="confirm" value="yes" required> {html.escape(question)}</label></p>
<p><button>{html.escape(plan.action.capitalize())} {len(plan.items)} dead letter(s)</button>
<a href="/dead-letters?{html.attr(urlencode(filters_of(form)))}">cancel</a></p></form>"""

    @app.post("/dead-letters/preview", response_class=HTMLResponse)
    async def preview(request: Request) -> HTMLResponse:
        session = ctx.session_of(request)
        form = await ctx.change_form(request, session)

        def work() -> str:
            with ctx.kafka_clients() as (kafka, audit):
                plan, sel, rate = plan_of(filters_of(form), form, kafka, audit)
                return preview_body(session, form, plan, sel, rate)

        try:
            body = await run_in_threadpool(work)
        except Exception as exc:
            if (text := problem_of(exc)) is None:
                raise
            return page("Replay or purge", html.problem(text), session, 400)
        return page("Replay or purge", body, session)

    @app.post("/dead-letters/run", response_class=HTMLResponse)
    async def run(request: Request) -> HTMLResponse:
        session = ctx.session_of(request)
        form = await ctx.change_form(request, session)
        if form.get("confirm") != "yes":
            return page("Replay or purge", html.problem("not confirmed; nothing was changed"), session, 400)

        def work() -> tuple[int, str]:
            from services.ops.held_keys import held_behind, release_purged
            from services.ops.reprocess import Reprocessor

            with ctx.kafka_clients() as (kafka, audit):
                plan, sel, rate = plan_of(filters_of(form), form, kafka, audit)
                if plan_digest(plan) != form.get("plan"):
                    return 409, (html.problem("the selection changed since the preview; nothing was changed. "
                                              "Check the new preview and confirm again.")
                                 + preview_body(session, form, plan, sel, rate))
                if not plan.items:
                    return 200, f"<p>nothing to {html.escape(plan.action)}</p>"
                log.info("console %s", plan.action, extra={"user": session.user.name, "count": len(plan.items)})
                outcome = Reprocessor(kafka, audit, user=session.user.name, source="console").execute(plan, rate=rate)
            r = outcome.run
            verb = "replayed" if plan.action == "replay" else "purged"
            message = (f"{verb} {r.count - r.parked}" + (f", parked {r.parked}" if r.parked else "")
                       + f" of {len(plan.items)} (run {r.run_id}, recorded in the audit log as {r.user})")
            if not outcome.ok:
                return 502, html.problem(f"{outcome.outcome}: {message}")
            report = release_purged if plan.action == "purge" else held_behind
            return 200, (f'<p class="ok">{html.escape(message)}</p>'
                         + held_keys_view(*report(ctx.settings, plan), plan, done=True)
                         + "<p>" + html.link("/audit", "Audit log") + " · "
                         + html.link("/dead-letters?" + urlencode({"group": form.get("group", "")}), "Dead letters")
                         + "</p>")

        try:
            status, body = await run_in_threadpool(work)
        except Exception as exc:
            if (text := problem_of(exc)) is None:
                raise
            return page("Replay or purge", html.problem(text), session, 400 if isinstance(exc, Refused) else 502)
        return page("Replay or purge", body, session, status)

    @app.get("/audit", response_class=HTMLResponse)
    def audit_log(request: Request, all: bool = False, limit: str = "") -> HTMLResponse:
        from services.ops.audit import runs

        session = ctx.session_of(request)
        try:
            n = _int(limit.strip() or None, "limit", 1)
            records = read(lambda _, audit: audit.read())
        except Exception as exc:
            if (text := problem_of(exc)) is None:
                raise
            return page("Audit log", html.problem(text), session, 400 if isinstance(exc, Refused) else 503, "/audit")
        shown = records if all else runs(records)
        if n:
            shown = shown[-n:]
        rows = []
        for r in reversed(shown):  # newest first
            sel = r.get("selection", {})
            what = ", ".join(sel.get("topics", [])) + "".join(f" {k}={v}" for k, v in sel.get("filter", {}).items())
            if sel.get("to"):
                what += f" to={sel['to']}"
            if sel.get("rate_per_s"):
                what += f" rate={sel['rate_per_s']:g}/s"
            count = f"{r.get('count', 0)}" + (f" ({r['parked']} parked)" if r.get("parked") else "")
            outcome = str(r.get("outcome", "?"))
            rows.append((r.get("run_id", "?"), r.get("action", "?"),
                         html.Markup(f'<span class="{"ok" if outcome == "completed" else "bad"}">'
                                     f'{html.escape(outcome)}</span>'),
                         f"{r.get('user')}@{r.get('host')}", r.get("source") or "cli",
                         str(r.get("started_at", ""))[:19].replace("T", " "), count,
                         f"{r.get('first') or '-'} .. {r.get('last') or '-'}", what))
        switch = (html.link("/audit", "one line per run") if all
                  else html.link("/audit?all=1", "every record (started, each batch, final)"))
        body = (f"<p>Every replay, purge and console cancel, newest first. Show {switch}.</p>"
                + html.table(("run", "action", "outcome", "who", "from", "started (UTC)", "count", "first .. last",
                              "selection"), rows, empty="no replay, purge or cancel recorded yet"))
        return page("Audit log", body, session, here="/audit")
