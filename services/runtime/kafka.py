"""librdkafka client configurations, in one place so every process gets the same guarantees."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer

from services.runtime.errors import KafkaRefused
from services.runtime.settings import Settings

# Java clients, aiokafka and Faust hash keys with murmur2; librdkafka's default (consistent_random,
# CRC32) would put an order's events on a different partition than Faust expects.
PARTITIONER = "murmur2_random"


# What no retry can fix, and what to check. librdkafka reports these only to the error
# callback and would ask again forever; a wrong password or an untrusted broker certificate
# must end the process within seconds, with one line (no secret is in librdkafka's text).
_REFUSALS = {
    KafkaError._AUTHENTICATION: "check sasl.username, sasl.password and sasl.mechanism in ORDERPIPE_KAFKA_CLIENT_CONFIG",
    KafkaError._SSL: "check ssl.ca.location in ORDERPIPE_KAFKA_CLIENT_CONFIG (the CA that signed the broker's "
                     "certificate) and that the address is the broker's TLS listener",
}


def stop_on_refusal(err: KafkaError) -> None:
    """The services' clients' error callback: a refusal raises KafkaRefused, which poll(),
    consume() and flush() raise in the thread that called them. Other errors are transient:
    librdkafka logs them and reconnects."""
    fix = _REFUSALS.get(err.code())
    if fix is not None:
        raise KafkaRefused(f"Kafka refused the connection: {err.str()} ({fix})")


# The broker's authorizer says no: the principal lacks an ACL. Asking again gets the same answer,
# and carrying on would be a silent stall (a consumer that never gets its topic, a relay that
# retries forever), so the services stop and say what is missing.
_DENIALS = frozenset({
    KafkaError.TOPIC_AUTHORIZATION_FAILED, KafkaError.GROUP_AUTHORIZATION_FAILED,
    KafkaError.CLUSTER_AUTHORIZATION_FAILED, KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED,
})


def raise_if_denied(errors: list[KafkaError | None], doing: str) -> None:
    """KafkaRefused for the first error that is an authorization failure, naming what was done."""
    for err in errors:
        if err is not None and err.code() in _DENIALS:
            raise KafkaRefused(f"Kafka denied {doing}: {err.str()} (this process's Kafka user lacks the ACL; "
                               "the ACLs each service needs are in deploy/k8s/base/kafka-users.yaml, "
                               "`orderpipe deploy acls`)")


def check_credentials(bootstrap_servers: str, client_config: dict[str, str], timeout: float = 15.0) -> None:
    """Connect once with these settings; KafkaRefused when the broker refuses the login or the
    certificate is not trusted. For clients that cannot stop on a refusal themselves (aiokafka
    under Faust gives up after a while with "Unable to bootstrap" and a traceback). A broker
    that does not answer is not an error here: that client retries, as for any outage."""
    from confluent_kafka.admin import AdminClient

    refusals: list[KafkaError] = []
    admin = AdminClient({"bootstrap.servers": bootstrap_servers, **client_config, "log_level": 0,
                         "error_cb": refusals.append})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            admin.list_topics(timeout=1)
            return
        except KafkaException:
            admin.poll(0)  # serves the error callbacks
            for err in refusals:
                stop_on_refusal(err)


def base_config(settings: Settings) -> dict[str, Any]:
    return {"bootstrap.servers": settings.bootstrap, **settings.extra_client_config, "error_cb": stop_on_refusal}


def producer_config(settings: Settings, **overrides: Any) -> dict[str, Any]:
    return {
        **base_config(settings),
        # Idempotence gives acks=all, retries without duplicates and per-partition order.
        "enable.idempotence": True,
        "acks": "all",
        "partitioner": PARTITIONER,
        "linger.ms": 5,
        "compression.type": "lz4",
        **overrides,
    }


def consumer_config(settings: Settings, group_id: str, **overrides: Any) -> dict[str, Any]:
    return {
        **base_config(settings),
        "group.id": group_id,
        "auto.offset.reset": "earliest",
        # We store an offset only after the database transaction that handled the message has
        # committed; auto-commit then commits stored offsets in the background, in batches.
        "enable.auto.offset.store": False,
        "enable.auto.commit": True,
        "auto.commit.interval.ms": 1000,
        "isolation.level": "read_committed",
        "max.poll.interval.ms": settings.max_poll_interval_ms,
        "session.timeout.ms": settings.session_timeout_ms,
        "heartbeat.interval.ms": max(500, settings.session_timeout_ms // 3),
        "partition.assignment.strategy": "cooperative-sticky",
        "fetch.wait.max.ms": settings.fetch_wait_max_ms,
        **overrides,
    }


# What a cluster answers while it moves leaders or coordinators (a fresh cluster loading its
# offsets topic, a broker restarting): asking again shortly succeeds.
_TRANSIENT = frozenset({
    KafkaError.NOT_COORDINATOR, KafkaError.COORDINATOR_LOAD_IN_PROGRESS, KafkaError.COORDINATOR_NOT_AVAILABLE,
    KafkaError.NOT_LEADER_FOR_PARTITION, KafkaError.LEADER_NOT_AVAILABLE, KafkaError.REQUEST_TIMED_OUT,
    KafkaError._TIMED_OUT, KafkaError._TRANSPORT, KafkaError.REBALANCE_IN_PROGRESS,
})
T = TypeVar("T")


def retrying(call: Callable[[], T], timeout: float = 10.0) -> T:
    """`call()`, asked again for up to `timeout` seconds while Kafka answers with a transient error
    (the last one is raised). For one-shot requests of the operators' tools; the services' own
    clients retry inside librdkafka."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return call()
        except KafkaException as exc:
            err = exc.args[0] if exc.args else None
            transient = isinstance(err, KafkaError) and (err.retriable() or err.code() in _TRANSIENT)
            if not transient or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def make_producer(settings: Settings, **overrides: Any) -> Producer:
    return Producer(producer_config(settings, **overrides))


