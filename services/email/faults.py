"""Fault injection for demos and tests: a mailer wrapper whose sends fail transiently.

`ORDERPIPE_EMAIL_FAIL_RATE=F` makes the email service wrap its mailer in `FlakyMailer`: a share
F of the mails (chosen by a hash of their Message-ID, so the choice is the same in every
process and run) fail with a 421 "try again later" on their first one or two attempts, then go
through. Two failures at most, so with the default three retries every one of them is delivered
in the end: the faults exercise the retry chain without dead-lettering anything.
"""

from __future__ import annotations

import hashlib
import threading
from collections import Counter

from services.email.mailer import MailDeliveryError, OutgoingMail


def injected_failures(message_id: str, fail_rate: float) -> int:
    """How many times the mail with this Message-ID fails before it goes through: 0, 1 or 2."""
    digest = hashlib.sha256(message_id.encode()).digest()
    chosen = int.from_bytes(digest[:8], "big") / 2**64 < fail_rate
    return 1 + digest[8] % 2 if chosen else 0


class FlakyMailer:
    def __init__(self, inner, fail_rate: float):
        if not 0 <= fail_rate <= 1:
            raise ValueError("fail_rate is a share between 0 and 1")
        self.inner = inner
        self.fail_rate = fail_rate
        self.failed: Counter[str] = Counter()  # injected failures so far, per Message-ID
        self._lock = threading.Lock()

    def send(self, mail: OutgoingMail) -> None:
        with self._lock:
            inject = self.failed[mail.message_id] < injected_failures(mail.message_id, self.fail_rate)
            if inject:
                self.failed[mail.message_id] += 1
        if inject:
            raise MailDeliveryError("421 4.3.2 service not available (injected by ORDERPIPE_EMAIL_FAIL_RATE)", 421)
        self.inner.send(mail)

    def close(self) -> None:
        self.inner.close()
