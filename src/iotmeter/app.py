"""The FastAPI application: `create_app(settings)` and the module-level `app` for uvicorn."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import Depends, FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi_offline import FastAPIOffline
from starlette.middleware.trustedhost import TrustedHostMiddleware

from iotmeter import __version__
from iotmeter.alerting.book import RuleBook
from iotmeter.alerting.notify import MailServer, Notifier
from iotmeter.alerting.sink import AlertSink
from iotmeter.api.audit import AuditLog
from iotmeter.api.auth import authorize, warn_when_off
from iotmeter.api.errors import API_ERRORS, install_error_handlers
from iotmeter.api.guard import RequestGuard
from iotmeter.api.openapi import install_truthful_openapi
from iotmeter.api.request_id import RequestId
from iotmeter.api.routes import (
    alert_rules,
    alerts,
    audit,
    channels,
    dead_letters,
    device_access,
    devices,
    export,
    health,
    keys,
    live,
    operations,
    raw,
    stats,
    telemetry,
)
from iotmeter.config import Settings, load_settings
from iotmeter.db.engine import Database, build_engine
from iotmeter.db.migrate import upgrade_async
from iotmeter.devicelink.certificates import DeviceCA
from iotmeter.devicelink.channel import DeviceChannel
from iotmeter.devicelink.credentials import derive_password
from iotmeter.devicelink.dynsec import BrokerAccounts
from iotmeter.devicelink.provision import simulator_passwords
from iotmeter.devicelink.registry import (
    RegistryAccounts,
    RegistryCredentialCheck,
    RevocationList,
)
from iotmeter.ingest.broker import open_broker
from iotmeter.ingest.collector import Collector, build_sinks
from iotmeter.ingest.directory import DeviceDirectory
from iotmeter.ingest.series import SeriesGuard
from iotmeter.logging import configure_logging, secrets_of
from iotmeter.observability.metrics import HttpMetrics, Metrics, MetricsPort
from iotmeter.observability.tracing import TracingMiddleware, start_tracing
from iotmeter.repositories.devices import DeviceRepository
from iotmeter.runtime import TaskSupervisor
from iotmeter.server import HttpProtocol, on_shutdown
from iotmeter.services.housekeeping import run_housekeeping
from iotmeter.services.keys import bootstrap_admin_key, record_key_use
from iotmeter.services.lifecycle import prepare_lifecycle, run_lifecycle
from iotmeter.simulator.publisher import plan_devices, run_simulator
from iotmeter.state import AppState
from iotmeter.storage.factory import open_archive, open_timeseries
from iotmeter.web import install_dashboard

if TYPE_CHECKING:
    from opentelemetry.sdk.trace.export import SpanExporter

logger = logging.getLogger(__name__)

DEFAULT_CRL_FILE = Path("./data/device-ca.crl")

BackgroundTask = Callable[[AppState], Coroutine[Any, Any, None]]
"""A long-running part of the app: gets the shared state, loops until cancelled."""


async def _database_health(database: Database) -> str:
    await database.ping()
    return database.dialect


@asynccontextmanager
async def open_state(
    settings: Settings,
    extra_tasks: Mapping[str, BackgroundTask] | None = None,
    metrics: Metrics | None = None,
    span_exporter: SpanExporter | None = None,
) -> AsyncIterator[AppState]:
    """Open every shared client on one exit stack, start the tasks; undo it all in reverse."""
    async with AsyncExitStack() as stack:
        tracing = start_tracing(settings, span_exporter)
        if tracing is not None:
            # First on the stack, so last off: the tasks' last spans are exported too.
            stack.push_async_callback(asyncio.to_thread, tracing.shutdown)
        if settings.auto_migrate:
            logger.info("upgrading the database schema")
            await upgrade_async(settings.database_url)
        database = Database(
            build_engine(settings.database_url, pool_size=settings.database_pool_size)
        )
        stack.push_async_callback(database.close)
        await _prepare(settings, database)
        timeseries = await stack.enter_async_context(open_timeseries(settings, database))
        archive = await stack.enter_async_context(open_archive(settings))
        supervisor = TaskSupervisor()
        state = AppState(
            settings=settings,
            database=database,
            timeseries=timeseries,
            archive=archive,
            supervisor=supervisor,
            metrics=metrics,
        )
        check = RegistryCredentialCheck(database)
        state.credential_listeners.append(check.forget)
        broker = None
        if settings.collector_enabled or settings.simulator_enabled:
            secret = state.device_secret() if settings.device_auth else None
            broker = await stack.enter_async_context(
                open_broker(settings, check=check, service_secret=secret)
            )
            state.broker = broker
            # Implied by a non-loopback bind only for the broker iotmeter runs itself.
            state.device_auth = (
                settings.mqtt_device_auth
                if settings.mqtt_device_auth is not None
                else settings.device_auth and broker.origin == "embedded"
            )
        _open_device_channel(state)
        await prepare_lifecycle(state)
        state.health_checks.update(
            database=partial(_database_health, database),
            timeseries=timeseries.health,
            archive=archive.health,
        )
        directory = DeviceDirectory(
            database, settings.auto_register, max_devices=settings.max_devices
        )
        state.device_listeners.append(directory.forget)
        series = None
        if settings.max_new_series_per_device_hour:
            series = SeriesGuard(database, settings.max_new_series_per_device_hour)
            state.device_listeners.append(series.forget)
        book = RuleBook(database)
        state.alerting_listeners.append(book.invalidate)
        state.device_listeners.append(book.invalidate)
        mail = None
        if settings.smtp_url is not None:
            mail = MailServer.from_url(
                settings.smtp_url.get_secret_value(),
                sender=settings.smtp_from,
                ca_file=str(settings.smtp_ca_file) if settings.smtp_ca_file else None,
                public_url=settings.public_url,
            )
        state.notifier = Notifier(
            database, allow_private=settings.webhook_allow_private, broker=broker, mail=mail
        )
        if broker is not None and settings.collector_enabled:
            alerts = AlertSink(database, directory, book, wake_notifier=state.notifier.wake)
            state.alert_sink = alerts
            sinks = build_sinks(
                settings,
                database,
                timeseries,
                archive,
                directory,
                state.stats,
                series,
                alerts,
                live=state.live.publish,
            )
            collector = await Collector.open(settings, broker, database, sinks, state.stats)
            stack.callback(collector.close)
            state.collector = collector
            if metrics is not None:
                for runner in collector.runners:
                    runner.observer = metrics.sink_observer(runner.name)
            state.health_checks["mqtt"] = collector.health
            state.health_checks["spool"] = collector.spool_health
        if metrics is not None:
            metrics.attach(state)
            stack.callback(metrics.detach)
            if settings.metrics_port:
                port = MetricsPort(metrics, settings.metrics_host, settings.metrics_port)
                await port.start()
                stack.push_async_callback(port.stop)
        stack.enter_context(on_shutdown(state.live.close_all))
        # Registered after the clients, so it runs first on the way out: tasks stop first.
        stack.push_async_callback(supervisor.stop)
        _start_tasks(state, extra_tasks or {})
        logger.info(
            "iotmeter %s started: database %s, time series %s, archive %s, MQTT %s",
            __version__,
            database.dialect,
            timeseries.backend,
            archive.backend,
            broker.describe() if broker else "off",
        )
        _settle_the_heap()
        yield state
        logger.info("iotmeter stopping")


async def _prepare(settings: Settings, database: Database) -> None:
    """Warn when auth is off; on a first start, make the admin key and say where it is.
    Register the in-process simulator's devices, so they exist before their first message."""
    if settings.simulator_enabled and (settings.auto_register or settings.device_auth):
        devices: dict[str, str] = {d.device_id: d.kind for d in plan_devices(settings)}
        async with database.transaction() as session:
            await DeviceRepository(session).register_missing(devices)
    warn_when_off(settings)
    if settings.auth == "on":
        written = await bootstrap_admin_key(database, settings.auth_bootstrap_file)
        if written is not None:
            logger.warning(
                "no API key existed: created an admin key and wrote it to %s (mode 0600); "
                "create more with POST /api/v1/keys or `iotmeter keys create`",
                written.resolve(),
            )


