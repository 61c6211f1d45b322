"""A consumer service that lives only in the test tree (tests/unit/test_extra_service.py): added
with ORDERPIPE_EXTRA_SERVICES=extra_service.loyalty.service, nothing outside this folder edited."""

from __future__ import annotations

from extra_service.loyalty.handlers import HANDLERS
from extra_service.loyalty.tables import metadata

from services.runtime.declaration import consumer_service
from services.runtime.handler import Service
from services.runtime.service_main import Runtime


def build(runtime: Runtime) -> Service:
    return Service(runtime.group, metadata, HANDLERS, batch_size=runtime.settings.consumer_batch_size)


SERVICE = consumer_service("loyalty", package_file=__file__, metadata=metadata, handlers=HANDLERS, emits=(),
                           build=build, retry_delays_s=(0.5,))
