"""The orders service's own settings: where its HTTP API listens."""

from pydantic import Field

from services.runtime.settings import ServiceSettings


class OrdersApiSettings(ServiceSettings):
    api_host: str = "127.0.0.1"  # ORDERPIPE_API_HOST; loopback unless configured
    api_port: int = 8000  # ORDERPIPE_API_PORT
    # Larger request bodies are answered 413 unread (ORDERPIPE_API_MAX_BODY_BYTES); the largest
    # valid order, 100 lines, is about 10 KiB.
    api_max_body_bytes: int = Field(default=65_536, ge=1_024)
    # How long an Idempotency-Key's first answer is kept (ORDERPIPE_API_IDEMPOTENCY_KEY_TTL_HOURS):
    # a retry within this time gets it; after it, the same key places a new order.
    api_idempotency_key_ttl_hours: float = Field(default=24.0, gt=0)
