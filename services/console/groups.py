"""The console's consumer-group page, read through the same code as `orderpipe lag`
(services/ops/lag.py): every group the pipeline has (registry.GROUPS and the order-status
worker's), its state and members with their assigned partitions (DescribeGroups), and per
partition the committed offset, the end offset and the lag. A dead-letter topic's position is
the handled offset of `orderpipe-dlt`, so its lag is the number of unhandled dead letters.

Paused partitions and the workers: what each worker of the consumer runtime reports in its
group's database (`orderpipe workers`, services/ops/workers.py): which partitions it paused and
why (a retry not due yet, the circuit breaker open, the rate limit), its breaker and heartbeat;
a worker whose heartbeat stopped is shown as stale. The order-status worker is a Faust stream,
not the consumer runtime: it reports none of this.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse

from services.console import html
from services.console.deadletters import problem_of
from services.ops.workers import STALE, read_workers

KINDS = ("input", "retry", "dead letters")
NOT_REPORTED = "not reported: a Faust stream worker, not the consumer runtime"
NO_WORKER = "no worker of this group reports its state (none is running, or its database was not read)"


def register(app: FastAPI, ctx) -> None:
    @app.get("/groups", response_class=HTMLResponse)
    def groups(request: Request) -> HTMLResponse:
        from services import registry
        from services.ops.lag import consumer_lag, describe_groups, lag_groups

        session = ctx.session_of(request)
        problems: list[str] = []
        known = lag_groups()
        rows, infos = [], {}
        try:
            with ctx.kafka_clients() as (kafka, audit):
                rows = consumer_lag(kafka, audit, known)
                try:
                    infos = describe_groups(kafka, [g.name for g in known])
                except Exception as exc:
                    if (text := problem_of(exc)) is None:
                        raise
                    problems.append(f"members: {text}")
        except Exception as exc:
            if (text := problem_of(exc)) is None:
                raise
            problems.append(text)
        runtime_groups = {g.name for g in registry.GROUPS}
        workers = read_workers(ctx.settings, [g.name for g in known if g.name in runtime_groups])
        problems += workers.problems
        body = "".join(html.problem(p) for p in problems)

        summary = []
        for g in known:
            mine = [r for r in rows if r.owner == g.name]
            info = infos.get(g.name)
            summary.append((html.link(f"#{g.name}", g.name), info.state if info else "?",
                            len(info.members) if info else "?",
                            *(sum(r.lag for r in mine if r.kind == kind) for kind in KINDS),
                            len(workers.paused(g.name)) if g.name in runtime_groups else "-"))
        body += html.table(("group", "state", "members", "lag input", "lag retry", "unhandled dead letters",
                            "paused partitions"), summary, numeric=(2, 3, 4, 5, 6))

        for g in known:
            info = infos.get(g.name)
            section = [f'<section class="panel" id="{html.attr(g.name)}"><h2>{html.escape(g.name)}</h2>']
            if info is not None and info.problem:
                section.append(html.problem(f"members: {info.problem}"))
            state = info.state if info else "?"
            section.append(f"<p>state: {html.escape(state)}</p>")
            section.append(_paused_partitions(workers, g.name) if g.name in runtime_groups
                           else f"<p>paused partitions: {html.escape(NOT_REPORTED)}</p>")
            members = [(m.member_id, m.client_id, m.host,
                        ", ".join(f"{t}[{p}]" for t, p in m.assigned) or "-") for m in (info.members if info else ())]
            section.append(html.table(("member id", "client id", "host", "assigned partitions"), members,
                                      empty="no members reported by the broker"))
            mine = [r for r in rows if r.owner == g.name]
            section.append(html.table(
                ("topic", "kind", "partition", "committed", "end", "lag", "read by"),
                [(r.topic, r.kind, r.partition, "-" if r.committed is None else r.committed, r.end,
                  html.Markup(f'<span class="bad">{r.lag}</span>') if r.lag and r.kind == "dead letters" else r.lag,
                  r.group) for r in mine],
                numeric=(2, 3, 4, 5), empty="no partitions read"))
            section.append("</section>")
            body += "".join(section)
        return HTMLResponse(html.page("Consumer groups", body, session, here="/groups"))


def _paused_partitions(workers, group: str) -> str:
    """The group's workers (breaker, heartbeat) and every partition one of them paused, and why."""
    mine = [w for w in workers.workers if w.group == group]
    if not mine:
        return f"<p>paused partitions: {html.escape(NO_WORKER)}</p>"

    def status(value: str) -> object:
        return html.Markup(f'<span class="bad">{html.escape(value)}</span>') if value == STALE else value

    out = html.table(("worker", "status", "breaker", "last heartbeat (UTC)"),
                     [(w.name, status(w.status), w.breaker or "none", w.updated_at.strftime("%H:%M:%S"))
                      for w in mine])
    out += "<h3>Paused partitions</h3>" + html.table(
        ("topic", "partition", "why", "since (UTC)", "until (UTC)", "worker", "status"),
        [(p.topic, p.partition, p.reason, p.since.strftime("%H:%M:%S"),
          p.until.strftime("%H:%M:%S") if p.until else "-", p.worker, status(p.status))
         for p in workers.paused(group)], numeric=(1,), empty="none paused")
    return out
