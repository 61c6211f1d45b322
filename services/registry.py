"""Every service of the pipeline, in one list: the only place their names appear together.

Each service declares itself in its own package (`services/<name>/service.py: SERVICE`, see
services/runtime/declaration.py); everything that needs "all the services" derives from
`SERVICES` here: the consumer groups and so every retry and dead-letter topic, the processes
`orderpipe run` and `up` start, the databases `orderpipe db` migrates, the deploy files, the
demo's report and the order-status view's steps. Adding a service is its folder plus one line
below; `ORDERPIPE_EXTRA_SERVICES` adds services from elsewhere without editing this file (a
comma-separated list of modules, each with a `SERVICE`; tests/extra_service/loyalty/ is one).

Read `SERVICES` / `GROUPS` as `registry.SERVICES` at call time: tests replace them.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import replace

from services.analytics.service import SERVICE as ANALYTICS
from services.email.service import SERVICE as EMAIL
from services.inventory.service import SERVICE as INVENTORY
from services.invoice.service import SERVICE as INVOICE
from services.orders.service import SERVICE as ORDERS
from services.runtime.declaration import Process, ServiceDeclaration
from services.runtime.settings import Settings
from services.runtime.topology import TOPIC_FOR_EVENT, ConsumerGroup, TopicSpec, topics_for

EXTRA_SERVICES_ENV = "ORDERPIPE_EXTRA_SERVICES"


class UnknownService(KeyError):
    def __str__(self) -> str:
        return str(self.args[0])


def _extra_services() -> tuple[ServiceDeclaration, ...]:
    modules = [name.strip() for name in os.environ.get(EXTRA_SERVICES_ENV, "").split(",") if name.strip()]
    return tuple(importlib.import_module(module).SERVICE for module in modules)


SERVICES: tuple[ServiceDeclaration, ...] = (ORDERS, INVENTORY, EMAIL, INVOICE, ANALYTICS, *_extra_services())


def groups() -> tuple[ConsumerGroup, ...]:
    """Every consumer service's group (what it reads, its retry tiers), in declaration order."""
    return tuple(s.group for s in SERVICES if s.group is not None)


GROUPS: tuple[ConsumerGroup, ...] = groups()


def service(name: str) -> ServiceDeclaration:
    for s in SERVICES:
        if s.name == name:
            return s
    raise UnknownService(f"unknown service {name!r}; known: {', '.join(s.name for s in SERVICES)}")


def group(name: str) -> ConsumerGroup:
    for g in GROUPS:
        if g.name == name:
            return g
    raise UnknownService(f"unknown consumer group {name!r}; known: {', '.join(g.name for g in GROUPS)}")


def service_of(process: str) -> ServiceDeclaration:
    """The service a process (`orderpipe run NAME`) belongs to."""
    for s in SERVICES:
        if any(p.name == process for p in s.processes):
            return s
    raise UnknownService(f"unknown process {process!r}; known: {', '.join(processes())}")


def processes() -> dict[str, Process]:
    """Every process of every service by its name (`orderpipe run NAME`), in start order."""
    return {p.name: p for s in SERVICES for p in s.processes}


def setting_variables() -> set[str]:
    """Every ORDERPIPE_<FIELD> variable the processes read: the shared Settings', each service's
    own and each service's database URL (a name outside it is a typo nobody would notice)."""
    models = [Settings, *(s.settings for s in SERVICES if s.settings is not None)]
    return ({f"ORDERPIPE_{field.upper()}" for model in models for field in model.model_fields}
            | {f"ORDERPIPE_{s.name.upper()}_DATABASE_URL" for s in SERVICES})


def all_topics() -> list[TopicSpec]:
    """Event topics (each with the services that emit its events as its writers), every group's
    retry, dead-letter and parking topics, the order-status worker's own topics, and the
    operators' audit topic."""
    writers: dict[str, list[str]] = {}
    for s in SERVICES:
        for event in s.emits:
            writers.setdefault(TOPIC_FOR_EVENT[event.event_type()], []).append(s.name)
    return [replace(t, writer=", ".join(writers[t.name])) if not t.writer and t.name in writers else t
            for t in topics_for(GROUPS)]
