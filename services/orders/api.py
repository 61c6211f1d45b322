"""The HTTP API: place orders, ask where they are."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from datetime import timedelta
from typing import Annotated, Any

import httpx
from fastapi import FastAPI, Header, HTTPException, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from sqlalchemy import select, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from services.orders.body_limit import BodyLimit
from services.orders.cancel import Cancellation, UnknownOrder, cancel_order
from services.orders.idempotency import KEY_PATTERN, Answer, IdempotencyKeys, KeyReused, fingerprint
from services.orders.model import CancelOrder, OrderAccepted, OrderCancelAccepted, PlaceOrder, Problem
from services.orders.place import place_order
from services.orders.tables import cancellations, orders
from services.runtime.codec import Codec
from services.runtime.db import as_utc

log = logging.getLogger(__name__)


class StatusUnavailable(Exception):
    pass


@dataclass
class StatusClient:
    """Reads the order-status view from the Faust worker's web server. Faust routes the request
    to the worker that owns the order's partition, so any worker can be asked."""

    base_url: str
    timeout: float = 5.0

    def get(self, order_id: str) -> dict | None:
        try:
            r = httpx.get(f"{self.base_url.rstrip('/')}/status/{order_id}/", timeout=self.timeout,
                          follow_redirects=True)
        except httpx.HTTPError as exc:
            raise StatusUnavailable(f"order-status view at {self.base_url} is not answering: {exc}") from None
        if r.status_code == 404:
            return None
        if r.status_code != 200:
            raise StatusUnavailable(f"order-status view answered {r.status_code}: {r.text[:200]}")
        return r.json()

    def list(self, state: str | None = None, since: str | None = None, limit: int | None = None) -> dict:
        """Statuses in `state` (comma-separated states) that changed since `since` (`1h`, `30m`,
        an ISO time), newest first, from every worker: {"count", "statuses", "workers"}.
        Raises ValueError for a query the view refuses (unknown state, bad time)."""
        params = {k: v for k, v in {"state": state, "since": since, "limit": limit}.items() if v is not None}
        try:
            r = httpx.get(f"{self.base_url.rstrip('/')}/status/", params=params, timeout=self.timeout,
                          follow_redirects=True)
        except httpx.HTTPError as exc:
            raise StatusUnavailable(f"order-status view at {self.base_url} is not answering: {exc}") from None
        if r.status_code == 400:
            raise ValueError(r.json().get("detail", r.text))
        if r.status_code != 200:
            raise StatusUnavailable(f"order-status view answered {r.status_code}: {r.text[:200]}")
        return r.json()


# The operations an Idempotency-Key belongs to: a key is remembered per operation.
PLACE_ORDER = "POST /orders"
CANCEL_ORDER = "POST /orders/{order_id}/cancel"

IdempotencyKey = Annotated[str | None, Header(
    alias="Idempotency-Key", pattern=KEY_PATTERN,
    description="Any unique string (a UUID): the same key with the same request within "
                "ORDERPIPE_API_IDEMPOTENCY_KEY_TTL_HOURS (24 h) returns the first answer, with "
                "`Idempotent-Replayed: true`, and does nothing again; with another request it is a 422.")]
DATABASE_DOWN = {"model": Problem, "description": "The database could not store the request; nothing was recorded."}