def _open_device_channel(state: AppState) -> None:
    """The parts of the device channel these settings call for (started with the tasks)."""
    settings, broker, database = state.settings, state.broker, state.database
    if settings.device_ca_cert_file is not None and settings.device_ca_key_file is not None:
        state.device_ca = DeviceCA.load(settings.device_ca_cert_file, settings.device_ca_key_file)
        crl_file = settings.device_crl_file or DEFAULT_CRL_FILE
        state.revocations = RevocationList(database, state.device_ca, crl_file)
    if broker is None:
        return
    if state.device_auth and broker.origin != "embedded":
        # Mosquitto: iotmeter keeps the broker's accounts equal to the registry's credentials.
        accounts = BrokerAccounts(
            broker,
            RegistryAccounts(database),
            partial(derive_password, state.device_secret()),
            tls_context=broker.tls_context(),
        )
        state.broker_accounts = accounts
        state.credential_listeners.append(accounts.wake)
    if settings.config_push_enabled and settings.collector_enabled:
        state.device_channel = DeviceChannel(
            database,
            broker,
            tls_context=broker.tls_context(),
        )


def _start_tasks(state: AppState, extra_tasks: Mapping[str, BackgroundTask]) -> None:
    supervisor, settings, broker = state.supervisor, state.settings, state.broker
    if state.collector is not None:
        supervisor.start("collector", state.collector.run)
    if state.broker_accounts is not None:
        supervisor.start("broker-accounts", state.broker_accounts.run)
    if state.device_channel is not None:
        supervisor.start("device-channel", state.device_channel.run)
    if state.revocations is not None:
        supervisor.start("revocation-list", state.revocations.run)
    if broker is not None and settings.simulator_enabled:
        simulator_url = settings.simulator_mqtt_url or broker.url
        supervisor.start("simulator", partial(_simulate, state, simulator_url))
    supervisor.start("housekeeping", partial(run_housekeeping, state))
    supervisor.start("lifecycle", partial(run_lifecycle, state))
    if state.metrics is not None:
        supervisor.start("metrics-registry", state.metrics.run)
    if state.notifier is not None:
        supervisor.start("notifier", state.notifier.run)
    if settings.auth == "on":
        supervisor.start("key-use", partial(record_key_use, state))
        if state.database.dialect == "postgresql":
            supervisor.start("key-cache", partial(state.key_cache.listen, settings.database_url))
    for name, task in extra_tasks.items():
        supervisor.start(name, partial(task, state))


