"""Alembic environment shared by every service database (see services/runtime/migrate.py).

The caller says which service (`config.attributes["service"]`) and usually passes an open
connection inside a transaction (`config.attributes["connection"]`), so the migration runs in
the caller's transaction and under its lock.
"""

from alembic import context

from services.runtime.db import make_engine
from services.runtime.migrate import service_metadata

config = context.config
service = config.attributes["service"]
target_metadata = service_metadata(service)


def _configure(**kwargs) -> None:
    context.configure(
        target_metadata=target_metadata,
        compare_type=True,
        # SQLite cannot ALTER most things in place; batch mode rebuilds the table instead.
        render_as_batch=True,
        **kwargs,
    )


def run_offline() -> None:
    _configure(url=config.get_main_option("sqlalchemy.url"), literal_binds=True,
               dialect_opts={"paramstyle": "named"})
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _configure(connection=connection)
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = make_engine(config.get_main_option("sqlalchemy.url"))
    try:
        with engine.connect() as connection:
            _configure(connection=connection)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
