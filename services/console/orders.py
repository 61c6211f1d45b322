"""The console's orders pages: search, and one order with everything the pipeline knows of it.

- `GET /orders`: search by order id (straight to its page), by customer id (the orders service's
  own database, newest first, with each order's state from the view) or by state and time (the
  order-status view, as `orderpipe orders list`).
- `GET /orders/{id}`: the order (orders database), its status (the view), its timeline (every
  message keyed by the order id in every order topic: events, retry hops, dead letters, parked
  copies, the view's own status records, read from the one partition the key hashes to), where a
  group holds its key, its invoice and credit note (with their PDFs) and its mails.
- `GET /orders/{id}/documents/{file}`: a PDF listed in the invoice service's rows for the order.
- `POST /orders/{id}/cancel`: (operators, confirm=yes) cancels the order through the same code as
  the orders API's cancel (services/orders/cancel.py: the cancellation and its OrderCancelled in
  the orders outbox, one transaction, on the orders service's database), then records it in the
  audit topic with the console user's name (action "cancel", source "console").

Every part of a page is read on its own, and one that cannot be read says why in one line while
the rest still shows. Viewers may read all of it; the cancel form shows to operators only.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse
from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError
from starlette.concurrency import run_in_threadpool

from services import registry
from services.console import html
from services.email.smtp_sink import read_maildir
from services.email.tables import cancelled_orders as email_cancelled, sent_emails
from services.invoice.tables import credit_notes, invoices
from services.ops.broker import first_offsets_at, scan, watermarks
from services.ops.errors import OpsError, database_problem
from services.ops.held_keys import group_engine
from services.orders.cancel import Cancellation, UnknownOrder, cancel_order
from services.orders.model import CancelOrder
from services.orders.tables import cancellations, orders
from services.runtime.codec import DecodeError, RegistryRefused, RegistryUnavailable, codec_from_settings
from services.runtime.db import as_utc
from services.runtime.failure_headers import (H_ATTEMPT, H_DUE_AT, H_EXC_MESSAGE, H_EXC_TYPE, H_GROUP, H_REASON,
                                              header, number_header)
from services.runtime.held import HeldKeys
from streams.order_status.fold import partition_of
from streams.order_status.status import ORDER_STATES, parse_since

log = logging.getLogger("orderpipe.console")

SEARCH_LIMIT = 200
# The fields of an event record worth a word in the timeline (whichever the event has).
DETAIL_FIELDS = ("state", "step", "action", "reason", "invoice_number", "credit_note_number", "document",
                 "message_id", "total", "currency")


@dataclass
class TimelineEntry:
    timestamp_ms: int
    topic: str
    partition: int
    offset: int
    event_type: str
    detail: str


def register(app: FastAPI, ctx) -> None:
    settings = ctx.settings
    codec_lock = threading.Lock()
    codec_box: list[Any] = []

    def codec():
        with codec_lock:
            if not codec_box:
                codec_box.append(codec_from_settings(settings))
            return codec_box[0]

    @app.get("/orders", response_class=HTMLResponse)
    def search(request: Request, order_id: str = "", customer_id: str = "", state: str = "",
               since: str = "") -> Any:
        session = ctx.session_of(request)
        order_id, customer_id, state, since = (v.strip() for v in (order_id, customer_id, state, since))
        if order_id:
            return RedirectResponse(_order_href(order_id), status_code=303)
        body = _search_form(customer_id, state, since)
        if customer_id:
            body += _by_customer(ctx, customer_id, state, since)
        elif state or since:
            body += _by_view(ctx, state, since)
        return html.page("Orders", body, session, here="/orders")

    @app.get("/orders/{order_id}", response_class=HTMLResponse)
    def order_page(request: Request, order_id: str) -> str:
        session = ctx.session_of(request)
        order, cancel, order_html = _order_part(settings, order_id)
        parts = [
            ("Order", order_html),
            *([("Cancel this order", _cancel_form(session, order_id))]
              if order is not None and cancel is None and session.user.may_change else []),
            ("Status", _status_part(ctx, order_id)),
            ("Timeline", _timeline_part(ctx, codec, order_id, order.created_at if order is not None else None)),
            ("Held", _held_part(settings, order_id)),
            ("Documents", _documents_part(settings, order_id)),
            ("Mails", _mails_part(settings, order_id, order)),
        ]
        body = "".join(f"<section><h2>{html.escape(title)}</h2>{content}</section>" for title, content in parts)
        return html.page(f"Order {order_id}", body, session, here="/orders")

    @app.post("/orders/{order_id}/cancel")
    async def cancel(request: Request, order_id: str) -> Any:
        session = ctx.session_of(request)
        form = await ctx.change_form(request, session)  # 403: a viewer, no CSRF token, another origin
        title = f"Cancel order {order_id}"

        def answer(status: int, body: str) -> HTMLResponse:
            back = "<p>" + html.link(_order_href(order_id), f"Order {order_id}") + "</p>"
            return HTMLResponse(html.page(title, body + back, session, here="/orders"), status_code=status)

        if form.get("confirm") != "yes":
            return answer(400, html.problem("not confirmed; nothing was changed"))
        try:  # the orders API's rules for a reason
            reason = CancelOrder(reason=form.get("reason", "").strip() or None).reason
        except ValidationError as exc:
            return answer(400, html.problem(f"reason: {exc.errors()[0]['msg']}; nothing was changed"))
        status, body = await run_in_threadpool(_cancel, ctx, codec, session.user.name, order_id, reason)
        if status == 303:
            return RedirectResponse(_order_href(order_id), status_code=303)
        return answer(status, body)

    @app.get("/orders/{order_id}/documents/{file}")
    def document(request: Request, order_id: str, file: str) -> FileResponse:
        ctx.session_of(request)
        try:
            rows = _documents(settings, order_id)
        except (SQLAlchemyError, OpsError):
            rows = []
        listed = {row.pdf_path for _, row in rows}
        if file not in listed:
            raise HTTPException(404, "no such document for this order")
        folder = (settings.data_dir / "invoices").resolve()
        path = (folder / file).resolve()
        if not path.is_relative_to(folder) or not path.is_file():
            raise HTTPException(404, "no such document for this order")
        return FileResponse(path, media_type="application/pdf", filename=path.name)


# ----- search -----

def _order_href(order_id: str) -> str:
    return f"/orders/{quote(order_id, safe='')}"


def _search_form(customer_id: str, state: str, since: str) -> str:
    options = "".join(f'<option value="{html.attr(s)}"{" selected" if s == state else ""}>{html.escape(s)}</option>'
                      for s in ("", *ORDER_STATES))
    return (f'<form method="get" action="/orders"><p>'
            f'<label>Order id <input name="order_id" size="38"></label> '
            f'<label>Customer id <input name="customer_id" value="{html.attr(customer_id)}"></label> '
            f'<label>State <select name="state">{options}</select></label> '
            f'<label>Changed since <input name="since" value="{html.attr(since)}" placeholder="1h or ISO time" '
            f'size="14"></label> <button>Search</button></p></form>')


def _by_view(ctx, state: str, since: str) -> str:
    from services.orders.api import StatusUnavailable

    try:
        found = ctx.status.list(state=state or None, since=since or None, limit=SEARCH_LIMIT)
    except (StatusUnavailable, ValueError) as exc:
        return html.problem(f"order-status view: {exc}")
    rows = [(html.link(_order_href(s["order_id"]), s["order_id"]), s.get("state"), s.get("reason") or "",
             s.get("created_at", ""), s.get("updated_at", "")) for s in found.get("statuses", [])]
    note = f"<p>{found.get('count', len(rows))} order(s); the newest {len(rows)} shown.</p>" if rows else ""
    return note + html.table(("order", "state", "reason", "created", "changed"), rows, empty="no order matches")


VIEW_REQUESTS_AT_ONCE = 8


def _by_customer(ctx, customer_id: str, state: str, since: str) -> str:
    from services.orders.api import StatusUnavailable

    out = []
    after = None
    if since:
        try:
            after = parse_since(since, datetime.now(UTC))
        except ValueError as exc:
            return html.problem(str(exc))
    if state and state not in ORDER_STATES:
        return html.problem(f"unknown state {state}; known: {', '.join(ORDER_STATES)}")
    engine = group_engine(ctx.settings, "orders")
    if engine is None:
        return html.problem(f"orders database: {ctx.settings.database_url('orders')} does not exist")
    try:
        with engine.connect() as conn:
            found = conn.execute(select(orders.c.order_id, orders.c.customer_email, orders.c.total, orders.c.currency,
                                        orders.c.created_at).where(orders.c.customer_id == customer_id)
                                 .order_by(orders.c.created_at.desc()).limit(SEARCH_LIMIT)).all()
    except SQLAlchemyError as exc:
        return html.problem(f"orders database: {database_problem(exc)}")
    finally:
        engine.dispose()

    def ask_view(order_id: str) -> dict | str | None:  # the status, or why the view did not answer
        try:
            return ctx.status.get(order_id)
        except StatusUnavailable as exc:
            return str(exc)

    # The view answers one order per request: the first alone (a view that is away costs one
    # timeout, not one per order), then the rest of the page's orders a few at a time.
    answers = [ask_view(found[0].order_id)] if found else []
    if found and not isinstance(answers[0], str):
        with ThreadPoolExecutor(max_workers=VIEW_REQUESTS_AT_ONCE) as pool:
            answers += pool.map(ask_view, [r.order_id for r in found[1:]])
    answers += [None] * (len(found) - len(answers))  # the view is away: the orders without a state
    view_down = next((a for a in answers if isinstance(a, str)), None)
    rows = []
    for r, answer in zip(found, answers):
        status = answer if isinstance(answer, dict) else None
        st = (status or {}).get("state")
        if state and st != state:
            continue
        if after is not None and (status is None or datetime.fromisoformat(status["updated_at"]) < after):
            continue
        rows.append((html.link(_order_href(r.order_id), r.order_id), st or "-", r.customer_email,
                     f"{r.total} {r.currency}", _when(r.created_at)))
    if view_down:
        out.append(html.problem(f"order-status view: {view_down}"))
    out.append(html.table(("order", "state", "e-mail", "total", "placed"), rows,
                          empty=f"no order of customer {customer_id}" + (" matches" if state or since else "")))
    return "".join(out)


# ----- one order -----

def _order_part(settings, order_id: str) -> tuple[Any, Any, str]:
    """The order's row, its cancellation's row (None: not cancelled) and the part's HTML."""
    engine = group_engine(settings, "orders")
    if engine is None:
        return None, None, html.problem(f"orders database: {settings.database_url('orders')} does not exist")
    try:
        with engine.connect() as conn:
            order = conn.execute(select(orders).where(orders.c.order_id == order_id)).first()
            cancel = conn.execute(select(cancellations).where(cancellations.c.order_id == order_id)).first()
    except SQLAlchemyError as exc:
        return None, None, html.problem(f"orders database: {database_problem(exc)}")
    finally:
        engine.dispose()
    if order is None:
        return None, None, html.problem(f"the orders database has no order {order_id}")
    facts = [("customer", html.link(f"/orders?{urlencode({'customer_id': order.customer_id})}", order.customer_id)),
             ("e-mail", order.customer_email), ("total", f"{order.total} {order.currency}"),
             ("placed", _when(order.created_at))]
    if cancel is not None:
        facts.append(("cancelled", f"{_when(cancel.cancelled_at)}" + (f" ({cancel.reason})" if cancel.reason else "")))
    lines = html.table(("sku", "quantity", "unit price"),
                       [(line.get("sku"), line.get("quantity"), line.get("unit_price")) for line in order.lines or []],
                       numeric=(1, 2), empty="no lines")
    return order, cancel, html.table(("", ""), facts) + lines


