"""Settings, read from `IOTMETER_*` environment variables.

Every field's description feeds the README's configuration table (`iotmeter settings --markdown`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from iotmeter.errors import SettingsInvalid


def normalize_database_url(url: str) -> str:
    """Pick the async driver for a PostgreSQL or SQLite URL; ValueError for anything else."""
    scheme = urlsplit(url).scheme
    if scheme in ("postgres", "postgresql", "postgresql+asyncpg"):
        return "postgresql+asyncpg" + url[len(scheme) :]
    if scheme in ("sqlite", "sqlite+aiosqlite"):
        return "sqlite+aiosqlite" + url[len(scheme) :]
    raise ValueError(
        f"must start with postgresql:// or sqlite+aiosqlite:/// (got scheme {scheme or 'none'!r})"
    )


ENV_PREFIX = "IOTMETER_"

LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]
ArchiveLayout = Literal["per-message", "segment"]
SimulatorKind = Literal["temperature", "humidity", "power_meter"]
SIMULATOR_KINDS: tuple[SimulatorKind, ...] = ("temperature", "humidity", "power_meter")


def env_name(field: str) -> str:
    """The environment variable that sets a settings field."""
    return ENV_PREFIX + field.upper()


class _SimulatorSettings(BaseSettings):
    """The in-process device simulator (part of `Settings`)."""

    simulator_devices: int = Field(
        3, ge=0, le=100_000, description="Simulated devices in total, spread over the kinds."
    )
    simulator_kinds: Annotated[list[SimulatorKind], NoDecode] = Field(
        default_factory=lambda: list(SIMULATOR_KINDS),
        description="Comma-separated kinds to simulate: temperature, humidity, power_meter.",
    )
    simulator_interval_s: float = Field(
        5.0, gt=0, description="Seconds between two messages of one simulated device."
    )
    simulator_jitter: float = Field(
        0.1, ge=0, le=1, description="Random spread of the interval, as a fraction of it."
    )
    simulator_qos: Literal[0, 1] = Field(1, description="MQTT QoS of simulated messages.")
    simulator_id_prefix: str = Field(
        "sim", pattern=r"^[A-Za-z0-9_.\-]{1,32}$", description="Prefix of simulated device ids."
    )
    simulator_mqtt_url: str | None = Field(
        None, description="Broker of the simulator; unset: the broker the collector uses."
    )
    simulator_devices_per_connection: int = Field(
        500,
        ge=1,
        description="Simulated devices that share one MQTT connection (when "
        "`IOTMETER_SIMULATOR_DEVICE_CHANNEL` is off).",
    )
    simulator_device_channel: bool = Field(
        True,
        description="Each simulated device has its own connection (client id and username = "
        "its id, a last will on `iot/{id}/status`), applies the configuration pushed to it "
        "(`interval_s`, `enabled`) and reports it. Off: devices share connections and only "
        "publish telemetry. Always on when device authentication is on.",
    )
    simulator_spike_rate: float = Field(
        0.0, ge=0, le=1, description="Share of messages with an injected spike (for alerting)."
    )
    simulator_dropout_rate: float = Field(
        0.0, ge=0, le=1, description="Share of messages a simulated device skips (dropouts)."
    )


class _HttpSettings(BaseSettings):
    """The HTTP server and the API's limits (part of `Settings`)."""

    http_host: str = Field("127.0.0.1", description="Address `iotmeter serve` binds.")
    http_port: int = Field(8080, ge=1, le=65535, description="Port `iotmeter serve` binds.")
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated origins allowed by CORS (`*` for any). Empty: CORS off.",
    )
    http_max_body_bytes: int = Field(
        1024 * 1024,
        ge=1024,
        le=256 * 1024 * 1024,
        description="Largest request body the API reads; a larger one is refused with 413.",
    )
    http_header_timeout_s: float = Field(
        10.0,
        gt=0,
        description="Seconds a client has to send a request's head (a slowloris defence).",
    )
    http_tls_cert_file: Path | None = Field(
        None, description="`iotmeter serve` speaks HTTPS with this certificate (PEM)..."
    )
    http_tls_key_file: Path | None = Field(None, description="...and this private key (PEM).")
    http_allowed_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated `Host` values the API answers (e.g. `iot.example.com`, "
        "`*.example.com`); others get 400. Empty: any.",
    )
    http_keep_alive_s: int = Field(
        5, ge=1, description="Seconds an idle keep-alive connection stays open."
    )
    ui_enabled: bool = Field(
        True, description="Serve the web dashboard at `/` (its data comes from the API)."
    )
    live_max_streams: int = Field(
        100,
        ge=0,
        description="Most live event streams (`/api/v1/live`, the dashboard's charts) open at "
        "once; more are refused with 503.",
    )

    dead_letter_retention_days: float = Field(
        30.0, gt=0, description="Dead letters older than this many days are deleted."
    )
    dead_letter_max_rows: int = Field(
        100_000, ge=100, description="Most dead letters kept; the oldest beyond it are deleted."
    )


