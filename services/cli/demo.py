"""`orderpipe demo`: place sample orders through the HTTP API and check every outcome."""

from __future__ import annotations

import random
import time
from collections import Counter
from dataclasses import dataclass

import httpx
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from services.runtime.catalog import CATALOG

FINAL_STATES = {"COMPLETED", "FAILED"}
STEPS = ("inventory", "email", "invoice", "analytics")


@dataclass(frozen=True)
class SampleOrder:
    body: dict
    expected: str  # COMPLETED, or FAILED when it asks for a SKU that is never stocked


def sample_orders(n: int, seed: int = 7, reject_every: int = 20) -> list[SampleOrder]:
    """Deterministic sample orders; every `reject_every`-th one includes the sold-out SKU."""
    rng = random.Random(seed)
    stocked = [item for item in CATALOG if item.stocked]
    sold_out = [item for item in CATALOG if not item.stocked]
    orders = []
    for i in range(n):
        items = rng.sample(stocked, rng.randint(1, 3))
        rejected = reject_every > 0 and sold_out and i % reject_every == reject_every - 1
        if rejected:
            items.append(sold_out[0])
        body = {
            "customer_id": f"customer-{rng.randint(1, 500):04d}",
            "customer_email": f"customer{i}@example.com",
            "currency": "EUR",
            "lines": [{"sku": it.sku, "quantity": rng.randint(1, 4), "unit_price": str(it.unit_price)} for it in items],
        }
        orders.append(SampleOrder(body, "FAILED" if rejected else "COMPLETED"))
    return orders


def place_all(client: httpx.Client, orders: list[SampleOrder], progress: Progress) -> dict[str, SampleOrder]:
    task = progress.add_task("placing orders", total=len(orders))
    placed = {}
    for order in orders:
        r = client.post("/orders", json=order.body)
        r.raise_for_status()
        placed[r.json()["order_id"]] = order
        progress.advance(task)
    return placed


def wait_for_final(client: httpx.Client, placed: dict[str, SampleOrder], timeout: float,
                   progress: Progress) -> dict[str, dict]:
    task = progress.add_task("waiting for outcomes", total=len(placed))
    final: dict[str, dict] = {}
    deadline = time.monotonic() + timeout
    while len(final) < len(placed) and time.monotonic() < deadline:
        for order_id in [o for o in placed if o not in final]:
            view = client.get(f"/orders/{order_id}").json()
            # FAILED is final at once; COMPLETED needs every step, so both end the wait
            if view.get("state") in FINAL_STATES and _settled(view):
                final[order_id] = view
                progress.advance(task)
        if len(final) < len(placed):
            time.sleep(0.5)
    for order_id in placed:  # whatever did not finish: keep its last view for the summary
        if order_id not in final:
            final[order_id] = client.get(f"/orders/{order_id}").json()
    return final


def _settled(view: dict) -> bool:
    """An order is settled when no step is still pending (a FAILED order still sends its e-mail)."""
    return all(s.get("state") != "pending" for s in view.get("steps", {}).values())


def run_demo(info, *, orders: int, timeout: float, seed: int, console: Console) -> bool:
    samples = sample_orders(orders, seed)
    started = time.monotonic()
    with httpx.Client(base_url=info.api_url, timeout=10) as client, Progress(console=console) as progress:
        placed = place_all(client, samples, progress)
        final = wait_for_final(client, placed, timeout, progress)
    elapsed = time.monotonic() - started

    steps = Table(title="final state per service")
    steps.add_column("service")
    state_names = sorted({s.get("state", "?") for v in final.values() for s in v.get("steps", {}).values()})
    for name in state_names:
        steps.add_column(name, justify="right")
    for step in STEPS:
        counts = Counter(v.get("steps", {}).get(step, {}).get("state", "missing") for v in final.values())
        steps.add_row(step, *(str(counts.get(n, 0)) for n in state_names))
    console.print(steps)

    outcome = Table(title=f"{len(placed)} orders in {elapsed:.1f} s")
    outcome.add_column("order state")
    outcome.add_column("expected", justify="right")
    outcome.add_column("got", justify="right")
    expected = Counter(o.expected for o in placed.values())
    got = Counter(v.get("state") for v in final.values())
    for state in sorted(set(expected) | set(got)):
        outcome.add_row(state, str(expected.get(state, 0)), str(got.get(state, 0)))
    console.print(outcome)

    wrong = {oid: v.get("state") for oid, v in final.items()
             if v.get("state") != placed[oid].expected or not _settled(v)}
    if wrong:
        for oid, state in list(wrong.items())[:10]:
            console.print(f"[red]order {oid}: expected {placed[oid].expected}, got {state}[/]")
        console.print(f"[bold red]{len(wrong)} of {len(placed)} orders did not reach their expected final state[/]")
        return False
    console.print(f"[bold green]all {len(placed)} orders reached their expected final state[/] "
                  f"({expected.get('COMPLETED', 0)} completed, {expected.get('FAILED', 0)} rejected for stock)")
    return True
