"""One settings object per process, read once from the environment, with working local defaults."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

SERVICES = ("orders", "inventory", "email", "invoice", "analytics")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ORDERPIPE_", extra="ignore")

    # Kafka. Unset means "embedded": `orderpipe up` starts the Tansu broker and exports this.
    kafka_bootstrap_servers: str | None = Field(
        default=None, validation_alias=AliasChoices("KAFKA_BOOTSTRAP_SERVERS", "ORDERPIPE_KAFKA_BOOTSTRAP_SERVERS"))
    schema_registry_url: str | None = Field(
        default=None, validation_alias=AliasChoices("SCHEMA_REGISTRY_URL", "ORDERPIPE_SCHEMA_REGISTRY_URL"))
    # Extra librdkafka settings for every client, e.g. security.protocol=SASL_SSL;sasl.mechanism=SCRAM-SHA-512
    kafka_client_config: str = ""

    data_dir: Path = Path(".data")
    # Per-service database URL; default: sqlite:///<data_dir>/<service>.db
    orders_database_url: str | None = None
    inventory_database_url: str | None = None
    email_database_url: str | None = None
    invoice_database_url: str | None = None
    analytics_database_url: str | None = None

    api_host: str = "127.0.0.1"
    api_port: int = 8000
    status_url: str = "http://127.0.0.1:6066"  # where the Faust worker's web server answers

    smtp_host: str = "127.0.0.1"
    smtp_port: int = 8025
    smtp_username: str | None = None
    smtp_password: str | None = None
    smtp_starttls: bool = False
    mail_from: str = "orders@orderpipe.local"

    initial_stock: int = 1_000_000  # units per SKU seeded into an empty inventory database
    # librdkafka's default max.poll.interval.ms (300 s) makes the first assignment take ~25 s on Tansu.
    max_poll_interval_ms: int = 10_000
    session_timeout_ms: int = 6_000
    consumer_batch_size: int = 500
    relay_batch_size: int = 500
    relay_poll_interval_s: float = 0.05
    log_level: str = "INFO"
    log_json: bool = True

    def database_url(self, service: str) -> str:
        if service not in SERVICES:
            raise KeyError(f"unknown service {service!r}")
        url = getattr(self, f"{service}_database_url")
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
