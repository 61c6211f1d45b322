"""A crash in the middle of a migration leaves the previous schema, and the next start completes it.

The promise (README, "Schema migrations"; `upgrade_database` in services/runtime/migrate.py):
the upgrade runs in one transaction that first takes a lock (SQLite's write lock through
`BEGIN IMMEDIATE`, a transaction-level advisory lock on PostgreSQL), and DDL is transactional on
both databases, so a process killed mid-migration leaves the previous schema, and the next start
(which runs the same upgrade) completes it.

How the crash is made, with the real runner:
- The migrations are a test-only history for the `orders` service database: `0001` is a copy of
  the service's real `services/orders/migrations/0001_initial.py`, and `0002` a test revision that
  changes the schema in several ways (a new table, a column added to `orders` through a batch
  table rebuild, which on SQLite copies the table, an index, a data update) and then, when the
  environment names a gate folder, writes a marker file and blocks reading a FIFO that nobody
  ever writes: the step is in progress, its DDL executed and not committed.
- Each run is a child process (`python -c`) that calls the project's entry point
  `services.runtime.migrate.upgrade_database(make_engine(url), <the orders service>, revision)`: the real
  lock, the real Alembic environment (services/runtime/migrations/env.py), the real Alembic. The
  only thing redirected is where the revision files are read from (`migrate.versions_dir`, in
  the child), so no product file is touched.
- The test waits for the marker, checks that the child really is inside its migration
  transaction (PostgreSQL: its session holds the advisory lock, idle in transaction; SQLite: the
  database's write lock is taken), and SIGKILLs it. On PostgreSQL it then waits until the server
  has ended the killed session (rolled back), before looking.

Then, on SQLite and on PostgreSQL: the schema (tables, columns with type and nullability,
primary keys, unique constraints, indexes) and the recorded version are exactly those before the
crash (`0001`), the rows written at `0001` are unchanged; a new child (the next start) upgrades to
`0002`, and the result is exactly the schema of a database that was migrated to `0002` without a
crash, with the version recorded once and the data migrated.
"""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import inspect, text

from services import registry
from services.runtime.db import make_engine
from services.runtime.migrate import versions_dir
from services.tools.supervisor import die_with_parent

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parents[2]
SERVICE = registry.service("orders")
APPLICATION_NAME = "orderpipe-migration-crash-test"
WAIT_S = 120.0  # a fail-safe against hanging forever, never a bound on how fast anything must be

# The test revision. Runs inside the runner's transaction like any revision; it only blocks when
# ORDERPIPE_TEST_MIGRATION_GATE names a folder holding the FIFO `hold`.
REVISION_0002 = '''
"""Test-only revision: several schema changes, then (with a gate) block mid-step.

Revision ID: 0002
Revises: 0001
"""
import os
from pathlib import Path

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "shipments",
        sa.Column("shipment_id", sa.String(36), nullable=False),
        sa.Column("order_id", sa.String(36), nullable=False),
        sa.Column("carrier", sa.String(64), nullable=False),
        sa.PrimaryKeyConstraint("shipment_id"),
    )
    # recreate="always": on SQLite the table is rebuilt (new table, copy, drop, rename), the
    # riskiest kind of step there; PostgreSQL runs the ALTERs in place.
    with op.batch_alter_table("orders", recreate="always") as batch:
        batch.add_column(sa.Column("channel", sa.String(32), nullable=True))
    op.create_index("ix_orders_customer_id", "orders", ["customer_id"])
    op.execute("UPDATE orders SET channel = 'web'")
    gate = os.environ.get("ORDERPIPE_TEST_MIGRATION_GATE")
    if gate:
        Path(gate, "reached").write_text(str(os.getpid()))
        with open(Path(gate, "hold")) as fifo:  # blocks until a writer opens it: never
            fifo.read()


def downgrade() -> None:
    op.drop_index("ix_orders_customer_id", "orders")
    with op.batch_alter_table("orders", recreate="always") as batch:
        batch.drop_column("channel")
    op.drop_table("shipments")
'''

