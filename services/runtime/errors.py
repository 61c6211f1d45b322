"""How handlers tell the runtime what a failure means.

Retryable failures go down the group's retry chain; permanent ones go straight to its
dead-letter topic. Anything else is classified by `is_retryable` below.
"""

from __future__ import annotations

import socket

from pydantic import ValidationError

from services.runtime.codec import DecodeError


class RetryableError(Exception):
    """Try again later: a dependency is down, a timeout, a lock."""


class PermanentError(Exception):
    """Retrying cannot help: bad data, a business rule. Goes straight to the dead-letter topic."""


class MissingHandler(PermanentError):
    pass


class Misconfigured(RuntimeError):
    """A setting this process cannot run with: it stops with the message, one line that says what
    to fix (`orderpipe run` prints it), instead of a traceback or asking again forever."""


class ConsumerMisconfigured(Misconfigured):
    """The broker refuses this consumer the same way every time (its settings, or a fatal client
    error)."""


class KafkaRefused(ConsumerMisconfigured):
    """The broker refused this client's login, or the client refused the broker's certificate
    (services/runtime/kafka.py: `stop_on_refusal`): no retry can fix either."""


RETRYABLE_TYPES: tuple[type[BaseException], ...] = (
    RetryableError, TimeoutError, ConnectionError, socket.timeout, OSError,
)
PERMANENT_TYPES: tuple[type[BaseException], ...] = (PermanentError, DecodeError, ValidationError, ValueError,
                                                    KeyError, TypeError)


def is_retryable(exc: BaseException, retryable: tuple[type[BaseException], ...] = (),
                 permanent: tuple[type[BaseException], ...] = ()) -> bool:
    """Service-specific lists win over the defaults; unknown exceptions are retried (they are
    usually transient, and the chain ends in the dead-letter topic anyway)."""
    if isinstance(exc, permanent):
        return False
    if isinstance(exc, retryable):
        return True
    if isinstance(exc, PERMANENT_TYPES) and not isinstance(exc, RETRYABLE_TYPES):
        return False
    return True
