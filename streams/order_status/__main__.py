"""Run one order-status worker in the foreground; SIGTERM or SIGINT stops it cleanly.

    python -m streams.order_status --bootstrap-servers HOST:PORT --data-dir DIR --web-port N [--store memory://]

Defaults come from the environment (`KAFKA_BOOTSTRAP_SERVERS`, `SCHEMA_REGISTRY_URL`,
`ORDERPIPE_DATA_DIR`, `ORDERPIPE_STATUS_URL`, `ORDERPIPE_STATUS_SLA_S`, `ORDERPIPE_LOG_LEVEL`). Faust's own command line
(`app.main()`) is not used: it would parse our sys.argv as Faust subcommands.
"""

from __future__ import annotations

import argparse
import socket
import sys
from pathlib import Path

from yarl import URL

from services.runtime.settings import Settings
from services.runtime.topology import ORDER_STATUS_APP


def parse_args(argv: list[str] | None, settings: Settings) -> argparse.Namespace:
    status_url = URL(settings.status_url)
    parser = argparse.ArgumentParser(prog="python -m streams.order_status", description=__doc__.splitlines()[0])
    parser.add_argument("--bootstrap-servers", default=settings.kafka_bootstrap_servers,
                        required=not settings.kafka_bootstrap_servers, help="host:port[,host:port...]")
    parser.add_argument("--data-dir", type=Path, default=settings.data_dir / "order-status",
                        help="where the worker keeps its table store (RocksDB)")
    parser.add_argument("--web-host", default=status_url.host or "127.0.0.1")
    parser.add_argument("--web-port", type=int, default=status_url.port or 6066)
    parser.add_argument("--store", default=None, help="Faust store URL, e.g. memory:// (default: rocksdb:// if available)")
    parser.add_argument("--schema-registry-url", default=settings.schema_registry_url)
    parser.add_argument("--app-id", default=ORDER_STATUS_APP, help="Faust app id = consumer group id")
    parser.add_argument("--sla-s", type=float, default=settings.status_sla_s,
                        help="an order with a step not finished this many seconds after creation becomes STALLED")
    parser.add_argument("--sla-check-interval-s", type=float, default=settings.status_sla_check_interval_s,
                        help="how often the SLA timer scans this worker's orders (default: SLA/10, 0.5 to 30 s)")
    parser.add_argument("--loglevel", default=settings.log_level.lower())
    return parser.parse_args(argv)


def check_web_port(host: str, port: int) -> None:
    """Faust binds its web server only once the worker has started, and a taken port then stops
    it with a page of traceback; asked first, the worker stops with one line saying what to fix."""
    from services.runtime.errors import Misconfigured

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as aiohttp binds
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise Misconfigured(
                f"the order-status worker cannot listen on {host}:{port} ({exc.strerror or exc}): "
                "set --web-port (or the port of ORDERPIPE_STATUS_URL) to a free port") from None


def main(argv: list[str] | None = None) -> None:
    import faust

    from services.runtime.codec import RegistryRefused, codec_from_settings
    from services.runtime.errors import KafkaRefused, Misconfigured
    from services.runtime.heap import tune_gc
    from services.runtime.kafka import check_credentials, faust_broker_credentials
    from streams.order_status.app import create_app

    settings = Settings()
    args = parse_args(argv, settings)
    try:  # a taken port, a wrong password or an untrusted certificate: one line now, not Faust's traceback later
        check_web_port(args.web_host, args.web_port)
        check_credentials(args.bootstrap_servers, settings.extra_client_config)
        codec = codec_from_settings(settings.model_copy(update={"schema_registry_url": args.schema_registry_url}))
    except (Misconfigured, KafkaRefused, RegistryRefused) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    args.data_dir.mkdir(parents=True, exist_ok=True)
    app = create_app(
        args.bootstrap_servers,
        broker_credentials=faust_broker_credentials(settings.extra_client_config),
        data_dir=args.data_dir,
        web_port=args.web_port,
        web_host=args.web_host,
        store=args.store,
        codec=codec,
        app_id=args.app_id,
        sla_s=args.sla_s,
        sla_check_interval_s=args.sla_check_interval_s,
        alert_webhook_url=settings.alert_webhook_url,
        fetch_wait_max_ms=settings.fetch_wait_max_ms,
    )
    tune_gc()
    # The Worker installs SIGINT/SIGTERM handlers that stop the app: the consumer commits and
    # leaves the group, the table flushes, the web server closes. It then raises SystemExit(0).
    faust.Worker(app, loglevel=args.loglevel, redirect_stdouts=False).execute_from_commandline()


if __name__ == "__main__":
    main()
