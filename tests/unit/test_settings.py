"""Settings: defaults, `IOTMETER_*` variables, and contradictions rejected at start-up."""

from __future__ import annotations

from pathlib import Path

import pytest

from iotmeter.__main__ import main
from iotmeter.config import Settings, env_name, load_settings
from iotmeter.errors import SettingsInvalid

S3_COMPLETE = {
    "IOTMETER_S3_ENDPOINT_URL": "http://127.0.0.1:9000",
    "IOTMETER_S3_ACCESS_KEY": "access",
    "IOTMETER_S3_SECRET_KEY": "secret-value",
}


def set_env(monkeypatch: pytest.MonkeyPatch, variables: dict[str, str]) -> None:
    for name, value in variables.items():
        monkeypatch.setenv(name, value)


def test_defaults_give_the_embedded_setup() -> None:
    settings = load_settings()

    assert settings.database_url == "sqlite+aiosqlite:///./data/iotmeter.db"
    assert settings.is_sqlite
    assert settings.auto_migrate
    assert settings.archive_dir == Path("data/archive")
    assert settings.mqtt_url == "auto"
    assert settings.influx_url is None
    assert settings.influx_token is None
    assert settings.influx_org == "iot-org"
    assert settings.influx_bucket == "iot-metrics"
    assert settings.s3_endpoint_url is None
    assert settings.s3_bucket == "iot-data"
    assert settings.http_host == "127.0.0.1"
    assert settings.http_port == 8080
    assert settings.collector_enabled is True
    assert settings.simulator_enabled is False
    assert settings.cors_origins == []
    assert settings.log_level == "INFO"


def test_variables_are_read_with_the_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    set_env(
        monkeypatch,
        {
            "IOTMETER_HTTP_PORT": "9090",
            "IOTMETER_INFLUX_ORG": "acme",
            "IOTMETER_COLLECTOR_ENABLED": "false",
            "IOTMETER_SIMULATOR_ENABLED": "true",
            "IOTMETER_LOG_LEVEL": "debug",
            "IOTMETER_ARCHIVE_DIR": "/srv/archive",
            # Without the prefix, a variable is not ours.
            "S3_BUCKET": "not-ours",
            "HTTP_HOST": "0.0.0.0",
        },
    )

    settings = load_settings()

    assert settings.http_port == 9090
    assert settings.influx_org == "acme"
    assert settings.collector_enabled is False
    assert settings.simulator_enabled is True
    assert settings.log_level == "DEBUG"
    assert settings.archive_dir == Path("/srv/archive")
    assert settings.s3_bucket == "iot-data"
    assert settings.http_host == "127.0.0.1"


def test_overrides_win_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IOTMETER_HTTP_PORT", "9090")
    assert load_settings(http_port=7000).http_port == 7000


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("http://a.example", ["http://a.example"]),
        (
            "http://a.example, https://b.example:8443 ,",
            ["http://a.example", "https://b.example:8443"],
        ),
        ("*", ["*"]),
        ("", []),
    ],
)
def test_cors_origins_are_comma_separated(
    monkeypatch: pytest.MonkeyPatch, raw: str, expected: list[str]
) -> None:
    monkeypatch.setenv("IOTMETER_CORS_ORIGINS", raw)
    assert load_settings().cors_origins == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("postgresql://u:p@db:5432/iot", "postgresql+asyncpg://u:p@db:5432/iot"),
        ("postgres://u@db/iot", "postgresql+asyncpg://u@db/iot"),
        ("postgresql+asyncpg://u@db/iot", "postgresql+asyncpg://u@db/iot"),
        ("sqlite:///./x.db", "sqlite+aiosqlite:///./x.db"),
        ("sqlite+aiosqlite:////abs/x.db", "sqlite+aiosqlite:////abs/x.db"),
    ],
)
def test_database_url_gets_the_async_driver(
    monkeypatch: pytest.MonkeyPatch, raw: str, expected: str
) -> None:
    monkeypatch.setenv("IOTMETER_DATABASE_URL", raw)
    settings = load_settings()
    assert settings.database_url == expected
    assert settings.is_sqlite == expected.startswith("sqlite")
    # Only SQLite migrates itself unless told otherwise.
    assert settings.auto_migrate == settings.is_sqlite


