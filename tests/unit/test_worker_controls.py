"""The pure parts of failure handling and worker controls, with fake clocks: retry delays, the
rate limit window, the circuit breaker's states, per-key lanes and the offsets they allow,
settings overrides, alerts whose webhook fails, and the e-mail fault injection."""

from __future__ import annotations

import logging
import random
import threading
from dataclasses import dataclass

import pytest

from services.email.faults import FlakyMailer, injected_failures
from services.email.mailer import MailDeliveryError, RecordingMailer
from services.runtime import metrics
from services.runtime.alerts import DEAD_LETTERED, Alerter
from services.runtime.circuit import CLOSED, HALF_OPEN, OPEN, BreakerConfig, CircuitBreaker
from services.runtime.concurrency import done_prefix, split_by_key
from services.runtime.controls import WorkerControls
from services.runtime.ratelimit import RateLimit, RateLimiter
from services.runtime.retry_policy import RetryPolicy
from services.runtime.settings import Settings


class FakeClock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


# -- retry policy -------------------------------------------------------------------------------


def test_fixed_delays_follow_the_tiers_and_the_last_one_repeats():
    policy = RetryPolicy.fixed(1, 10, 60)
    assert [policy.delay_s(n) for n in (1, 2, 3)] == [1, 10, 60]
    assert policy.attempts == 4  # the first try and one per delay
    assert RetryPolicy.fixed(1, 10, 60, max_attempts=6).delay_s(5) == 60


def test_exponential_delays_grow_are_capped_and_jittered_within_bounds():
    policy = RetryPolicy.exponential(initial_delay_s=1, multiplier=3, max_delay_s=20, jitter=0.2, max_attempts=6)
    assert [policy.delay_s(n, rand=lambda: 0.5) for n in range(1, 6)] == [1, 3, 9, 20, 20]  # 0.5: no spread
    rng = random.Random(1)
    delays = [policy.delay_s(2, rand=rng.random) for _ in range(500)]
    assert 3 * 0.8 <= min(delays) < 3 * 0.85 and 3 * 1.15 < max(delays) <= 3 * 1.2
    assert all(policy.delay_s(9, rand=rng.random) <= 20 for _ in range(100))
    assert policy.attempts == 6
    assert RetryPolicy.exponential(multiplier=2).delay_s(10_000, rand=lambda: 0.5) == 60  # no overflow


@pytest.mark.parametrize("bad", [dict(backoff="linear"), dict(delays_s=(-1.0,)), dict(jitter=1.5),
                                 dict(max_attempts=0)])
def test_retry_policy_rejects_nonsense(bad):
    with pytest.raises(ValueError):
        RetryPolicy(**bad)


# -- rate limit ---------------------------------------------------------------------------------


def test_rate_limit_allows_at_most_n_in_any_window():
    clock = FakeClock()
    limiter = RateLimiter(RateLimit(3, 1.0), clock)
    assert limiter.available() == 3 and limiter.wait_s() == 0
    limiter.record(2)
    clock.advance(0.4)
    limiter.record(1)
    assert limiter.available() == 0
    assert limiter.wait_s() == pytest.approx(0.6)  # when the first two leave the window
    clock.advance(0.6)
    assert limiter.available() == 2
    clock.advance(0.4)
    assert limiter.available() == 3


def test_rate_limit_simulated_for_a_minute_never_exceeds_the_limit():
    clock = FakeClock(0.0)
    limiter = RateLimiter(RateLimit(10, 2.0), clock)
    handled: list[float] = []
    rng = random.Random(3)
    while clock.now < 60:
        n = min(limiter.available(), rng.randint(1, 7))  # the loop polls at most what is available
        if n:
            clock.advance(rng.random() * 0.05)  # handling takes a while; recorded when done
            handled += [clock.now] * n
            limiter.record(n)
        clock.advance(max(limiter.wait_s(), 0.01))
    for t in handled:
        assert sum(1 for u in handled if t <= u < t + 2.0) <= 10
    assert len(handled) >= 10 * 60 / 2.0 * 0.9  # and it does not throttle more than it must


# -- circuit breaker ----------------------------------------------------------------------------


@dataclass
class Recorder:
    changes: list

    def __call__(self, old, new, why):
        self.changes.append((old, new))


