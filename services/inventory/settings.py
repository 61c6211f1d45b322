"""The inventory service's own settings."""

from services.runtime.settings import ServiceSettings


class InventorySettings(ServiceSettings):
    initial_stock: int = 1_000_000  # units per SKU seeded into an empty inventory database (ORDERPIPE_INITIAL_STOCK)
