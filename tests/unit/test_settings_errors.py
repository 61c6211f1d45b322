"""A bad setting ends any `orderpipe` command with one line per setting, named as the environment
variable to fix, and exit status 2: never a traceback, never a process that starts and stalls
(a batch size of 0 would pause every partition for good)."""

from __future__ import annotations

import sys

import pytest

from services.cli.main import main


def run_cli(monkeypatch, capsys, env: dict[str, str], *args: str) -> tuple[int, str]:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(sys, "argv", ["orderpipe", *args])
    with pytest.raises(SystemExit) as stopped:
        main()
    return stopped.value.code, capsys.readouterr().err


@pytest.mark.parametrize("name", ["ORDERPIPE_CONSUMER_BATCH_SIZE", "ORDERPIPE_RELAY_BATCH_SIZE"])
def test_a_batch_size_below_one_is_refused_naming_the_variable(monkeypatch, capsys, name):
    code, err = run_cli(monkeypatch, capsys, {name: "0"}, "lag")
    assert code == 2
    assert err == f"orderpipe: invalid setting {name}='0': Input should be greater than or equal to 1\n"


def test_every_bad_setting_is_named_nested_ones_by_their_full_variable(monkeypatch, capsys):
    code, err = run_cli(monkeypatch, capsys, {"ORDERPIPE_EMAIL_FAIL_RATE": "2",
                                               "ORDERPIPE_WORKERS__EMAIL__CONCURRENCY": "eight"}, "up")
    assert code == 2
    lines = sorted(err.splitlines())
    assert len(lines) == 2 and "Traceback" not in err
    assert lines[0] == "orderpipe: invalid setting ORDERPIPE_EMAIL_FAIL_RATE='2': Input should be less than or equal to 1"
    assert lines[1].startswith("orderpipe: invalid setting ORDERPIPE_WORKERS__EMAIL__CONCURRENCY='eight': ")


def test_a_bad_value_of_a_services_own_settings_stops_its_process_naming_the_variable(monkeypatch, capsys):
    """`orderpipe run email` checks the e-mail service's own settings (services/email/settings.py)
    before it connects to anything."""
    code, err = run_cli(monkeypatch, capsys, {"ORDERPIPE_SMTP_PORT": "twenty-five",
                                               "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1"}, "run", "email")
    assert code == 2
    assert err.startswith("orderpipe: invalid setting ORDERPIPE_SMTP_PORT='twenty-five': ")
    assert len(err.splitlines()) == 1 and "Traceback" not in err


def test_a_setting_given_to_settings_reaches_the_service_that_declares_it(monkeypatch):
    from services.email.settings import EmailSettings
    from services.runtime.settings import Settings

    monkeypatch.setenv("ORDERPIPE_SMTP_HOST", "mail.example")
    monkeypatch.setenv("ORDERPIPE_SMTP_PORT", "25")
    email = Settings(smtp_port=2525).of(EmailSettings)
    assert (email.smtp_host, email.smtp_port) == ("mail.example", 2525)  # the keyword wins over the environment
    monkeypatch.setenv("ORDERPIPE_LOYALTY_DATABASE_URL", "sqlite:////tmp/loyalty.db")
    assert Settings().database_url("loyalty") == "sqlite:////tmp/loyalty.db"
    assert Settings(loyalty_database_url="sqlite:////x.db").database_url("loyalty") == "sqlite:////x.db"


def test_a_setting_that_holds_a_secret_is_named_but_never_echoed(monkeypatch, capsys):
    """The Kafka client config carries the SASL password: a malformed one is refused naming the
    variable and the pair's position, not its text; a printed Settings masks every secret."""
    from pydantic import SecretStr

    from services.email.settings import EmailSettings
    from services.runtime.settings import Settings

    secret = "sasl-pw-31f0"
    code, err = run_cli(monkeypatch, capsys, {"ORDERPIPE_KAFKA_CLIENT_CONFIG":
                                              f"security.protocol=SASL_SSL;{secret}"}, "lag")
    assert code == 2 and secret not in err
    assert err == ("orderpipe: invalid setting ORDERPIPE_KAFKA_CLIENT_CONFIG=(hidden: it holds a secret): Value "
                   "error, pair 2 has no '=': write key=value pairs separated by ';'\n")

    settings = Settings(kafka_client_config=f"sasl.password={secret}",
                        schema_registry_basic_auth_user_info=SecretStr(f"u:{secret}"), smtp_password=secret)
    assert settings.extra_client_config["sasl.password"] == secret
    assert secret not in repr(settings) + str(settings) + repr(settings.of(EmailSettings))