def create_app(engine: Engine, codec: Codec, status: StatusClient, max_body_bytes: int = 65_536,
               idempotency_key_ttl: timedelta = timedelta(hours=24)) -> FastAPI:
    app = FastAPI(title="orderpipe orders API", version="0.1.0",
                  description="Place orders (answered 202 once durably recorded) and follow their status.")
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    keys = IdempotencyKeys(engine, idempotency_key_ttl)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's own handler echoes each bad value; a non-finite number (`1e400`, `NaN`)
        # cannot be written as JSON, and the 422 became a 500.
        return JSONResponse(status_code=422, content={"detail": _json_safe(jsonable_encoder(exc.errors()))})

    def accepted(response: Response, order_id: str, replayed: bool = False) -> OrderAccepted:
        status_url = f"/orders/{order_id}"
        response.headers["Location"] = status_url
        if replayed:
            response.headers["Idempotent-Replayed"] = "true"
        return OrderAccepted(order_id=order_id, status_url=status_url)

    def first_answer(operation: str, key: str, request_print: str) -> Answer | None:
        try:
            return keys.answer(operation, key, request_print)
        except KeyReused as exc:
            raise HTTPException(422, detail=str(exc)) from None

    @app.post("/orders", status_code=202, response_model=OrderAccepted, responses={
        413: {"model": Problem, "description": "The body is larger than ORDERPIPE_API_MAX_BODY_BYTES; nothing was read."},
        422: {"description": "The body is not a valid order, or the Idempotency-Key came with another body."},
        503: DATABASE_DOWN})
    def post_order(request: PlaceOrder, response: Response, idempotency_key: IdempotencyKey = None) -> OrderAccepted:
        remember = None
        if idempotency_key is not None:
            request_print = fingerprint(PLACE_ORDER, request.canonical())
            if (first := first_answer(PLACE_ORDER, idempotency_key, request_print)) is not None:
                return accepted(response, first.body["order_id"], replayed=True)

            def remember(conn, event) -> None:  # in the order's own transaction
                keys.remember(conn, PLACE_ORDER, idempotency_key, request_print,
                              Answer(202, {"order_id": event.order_id}))
        try:
            event = place_order(engine, codec, request, also=remember)
        except IntegrityError:
            # the same key's first request committed while this one ran: this order was not stored
            if idempotency_key is not None and (
                    first := first_answer(PLACE_ORDER, idempotency_key, request_print)) is not None:
                return accepted(response, first.body["order_id"], replayed=True)
            raise
        except SQLAlchemyError as exc:
            # The database failed, not the request: the order and its outbox row are one
            # transaction, so nothing was recorded and the client may simply try again.
            raise database_down("order", exc) from None
        return accepted(response, event.order_id)

    @app.post("/orders/{order_id}/cancel", status_code=202, response_model=OrderCancelAccepted, responses={
        200: {"model": OrderCancelAccepted, "description": "The order was cancelled already: nothing was done again."},
        404: {"model": Problem, "description": "No such order."},
        422: {"description": "The body is not valid, or the Idempotency-Key came with another request."},
        503: DATABASE_DOWN})
    def post_cancel(order_id: str, response: Response, request: CancelOrder | None = None,
                    idempotency_key: IdempotencyKey = None) -> OrderCancelAccepted:
        """Cancel the order: recorded with its OrderCancelled in one transaction (202). Every
        service then undoes its part: inventory releases the stock, invoice issues a credit
        note if it issued an invoice, email sends one cancellation mail, analytics corrects its
        rollups; the order's status ends in CANCELLED with each step's compensation."""
        reason = request.reason if request is not None else None
        remember = None
        if idempotency_key is not None:
            request_print = fingerprint(CANCEL_ORDER, {"order_id": order_id, "reason": reason})
            if (first := first_answer(CANCEL_ORDER, idempotency_key, request_print)) is not None:
                return replayed(response, first)

            def remember(conn, cancellation: Cancellation) -> None:  # in the cancellation's own transaction
                keys.remember(conn, CANCEL_ORDER, idempotency_key, request_print,
                              Answer(202, cancelled(cancellation).model_dump(mode="json")))
        try:
            cancellation = cancel_order(engine, codec, order_id, reason, also=remember)
        except UnknownOrder as exc:
            raise HTTPException(404, detail=str(exc)) from None
        except SQLAlchemyError as exc:
            raise database_down("cancellation", exc) from None
        if cancellation.already and idempotency_key is not None and (
                first := first_answer(CANCEL_ORDER, idempotency_key, request_print)) is not None:
            return replayed(response, first)  # the same key's first request cancelled it while this one ran
        if cancellation.already:
            response.status_code = 200
        response.headers["Location"] = f"/orders/{order_id}"
        return cancelled(cancellation)

    def replayed(response: Response, first: Answer) -> OrderCancelAccepted:
        response.status_code = first.status_code
        response.headers["Idempotent-Replayed"] = "true"
        response.headers["Location"] = first.body["status_url"]
        return OrderCancelAccepted(**first.body)

    def cancelled(cancellation: Cancellation) -> OrderCancelAccepted:
        return OrderCancelAccepted(order_id=cancellation.order_id, cancelled_at=as_utc(cancellation.cancelled_at).isoformat(),
                                   reason=cancellation.reason, status_url=f"/orders/{cancellation.order_id}",
                                   already_cancelled=cancellation.already)

    @app.get("/orders", responses={
        400: {"model": Problem, "description": "The order-status view refused the query (unknown state, bad time)."},
        503: {"model": Problem, "description": "The order-status view is not answering."}})
    def list_orders(state: str | None = None, since: str | None = None, limit: int = 1000) -> dict:
        """Orders by state (e.g. `FAILED,STALLED`) and last change (`since=1h` or an ISO time),
        newest first, from the order-status view (every worker)."""
        try:
            view = status.list(state=state, since=since, limit=limit)
        except ValueError as exc:
            raise HTTPException(400, detail=str(exc)) from None
        except StatusUnavailable as exc:
            raise HTTPException(503, detail=str(exc)) from None
        return {"count": view["count"], "orders": view["statuses"]}

    @app.get("/orders/{order_id}", responses={404: {"model": Problem, "description": "No such order."}})
    def get_order(order_id: str) -> dict:
        with engine.connect() as conn:
            row = conn.execute(select(orders, cancellations.c.cancelled_at, cancellations.c.reason)
                               .outerjoin(cancellations, cancellations.c.order_id == orders.c.order_id)
                               .where(orders.c.order_id == order_id)).mappings().first()
        if row is None:
            raise HTTPException(404, detail=f"order {order_id} not found")
        body = {"order_id": order_id, "customer_id": row["customer_id"], "currency": row["currency"],
                "total": str(row["total"]), "created_at": as_utc(row["created_at"]).isoformat()}
        if row["cancelled_at"] is not None:  # recorded here at once; the view shows it once folded
            body["cancelled"] = {"cancelled_at": as_utc(row["cancelled_at"]).isoformat(), "reason": row["reason"]}
        try:
            view = status.get(order_id)
        except StatusUnavailable as exc:
            return {**body, "state": "UNKNOWN", "detail": str(exc)}
        if view is None:  # accepted, not yet seen by the view: the relay may not have published it yet
            return {**body, "state": "PENDING", "steps": {}}
        return {**body, **view}

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz", responses={503: {"description": "The database is not answering."}})
    def readyz(response: Response) -> dict:
        try:
            with engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        except Exception as exc:
            response.status_code = 503
            return {"status": "unavailable", "database": str(exc)}
        return {"status": "ready"}

    # Readiness above is the database only, on purpose: the API writes orders to its outbox and
    # never talks to Kafka, so it keeps accepting orders while the broker is away (orders-relay,
    # which publishes them, is the one that is not ready then).
    @app.get("/metrics", include_in_schema=False)
    def prometheus_metrics() -> Response:
        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)

    return app


def database_down(what: str, exc: SQLAlchemyError) -> HTTPException:
    log.warning(f"{what} not stored: database error", extra={"error": str(exc)[:300]})
    return HTTPException(503, detail=f"the {what} could not be stored (database unavailable); nothing was "
                                     "recorded, try again", headers={"Retry-After": "1"})


def _json_safe(value: Any) -> Any:
    """`value` with every non-finite float written as text ("inf", "nan"), which JSON has no number for."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value
