"""A local SMTP sink for the embedded/demo mode and for tests.

Every message received is stored as its own ``.eml`` file in ``maildir`` (written
atomically: a hidden temporary file in the same folder, fsync, then ``os.replace``).
Duplicates are kept on purpose: a resent message with the same Message-ID is stored
twice, so tests can count resends. File names sort in arrival order.

Two envelope headers are prepended to each stored message, ``X-Envelope-From`` and
``X-Envelope-To``, so a reader sees who the message was really delivered to.

Recipients in the reserved ``.invalid`` top-level domain (RFC 2606), e.g.
``someone@example.invalid``, are refused with ``550 5.1.1``, as a real server refuses an
unknown mailbox: the demo uses them for orders whose e-mail fails permanently.

With ``ORDERPIPE_SMTP_USERNAME`` (and ``ORDERPIPE_SMTP_PASSWORD``) in its environment, the
sink requires exactly that login (AUTH PLAIN or LOGIN), so the e-mail service's login is
exercised as a provider would check it.

Nothing here touches the network at import time; servers bind to 127.0.0.1 by default.
"""

from __future__ import annotations

import argparse
import asyncio
import email.message
import email.policy
import itertools
import logging
import os
import signal
import socket
import sys
import threading
import time
import uuid
import warnings
from email.parser import BytesParser
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, Session

from services.runtime.files import write_atomically

__all__ = ["SmtpSink", "MaildirHandler", "read_maildir", "main"]

_counter = itertools.count()
_counter_lock = threading.Lock()


def _next_name() -> str:
    with _counter_lock:
        n = next(_counter)
    # time first so that a lexical sort gives arrival order (across processes too)
    return f"{time.time_ns():020d}-{os.getpid()}-{n:08d}-{uuid.uuid4().hex[:12]}.eml"




def _header_safe(value: str) -> str:
    return value.replace("\r", " ").replace("\n", " ")


class MaildirHandler:
    """aiosmtpd handler: stores each DATA as one .eml file."""

    def __init__(self, maildir: Path) -> None:
        self.maildir = Path(maildir)
        self.maildir.mkdir(parents=True, exist_ok=True)

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope, address: str,
                          rcpt_options: list[str]) -> str:
        if address.rstrip(">").lower().endswith(".invalid"):
            return f"550 5.1.1 <{address}>: mailbox unavailable (the sink refuses the .invalid domain)"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content = envelope.original_content
        if content is None:  # decode_data=True was used
            raw = envelope.content
            content = raw.encode("utf-8") if isinstance(raw, str) else (raw or b"")
        prefix = (
            f"X-Envelope-From: {_header_safe(str(envelope.mail_from or ''))}\r\n"
            f"X-Envelope-To: {_header_safe(', '.join(envelope.rcpt_tos))}\r\n"
        ).encode("utf-8")
        try:
            write_atomically(self.maildir / _next_name(), prefix + content)
        except OSError as exc:
            # a temporary local problem: tell the client to retry later
            return f"451 4.3.0 could not store message: {exc.strerror or exc}"
        return "250 OK message stored"


def read_maildir(maildir: Path) -> list[email.message.EmailMessage]:
    """All messages stored in ``maildir`` so far, in arrival order."""
    directory = Path(maildir)
    if not directory.is_dir():
        return []
    parser = BytesParser(policy=email.policy.default)
    out: list[email.message.EmailMessage] = []
    for path in sorted(p for p in directory.glob("*.eml") if not p.name.startswith(".")):
        try:
            data = path.read_bytes()
        except FileNotFoundError:  # removed concurrently
            continue
        out.append(parser.parsebytes(data))  # type: ignore[arg-type]
    return out