def test_a_complete_production_setup_is_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    set_env(
        monkeypatch,
        {
            **S3_COMPLETE,
            "IOTMETER_DATABASE_URL": "postgresql://iot@db/iot",
            "IOTMETER_DATABASE_AUTO_MIGRATE": "true",
            "IOTMETER_INFLUX_URL": "http://influx:8086/",
            "IOTMETER_INFLUX_TOKEN": "token-value",
            "IOTMETER_MQTT_URL": "mqtt://user:pw@broker:1883",
        },
    )

    settings = load_settings()

    assert settings.auto_migrate is True
    assert settings.influx_url == "http://influx:8086"
    assert settings.s3_endpoint_url == "http://127.0.0.1:9000"
    assert settings.mqtt_url == "mqtt://user:pw@broker:1883"
    assert settings.s3_secret_key is not None
    assert settings.s3_secret_key.get_secret_value() == "secret-value"
    # Secrets never show in a printed or logged settings object.
    for shown in (str(settings), repr(settings)):
        assert "secret-value" not in shown
        assert "token-value" not in shown


def test_embedded_broker_is_fine_when_something_uses_it(monkeypatch: pytest.MonkeyPatch) -> None:
    set_env(
        monkeypatch,
        {
            "IOTMETER_MQTT_URL": "embedded",
            "IOTMETER_COLLECTOR_ENABLED": "false",
            "IOTMETER_SIMULATOR_ENABLED": "true",
        },
    )
    assert load_settings().mqtt_url == "embedded"


@pytest.mark.parametrize(
    ("variables", "named"),
    [
        pytest.param(
            {"IOTMETER_S3_ENDPOINT_URL": "http://s3:9000", "IOTMETER_S3_SECRET_KEY": "s"},
            ["IOTMETER_S3_ACCESS_KEY", "IOTMETER_S3_ENDPOINT_URL"],
            id="s3-endpoint-without-access-key",
        ),
        pytest.param(
            {"IOTMETER_S3_ENDPOINT_URL": "http://s3:9000", "IOTMETER_S3_ACCESS_KEY": "a"},
            ["IOTMETER_S3_SECRET_KEY", "IOTMETER_S3_ENDPOINT_URL"],
            id="s3-endpoint-without-secret-key",
        ),
        pytest.param(
            {"IOTMETER_S3_ENDPOINT_URL": "http://s3:9000"},
            ["IOTMETER_S3_ACCESS_KEY", "IOTMETER_S3_SECRET_KEY"],
            id="s3-endpoint-without-keys",
        ),
        pytest.param(
            {**S3_COMPLETE, "IOTMETER_S3_BUCKET": ""},
            ["IOTMETER_S3_BUCKET", "IOTMETER_S3_ENDPOINT_URL"],
            id="s3-endpoint-with-empty-bucket",
        ),
        pytest.param(
            {"IOTMETER_S3_ACCESS_KEY": "a"},
            ["IOTMETER_S3_ENDPOINT_URL", "IOTMETER_S3_ACCESS_KEY"],
            id="s3-access-key-without-endpoint",
        ),
        pytest.param(
            {"IOTMETER_S3_SECRET_KEY": "s"},
            ["IOTMETER_S3_ENDPOINT_URL", "IOTMETER_S3_SECRET_KEY"],
            id="s3-secret-key-without-endpoint",
        ),
        pytest.param(
            {**S3_COMPLETE, "IOTMETER_S3_ENDPOINT_URL": "s3.example.com"},
            ["IOTMETER_S3_ENDPOINT_URL"],
            id="s3-endpoint-without-scheme",
        ),
        pytest.param(
            {"IOTMETER_INFLUX_URL": "http://influx:8086"},
            ["IOTMETER_INFLUX_TOKEN", "IOTMETER_INFLUX_URL"],
            id="influx-url-without-token",
        ),
        pytest.param(
            {"IOTMETER_INFLUX_TOKEN": "t"},
            ["IOTMETER_INFLUX_URL", "IOTMETER_INFLUX_TOKEN"],
            id="influx-token-without-url",
        ),
        pytest.param(
            {"IOTMETER_INFLUX_URL": "influx:8086", "IOTMETER_INFLUX_TOKEN": "t"},
            ["IOTMETER_INFLUX_URL"],
            id="influx-url-without-scheme",
        ),
        pytest.param(
            {
                "IOTMETER_MQTT_URL": "embedded",
                "IOTMETER_COLLECTOR_ENABLED": "false",
                "IOTMETER_SIMULATOR_ENABLED": "false",
            },
            ["IOTMETER_MQTT_URL", "IOTMETER_COLLECTOR_ENABLED", "IOTMETER_SIMULATOR_ENABLED"],
            id="embedded-broker-unused",
        ),
        pytest.param(
            {"IOTMETER_MQTT_URL": "http://broker:1883"},
            ["IOTMETER_MQTT_URL"],
            id="mqtt-url-wrong-scheme",
        ),
        pytest.param(
            {"IOTMETER_MQTT_URL": "mqtt://"}, ["IOTMETER_MQTT_URL"], id="mqtt-url-without-host"
        ),
        pytest.param(
            {"IOTMETER_SIMULATOR_MQTT_URL": "broker:1883"},
            ["IOTMETER_SIMULATOR_MQTT_URL"],
            id="simulator-mqtt-url",
        ),
        pytest.param(
            {"IOTMETER_DATABASE_URL": "mysql://u@db/iot"},
            ["IOTMETER_DATABASE_URL"],
            id="database-scheme",
        ),
        pytest.param(
            {"IOTMETER_DATABASE_URL": "/var/lib/iotmeter.db"},
            ["IOTMETER_DATABASE_URL"],
            id="database-url-without-scheme",
        ),
        pytest.param({"IOTMETER_HTTP_PORT": "0"}, ["IOTMETER_HTTP_PORT"], id="port-zero"),
        pytest.param({"IOTMETER_HTTP_PORT": "65536"}, ["IOTMETER_HTTP_PORT"], id="port-too-big"),
        pytest.param({"IOTMETER_HTTP_PORT": "http"}, ["IOTMETER_HTTP_PORT"], id="port-not-int"),
        pytest.param(
            {"IOTMETER_MQTT_EMBEDDED_PORT": "-1"},
            ["IOTMETER_MQTT_EMBEDDED_PORT"],
            id="broker-port",
        ),
        pytest.param({"IOTMETER_LOG_LEVEL": "LOUD"}, ["IOTMETER_LOG_LEVEL"], id="log-level"),
    ],
)
def test_contradictory_or_invalid_settings_are_rejected_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, variables: dict[str, str], named: list[str]
) -> None:
    set_env(monkeypatch, variables)

    with pytest.raises(SettingsInvalid) as caught:
        load_settings()

    message = caught.value.message
    assert message.startswith("invalid settings: ")
    for variable in named:
        assert variable in message, message
    # The secret values themselves are never echoed back.
    assert "secret-value" not in message


