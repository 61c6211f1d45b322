"""The whole pipeline as `orderpipe up` starts it: every process, the broker, real databases.

Places orders through the HTTP API, cancels a fifth of them at random moments (before, while
and after the services handle them), and checks outcomes where they live: each order's final
status, stock levels, invoices, credit notes and their PDFs, e-mails received by the SMTP sink,
analytics rollups. Runs on SQLite (the embedded default) and on PostgreSQL.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections import Counter
from decimal import Decimal
from pathlib import Path

import httpx
import pytest
from rich.console import Console
from rich.progress import Progress
from sqlalchemy import func, select, text

from services.analytics.tables import per_minute, per_sku
from services.pipeline.demo import place_all, sample_orders, wait_for_final
from services.pipeline.stack import Stack
from services.email.smtp_sink import read_maildir
from services.email.tables import sent_emails
from services.inventory.settings import InventorySettings
from services.inventory.tables import reservations, stock
from services.invoice.tables import credit_notes, invoices
from services.runtime.db import make_engine
from services.runtime.settings import Settings

pytestmark = pytest.mark.e2e

ORDERS = 60
SERVICES = ("orders", "inventory", "email", "invoice", "analytics")


@pytest.fixture(params=["sqlite", "postgresql"])
def database_urls(request, tmp_path):
    """One database per service: SQLite files under the data folder, or fresh PostgreSQL databases."""
    if request.param == "sqlite":
        yield {}
        return
    base_url = request.getfixturevalue("postgres_url")
    admin = make_engine(base_url, isolation_level="AUTOCOMMIT")
    names = {s: f"orderpipe_e2e_{s}_{uuid.uuid4().hex[:8]}" for s in SERVICES}
    with admin.connect() as conn:
        for name in names.values():
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    prefix = base_url.rsplit("/", 1)[0]
    yield {f"ORDERPIPE_{s.upper()}_DATABASE_URL": f"{prefix}/{name}" for s, name in names.items()}
    with admin.connect() as conn:
        for name in names.values():
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def test_orders_flow_end_to_end(tmp_path: Path, database_urls: dict[str, str], stack_broker: str):
    data_dir = tmp_path / "data"
    overrides = {k.removeprefix("ORDERPIPE_").lower(): v for k, v in database_urls.items()}
    settings = Settings(data_dir=data_dir, **overrides)
    samples = sample_orders(ORDERS, seed=11, cancel_share=0.2)
    with Stack(settings, data_dir=data_dir, broker=stack_broker, extra_env=database_urls) as info:
        pids = dict(info.processes)
        quiet = Console(file=open(os.devnull, "w"))
        with httpx.Client(base_url=info.api_url, timeout=10) as client, Progress(console=quiet) as progress:
            placed = place_all(client, samples, progress)
            final = wait_for_final(client, placed, 150, progress)

        states = {oid: view["state"] for oid, view in final.items()}
        assert states == {oid: order.expected for oid, order in placed.items()}
        reserved = {oid for oid, order in placed.items() if order.expected == "COMPLETED"}
        cancelled = {oid for oid, order in placed.items() if order.expected == "CANCELLED"}
        rejected = set(placed) - reserved - cancelled
        assert rejected and cancelled, "the sample must include rejected and cancelled orders"
        for oid in cancelled:
            assert all(step["compensation"] == "done" for step in final[oid]["steps"].values()), final[oid]
        for oid in rejected:
            assert "SKU-OUT" in final[oid]["reason"]
            assert final[oid]["steps"]["invoice"]["state"] == "skipped"

        cli = subprocess.run([sys.executable, "-m", "services.cli.main", "status", next(iter(reserved))],
                             env={**os.environ, "ORDERPIPE_STATUS_URL": info.status_url},
                             capture_output=True, text=True, timeout=30)
        assert cli.returncode == 0, cli.stderr
        assert "COMPLETED" in cli.stdout

        _check_inventory(settings, placed, reserved)
        _check_invoices(settings, info.data_dir, reserved, cancelled)
        _check_emails(settings, info.maildir, placed, cancelled)
        _check_analytics(settings, {oid: order for oid, order in placed.items() if oid not in cancelled})
    for name, pid in pids.items():
        assert not _alive(pid), f"{name} (pid {pid}) still running after stop"


def _quantities(bodies) -> Counter:
    wanted: Counter = Counter()
    for body in bodies:
        for line in body["lines"]:
            wanted[line["sku"]] += line["quantity"]
    return wanted


def _check_inventory(settings: Settings, placed, reserved: set[str]) -> None:
    engine = make_engine(settings.database_url("inventory"))
    wanted = _quantities(placed[oid].body for oid in reserved)
    with engine.connect() as conn:
        levels = {row.sku: row for row in conn.execute(select(stock))}
        assert conn.execute(select(func.count(func.distinct(reservations.c.order_id)))).scalar_one() == len(reserved)
    engine.dispose()
    for sku, qty in wanted.items():
        assert levels[sku].reserved == qty
        assert levels[sku].available == settings.of(InventorySettings).initial_stock - qty
    assert levels["SKU-OUT"].reserved == 0


def _check_invoices(settings: Settings, data_dir: Path, reserved: set[str], cancelled: set[str]) -> None:
    """One invoice per reserved order, and per cancelled one that was invoiced before its
    cancellation reached the invoice service; a credit note for exactly each of the latter."""
    engine = make_engine(settings.database_url("invoice"))
    with engine.connect() as conn:
        rows = conn.execute(select(invoices).order_by(invoices.c.number)).all()
        notes = conn.execute(select(credit_notes).order_by(credit_notes.c.number)).all()
    engine.dispose()
    invoiced = {r.order_id for r in rows}
    assert invoiced - cancelled == reserved, "exactly one invoice per reserved order, none for rejected"
    assert {n.order_id for n in notes} == invoiced & cancelled, "a credit note for each invoiced cancelled order"
    assert [r.number for r in rows] == list(range(1, len(rows) + 1)), "invoice numbers are gapless"
    assert [n.number for n in notes] == list(range(1, len(notes) + 1)), "credit note numbers are gapless"
    number_of = {r.order_id: r.number for r in rows}
    assert all(n.invoice_number == number_of[n.order_id] for n in notes)
    for r in [*rows, *notes]:
        pdf = data_dir / "invoices" / r.pdf_path
        assert pdf.read_bytes().startswith(b"%PDF")


def _check_emails(settings: Settings, maildir: Path, placed, cancelled: set[str]) -> None:
    """One confirmation per order that stayed placed; one cancellation mail per cancelled order,
    after at most one confirmation (none when the cancel reached e-mail first)."""
    received = read_maildir(maildir)
    confirmations = Counter(m["To"] for m in received if not m["Subject"].endswith(" is cancelled"))
    cancellations = Counter(m["To"] for m in received if m["Subject"].endswith(" is cancelled"))
    email_of = {oid: order.body["customer_email"] for oid, order in placed.items()}
    assert cancellations == Counter(email_of[oid] for oid in cancelled), "one cancellation mail per cancelled order"
    assert {email_of[oid] for oid in set(placed) - cancelled} <= set(confirmations)
    assert set(confirmations.values()) == {1}, "at most one confirmation per order"
    engine = make_engine(settings.database_url("email"))
    with engine.connect() as conn:
        recorded = {r.message_id for r in conn.execute(select(sent_emails.c.message_id))}
    engine.dispose()
    assert recorded == {m["Message-ID"] for m in received if not m["Subject"].endswith(" is cancelled")}


def _check_analytics(settings: Settings, placed) -> None:
    engine = make_engine(settings.database_url("analytics"))
    with engine.connect() as conn:
        orders, units, revenue = conn.execute(
            select(func.sum(per_minute.c.orders), func.sum(per_minute.c.units), func.sum(per_minute.c.revenue))).one()
        sku_units = dict(conn.execute(select(per_sku.c.sku, per_sku.c.units).where(per_sku.c.units != 0)).all())
    engine.dispose()
    bodies = [order.body for order in placed.values()]
    assert orders == len(placed)
    assert units == sum(line["quantity"] for b in bodies for line in b["lines"])
    assert Decimal(revenue) == sum(Decimal(line["unit_price"]) * line["quantity"] for b in bodies for line in b["lines"])
    assert sku_units == dict(_quantities(bodies))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purposes
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False
