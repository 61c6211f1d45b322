from __future__ import annotations

from services.invoice.handlers import HANDLERS, InvoiceDeps
from services.invoice.tables import metadata
from services.runtime.handler import Service
from services.runtime.service_main import Runtime
from services.runtime.topology import group


def build(runtime: Runtime) -> Service:
    invoice_dir = runtime.settings.data_dir / "invoices"
    invoice_dir.mkdir(parents=True, exist_ok=True)
    return Service(group("invoice"), metadata, HANDLERS, deps=InvoiceDeps(invoice_dir.resolve()),
                   # rendering a PDF takes milliseconds: a small batch keeps each transaction
                   # well inside max.poll.interval.ms, so the group never evicts this consumer
                   batch_size=min(100, runtime.settings.consumer_batch_size))