def test_breaker_opens_probes_once_and_closes_when_the_probe_succeeds():
    clock, seen = FakeClock(), Recorder([])
    breaker = CircuitBreaker(BreakerConfig(window=4, failure_ratio=0.75, cooldown_s=10), clock, seen)
    for failed in (True, False, True):
        assert breaker.allow()
        breaker.record_failure() if failed else breaker.record_success()
    assert breaker.state == CLOSED  # 2 of 3: the window is not full yet
    breaker.record_failure()
    assert breaker.state == OPEN and not breaker.allow()
    assert breaker.remaining_s() == 10
    clock.advance(9.9)
    assert not breaker.allow()
    clock.advance(0.1)
    assert breaker.allow()          # the probe
    assert not breaker.allow()      # only one at a time
    breaker.record_success()
    assert breaker.state == CLOSED and breaker.allow()
    assert seen.changes == [(CLOSED, OPEN), (OPEN, HALF_OPEN), (HALF_OPEN, CLOSED)]


def test_breaker_reopens_when_the_probe_fails_and_ignores_permanent_failures():
    clock = FakeClock()
    breaker = CircuitBreaker(BreakerConfig(window=3, failure_ratio=1.0, cooldown_s=5), clock)
    for _ in range(10):
        breaker.record_neutral()  # permanent errors, duplicates: not the dependency's fault
    breaker.record_failure(), breaker.record_failure(), breaker.record_success()
    assert breaker.state == CLOSED
    for _ in range(3):
        breaker.record_failure()
    assert breaker.state == OPEN
    clock.advance(5)
    assert breaker.allow()
    breaker.record_neutral()        # the probe said nothing: another probe may go
    assert breaker.state == HALF_OPEN and breaker.allow()
    breaker.record_failure()
    assert breaker.state == OPEN and breaker.remaining_s() == 5


