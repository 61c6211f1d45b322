"""Analytics: per-minute and per-SKU rollups of orders, units and revenue; a cancelled order is
taken out of them again."""

from __future__ import annotations

from decimal import Decimal

from sqlalchemy import delete, select

from services.analytics.tables import cancelled_orders, per_minute, per_sku, recorded_orders
from services.runtime.bulk import BulkInsert
from services.runtime.cancellation import cancelled_among, compensated, is_cancelled
from services.runtime.db import upsert_add
from services.runtime.events import Event, OrderCancelled, OrderCreated, OrderRecorded
from services.runtime.handler import BatchUnitOfWork, UnitOfWork, batch_form_of

_ROLLUP_COLUMNS = ("orders", "units", "revenue")
# A run's statements (record_orders): each rollup row's sum over the run added in one statement,
# every recorded order in one. An order recorded already fails the insert, as in record_order.
_ADD_PER_MINUTE = BulkInsert(per_minute, ("minute", "currency", *_ROLLUP_COLUMNS), on_conflict_add=_ROLLUP_COLUMNS)
_ADD_PER_SKU = BulkInsert(per_sku, ("sku", "currency", *_ROLLUP_COLUMNS), on_conflict_add=_ROLLUP_COLUMNS)
_RECORD_ALL = BulkInsert(recorded_orders, ("order_id", "minute", "currency", "units", "revenue", "per_sku"))


def _counted(event: OrderCreated) -> tuple[str, int, dict[str, tuple[int, Decimal]]]:
    """What the order adds to the rollups: its minute, its units, and units and revenue per SKU."""
    units = sum(line.quantity for line in event.lines)
    minute = event.created_at.strftime("%Y-%m-%dT%H:%M")
    per_line: dict[str, tuple[int, Decimal]] = {}
    for line in event.lines:  # an order that lists a SKU twice still counts once for it
        units_so_far, revenue_so_far = per_line.get(line.sku, (0, Decimal(0)))
        per_line[line.sku] = (units_so_far + line.quantity, revenue_so_far + line.quantity * line.unit_price)
    return minute, units, per_line


def record_order(event: OrderCreated, uow: UnitOfWork) -> list[Event]:
    if is_cancelled(uow, cancelled_orders, event.order_id):
        return []  # cancelled before it was counted: it never will be
    minute, units, per_line = _counted(event)
    _add(uow, minute, event.currency, units, event.total, per_line, sign=1)
    uow.conn.execute(recorded_orders.insert().values(
        order_id=event.order_id, minute=minute, currency=event.currency, units=units, revenue=event.total,
        per_sku={sku: [u, str(r)] for sku, (u, r) in per_line.items()}))
    return [OrderRecorded(order_id=event.order_id, units=units, revenue=event.total, currency=event.currency,
                          recorded_at=uow.now)]


@batch_form_of(record_order)
def record_orders(events: list[OrderCreated], uow: BatchUnitOfWork) -> list[list[Event]]:
    """`record_order` for a run of orders: the rollups get the run's sums, one row each."""
    cancelled = cancelled_among(uow, cancelled_orders, (e.order_id for e in events))
    minutes: dict[tuple[str, str], list] = {}  # (minute, currency) -> [orders, units, revenue]
    skus: dict[tuple[str, str], list] = {}     # (sku, currency) -> [orders, units, revenue]
    recorded: list[dict] = []
    outputs: list[list[Event]] = []
    for event in events:
        if event.order_id in cancelled:
            outputs.append([])  # cancelled before it was counted: it never will be
            continue
        minute, units, per_line = _counted(event)
        _sum_into(minutes, (minute, event.currency), units, event.total)
        for sku, (sku_units, sku_revenue) in per_line.items():
            _sum_into(skus, (sku, event.currency), sku_units, sku_revenue)
        recorded.append({"order_id": event.order_id, "minute": minute, "currency": event.currency, "units": units,
                         "revenue": event.total,
                         "per_sku": {sku: [u, str(r)] for sku, (u, r) in per_line.items()}})
        outputs.append([OrderRecorded(order_id=event.order_id, units=units, revenue=event.total,
                                      currency=event.currency, recorded_at=uow.now)])
    # sorted keys: the rows are locked in one order across instances
    _ADD_PER_MINUTE.execute(uow.conn, [{"minute": m, "currency": c, **dict(zip(_ROLLUP_COLUMNS, sums))}
                                       for (m, c), sums in sorted(minutes.items())])
    _ADD_PER_SKU.execute(uow.conn, [{"sku": s, "currency": c, **dict(zip(_ROLLUP_COLUMNS, sums))}
                                    for (s, c), sums in sorted(skus.items())])
    _RECORD_ALL.execute(uow.conn, recorded)
    return outputs


def _sum_into(sums: dict[tuple[str, str], list], key: tuple[str, str], units: int, revenue: Decimal) -> None:
    row = sums.setdefault(key, [0, 0, Decimal(0)])
    row[0] += 1
    row[1] += units
    row[2] += revenue


def take_out_cancelled(event: OrderCancelled, uow: UnitOfWork) -> list[Event]:
    """Subtract exactly what the order added to the rollups (nothing if it was not counted yet:
    then it never will be)."""
    if is_cancelled(uow, cancelled_orders, event.order_id):
        return []
    row = uow.conn.execute(select(recorded_orders).where(recorded_orders.c.order_id == event.order_id)).mappings().first()
    if row is None:
        return compensated(uow, cancelled_orders, event.order_id, "the order was not counted: nothing to take out")
    per_line = {sku: (units, Decimal(revenue)) for sku, (units, revenue) in row["per_sku"].items()}
    _add(uow, row["minute"], row["currency"], row["units"], row["revenue"], per_line, sign=-1)
    uow.conn.execute(delete(recorded_orders).where(recorded_orders.c.order_id == event.order_id))
    return compensated(uow, cancelled_orders, event.order_id,
                       f"took 1 order, {row['units']} units and {row['revenue']} {row['currency']} out of the "
                       f"rollups of {row['minute']}")


def _add(uow: UnitOfWork, minute: str, currency: str, units: int, revenue: Decimal,
         per_line: dict[str, tuple[int, Decimal]], sign: int) -> None:
    upsert_add(uow.conn, per_minute, {"minute": minute, "currency": currency},
               {"orders": sign, "units": sign * units, "revenue": sign * revenue})
    for sku, (sku_units, sku_revenue) in sorted(per_line.items()):
        upsert_add(uow.conn, per_sku, {"sku": sku, "currency": currency},
                   {"orders": sign, "units": sign * sku_units, "revenue": sign * sku_revenue})


HANDLERS = {OrderCreated: [record_order], OrderCancelled: [take_out_cancelled]}
