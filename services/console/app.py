"""The ops console's web app: login, the session on every page, the overview with live updates.

Pages are rendered on the server (services/console/html.py) and work without JavaScript; the one
script (`/static/live.js`, no build step) refreshes the overview's panels every few seconds.
Every page but the login needs a session; every change is a POST with the session's CSRF token.
"""

from __future__ import annotations

import logging
import secrets
from collections import Counter
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs, urlsplit

from fastapi import FastAPI, Request, Response
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse

from services.console import html
from services.console.auth import COOKIE, Session, Sessions, Users
from services.console.overview import Overview, read_overview
from services.runtime.settings import Settings

log = logging.getLogger("orderpipe.console")



def _pages() -> tuple[Callable[[FastAPI, ConsoleContext], None], ...]:
    """The page modules beyond the overview, each `register(app, ctx)`."""
    from services.console import deadletters, groups, orders

    return orders.register, deadletters.register, groups.register

# Everything from this origin only; the styles are inline in each page, scripts only from /static.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; style-src 'self' 'unsafe-inline'; script-src 'self'; "
                               "frame-ancestors 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}
LIVE_JS = """
// Refresh the overview's panels without reloading the page.
(function () {
  const panels = document.getElementById("live");
  if (!panels) return;
  setInterval(async () => {
    try {
      const r = await fetch("/overview/panels", {credentials: "same-origin"});
      if (r.ok) { panels.innerHTML = await r.text(); document.getElementById("updated").textContent = new Date().toLocaleTimeString(); }
    } catch (e) { /* the next tick tries again */ }
  }, 5000);
})();
"""


@dataclass(frozen=True)
class ConsoleContext:
    """What every page module gets (`register(app, ctx)`): the settings, the readers (the same as
    the command line's) and the two checks every page and every change goes through."""

    settings: Settings
    status: Any  # StatusClient: the order-status view
    kafka_clients: Callable[[], AbstractContextManager]  # (OpsKafka, AuditLog), as the CLI opens them
    session_of: Callable[[Request], Session]  # the request's session; else to the login (303)
    change_form: Callable[..., Awaitable[dict[str, str]]]  # a change's form, after CSRF, origin and role checks


# None: every page module (`_pages`); a test may set fewer.
PAGES: tuple[Callable[[FastAPI, ConsoleContext], None], ...] | None = None


class NotLoggedIn(Exception):
    pass


class Forbidden(Exception):
    def __init__(self, why: str):
        super().__init__(why)


def create_console(settings: Settings, users: Users, sessions: Sessions, status: Any,
                   kafka_clients: Callable[[], AbstractContextManager]) -> FastAPI:
    """`status`: a StatusClient; `kafka_clients()`: (OpsKafka, AuditLog) as the CLI opens them."""
    app = FastAPI(title="orderpipe ops console", docs_url=None, redoc_url=None, openapi_url=None)

    @app.middleware("http")
    async def security_headers(request: Request, call_next):
        response = await call_next(request)
        response.headers.update(SECURITY_HEADERS)
        return response

    @app.exception_handler(NotLoggedIn)
    async def to_login(request: Request, exc: NotLoggedIn):
        return RedirectResponse(f"/login?next={request.url.path}", status_code=303)

    @app.exception_handler(Forbidden)
    async def forbidden(request: Request, exc: Forbidden):
        session = sessions.read(request.cookies.get(COOKIE))
        return HTMLResponse(html.page("Not allowed", html.problem(str(exc)), session), status_code=403)

    def session_of(request: Request) -> Session:
        session = sessions.read(request.cookies.get(COOKIE))
        if session is None:
            raise NotLoggedIn()
        return session

    async def change_form(request: Request, session: Session, needs_operator: bool = True) -> dict[str, str]:
        """The form of a POST that changes something, after the checks every change passes."""
        origin = request.headers.get("origin")
        if origin and urlsplit(origin).netloc != request.url.netloc:
            raise Forbidden(f"a change from another site ({origin}) is refused")
        form = {k: v[-1] for k, v in parse_qs((await request.body()).decode("utf-8", "replace")).items()}
        if not secrets.compare_digest(form.get("csrf", ""), session.csrf):
            raise Forbidden("the form's CSRF token does not match your session: reload the page and try again")
        if needs_operator and not session.user.may_change:
            raise Forbidden(f"{session.user.name} is a {session.user.role}: only operators may change anything")
        return form

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/static/live.js", include_in_schema=False)
    def live_js() -> Response:
        return Response(LIVE_JS, media_type="text/javascript")

    @app.get("/login", response_class=HTMLResponse)
    def login_page(next: str = "/", failed: bool = False) -> str:
        if not len(users):
            return html.page("Log in", html.problem(
                "No user may log in: set ORDERPIPE_CONSOLE_USERS (name:role:hash, the hash from "
                "`orderpipe console hash-password`)."), None)
        note = html.problem("Wrong name or password.") if failed else ""
        return html.page("Log in", f"""{note}
<form method="post" action="/login">
<input type="hidden" name="next" value="{html.attr(_local(next))}">
<p><label>Name <input name="name" autocomplete="username" required autofocus></label></p>
<p><label>Password <input name="password" type="password" autocomplete="current-password" required></label></p>
<p><button>Log in</button></p></form>""", None)

    @app.post("/login")
    async def login(request: Request) -> Response:
        form = {k: v[-1] for k, v in parse_qs((await request.body()).decode("utf-8", "replace")).items()}
        user = users.login(form.get("name", ""), form.get("password", ""))
        if user is None:
            log.warning("console login refused", extra={"user": form.get("name", "")[:64]})
            return RedirectResponse(f"/login?failed=1&next={_local(form.get('next', '/'))}", status_code=303)
        log.info("console login", extra={"user": user.name, "role": user.role})
        _, cookie = sessions.new(user)
        response = RedirectResponse(_local(form.get("next", "/")), status_code=303)
        response.set_cookie(COOKIE, cookie, **sessions.cookie_options())
        return response

    @app.post("/logout")
    async def logout(request: Request) -> Response:
        session = session_of(request)
        await change_form(request, session, needs_operator=False)
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(COOKIE, path="/")
        return response

    def overview_panels() -> str:
        return _panels(read_overview(settings, status, kafka_clients))

    @app.get("/", response_class=HTMLResponse)
    def overview(request: Request) -> str:
        session = session_of(request)
        body = (f'<p>Live: refreshed every 5 s (last <span id="updated">{datetime.now(UTC):%H:%M:%S} UTC</span>).</p>'
                f'<div id="live">{overview_panels()}</div><script src="/static/live.js"></script>')
        return html.page("Overview", body, session, here="/")

    @app.get("/overview/panels", response_class=HTMLResponse)
    def panels(request: Request) -> str:
        session_of(request)
        return overview_panels()

    @app.get("/api/overview")
    def overview_json(request: Request) -> JSONResponse:
        session_of(request)
        view = read_overview(settings, status, kafka_clients)
        return JSONResponse({**view.__dict__, "held": {g: {**h, "oldest": h["oldest"].isoformat()}
                                                       for g, h in view.held.items()},
                             "alerts": [a.as_json() for a in view.alerts]})

    ctx = ConsoleContext(settings, status, kafka_clients, session_of, change_form)
    for register in PAGES if PAGES is not None else _pages():
        register(app, ctx)
    return app


