"""One consumer service process for test_crash_points.py, run as a script:

    python crash_point_worker.py <service> <group name> <retry delay s>

The service exactly as `orderpipe run <service>` runs it (`run_service`: its own build(), outbox
relay, consumer loop, SIGTERM ending the loop after its batch), except that it reads a private
consumer group's input topic `<group name>.in`, so no other test's events reach it. Settings
come from the environment (`ORDERPIPE_CRASH_AT` among them), as for `orderpipe run`.
"""

from __future__ import annotations

import dataclasses
import sys
import threading

from services import registry
from services.runtime.logs import setup_logging
from services.runtime.service_main import install_stop_signals, run_service
from services.runtime.settings import Settings
from services.runtime.topology import ConsumerGroup


def main(service_name: str, group_name: str, retry_delay_s: str) -> None:
    settings = Settings()
    setup_logging(service_name, settings.log_level, settings.log_json)
    declaration = registry.service(service_name)
    group = ConsumerGroup(group_name, inputs=(f"{group_name}.in",), retry_delays_s=(float(retry_delay_s),))

    def build_on_private_group(runtime):
        service = declaration.build(runtime)
        service.group = dataclasses.replace(group, outputs=service.group.outputs)
        return service

    stop = threading.Event()
    install_stop_signals(stop)
    run_service(dataclasses.replace(declaration, build=build_on_private_group), settings, stop=stop)


if __name__ == "__main__":
    main(*sys.argv[1:])
