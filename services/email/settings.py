"""The e-mail service's own settings (ORDERPIPE_SMTP_*, ORDERPIPE_MAIL_FROM, ...)."""

from pydantic import Field, SecretStr

from services.runtime.settings import ServiceSettings


class EmailSettings(ServiceSettings):
    smtp_host: str = "127.0.0.1"
    smtp_port: int = 8025
    smtp_username: str | None = None
    smtp_password: SecretStr | None = None  # masked in any repr or log line
    smtp_starttls: bool = False
    mail_from: str = "orders@orderpipe.local"
    # Fault injection for demos and tests: this share of sends fail transiently (1 or 2 times).
    email_fail_rate: float = Field(default=0.0, ge=0.0, le=1.0)
