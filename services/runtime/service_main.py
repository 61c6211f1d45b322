"""Runs one consumer service as a process: its consumer loop and its outbox relay.

Everything is built here, once, and passed down (no clients at import time). SIGTERM and
SIGINT stop the loop; the consumer then closes (committing stored offsets) and the relay
flushes what it has in flight.
"""

from __future__ import annotations

import logging
import signal
import threading
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy.engine import Engine

from services.runtime.alerts import Alerter
from services.runtime.codec import Codec, codec_from_settings
from services.runtime.consumer import ServiceConsumer
from services.runtime.db import make_engine
from services.runtime.declaration import ServiceDeclaration
from services.runtime.errors import KafkaRefused
from services.runtime.health import start_health_server, thread_check
from services.runtime.heap import tune_gc
from services.runtime.kafka import make_consumer, make_producer
from services.runtime.lag import ConsumerStats
from services.runtime.migrate import prepare_database
from services.runtime.outbox import OutboxRelay
from services.runtime.settings import Settings
from services.runtime.topology import ConsumerGroup

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    """What a consumer service's `build` gets: its settings, its migrated database, the codec and
    its consumer group (derived from its declaration)."""

    settings: Settings
    engine: Engine
    codec: Codec
    group: ConsumerGroup


def install_stop_signals(stop: threading.Event) -> None:
    def _stop(signum, _frame):
        log.info("stopping", extra={"signal": signal.Signals(signum).name})
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)


class RelayThread(threading.Thread):
    refused: KafkaRefused | None = None  # why it stopped the process, if Kafka refused it
    wake: threading.Event  # set it after committing outbox rows: the relay publishes them at once


def start_relay(runtime: Runtime, service_name: str, outbox, stop: threading.Event) -> RelayThread:
    wake = threading.Event()
    relay = OutboxRelay(runtime.engine, outbox, make_producer(runtime.settings, **{"client.id": f"{service_name}-relay"}),
                        batch_size=runtime.settings.relay_batch_size,
                        retention=timedelta(hours=runtime.settings.outbox_retention_hours), name=service_name,
                        wake=wake)
    def relay_until_stopped() -> None:
        try:
            relay.run(stop, runtime.settings.relay_poll_interval_s)
        except KafkaRefused as exc:  # stop the whole process: run_service raises it after the loop
            thread.refused = exc
            stop.set()

    thread = RelayThread(target=relay_until_stopped, name=f"{service_name}-relay", daemon=True)
    thread.wake = wake
    thread.start()
    return thread


def run_service(declaration: ServiceDeclaration, settings: Settings | None = None,
                stop: threading.Event | None = None) -> None:
    """A consumer service's process: built here from its declaration and the settings."""
    settings = settings or Settings()
    stop = stop or threading.Event()
    service_name = declaration.name
    engine = make_engine(settings.database_url(service_name))
    prepare_database(engine, declaration, settings.db_upgrade_on_start)  # before build(): it may seed tables
    runtime = Runtime(settings, engine, codec_from_settings(settings), declaration.group)
    service = declaration.build(runtime)
    # the environment's worker controls for this service (ORDERPIPE_WORKERS__<NAME>__...) win
    service.controls = service.controls.with_settings(settings.workers.get(service_name),
                                                      service.group.retry_delays_s)
    # Before the Kafka clients exist: frozen objects are never collected, and a run_service
    # called in-process (tests) must leave no client behind when it returns.
    tune_gc()
    relay_thread = start_relay(runtime, service_name, service.outbox, stop)
    stats = ConsumerStats(service.group.name)  # lag gauges and the loop's heartbeat, fed from consume()
    consumer = ServiceConsumer(
        service, engine,
        make_consumer(settings, service.group.name, **{"client.id": service_name}, **stats.consumer_overrides()),
        make_producer(settings, **{"client.id": f"{service_name}-retries"}),
        runtime.codec,
        alerter=Alerter(service.group.name, settings.alert_webhook_url),
        on_commit=relay_thread.wake.set,
    )
    log.info("service started", extra={"group": service.group.name, "topics": consumer.topics(),
                                       "controls": repr(service.controls)})
    # Live while the loop polls (a batch may take up to max.poll.interval.ms) and the relay runs.
    silence_s = max(60.0, 2 * settings.max_poll_interval_ms / 1000)
    health = None
    try:  # a health port that is taken (Misconfigured) stops the relay too
        health = start_health_server(settings, settings.database_url(service_name), {
            "consumer": lambda: stats.check_polling(silence_s), "relay": thread_check(relay_thread)})
        consumer.run(stop)
    finally:
        stop.set()
        if health:
            health.stop()
        relay_thread.join(15)
        engine.dispose()
        log.info("service stopped", extra={"group": service.group.name, "totals": vars(consumer.totals)})
    if relay_thread.refused is not None:
        raise relay_thread.refused