def test_every_problem_is_reported_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    set_env(
        monkeypatch,
        {"IOTMETER_INFLUX_TOKEN": "t", "IOTMETER_S3_ACCESS_KEY": "a"},
    )
    with pytest.raises(SettingsInvalid) as caught:
        load_settings()
    assert "IOTMETER_INFLUX_URL" in caught.value.message
    assert "IOTMETER_S3_ENDPOINT_URL" in caught.value.message


def test_settings_command_prints_every_variable(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["settings"]) == 0

    output = capsys.readouterr().out
    lines = output.splitlines()
    assert lines[0] == "| Variable | Default | Description |"
    for name, field in Settings.model_fields.items():
        row = next((line for line in lines if f"| `{env_name(name)}` |" in line), None)
        assert row is not None, f"{env_name(name)} is missing from the table"
        assert field.description
        assert field.description in row
    assert len(lines) == 2 + len(Settings.model_fields)
    port_row = next(line for line in lines if "`IOTMETER_HTTP_PORT`" in line)
    assert "`8080`" in port_row


def test_settings_command_works_with_broken_settings(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # The table is how a user finds the right variable, so a bad one must not hide it.
    monkeypatch.setenv("IOTMETER_HTTP_PORT", "http")
    assert main(["settings"]) == 0
    assert "IOTMETER_HTTP_PORT" in capsys.readouterr().out


def test_commands_that_need_settings_refuse_bad_ones(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("IOTMETER_DATABASE_URL", "mysql://u@db/iot")

    assert main(["migrate"]) == 2

    error = capsys.readouterr().err
    assert error.startswith("iotmeter: invalid settings")
    assert "IOTMETER_DATABASE_URL" in error
