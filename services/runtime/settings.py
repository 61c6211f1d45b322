"""One settings object per process, read once from the environment, with working local defaults."""

from __future__ import annotations

import os
from collections.abc import Iterable
from functools import cached_property
from pathlib import Path
from typing import Literal, TypeVar, get_args

from pydantic import AliasChoices, BaseModel, Field, SecretStr, ValidationError, field_validator
from pydantic.fields import FieldInfo
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
    ordered_retries: bool | None = None            # hold a key's later events while one is retried
    held_dead_letter_policy: Literal["hold", "release"] | None = None  # when that one is dead-lettered
    breaker_enabled: bool | None = None
    breaker_window: int | None = None
    breaker_failure_ratio: float | None = None
    breaker_cooldown_s: float | None = None


class ServiceSettings(BaseSettings):
    """The settings one service adds (ORDERPIPE_<FIELD>), declared in its own package (e.g.
    services/email/settings.py: SMTP) and named in its declaration; its process reads them with
    `settings.of(...)`, and `orderpipe run` checks them before it starts the process."""

    model_config = SettingsConfigDict(env_prefix="ORDERPIPE_", extra="ignore")


ServiceSettingsT = TypeVar("ServiceSettingsT", bound=ServiceSettings)


class Settings(BaseSettings):
    """What every process shares. Fields a service adds live in its ServiceSettings; given here
    as keywords (Settings(smtp_port=2525), as tests do) they are kept and override the environment
    in `of()`."""

    model_config = SettingsConfigDict(env_prefix="ORDERPIPE_", extra="allow", env_nested_delimiter="__")

    # Kafka. Unset means "embedded": `orderpipe up` starts the Tansu broker and exports this.
    kafka_bootstrap_servers: str | None = Field(
        default=None, validation_alias=AliasChoices("KAFKA_BOOTSTRAP_SERVERS", "ORDERPIPE_KAFKA_BOOTSTRAP_SERVERS"))
    schema_registry_url: str | None = Field(
        default=None, validation_alias=AliasChoices("SCHEMA_REGISTRY_URL", "ORDERPIPE_SCHEMA_REGISTRY_URL"))
    # The registry's basic auth as USER:PASSWORD (Confluent's basic.auth.user.info). Secrets are
    # SecretStr or repr=False: a logged or printed Settings shows them as '**********' or not at all.
    schema_registry_basic_auth_user_info: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO",
                                                    "ORDERPIPE_SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO"))
    # Extra librdkafka settings for every client, e.g. security.protocol=SASL_SSL;sasl.mechanism=SCRAM-SHA-512
    # (it holds the SASL password, hence repr=False)
    kafka_client_config: str = Field(default="", repr=False)
    # This process's own Kafka user (services/ops/access.py), apart from the shared config above
    # so that the password can come from the user's own Secret (Strimzi's KafkaUser makes one).
    # With the password set, they win over sasl.username / sasl.password in the config above.
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None

    data_dir: Path = Path(".data")
    # Each service's database: ORDERPIPE_<SERVICE>_DATABASE_URL (database_url()).
    # /healthz, /readyz, /metrics of consumer services and orders-relay (services/runtime/health.py); 0 = off
    health_host: str = "127.0.0.1"
    health_port: int = 9100
    status_url: str = "http://127.0.0.1:6066"  # where the Faust worker's web server answers
    # An order with a step not finished this long after it was created becomes STALLED (alert).
    status_sla_s: float = 300.0
    status_sla_check_interval_s: float | None = None  # default: a tenth of the SLA, 0.5 to 30 s

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

    def __repr_args__(self):
        # Extras are services' settings given as keywords; which of them are secrets only their
        # own declarations know, so none of their values is shown.
        extra = self.model_extra or {}
        for name, value in super().__repr_args__():
            yield name, ("(hidden)" if name in extra else value)

    def database_url(self, service: str) -> str:
        """ORDERPIPE_<SERVICE>_DATABASE_URL (or `<service>_database_url=` given here); default a
        SQLite file of the service's name in the data folder."""
        url = (self.model_extra or {}).get(f"{service}_database_url") or os.environ.get(
            f"ORDERPIPE_{service.upper()}_DATABASE_URL")
        return url or f"sqlite:///{(self.data_dir / f'{service}.db').resolve()}"

    def of(self, model: type[ServiceSettingsT]) -> ServiceSettingsT:
        """A service's own settings: its environment variables, under the same fields given here."""
        given = {name: value for name, value in (self.model_extra or {}).items() if name in model.model_fields}
        return model(**given)

    @field_validator("kafka_client_config")
    @classmethod
    def _pairs_of_key_and_value(cls, value: str) -> str:
        # The message names the pair's position, never its text: that may be the password.
        for n, pair in enumerate((p for p in value.split(";") if p.strip()), start=1):
            if "=" not in pair:
                raise ValueError(f"pair {n} has no '=': write key=value pairs separated by ';'")
        return value

    @cached_property
    def extra_client_config(self) -> dict[str, str]:
        pairs = [p for p in self.kafka_client_config.split(";") if p.strip()]
        config = {key.strip(): value for key, value in (p.split("=", 1) for p in pairs)}
        if self.kafka_sasl_password:  # a user name alone (no Secret: a cluster without SCRAM) is not used
            config["sasl.password"] = self.kafka_sasl_password.get_secret_value()
            if self.kafka_sasl_username:
                config["sasl.username"] = self.kafka_sasl_username
        return config

    @property
    def bootstrap(self) -> str:
        if not self.kafka_bootstrap_servers:
            raise RuntimeError("KAFKA_BOOTSTRAP_SERVERS is not set: start the pipeline with `orderpipe up`, "
                               "or export KAFKA_BOOTSTRAP_SERVERS=host:port of your Kafka cluster")
        return self.kafka_bootstrap_servers


