"""The ops console as a process (`orderpipe run ops-console`, started by `orderpipe up`): its
settings, users and session secret checked before it serves, then uvicorn until SIGTERM/SIGINT."""

from __future__ import annotations

import logging
import secrets
import signal
from functools import partial

from services.console.auth import BadUsers, Sessions, Users
from services.console.settings import ConsoleSettings
from services.ops.audit import ops_clients
from services.runtime.settings import Settings

log = logging.getLogger("orderpipe.console")


class ConsoleMisconfigured(Exception):
    """A setting the console cannot start with; the message says which and what to do."""


def build(settings: Settings):
    from services.console.app import create_console
    from services.orders.api import StatusClient

    own = settings.of(ConsoleSettings)
    try:
        users = Users(own.console_users.get_secret_value())
    except BadUsers as exc:
        raise ConsoleMisconfigured(str(exc)) from None
    if not len(users):
        log.warning("no console user is configured (ORDERPIPE_CONSOLE_USERS): nobody can log in")
    secret = own.console_secret.get_secret_value().encode() if own.console_secret else secrets.token_bytes(32)
    sessions = Sessions(secret, own.console_session_hours, own.console_secure_cookies)

    return create_console(settings, users, sessions, StatusClient(settings.status_url),
                          partial(ops_clients, settings)), own


def run(settings: Settings) -> None:
    import uvicorn

    app, own = build(settings)

    def exit_cleanly(*_: object) -> None:
        raise SystemExit(0)

    for stop_signal in (signal.SIGTERM, signal.SIGINT):
        signal.signal(stop_signal, exit_cleanly)
    log.info("ops console listening", extra={"url": f"http://{own.console_host}:{own.console_port}"})
    uvicorn.run(app, host=own.console_host, port=own.console_port, log_level="warning")


def main() -> None:
    from services.runtime.logs import setup_logging

    settings = Settings()
    setup_logging("ops-console", settings.log_level, settings.log_json)
    try:
        run(settings)
    except ConsoleMisconfigured as exc:
        raise SystemExit(f"error: {exc}") from None