def test_breaker_is_safe_across_threads():
    breaker = CircuitBreaker(BreakerConfig(window=50, failure_ratio=1.0, cooldown_s=60))
    threads = [threading.Thread(target=lambda: [breaker.record_failure() for _ in range(100)]) for _ in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert breaker.state == OPEN


# -- lanes and offsets --------------------------------------------------------------------------


@dataclass(frozen=True)
class Msg:
    t: str
    p: int
    o: int
    k: bytes

    def topic(self): return self.t
    def partition(self): return self.p
    def offset(self): return self.o
    def key(self): return self.k


def test_split_by_key_keeps_each_keys_messages_together_and_in_order():
    msgs = [Msg("t", i % 2, i, f"k{i % 5}".encode()) for i in range(40)]
    lanes = split_by_key(msgs, 3, key=Msg.key)
    assert len(lanes) == 3
    assert sorted(len(lane) for lane in lanes) == [8, 16, 16]  # 5 keys of 8 dealt over 3 lanes
    for lane in lanes:
        for key in {m.k for m in lane}:
            assert [m for m in lane if m.k == key] == [m for m in msgs if m.k == key]
    assert sum(len(lane) for lane in lanes) == 40
    assert split_by_key(msgs[:3], 8, key=Msg.key) == [[msgs[0]], [msgs[1]], [msgs[2]]]
    assert split_by_key([], 4, key=Msg.key) == []


def test_offsets_only_move_over_the_contiguous_done_prefix():
    batch = [Msg("a", 0, o, b"x") for o in (5, 6, 7, 8)] + [Msg("a", 1, o, b"y") for o in (3, 4)] + \
            [Msg("b", 0, 9, b"z")]
    done = {("a", 0, 5), ("a", 0, 6), ("a", 0, 8), ("a", 1, 3), ("a", 1, 4)}
    store, rewind = done_prefix(batch, done)
    assert store == {("a", 0): 7, ("a", 1): 5}
    assert rewind == {("a", 0): 7, ("b", 0): 9}


# -- settings -----------------------------------------------------------------------------------


def test_worker_settings_from_the_environment_override_the_service_defaults(monkeypatch):
    monkeypatch.setenv("ORDERPIPE_WORKERS__EMAIL__CONCURRENCY", "4")
    monkeypatch.setenv("ORDERPIPE_WORKERS__EMAIL__RATE_LIMIT_MAX", "100")
    monkeypatch.setenv("ORDERPIPE_WORKERS__EMAIL__RATE_LIMIT_DURATION_S", "60")
    monkeypatch.setenv("ORDERPIPE_WORKERS__EMAIL__RETRY_BACKOFF", "exponential")
    monkeypatch.setenv("ORDERPIPE_WORKERS__EMAIL__RETRY_MAX_ATTEMPTS", "6")
    monkeypatch.setenv("ORDERPIPE_WORKERS__EMAIL__BREAKER_COOLDOWN_S", "5")
    monkeypatch.setenv("ORDERPIPE_WORKERS__INVOICE__RETRY_DELAYS_S", "[2, 4]")
    monkeypatch.setenv("ORDERPIPE_WORKERS__ANALYTICS__BREAKER_ENABLED", "false")
    settings = Settings()
    declared = (1.0, 10.0, 60.0)

    email = WorkerControls(concurrency=8).with_settings(settings.workers["email"], declared)
    assert email.concurrency == 4
    assert (email.rate_limit.max_events, email.rate_limit.per_seconds) == (100, 60)
    assert email.retry.backoff == "exponential" and email.retry.attempts == 6
    assert (email.breaker.cooldown_s, email.breaker.window) == (5, 20)
    invoice = WorkerControls().with_settings(settings.workers["invoice"], declared)
    assert invoice.retry_policy(declared).delays_s == (2, 4) and invoice.concurrency == 1
    assert WorkerControls().with_settings(settings.workers["analytics"], declared).breaker is None
    assert WorkerControls().with_settings(settings.workers.get("inventory"), declared) == WorkerControls()
    assert WorkerControls().retry_policy(declared) == RetryPolicy.fixed(1, 10, 60)


# -- alerts -------------------------------------------------------------------------------------


def test_a_failing_webhook_never_breaks_the_caller_and_the_alert_is_still_logged(caplog):
    posted, calls = threading.Event(), []

    def broken(url, payload):
        calls.append(payload)
        posted.set()
        raise ConnectionRefusedError("webhook down")

    alerter = Alerter("g-alerts", "http://127.0.0.1:9/hook", post=broken)
    before = metrics.ALERTS.labels("g-alerts", DEAD_LETTERED)._value.get()
    with caplog.at_level(logging.WARNING, logger="services.runtime.alerts"):
        alerter.alert(DEAD_LETTERED, "message dead-lettered", order_id="o-1", attempt=4)
        assert posted.wait(5)
        alerter.close()
    assert calls[0]["alert"] == DEAD_LETTERED and calls[0]["order_id"] == "o-1" and calls[0]["group"] == "g-alerts"
    assert metrics.ALERTS.labels("g-alerts", DEAD_LETTERED)._value.get() == before + 1
    messages = [r.getMessage() for r in caplog.records]
    assert "message dead-lettered" in messages and "alert webhook failed" in messages


def test_alerts_without_a_webhook_start_no_thread():
    alerter = Alerter("g-quiet")
    alerter.alert(DEAD_LETTERED, "x")
    assert alerter._thread is None


# -- e-mail fault injection ---------------------------------------------------------------------


def test_flaky_mailer_fails_a_share_of_mails_once_or_twice_then_delivers():
    from services.email.mailer import OutgoingMail, message_id_for

    inner = RecordingMailer()
    mailer = FlakyMailer(inner, 0.3)
    mails = [OutgoingMail(message_id_for(f"e-{i}"), "s@x.org", f"c{i}@example.com", "s", "t") for i in range(1000)]
    failures = 0
    for mail in mails:
        for attempt in range(3):
            try:
                mailer.send(mail)
                break
            except MailDeliveryError:
                failures += 1
        else:
            pytest.fail("a mail failed three times")
    assert len(inner.sent) == 1000
    chosen = sum(1 for m in mails if injected_failures(m.message_id, 0.3))
    assert 250 < chosen < 350
    assert chosen < failures < 2 * chosen
    assert injected_failures(mails[0].message_id, 0.0) == 0
    assert all(injected_failures(m.message_id, 1.0) in (1, 2) for m in mails[:50])