# The child: the project's migrate entry point, with the revisions read from the test's folder.
CHILD = textwrap.dedent("""
    import sys
    from pathlib import Path

    from services import registry
    from services.runtime import migrate

    url, versions, revision = sys.argv[1:4]
    migrate.versions_dir = lambda service: Path(versions)
    engine = migrate.make_engine(url)
    try:
        migrate.upgrade_database(engine, registry.service("orders"), revision)
    finally:
        engine.dispose()
""")


@pytest.fixture
def versions(tmp_path: Path) -> Path:
    """The test-only history: the orders service's real 0001, then the test's 0002."""
    folder = tmp_path / "versions"
    folder.mkdir()
    [baseline] = versions_dir(SERVICE).glob("0001_*.py")
    shutil.copy(baseline, folder / baseline.name)
    (folder / "0002_test_step_that_can_block.py").write_text(REVISION_0002)
    return folder


@pytest.fixture
def children() -> Iterator[Callable[..., subprocess.Popen]]:
    """Factory: a migration child process; any still running after the test is SIGKILLed."""
    started: list[subprocess.Popen] = []

    def start(url: str, versions: Path, revision: str, log: Path, gate: Path | None = None) -> subprocess.Popen:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("ORDERPIPE_TEST_MIGRATION_GATE", None)
        if gate is not None:
            env["ORDERPIPE_TEST_MIGRATION_GATE"] = str(gate)
        with open(log, "ab") as out:
            proc = subprocess.Popen([sys.executable, "-c", CHILD, url, str(versions), revision], cwd=REPO,
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env,
                                    preexec_fn=die_with_parent)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def with_application_name(url: str) -> str:
    """The child's PostgreSQL URL, naming its sessions so the test can find them."""
    if not url.startswith("postgresql"):
        return url
    return f"{url}{'&' if '?' in url else '?'}application_name={APPLICATION_NAME}"


def migrate_in_child(start, url: str, versions: Path, revision: str, log: Path) -> None:
    proc = start(url, versions, revision, log)
    try:
        code = proc.wait(WAIT_S)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the migration to {revision} did not finish:\n{log.read_text()}") from None
    assert code == 0, f"the migration to {revision} failed ({code}):\n{log.read_text()}"


def wait_for(condition: Callable[[], object], what: str, timeout: float = WAIT_S) -> object:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.05)


# -- what a database holds ------------------------------------------------------------------------


def schema_of(url: str) -> dict:
    """Every table with its columns (name, type, nullable), primary key, unique constraints and
    indexes; the recorded Alembic versions (every row, so a double record shows); the orders."""
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            insp = inspect(conn)
            tables = {}
            for name in sorted(insp.get_table_names()):
                tables[name] = {
                    "columns": [(c["name"], str(c["type"]), c["nullable"]) for c in insp.get_columns(name)],
                    "primary_key": insp.get_pk_constraint(name)["constrained_columns"],
                    "unique": sorted(tuple(u["column_names"]) for u in insp.get_unique_constraints(name)),
                    "indexes": sorted((i["name"], tuple(i["column_names"]), bool(i["unique"]))
                                      for i in insp.get_indexes(name)),
                }
            versions = sorted(conn.execute(text("SELECT version_num FROM alembic_version")).scalars()) \
                if "alembic_version" in tables else None
            columns = [c[0] for c in tables.get("orders", {}).get("columns", [])]
            orders = sorted(tuple(r) for r in conn.execute(text(
                f"SELECT order_id, customer_id{', channel' if 'channel' in columns else ''} FROM orders"))) \
                if "orders" in tables else None
            integrity = conn.execute(text("PRAGMA integrity_check")).scalar() if conn.dialect.name == "sqlite" \
                else "ok"
        return {"tables": tables, "versions": versions, "orders": orders, "integrity": integrity}
    finally:
        engine.dispose()


def add_orders(url: str, count: int) -> list[str]:
    """A few orders written at 0001, which the migration must keep (SQLite copies them)."""
    engine = make_engine(url)
    ids = [str(uuid.uuid4()) for _ in range(count)]
    try:
        with engine.begin() as conn:
            for i, order_id in enumerate(ids):
                conn.execute(text(
                    "INSERT INTO orders (order_id, customer_id, customer_email, currency, lines, total, created_at) "
                    "VALUES (:id, :customer, 'c@example.com', 'EUR', '[]', 10.00, CURRENT_TIMESTAMP)"),
                    {"id": order_id, "customer": f"c-{i}"})
    finally:
        engine.dispose()
    return ids