def _local(target: str) -> str:
    """Only a path on this console: a login never sends the browser to another site."""
    parts = urlsplit(target)
    return target if target.startswith("/") and not target.startswith("//") and not parts.netloc else "/"


def _panels(view: Overview) -> str:
    out = []
    if view.problems:
        out.append("".join(html.problem(p) for p in view.problems))
    now = html.table(("state", "orders"), ((html.link(f"/orders?state={s}", s), n) for s, n in view.states_now.items()),
                     numeric=(1,), empty="no order yet")
    hour = view.last_hour
    if hour:
        rate = "-" if hour["completion_rate"] is None else f"{hour['completion_rate']:.0%}"
        latency = ("-" if hour["p50_s"] is None
                   else f"p50 {hour['p50_s']:.2f} s, p95 {hour['p95_s']:.2f} s")
        recent = html.table(("orders changed", "completed of finished", "placed to COMPLETED"),
                            [(hour["changed"], rate, latency)], numeric=(0,))
        recent += html.table(("state", "orders"), sorted(hour["per_state"].items()), numeric=(1,))
    else:
        recent = "<p>-</p>"
    lag = html.table(("group", "input", "retry", "dead letters"),
                     [(g, v["input"], v["retry"], html.Markup(f'<span class="bad">{v["dead letters"]}</span>')
                       if v["dead letters"] else 0) for g, v in view.lag.items()], numeric=(1, 2, 3), empty="-")
    held = html.table(("group", "keys held", "events waiting", "since"),
                      [(g, h["keys"], h["waiting"], h["oldest"].strftime("%Y-%m-%d %H:%M:%S"))
                       for g, h in view.held.items()], numeric=(1, 2), empty="no key is held")
    alerts = html.table(("alert", "open"), sorted(Counter(a.kind for a in view.alerts).items()), numeric=(1,),
                        empty="no open alert")
    if view.alerts:
        alerts += html.table(("alert", "group", "since", "what"),
                             [(a.kind, html.link(f"/groups#{a.group}", a.group), a.since.strftime("%Y-%m-%d %H:%M:%S"),
                               a.message) for a in view.alerts])
    dead = html.table(("group", "exception type", "dead letters"),
                      [(html.link(f"/dead-letters?group={g}&exception={exc}", g), exc, n)
                       for g, exc, n in view.dead_letters], numeric=(2,), empty="no unhandled dead letter")
    for title, content in (("Open alerts", alerts), ("Orders per state now", now), ("The last hour", recent),
                           ("Lag per group", lag), ("Held keys", held), ("Dead letters", dead)):
        out.append(f'<section class="panel"><h2>{html.escape(title)}</h2>{content}</section>')
    return '<div class="panels">' + "".join(out) + "</div>"
