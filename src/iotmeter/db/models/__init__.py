"""ORM models; importing this package registers every table on `Base.metadata`."""

from iotmeter.db.models.alert import DeviceAlert
from iotmeter.db.models.alerting import (
    AlertRule,
    AlertRuleState,
    DeliveryAttempt,
    Notification,
    NotificationChannel,
)
from iotmeter.db.models.api_key import ApiKey
from iotmeter.db.models.audit import AuditEntry
from iotmeter.db.models.dead_letter import DeadLetter
from iotmeter.db.models.device import Device
from iotmeter.db.models.device_config import DeviceConfig
from iotmeter.db.models.device_credential import DeviceCertificate, DeviceCredential
from iotmeter.db.models.device_series import DeviceSeries
from iotmeter.db.models.telemetry import (
    CompactChunk,
    HourRollup,
    LatestPoint,
    MinuteRollup,
    RollupDirty,
    RollupState,
    TelemetryPoint,
)

__all__ = [
    "AlertRule",
    "AlertRuleState",
    "ApiKey",
    "AuditEntry",
    "CompactChunk",
    "DeadLetter",
    "DeliveryAttempt",
    "Device",
    "DeviceAlert",
    "DeviceCertificate",
    "DeviceConfig",
    "DeviceCredential",
    "DeviceSeries",
    "HourRollup",
    "LatestPoint",
    "MinuteRollup",
    "Notification",
    "NotificationChannel",
    "RollupDirty",
    "RollupState",
    "TelemetryPoint",
]
