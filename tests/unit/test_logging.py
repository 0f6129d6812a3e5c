"""The log handler: console and JSON lines, context fields, secrets masked, repeats counted, and
uvicorn's and other libraries' records through the same handler."""

from __future__ import annotations

import json
import logging
import logging.config
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import uvicorn.config

from iotmeter.config import Settings
from iotmeter.logging import (
    UVICORN_LOGGERS,
    LogFormat,
    LogHandler,
    bind_request_id,
    configure_logging,
    secrets_of,
    unbind_request_id,
)

ISO_UTC_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
API_KEY = "iotm_0123456789ab_" + "A" * 20 + "-_" + "b" * 21
API_KEY_SECRET = API_KEY.split("_", 2)[2]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Logs:
    """A logger with its own `LogHandler` (the process's logging left alone)."""

    def __init__(
        self,
        capsys: pytest.CaptureFixture[str],
        fmt: LogFormat,
        *,
        secrets: tuple[str, ...] = (),
        window_s: float = 60.0,
    ) -> None:
        self.capsys = capsys
        self.clock = Clock()
        self.handler = LogHandler(clock=self.clock)
        self.handler.configure(fmt, window_s, secrets)
        self.logger = logging.Logger("iotmeter.tests.logging", logging.DEBUG)
        self.logger.addHandler(self.handler)
        self.logger.propagate = False

    def lines(self) -> list[str]:
        return self.capsys.readouterr().err.splitlines()

    def objects(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.lines()]


@pytest.fixture
def json_logs(capsys: pytest.CaptureFixture[str]) -> Logs:
    return Logs(capsys, "json")


@pytest.fixture
def console_logs(capsys: pytest.CaptureFixture[str]) -> Logs:
    return Logs(capsys, "console")


# --- JSON -------------------------------------------------------------------------------------


def test_a_json_line_has_time_level_logger_message_and_context(json_logs: Logs) -> None:
    before = datetime.now(UTC).replace(microsecond=0)
    json_logs.logger.warning(
        "sink %s failing: %s", "archive", "refused", extra={"sink": "archive", "spool_seq": 41}
    )

    (line,) = json_logs.objects()
    assert list(line)[:4] == ["time", "level", "logger", "message"]
    assert ISO_UTC_MS.match(line["time"]), line["time"]
    moment = datetime.fromisoformat(line["time"].replace("Z", "+00:00"))
    assert before <= moment <= datetime.now(UTC)
    assert line["level"] == "WARNING"
    assert line["logger"] == "iotmeter.tests.logging"
    assert line["message"] == "sink archive failing: refused"
    assert line["sink"] == "archive"
    assert line["spool_seq"] == 41
    # None of logging's own record attributes (they are noise to a reader of JSON).
    assert not {"args", "msg", "levelno", "pathname", "process", "exc_text"} & set(line)


def test_a_json_line_carries_the_exception_and_the_stack_as_text(json_logs: Logs) -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        json_logs.logger.exception("it failed", extra={"device_id": "dev-1"})
    json_logs.logger.info("where am I", stack_info=True)

    failed, stacked = json_logs.objects()
    assert failed["level"] == "ERROR"
    assert failed["device_id"] == "dev-1"
    assert failed["exc_info"].startswith("Traceback (most recent call last)")
    assert failed["exc_info"].endswith("ValueError: boom")
    assert "test_a_json_line_carries_the_exception" in stacked["stack"]


def test_a_json_line_of_a_request_carries_its_id(json_logs: Logs) -> None:
    token = bind_request_id("req-1")
    try:
        json_logs.logger.info("inside")
    finally:
        unbind_request_id(token)
    json_logs.logger.info("outside")

    inside, outside = json_logs.objects()
    assert inside["request_id"] == "req-1"
    assert "request_id" not in outside


# --- console ----------------------------------------------------------------------------------


