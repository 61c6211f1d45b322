"""ORDERPIPE_KAFKA_CLIENT_CONFIG reaches every client: librdkafka ones take it as it is; the Faust
worker (aiokafka) gets the same TLS and SASL settings through `faust_broker_credentials`."""

from __future__ import annotations

import shutil
import ssl
import subprocess
from pathlib import Path

import faust
import pytest
from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth

from services.runtime.kafka import consumer_config, faust_broker_credentials, producer_config
from services.runtime.settings import Settings

SCRAM_TLS = ("security.protocol=SASL_SSL;sasl.mechanism=SCRAM-SHA-512;sasl.username=orderpipe;"
             "sasl.password=s3cret;enable.ssl.certificate.verification=false")


def test_librdkafka_clients_get_the_settings_verbatim():
    settings = Settings(KAFKA_BOOTSTRAP_SERVERS="b:9093", kafka_client_config=SCRAM_TLS)
    for config in (producer_config(settings), consumer_config(settings, "g")):
        assert config["security.protocol"] == "SASL_SSL"
        assert config["sasl.mechanism"] == "SCRAM-SHA-512"
        assert config["sasl.password"] == "s3cret"


def test_the_processs_own_user_wins_over_the_shared_config_and_needs_its_password():
    """ORDERPIPE_KAFKA_SASL_USERNAME/PASSWORD: the Kubernetes manifests' per-process login (the
    password from its KafkaUser's Secret). Without that Secret the user name alone is not used."""
    own = Settings(kafka_client_config=SCRAM_TLS, kafka_sasl_username="orderpipe-email",
                   kafka_sasl_password="email-pw")
    assert (own.extra_client_config["sasl.username"], own.extra_client_config["sasl.password"]) == \
        ("orderpipe-email", "email-pw")
    shared_only = "security.protocol=SASL_SSL;sasl.mechanism=SCRAM-SHA-512"
    no_secret = Settings(kafka_client_config=shared_only, kafka_sasl_username="orderpipe-email")
    assert no_secret.extra_client_config == {"security.protocol": "SASL_SSL", "sasl.mechanism": "SCRAM-SHA-512"}
    assert "email-pw" not in repr(own)


def test_plaintext_needs_no_credentials():
    assert faust_broker_credentials({}) is None
    assert faust_broker_credentials({"security.protocol": "PLAINTEXT", "client.rack": "a"}) is None


def test_sasl_scram_over_tls_becomes_aiokafka_sasl_ssl():
    credentials = faust_broker_credentials(Settings(kafka_client_config=SCRAM_TLS).extra_client_config)
    assert isinstance(credentials, faust.SASLCredentials)
    auth = credentials_to_aiokafka_auth(credentials)  # what Faust hands to aiokafka
    assert auth["security_protocol"] == "SASL_SSL"
    assert auth["sasl_mechanism"] == "SCRAM-SHA-512"
    assert (auth["sasl_plain_username"], auth["sasl_plain_password"]) == ("orderpipe", "s3cret")
    assert auth["ssl_context"].verify_mode == ssl.CERT_NONE  # enable.ssl.certificate.verification=false


def test_sasl_without_tls():
    credentials = faust_broker_credentials({"security.protocol": "sasl_plaintext", "sasl.mechanisms": "SCRAM-SHA-256",
                                            "sasl.username": "u", "sasl.password": "p"})
    auth = credentials_to_aiokafka_auth(credentials)
    assert (auth["security_protocol"], auth["sasl_mechanism"], auth["ssl_context"]) == (
        "SASL_PLAINTEXT", "SCRAM-SHA-256", None)


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed (needed to make a test certificate)")
    cert, key = tmp_path / "client.crt", tmp_path / "client.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=orderpipe",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True, timeout=60)
    return cert, key


def test_mutual_tls_loads_the_ca_and_the_client_certificate(tmp_path: Path):
    cert, key = _self_signed(tmp_path)
    credentials = faust_broker_credentials({
        "security.protocol": "SSL", "ssl.ca.location": str(cert),
        "ssl.certificate.location": str(cert), "ssl.key.location": str(key)})
    assert isinstance(credentials, faust.SSLCredentials)
    auth = credentials_to_aiokafka_auth(credentials)
    context = auth["ssl_context"]
    assert auth["security_protocol"] == "SSL"
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert [c["subject"] for c in context.get_ca_certs()] == [((("commonName", "orderpipe"),),)]


def test_a_missing_ca_file_fails_at_start(tmp_path: Path):
    with pytest.raises(FileNotFoundError):
        faust_broker_credentials({"security.protocol": "SSL", "ssl.ca.location": str(tmp_path / "nope.pem")})


@pytest.mark.parametrize("config, complaint", [
    ({"security.protocol": "SASL_SSL", "sasl.mechanism": "GSSAPI"}, "GSSAPI"),
    ({"security.protocol": "SSL", "ssl.keystore.location": "/k.p12"}, "ssl.keystore.location"),
    ({"security.protocol": "SASL_SSL", "sasl.oauthbearer.method": "oidc"}, "sasl.oauthbearer.method"),
    ({"security.protocol": "TLS"}, "security.protocol"),
])
def test_settings_the_worker_cannot_honour_are_refused(config: dict, complaint: str):
    """Connecting without them would mean the worker connects differently from the services."""
    with pytest.raises(ValueError, match=complaint):
        faust_broker_credentials(config)


def test_the_worker_app_takes_them(tmp_path: Path):
    from streams.order_status.app import create_app

    credentials = faust_broker_credentials(Settings(kafka_client_config=SCRAM_TLS).extra_client_config)
    app = create_app("b1:9093,b2:9093", data_dir=tmp_path, web_port=6066, store="memory://",
                     broker_credentials=credentials)
    assert app.conf.broker_credentials is credentials


def test_a_refused_login_or_certificate_stops_the_client_and_a_lost_connection_does_not():
    """librdkafka reports these only to the error callback and would retry forever; the
    services' callback raises for the two that no retry fixes (tests/e2e/test_kafka_security.py
    shows it end to end)."""
    from confluent_kafka import KafkaError

    from services.runtime.errors import KafkaRefused
    from services.runtime.kafka import base_config, stop_on_refusal
    from services.runtime.settings import Settings

    assert base_config(Settings(kafka_bootstrap_servers="b:9093"))["error_cb"] is stop_on_refusal
    for code, fix in ((KafkaError._AUTHENTICATION, "sasl.password"), (KafkaError._SSL, "ssl.ca.location")):
        with pytest.raises(KafkaRefused, match=fix):
            stop_on_refusal(KafkaError(code, "refused"))
    for code in (KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN, KafkaError._TIMED_OUT):
        stop_on_refusal(KafkaError(code, "gone for now"))  # librdkafka reconnects by itself
