"""The typed state the lifespan builds and every route and task shares."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

from iotmeter.api.ratelimit import RateLimits
from iotmeter.config import Settings
from iotmeter.db.engine import Database
from iotmeter.devicelink.credentials import SERVICE_USERNAME, credential_secret
from iotmeter.ingest.broker import BrokerAddress
from iotmeter.ingest.live import LiveFeed
from iotmeter.ingest.stats import IngestStats
from iotmeter.runtime import TaskSupervisor
from iotmeter.security.key_cache import KeyCache
from iotmeter.storage.archive.base import ArchiveStore
from iotmeter.storage.timeseries.base import TimeSeriesStore

if TYPE_CHECKING:
    from iotmeter.alerting.notify import Notifier
    from iotmeter.alerting.sink import AlertSink
    from iotmeter.devicelink.certificates import DeviceCA
    from iotmeter.devicelink.channel import DeviceChannel
    from iotmeter.devicelink.dynsec import BrokerAccounts
    from iotmeter.devicelink.registry import RevocationList
    from iotmeter.ingest.collector import Collector
    from iotmeter.observability.metrics import Metrics

HealthCheck = Callable[[], Awaitable[str | None]]
"""Returns a short detail when the backend is up; raises `BackendUnavailable` when not."""


@dataclass
class AppState:
    settings: Settings
    database: Database
    timeseries: TimeSeriesStore
    archive: ArchiveStore
    supervisor: TaskSupervisor
    stats: IngestStats = field(default_factory=IngestStats)
    broker: BrokerAddress | None = None
    collector: Collector | None = None
    health_checks: dict[str, HealthCheck] = field(default_factory=dict)
    device_listeners: list[Callable[[Iterable[str]], None]] = field(default_factory=list)
    alerting_listeners: list[Callable[[], None]] = field(default_factory=list)
    """Told when alert rules or notification channels change (the alert sink's rule book)."""
    notifier: Notifier | None = None
    alert_sink: AlertSink | None = None
    device_auth: bool = False
    """Devices must use their own credentials on the broker in use (`Settings.device_auth`,
    implied by a non-loopback bind only when the embedded broker runs)."""
    credential_secret: bytes | None = None
    """What device passwords are derived from (`devicelink.credentials`); read on first use."""
    device_ca: DeviceCA | None = None
    device_channel: DeviceChannel | None = None
    broker_accounts: BrokerAccounts | None = None
    """Mosquitto's accounts, reconciled over its dynamic-security plugin (device auth on)."""
    revocations: RevocationList | None = None
    credential_listeners: list[Callable[[], None]] = field(default_factory=list)
    """Told when device credentials changed (committed)."""
    metrics: Metrics | None = None
    """Prometheus metrics (`IOTMETER_METRICS_ENABLED`)."""
    key_cache: KeyCache = field(default_factory=KeyCache)
    """Verified API keys (PostgreSQL: while listening for revocations) and their last use."""
    rate_limits: RateLimits = field(init=False)
    live: LiveFeed = field(init=False)
    """Readings of watched devices for the open event streams (`/api/v1/live`)."""
    """Told the ids of devices the API changed or deleted, once the change is committed (the
    collector's cache of device types)."""

    def __post_init__(self) -> None:
        self.live = LiveFeed(max_streams=self.settings.live_max_streams)
        self.rate_limits = RateLimits(
            self.settings.rate_limit_per_key,
            self.settings.rate_limit_per_address,
            self.settings.rate_limit_storage,
        )

    def alert_rules_changed(self) -> None:
        """Rules or channels changed (committed): the alert sink reads them again."""
        for listener in self.alerting_listeners:
            listener()

    def device_secret(self) -> bytes:
        """The credential secret: from the settings, else the data folder's (made once)."""
        if self.credential_secret is None:
            configured = self.settings.device_credential_secret
            self.credential_secret = credential_secret(
                configured.get_secret_value() if configured else None,
                self.settings.device_credential_secret_file,
            )
        return self.credential_secret

    @property
    def reserved_usernames(self) -> frozenset[str]:
        """Broker usernames no device may take: iotmeter's own account on the embedded broker
        and the account of `IOTMETER_MQTT_URL` (on Mosquitto, a certificate whose CN is such a
        name would log in as that account)."""
        names = {SERVICE_USERNAME}
        if self.broker is not None and self.broker.username:
            names.add(self.broker.username)
        url = self.settings.mqtt_url
        if url not in ("auto", "embedded"):
            username = urlsplit(url).username
            if username:
                names.add(unquote(username))
        return frozenset(names)

    def credentials_changed(self) -> None:
        for listener in self.credential_listeners:
            listener()

    def devices_changed(self, device_ids: Iterable[str]) -> None:
        ids = set(device_ids)
        for listener in self.device_listeners:
            listener(ids)