def _cancel_form(session, order_id: str) -> str:
    return (f'<form method="post" action="{html.attr(_order_href(order_id))}/cancel">{html.csrf_field(session)}'
            f'<p><label>Reason <input name="reason" maxlength="200" size="60" '
            f'placeholder="shown in the order\'s status"></label></p>'
            f'<p><label><input type="checkbox" name="confirm" value="yes" required> Yes, cancel order '
            f'{html.escape(order_id)}: every service undoes its part (stock released, a credit note if it was '
            f'invoiced, one cancellation mail). It cannot be undone.</label></p>'
            f'<p><button>Cancel this order</button></p></form>')


def _cancel(ctx, codec, user: str, order_id: str, reason: str | None) -> tuple[int, str]:
    """Cancel the order as the orders API does, then record it in the audit topic: (303, "") once
    both are done, else the status and the page's body saying what happened. The audit topic is
    checked first: a cancel is not carried out where it could not be recorded."""
    from confluent_kafka import KafkaException

    from services.ops.audit import cancel_record

    settings = ctx.settings
    audit_errors = (OpsError, KafkaException, BufferError)
    try:
        with ctx.kafka_clients() as (kafka, audit):
            audit.check(kafka.topics())

            def record(outcome: str, already: bool = False) -> str | None:
                """Write the audit record; the problem in one line if it could not be written."""
                try:
                    audit.write(cancel_record(order_id, reason, outcome, user=user, source="console",
                                              already=already))
                except audit_errors as exc:
                    log.error("console cancel not recorded in the audit log",
                              extra={"user": user, "order_id": order_id, "outcome": outcome, "problem": str(exc)})
                    return str(exc) or type(exc).__name__
                return None

            try:
                the_codec = codec()
            except (RegistryRefused, RegistryUnavailable) as exc:
                return 503, html.problem(f"schema registry: {exc}; nothing was changed")
            engine = group_engine(settings, "orders")
            if engine is None:
                return 503, html.problem(f"orders database: {settings.database_url('orders')} does not exist; "
                                         "nothing was changed")
            try:
                cancellation: Cancellation = cancel_order(engine, the_codec, order_id, reason)
            except UnknownOrder:
                return 404, html.problem(f"the orders database has no order {order_id}; nothing was changed")
            except (SQLAlchemyError, RegistryRefused, RegistryUnavailable) as exc:
                what = (f"orders database: {database_problem(exc)}" if isinstance(exc, SQLAlchemyError)
                        else f"schema registry: {exc}")
                log.warning("console cancel failed", extra={"user": user, "order_id": order_id, "problem": what})
                record(f"failed: {what}")  # an attempt is recorded too: a lost commit may still have cancelled it
                return 503, html.problem(what)
            finally:
                engine.dispose()
            log.info("console cancel", extra={"user": user, "order_id": order_id, "already": cancellation.already})
            if (problem := record("completed", already=cancellation.already)) is not None:
                done = "was cancelled already" if cancellation.already else "is cancelled"
                return 502, html.problem(f"order {order_id} {done}, but it is not in the audit log: "
                                         f"{problem}")
    except audit_errors as exc:
        return 503, html.problem(f"audit log: {exc}; nothing was changed")
    if cancellation.already:
        said = f" ({cancellation.reason})" if cancellation.reason else ""
        return 200, (f"<p>Order {html.escape(order_id)} was already cancelled at "
                     f"{html.escape(_when(cancellation.cancelled_at))}{html.escape(said)}: nothing was done again.</p>")
    return 303, ""


