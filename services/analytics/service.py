from __future__ import annotations

from services.analytics.handlers import HANDLERS
from services.analytics.tables import metadata
from services.runtime.handler import Service
from services.runtime.service_main import Runtime
from services.runtime.topology import group


def build(runtime: Runtime) -> Service:
    return Service(group("analytics"), metadata, HANDLERS, batch_size=runtime.settings.consumer_batch_size)
