"""The device channel's configuration, as a simulated device sees it: parse, check, apply.

iotmeter publishes a device's desired configuration, retained, to `iot/{id}/config` as
`{"version": n, "config": {...}}`. A device applies the keys it knows (`interval_s`, `enabled`),
keeps the others, and reports what it applied. Everything here is pure; the connection that
carries the messages lives in `iotmeter.simulator.publisher`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import orjson

from iotmeter.devicelink.acl import MAX_CONFIG_VERSION

MAX_CONFIG_MESSAGE_BYTES = 256 * 1024
"""Largest configuration message a simulated device takes, as a small device's memory would
(orjson's own limit of 1,024 nesting levels bounds the depth)."""
MAX_INTERVAL_S = 7 * 24 * 3600.0
"""Longest publish interval a device accepts: a week."""
"""Versions are the registry's 64-bit integers."""


class ConfigRefused(ValueError):
    """A configuration message a device does not apply; the message says why."""


@dataclass(frozen=True)
class DesiredConfig:
    """One valid configuration message."""

    version: int
    config: dict[str, Any]
    """The whole configuration, unknown keys included (they are reported back as received)."""
    interval_s: float | None
    """Its `interval_s`, None when the key is absent."""
    enabled: bool | None
    """Its `enabled`, None when the key is absent."""

    def report(self) -> bytes:
        """The payload for `iot/{id}/config/reported` once this configuration is applied."""
        return orjson.dumps({"version": self.version, "config": self.config})


def parse_config_message(payload: bytes) -> DesiredConfig:
    """Check a configuration message; `ConfigRefused` for anything a device must not apply."""
    if len(payload) > MAX_CONFIG_MESSAGE_BYTES:
        raise ConfigRefused(
            f"{len(payload)} bytes, more than the {MAX_CONFIG_MESSAGE_BYTES} a device takes"
        )
    try:
        message = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise ConfigRefused(f"not JSON ({exc})") from None
    if not isinstance(message, dict) or set(message) != {"version", "config"}:
        raise ConfigRefused('not an object of exactly "version" and "config"')
    version = message["version"]
    if isinstance(version, bool) or not isinstance(version, int):
        raise ConfigRefused('"version" is not an integer')
    if not 0 <= version <= MAX_CONFIG_VERSION:
        raise ConfigRefused(f'"version" is not from 0 to {MAX_CONFIG_VERSION}')
    config = message["config"]
    if not isinstance(config, dict):
        raise ConfigRefused('"config" is not an object')
    return DesiredConfig(
        version=version,
        config=config,
        interval_s=_interval(config.get("interval_s")),
        enabled=_enabled(config.get("enabled")),
    )


def _interval(value: object) -> float | None:
    if value is None:
        return None
    # bool is an int in Python, but `true` is not a number of seconds.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigRefused('"interval_s" is not a number')
    seconds = float(value)
    if not (math.isfinite(seconds) and 0 < seconds <= MAX_INTERVAL_S):
        raise ConfigRefused(f'"interval_s" is not above 0 and at most {MAX_INTERVAL_S:.0f}')
    return seconds


def _enabled(value: object) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    raise ConfigRefused('"enabled" is not true or false')


@dataclass
class DeviceChannelState:
    """What one simulated device currently runs with (read it; its channel writes it)."""

    default_interval_s: float
    interval_s: float = field(init=False)
    """Seconds between two telemetry messages."""
    enabled: bool = True
    """False: the device publishes no telemetry (it stays connected and takes configurations)."""
    config_version: int | None = None
    """Version of the configuration applied last; None before the first."""
    config: dict[str, Any] | None = None
    """The configuration applied last, as received."""

    def __post_init__(self) -> None:
        self.interval_s = self.default_interval_s

    def apply(self, desired: DesiredConfig) -> None:
        """Take a whole configuration: a known key that is absent goes back to its default."""
        self.interval_s = (
            desired.interval_s if desired.interval_s is not None else self.default_interval_s
        )
        self.enabled = desired.enabled if desired.enabled is not None else True
        self.config_version = desired.version
        self.config = desired.config
