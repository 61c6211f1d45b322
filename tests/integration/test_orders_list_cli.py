"""`orderpipe orders list` against a real HTTP server standing in for the order-status view.

README promises (Command line: `orderpipe orders list`, `-s/--state STATE[,STATE]`, `--since`,
`--limit N` (100), `--json`): the command asks the view (`ORDERPIPE_STATUS_URL`) at
`GET /status/?state=&since=&limit=`, several states as one comma-separated `state`, 100 orders
by default; `--json` prints one JSON object per line, otherwise a table of the orders. A query
the view refuses (400) and a view that does not answer each end in one `error:` line and exit
code 1, never a traceback.

The stand-in is a ThreadingHTTPServer on 127.0.0.1 that records every request and answers as
the Faust worker's `/status/` page does (`streams/order_status/web.py`: unknown states are a
400 with a JSON `detail`).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pytest
from typer.testing import CliRunner

from services.cli.main import app
from streams.order_status.status import ORDER_STATES, OrderStatus, StepStatus

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

NOW = datetime(2025, 5, 1, 12, 0, tzinfo=UTC)


def status(order_id: str, state: str, minutes_ago: int, reason: str | None = None) -> dict:
    """A status as the view stores and serves it (`OrderStatus.to_json()`)."""
    at = NOW - timedelta(minutes=minutes_ago)
    pending = OrderStatus(order_id=order_id, created_at=at, updated_at=at).steps
    steps = {**pending, "inventory": StepStatus(state="done", attempts=1, updated_at=at),
             "email": StepStatus(state="dead_lettered" if state == "STALLED" else "done", attempts=1, updated_at=at)}
    return OrderStatus(order_id=order_id, state=state, reason=reason, steps=steps,
                       created_at=at - timedelta(minutes=1), updated_at=at).to_json()


STATUSES = [
    status("7d1c1f0e-5b1a-4d4e-9a55-2f0d3c1b9a01", "FAILED", 1, reason="SKU-OUT is not stocked"),
    status("a3b2c1d0-0f1e-4a2b-8c3d-4e5f6a7b8c02", "STALLED", 5),
]
TOTAL = 3  # the view knows one more than it shows


@dataclass
class FakeStatusView:
    url: str
    requests: list[tuple[str, dict[str, list[str]]]] = field(default_factory=list)


class _StatusPage(BaseHTTPRequestHandler):
    view: FakeStatusView

    def do_GET(self) -> None:
        parts = urlsplit(self.path)
        query = parse_qs(parts.query, keep_blank_values=True)
        self.view.requests.append((parts.path, query))
        if parts.path != "/status/":
            return self._answer(404, {"detail": "not found"})
        states = {s.strip().upper() for raw in query.get("state", []) for s in raw.split(",") if s.strip()}
        unknown = states - set(ORDER_STATES)
        if unknown:
            return self._answer(400, {"detail": f"unknown state {', '.join(sorted(unknown))}; "
                                                f"known: {', '.join(ORDER_STATES)}"})
        self._answer(200, {"scope": "cluster", "count": TOTAL, "statuses": STATUSES,
                           "workers": ["http://127.0.0.1:6066"]})

    def _answer(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


def start_server(view_holder: list[FakeStatusView]) -> ThreadingHTTPServer:
    handler = type("StatusPage", (_StatusPage,), {})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    view = FakeStatusView(f"http://127.0.0.1:{server.server_port}")
    handler.view = view
    view_holder.append(view)
    threading.Thread(target=server.serve_forever, name="fake-status-view", daemon=True).start()
    return server


@pytest.fixture
def status_view() -> Iterator[FakeStatusView]:
    holder: list[FakeStatusView] = []
    server = start_server(holder)
    try:
        yield holder[0]
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def closed_port_url() -> str:
    """The URL of a view that is gone: a server that listened on the port has been shut down."""
    server = start_server([])
    port = server.server_port
    server.shutdown()
    server.server_close()
    return f"http://127.0.0.1:{port}"


def orderpipe(url: str, *args: str):
    # A wide console (as tests/integration/test_dlt_cli.py runs the CLI): rich wraps its output at
    # the terminal's width, 80 columns when it is not a terminal, which would split table rows and
    # the longer error lines.
    return CliRunner().invoke(app, ["orders", "list", *args],
                              env={"ORDERPIPE_STATUS_URL": url, "COLUMNS": "200"})


def error_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip()]


def test_repeated_states_go_to_the_view_as_one_comma_separated_state_with_the_default_limit(status_view):
    """Promise: `-s/--state STATE[,STATE]` (repeatable) and `--limit N` (100): the view is asked once,
    at `/status/`, with every state in one comma-separated `state` parameter and `limit=100`."""
    result = orderpipe(status_view.url, "--state", "FAILED", "-s", "STALLED", "--json")
    assert result.exit_code == 0, result.output
    assert status_view.requests == [("/status/", {"state": ["FAILED,STALLED"], "limit": ["100"]})]


def test_since_and_limit_are_passed_through(status_view):
    """Promise: `--since 1h|ISO-TIME` and `--limit N` reach the view as `since` and `limit`."""
    result = orderpipe(status_view.url, "-s", "FAILED,STALLED", "--since", "1h", "--limit", "5", "--json")
    assert result.exit_code == 0, result.output
    assert status_view.requests == [("/status/", {"state": ["FAILED,STALLED"], "since": ["1h"], "limit": ["5"]})]


def test_json_prints_one_json_object_per_order_and_line(status_view):
    """Promise: `--json` prints one JSON object per line, the view's statuses, newest first."""
    result = orderpipe(status_view.url, "--json")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert [json.loads(line) for line in lines] == STATUSES
    assert result.stderr == ""


def test_the_table_shows_every_order_with_its_state(status_view):
    """Promise: without `--json`, a table of the orders: each order id with its state, reason and
    steps, and how many the view knows when it shows fewer."""
    result = orderpipe(status_view.url)
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert f"{TOTAL} order(s), showing the newest {len(STATUSES)}" in out
    rows = {s["order_id"]: next(line for line in out.splitlines() if s["order_id"] in line) for s in STATUSES}
    assert "FAILED" in rows[STATUSES[0]["order_id"]] and "SKU-OUT is not stocked" in rows[STATUSES[0]["order_id"]]
    assert "STALLED" in rows[STATUSES[1]["order_id"]] and "email:dead_lettered" in rows[STATUSES[1]["order_id"]]
    # newest first, as the view sent them
    assert out.index(STATUSES[0]["order_id"]) < out.index(STATUSES[1]["order_id"])


def test_a_query_the_view_refuses_is_one_error_line_and_exit_1(status_view):
    """Promise: a query the view refuses (400, e.g. an unknown state) is reported in one `error:`
    line with the view's reason, exit code 1, and no traceback."""
    result = orderpipe(status_view.url, "--state", "FAILED,BROKEN")
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    assert result.stdout == ""
    [line] = error_lines(result)
    assert line.startswith("error:") and "unknown state BROKEN" in line
    assert status_view.requests == [("/status/", {"state": ["FAILED,BROKEN"], "limit": ["100"]})]


def test_an_unreachable_view_is_one_error_line_and_exit_1(closed_port_url):
    """Promise: when the order-status view does not answer, the command says so in one `error:`
    line (naming ORDERPIPE_STATUS_URL), exit code 1, and no traceback."""
    result = orderpipe(closed_port_url)
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    assert result.stdout == ""
    [line] = error_lines(result)
    assert line.startswith("error:") and closed_port_url in line and "ORDERPIPE_STATUS_URL" in line