def test_a_console_line_keeps_its_format_with_context_appended(console_logs: Logs) -> None:
    console_logs.logger.warning(
        "spool full (%d bytes)", 1024, extra={"spool_bytes": 1024, "detail": "two words"}
    )
    try:
        raise OSError("disk gone")
    except OSError:
        console_logs.logger.exception("spool write failed")

    first, second, *traceback = console_logs.lines()
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z WARNING iotmeter\.tests\.logging: "
        r'spool full \(1024 bytes\) spool_bytes=1024 detail="two words"',
        first,
    ), first
    assert second.endswith("ERROR   iotmeter.tests.logging: spool write failed")
    assert traceback[0].startswith("Traceback")
    assert traceback[-1] == "OSError: disk gone"


def test_a_console_record_is_one_line_whatever_its_text_holds(console_logs: Logs) -> None:
    """A device's topic with line breaks cannot forge a log line of its own."""
    hostile = "iot/x\n2026-01-01T00:00:00.000Z ERROR   iotmeter.app: forged\r\x1b[2J/telemetry"
    console_logs.logger.error("parked a record of %s", hostile, extra={"topic": hostile})

    (line,) = console_logs.lines()
    assert "\\n2026-01-01T00:00:00.000Z ERROR" in line
    assert "\\r\\x1b[2J" in line
    assert not any(ord(char) < 32 for char in line)


# --- secrets ----------------------------------------------------------------------------------


def test_secret_shapes_are_masked_whatever_their_value(json_logs: Logs) -> None:
    json_logs.logger.error(
        "insert failed: %s %s %s %s",
        "[parameters: ('hook', 'whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw')]",
        '{"password": "hunter2hunter2"}',
        "{'aws_secret_access_key': 'AKIAabcdef123456'}",
        "secret_key=abcdefgh123",
    )
    (line,) = json_logs.objects()
    for leaked in (
        "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        "hunter2hunter2",
        "AKIAabcdef123456",
        "abcdefgh123",
    ):
        assert leaked not in line["message"], line["message"]


CONFIGURED = ("jwt-signing-secret-42", 'pa"ss\\word-7')


@pytest.mark.parametrize("fmt", ["console", "json"])
def test_secrets_are_masked_in_messages_context_and_exceptions(
    capsys: pytest.CaptureFixture[str], fmt: LogFormat
) -> None:
    logs = Logs(capsys, fmt, secrets=CONFIGURED)
    logs.logger.warning("connecting to %s", "postgresql+asyncpg://iot:db-pass-1@db:5432/iot")
    logs.logger.warning("broker %r", "mqtt://svc:p%40ss-word@broker:1883")
    logs.logger.warning("the secret is %s, quoted %r", CONFIGURED[0], CONFIGURED[1])
    logs.logger.warning("key %s used", API_KEY, extra={"key": API_KEY})
    logs.logger.warning("header Authorization: Bearer eyJhbGciOi.eyJzdWIi.c2ln")
    logs.logger.warning("a query ?password=hunter22&x=1 and api_key=abcdef12")
    logs.logger.warning("context only", extra={"detail": f"token {CONFIGURED[0]}"})
    try:
        raise ConnectionError(f"cannot reach smtp://mailer:mail-pw-9@mail:587 ({CONFIGURED[0]})")
    except ConnectionError:
        logs.logger.exception("mail failed")

    text = capsys.readouterr().err
    for secret in (
        "db-pass-1",
        "p%40ss-word",
        "p@ss-word",
        CONFIGURED[0],
        "ss\\word",
        "ss\\\\word",
        API_KEY_SECRET,
        "eyJhbGciOi",
        "hunter22",
        "abcdef12",
        "mail-pw-9",
    ):
        assert secret not in text, f"{secret!r} leaked:\n{text}"
    # What is left says what it was: the user, the host, the key's id.
    assert "postgresql+asyncpg://iot:***@db:5432/iot" in text
    assert "smtp://mailer:***@mail:587" in text
    assert "iotm_0123456789ab_***" in text
    assert "Bearer ***" in text
    if fmt == "json":
        assert all(json.loads(line) for line in text.splitlines())


def test_plain_words_are_not_taken_for_secrets(json_logs: Logs) -> None:
    said = "Basic setup done; bearer of news; the token count is 3; password reset sent"
    json_logs.logger.warning(said)
    assert [line["message"] for line in json_logs.objects()] == [said]


