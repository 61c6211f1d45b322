"""The orders service, declared: the HTTP API that records orders and cancellations (each row
with its OrderCreated / OrderCancelled in the outbox, one transaction) and the relay that
publishes the outbox to `orders.created` and `orders.cancelled`. Two
processes on one database; each is built here from the settings (`orderpipe run orders-api`,
`orderpipe run orders-relay`)."""

from __future__ import annotations

import signal
import threading
from datetime import timedelta
from pathlib import Path

from services.orders.settings import OrdersApiSettings
from services.orders.tables import metadata, outbox
from services.runtime.declaration import Process, ServiceDeclaration
from services.runtime.events import OrderCancelled, OrderCreated
from services.runtime.settings import Settings


def run_api(settings: Settings) -> None:
    import uvicorn

    from services.orders.api import StatusClient, create_app
    from services.runtime.codec import codec_from_settings
    from services.runtime.db import make_engine
    from services.runtime.heap import tune_gc
    from services.runtime.migrate import prepare_database

    engine = make_engine(settings.database_url(SERVICE.name))
    prepare_database(engine, SERVICE, settings.db_upgrade_on_start)
    listen = settings.of(OrdersApiSettings)
    api = create_app(engine, codec_from_settings(settings), StatusClient(settings.status_url),
                     max_body_bytes=listen.api_max_body_bytes,
                     idempotency_key_ttl=timedelta(hours=listen.api_idempotency_key_ttl_hours))
    tune_gc()
    # uvicorn shuts down gracefully on SIGTERM/SIGINT, then raises the signal again for the
    # handler that was there before it. This one ends the process with exit code 0, like every
    # other service, instead of by the signal after a clean stop (and at once before uvicorn
    # serves: nothing to finish yet).
    def exit_cleanly(*_: object) -> None:
        raise SystemExit(0)

    for stop_signal in (signal.SIGTERM, signal.SIGINT):
        signal.signal(stop_signal, exit_cleanly)
    uvicorn.run(api, host=listen.api_host, port=listen.api_port, log_level="warning")


def run_relay(settings: Settings) -> None:
    from services.runtime.db import make_engine
    from services.runtime.health import start_health_server
    from services.runtime.heap import tune_gc
    from services.runtime.kafka import make_producer
    from services.runtime.migrate import prepare_database
    from services.runtime.outbox import OutboxRelay
    from services.runtime.service_main import install_stop_signals

    url = settings.database_url(SERVICE.name)
    engine = make_engine(url)
    prepare_database(engine, SERVICE, settings.db_upgrade_on_start)
    stop = threading.Event()
    install_stop_signals(stop)
    relay = OutboxRelay(engine, outbox, make_producer(settings, **{"client.id": "orders-relay"}),
                        batch_size=settings.relay_batch_size,
                        retention=timedelta(hours=settings.outbox_retention_hours), name=SERVICE.name)
    health = start_health_server(settings, url)
    tune_gc()
    try:
        relay.run(stop, settings.relay_poll_interval_s)
    finally:
        if health:
            health.stop()


SERVICE = ServiceDeclaration(
    name="orders", metadata=metadata, migrations=Path(__file__).resolve().parent / "migrations",
    processes=(Process("orders-api", run_api, health_port=False), Process("orders-relay", run_relay)),
    emits=(OrderCreated, OrderCancelled), settings=OrdersApiSettings)
