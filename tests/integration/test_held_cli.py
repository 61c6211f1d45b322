"""`orderpipe held list` and `orderpipe held release` on a group's real database (SQLite and
PostgreSQL, migrated as the service migrates it): what they show of held keys, what releasing
does, and one clear line for every mistake (unknown group, unknown key, a database that cannot
be read)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from services.cli.held_cmd import app
from services.email.service import SERVICE as EMAIL
from services.runtime.db import utcnow
from services.runtime.held import DEAD_LETTERED, RELEASING, HeldKeys
from services.runtime.migrate import upgrade_database

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def held(cli_env: dict, *args: str):
    return CliRunner().invoke(app, list(args), env=cli_env)


@pytest.fixture
def email_db(database_url, test_engine, tmp_path):
    """The email group's database, migrated, with two held keys: one dead-lettered with two
    events waiting, one still retrying."""
    engine = test_engine(database_url)
    upgrade_database(engine, EMAIL)
    keys = HeldKeys.of_group("email")
    now = utcnow()
    with engine.begin() as conn:
        keys.start(conn, "order-dead", "head-1", "MailDeliveryError: 421 try later", "orders.created", 0, now)
        keys.head_settled(conn, "order-dead", "dead", "retries exhausted", now)
        keys.start(conn, "order-retrying", "head-2", "MailDeliveryError: 421", "orders.created", 1, now)
        for n, key in enumerate(["order-dead", "order-dead", "order-retrying"]):
            message = SimpleNamespace(timestamp=lambda: (1, 0), topic=lambda: "orders.cancelled",
                                      partition=lambda: 0, offset=lambda n=n: n, value=lambda: b"v",
                                      headers=lambda: [])
            keys.park(conn, key, message, f"waiting-{n}", now)
    env = {"ORDERPIPE_EMAIL_DATABASE_URL": database_url, "ORDERPIPE_DATA_DIR": str(tmp_path)}
    return SimpleNamespace(engine=engine, keys=keys, env=env)


def test_list_shows_each_held_key_with_its_state_and_waiting_events(email_db):
    result = held(email_db.env, "list", "--group", "email", "--json")

    assert result.exit_code == 0, result.output
    rows = {r["key"]: r for r in map(json.loads, result.output.splitlines())}
    assert {k: (r["group"], r["state"], r["waiting"], r["head_event_id"]) for k, r in rows.items()} == {
        "order-dead": ("email", DEAD_LETTERED, 2, "head-1"),
        "order-retrying": ("email", "retrying", 1, "head-2"),
    }
    table = held({**email_db.env, "COLUMNS": "200"}, "list", "--group", "email")
    assert table.exit_code == 0 and "order-dead" in table.output and "dead-lettered" in table.output


def test_release_lets_a_key_go_on_and_says_what_it_was(email_db):
    result = held(email_db.env, "release", "--group", "email", "--key", "order-dead")

    assert result.exit_code == 0, result.output
    assert "email: key order-dead released (it was dead-lettered); its waiting events run next" in result.output
    with email_db.engine.connect() as conn:
        state = conn.execute(select(email_db.keys.keys.c.state)
                             .where(email_db.keys.keys.c.key == "order-dead")).scalar_one()
    assert state == RELEASING


def test_mistakes_get_one_line_and_no_traceback(email_db, tmp_path):
    unknown_key = held(email_db.env, "release", "--group", "email", "--key", "no-such-order")
    assert unknown_key.exit_code == 1
    assert "group email holds no key 'no-such-order'" in unknown_key.output

    unknown_group = held(email_db.env, "list", "--group", "shipping")
    assert unknown_group.exit_code != 0 and "shipping" in unknown_group.output

    not_migrated = {"ORDERPIPE_EMAIL_DATABASE_URL": f"sqlite:///{tmp_path / 'empty.db'}",
                    "ORDERPIPE_DATA_DIR": str(tmp_path)}
    (tmp_path / "empty.db").touch()
    refused = held(not_migrated, "release", "--group", "email", "--key", "order-dead")
    assert refused.exit_code == 1
    assert "cannot read group email's held keys (no such table: held_keys)" in refused.output
    assert "orderpipe db upgrade email" in refused.output
    for result in (unknown_key, unknown_group, refused):
        assert "Traceback" not in result.output