async def _simulate(state: AppState, broker_url: str) -> None:
    """Run the in-process simulator; with device auth on, its devices get credentials (made
    once, kept in the registry; their passwords are derived, never stored)."""
    settings = state.settings
    password_for = None
    if state.device_auth:
        password_for = await simulator_passwords(settings, state.database, state.device_secret())
        state.credentials_changed()
    await run_simulator(settings, broker_url, password_for=password_for)


def _settle_the_heap() -> None:
    """Move what start-up made (the libraries' modules, tables and clients: most of the heap)
    out of the garbage collector's sight. Every full collection walks every tracked object;
    with them frozen it walks only what ingestion keeps alive."""
    gc.collect()
    gc.freeze()


def create_app(
    settings: Settings | None = None,
    *,
    extra_tasks: Mapping[str, BackgroundTask] | None = None,
    span_exporter: SpanExporter | None = None,
) -> FastAPI:
    """Build the app; settings default to the environment (`IOTMETER_*`)."""
    settings = settings if settings is not None else load_settings()
    configure_logging(
        settings.log_level,
        settings.log_format,
        settings.log_repeat_window_s,
        secrets_of(settings),
    )
    metrics = Metrics() if settings.metrics_enabled else None

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        async with open_state(settings, extra_tasks, metrics, span_exporter) as state:
            yield {"iotmeter": state}

    # The documentation pages with Swagger UI and ReDoc served by the app (no CDN: /docs works
    # offline, and its Content-Security-Policy can stay on 'self').
    app = FastAPIOffline(
        title="iotmeter",
        version=__version__,
        description="IoT telemetry backend: device registry, telemetry, raw archive, alerts.",
        lifespan=lifespan,
    )
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["*"],
            allow_headers=["*"],
        )
    if settings.http_allowed_hosts:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=settings.http_allowed_hosts)
    app.add_middleware(RequestGuard, max_body_bytes=settings.http_max_body_bytes)
    app.add_middleware(AuditLog)  # outside the guard: it also sees what the guard refuses
    if metrics is not None:
        app.add_middleware(HttpMetrics, metrics=metrics)
    if settings.otlp_endpoint:
        app.add_middleware(TracingMiddleware)  # outside audit and metrics: spans cover them
    # Added last, so outermost: every answer gets the id, also what inner middleware refuses.
    app.add_middleware(RequestId)
    HttpProtocol.header_timeout_s = settings.http_header_timeout_s
    install_error_handlers(app)
    # Each router straight on the app: FastAPI walks nested routers on every request.
    for router in (
        devices.router,
        device_access.router,
        alerts.router,
        alert_rules.router,
        channels.router,
        telemetry.router,
        export.router,
        raw.router,
        dead_letters.router,
        stats.router,
        keys.router,
        audit.router,
        live.router,
    ):
        app.include_router(
            router,
            prefix="/api/v1",
            dependencies=[Depends(authorize)],
            responses=API_ERRORS,
        )
    app.include_router(health.router)
    if metrics is not None:
        app.include_router(
            operations.router, dependencies=[Depends(authorize)], responses=API_ERRORS
        )
    if settings.ui_enabled:
        install_dashboard(app)
    install_truthful_openapi(app)
    return app


app = create_app()
