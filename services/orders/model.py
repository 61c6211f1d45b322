"""The order a client places, validated at the door: anything wrong is a 422, nothing is written."""

from __future__ import annotations

from decimal import Decimal
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

# What may not appear in an address, spelled out: `\s` means three different sets to the three
# readers of this pattern (the OpenAPI document's JSON Schema reads it as ECMA-262, pydantic-core
# as Rust's regex, and Python's email package splits header lines at yet others). An address with
# \x1c passed the server's `\s` yet broke the To: header, and every such order's mail was
# dead-lettered. Excluded: '@', the C0 controls and space, DEL and the C1 controls, and every
# character any of them counts as a space or line break.
_NOT_IN_ADDRESS = r"@\x00-\x20\x7f-\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\ufeff"
EMAIL_PATTERN = rf"^[^{_NOT_IN_ADDRESS}]+@[^{_NOT_IN_ADDRESS}]+\.[^{_NOT_IN_ADDRESS}]+$"

Sku = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")]


class LineItem(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sku: Sku
    quantity: int = Field(gt=0, le=10_000)
    # At most 10 digits before the point: then even 100 lines of 10,000 units total less than
    # 10^16, which OrderCreated's decimal(18, 2) can carry (a larger total made POST /orders a
    # 500). The document says exactly what is accepted (pydantic's own schema allows any
    # string): a JSON number or a string of digits.
    unit_price: Decimal = Field(ge=0, max_digits=12, decimal_places=2, json_schema_extra={"anyOf": [
        {"type": "number", "minimum": 0, "maximum": 9_999_999_999.99, "multipleOf": 0.01},
        {"type": "string", "pattern": r"^[0-9]{1,10}(\.[0-9]{1,2})?$"}]})


class PlaceOrder(BaseModel):
    model_config = ConfigDict(extra="forbid")
    customer_id: str = Field(min_length=1, max_length=64)
    customer_email: str = Field(max_length=320, pattern=EMAIL_PATTERN)
    currency: str = Field(pattern=r"^[A-Z]{3}$", description="ISO 4217 code, e.g. EUR")
    lines: list[LineItem] = Field(min_length=1, max_length=100)

    @property
    def total(self) -> Decimal:
        return sum((line.quantity * line.unit_price for line in self.lines), Decimal("0.00"))

    def canonical(self) -> dict:
        """The order as data, the same for every way of writing it (12.5, "12.50"): what an
        Idempotency-Key's request is compared by."""
        body = self.model_dump(mode="json")
        for line, given in zip(body["lines"], self.lines, strict=True):
            line["unit_price"] = str(given.unit_price.quantize(CENT))
        return body


CENT = Decimal("0.01")


class CancelOrder(BaseModel):
    """The body of POST /orders/{order_id}/cancel; it may be left out."""

    model_config = ConfigDict(extra="forbid")
    reason: str | None = Field(default=None, min_length=1, max_length=200,
                               description="Why, in the customer's words; shown in the order's status.")


class Problem(BaseModel):
    """Why a request was refused or could not be served."""

    detail: str


class OrderAccepted(BaseModel):
    order_id: str
    status_url: str


class OrderCancelAccepted(BaseModel):
    order_id: str
    cancelled_at: str  # ISO 8601: when the (first) cancel was recorded
    reason: str | None
    status_url: str
    already_cancelled: bool = Field(description="True when an earlier request had cancelled the order: "
                                                "nothing was done again.")
