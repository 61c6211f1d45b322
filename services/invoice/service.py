from __future__ import annotations

from services.invoice.handlers import HANDLERS, InvoiceDeps
from services.invoice.tables import metadata
from services.runtime.consumer import Service
from services.runtime.service_main import Runtime
from services.runtime.topology import group


def build(runtime: Runtime) -> Service:
    invoice_dir = runtime.settings.data_dir / "invoices"
    invoice_dir.mkdir(parents=True, exist_ok=True)
    return Service(group("invoice"), metadata, HANDLERS, deps=InvoiceDeps(invoice_dir.resolve()),
                   batch_size=runtime.settings.consumer_batch_size)
