"""One settings object per process, read once from the environment, with working local defaults."""

from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, BaseModel, Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

class WorkerSettings(BaseModel):
    """One consumer service's worker controls, e.g. ORDERPIPE_WORKERS__EMAIL__CONCURRENCY=8 or
    ORDERPIPE_WORKERS='{"email": {"rate_limit_max": 100, "rate_limit_duration_s": 60}}'.
    Unset fields keep the service's defaults (services/runtime/controls.py)."""

    retry_backoff: Literal["fixed", "exponential"] | None = None
    retry_delays_s: list[float] | None = None      # fixed: the wait before retry n; the last repeats
    retry_initial_delay_s: float | None = None     # exponential: initial * multiplier**(n-1), +-jitter, capped
    retry_multiplier: float | None = None
    retry_max_delay_s: float | None = None
    retry_jitter: float | None = None
    retry_max_attempts: int | None = None          # first attempt included; then the dead-letter topic
    concurrency: int | None = None                 # lanes; one order's events never run in parallel
    rate_limit_max: int | None = None              # at most this many messages ...
    rate_limit_duration_s: float | None = None     # ... per this many seconds
    alert_after_attempts: int | None = None
    breaker_enabled: bool | None = None
    breaker_window: int | None = None
    breaker_failure_ratio: float | None = None
    breaker_cooldown_s: float | None = None


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ORDERPIPE_", extra="ignore", env_nested_delimiter="__")

    # Kafka. Unset means "embedded": `orderpipe up` starts the Tansu broker and exports this.
    kafka_bootstrap_servers: str | None = Field(
        default=None, validation_alias=AliasChoices("KAFKA_BOOTSTRAP_SERVERS", "ORDERPIPE_KAFKA_BOOTSTRAP_SERVERS"))
    schema_registry_url: str | None = Field(
        default=None, validation_alias=AliasChoices("SCHEMA_REGISTRY_URL", "ORDERPIPE_SCHEMA_REGISTRY_URL"))
    # Extra librdkafka settings for every client, e.g. security.protocol=SASL_SSL;sasl.mechanism=SCRAM-SHA-512
    kafka_client_config: str = ""

    data_dir: Path = Path(".data")
    # Per-service database URL; default: sqlite:///<data_dir>/<service>.db. A service added with
    # ORDERPIPE_EXTRA_SERVICES reads ORDERPIPE_<NAME>_DATABASE_URL the same way (database_url()).
    orders_database_url: str | None = None
    inventory_database_url: str | None = None
    email_database_url: str | None = None
    invoice_database_url: str | None = None
    analytics_database_url: str | None = None

    api_host: str = "127.0.0.1"
    api_port: int = 8000
    # /healthz, /readyz, /metrics of consumer services and orders-relay (services/runtime/health.py); 0 = off
    health_host: str = "127.0.0.1"
    health_port: int = 9100
    status_url: str = "http://127.0.0.1:6066"  # where the Faust worker's web server answers
    # An order with a step not finished this long after it was created becomes STALLED (alert).
    status_sla_s: float = 300.0
    status_sla_check_interval_s: float | None = None  # default: a tenth of the SLA, 0.5 to 30 s

    smtp_host: str = "127.0.0.1"
    smtp_port: int = 8025
    smtp_username: str | None = None
    smtp_password: str | None = None
    smtp_starttls: bool = False
    mail_from: str = "orders@orderpipe.local"

    initial_stock: int = 1_000_000  # units per SKU seeded into an empty inventory database
    # librdkafka's default. The embedded broker holds a JoinGroup for this long, so `orderpipe up`
    # sets 10 s there (services/tools/brokers/quirks.py: EMBEDDED_CLIENT_ENV).
    max_poll_interval_ms: int = 300_000
    session_timeout_ms: int = 6_000
    consumer_batch_size: int = Field(default=500, ge=1)  # 0 would pause every partition for good
    # How long a fetch may wait for data on the broker. Apache Kafka answers a waiting fetch as
    # soon as data arrives, so this only sets how often an idle consumer asks (librdkafka's
    # default; Faust's worker hard-codes 1,500 ms, streams/order_status/transport.py applies this
    # one). The embedded broker waits it out on every hop, so `orderpipe up` sets 100 ms there
    # (quirks.py: EMBEDDED_CLIENT_ENV; on Tansu that about doubles the broker's CPU per order).
    fetch_wait_max_ms: int = 500
    relay_batch_size: int = Field(default=500, ge=1)
    relay_poll_interval_s: float = 0.05
    # Published outbox rows are deleted after this (they are in Kafka by then).
    outbox_retention_hours: float = 24.0
    # Each process migrates its database on start; turn off to migrate with `orderpipe db upgrade`.
    db_upgrade_on_start: bool = True
    log_level: str = "INFO"
    log_json: bool = True

    # Failures and worker controls per consumer service, keyed by service name (see WorkerSettings).
    workers: dict[str, WorkerSettings] = Field(default_factory=dict)
    alert_webhook_url: str | None = None  # alerts are POSTed here as JSON, from a background thread
    # Fault injection for demos and tests: this share of e-mail sends fail transiently (1 or 2 times).
    email_fail_rate: float = Field(default=0.0, ge=0.0, le=1.0)

    def database_url(self, service: str) -> str:
        url = getattr(self, f"{service}_database_url", None) or os.environ.get(
            f"ORDERPIPE_{service.upper()}_DATABASE_URL")
        return url or f"sqlite:///{(self.data_dir / f'{service}.db').resolve()}"

    @cached_property
    def extra_client_config(self) -> dict[str, str]:
        pairs = [p for p in self.kafka_client_config.split(";") if p.strip()]
        return dict(p.split("=", 1) for p in pairs)

    @property
    def bootstrap(self) -> str:
        if not self.kafka_bootstrap_servers:
            raise RuntimeError("KAFKA_BOOTSTRAP_SERVERS is not set: start the pipeline with `orderpipe up`, "
                               "or export KAFKA_BOOTSTRAP_SERVERS=host:port of your Kafka cluster")
        return self.kafka_bootstrap_servers


def invalid_settings(error: ValidationError) -> list[str]:
    """One line per rejected setting, named as the environment variable to fix, for a
    ValidationError of Settings (a bad ORDERPIPE_* value ends a command with these, not a trace)."""
    lines = []
    for problem in error.errors():
        field, *nested = [str(part) for part in problem["loc"]]
        info = Settings.model_fields.get(field)
        alias = getattr(info.validation_alias, "choices", None) if info else None
        name = alias[0] if alias else "__".join(["ORDERPIPE_" + field, *nested]).upper()
        lines.append(f"invalid setting {name}={problem.get('input')!r}: {problem['msg']}")
    return lines
