"""The console's consumer-group page, read through the same code as `orderpipe lag`
(services/ops/lag.py): every group the pipeline has (registry.GROUPS and the order-status
worker's), its state and members with their assigned partitions (DescribeGroups), and per
partition the committed offset, the end offset and the lag. A dead-letter topic's position is
the handled offset of `orderpipe-dlt`, so its lag is the number of unhandled dead letters.

Paused partitions: the consumer runtime pauses partitions (due retries, the circuit breaker,
the rate limit) inside each process and exposes none of it per partition (neither its health
endpoint nor its metrics), so the page says "not reported".
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse

from services.console import html
from services.console.deadletters import problem_of

KINDS = ("input", "retry", "dead letters")
PAUSED = "not reported (the consumer runtime does not expose which partitions it pauses)"


def register(app: FastAPI, ctx) -> None:
    @app.get("/groups", response_class=HTMLResponse)
    def groups(request: Request) -> HTMLResponse:
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
        body = "".join(html.problem(p) for p in problems)

        summary = []
        for g in known:
            mine = [r for r in rows if r.owner == g.name]
            info = infos.get(g.name)
            summary.append((html.link(f"#{g.name}", g.name), info.state if info else "?",
                            len(info.members) if info else "?",
                            *(sum(r.lag for r in mine if r.kind == kind) for kind in KINDS)))
        body += html.table(("group", "state", "members", "lag input", "lag retry", "unhandled dead letters"),
                           summary, numeric=(2, 3, 4, 5))

        for g in known:
            info = infos.get(g.name)
            section = [f'<section class="panel" id="{html.attr(g.name)}"><h2>{html.escape(g.name)}</h2>']
            if info is not None and info.problem:
                section.append(html.problem(f"members: {info.problem}"))
            state = info.state if info else "?"
            section.append(f"<p>state: {html.escape(state)}; paused partitions: {html.escape(PAUSED)}</p>")
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
