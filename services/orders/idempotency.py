"""Idempotency keys (the `Idempotency-Key` header of POST /orders, as Stripe and the IETF
draft "The Idempotency-Key HTTP Header Field" use it): a client that did not get an answer sends
the same request again with the same key, and gets the first answer, never a second order.

The answer is stored with a fingerprint of the request in the same transaction as the order and
its outbox row, so either all three exist or none: a crash between them cannot leave an order
without its key, or a key without its order. The same key with a different request is refused
(422). A key is kept for `ttl` (ORDERPIPE_API_IDEMPOTENCY_KEY_TTL_HOURS); after that the same key
places a new order.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, delete, select
from sqlalchemy.engine import Connection, Engine

from services.orders.tables import idempotency_keys
from services.runtime.db import utcnow

# Printable ASCII without spaces, as a header value carries it unchanged through proxies.
KEY_PATTERN = r"^[!-~]{1,255}$"
_CLEANUP_EVERY_S = 60.0


class KeyReused(Exception):
    """The key was first used with a different request: answered 422, nothing is done."""

    def __init__(self, key: str):
        super().__init__(f"Idempotency-Key {key!r} was already used with a different request; use a new key "
                         "for a new request")


@dataclass(frozen=True)
class Answer:
    """What the first request was answered: replayed as it was."""

    status_code: int
    body: dict[str, Any]


def fingerprint(operation: str, body: dict[str, Any]) -> str:
    """The request as validated (field order and spacing do not matter), with what it does."""
    canonical = json.dumps({"operation": operation, "body": body}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


class IdempotencyKeys:
    def __init__(self, engine: Engine, ttl: timedelta):
        self.engine = engine
        self.ttl = ttl
        self._next_cleanup = 0.0

    def answer(self, operation: str, key: str, request_fingerprint: str) -> Answer | None:
        """The first answer given for this key, if it has not expired; KeyReused if the key
        came with a different request."""
        self._forget_expired_now_and_then()
        with self.engine.connect() as conn:
            row = conn.execute(select(idempotency_keys).where(
                idempotency_keys.c.operation == operation, idempotency_keys.c.key == key,
                idempotency_keys.c.expires_at > utcnow())).mappings().first()
        if row is None:
            return None
        if row["fingerprint"] != request_fingerprint:
            raise KeyReused(key)
        return Answer(row["status_code"], row["body"])

    def remember(self, conn: Connection, operation: str, key: str, request_fingerprint: str, answer: Answer,
                 now: datetime | None = None) -> None:
        """In the transaction that does the work. A concurrent first use of the same key makes
        one of the two commits fail on the primary key (IntegrityError): that request then
        reads the other's answer."""
        now = now or utcnow()
        conn.execute(delete(idempotency_keys).where(and_(  # an expired use of the key: it starts over
            idempotency_keys.c.operation == operation, idempotency_keys.c.key == key,
            idempotency_keys.c.expires_at <= now)))
        conn.execute(idempotency_keys.insert().values(
            operation=operation, key=key, fingerprint=request_fingerprint, status_code=answer.status_code,
            body=answer.body, created_at=now, expires_at=now + self.ttl))

    def _forget_expired_now_and_then(self) -> None:
        if time.monotonic() < self._next_cleanup:
            return
        self._next_cleanup = time.monotonic() + _CLEANUP_EVERY_S
        with self.engine.begin() as conn:
            conn.execute(delete(idempotency_keys).where(idempotency_keys.c.expires_at <= utcnow()))
