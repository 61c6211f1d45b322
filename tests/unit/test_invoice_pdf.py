"""PDF invoice rendering (services/invoice/pdf.py writes the PDF objects itself). Text is
checked in the real (compressed) output twice: the content streams inflated with zlib and the
shown strings (Tj operators) collected; and the whole file read by pypdf in strict mode, as a
PDF reader would (cross-reference table, page tree, fonts, metadata, extracted text)."""

from __future__ import annotations

import re
import zlib
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path

import pytest
from fpdf.fonts import CORE_FONTS_CHARWIDTHS
from pypdf import PdfReader

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


def read_strictly(data: bytes) -> PdfReader:
    """pypdf in strict mode: a wrong xref offset, length or object raises instead of being repaired."""
    import io

    return PdfReader(io.BytesIO(data), strict=True)


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


def test_a_pdf_reader_reads_the_invoice_its_text_fonts_and_metadata():
    reader = read_strictly(render_invoice_bytes(make_doc()))
    assert len(reader.pages) == 1
    page = reader.pages[0]
    assert [round(float(v), 1) for v in page.mediabox] == [0, 0, 595.3, 841.9]  # A4
    text = page.extract_text()
    for expected in ("Invoice INV-2024-000042", "Order:", "ord-7f3a", "ada@example.com", "2024-05-01 12:30 UTC",
                     "SKU-RED-MUG", "SKU-TEA (200g)", "12.50 EUR", "25.00 EUR", "Total: 39.97 EUR"):
        assert expected in text, f"{expected!r} not in the page's text: {text!r}"
    fonts = {str(f["/BaseFont"]) for f in page["/Resources"]["/Font"].values()}
    assert fonts == {"/Helvetica", "/Helvetica-Bold"}
    assert reader.metadata.title == "Invoice INV-2024-000042"
    assert reader.metadata.producer == "orderpipe invoice"
    assert reader.metadata.creation_date == datetime(2024, 5, 1, 12, 30, tzinfo=timezone.utc)


def test_amounts_are_right_aligned_in_their_columns():
    """Each amount ends 1 mm inside its column's right edge, whatever its length (widths from
    Helvetica's standard metrics)."""
    lines = [InvoiceLine("A", 1, Decimal("1.00")), InvoiceLine("B", 1000, Decimal("12345.67"))]
    page = read_strictly(render_invoice_bytes(make_doc(lines=lines))).pages[0]
    starts: dict[str, float] = {}
    page.extract_text(visitor_text=lambda text, cm, tm, font, size: starts.setdefault(text.strip(), tm[4]))
    helvetica = CORE_FONTS_CHARWIDTHS["helvetica"]
    mm = 72 / 25.4

    def right_edge(text: str) -> float:
        return (starts[text] + sum(helvetica[ch] for ch in text) * 10 / 1000) / mm

    assert right_edge("1.00 EUR") == pytest.approx(10 + 70 + 25 + 45 - 1, abs=0.05)      # unit price column
    assert right_edge("12,345.67 EUR") == pytest.approx(10 + 70 + 25 + 45 - 1, abs=0.05)
    assert right_edge("12,345,670.00 EUR") == pytest.approx(10 + 70 + 25 + 45 + 50 - 1, abs=0.05)  # amount
    assert starts["A"] / mm == pytest.approx(10 + 1, abs=0.05)  # the SKU column is left-aligned


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
    reader = read_strictly(data)
    pages = [page.extract_text() for page in reader.pages]
    assert len(pages) >= 2 and all("SKU Qty Unit price Amount" in p.replace("\n", " ") for p in pages), \
        "the table's headings are repeated on each page"
    assert "zoë@??.jp" in pages[0], "characters outside Latin-1 shown as ?"


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
