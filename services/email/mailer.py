"""Sending the order confirmation over SMTP (smtplib).

Errors are mapped to two classes so the consumer can decide what to do:

* :class:`MailDeliveryError` - transient (connection refused, timeouts, disconnects,
  4xx replies, TLS/socket errors): the caller retries (retry topics).
* :class:`MailRejected` - permanent (any 5xx reply, e.g. recipient refused):
  retrying will not help; the caller dead-letters.

Message-IDs are deterministic per event (:func:`message_id_for`), so a resend after a
crash between "SMTP accepted" and "DB commit" is recognisable downstream.
"""

from __future__ import annotations

import smtplib
import ssl
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from email.message import EmailMessage
from email.policy import SMTP as SMTP_POLICY
from email.utils import format_datetime, formatdate

__all__ = [
    "MailDeliveryError",
    "MailRejected",
    "OutgoingMail",
    "message_id_for",
    "build_message",
    "message_bytes",
    "SmtpMailer",
    "RecordingMailer",
]


class MailDeliveryError(Exception):
    """Transient failure: the caller should retry later."""

    def __init__(self, message: str, smtp_code: int | None = None) -> None:
        super().__init__(message)
        self.smtp_code = smtp_code


class MailRejected(Exception):
    """Permanent failure (5xx): retrying the same mail will not help."""

    def __init__(self, message: str, smtp_code: int | None = None) -> None:
        super().__init__(message)
        self.smtp_code = smtp_code


@dataclass(frozen=True)
class OutgoingMail:
    message_id: str
    sender: str
    recipient: str
    subject: str
    text: str


def message_id_for(event_id: str, domain: str = "orderpipe.local") -> str:
    """``<{event_id}@{domain}>``: the same event always gets the same Message-ID."""
    event_id = str(event_id)
    for label, value in (("event_id", event_id), ("domain", domain)):
        if not value or any(c in value for c in "<>@ \t\r\n"):
            raise ValueError(f"invalid {label} for a Message-ID: {value!r}")
    return f"<{event_id}@{domain}>"


def build_message(mail: OutgoingMail) -> EmailMessage:
    msg = EmailMessage()
    msg["Message-ID"] = mail.message_id
    msg["Date"] = formatdate(usegmt=True)
    msg["From"] = mail.sender
    msg["To"] = mail.recipient
    msg["Subject"] = mail.subject
    msg.set_content(mail.text)
    return msg


# Lines of a mail as the email package writes them (RFC 5322 recommends at most 78 characters
# per header line; 998 is the hard limit for any line).
_MAX_HEADER_LINE, _MAX_LINE = 78, 998


def message_bytes(mail: OutgoingMail, date: str | None = None) -> bytes:
    """The mail as it goes over SMTP (CRLF line ends). The usual mail (ASCII headers that need
    no folding, an ASCII body) is written here directly: the email package's header registry and
    generator took a third of the e-mail service's CPU per order (issue #18): 1.2 ms a mail, against
    0.01 ms here.
    Anything else (non-ASCII, long lines, a line break in a header) goes through
    `build_message`, which encodes it properly or refuses it, so the result is what the email
    package would have sent either way."""
    date = date or format_datetime(datetime.now(UTC))  # "+0000", as the email package writes it
    headers = (("Message-ID", mail.message_id), ("Date", date), ("From", mail.sender),
               ("To", mail.recipient), ("Subject", mail.subject))
    # the email package splits a body at CR and LF only (bytes.splitlines), never at \v or \f
    body_lines = mail.text.removesuffix("\n").split("\n")
    plain = (all(value.isascii() and value.isprintable() and len(name) + 2 + len(value) <= _MAX_HEADER_LINE
                 for name, value in headers)
             and mail.text.isascii() and all(len(line) <= _MAX_LINE for line in body_lines)
             and "\r" not in mail.text)
    if not plain:
        msg = build_message(mail)
        msg.replace_header("Date", date)
        return msg.as_bytes(policy=SMTP_POLICY)
    head = "".join(f"{name}: {value}\r\n" for name, value in headers)
    return (f"{head}Content-Type: text/plain; charset=\"utf-8\"\r\nContent-Transfer-Encoding: 7bit\r\n"
            f"MIME-Version: 1.0\r\n\r\n" + "".join(f"{line}\r\n" for line in body_lines)).encode("ascii")


def _by_code(code: int, what: str) -> Exception:
    if 500 <= code < 600:
        return MailRejected(what, code)
    return MailDeliveryError(what, code)


def _decode(resp: bytes | str) -> str:
    return resp.decode("utf-8", "replace") if isinstance(resp, bytes) else str(resp)


