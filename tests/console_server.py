"""The ops console served for a test: uvicorn on a free loopback port, in a thread, with the
users the test names and the operators' clients on the test's settings, stopped afterwards."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial

import httpx
import uvicorn

from services.console.app import create_console
from services.console.auth import Sessions, Users, hash_password
from services.ops.audit import ops_clients
from services.orders.api import StatusClient
from services.runtime.settings import Settings
from services.tools.brokers import free_port

SECRET = b"test-secret"


def users(**people: tuple[str, str]) -> Users:
    """`users(ada=("operator", "pw"))`: each with a hash of their password."""
    return Users(",".join(f"{name}:{role}:{hash_password(password)}" for name, (role, password) in people.items()))


def sessions(hours: float = 1) -> Sessions:
    return Sessions(SECRET, hours=hours, secure=False)


@contextmanager
def serve_console(settings: Settings, people: Users, status_url: str | None = None) -> Iterator[str]:
    """The console's base URL while it runs; `status_url` None: no order-status view answers."""
    status = StatusClient(status_url or f"http://127.0.0.1:{free_port()}", timeout=5 if status_url else 1)
    app = create_console(settings, people, sessions(), status, partial(ops_clients, settings))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "the console did not start"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


@contextmanager
def logged_in(url: str, name: str, password: str) -> Iterator[httpx.Client]:
    """A client of the console at `url` with `name`'s session."""
    with httpx.Client(base_url=url, timeout=60) as client:
        answer = client.post("/login", data={"name": name, "password": password, "next": "/"})
        assert answer.status_code == 303 and answer.headers["location"] == "/", answer.text
        yield client


def csrf_of(page: str) -> str:
    """The session's CSRF token, from a page's forms."""
    return page.split('name="csrf" value="', 1)[1].split('"', 1)[0]