def _status_part(ctx, order_id: str) -> str:
    from services.orders.api import StatusUnavailable

    try:
        status = ctx.status.get(order_id)
    except StatusUnavailable as exc:
        return html.problem(f"order-status view: {exc}")
    if status is None:
        return html.problem(f"the order-status view does not know order {order_id}")
    state = html.Markup(f'<span class="{"bad" if status.get("state") in ("FAILED", "STALLED") else "ok"}">'
                        f'{html.escape(status.get("state"))}</span>')
    facts = [("state", state), ("reason", status.get("reason") or "-"), ("created", status.get("created_at")),
             ("changed", status.get("updated_at"))]
    if status.get("cancelled_at"):
        facts.append(("cancelled", f"{status['cancelled_at']}" +
                      (f" ({status['cancel_reason']})" if status.get("cancel_reason") else "")))
    if status.get("sla_deadline"):
        facts.append(("SLA deadline passed", status["sla_deadline"]))
    steps = html.table(("step", "state", "attempts", "last error", "detail", "compensation", "compensation detail"),
                       [(name, s.get("state"), s.get("attempts"), s.get("last_error") or "", s.get("detail") or "",
                         s.get("compensation") or "", s.get("compensation_detail") or "")
                        for name, s in status.get("steps", {}).items()], numeric=(2,), empty="no step")
    return html.table(("", ""), facts) + steps