def migration_in_progress(url: str, dialect: str) -> str:
    """Evidence that the child is inside its migration transaction right now."""
    if dialect == "postgresql":
        engine = make_engine(url)
        try:
            with engine.connect() as conn:
                rows = conn.execute(text(
                    "SELECT a.state, l.granted FROM pg_stat_activity a JOIN pg_locks l ON l.pid = a.pid "
                    "WHERE a.application_name = :name AND l.locktype = 'advisory'"), {"name": APPLICATION_NAME}).all()
        finally:
            engine.dispose()
        assert [tuple(r) for r in rows] == [("idle in transaction", True)], rows
        return "the child's session holds the migration's advisory lock, idle in transaction"
    # SQLite: the write lock the runner's BEGIN IMMEDIATE took must still be held.
    probe = sqlite3.connect(url.split("///", 1)[1], timeout=0, isolation_level=None)
    try:
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            probe.execute("BEGIN IMMEDIATE")
    finally:
        probe.close()
    return "the database's write lock is held by the child"


def sessions_left(url: str) -> int:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return conn.execute(text("SELECT count(*) FROM pg_stat_activity WHERE application_name = :name"),
                                {"name": APPLICATION_NAME}).scalar_one()
    finally:
        engine.dispose()


# -- the test -------------------------------------------------------------------------------------


def test_a_migration_killed_mid_step_leaves_the_previous_schema_and_the_next_start_completes_it(
        database_factory, versions: Path, children, tmp_path: Path) -> None:
    url, reference_url = database_factory(), database_factory()
    dialect = "sqlite" if url.startswith("sqlite") else "postgresql"
    child_url = with_application_name(url)

    # A database at the previous version, with data in it.
    migrate_in_child(children, child_url, versions, "0001", tmp_path / "to-0001.log")
    order_ids = add_orders(url, 5)
    before = schema_of(url)
    assert before["versions"] == ["0001"] and {"orders", "outbox", "alembic_version"} == set(before["tables"])
    assert len(before["orders"]) == 5

    # The upgrade to 0002, killed while its step is in progress.
    gate = tmp_path / "gate"
    gate.mkdir()
    os.mkfifo(gate / "hold")
    log = tmp_path / "killed.log"
    proc = children(child_url, versions, "head", log, gate=gate)
    wait_for(lambda: (gate / "reached").exists() or proc.poll() is not None, "the migration step to block")
    assert proc.poll() is None, f"the migration child exited ({proc.returncode}) before its step:\n{log.read_text()}"
    evidence = migration_in_progress(url, dialect)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(WAIT_S) == -signal.SIGKILL
    if dialect == "postgresql":  # the server notices the closed connection and rolls back
        wait_for(lambda: sessions_left(url) == 0, "PostgreSQL to end the killed child's session")

    after_crash = schema_of(url)
    assert after_crash == before, (
        f"{dialect}: a migration killed mid-step ({evidence}) did not leave the previous schema:\n"
        f"before:      {before}\nafter crash: {after_crash}")

    # The next start: the same upgrade, run again to the end.
    migrate_in_child(children, child_url, versions, "head", tmp_path / "restart.log")
    completed = schema_of(url)

    # What the same history makes without a crash, on a database of the same kind.
    migrate_in_child(children, with_application_name(reference_url), versions, "head", tmp_path / "reference.log")
    reference = schema_of(reference_url)

    assert completed["tables"] == reference["tables"]
    assert completed["versions"] == ["0002"], completed["versions"]  # recorded once
    assert completed["integrity"] == "ok"
    assert set(completed["tables"]) == {"orders", "outbox", "shipments", "alembic_version"}
    assert ("channel", "VARCHAR(32)", True) in completed["tables"]["orders"]["columns"]
    assert ("ix_orders_customer_id", ("customer_id",), False) in completed["tables"]["orders"]["indexes"]
    assert completed["orders"] == sorted((o, f"c-{i}", "web") for i, o in enumerate(order_ids))

    # And a further start finds nothing to do.
    migrate_in_child(children, child_url, versions, "head", tmp_path / "again.log")
    assert schema_of(url) == completed
