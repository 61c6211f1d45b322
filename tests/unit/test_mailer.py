from __future__ import annotations

import smtplib

import pytest

from services.email.mailer import (
    MailDeliveryError,
    MailRejected,
    OutgoingMail,
    RecordingMailer,
    _map_error,
    build_message,
    message_bytes,
    message_id_for,
)


def mail(recipient: str = "ada@example.com", event_id: str = "e-1") -> OutgoingMail:
    return OutgoingMail(
        message_id=message_id_for(event_id),
        sender="orders@orderpipe.local",
        recipient=recipient,
        subject="Your order ord-1",
        text="Thanks for your order.",
    )


def test_message_id_is_deterministic():
    assert message_id_for("3f2a-01") == "<3f2a-01@orderpipe.local>"
    assert message_id_for("3f2a-01") == message_id_for("3f2a-01")
    assert message_id_for("3f2a-01", domain="shop.example") == "<3f2a-01@shop.example>"
    assert message_id_for("a") != message_id_for("b")


@pytest.mark.parametrize("bad", ["", "a b", "a@b", "<a>", "a\nb"])
def test_message_id_rejects_unsafe_event_ids(bad):
    with pytest.raises(ValueError):
        message_id_for(bad)


def test_build_message_headers():
    msg = build_message(mail())
    assert msg["Message-ID"] == "<e-1@orderpipe.local>"
    assert msg["To"] == "ada@example.com"
    assert msg["From"] == "orders@orderpipe.local"
    assert msg["Subject"] == "Your order ord-1"
    assert msg["Date"]
    assert msg.get_content().strip() == "Thanks for your order."


DATE = "Mon, 07 Dec 2026 10:00:00 +0000"


@pytest.mark.parametrize("changes", [
    {},
    {"text": "Thank you for your order ord-1.\n\n  2 x SKU-001 @ 9.90 EUR\n\nTotal: 19.80 EUR\n"},
    {"text": "no newline at the end"},
    {"text": "a line\n\n\n"},
    {"text": ".a line that starts with a dot\n"},
    {"text": "tabs\tand a form\x0cfeed\n"},
    {"text": "Grüße aus Köln\n"},                                   # not ASCII: the email package's path
    {"text": "a CR\r\nline end\r\n"},
    {"text": "x" * 1200 + "\n"},                                     # longer than a line may be
    {"subject": "Your order " + "0123456789" * 9},                    # a header that must be folded
    {"subject": "Votre commande n° 1"},
    {"recipient": "zoë@example.com"},
])
def test_message_bytes_are_what_the_email_package_would_send(changes):
    """The direct writer and the email package produce the same mail, byte for byte, whichever
    path a mail takes."""
    m = OutgoingMail(**{**mail().__dict__, **changes})
    expected = build_message(m)
    expected.replace_header("Date", DATE)
    assert message_bytes(m, DATE) == expected.as_bytes(policy=smtplib.email.policy.SMTP)


def test_a_line_break_in_a_header_is_refused_not_sent():
    with pytest.raises(ValueError):
        message_bytes(OutgoingMail(**{**mail().__dict__, "subject": "hi\r\nBcc: everyone@example.com"}))


def test_recording_mailer_records_every_send_including_duplicates():
    m = RecordingMailer()
    m.send(mail())
    m.send(mail())
    assert m.sent == [mail(), mail()]
    assert m.attempts == 2


def test_recording_mailer_fails_first_n_then_succeeds():
    m = RecordingMailer(fail_times=2)
    for _ in range(2):
        with pytest.raises(MailDeliveryError):
            m.send(mail())
    assert m.sent == []
    m.send(mail())
    assert m.sent == [mail()]
    assert m.attempts == 3


def test_recording_mailer_rejects_configured_recipients():
    m = RecordingMailer(reject_recipients={"bad@example.com"})
    with pytest.raises(MailRejected):
        m.send(mail("bad@example.com"))
    m.send(mail("ok@example.com"))
    assert [x.recipient for x in m.sent] == ["ok@example.com"]


@pytest.mark.parametrize(
    "exc, expected",
    [
        (ConnectionRefusedError(111, "refused"), MailDeliveryError),
        (TimeoutError("timed out"), MailDeliveryError),
        (smtplib.SMTPServerDisconnected("gone"), MailDeliveryError),
        (smtplib.SMTPRecipientsRefused({"a@x": (550, b"no such user")}), MailRejected),
        (smtplib.SMTPRecipientsRefused({"a@x": (450, b"mailbox busy")}), MailDeliveryError),
        (smtplib.SMTPSenderRefused(451, b"try later", "s@x"), MailDeliveryError),
        (smtplib.SMTPDataError(554, b"rejected"), MailRejected),
        (smtplib.SMTPDataError(421, b"closing"), MailDeliveryError),
        (smtplib.SMTPConnectError(554, b"no service"), MailRejected),
    ],
)
def test_error_mapping(exc, expected):
    mapped = _map_error(exc)
    assert type(mapped) is expected
