"""The Alembic migrations build exactly the schema the code declares, on SQLite and PostgreSQL.

If someone changes a `tables.py` (or the runtime's inbox/outbox) without a revision, or writes a
revision that differs from the MetaData, `test_migrations_match_metadata` names the difference.
"""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import inspect
from typer.testing import CliRunner

from services import registry
from services.runtime.db import make_engine
from services.runtime.migrate import (
    SchemaOutOfDate, current_revision, head_revision, prepare_database, schema_diff, service_metadata, upgrade_database,
)

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("service", registry.SERVICES, ids=lambda s: s.name)
def test_migrations_match_metadata(service: str, database_url: str, test_engine):
    engine = test_engine(database_url)
    upgrade_database(engine, service)
    assert current_revision(engine) == head_revision(service)
    assert schema_diff(engine, service) == [], "migrations and tables.py disagree: run `orderpipe db revision`"
    upgrade_database(engine, service)  # again: a no-op
    assert current_revision(engine) == head_revision(service)


def _errors_running_at_once(work, engines) -> list[BaseException]:
    """`work(engine)` for every engine, each on its own thread at once; what they raised."""
    errors: list[BaseException] = []

    def run(engine):
        try:
            work(engine)
        except BaseException as exc:  # noqa: BLE001 - reported by the caller
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(e,)) for e in engines]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return errors


def test_concurrent_starts_migrate_once(database_url: str, test_engine):
    """The orders API and relay start together on one database: both upgrade, one waits."""
    engines = [test_engine(database_url) for _ in range(3)]
    errors = _errors_running_at_once(lambda engine: upgrade_database(engine, registry.service("orders")), engines)
    assert errors == []
    assert current_revision(engines[0]) == head_revision(registry.service("orders"))


def test_database_made_by_create_all_is_adopted(database_url: str, test_engine, tmp_path):
    """Databases created before migrations existed (metadata.create_all of the tables there were
    then: the baseline revision's) are stamped as the baseline and upgraded, not broken."""
    baseline = test_engine(f"sqlite:///{tmp_path / 'baseline.db'}")
    upgrade_database(baseline, registry.service("invoice"), revision="0001")
    then = set(inspect(baseline).get_table_names()) - {"alembic_version"}
    engine = test_engine(database_url)
    metadata = service_metadata(registry.service("invoice"))
    metadata.create_all(engine, tables=[t for t in metadata.sorted_tables if t.name in then])
    upgrade_database(engine, registry.service("invoice"))
    assert current_revision(engine) == head_revision(registry.service("invoice"))
    assert schema_diff(engine, registry.service("invoice")) == []


def test_upgrade_on_start_off_refuses_an_old_schema(tmp_path, test_engine):
    engine = test_engine(f"sqlite:///{tmp_path / 'email.db'}")
    with pytest.raises(SchemaOutOfDate, match="orderpipe db upgrade email"):
        prepare_database(engine, registry.service("email"), upgrade_on_start=False)
    prepare_database(engine, registry.service("email"))
    prepare_database(engine, registry.service("email"), upgrade_on_start=False)  # at head now: accepted


def test_cli_db_upgrade_all(tmp_path, monkeypatch, test_engine):
    from services.cli.main import app

    monkeypatch.setenv("ORDERPIPE_DATA_DIR", str(tmp_path))
    for service in registry.SERVICES:
        monkeypatch.delenv(f"ORDERPIPE_{service.name.upper()}_DATABASE_URL", raising=False)
    runner = CliRunner()
    result = runner.invoke(app, ["db", "upgrade", "all"])
    assert result.exit_code == 0, result.output
    for service in registry.SERVICES:
        engine = test_engine(f"sqlite:///{tmp_path / f'{service.name}.db'}")
        assert current_revision(engine) == head_revision(service)
        assert {"alembic_version", "outbox"} <= set(inspect(engine).get_table_names())
    assert runner.invoke(app, ["db", "current"]).exit_code == 0
    assert runner.invoke(app, ["db", "upgrade", "nope"]).exit_code == 1


def test_connections_opening_a_new_sqlite_database_together_all_get_in(tmp_path):
    """Three engines opening one new SQLite database at the same moment all switch it to WAL and
    work (before services/runtime/db.py asked again, about one database in ten answered one of
    them "database is locked" at once, failing the concurrent migration above in CI)."""
    for i in range(60):
        url = f"sqlite:///{tmp_path / f'fresh-{i}.db'}"
        engines = [make_engine(url) for _ in range(3)]
        together = threading.Barrier(len(engines), timeout=30)
        modes: list[str] = []

        def open_and_read(engine):
            together.wait()
            with engine.connect() as conn:
                modes.append(conn.exec_driver_sql("PRAGMA journal_mode").scalar_one())

        errors = _errors_running_at_once(open_and_read, engines)
        for engine in engines:
            engine.dispose()
        assert errors == [], f"database {i}: {errors}"
        assert modes == ["wal"] * 3
