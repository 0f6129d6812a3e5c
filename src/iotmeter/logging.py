"""Logging set-up: one line per record on stderr, readable (`console`) or JSON (`json`).

The standard library's logging with python-json-logger's formatter, not structlog: every
library iotmeter runs on (uvicorn, aiomqtt, SQLAlchemy, amqtt) logs through the standard
library, so one handler on the root logger formats all of them alike; structlog would need a
bridge to that pipeline anyway.

The one handler:
- adds context: the fields a call gives with `extra=` (`sink`, `broker`, `device_id`,
  `spool_bytes`...) and the id of the HTTP request being served (`request_id`);
- logs a warning (or worse) that repeats within `repeat_window_s` once, counts the repeats, and
  reports the count with the next one after the window (`repeated`): a sink failing every second
  makes one line a minute, not sixty;
- masks secrets in the final text, the exception's included: passwords in URLs, the configured
  secret values, API keys, bearer tokens.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from contextvars import ContextVar, Token
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote, unquote, urlsplit

from pydantic import BaseModel, SecretStr
from pythonjsonlogger.core import RESERVED_ATTRS
from pythonjsonlogger.json import JsonFormatter

LogFormat = Literal["console", "json"]

REQUEST_ID = "request_id"
REPEATED = "repeated"
"""The context field of a record that follows suppressed repeats: how many there were."""
MAX_REPEAT_KEYS = 1000
"""Distinct warnings the repeat filter remembers (least recently seen forgotten first)."""
MIN_SECRET_CHARS = 8
"""Shorter configured secrets are not masked as plain text: masking every `iotmeter` in every
line would hide more than it protects (in a URL they are still masked)."""
UVICORN_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access")

_CONSOLE_FORMAT = "%(asctime)s.%(msecs)03dZ %(levelname)-7s %(name)s: %(message)s"
_TIME_FORMAT = "%Y-%m-%dT%H:%M:%S"
_RECORD_ATTRIBUTES = frozenset(
    {
        *logging.LogRecord("", 0, "", 0, "", (), None).__dict__,
        *RESERVED_ATTRS,
        "message",
        "asctime",
        "color_message",  # uvicorn's coloured copy of the message
    }
)

_request_id: ContextVar[str | None] = ContextVar("iotmeter_request_id", default=None)


def current_request_id() -> str | None:
    """The id of the HTTP request being served (None outside of one)."""
    return _request_id.get()


def bind_request_id(request_id: str) -> Token[str | None]:
    """Make `request_id` the current request's id (for every record logged in this context)."""
    return _request_id.set(request_id)


def unbind_request_id(token: Token[str | None]) -> None:
    _request_id.reset(token)


def context_of(record: logging.LogRecord) -> dict[str, Any]:
    """The context fields of a record: what `extra=` (and the handler's filters) added."""
    return {
        key: value
        for key, value in record.__dict__.items()
        if key not in _RECORD_ATTRIBUTES and not key.startswith("_")
    }


# --- secrets ----------------------------------------------------------------------------------


def url_password(url: str) -> list[str]:
    """The password of a URL's userinfo, as written and decoded (none: empty)."""
    try:
        password = urlsplit(url).password
    except ValueError:
        return []
    return [password, unquote(password)] if password else []


def secrets_of(settings: BaseModel) -> list[str]:
    """Every secret in the settings: each `SecretStr`'s value, the passwords of URLs, and the
    admin key and device credential secret kept in files, when they exist already."""
    found: list[str] = []
    for name in type(settings).model_fields:
        value = getattr(settings, name)
        if isinstance(value, SecretStr):
            text = value.get_secret_value()
            found += [text, *url_password(text)]
        # The password of a URL kept in plain settings (the database URL) is masked where it
        # stands in a URL, by the pattern below; as plain text it is often a word that is also a
        # user, a database or a client id (`iotmeter:iotmeter@`), and masking it everywhere
        # would garble the log.
    for name in ("auth_bootstrap_file", "device_credential_secret_file"):
        path = getattr(settings, name, None)
        if isinstance(path, Path):
            found += _small_file(path)
    return found


def _small_file(path: Path) -> list[str]:
    try:
        if path.stat().st_size > 4096:
            return []
        return [path.read_text().strip()]
    except (OSError, UnicodeDecodeError):
        return []