def order_topics() -> list:
    """Every topic keyed by order id: event topics and each group's retry, dead-letter and parking topics."""
    return [t for t in registry.all_topics() if t.key == "order_id"]


# How long before the order's `created_at` (the API's clock) its first message may be stamped
# (the relay's clock): room for clocks that disagree, never for messages of the order.
CLOCK_SKEW_MARGIN = timedelta(minutes=5)


def read_timeline(kafka, codec, order_id: str, placed_at: datetime | None = None
                  ) -> tuple[list[TimelineEntry], list[str]]:
    """Every message keyed by `order_id` in every order topic, in time order; and the topics that
    do not exist. Reads only the partition the key hashes to (murmur2, as every producer here),
    and, when the order's placing time is known, only from then on (less `CLOCK_SKEW_MARGIN`):
    no message of the order is older, and an order page must not read a topic's whole history."""
    key = order_id.encode()
    consumer = kafka.consumer()
    metadata = kafka.topics(consumer)
    parts, missing = [], []
    for spec in order_topics():
        meta = metadata.get(spec.name)
        if meta is None or meta.error is not None or not meta.partitions:
            missing.append(spec.name)
            continue
        parts.append((spec.name, partition_of(key, len(meta.partitions))))
    marks = watermarks(consumer, parts, kafka.timeout)
    if placed_at is not None:
        marks = first_offsets_at(consumer, marks, int((as_utc(placed_at) - CLOCK_SKEW_MARGIN).timestamp() * 1000), kafka.timeout)
    entries = []
    for msg in scan(consumer, marks):
        if msg.key() != key:
            continue
        entries.append(_entry(msg, codec))
    entries.sort(key=lambda e: (e.timestamp_ms, e.topic, e.offset))
    return entries, missing


