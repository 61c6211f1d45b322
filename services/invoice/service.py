"""The invoice service, declared: waits for the stock decision, then one PDF invoice per reserved
order; one credit note per cancelled order that was invoiced."""

from __future__ import annotations

from services.invoice.handlers import HANDLERS, InvoiceDeps
from services.invoice.tables import metadata
from services.runtime.declaration import StatusStep, consumer_service
from services.runtime.events import InvoiceIssued, StepCompensated
from services.runtime.handler import Service
from services.runtime.service_main import Runtime


def build(runtime: Runtime) -> Service:
    invoice_dir = runtime.settings.data_dir / "invoices"
    invoice_dir.mkdir(parents=True, exist_ok=True)
    return Service(runtime.group, metadata, HANDLERS, deps=InvoiceDeps(invoice_dir.resolve()),
                   # rendering a PDF takes milliseconds: a small batch keeps each transaction
                   # well inside max.poll.interval.ms, so the group never evicts this consumer
                   batch_size=min(100, runtime.settings.consumer_batch_size))


SERVICE = consumer_service(
    "invoice", package_file=__file__, metadata=metadata, handlers=HANDLERS, emits=(InvoiceIssued, StepCompensated), build=build,
    # A rejected order gets no invoice: the step is skipped, not pending.
    step=StatusStep(done={"InvoiceIssued": "invoice_number"}, skipped_on=("StockRejected",)))
