"""A consumer service that lives only in the test tree (tests/e2e/test_extra_service.py): added
with ORDERPIPE_EXTRA_SERVICES=extra_service.loyalty.service, nothing outside this folder edited.
It brings an event type of its own (events.py) and is a step of every order's status."""

from __future__ import annotations

from extra_service.loyalty.events import CONTRACTS, PointsAwarded
from extra_service.loyalty.handlers import HANDLERS
from extra_service.loyalty.tables import metadata

from services.runtime.declaration import StatusStep, consumer_service
from services.runtime.handler import Service
from services.runtime.service_main import Runtime


def build(runtime: Runtime) -> Service:
    return Service(runtime.group, metadata, HANDLERS, batch_size=runtime.settings.consumer_batch_size)


SERVICE = consumer_service("loyalty", package_file=__file__, metadata=metadata, handlers=HANDLERS,
                           emits=(PointsAwarded,), events=CONTRACTS, build=build, retry_delays_s=(0.5,),
                           step=StatusStep(done={"PointsAwarded": "points"}))