def _map_error(exc: BaseException) -> Exception:
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        details = "; ".join(f"{r}: {c} {_decode(m)}" for r, (c, m) in exc.recipients.items())
        codes = [c for c, _ in exc.recipients.values()]
        # permanent only if every refusal is permanent
        if codes and all(500 <= c < 600 for c in codes):
            return MailRejected(f"recipient refused: {details}", codes[0])
        return MailDeliveryError(f"recipient deferred: {details}", codes[0] if codes else None)
    if isinstance(exc, smtplib.SMTPAuthenticationError) or (
            isinstance(exc, smtplib.SMTPResponseException) and exc.smtp_code == 530):
        # our login (or its absence) is refused: the settings are wrong, not the mail, so it is
        # retried (and replayable once fixed), never dead-lettered as if the address were bad
        return MailDeliveryError(f"the SMTP server refused the login: {exc.smtp_code} {_decode(exc.smtp_error)} "
                                 "(check ORDERPIPE_SMTP_USERNAME and ORDERPIPE_SMTP_PASSWORD)", exc.smtp_code)
    if isinstance(exc, smtplib.SMTPResponseException):
        # SMTPSenderRefused, SMTPDataError, SMTPConnectError, SMTPHeloError, SMTPAuthenticationError
        return _by_code(exc.smtp_code, f"{type(exc).__name__}: {exc.smtp_code} {_decode(exc.smtp_error)}")
    if isinstance(exc, smtplib.SMTPServerDisconnected):
        return MailDeliveryError(f"server disconnected: {exc}")
    if isinstance(exc, (smtplib.SMTPException, OSError)):  # OSError covers timeouts, refused, ssl
        return MailDeliveryError(f"{type(exc).__name__}: {exc}")
    return exc  # pragma: no cover


class SmtpMailer:
    """Sends :class:`OutgoingMail` over reused SMTP connections, one per concurrent sender.

    A connection is taken from an idle pool (or opened), checked with NOOP when reused (and
    replaced if that fails), and returned after a successful send, so N threads sending at
    once use N connections and never wait for each other. Any error during a send closes that
    connection and is raised as :class:`MailDeliveryError` or :class:`MailRejected`.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        timeout: float = 10.0,
        username: str | None = None,
        password: str | None = None,
        starttls: bool = False,
    ) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout
        self.username = username
        self.password = password
        self.starttls = starttls
        self._idle: list[smtplib.SMTP] = []
        self._lock = threading.Lock()

    def _connect(self) -> smtplib.SMTP:
        conn = smtplib.SMTP(self.host, self.port, timeout=self.timeout)
        try:
            conn.ehlo_or_helo_if_needed()
            if self.starttls:
                conn.starttls(context=ssl.create_default_context())
                conn.ehlo()
            if self.username is not None:
                conn.login(self.username, self.password or "")
        except BaseException:
            self._close_quietly(conn)
            raise
        return conn

    @staticmethod
    def _close_quietly(conn: smtplib.SMTP) -> None:
        try:
            conn.close()
        except Exception:  # pragma: no cover
            pass

    def _take(self) -> smtplib.SMTP:
        while True:
            with self._lock:
                conn = self._idle.pop() if self._idle else None
            if conn is None:
                return self._connect()
            try:
                code, _ = conn.noop()
                if code == 250:
                    return conn
            except (smtplib.SMTPException, OSError):
                pass
            self._close_quietly(conn)

    def send(self, mail: OutgoingMail) -> None:
        data = message_bytes(mail)
        conn = None
        try:
            conn = self._take()
            # The envelope's addresses count, not only the bytes: a non-ASCII address makes ASCII
            # bytes (an encoded word in To:), but its RCPT TO still needs SMTPUTF8.
            if data.isascii() and mail.sender.isascii() and mail.recipient.isascii():
                refused = conn.sendmail(mail.sender, [mail.recipient], data)
            else:  # an address outside ASCII needs SMTPUTF8, which send_message negotiates
                refused = conn.send_message(build_message(mail), from_addr=mail.sender, to_addrs=[mail.recipient])
        except (smtplib.SMTPException, OSError) as exc:
            if conn is not None:
                self._close_quietly(conn)
            raise _map_error(exc) from exc
        with self._lock:
            self._idle.append(conn)
        if refused:  # cannot happen with one recipient, but never report success wrongly
            raise _map_error(smtplib.SMTPRecipientsRefused(refused))

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            try:
                conn.quit()
            except (smtplib.SMTPException, OSError):
                self._close_quietly(conn)

    def __enter__(self) -> "SmtpMailer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RecordingMailer:
    """Fake mailer for unit tests.

    ``sent`` holds every successfully "sent" mail (duplicates kept); ``attempts`` counts
    all calls. The first ``fail_times`` sends raise :class:`MailDeliveryError`; mails to a
    recipient in ``reject_recipients`` raise :class:`MailRejected`.
    """

    def __init__(self, fail_times: int = 0, reject_recipients: frozenset[str] | set[str] = frozenset()) -> None:
        if fail_times < 0:
            raise ValueError("fail_times must be >= 0")
        self.fail_times = fail_times
        self.reject_recipients = frozenset(reject_recipients)
        self.sent: list[OutgoingMail] = []
        self.attempts = 0
        self._lock = threading.Lock()

    def send(self, mail: OutgoingMail) -> None:
        with self._lock:
            self.attempts += 1
            if self.fail_times > 0:
                self.fail_times -= 1
                raise MailDeliveryError("simulated transient failure")
            if mail.recipient in self.reject_recipients:
                raise MailRejected(f"simulated rejection of {mail.recipient}", 550)
            self.sent.append(mail)

    def close(self) -> None:
        pass
