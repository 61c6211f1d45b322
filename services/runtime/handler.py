"""The handler contract: what a service's handlers get (`UnitOfWork`), what they are (`Handler`),
their optional set-based form (`BatchHandler`, declared with `batch_form_of`, run with a
`BatchUnitOfWork`) and what a consumer service is (`Service`). Handlers import this, never the
loop that runs them (services/runtime/consumer.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import MetaData, Table
from sqlalchemy.engine import Connection, Engine, Result
from sqlalchemy.sql import Executable

from services.runtime import envelope as env
from services.runtime.bulk import BulkInsert
from services.runtime.controls import WorkerControls
from services.runtime.db import (
    held_events_table, held_keys_table, inbox_table, outbox_table, read_only, utcnow, worker_state_table,
)
from services.runtime.events import Event
from services.runtime.topology import ConsumerGroup

# The columns of a batch's inbox claims (one row per handled event: the dedup key and where it came from).
INBOX_ROW_COLUMNS = ("group_name", "event_id", "event_type", "topic", "partition", "offset", "processed_at")


class UnitOfWork:
    """What a handler gets: the open transaction (`conn`), the incoming envelope, the group and
    the service's deps. With concurrent lanes the transaction begins at the handler's first use
    of `conn`: do slow I/O (an SMTP send) before touching the database."""

    def __init__(self, conn: Connection | None, envelope: env.Envelope, group: str, deps: Any = None,
                 now: datetime | None = None, *, begin: Callable[[], Connection] | None = None,
                 engine: Engine | None = None):
        self._conn, self._begin, self._engine = conn, begin, engine
        self.envelope, self.group, self.deps = envelope, group, deps
        self.now = now or utcnow()

    def read(self, statement: Executable, parameters: dict[str, Any] | None = None) -> Result:
        """Run a query in the transaction once it has begun; before that, on a short connection
        of its own, so the transaction (and SQLite's write lock) still begins only when the
        handler writes, after its slow I/O."""
        if self._conn is not None or self._engine is None:
            return self.conn.execute(statement, parameters)
        with read_only(self._engine) as conn:
            result = conn.execute(statement, parameters)
            return result.freeze()()

    @property
    def conn(self) -> Connection:
        if self._conn is None:
            self._conn = self._begin()
        return self._conn

    @property
    def began(self) -> bool:
        return self._conn is not None


Handler = Callable[[Event, UnitOfWork], Iterable[Event] | None]


class BatchUnitOfWork:
    """What a batch handler gets: the open transaction (`conn`, inside a savepoint of the run),
    the incoming envelopes (one per event, in the same order), the group, the service's deps and
    one `now` for the whole run."""

    def __init__(self, conn: Connection, envelopes: list[env.Envelope], group: str, deps: Any = None,
                 now: datetime | None = None):
        self.conn, self.envelopes, self.group, self.deps = conn, envelopes, group, deps
        self.now = now or utcnow()


# The set-based form of a `Handler`: the events of one run (consecutive messages of one event
# type, in their order), returning each event's output events, in the same order. Its effects
# must be exactly those of the per-message handler run on each event in turn; when that cannot
# be computed set-based (a conflict, anything unexpected) it raises, and the runtime undoes the
# run and redoes it through the per-message handler (services/runtime/consumer.py).
BatchHandler = Callable[[list[Event], BatchUnitOfWork], list[list[Event]]]


class RunNotSetBased(Exception):
    """A batch form's way to say "not this run" (say, an order twice in it): the runtime
    redoes the run per message, as for any failure of a batch form, but logs it at DEBUG."""


def batch_form_of(handler: Handler) -> Callable[[BatchHandler], BatchHandler]:
    """Declare the decorated function as the set-based form of `handler`. The per-message
    handler stays what the service declares: it is the reference, and what runs when the
    batch form raises (and in concurrent lanes, which run one message per transaction)."""

    def declare(batch: BatchHandler) -> BatchHandler:
        handler.batch_form = batch
        return batch

    return declare


def batch_form(handler: Handler) -> BatchHandler | None:
    return getattr(handler, "batch_form", None)


@dataclass
class Service:
    """A consumer service: its group, its tables, its handlers and its dependencies."""

    group: ConsumerGroup
    metadata: MetaData
    handlers: Mapping[type[Event], list[Handler]]
    deps: Any = None
    retryable: tuple[type[BaseException], ...] = ()
    permanent: tuple[type[BaseException], ...] = ()
    batch_size: int = 500
    controls: WorkerControls = field(default_factory=WorkerControls)
    outbox: Table = field(init=False)
    inbox: Table = field(init=False)
    inbox_claims: BulkInsert = field(init=False)  # a batch's inbox rows; returns the new event ids
    held_keys: Table = field(init=False)  # ordered retries per key (services/runtime/held.py)
    held_events: Table = field(init=False)
    worker_state: Table = field(init=False)  # what the running workers report (services/runtime/worker_state.py)

    def __post_init__(self):
        tables = self.metadata.tables  # reuse them when build() runs twice on one MetaData
        self.outbox = tables["outbox"] if "outbox" in tables else outbox_table(self.metadata)
        self.inbox = tables["inbox"] if "inbox" in tables else inbox_table(self.metadata)
        self.held_keys = tables["held_keys"] if "held_keys" in tables else held_keys_table(self.metadata)
        self.held_events = tables["held_events"] if "held_events" in tables else held_events_table(self.metadata)
        self.worker_state = tables["worker_state"] if "worker_state" in tables else worker_state_table(self.metadata)
        self.inbox_claims = BulkInsert(self.inbox, INBOX_ROW_COLUMNS, on_conflict_ignore=True, returning="event_id")

    @property
    def name(self) -> str:
        return self.group.name