def _entry(msg, codec) -> TimelineEntry:
    try:
        decoded = codec.decode(msg.value()) if codec is not None else None
    except (DecodeError, KeyError, OSError, ValueError):
        decoded = None
    event_type = decoded.event_type if decoded else "undecodable"
    detail = ", ".join(f"{f}: {decoded.record[f]}" for f in DETAIL_FIELDS
                       if decoded and decoded.record.get(f) not in (None, "")) if decoded else ""
    failure = _failure(msg)
    if failure:
        detail = failure + (f" ({detail})" if detail else "")
    return TimelineEntry(msg.timestamp()[1], msg.topic(), msg.partition(), msg.offset(), event_type, detail)


def _failure(msg) -> str:
    topic = msg.topic()
    group = header(msg, H_GROUP) or "?"
    error = ": ".join(x for x in (header(msg, H_EXC_TYPE), header(msg, H_EXC_MESSAGE)) if x) or "no error recorded"
    if ".retry." in topic:
        attempt = header(msg, H_ATTEMPT) or topic.rsplit(".", 1)[-1]
        due = number_header(msg, H_DUE_AT, float)
        due_text = datetime.fromtimestamp(due, UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + " UTC" if due else "?"
        return f"retry {attempt} in {group}: {error}, due {due_text}"
    if topic.endswith(".dlt"):
        return f"dead-lettered in {group}: {header(msg, H_REASON) or '?'}: {error}"
    if topic.endswith(".parking"):
        return f"parked from {group}'s dead letters: {error}"
    return ""


def _timeline_part(ctx, codec, order_id: str, placed_at: datetime | None) -> str:
    out = []
    try:
        the_codec = codec()
    except Exception as exc:  # a registry that refuses or is away: show the messages undecoded
        the_codec = None
        out.append(html.problem(f"schema registry: {exc}"))
    try:
        with ctx.kafka_clients() as (kafka, _audit):
            entries, missing = read_timeline(kafka, the_codec, order_id, placed_at)
    except OpsError as exc:
        return "".join(out) + html.problem(f"Kafka: {exc}")
    if missing:
        out.append(html.problem(f"{len(missing)} topic(s) do not exist: {', '.join(missing[:8])}"
                                + (" ..." if len(missing) > 8 else "")))
    rows = [(_ms(e.timestamp_ms), e.topic, e.event_type, f"{e.partition}/{e.offset}", e.detail) for e in entries]
    out.append(html.table(("time", "topic", "event", "partition/offset", "detail"), rows,
                          empty="no message of this order in any topic"))
    return "".join(out)


def _held_part(settings, order_id: str) -> str:
    rows, problems = [], []
    for group in registry.GROUPS:
        engine = group_engine(settings, group.name)
        if engine is None:
            continue
        try:
            for r in HeldKeys.of_group(group.name).summary(engine):
                if r["key"] == order_id:
                    rows.append((group.name, r["state"], r["head_event_id"], r["reason"], _when(r["since"]),
                                 r["waiting"]))
        except SQLAlchemyError as exc:
            problems.append(html.problem(f"{group.name}'s held keys: {database_problem(exc)}"))
        finally:
            engine.dispose()
    return "".join(problems) + html.table(("group", "state", "head event", "why", "since", "events waiting"), rows,
                                          numeric=(5,), empty="no group holds this order's key")


def _documents(settings, order_id: str) -> list[tuple[str, Any]]:
    engine = group_engine(settings, "invoice")
    if engine is None:
        raise OpsError(f"{settings.database_url('invoice')} does not exist")
    try:
        with engine.connect() as conn:
            found = [("invoice", r) for r in conn.execute(select(invoices).where(invoices.c.order_id == order_id))]
            found += [("credit note", r) for r in
                      conn.execute(select(credit_notes).where(credit_notes.c.order_id == order_id))]
    finally:
        engine.dispose()
    return found


def _documents_part(settings, order_id: str) -> str:
    try:
        rows = _documents(settings, order_id)
    except OpsError as exc:
        return html.problem(f"invoice database: {exc}")
    except SQLAlchemyError as exc:
        return html.problem(f"invoice database: {database_problem(exc)}")
    return html.table(("document", "number", "total", "issued", "PDF"),
                      [(kind, r.number, f"{r.total} {r.currency}", _when(r.issued_at),
                        html.link(f"{_order_href(order_id)}/documents/{quote(r.pdf_path, safe='')}", r.pdf_path))
                       for kind, r in rows], numeric=(1,), empty="no invoice or credit note")


def _mails_part(settings, order_id: str, order) -> str:
    out, rows, ids = [], [], set()
    engine = group_engine(settings, "email")
    if engine is None:
        out.append(html.problem(f"email database: {settings.database_url('email')} does not exist"))
    else:
        try:
            with engine.connect() as conn:
                sent = conn.execute(select(sent_emails).where(sent_emails.c.order_id == order_id)).first()
                cancel = conn.execute(select(email_cancelled).where(email_cancelled.c.order_id == order_id)).first()
            if sent is not None:
                rows.append(("confirmation", sent.message_id, sent.recipient, _when(sent.sent_at)))
                ids.add(sent.message_id)
            if cancel is not None:
                rows.append(("cancellation", cancel.document or "-", cancel.compensation, _when(cancel.compensated_at)))
                if cancel.document:
                    ids.add(cancel.document)
        except SQLAlchemyError as exc:
            out.append(html.problem(f"email database: {database_problem(exc)}"))
        finally:
            engine.dispose()
    out.append(html.table(("mail", "Message-ID", "to / what", "sent"), rows, empty="no mail recorded"))
    maildir = Path(settings.data_dir) / "maildir"
    if maildir.is_dir() and ids:
        recipient = order.customer_email if order is not None else None
        try:
            received = [m for m in read_maildir(maildir)
                        if m["Message-ID"] in ids and (recipient is None or m["To"] == recipient)]
        except (OSError, ValueError) as exc:
            out.append(html.problem(f"maildir {maildir}: {exc}"))
            received = []
        for m in received:
            try:
                body = m.get_body(preferencelist=("plain",))
                text = body.get_content() if body is not None else ""
            except (KeyError, LookupError, ValueError) as exc:
                text = f"(cannot read the text: {exc})"
            out.append(f"<h3>{html.escape(m['Subject'])}</h3><p>to {html.escape(m['To'])}, {html.escape(m['Date'])}, "
                       f"{html.escape(m['Message-ID'])}</p><pre>{html.escape(text)}</pre>")
    return "".join(out)


def _when(value: Any) -> str:
    if isinstance(value, datetime):
        return as_utc(value).strftime("%Y-%m-%d %H:%M:%S UTC")
    return "" if value is None else str(value)


def _ms(timestamp_ms: int) -> str:
    if timestamp_ms <= 0:
        return "?"
    return datetime.fromtimestamp(timestamp_ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