def test_settings_name_their_secrets(tmp_path: Path) -> None:
    admin_key = tmp_path / "admin.key"
    admin_key.write_text(API_KEY + "\n")
    settings = Settings(
        database_url="postgresql://iot:db-secret@localhost/iot",
        mqtt_url="mqtt://svc:mq%2Fsecret@127.0.0.1:1883",
        s3_endpoint_url="http://127.0.0.1:9000",
        s3_access_key="access-key-1",
        s3_secret_key="secret-key-1",
        auth_jwt_secret="jwt-secret-1",
        smtp_url="smtp://mailer:smtp-secret@mail:587",
        auth_bootstrap_file=admin_key,
        device_credential_secret_file=tmp_path / "missing",
    )

    found = set(secrets_of(settings))

    # The passwords of plain URL settings are masked where they stand in a URL (the pattern);
    # as plain text they are often also a user or database name (`iotmeter:iotmeter@`).
    assert not {"db-secret", "mq%2Fsecret", "mq/secret"} & found
    assert {
        "access-key-1",
        "secret-key-1",
        "jwt-secret-1",
        "smtp://mailer:smtp-secret@mail:587",
        "smtp-secret",
        API_KEY,
    } <= found
    assert not {"iot", "svc", "mailer"} & found  # user names are no secret


# --- repeats ----------------------------------------------------------------------------------


def test_a_repeated_warning_is_logged_once_per_window_with_a_count(json_logs: Logs) -> None:
    log, clock = json_logs.logger, json_logs.clock
    for attempt in range(1, 6):  # one call site, a changing detail: repeats all the same
        log.warning("%s failing, attempt %d", "archive sink", attempt)
        clock.now += 1
    clock.now += 60
    log.warning("%s failing, attempt %d", "archive sink", 6)
    log.warning("%s failing, attempt %d", "archive sink", 7)

    lines = json_logs.objects()
    assert [line["message"] for line in lines] == [
        "archive sink failing, attempt 1",
        "archive sink failing, attempt 6",
    ]
    assert "repeated" not in lines[0]
    assert lines[1]["repeated"] == 4


def test_failures_of_two_sinks_or_two_errors_are_not_repeats(json_logs: Logs) -> None:
    """What a line is about (its first argument) and the exception's type keep them apart."""
    log = json_logs.logger
    log.warning("%s failing: %s", "timeseries sink", "down")
    log.warning("%s failing: %s", "archive sink", "down")
    log.warning("%s failing: %s", "archive sink", "still down")
    for error in (KeyError("k"), ValueError("v"), ValueError("w")):
        try:
            raise error
        except Exception:
            log.exception("background task %s crashed", "notifier")

    lines = json_logs.objects()
    assert [(line["message"], line.get("exc_info", "").splitlines()[-1:]) for line in lines] == [
        ("timeseries sink failing: down", []),
        ("archive sink failing: down", []),
        ("background task notifier crashed", ["KeyError: 'k'"]),
        ("background task notifier crashed", ["ValueError: v"]),
    ]


def test_the_console_says_how_many_were_suppressed(console_logs: Logs) -> None:
    for _ in range(3):
        console_logs.logger.warning("broker lost", extra={"broker": "b:1883"})
    console_logs.clock.now += 75
    console_logs.logger.warning("broker lost", extra={"broker": "b:1883"})

    first, second = console_logs.lines()
    assert first.endswith("broker lost broker=b:1883")
    assert second.endswith("broker lost (2 similar suppressed in the last 75 s) broker=b:1883")


