"""Every HTTP endpoint, held to its OpenAPI document with generated requests (schemathesis):
the orders API (FastAPI's /openapi.json) and the order-status worker's pages (its
/openapi.json, streams/order_status/openapi.py), both served by a running pipeline on the run's
broker with its real databases.

For each operation, a bounded number of valid and invalid requests; every answer must be no 5xx,
a status code the document lists, the content type and body schema it gives for that code.
So a bad request is a 4xx that says what is wrong, and nothing answers outside its contract.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Iterator

import httpx
import pytest
import schemathesis
from schemathesis.checks import positive_data_acceptance
from hypothesis import HealthCheck, given, settings

from services.orders.idempotency import KEY_PATTERN
from services.pipeline.demo import place_all, sample_orders, wait_for_final
from services.pipeline.stack import Stack, StackInfo
from services.runtime.settings import Settings

pytestmark = pytest.mark.e2e

EXAMPLES = 40  # per operation: bounded, so the test stays a minute or two
BOUNDED = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory, stack_broker: str) -> Iterator[StackInfo]:
    """A running pipeline with a few orders in it, so lookups and lists find something."""
    from rich.console import Console
    from rich.progress import Progress

    data_dir = tmp_path_factory.mktemp("contracts") / "data"
    with Stack(Settings(data_dir=data_dir), data_dir=data_dir, broker=stack_broker) as info:
        with httpx.Client(base_url=info.api_url, timeout=10) as client, \
                Progress(console=Console(file=open(os.devnull, "w"))) as progress:
            placed = place_all(client, sample_orders(5, seed=3), progress)
            wait_for_final(client, placed, 120, progress)
        yield info


@pytest.fixture(scope="module")
def orders_api(pipeline: StackInfo):
    return schemathesis.openapi.from_url(f"{pipeline.api_url}/openapi.json")  # requests go to the same host


@pytest.fixture(scope="module")
def status_pages(pipeline: StackInfo):
    return schemathesis.openapi.from_url(f"{pipeline.status_url}/openapi.json")


# Operations whose query the document can only call "a string" (`since`: a duration or an ISO
# time; `state`: a comma-separated list in any case): a 400 that says why is the right answer to
# a schema-valid value the server cannot read, so there "valid per the document means accepted"
# is not checked. Everything else is, everywhere.
FREE_FORM_QUERIES = {"GET /orders", "GET /status/"}


def _fresh_idempotency_key(case) -> None:
    """Generated requests reuse the few short keys hypothesis likes ("0", "null") with other
    bodies, which is a 422 by design (tests/integration/test_idempotency_keys.py): each valid
    key gets a suffix of its own, so every case is a first use. Invalid keys stay as generated."""
    key = (case.headers or {}).get("Idempotency-Key")
    if isinstance(key, str) and re.fullmatch(KEY_PATTERN, key):
        case.headers["Idempotency-Key"] = f"{key[:200]}-{uuid.uuid4().hex}"


def _holds_to_its_document(schema) -> list[str]:
    """Runs every operation's bounded examples; returns the operations that were checked."""
    checked = []
    for result in schema.get_all_operations():
        operation = result.ok()
        label = f"{operation.method.upper()} {operation.path}"
        lenient = [positive_data_acceptance] if label in FREE_FORM_QUERIES else []

        @BOUNDED
        @given(case=operation.as_strategy())
        def answers_within_the_document(case) -> None:
            _fresh_idempotency_key(case)
            case.call_and_validate(timeout=30, excluded_checks=lenient)

        answers_within_the_document()
        checked.append(label)
    return checked


def test_the_orders_api_answers_every_request_within_its_document(orders_api):
    assert len(_holds_to_its_document(orders_api)) == 6


def test_the_order_status_pages_answer_every_request_within_their_document(status_pages):
    assert len(_holds_to_its_document(status_pages)) == 5


def test_the_documents_cover_every_page(pipeline: StackInfo):
    """The generated tests only reach what the documents list: each lists every page."""
    api = httpx.get(f"{pipeline.api_url}/openapi.json", timeout=10).json()
    assert {(m.upper(), p) for p, ops in api["paths"].items() for m in ops} == {
        ("POST", "/orders"), ("GET", "/orders"), ("GET", "/orders/{order_id}"), ("POST", "/orders/{order_id}/cancel"),
        ("GET", "/healthz"), ("GET", "/readyz")}
    pages = httpx.get(f"{pipeline.status_url}/openapi.json", timeout=10).json()
    assert set(pages["paths"]) == {"/status/{order_id}/", "/status/", "/healthz", "/ready", "/metrics"}
