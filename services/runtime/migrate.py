"""Schema migrations: one Alembic history per service database, applied on start.

Layout (nothing to install besides the repository, which is installed editable):
- `services/runtime/migrations/`: the shared Alembic environment (`env.py`, the revision
  template). It migrates one service's database at a time, against that service's MetaData.
- `services/<service>/migrations/`: the service's own revisions (`0001_initial.py`, ...), next
  to the `tables.py` they describe (its declaration's `migrations`). Each service database holds
  only its own history in its own `alembic_version` table.

Every function here takes the service's declaration (`services/registry.py: service(name)`).

Every service runs `upgrade_database` on start, before it touches its tables; `orderpipe db
upgrade` does the same from the command line (for deployments that migrate as a separate step).
"""

from __future__ import annotations

import logging
import tempfile
import zlib
from pathlib import Path

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import MetaData, inspect, text
from sqlalchemy.engine import Connection, Engine

from services.runtime.db import (
    held_events_table, held_keys_table, inbox_table, make_engine, outbox_table, worker_state_table,
)
from services.runtime.declaration import ServiceDeclaration

log = logging.getLogger(__name__)

ENVIRONMENT_DIR = Path(__file__).resolve().parent / "migrations"


def service_metadata(service: ServiceDeclaration) -> MetaData:
    """The complete schema of a service's database: its own tables plus the runtime's.

    Consumer services get the inbox and the outbox (what `Service` adds at build time); the
    orders service declares its outbox itself and has no inbox (it consumes nothing).
    """
    metadata = service.metadata
    if service.group is not None:
        if "outbox" not in metadata.tables:
            outbox_table(metadata)
        if "inbox" not in metadata.tables:
            inbox_table(metadata)
        if "held_keys" not in metadata.tables:
            held_keys_table(metadata)
            held_events_table(metadata)
        if "worker_state" not in metadata.tables:
            worker_state_table(metadata)
    return metadata


def versions_dir(service: ServiceDeclaration) -> Path:
    return service.migrations


def alembic_config(service: ServiceDeclaration, connection: Connection | None = None, url: str | None = None) -> Config:
    """An Alembic Config for one service, without an alembic.ini: the environment is shared,
    the version location is the service's own."""
    cfg = Config()
    cfg.set_main_option("script_location", str(ENVIRONMENT_DIR))
    cfg.set_main_option("version_locations", str(versions_dir(service)))
    cfg.set_main_option("path_separator", "os")
    if url:
        cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    cfg.attributes["service"] = service
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def head_revision(service: ServiceDeclaration) -> str | None:
    return ScriptDirectory.from_config(alembic_config(service)).get_current_head()


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade_database(engine: Engine, service: ServiceDeclaration, revision: str = "head") -> None:
    """Bring the service's database to `revision`; a no-op when it is there already.

    Safe when several processes start at once (the orders API and relay share a database; a
    service may run several instances): everything happens in one transaction that first takes
    a lock, the write lock on SQLite (`BEGIN IMMEDIATE`, see db.py) or a transaction-level
    advisory lock on PostgreSQL, so the second process waits and then finds nothing to do.
    Both databases have transactional DDL, so a crash mid-migration leaves the old schema.
    """
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            key = zlib.crc32(f"orderpipe-migrate:{service.name}".encode()) & 0x7FFFFFFF
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": key})
        cfg = alembic_config(service, connection=conn)
        _adopt_unversioned(conn, cfg, service)
        command.upgrade(cfg, revision)


def _adopt_unversioned(conn: Connection, cfg: Config, service: ServiceDeclaration) -> None:
    """A database made by `metadata.create_all` before migrations existed has the baseline
    tables but no `alembic_version`: record it as the baseline instead of failing on
    CREATE TABLE, so the later revisions apply to it."""
    tables = set(inspect(conn).get_table_names())
    if "alembic_version" in tables or "outbox" not in tables:
        return
    base = ScriptDirectory.from_config(cfg).get_base()
    log.warning("database has tables but no migration history; recording it as the baseline",
                extra={"service": service.name, "revision": base})
    command.stamp(cfg, base)


def schema_diff(engine: Engine, service: ServiceDeclaration) -> list:
    """What Alembic's autogenerate would change to make the database match the code (empty when
    the migrations and the MetaData agree)."""
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True, "compare_server_default": True})
        return compare_metadata(context, service_metadata(service))


class NothingToGenerate(ValueError):
    pass


def new_revision(service: ServiceDeclaration, message: str, autogenerate: bool = True) -> Path:
    """Write the service's next revision file (`NNNN_<message>.py`) and return its path.

    Autogenerate compares the MetaData with a scratch SQLite database migrated to head, so it
    needs no server; review the file (and try it on PostgreSQL: `make test` runs the schema test).
    """
    with tempfile.TemporaryDirectory() as tmp:
        engine = make_engine(f"sqlite:///{Path(tmp) / 'scratch.db'}")
        try:
            upgrade_database(engine, service)
            if autogenerate and not schema_diff(engine, service):
                raise NothingToGenerate(f"the {service.name} migrations already match its tables ({service.migrations})")
            with engine.begin() as conn:
                cfg = alembic_config(service, connection=conn)
                count = sum(1 for _ in ScriptDirectory.from_config(cfg).walk_revisions())
                script = command.revision(cfg, message=message, autogenerate=autogenerate, rev_id=f"{count + 1:04d}")
        finally:
            engine.dispose()
    return Path(script.path)


class SchemaOutOfDate(RuntimeError):
    """The database is not at the code's head revision and upgrading on start is off."""


def prepare_database(engine: Engine, service: ServiceDeclaration, upgrade_on_start: bool = True) -> None:
    """What every process does before it touches its database: migrate it (the default), or,
    with upgrading on start turned off, refuse to run on a schema the code does not expect."""
    if upgrade_on_start:
        upgrade_database(engine, service)
        return
    current, head = current_revision(engine), head_revision(service)
    if current != head:
        raise SchemaOutOfDate(f"the {service.name} database is at revision {current or 'none'}, the code expects "
                              f"{head}: run `orderpipe db upgrade {service.name}` (or set "
                              "ORDERPIPE_DB_UPGRADE_ON_START=true)")