def test_repeats_are_counted_per_logger_level_and_template(json_logs: Logs) -> None:
    other = logging.Logger("iotmeter.tests.other")
    other.addHandler(json_logs.handler)
    for _ in range(2):
        json_logs.logger.warning("A %s", 1)
        json_logs.logger.error("A %s", 1)
        json_logs.logger.warning("B %s", 1)
        other.warning("A %s", 1)
        json_logs.logger.info("info is never limited")

    lines = json_logs.objects()
    assert [(line["logger"][-5:], line["level"], line["message"]) for line in lines] == [
        ("gging", "WARNING", "A 1"),
        ("gging", "ERROR", "A 1"),
        ("gging", "WARNING", "B 1"),
        ("other", "WARNING", "A 1"),
        ("gging", "INFO", "info is never limited"),
        ("gging", "INFO", "info is never limited"),
    ]


def test_a_window_of_zero_logs_every_repeat(capsys: pytest.CaptureFixture[str]) -> None:
    logs = Logs(capsys, "json", window_s=0)
    for _ in range(5):
        logs.logger.warning("again")
    assert len(logs.lines()) == 5


def test_the_repeat_memory_is_bounded(json_logs: Logs) -> None:
    repeats = json_logs.handler.repeats
    for number in range(5000):
        json_logs.logger.warning(f"distinct {number}")  # a template per message: a bad habit
    assert len(json_logs.lines()) == 5000
    # The least recently seen are forgotten (it passes again at once), the latest are not.
    json_logs.logger.warning("distinct 0")
    json_logs.logger.warning("distinct 4999")
    assert [line["message"] for line in json_logs.objects()] == ["distinct 0"]
    assert len(repeats._seen) <= 1000


# --- the process's logging --------------------------------------------------------------------


@pytest.fixture
def process_logging() -> Iterator[None]:
    """Leaves the process's logging as it found it."""
    root = logging.getLogger()
    names = ("iotmeter", *UVICORN_LOGGERS, "sqlalchemy.pool")
    saved = {
        name: (logger.level, list(logger.handlers), logger.propagate)
        for name in names
        for logger in [logging.getLogger(name)]
    }
    saved_root = (root.level, list(root.handlers))
    ours = [handler for handler in root.handlers if isinstance(handler, LogHandler)]
    yield
    root.setLevel(saved_root[0])
    root.handlers[:] = saved_root[1]
    for name, (level, handlers, propagate) in saved.items():
        logger = logging.getLogger(name)
        logger.setLevel(level)
        logger.handlers[:] = handlers
        logger.propagate = propagate
    for handler in ours:
        handler.configure("console", 60.0, ())


def test_uvicorn_and_libraries_log_through_the_one_handler(
    process_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    # As `uvicorn iotmeter.app:app` does before it imports the app.
    logging.config.dictConfig(uvicorn.config.LOGGING_CONFIG)
    configure_logging("INFO", "json")
    configure_logging("INFO", "json")  # again: still one handler

    logging.getLogger("uvicorn.error").info("Started server process [%d]", 7)
    logging.getLogger("uvicorn.access").info(
        '%s - "%s %s HTTP/%s" %d', "127.0.0.1:5000", "GET", "/health", "1.1", 200
    )
    logging.getLogger("sqlalchemy.pool").info("library chatter stays out")
    logging.getLogger("sqlalchemy.pool").warning("library warning")
    logging.getLogger("iotmeter.ingest").info("ours at INFO")

    captured = capsys.readouterr()
    assert captured.out == ""  # uvicorn's access handler wrote to stdout
    lines = [json.loads(line) for line in captured.err.splitlines()]
    assert [(line["logger"], line["message"]) for line in lines] == [
        ("uvicorn.error", "Started server process [7]"),
        ("uvicorn.access", '127.0.0.1:5000 - "GET /health HTTP/1.1" 200'),
        ("sqlalchemy.pool", "library warning"),
        ("iotmeter.ingest", "ours at INFO"),
    ]
    assert "color_message" not in lines[0]
    handlers = [h for h in logging.getLogger().handlers if isinstance(h, LogHandler)]
    assert len(handlers) == 1


def test_debug_is_for_iotmeter_only(
    process_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging("DEBUG", "console")
    logging.getLogger("iotmeter.x").debug("ours")
    logging.getLogger("sqlalchemy.pool").debug("theirs")
    assert [line.split(": ", 1)[1] for line in capsys.readouterr().err.splitlines()] == ["ours"]
