"""PDF invoice rendering. Text is checked in the real (compressed) output: the content
streams are inflated with zlib and the shown strings (Tj operators) collected, so no
PDF library beyond fpdf2 is needed."""

from __future__ import annotations

import re
import zlib
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path

import pytest

from services.invoice.pdf import (
    InvoiceDocument,
    InvoiceLine,
    format_amount,
    render_invoice,
    render_invoice_bytes,
)

_STREAM = re.compile(rb"/Filter\s*/FlateDecode.*?>>\s*stream\r?\n(.*?)\r?\nendstream", re.S)
_TJ = re.compile(rb"\(((?:\\.|[^\\)])*)\)\s*Tj")


def _unescape(s: bytes) -> str:
    s = re.sub(rb"\\([()\\])", rb"\1", s)
    return s.decode("latin-1")


def pdf_text(data: bytes) -> list[str]:
    texts: list[str] = []
    streams = _STREAM.findall(data)
    assert streams, "no compressed content stream found"
    for raw in streams:
        try:
            content = zlib.decompress(raw)
        except zlib.error:
            continue
        texts.extend(_unescape(m) for m in _TJ.findall(content))
    return texts


def make_doc(**overrides) -> InvoiceDocument:
    fields = dict(
        number="INV-2024-000042",
        order_id="ord-7f3a",
        customer_id="cust-19",
        customer_email="ada@example.com",
        currency="EUR",
        lines=[
            InvoiceLine("SKU-RED-MUG", 2, Decimal("12.50")),
            InvoiceLine("SKU-TEA (200g)", 3, Decimal("4.99")),
        ],
        issued_at=datetime(2024, 5, 1, 12, 30, tzinfo=timezone.utc),
    )
    fields.update(overrides)
    return InvoiceDocument(**fields)


def test_total_is_exact_sum():
    doc = make_doc()
    assert doc.total == Decimal("39.97")
    assert make_doc(lines=[]).total == Decimal(0)


def test_render_writes_pdf_with_number_order_customer_lines_and_total(tmp_path: Path):
    out = render_invoice(make_doc(), tmp_path / "a" / "b" / "INV-2024-000042.pdf")
    assert out == tmp_path / "a" / "b" / "INV-2024-000042.pdf"
    data = out.read_bytes()
    assert data.startswith(b"%PDF")
    assert data.rstrip().endswith(b"%%EOF")
    text = pdf_text(data)
    joined = "\n".join(text)
    assert "INV-2024-000042" in joined
    assert "ord-7f3a" in joined
    assert "cust-19" in joined
    assert "ada@example.com" in joined
    assert "SKU-RED-MUG" in text and "SKU-TEA (200g)" in text
    assert "25.00 EUR" in text and "14.97 EUR" in text
    assert "Total: 39.97 EUR" in text
    # no temporary files left behind
    assert [p.name for p in out.parent.iterdir()] == ["INV-2024-000042.pdf"]


def test_render_is_deterministic_and_overwrites(tmp_path: Path):
    doc = make_doc()
    assert render_invoice_bytes(doc) == render_invoice_bytes(doc)
    path = tmp_path / "inv.pdf"
    path.write_bytes(b"old")
    render_invoice(doc, path)
    assert path.read_bytes() == render_invoice_bytes(doc)


def test_many_lines_span_pages_and_non_latin1_does_not_crash(tmp_path: Path):
    lines = [InvoiceLine(f"SKU-{i:03d}", 1, Decimal("1.00")) for i in range(120)]
    doc = make_doc(lines=lines, customer_email="zoë@例え.jp")
    data = render_invoice(doc, tmp_path / "big.pdf").read_bytes()
    assert len(re.findall(rb"/Type\s*/Page\b", data)) >= 2  # page objects, not /Pages
    text = pdf_text(data)
    assert "SKU-119" in text
    assert "Total: 120.00 EUR" in text


def test_format_amount():
    assert format_amount(Decimal("1234.5"), "EUR") == "1,234.50 EUR"
    assert format_amount(Decimal("0.125"), "USD") == "0.125 USD"


@pytest.mark.parametrize("qty, price", [(0, Decimal("1")), (-1, Decimal("1")), (1, Decimal("-1")), (1, Decimal("NaN"))])
def test_invalid_lines_rejected(qty, price):
    with pytest.raises(ValueError):
        InvoiceLine("X", qty, price)


def test_float_price_rejected():
    with pytest.raises(TypeError):
        InvoiceLine("X", 1, 1.5)  # type: ignore[arg-type]
