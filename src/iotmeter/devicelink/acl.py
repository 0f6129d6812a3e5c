"""What a device may do on the broker: one rule set for Mosquitto's plugin and the embedded one.

A device (username and client id equal to its id) may publish its telemetry, its reported
configuration and its status, and subscribe to its desired configuration; nothing else. Device
ids never contain `+`, `#` or `/` (see `iotmeter.ids`), so a device id can't widen a topic.
"""

from __future__ import annotations

from iotmeter.ids import DEVICE_ID_RE

MAX_CONFIG_VERSION = 2**31 - 1
"""The largest configuration version on either side of the config topics (the registry keeps
versions in a 32-bit integer column)."""


def telemetry_topic(device_id: str) -> str:
    return f"iot/{device_id}/telemetry"


def status_topic(device_id: str) -> str:
    return f"iot/{device_id}/status"


def config_topic(device_id: str) -> str:
    """Desired configuration, retained, published by iotmeter."""
    return f"iot/{device_id}/config"


def reported_topic(device_id: str) -> str:
    """Configuration the device applied, published by the device."""
    return f"iot/{device_id}/config/reported"


def publish_topics(device_id: str) -> tuple[str, ...]:
    """Topics a device may publish to (exact names, no wildcards)."""
    return (telemetry_topic(device_id), reported_topic(device_id), status_topic(device_id))


def subscribe_filters(device_id: str) -> tuple[str, ...]:
    """Topic filters a device may subscribe to (exact names, no wildcards)."""
    return (config_topic(device_id),)


def valid_device_username(username: str | None, client_id: str | None) -> bool:
    """A device connects with its id as username and as client id."""
    return (
        username is not None
        and DEVICE_ID_RE.fullmatch(username) is not None
        and client_id == username
    )


def device_may_publish(device_id: str, topic: str) -> bool:
    return topic in publish_topics(device_id)


def device_may_subscribe(device_id: str, topic_filter: str) -> bool:
    return topic_filter in subscribe_filters(device_id)