_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    # scheme://user:password@host: the password up to the host's `@`.
    (re.compile(r"(\b[A-Za-z][A-Za-z0-9+.\-]*://[^:/?#@\s]*:)[^/?#\s]+@"), r"\1***@"),
    # An API key keeps its id (which key it was is worth knowing), not its secret.
    (re.compile(r"\b(iotm_[0-9a-f]{12}_)[A-Za-z0-9_\-]{43}"), r"\1***"),
    # Credentials of an `Authorization` header (not "basic setup": case and length tell).
    (re.compile(r"\b(Bearer|Basic)\s+[A-Za-z0-9\-._~+/]{8,}=*"), r"\1 ***"),
    (
        re.compile(r"\b(\w*(?:password|passwd|secret|token|api_?key)\w*)=[^\s&;,'\"]+", re.I),
        r"\1=***",
    ),
    # The same as a JSON or Python mapping item: "password": "..." or 'secret_key': '...'.
    (
        re.compile(
            r"""(["']\w*(?:password|passwd|secret|token|api_?key)\w*["']\s*:\s*["'])[^"']*""",
            re.I,
        ),
        r"\1***",
    ),
    # Webhook signing secrets (Standard Webhooks).
    (re.compile(r"\bwhsec_[A-Za-z0-9+/=]{8,}"), "whsec_***"),
)


class Redactor:
    """Masks secrets in text: the configured values (also as they look quoted, escaped or
    percent-encoded) and the shapes of secrets whatever their value."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._values: re.Pattern[str] | None = None
        self.set_secrets(secrets)

    def set_secrets(self, secrets: Iterable[str]) -> None:
        variants = set()
        for secret in secrets:
            if len(secret) < MIN_SECRET_CHARS:
                continue
            variants |= {
                secret,
                quote(secret, safe=""),
                repr(secret)[1:-1],
                json.dumps(secret)[1:-1],
            }
        ordered = sorted(variants, key=len, reverse=True)  # the longest match wins
        self._values = re.compile("|".join(map(re.escape, ordered))) if ordered else None

    def __call__(self, text: str) -> str:
        if self._values is not None:
            text = self._values.sub("***", text)
        for pattern, replacement in _PATTERNS:
            text = pattern.sub(replacement, text)
        return text

    def value(self, value: Any) -> Any:
        """A JSON value with every string in it masked (other scalars as they are)."""
        if isinstance(value, str):
            return self(value)
        if isinstance(value, bool | int | float) or value is None:
            return value
        if isinstance(value, Mapping):
            return {str(key): self.value(item) for key, item in value.items()}
        if isinstance(value, list | tuple | set | frozenset):
            return [self.value(item) for item in value]
        return self(str(value))


_DEFAULT_REDACTOR = Redactor()


# --- filters ----------------------------------------------------------------------------------


class RequestContext(logging.Filter):
    """Adds the current HTTP request's id to each record logged while serving it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if REQUEST_ID not in record.__dict__:
            request_id = _request_id.get()
            if request_id is not None:
                setattr(record, REQUEST_ID, request_id)
        return True


class RepeatFilter(logging.Filter):
    """Passes the first warning (or worse) of a kind, drops and counts its repeats for
    `window_s`, and gives the count (`repeated`) to the first one after the window.

    Of a kind: the same logger, level, message template (`record.msg` before its arguments),
    first argument (what the line is about: `timeseries sink`, a task's name) and exception
    type; so `... attempt 3` and `... attempt 4` of one call site are repeats, while the
    failures of two sinks, or two tasks' crashes, are not. A sink that fails, recovers and fails
    again within the window logs its second failure only after it: `iotmeter_sink_failing` and
    `/ready` say what holds now."""

    def __init__(
        self,
        window_s: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = MAX_REPEAT_KEYS,
    ) -> None:
        super().__init__()
        self.window_s = window_s
        self._clock = clock
        self._max_keys = max_keys
        self._lock = threading.Lock()
        # key -> [when the last one passed, repeats dropped since]
        self._seen: OrderedDict[tuple[str, int, str, str, str], list[float]] = OrderedDict()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING or self.window_s <= 0:
            return True
        template = record.msg if isinstance(record.msg, str) else str(record.msg)
        # What the line is about (the first argument: a sink, a task) and the exception's
        # type tell different failures of one call site apart.
        subject = (
            str(record.args[0])[:200] if isinstance(record.args, tuple) and record.args else ""
        )
        error = record.exc_info[0].__name__ if record.exc_info and record.exc_info[0] else ""
        key = (record.name, record.levelno, template, subject, error)
        now = self._clock()
        with self._lock:
            seen = self._seen.get(key)
            if seen is not None:
                self._seen.move_to_end(key)
                passed_at, dropped = seen
                if now - passed_at < self.window_s:
                    seen[1] += 1
                    return False
                if dropped:
                    setattr(record, REPEATED, int(dropped))
                    record._repeated_s = now - passed_at
                seen[:] = [now, 0]
                return True
            self._seen[key] = [now, 0]
            if len(self._seen) > self._max_keys:
                self._seen.popitem(last=False)
        return True


# --- formatters -------------------------------------------------------------------------------