def _bind(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class OneLogin:
    """aiosmtpd authenticator: accepts exactly one user name and password (AUTH PLAIN or LOGIN)."""

    def __init__(self, username: str, password: str) -> None:
        self._login = (username.encode(), password.encode())

    def __call__(self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any) -> AuthResult:
        given = (getattr(auth_data, "login", None), getattr(auth_data, "password", None))
        return AuthResult(success=given == self._login, handled=False)


def _smtp_factory(handler: MaildirHandler, login: OneLogin | None = None) -> Any:
    if login is None:
        return lambda: SMTP(handler, enable_SMTPUTF8=True, hostname="orderpipe-sink", timeout=60)
    # Plain AUTH without TLS: the sink listens on loopback only, for demos and tests; aiosmtpd's
    # warning about it (a warning and a log line per connection) is said once here instead.
    logging.getLogger("mail.log").setLevel(logging.ERROR)

    def server() -> SMTP:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return SMTP(handler, enable_SMTPUTF8=True, hostname="orderpipe-sink", timeout=60,
                        authenticator=login, auth_required=True, auth_require_tls=False)

    return server


class SmtpSink:
    """SMTP server on a background thread, storing into ``maildir``.

    ``port=0`` picks a free port; read the real one from ``.port`` after ``start()``.
    """

    def __init__(self, maildir: Path, host: str = "127.0.0.1", port: int = 0) -> None:
        self.maildir = Path(maildir)
        self.host = host
        self.port = port
        self._handler = MaildirHandler(self.maildir)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.AbstractServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> "SmtpSink":
        if self._thread is not None:
            raise RuntimeError("SmtpSink already started")
        sock = _bind(self.host, self.port)
        self.port = sock.getsockname()[1]
        loop = asyncio.new_event_loop()
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                self._server = loop.run_until_complete(
                    loop.create_server(_smtp_factory(self._handler), sock=sock)
                )
            except BaseException as exc:  # pragma: no cover - reported to start()
                failure.append(exc)
                sock.close()
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()

        self._loop = loop
        self._thread = threading.Thread(target=run, name=f"smtp-sink-{self.port}", daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            self._thread.join()
            self._thread = None
            self._loop = None
            raise failure[0]
        return self

    def stop(self) -> None:
        loop, thread, server = self._loop, self._thread, self._server
        if loop is None or thread is None:
            return

        async def shutdown() -> None:
            if server is not None:
                server.close()
                await server.wait_closed()
            current = asyncio.current_task()
            tasks = [t for t in asyncio.all_tasks() if t is not current]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            loop.stop()

        loop.call_soon_threadsafe(lambda: loop.create_task(shutdown()))
        thread.join(timeout=10)
        self._loop = self._thread = self._server = None

    def messages(self) -> list[email.message.EmailMessage]:
        return read_maildir(self.maildir)

    def __enter__(self) -> "SmtpSink":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


async def _serve(maildir: Path, host: str, port: int, login: OneLogin | None) -> None:
    loop = asyncio.get_running_loop()
    sock = _bind(host, port)
    real_port = sock.getsockname()[1]
    server = await loop.create_server(_smtp_factory(MaildirHandler(maildir), login), sock=sock)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"smtp sink listening on {host}:{real_port}, storing in {maildir}"
          + (", login required" if login else ""), flush=True)
    try:
        await stop.wait()
    finally:
        server.close()
        await server.wait_closed()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m services.email.smtp_sink",
        description="Local SMTP sink: stores every received message as one .eml file.",
    )
    parser.add_argument("--maildir", required=True, type=Path, help="folder for the .eml files")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=1025, help="port (0 = pick a free one)")
    args = parser.parse_args(argv)
    # The e-mail service's own login settings, read from the environment (never from argv, which
    # `ps` shows): set, the sink requires exactly that login, as the provider would.
    from services.email.settings import EmailSettings

    mail = EmailSettings()
    login = (OneLogin(mail.smtp_username, mail.smtp_password.get_secret_value() if mail.smtp_password else "")
             if mail.smtp_username else None)
    try:
        asyncio.run(_serve(args.maildir, args.host, args.port, login))
    except OSError as exc:
        print(f"smtp sink: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
