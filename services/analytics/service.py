"""The analytics service, declared: per-minute and per-SKU rollups of orders, units and revenue,
corrected when an order is cancelled."""

from __future__ import annotations

from services.analytics.handlers import HANDLERS
from services.analytics.tables import metadata
from services.runtime.declaration import StatusStep, consumer_service
from services.runtime.events import OrderRecorded, StepCompensated
from services.runtime.handler import Service
from services.runtime.service_main import Runtime


def build(runtime: Runtime) -> Service:
    return Service(runtime.group, metadata, HANDLERS, batch_size=runtime.settings.consumer_batch_size)


SERVICE = consumer_service(
    "analytics", package_file=__file__, metadata=metadata, handlers=HANDLERS, emits=(OrderRecorded, StepCompensated), build=build,
    step=StatusStep(done={"OrderRecorded": None}))
