from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from services.email.mailer import MailDeliveryError, OutgoingMail, SmtpMailer, message_id_for
from services.email.smtp_sink import SmtpSink, read_maildir

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

REPO = Path(__file__).resolve().parents[2]


def mail(event_id: str = "evt-1", recipient: str = "ada@example.com") -> OutgoingMail:
    return OutgoingMail(
        message_id=message_id_for(event_id),
        sender="orders@orderpipe.local",
        recipient=recipient,
        subject="Order ord-1 confirmed",
        text="Thanks for your order ord-1.",
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sink_keeps_resends_as_separate_messages(tmp_path: Path):
    maildir = tmp_path / "mail"
    with SmtpSink(maildir) as sink:
        assert sink.port > 0
        with SmtpMailer("127.0.0.1", sink.port, timeout=5) as mailer:
            mailer.send(mail())
            mailer.send(mail())  # resend after a "crash": same Message-ID
        msgs = sink.messages()
    assert len(msgs) == 2
    for m in msgs:
        assert m["Message-ID"] == "<evt-1@orderpipe.local>"
        assert m["Subject"] == "Order ord-1 confirmed"
        assert m["To"] == "ada@example.com"
        assert m["X-Envelope-To"] == "ada@example.com"
        assert "Thanks for your order ord-1." in m.get_content()
    files = sorted(p.name for p in maildir.iterdir())
    assert len(files) == 2 and all(f.endswith(".eml") for f in files)
    # another reader (e.g. another process) sees the same thing
    assert [m["Message-ID"] for m in read_maildir(maildir)] == [m["Message-ID"] for m in msgs]


def test_mailer_reconnects_after_sink_restart(tmp_path: Path):
    maildir = tmp_path / "mail"
    sink = SmtpSink(maildir).start()
    port = sink.port
    mailer = SmtpMailer("127.0.0.1", port, timeout=5)
    try:
        mailer.send(mail("a"))
        sink.stop()
        with pytest.raises(MailDeliveryError):
            mailer.send(mail("b"))
        sink = SmtpSink(maildir, port=port).start()
        mailer.send(mail("c"))
    finally:
        mailer.close()
        sink.stop()
    assert [m["Message-ID"] for m in read_maildir(maildir)] == [message_id_for("a"), message_id_for("c")]


def test_closed_port_raises_delivery_error():
    port = free_port()
    mailer = SmtpMailer("127.0.0.1", port, timeout=2)
    with pytest.raises(MailDeliveryError):
        mailer.send(mail())


def test_sink_as_subprocess_stops_on_sigterm(tmp_path: Path):
    maildir = tmp_path / "maildir"
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.email.smtp_sink", "--maildir", str(maildir), "--port", "0"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        m = re.fullmatch(r"smtp sink listening on 127\.0\.0\.1:(\d+), storing in (.+)\n", line)
        assert m, f"unexpected first line {line!r}; stderr: {proc.stderr.read() if proc.poll() is not None else ''}"
        port = int(m.group(1))
        assert m.group(2) == str(maildir)
        with SmtpMailer("127.0.0.1", port, timeout=5) as mailer:
            mailer.send(mail("sub-1"))
        msgs = read_maildir(maildir)
        assert [x["Message-ID"] for x in msgs] == ["<sub-1@orderpipe.local>"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    # nothing listens on the port any more
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


def test_with_a_login_set_the_sink_takes_exactly_that_login(tmp_path: Path):
    """ORDERPIPE_SMTP_USERNAME/PASSWORD in the sink's environment: the e-mail service's login is
    checked as a provider would; a wrong or missing one is a retryable error that names the
    settings (the mail is not at fault) and never shows the password."""
    maildir, password = tmp_path / "maildir", "smtp-pw-0b7e"
    env = {**os.environ, "ORDERPIPE_SMTP_USERNAME": "shop", "ORDERPIPE_SMTP_PASSWORD": password}
    proc = subprocess.Popen([sys.executable, "-m", "services.email.smtp_sink", "--maildir", str(maildir),
                             "--port", "0"], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        line = proc.stdout.readline()
        port = int(re.match(r"smtp sink listening on 127\.0\.0\.1:(\d+), .*, login required\n", line)[1])
        with SmtpMailer("127.0.0.1", port, timeout=5, username="shop", password=password) as mailer:
            mailer.send(mail("login-1"))
        for username, given in (("shop", "not-" + password), (None, None)):
            with SmtpMailer("127.0.0.1", port, timeout=5, username=username, password=given) as mailer, \
                    pytest.raises(MailDeliveryError) as refused:
                mailer.send(mail("login-2"))
            assert "refused the login" in str(refused.value) and "ORDERPIPE_SMTP_PASSWORD" in str(refused.value)
            assert password not in str(refused.value)
        assert [x["Message-ID"] for x in read_maildir(maildir)] == ["<login-1@orderpipe.local>"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        assert password not in proc.stdout.read() + proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()


@pytest.mark.parametrize("recipient", ["zoë@example.com", "zoë@例え.jp"])
def test_an_address_outside_ascii_is_delivered_with_smtputf8(tmp_path: Path, recipient: str):
    """The mail's bytes came out ASCII (To: as an encoded word), so the mailer sent it as plain
    ASCII and its RCPT TO failed to encode: every such order's mail was dead-lettered as "not
    retryable" (UnicodeEncodeError), found by the HTTP-contract e2e test."""
    with SmtpSink(tmp_path / "mail") as sink:
        with SmtpMailer("127.0.0.1", sink.port, timeout=5) as mailer:
            mailer.send(mail(recipient=recipient))
        [received] = sink.messages()
    assert received["X-Envelope-To"] == recipient
    assert received["To"] == recipient
    assert received["Message-ID"] == "<evt-1@orderpipe.local>"
    assert "Thanks for your order ord-1." in received.get_content()
