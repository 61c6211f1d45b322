"""What a service declares about itself, once, in its own package (`services/<name>/service.py`).

`services/registry.py` lists the declarations; the topology (groups, retry and dead-letter
topics), `orderpipe run` and `up`, migrations, deploy files, the demo and the order-status
view's steps all derive from that list. A declaration holds no client and opens nothing: its
processes build everything when they run. The one thing declaring does is register the event
types the service brings along (services/runtime/contracts.py), so the process knows them.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import MetaData

from services.runtime.contracts import EventContract, register
from services.runtime.events import BaseEvent, Event
from services.runtime.handler import Handler, Service
from services.runtime.topology import DEFAULT_RETRY_DELAYS_S, TOPIC_FOR_EVENT, ConsumerGroup

if TYPE_CHECKING:
    from services.runtime.service_main import Runtime
    from services.runtime.settings import ServiceSettings, Settings


@dataclass(frozen=True)
class Process:
    """One process of a service: `orderpipe run <name>` calls `run`, its composition root, which
    builds everything from the settings and runs until SIGTERM or SIGINT."""

    name: str
    run: Callable[[Settings], None]
    # Serves /healthz, /readyz and /metrics on ORDERPIPE_HEALTH_HOST:PORT (`up` gives each such
    # process a port of its own); False: it answers them on a port of its own (the orders API).
    health_port: bool = True


@dataclass(frozen=True)
class StatusStep:
    """How the order-status view reads a consumer service's step from the events on the topics.

    `done` / `failed`: event type -> the record field shown as the step's detail (None: none).
    A failed step fails the whole order (final). `skipped_on`: events of *other* steps after
    which this one will never run (the invoice of a rejected order)."""

    done: Mapping[str, str | None]
    failed: Mapping[str, str | None] = field(default_factory=dict)
    skipped_on: tuple[str, ...] = ()


@dataclass(frozen=True)
class ServiceDeclaration:
    """A service: its name (also its database's, and for a consumer its group's and step's), its
    tables and migrations, its processes, the settings it adds, and for a consumer service what
    it reads (the keys of its handlers), what it emits and its step in the order-status view."""

    name: str
    metadata: MetaData  # its own tables; a consumer's inbox and outbox are added by the runtime
    migrations: Path  # its Alembic revisions
    processes: tuple[Process, ...]
    handlers: Mapping[type[Event], list[Handler]] = field(default_factory=dict)
    emits: tuple[type[BaseEvent], ...] = ()
    build: Callable[[Runtime], Service] | None = None  # a consumer's Service, from its process's Runtime
    retry_delays_s: tuple[float, ...] = DEFAULT_RETRY_DELAYS_S
    step: StatusStep | None = None
    settings: type[ServiceSettings] | None = None  # its own ORDERPIPE_* variables beyond Settings
    events: tuple[EventContract, ...] = ()  # event types only it defines (registered when declared)

    def __post_init__(self) -> None:
        register(*self.events)  # before `group` below looks up the topics of what it emits

    @cached_property
    def group(self) -> ConsumerGroup | None:
        """Its consumer group, with inputs in the order of its handlers; None: it consumes nothing."""
        if not self.handlers:
            return None
        inputs = tuple(dict.fromkeys(TOPIC_FOR_EVENT[event.event_type()] for event in self.handlers))
        outputs = tuple(dict.fromkeys(TOPIC_FOR_EVENT[event.event_type()] for event in self.emits))
        return ConsumerGroup(self.name, inputs=inputs, retry_delays_s=self.retry_delays_s, outputs=outputs)


def consumer_service(name: str, *, package_file: str, metadata: MetaData,
                     handlers: Mapping[type[Event], list[Handler]], emits: tuple[type[BaseEvent], ...],
                     build: Callable[[Runtime], Service], step: StatusStep | None = None,
                     settings: type[ServiceSettings] | None = None, events: tuple[EventContract, ...] = (),
                     retry_delays_s: tuple[float, ...] = DEFAULT_RETRY_DELAYS_S) -> ServiceDeclaration:
    """The declaration of a consumer service: one process of its name, running the shared loop
    and the service's outbox relay (`service_main.run_service`) on what `build` returns.
    `package_file` is the `__file__` of a module in the service's package: its migrations/ is beside it."""
    declaration: ServiceDeclaration

    def run(settings: Settings) -> None:
        from services.runtime.service_main import install_stop_signals, run_service

        # SIGTERM (the supervisor's, Kubernetes') ends the loop after its batch, so the consumer
        # commits and closes; without the handler it killed the process mid-batch.
        stop = threading.Event()
        install_stop_signals(stop)
        run_service(declaration, settings, stop=stop)

    declaration = ServiceDeclaration(
        name=name, metadata=metadata, migrations=Path(package_file).resolve().parent / "migrations",
        processes=(Process(name, run),), handlers=handlers, emits=emits, build=build, retry_delays_s=retry_delays_s,
        step=step, settings=settings, events=events)
    return declaration