def make_consumer(settings: Settings, group_id: str, **overrides: Any) -> Consumer:
    return Consumer(consumer_config(settings, group_id, **overrides))


# -- the Faust worker (aiokafka) --------------------------------------------------------------

# The librdkafka settings of ORDERPIPE_KAFKA_CLIENT_CONFIG that `faust_broker_credentials` maps.
FAUST_MAPPED_KEYS = frozenset({
    "security.protocol", "sasl.mechanism", "sasl.mechanisms", "sasl.username", "sasl.password",
    "ssl.ca.location", "ssl.certificate.location", "ssl.key.location", "ssl.key.password",
    "enable.ssl.certificate.verification", "ssl.endpoint.identification.algorithm",
})
_SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")


def faust_broker_credentials(config: dict[str, str]) -> Any:
    """The Faust `broker_credentials` for the librdkafka settings every other client gets, so the
    order-status worker connects with the same TLS and SASL (PLAIN, SCRAM) settings; None for
    PLAINTEXT. Another `ssl.*` or `sasl.*` setting, or another mechanism, raises ValueError
    rather than connecting differently from the rest of the system."""
    import ssl

    import faust

    unmapped = sorted(k for k in config if k.startswith(("ssl.", "sasl.")) and k not in FAUST_MAPPED_KEYS)
    if unmapped:
        raise ValueError(f"the Faust worker cannot use {', '.join(unmapped)} (mapped: {', '.join(sorted(FAUST_MAPPED_KEYS))})")
    protocol = config.get("security.protocol", "PLAINTEXT").upper()
    if protocol not in ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"):
        raise ValueError(f"unknown security.protocol {protocol!r}")
    context = None
    if protocol in ("SSL", "SASL_SSL"):
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=config.get("ssl.ca.location"))
        if config.get("ssl.certificate.location"):  # mutual TLS
            context.load_cert_chain(config["ssl.certificate.location"], config.get("ssl.key.location"),
                                    config.get("ssl.key.password"))
        if config.get("ssl.endpoint.identification.algorithm", "https").lower() == "none":
            context.check_hostname = False
        if config.get("enable.ssl.certificate.verification", "true").lower() == "false":
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
    if protocol in ("SASL_PLAINTEXT", "SASL_SSL"):
        mechanism = config.get("sasl.mechanism", config.get("sasl.mechanisms", "PLAIN")).upper()
        if mechanism not in _SASL_MECHANISMS:
            raise ValueError(f"the Faust worker supports sasl.mechanism {', '.join(_SASL_MECHANISMS)}, not {mechanism}")
        return faust.SASLCredentials(username=config.get("sasl.username"), password=config.get("sasl.password"),
                                     mechanism=mechanism, ssl_context=context)
    if protocol == "SSL":
        return faust.SSLCredentials(context)
    return None