class InvalidSettings(Exception):
    """Rejected values of Settings and of services' settings: one line each (invalid_settings)."""

    def __init__(self, lines: list[str]):
        super().__init__("; ".join(lines))
        self.lines = lines


def checked_settings(services: Iterable[type[ServiceSettings] | None] = ()) -> Settings:
    """Settings, with the given services' own settings checked too: every rejected value of any
    of them in one InvalidSettings, so an operator fixes them all in one go."""
    lines: list[str] = []
    settings = None
    try:
        settings = Settings()
    except ValidationError as error:
        lines += invalid_settings(error)
    for model in dict.fromkeys(m for m in services if m is not None):
        try:
            settings.of(model) if settings is not None else model()
        except ValidationError as error:
            lines += invalid_settings(error)
    if lines or settings is None:
        raise InvalidSettings(lines)
    return settings


def settings_model(error: ValidationError) -> type[BaseSettings] | None:
    """The settings class (Settings or a service's) that rejected a value; None: not settings."""
    models = [Settings, *ServiceSettings.__subclasses__()]
    return next((m for m in models if m.__name__ == error.title), None)


def invalid_settings(error: ValidationError) -> list[str]:
    """One line per rejected setting, named as the environment variable to fix, for a
    ValidationError of Settings or a service's settings (a bad ORDERPIPE_* value ends a command
    with these, not a trace)."""
    model = settings_model(error) or Settings
    lines = []
    for problem in error.errors():
        field, *nested = [str(part) for part in problem["loc"]]
        info = model.model_fields.get(field)
        alias = getattr(info.validation_alias, "choices", None) if info else None
        name = alias[0] if alias else "__".join(["ORDERPIPE_" + field, *nested]).upper()
        shown = "(hidden: it holds a secret)" if info is not None and is_secret(info) else repr(problem.get("input"))
        lines.append(f"invalid setting {name}={shown}: {problem['msg']}")
    return lines


def is_secret(field: FieldInfo) -> bool:
    """A password, or a value that holds one: never printed, logged or echoed in an error."""
    return field.repr is False or SecretStr in (field.annotation, *get_args(field.annotation))
