"""Server-rendered pages without a template engine: every value goes through `escape` (text) or
`attr` (attribute), so nothing a message, an error or an order carries can inject markup; the
page shell, the navigation and the few helpers every page uses."""

from __future__ import annotations

from collections.abc import Iterable
from html import escape as _escape

from services.console.auth import Session

NAV = (("/", "Overview"), ("/orders", "Orders"), ("/dead-letters", "Dead letters"), ("/groups", "Consumer groups"),
       ("/audit", "Audit log"))

STYLE = """
body{font-family:system-ui,sans-serif;margin:0;color:#1d2430;background:#f6f7f9}
header{background:#1d2430;color:#fff;padding:.6rem 1.2rem;display:flex;gap:1.2rem;align-items:center}
header a{color:#cfd8e3;text-decoration:none}header a.here{color:#fff;font-weight:600}
header .who{margin-left:auto;font-size:.9rem}header form{display:inline}
main{padding:1rem 1.2rem;max-width:1200px}h1{font-size:1.3rem}
table{border-collapse:collapse;background:#fff;margin:.5rem 0 1.2rem}
th,td{border:1px solid #d6dbe2;padding:.3rem .6rem;text-align:left;font-size:.9rem;vertical-align:top}
th{background:#eef1f5}.num{text-align:right}.bad{color:#b3261e;font-weight:600}.ok{color:#1e7b34}
.panels{display:grid;grid-template-columns:repeat(auto-fit,minmax(320px,1fr));gap:1rem}
.panel{background:#fff;border:1px solid #d6dbe2;padding:.6rem .9rem;overflow-x:auto;min-width:0}.panel h2{font-size:1rem;margin:.2rem 0 .5rem}
.error{background:#fdecea;border:1px solid #f5c2bd;padding:.5rem .8rem}
button,input,select{font:inherit}pre{white-space:pre-wrap;background:#fff;border:1px solid #d6dbe2;padding:.5rem}
"""


def escape(value: object) -> str:
    return _escape("" if value is None else str(value), quote=False)


def attr(value: object) -> str:
    return _escape("" if value is None else str(value), quote=True)


def table(headers: Iterable[str], rows: Iterable[Iterable[object]], numeric: Iterable[int] = (),
          empty: str = "nothing") -> str:
    """An HTML table; cells are escaped unless they are `Markup`."""
    headers, numeric = list(headers), set(numeric)
    body = "".join("<tr>" + "".join(
        f"<td{' class=num' if i in numeric else ''}>{cell if isinstance(cell, Markup) else escape(cell)}</td>"
        for i, cell in enumerate(row)) + "</tr>" for row in rows)
    if not body:
        return f"<p>{escape(empty)}</p>"
    return "<table><tr>" + "".join(f"<th>{escape(h)}</th>" for h in headers) + f"</tr>{body}</table>"


class Markup(str):
    """HTML built here from escaped parts: placed as it is."""


def link(href: str, text: object) -> Markup:
    return Markup(f'<a href="{attr(href)}">{escape(text)}</a>')


def csrf_field(session: Session) -> str:
    return f'<input type="hidden" name="csrf" value="{attr(session.csrf)}">'


def page(title: str, body: str, session: Session | None, here: str = "", script: str = "") -> str:
    nav = ""
    if session is not None:
        nav = "".join(f'<a href="{href}"{" class=here" if href == here else ""}>{escape(name)}</a>' for href, name in NAV)
        nav += (f'<span class="who">{escape(session.user.name)} ({escape(session.user.role)}) '
                f'<form method="post" action="/logout">{csrf_field(session)}<button>Log out</button></form></span>')
    return (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{escape(title)} · orderpipe</title>"
            f"<meta name=viewport content='width=device-width'><style>{STYLE}</style></head><body>"
            f"<header><strong>orderpipe ops</strong>{nav}</header><main><h1>{escape(title)}</h1>{body}</main>"
            f"{f'<script>{script}</script>' if script else ''}</body></html>")


def problem(message: str) -> str:
    return f'<p class="error">{escape(message)}</p>'
