"""Named crash points: the places where a crash tests a guarantee, killable one at a time.

The crash test SIGKILLs processes at random moments, which almost never land in the narrow
gaps that matter (between a database commit and the offset store, between a produce and its
ack). Each such gap is named here, and the code passes through it with `crash_point(name)`.
A test sets `ORDERPIPE_CRASH_AT=<name>` (optionally `<name>@<n>`: the n-th time, default the
first) for one process, and that process SIGKILLs itself there: no `finally`, no atexit, no
flush, exactly like a power cut. Then it checks what the guarantee promises after a restart.

`ORDERPIPE_FAIL_AT` takes the same form and raises `InjectedFailure` there instead: a failure
the process must survive (an exception in the middle of its work) rather than a crash it must
recover from.

Off in production: with both variables unset, `crash_point` is one comparison with None.
"""

from __future__ import annotations

import os
import signal

# Where each point sits. The consumer's inbox and handler points are in both of its paths (one
# lane: a transaction per batch; several lanes: a transaction per message).
POINTS = {
    # the consumer loop (services/runtime/consumer.py)
    "consumer.after_inbox_claim": "inbox keys claimed in the open transaction (one lane: before the handlers; "
                                  "several lanes: at a handler's first statement, after an e-mail is sent)",
    "consumer.after_handler": "handlers ran (an e-mail is sent), transaction not committed",
    "consumer.after_commit": "effects committed, retry and dead-letter copies not produced",
    "consumer.after_copies_produced": "retry and dead-letter copies produced, not acked yet",
    "consumer.after_copies_acked": "copies acked by the broker, offsets not stored",
    "consumer.after_offsets_stored": "offsets stored in the client, not committed to the broker",
    # ordered retries per key, in the consumer loop (services/runtime/held.py)
    "held.after_park": "an event stored behind its key's retried head (committed with several lanes; in the "
                       "batch's open transaction with one lane), its offset not stored",
    "held.after_release_commit": "a held event released: ran and committed, the key's next not started",
    "held.after_release_failure": "a released event failed and is its key's head now (committed), its retry copy "
                                  "not produced",
    "held.after_release_copy_acked": "that retry copy acked by the broker, not yet marked sent in the database",
    # the outbox relays (services/runtime/outbox.py)
    "relay.after_produce": "outbox rows produced, not acked yet",
    "relay.after_ack": "rows acked by the broker, not marked published",
    # the order-status worker (streams/order_status/fold.py, transport.py)
    "status.before_fold": "an input read and decoded, not folded into the table yet",
    "status.after_fold": "an event folded into the table, its changelog record not sent",
    "status.after_changelog_flush": "changelog records sent, input offsets not committed",
}

ENV = "ORDERPIPE_CRASH_AT"
FAIL_ENV = "ORDERPIPE_FAIL_AT"


class InjectedFailure(RuntimeError):
    """Raised at the point ORDERPIPE_FAIL_AT names."""


def _armed() -> tuple[str, int, str] | None:
    armed = [(env, os.environ[env]) for env in (ENV, FAIL_ENV) if os.environ.get(env)]
    if not armed:
        return None
    if len(armed) > 1:
        raise SystemExit(f"set one of {ENV} and {FAIL_ENV}, not both")
    env, spec = armed[0]
    name, _, nth = spec.partition("@")
    if name not in POINTS:
        raise SystemExit(f"{env}={spec}: no such crash point; known: {', '.join(POINTS)}")
    return name, int(nth or 1), env


_ARMED = _armed()
_passes = 0


def crash_point(name: str) -> None:
    """SIGKILL this process (or raise InjectedFailure) if `name` is the armed point and this is
    its armed pass."""
    global _passes
    if _ARMED is None or _ARMED[0] != name:
        return
    _passes += 1
    if _passes != _ARMED[1]:
        return
    if _ARMED[2] == FAIL_ENV:
        raise InjectedFailure(f"{FAIL_ENV}={name}@{_passes}")
    os.kill(os.getpid(), signal.SIGKILL)
