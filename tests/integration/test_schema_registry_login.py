"""Schema Registry basic auth (SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO, or user:password@ in
SCHEMA_REGISTRY_URL) through confluent-kafka's registry client, against a real Confluent-compatible
registry that requires the login: Apicurio Registry 2.4.2, assembled from Maven Central and
started on 127.0.0.1 for each test (tests/schema_registry.py):

- with the login, schemas are registered as that user (the registry records who) and fetched
  by id; without it nothing is served;
- a refused login stops a process at start with one line that names the setting to fix, never
  the password, with no traceback;
- an id the registry does not know is a decode error (dead letter); a registry that does not
  answer is retryable (the message is not dead-lettered for it).
"""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from schema_registry import SchemaRegistry

from services.runtime.codec import (
    Codec,
    ConfluentRegistry,
    DecodeError,
    RegistryRefused,
    RegistryUnavailable,
    codec_from_settings,
    without_userinfo,
)
from services.runtime.errors import is_retryable
from services.runtime.settings import Settings
from services.tools.brokers import free_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

REPO = Path(__file__).resolve().parents[2]
USER, PASSWORD = "orderpipe", "registry-pw-51d2"
RESERVED = {"order_id": "o-1", "lines": [{"sku": "A", "quantity": 2}], "reserved_at": datetime(2026, 12, 7, tzinfo=UTC)}


@pytest.fixture
def registry():
    with SchemaRegistry({USER: PASSWORD}) as running:
        yield running


def settings(url: str, user_info: str | None = f"{USER}:{PASSWORD}") -> Settings:
    return Settings(schema_registry_url=url, schema_registry_basic_auth_user_info=user_info)


def test_with_the_login_schemas_are_registered_and_fetched_as_that_user(registry):
    writer = codec_from_settings(settings(registry.url))
    data = writer.encode("StockReserved", RESERVED)
    schema_id = int.from_bytes(data[1:5], "big")
    assert registry.subjects() == {"orderpipe.events.StockReserved": [schema_id]}

    reader = codec_from_settings(settings(registry.url))  # another process: fetches the id
    assert reader.decode(data).record["lines"] == [{"sku": "A", "quantity": 2}]
    assert registry.created_by("orderpipe.events.StockReserved") == [USER]
    # the registry keeps no record of reads: that one needed the login, as every request does
    for login in (None, (USER, f"not-{PASSWORD}")):
        assert httpx.get(f"{registry.url}/schemas/ids/{schema_id}", auth=login).status_code == 401


def test_the_login_may_be_in_the_url_and_is_never_printed(registry):
    url = registry.url.replace("http://", f"http://{USER}:{PASSWORD}@")
    codec = codec_from_settings(settings(url, user_info=None))
    codec.encode("StockReserved", RESERVED)
    assert registry.created_by("orderpipe.events.StockReserved") == [USER]
    assert without_userinfo(url) == registry.url


@pytest.mark.parametrize("user_info", [f"{USER}:not-{PASSWORD}", None])
def test_a_refused_login_is_one_line_naming_the_setting(registry, user_info):
    with pytest.raises(RegistryRefused) as refused:
        codec_from_settings(settings(registry.url, user_info))
    message = str(refused.value)
    assert message.startswith(f"the Schema Registry at {registry.url} refused the login: Unauthorized (HTTP 401")
    assert "SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO" in message and PASSWORD not in message


def test_a_service_with_a_wrong_registry_password_stops_at_start_with_one_line(registry, tmp_path: Path):
    wrong = f"not-{PASSWORD}"
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}", "SCHEMA_REGISTRY_URL": registry.url,
           "SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO": f"{USER}:{wrong}", "ORDERPIPE_DATA_DIR": str(tmp_path),
           "ORDERPIPE_HEALTH_PORT": "0"}
    done = subprocess.run([sys.executable, "-m", "services.cli.main", "run", "inventory"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stderr[-2000:]
    [line] = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert "refused the login" in line and "SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO" in line, line
    assert "Traceback" not in done.stderr and wrong not in done.stderr + done.stdout


def test_an_unknown_id_is_a_decode_error_and_a_silent_registry_is_retryable(registry):
    codec = codec_from_settings(settings(registry.url))
    with pytest.raises(DecodeError, match="unknown schema id 4242"):
        codec.decode(b"\x00" + (4242).to_bytes(4, "big") + b"\x02")

    gone = Codec(ConfluentRegistry(f"http://127.0.0.1:{free_port()}", user_info=f"{USER}:{PASSWORD}"))
    with pytest.raises(RegistryUnavailable) as unavailable:
        gone.decode(b"\x00" + (7).to_bytes(4, "big") + b"\x02")
    assert is_retryable(unavailable.value)
