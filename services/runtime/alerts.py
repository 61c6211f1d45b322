"""Alerts for operators: a message still failing after N attempts, a dead letter, a circuit
breaker opening or closing.

Each alert is a structured log line (logger `services.runtime.alerts`, with `alert` and the
details as fields), a count in `orderpipe_alerts_total{group,kind}`, and, when a webhook URL is
configured (`ORDERPIPE_ALERT_WEBHOOK_URL`), a JSON POST. Webhook calls run on a background
thread from a bounded queue: a slow or failing webhook never delays or breaks processing; when
the queue is full, alerts are still logged and counted but not posted.

Listeners (`Alerter.listeners`) are told of each alert in the thread that raised it: the
worker's open alerts (services/runtime/worker_state.py) are kept from them.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import httpx

from services.runtime import metrics

log = logging.getLogger(__name__)

RETRYING = "retrying"            # failed attempt >= alert_after_attempts, going to another retry
DEAD_LETTERED = "dead_lettered"
BREAKER_OPENED = "breaker_opened"
BREAKER_CLOSED = "breaker_closed"
KEY_HELD = "key_held"            # an event waits behind its key's dead-lettered head: for an operator

_LEVELS = {RETRYING: logging.WARNING, DEAD_LETTERED: logging.ERROR, BREAKER_OPENED: logging.ERROR,
           BREAKER_CLOSED: logging.WARNING}
_STOP = object()

Post = Callable[[str, dict[str, Any]], None]
Listener = Callable[[str, str, dict[str, Any]], None]  # (kind, message, details), e.g. the worker's open alerts


def post_json(url: str, payload: dict[str, Any]) -> None:
    httpx.post(url, json=payload, timeout=5.0).raise_for_status()


class Alerter:
    def __init__(self, group: str, webhook_url: str | None = None, *, post: Post = post_json,
                 queue_size: int = 1000):
        self.group = group
        self.webhook_url = webhook_url or None
        self._post = post
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.listeners: list[Listener] = []

    def alert(self, kind: str, message: str, **details: Any) -> None:
        payload = {"alert": kind, "group": self.group, "message": message,
                   "at": datetime.now(UTC).isoformat(), **details}
        log.log(_LEVELS.get(kind, logging.WARNING), message, extra={"alert": kind, "group": self.group,
                                                                    **details})
        metrics.ALERTS.labels(self.group, kind).inc()
        for listener in self.listeners:
            try:
                listener(kind, message, details)
            except Exception:  # what listens is for the operators: it never breaks processing
                log.exception("alert listener failed", extra={"group": self.group, "alert": kind})
        self.post(payload)

    def post(self, payload: dict[str, Any]) -> None:
        """Queue only the webhook POST of an alert the caller logs and counts itself."""
        if self.webhook_url:
            self._start()
            try:
                self._queue.put_nowait(payload)
            except queue.Full:
                log.warning("alert webhook queue full; alert not posted",
                            extra={"group": self.group, "alert": payload.get("alert")})

    def close(self, timeout: float = 5.0) -> None:
        """Post what is queued (for up to `timeout` seconds), then stop the thread."""
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            try:
                self._queue.put(_STOP, timeout=timeout)
            except queue.Full:
                pass
            thread.join(timeout)

    def _start(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=f"{self.group}-alerts", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while (payload := self._queue.get()) is not _STOP:
            try:
                self._post(self.webhook_url, payload)
            except Exception as exc:  # the webhook is best effort; the log line and metric remain
                log.warning("alert webhook failed", extra={"group": self.group, "alert": payload["alert"],
                                                           "error": repr(exc)})
