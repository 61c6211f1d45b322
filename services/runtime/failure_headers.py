"""The failure-header contract: what the consumer runtime writes on every retry and dead-letter
copy, and how anyone reads it back (the loop, `orderpipe dlt`, the order-status view).

A copy keeps the original message's key, value and headers; these are added, and replaced on
every hop (never piled up). Readers go through `header` / `number_header`, which never raise on
a malformed value: a header is data from the wire, and raising on it would fail a whole batch.
"""

from __future__ import annotations

import math
import traceback
from collections.abc import Callable

from confluent_kafka import Message

H_ORIGINAL_TOPIC = "x-original-topic"
H_ORIGINAL_PARTITION = "x-original-partition"
H_ORIGINAL_OFFSET = "x-original-offset"
H_ORIGINAL_TIMESTAMP = "x-original-timestamp"
H_GROUP = "x-group"
H_ATTEMPT = "x-attempt"
H_FIRST_FAILURE = "x-first-failure-at"
H_LAST_FAILURE = "x-last-failure-at"
H_DUE_AT = "x-due-at"
H_EXC_TYPE = "x-exception-type"
H_EXC_MESSAGE = "x-exception-message"
H_EXC_TRACEBACK = "x-exception-traceback"
H_REASON = "x-reason"
RUNTIME_HEADERS = frozenset({
    H_ORIGINAL_TOPIC, H_ORIGINAL_PARTITION, H_ORIGINAL_OFFSET, H_ORIGINAL_TIMESTAMP, H_GROUP, H_ATTEMPT,
    H_FIRST_FAILURE, H_LAST_FAILURE, H_DUE_AT, H_EXC_TYPE, H_EXC_MESSAGE, H_EXC_TRACEBACK, H_REASON,
})
MESSAGE_LIMIT = 1000
TRACEBACK_LIMIT = 4000


def header(msg: Message, name: str) -> str | None:
    for key, value in msg.headers() or ():
        if key == name and value is not None:
            return value.decode("utf-8", "replace")
    return None


def number_header(msg: Message, name: str, parse: Callable[[str], float]) -> float | None:
    """A header we set ourselves, parsed; a malformed one reads as absent rather than raising
    (raising would fail the whole batch and block the partition forever)."""
    raw = header(msg, name)
    try:
        value = parse(raw) if raw is not None else None
    except ValueError:
        return None
    return value if value is not None and math.isfinite(value) else None


def format_traceback(exc: BaseException) -> str:
    """The frames (innermost last) and the exception line, within TRACEBACK_LIMIT characters. The
    message is cut to MESSAGE_LIMIT first, so a long message cannot push the frames out."""
    last = f"{type(exc).__module__}.{type(exc).__qualname__}: {str(exc)[:MESSAGE_LIMIT]}\n"
    if exc.__cause__ is not None:
        cause = exc.__cause__
        last += f"caused by {type(cause).__qualname__}: {str(cause)[:300]}\n"
    frames = "".join(traceback.format_tb(exc.__traceback__))
    head = "Traceback (most recent call last):\n"
    budget = TRACEBACK_LIMIT - len(head) - len(last)
    return (head + frames[-budget:] + last)[-TRACEBACK_LIMIT:]


def header_texts(msg: Message) -> dict[str, str]:
    """Every header as text, the first value of a name winning (as `header` reads them)."""
    out: dict[str, str] = {}
    for key, value in msg.headers() or ():
        if value is not None and key not in out:
            out[key] = value.decode("utf-8", "replace")
    return out
