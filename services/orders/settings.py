"""The orders service's own settings: where its HTTP API listens."""

from services.runtime.settings import ServiceSettings


class OrdersApiSettings(ServiceSettings):
    api_host: str = "127.0.0.1"  # ORDERPIPE_API_HOST; loopback unless configured
    api_port: int = 8000  # ORDERPIPE_API_PORT
