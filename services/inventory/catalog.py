"""The sample catalog the demo orders from and the inventory seeds its stock with.

`SKU-OUT` is never stocked, so demo orders that contain it are rejected whole (FAILED).
"""

from dataclasses import dataclass
from decimal import Decimal


@dataclass(frozen=True)
class CatalogItem:
    sku: str
    name: str
    unit_price: Decimal
    stocked: bool = True


CATALOG: tuple[CatalogItem, ...] = (
    CatalogItem("SKU-001", "Espresso beans 1 kg", Decimal("24.90")),
    CatalogItem("SKU-002", "Filter papers (100)", Decimal("3.50")),
    CatalogItem("SKU-003", "Ceramic mug", Decimal("12.00")),
    CatalogItem("SKU-004", "Hand grinder", Decimal("89.00")),
    CatalogItem("SKU-005", "Milk jug", Decimal("19.95")),
    CatalogItem("SKU-006", "Descaler", Decimal("7.25")),
    CatalogItem("SKU-007", "Gooseneck kettle", Decimal("59.00")),
    CatalogItem("SKU-008", "Travel cup", Decimal("15.40")),
    CatalogItem("SKU-OUT", "Limited edition roast (sold out)", Decimal("42.00"), stocked=False),
)