class _AuthSettings(BaseSettings):
    """Who may use the API, and the audit log (part of `Settings`)."""

    auth: Literal["on", "off"] = Field(
        "on",
        description="`off` serves the API to anyone who reaches it: only for a trusted "
        "loopback-only setup (a warning is logged at every start).",
    )
    auth_bootstrap_file: Path = Field(
        Path("./data/admin.key"),
        description="Where the first start writes the admin key it creates (mode 0600) when "
        "no key exists.",
    )
    auth_jwt_secret: SecretStr | None = Field(
        None, description="Accept JWT bearer tokens signed with this HMAC secret (HS256)."
    )
    auth_jwt_public_key: str | None = Field(
        None,
        description="Accept JWT bearer tokens signed with this key (PEM, or a path to a PEM "
        "file; RS256/ES256).",
    )
    auth_jwt_audience: str | None = Field(
        None, description="The `aud` a JWT must carry (unset: not checked)."
    )
    auth_jwt_issuer: str | None = Field(
        None, description="The `iss` a JWT must carry (unset: not checked)."
    )
    auth_jwt_role_claim: str = Field(
        "role", min_length=1, description="The JWT claim (a string or a list) naming the role."
    )
    auth_jwt_roles: Annotated[dict[str, str], NoDecode] = Field(
        default_factory=dict,
        description="Claim values to roles, e.g. `iot-admins=admin,iot-ops=operator`; a "
        "claim value that is a role's name is that role.",
    )
    rate_limit_per_key: str = Field(
        "2000/second",
        description="Requests one API key (or token subject) may make, e.g. `100/second;"
        "10000/hour`; over it: 429 with Retry-After. Empty: no limit.",
    )
    rate_limit_per_address: str = Field(
        "2000/second",
        description="Requests one client address may make (counted before authentication, "
        "so failed attempts count). Empty: no limit.",
    )
    rate_limit_storage: str = Field(
        "memory://",
        description="Where the rate limits are counted: `memory://` (each process on its own) "
        "or `redis://host:6379` (shared by every iotmeter process; needs `iotmeter[redis]`).",
    )
    audit_retention_days: float = Field(
        90.0, gt=0, description="Audit log entries older than this many days are deleted."
    )

    @field_validator("rate_limit_storage")
    @classmethod
    def _rate_limit_storage(cls, value: str) -> str:
        from iotmeter.api.ratelimit import open_storage

        try:
            open_storage(value)
        except Exception as exc:
            raise ValueError(
                f"not a rate-limit storage this install can use ({exc}); use memory:// or "
                "redis://host:port with iotmeter[redis] installed"
            ) from exc
        return value

    @field_validator("rate_limit_per_key", "rate_limit_per_address")
    @classmethod
    def _rate_limit(cls, value: str) -> str:
        from limits import parse_many

        try:
            if value.strip():
                parse_many(value)
        except ValueError:
            raise ValueError(
                f"{value!r} is not a rate limit; write e.g. 100/second or 100/second;5000/hour"
            ) from None
        return value

    @field_validator("auth_jwt_roles", mode="before")
    @classmethod
    def _role_map(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        mapping = {}
        for item in filter(None, (part.strip() for part in value.split(","))):
            claim, separator, role = item.partition("=")
            if not separator or role.strip() not in ("admin", "operator", "viewer"):
                raise ValueError(
                    f"{item!r}: write claim=role with a role of admin, operator or viewer"
                )
            mapping[claim.strip()] = role.strip()
        return mapping


class _LifecycleSettings(BaseSettings):
    """How long stored data lives, and its summaries (part of `Settings`)."""

    telemetry_retention_days: float = Field(
        0,
        ge=0,
        description="Readings older than this many days are deleted (0: kept forever). "
        "PostgreSQL drops whole partitions (hours of readings, days of compacted hours); "
        "SQLite deletes in bounded chunks; InfluxDB: the bucket's retention when iotmeter "
        "creates it.",
    )
    telemetry_partitions_ahead: int = Field(
        3,
        ge=1,
        le=60,
        description="PostgreSQL: days of partitions of the time series (hourly for the "
        "readings, daily for the rest) created ahead.",
    )
    rollups_enabled: bool = Field(
        True,
        description="Keep 1-minute and 1-hour aggregates (min, max, sum, count, first, last) "
        "per device and field; queries with `every` of a whole number of minutes read them.",
    )
    compaction_enabled: bool = Field(
        True,
        description="PostgreSQL: store each closed hour of a series as one row of arrays "
        "(about 10x smaller than a row per reading), in the background; queries unchanged.",
    )
    rollup_retention_days: float = Field(
        0,
        ge=0,
        description="Rollups older than this many days are deleted (0: as long as the readings).",
    )
    archive_retention_days: float = Field(
        0,
        ge=0,
        description="Archived raw messages older than this many days are deleted (0: kept "
        "forever): an S3 lifecycle rule on the bucket (set at start-up when allowed), the "
        "local folder deletes them itself.",
    )
    archive_object_lock_days: int = Field(
        0,
        ge=0,
        description="S3: create the bucket with Object Lock, each object kept unchangeable for "
        "this many days in governance mode (0: off; the store must support it).",
    )
    resolved_alert_retention_days: float = Field(
        90,
        ge=0,
        description="Resolved alerts older than this many days are deleted (0: kept forever).",
    )
    lifecycle_interval_s: float = Field(
        10.0,
        gt=0,
        le=3600,
        description="How often the lifecycle task runs: rollups, partitions, retention.",
    )


class Settings(_LifecycleSettings, _AuthSettings, _HttpSettings, _SimulatorSettings):
    """All of iotmeter's configuration; defaults give the zero-config embedded setup."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="ignore", validate_default=True, frozen=True
    )

    # Database (device registry; also the time-series store when no InfluxDB is configured).
    database_url: str = Field(
        "sqlite+aiosqlite:///./data/iotmeter.db",
        description="SQLAlchemy URL of the registry database: `postgresql://user:pass@host/db` "
        "or `sqlite+aiosqlite:///path`.",
    )
    database_auto_migrate: bool | None = Field(
        None,
        description="Upgrade the schema at start-up. Default: on for SQLite, off otherwise "
        "(run `iotmeter migrate`).",
    )
    database_pool_size: int = Field(
        30,
        ge=1,
        le=200,
        description="PostgreSQL connections per process, kept open; a request finding all "
        "in use waits for one (10 s at most, then 503). Keep the sum over processes under the "
        "server's `max_connections` (default 100).",
    )

    # MQTT.
    mqtt_url: str = Field(
        "auto",
        description="`auto`: use the broker on 127.0.0.1:1883, or start the embedded one there; "
        "`embedded`: always run the in-process broker; or `mqtt://user:pass@host:port`.",
    )
    mqtt_embedded_host: str = Field(
        "127.0.0.1", description="Address the embedded broker listens on."
    )
    mqtt_embedded_port: int = Field(
        1883, ge=1, le=65535, description="Port the embedded broker listens on."
    )
    mqtt_client_id: str | None = Field(
        None,
        min_length=1,
        max_length=64,
        description="Client id of the collector's persistent MQTT session. Unset: one made "
        "for the spool folder and kept in it (`mqtt-client-id`).",
    )

    mqtt_ca_file: Path | None = Field(
        None,
        description="CA certificate (PEM) that `mqtts://` broker URLs are verified against. "
        "Unset: the system's trusted CAs.",
    )
    mqtt_embedded_ws_port: int = Field(
        9001,
        ge=0,
        le=65535,
        description="Port of the embedded broker's MQTT-over-WebSocket listener (on "
        "`IOTMETER_MQTT_EMBEDDED_HOST`); 0: none.",
    )
    mqtt_embedded_tls_port: int = Field(
        8883,
        ge=0,
        le=65535,
        description="Port of the embedded broker's MQTT-over-TLS listener, opened when "
        "`IOTMETER_MQTT_EMBEDDED_TLS_CERT_FILE` is set; 0: none.",
    )
    mqtt_embedded_tls_cert_file: Path | None = Field(
        None, description="Certificate chain (PEM) of the embedded broker's TLS listener."
    )
    mqtt_embedded_tls_key_file: Path | None = Field(
        None, description="Private key (PEM) of the embedded broker's TLS listener."
    )
    mqtt_device_auth: bool | None = Field(
        None,
        description="Devices connect only with their own credentials (username and client id "
        "= device id) and reach only their own topics. Unset: on when the embedded broker "
        "listens on an address other than loopback, else off (Mosquitto 2.0's default).",
    )
    device_credential_secret: SecretStr | None = Field(
        None,
        description="Secret that device MQTT passwords are derived from (with a nonce kept in "
        "the registry), so iotmeter can rebuild a broker's accounts. Unset: made once and kept "
        "in `data/device-credential.secret`. Every iotmeter process of one registry needs the "
        "same secret.",
    )
    device_credential_secret_file: Path = Field(
        Path("./data/device-credential.secret"),
        description="Where the generated credential secret is kept when none is set.",
    )
    device_ca_cert_file: Path | None = Field(
        None,
        description="CA certificate (PEM) that signs device certificates "
        "(`POST /api/v1/devices/{id}/certificate`) and that the embedded broker's TLS "
        "listener accepts device certificates from.",
    )
    device_ca_key_file: Path | None = Field(
        None, description="Private key (PEM) of `IOTMETER_DEVICE_CA_CERT_FILE`."
    )
    device_certificate_days: int = Field(
        365, ge=1, le=3650, description="Validity of the device certificates iotmeter signs."
    )
    device_crl_file: Path | None = Field(
        None,
        description="Where iotmeter writes the certificate revocation list (PEM) of the "
        "device CA, for Mosquitto's `crlfile`. Unset: `data/device-ca.crl` when a CA is set.",
    )
    config_push_enabled: bool = Field(
        True,
        description="Publish each device's desired configuration, retained, to "
        "`iot/{id}/config`, and record what devices report and their connection status.",
    )

    # InfluxDB 2.x (optional; without it the SQL time-series store is used).
    influx_url: str | None = Field(
        None, description="InfluxDB 2.x URL, e.g. `http://localhost:8086`. Unset: SQL store."
    )
    influx_token: SecretStr | None = Field(None, description="InfluxDB API token.")
    influx_org: str = Field("iot-org", min_length=1, description="InfluxDB organisation.")
    influx_bucket: str = Field("iot-metrics", min_length=1, description="InfluxDB bucket.")

    # S3-compatible archive (optional; without it the local folder archive is used).
    s3_endpoint_url: str | None = Field(
        None, description="S3 endpoint, e.g. `http://localhost:9000`. Unset: local archive."
    )
    s3_access_key: SecretStr | None = Field(None, description="S3 access key id.")
    s3_secret_key: SecretStr | None = Field(None, description="S3 secret access key.")
    s3_region: str = Field("us-east-1", min_length=1, description="S3 region.")
    s3_bucket: str = Field("iot-data", description="S3 bucket of the raw archive.")
    archive_layout: ArchiveLayout = Field(
        "per-message",
        description="`per-message`: one object per reading set, `{device}/{time}_{id}.json`; "
        "`segment`: newline-delimited JSON per device, `{device}/{first}_{last}_{hash}.ndjson`.",
    )
    archive_segment_max_age_s: float = Field(
        10.0, gt=0, le=3600, description="Segment layout: write segments at least this often."
    )
    archive_segment_max_bytes: int = Field(
        8 << 20, ge=1 << 12, description="Segment layout: largest segment of one device."
    )
    archive_segment_buffer_bytes: int = Field(
        16 << 20,
        ge=1 << 20,
        description="Segment layout: write every open segment once they hold this much.",
    )
    archive_segment_quiet_s: float = Field(
        0.5, ge=0, description="Segment layout: also write once no message came for this long."
    )
    archive_segment_gzip: bool = Field(
        False, description="Segment layout: gzip segments (`.ndjson.gz`)."
    )
    archive_segment_lookback_s: float = Field(
        86400.0,
        gt=0,
        description="Segment layout: how far before a queried range a segment may start.",
    )
    archive_dir: Path = Field(
        Path("./data/archive"), description="Folder of the local archive (embedded default)."
    )

    # Background tasks.
    collector_enabled: bool = Field(True, description="Run the MQTT collector.")
    simulator_enabled: bool = Field(False, description="Run the device simulator in-process.")

    # Ingestion.
    auto_register: bool = Field(
        True, description="Register unknown devices on their first message (else reject them)."
    )
    max_payload_bytes: int = Field(
        256 * 1024,
        ge=64,
        le=256 << 20,
        description="Largest accepted MQTT payload, in bytes; a larger one is refused "
        "(`too_large`) and its first 64 KiB, size and hash kept in the dead letters.",
    )
    max_json_depth: int = Field(8, ge=2, le=64, description="Deepest accepted JSON nesting.")
    max_fields_per_message: int = Field(
        500,
        ge=1,
        le=100_000,
        description="Most readings in one reading set (one message, or one element of a batch); "
        "more is refused (`too_many_fields`).",
    )
    max_devices: int = Field(
        100_000,
        ge=0,
        description="Most devices the registry holds (0: no limit). A new device over it is "
        "refused: by the API with 409, on MQTT with the dead-letter reason `device_limit`.",
    )
    smtp_url: SecretStr | None = Field(
        None,
        description="Mail server for email channels: `smtp://user:password@host:587` "
        "(STARTTLS when the server offers it, required with `?starttls=required`) or "
        "`smtps://...:465` (TLS from the start).",
    )
    smtp_from: str = Field("iotmeter@localhost", description="The sender address of alert emails.")
    smtp_ca_file: Path | None = Field(
        None, description="CA certificates to verify the mail server with (default: the system's)."
    )
    public_url: str = Field(
        "http://127.0.0.1:8080",
        description="Where people reach this iotmeter: the links in alert emails.",
    )
    webhook_allow_private: bool = Field(
        False,
        description="Let webhooks reach private, loopback and link-local addresses (off: a "
        "defence against server-side request forgery).",
    )
    max_new_series_per_device_hour: int = Field(
        1000,
        ge=0,
        description="Most new fields (series) one device may start in an hour (0: no limit); "
        "a reading set over it is not written to the time series (`series_limit`).",
    )
    max_future_skew_s: float = Field(
        300.0, ge=0, description="How far in the future a reading's timestamp may be, in seconds."
    )
    batch_max_messages: int = Field(
        5000, ge=1, description="Collector flushes to the stores after this many messages..."
    )
    batch_max_delay_s: float = Field(
        0.2, gt=0, le=60, description="...or this many seconds after the first one, if sooner."
    )
    spool_dir: Path = Field(
        Path("./data/spool"),
        description="Folder of the write-ahead spool: messages are acked to the broker only "
        "once they are fsync'd here.",
    )
    spool_max_bytes: int = Field(
        1 << 30,
        ge=1 << 20,
        description="Disk the spool may use; when full, iotmeter stops acking (the broker "
        "holds the backlog) and says so in /ready.",
    )
    spool_segment_bytes: int = Field(
        32 << 20, ge=1 << 16, description="Size at which a spool segment file is rolled."
    )
    spool_memory_bytes: int = Field(
        8 << 20,
        ge=1 << 20,
        description="Recent spool records kept in memory, so sinks near the head never read disk.",
    )
    spool_commit_interval_s: float = Field(
        0.01,
        gt=0,
        le=1,
        description="Group commit: the spool fsyncs (and acks) what arrived in this interval.",
    )
    mqtt_max_inflight: int = Field(
        1000,
        ge=1,
        le=65535,
        description="Messages received but not yet acked; with Mosquitto, match its "
        "`max_inflight_messages`.",
    )
    sink_stall_s: float = Field(
        60.0, gt=0, description="`/ready` is 503 when a sink with work stored none for this long."
    )
    online_window_s: float = Field(
        300.0, gt=0, description="A device seen within this many seconds counts as online."
    )

    # Telemetry queries.
    query_max_range_s: float = Field(
        31 * 86400.0, gt=0, description="Longest time range one telemetry query may span."
    )
    query_max_points: int = Field(
        100_000, ge=10, description="Most points one telemetry query may return."
    )
    export_chunk_points: int = Field(
        10_000,
        ge=100,
        le=1_000_000,
        description=(
            "Points a streaming export (`.../telemetry/export`) reads from the time-series store "
            "at a time, and the most rows between two of its cursors; the server holds about "
            "two chunks per running export. Exports are bounded by this, not by "
            "`IOTMETER_QUERY_MAX_RANGE_S` or `IOTMETER_QUERY_MAX_POINTS`."
        ),
    )

    log_level: LogLevel = Field("INFO", description="Log level.")
    log_format: Literal["console", "json"] = Field(
        "console",
        description="`console`: one readable line per record; `json`: one JSON object per line "
        "(time, level, logger, message and context fields such as sink, device_id, request_id).",
    )
    log_repeat_window_s: float = Field(
        60.0,
        ge=0,
        description="Identical warnings within this many seconds are logged once, then counted "
        "(0: log every one).",
    )
    metrics_enabled: bool = Field(
        True, description="Export Prometheus metrics at `/metrics` (and on the metrics port)."
    )
    metrics_port: int = Field(
        0,
        ge=0,
        le=65535,
        description="Serve `/metrics` on this port too, without authentication, so the API need "
        "not be exposed to the scraper (0: only on the API port, behind the API's keys).",
    )
    metrics_host: str = Field("127.0.0.1", description="Address the metrics port binds.")
    otlp_endpoint: str | None = Field(
        None,
        description="Send OpenTelemetry traces over OTLP/HTTP to this URL "
        "(e.g. `http://127.0.0.1:4318`; unset: tracing off). Needs the `tracing` extra: "
        "`pip install 'iotmeter[tracing]'`.",
    )

    @field_validator("cors_origins", "simulator_kinds", "http_allowed_hosts", mode="before")
    @classmethod
    def _split_origins(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @field_validator("database_url")
    @classmethod
    def _database_scheme(cls, value: str) -> str:
        return normalize_database_url(value)

    @field_validator("mqtt_url", "simulator_mqtt_url")
    @classmethod
    def _mqtt_url(cls, value: str | None) -> str | None:
        if value is None or value in ("auto", "embedded"):
            return value
        parts = urlsplit(value)
        if parts.scheme not in ("mqtt", "mqtts", "tcp") or not parts.hostname:
            raise ValueError(
                "must be 'auto', 'embedded' or a URL like mqtt://user:password@host:1883"
            )
        return value

    @field_validator("influx_url", "s3_endpoint_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL with a host")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        problems: list[str] = []
        if self.influx_url and not self.influx_token:
            problems.append(
                f"{env_name('influx_token')} is required when {env_name('influx_url')} is set"
            )
        if self.influx_token and not self.influx_url:
            problems.append(
                f"{env_name('influx_url')} is required when {env_name('influx_token')} is set"
            )
        s3_keys = {"s3_access_key": self.s3_access_key, "s3_secret_key": self.s3_secret_key}
        if self.s3_endpoint_url:
            problems.extend(
                f"{env_name(name)} is required when {env_name('s3_endpoint_url')} is set"
                for name, value in s3_keys.items()
                if not value
            )
            if not self.s3_bucket:
                problems.append(
                    f"{env_name('s3_bucket')} must not be empty when "
                    f"{env_name('s3_endpoint_url')} is set"
                )
        else:
            problems.extend(
                f"{env_name('s3_endpoint_url')} is required when {env_name(name)} is set"
                for name, value in s3_keys.items()
                if value
            )
        if (
            self.mqtt_url == "embedded"
            and not self.collector_enabled
            and not self.simulator_enabled
        ):
            problems.append(
                f"{env_name('mqtt_url')}=embedded needs {env_name('collector_enabled')} or "
                f"{env_name('simulator_enabled')}: nothing would use the embedded broker"
            )
        if (self.http_tls_cert_file is None) != (self.http_tls_key_file is None):
            problems.append(
                f"{env_name('http_tls_cert_file')} and {env_name('http_tls_key_file')} go "
                "together: set both for HTTPS, or neither"
            )
        secret = self.device_credential_secret
        if secret is not None and len(secret.get_secret_value().encode()) < 32:
            problems.append(
                f"{env_name('device_credential_secret')} must be at least 32 bytes (e.g. "
                "`python3 -c 'import secrets; print(secrets.token_urlsafe(32))'`)"
            )
        if (self.device_ca_cert_file is None) != (self.device_ca_key_file is None):
            problems.append(
                f"{env_name('device_ca_cert_file')} and {env_name('device_ca_key_file')} go "
                "together: set both to sign device certificates, or neither"
            )
        if (self.mqtt_embedded_tls_cert_file is None) != (self.mqtt_embedded_tls_key_file is None):
            problems.append(
                f"{env_name('mqtt_embedded_tls_cert_file')} and "
                f"{env_name('mqtt_embedded_tls_key_file')} go together: set both for the "
                "embedded broker's TLS listener, or neither"
            )
        rollup_days, reading_days = self.rollup_retention_days, self.telemetry_retention_days
        if rollup_days and (not reading_days or rollup_days < reading_days):
            problems.append(
                f"{env_name('rollup_retention_days')} must not be shorter than "
                f"{env_name('telemetry_retention_days')} (0: forever): a query over older "
                "readings would find their rollups gone"
            )
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    @property
    def embedded_broker_is_local(self) -> bool:
        """The embedded broker listens on loopback only."""
        return self.mqtt_embedded_host in ("127.0.0.1", "::1", "localhost")

    @property
    def device_auth(self) -> bool:
        """Whether devices must authenticate (explicit, or implied by a non-loopback bind)."""
        if self.mqtt_device_auth is not None:
            return self.mqtt_device_auth
        return self.mqtt_url in ("auto", "embedded") and not self.embedded_broker_is_local

    @property
    def auto_migrate(self) -> bool:
        if self.database_auto_migrate is None:
            return self.is_sqlite
        return self.database_auto_migrate


SECRETS_DIR_VARIABLE = ENV_PREFIX + "SECRETS_DIR"


def _values_from_files() -> dict[str, str]:
    """`IOTMETER_<NAME>_FILE=/run/secrets/x`: the setting's value is the file's content (Docker
    and Kubernetes secrets), so no environment variable holds a password or a token."""
    values = {}
    for name in Settings.model_fields:
        variable = env_name(name) + "_FILE"
        path = os.environ.get(variable)
        if not path:
            continue
        try:
            values[name] = Path(path).read_text().rstrip("\r\n")
        except OSError as exc:
            raise SettingsInvalid(
                f"invalid settings: {variable}: cannot read {path}: {exc}"
            ) from None
    return values


def load_settings(**overrides: Any) -> Settings:
    """Read the environment (plus overrides); raise `SettingsInvalid` naming each variable.

    Secrets can come from files: `IOTMETER_<NAME>_FILE`, or a folder of files named like the
    variables in lower case (`IOTMETER_SECRETS_DIR`, pydantic-settings' secrets directory)."""
    overrides = {**_values_from_files(), **overrides}
    secrets_dir = os.environ.get(SECRETS_DIR_VARIABLE) or None
    try:
        return Settings(_secrets_dir=secrets_dir, **overrides)
    except ValidationError as exc:
        lines = []
        for error in exc.errors():
            location = [str(part) for part in error["loc"]]
            message = error["msg"].removeprefix("Value error, ")
            if location:
                lines.append(f"{env_name(location[0])}: {message}")
            else:
                lines.append(message)
        raise SettingsInvalid("invalid settings: " + "; ".join(lines)) from None