def _console_value(value: Any) -> str:
    text = value if isinstance(value, str) else str(value)
    if not text or any(char.isspace() or char in "\"'=" for char in text):
        return json.dumps(text, ensure_ascii=False)
    return text


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _escape_controls(text: str) -> str:
    """Control characters written as Python escapes (a line break as backslash-n): what a
    device chose (a topic, a payload's text) cannot start a forged line of its own."""
    return _CONTROL.sub(lambda match: repr(match.group())[1:-1], text)


class ConsoleFormatter(logging.Formatter):
    """`2025-01-31T12:00:00.123Z WARNING iotmeter.x: message key=value`, then the traceback."""

    def __init__(self, redact: Redactor) -> None:
        super().__init__(_CONSOLE_FORMAT, _TIME_FORMAT)
        self.converter = time.gmtime
        self._redact = redact

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        context = context_of(record)
        repeated = context.pop(REPEATED, None)
        if repeated:
            seconds = getattr(record, "_repeated_s", 0.0)
            line += f" ({repeated} similar suppressed in the last {seconds:.0f} s)"
        if context:
            line += " " + " ".join(f"{k}={_console_value(v)}" for k, v in context.items())
        # One record, one line: the traceback that `format` appends is the only multi-line part.
        return _escape_controls(line)

    def format(self, record: logging.LogRecord) -> str:
        return self._redact(super().format(record))


class JsonLineFormatter(JsonFormatter):
    """One JSON object per line: time (UTC, ms), level, logger, message, the context fields,
    and `exc_info` / `stack` as text when there are."""

    def __init__(self, redact: Redactor) -> None:
        super().__init__()
        self._redact = redact

    def add_fields(
        self,
        log_data: dict[str, Any],
        record: logging.LogRecord,
        message_dict: dict[str, Any],
    ) -> None:
        moment = time.strftime(_TIME_FORMAT, time.gmtime(record.created))
        log_data["time"] = f"{moment}.{int(record.msecs):03d}Z"
        log_data["level"] = record.levelname
        log_data["logger"] = record.name
        log_data["message"] = record.message  # set by format(): the message with its arguments
        extras = {**message_dict, **context_of(record)}
        exc_info, stack = extras.pop("exc_info", None), extras.pop("stack_info", None)
        for key, value in extras.items():
            log_data.setdefault(key, value)
        if exc_info:
            log_data["exc_info"] = exc_info
        if stack:
            log_data["stack"] = stack

    def process_log_record(self, log_data: dict[str, Any]) -> dict[str, Any]:
        return {key: self._redact.value(value) for key, value in log_data.items()}


# --- the handler ------------------------------------------------------------------------------


class LogHandler(logging.Handler):
    """Writes each record as one line to stderr: to the `sys.stderr` of the moment it writes
    (a test runner swaps it per test)."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.redactor = Redactor()
        self.repeats = RepeatFilter(60.0, clock=clock)
        self.addFilter(self.repeats)
        self.addFilter(RequestContext())
        self.setFormatter(ConsoleFormatter(self.redactor))

    def configure(self, fmt: LogFormat, repeat_window_s: float, secrets: Iterable[str]) -> None:
        self.redactor.set_secrets(secrets)
        self.repeats.window_s = repeat_window_s
        if fmt == "json":
            self.setFormatter(JsonLineFormatter(self.redactor))
        else:
            self.setFormatter(ConsoleFormatter(self.redactor))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
            stream = sys.stderr
            stream.write(text + "\n")
            stream.flush()
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)


def redact(text: str) -> str:
    """`text` masked as a log line would be (the configured secrets once logging is set up; the
    shapes of secrets always): for what leaves the process by another way, such as a trace."""
    handler = next((h for h in logging.getLogger().handlers if isinstance(h, LogHandler)), None)
    return (handler.redactor if handler is not None else _DEFAULT_REDACTOR)(text)


def configure_logging(
    level: str,
    fmt: LogFormat = "console",
    repeat_window_s: float = 60.0,
    secrets: Iterable[str] = (),
) -> None:
    """Send every record (iotmeter's at `level`, uvicorn's, other libraries' from WARNING) to
    stderr through one handler. Called again, it reconfigures that handler (never a second)."""
    root = logging.getLogger()
    handler = next((h for h in root.handlers if isinstance(h, LogHandler)), None)
    if handler is None:
        handler = LogHandler()
        root.addHandler(handler)
    handler.configure(fmt, repeat_window_s, secrets)
    number = logging.getLevelNamesMapping()[level.upper()]
    root.setLevel(max(logging.WARNING, number))
    logging.getLogger("iotmeter").setLevel(number)
    for name in UVICORN_LOGGERS:
        # uvicorn's own configuration (`uvicorn iotmeter.app:app`) gave them their handlers.
        uvicorn_logger = logging.getLogger(name)
        for own in list(uvicorn_logger.handlers):
            uvicorn_logger.removeHandler(own)
        uvicorn_logger.propagate = True
    logging.getLogger("uvicorn").setLevel(number)
