"""The ops console's settings (ORDERPIPE_CONSOLE_*): where it listens, who may log in, how its
sessions are signed."""

from __future__ import annotations

from pydantic import Field, SecretStr

from services.runtime.settings import ServiceSettings


class ConsoleSettings(ServiceSettings):
    console_host: str = "127.0.0.1"  # ORDERPIPE_CONSOLE_HOST; loopback unless configured
    console_port: int = 8010  # ORDERPIPE_CONSOLE_PORT
    # Who may log in: `name:role:hash` entries separated by commas, role `viewer` or `operator`,
    # hash from `orderpipe console hash-password` (services/console/auth.py). Nobody by default.
    console_users: SecretStr = Field(default=SecretStr(""))
    # Signs the session cookies. Unset: a random one per start (sessions end when it restarts,
    # and two replicas would not know each other's): set it in production, from a Secret.
    console_secret: SecretStr | None = None
    # Send the session cookie over HTTPS only: on whenever the console is behind TLS.
    console_secure_cookies: bool = False
    console_session_hours: float = Field(default=8.0, gt=0)
