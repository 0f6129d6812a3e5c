"""The FastAPI application: `create_app(settings)` and the module-level `app` for uvicorn."""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from functools import partial
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from iotmeter import __version__
from iotmeter.api.errors import install_error_handlers
from iotmeter.api.routes import alerts, dead_letters, devices, health, raw, stats, telemetry
from iotmeter.config import Settings, load_settings
from iotmeter.db.engine import Database, build_engine
from iotmeter.db.migrate import upgrade_async
from iotmeter.ingest.broker import open_broker
from iotmeter.ingest.collector import Collector, build_sinks
from iotmeter.ingest.directory import DeviceDirectory
from iotmeter.logging import configure_logging
from iotmeter.runtime import TaskSupervisor
from iotmeter.simulator.publisher import run_simulator
from iotmeter.state import AppState
from iotmeter.storage.factory import open_archive, open_timeseries

logger = logging.getLogger(__name__)

BackgroundTask = Callable[[AppState], Coroutine[Any, Any, None]]
"""A long-running part of the app: gets the shared state, loops until cancelled."""


async def _database_health(database: Database) -> str:
    await database.ping()
    return database.dialect


@asynccontextmanager
async def open_state(
    settings: Settings, extra_tasks: Mapping[str, BackgroundTask] | None = None
) -> AsyncIterator[AppState]:
    """Open every shared client on one exit stack, start the tasks; undo it all in reverse."""
    async with AsyncExitStack() as stack:
        if settings.auto_migrate:
            logger.info("upgrading the database schema")
            await upgrade_async(settings.database_url)
        database = Database(
            build_engine(settings.database_url, pool_size=settings.database_pool_size)
        )
        stack.push_async_callback(database.close)
        timeseries = await stack.enter_async_context(open_timeseries(settings, database))
        archive = await stack.enter_async_context(open_archive(settings))
        broker = None
        if settings.collector_enabled or settings.simulator_enabled:
            broker = await stack.enter_async_context(open_broker(settings))

        supervisor = TaskSupervisor()
        state = AppState(
            settings=settings,
            database=database,
            timeseries=timeseries,
            archive=archive,
            supervisor=supervisor,
            broker=broker,
        )
        state.health_checks["database"] = partial(_database_health, database)
        state.health_checks["timeseries"] = timeseries.health
        state.health_checks["archive"] = archive.health
        directory = DeviceDirectory(database, settings.auto_register)
        state.device_listeners.append(directory.forget)
        if broker is not None and settings.collector_enabled:
            sinks = build_sinks(settings, database, timeseries, archive, directory, state.stats)
            collector = await Collector.open(settings, broker, database, sinks, state.stats)
            stack.callback(collector.close)
            state.collector = collector
            state.health_checks["mqtt"] = collector.health
            state.health_checks["spool"] = collector.spool_health
        # Registered after the clients, so it runs first on the way out: tasks stop first.
        stack.push_async_callback(supervisor.stop)
        if state.collector is not None:
            supervisor.start("collector", state.collector.run)
        if broker is not None and settings.simulator_enabled:
            simulator_url = settings.simulator_mqtt_url or broker.url
            supervisor.start("simulator", partial(run_simulator, settings, simulator_url))
        for name, task in (extra_tasks or {}).items():
            supervisor.start(name, partial(task, state))
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
) -> FastAPI:
    """Build the app; settings default to the environment (`IOTMETER_*`)."""
    settings = settings if settings is not None else load_settings()
    configure_logging(settings.log_level)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        async with open_state(settings, extra_tasks) as state:
            yield {"iotmeter": state}

    app = FastAPI(
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
    install_error_handlers(app)
    # Each router straight on the app: FastAPI walks nested routers on every request.
    for router in (
        devices.router,
        alerts.router,
        telemetry.router,
        raw.router,
        dead_letters.router,
        stats.router,
    ):
        app.include_router(router, prefix="/api/v1")
    app.include_router(health.router)
    return app


app = create_app()
