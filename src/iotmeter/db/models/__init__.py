"""ORM models; importing this package registers every table on `Base.metadata`."""

from iotmeter.db.models.alert import DeviceAlert
from iotmeter.db.models.dead_letter import DeadLetter
from iotmeter.db.models.device import Device
from iotmeter.db.models.device_config import DeviceConfig
from iotmeter.db.models.telemetry import LatestPoint, TelemetryPoint

__all__ = [
    "DeadLetter",
    "Device",
    "DeviceAlert",
    "DeviceConfig",
    "LatestPoint",
    "TelemetryPoint",
]
