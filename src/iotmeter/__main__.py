"""Command line: `iotmeter serve | migrate | simulate | replay | export | archive | keys |
settings`."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import sys
from collections.abc import Sequence

from iotmeter import cli_archive, cli_export, cli_keys
from iotmeter.config import Settings, env_name, load_settings
from iotmeter.errors import SettingsInvalid
from iotmeter.logging import configure_logging, secrets_of

logger = logging.getLogger("iotmeter.cli")


class _Terminated(Exception):
    """SIGTERM after uvicorn's graceful shutdown (see `_serve`)."""


def _on_sigterm(_signum: int, _frame: object) -> None:
    raise _Terminated


def _serve(settings: Settings, args: argparse.Namespace) -> int:
    import signal

    import uvicorn

    from iotmeter.app import create_app
    from iotmeter.server import HttpProtocol

    # uvicorn shuts down gracefully on SIGTERM, then raises the signal again into the handler
    # that was there before it: Python's default would end the process with status 143 and
    # skip the interpreter's clean-up. With this handler a graceful stop exits 0.
    signal.signal(signal.SIGTERM, _on_sigterm)
    with contextlib.suppress(_Terminated):
        uvicorn.run(
            create_app(settings),
            host=args.host or settings.http_host,
            port=args.port or settings.http_port,
            # Not uvicorn's own logging configuration: its records (the access log too, at
            # INFO) go through iotmeter's handler, in iotmeter's format.
            log_config=None,
            log_level=settings.log_level.lower(),
            http=HttpProtocol,
            timeout_keep_alive=settings.http_keep_alive_s,
            ssl_certfile=settings.http_tls_cert_file,
            ssl_keyfile=settings.http_tls_key_file,
        )
    return 0


def _migrate(settings: Settings, args: argparse.Namespace) -> int:
    from iotmeter.db import migrate

    if args.revision.startswith("-") or args.downgrade:
        migrate.downgrade(settings.database_url, args.revision)
    else:
        migrate.upgrade(settings.database_url, args.revision)
    print(f"schema at {args.revision} on {settings.database_url.split('@')[-1]}")
    return 0


def _simulate(settings: Settings, args: argparse.Namespace) -> int:
    import asyncio
    import contextlib

    from iotmeter.simulator.publisher import run_simulator

    overrides = {
        name: value
        for name, value in (
            ("simulator_devices", args.devices),
            ("simulator_interval_s", args.interval),
        )
        if value is not None
    }
    if overrides:
        settings = settings.model_copy(update=overrides)
    broker = args.broker or settings.simulator_mqtt_url
    if broker is None:
        broker = (
            settings.mqtt_url
            if settings.mqtt_url not in ("auto", "embedded")
            else f"mqtt://{settings.mqtt_embedded_host}:{settings.mqtt_embedded_port}"
        )
    print(
        f"simulating {settings.simulator_devices} devices every {settings.simulator_interval_s} s "
        f"on {broker.split('@')[-1]}; Ctrl-C stops",
        file=sys.stderr,
    )

    async def simulate() -> None:
        password_for = None
        if settings.device_auth:
            # Each simulated device connects with its own credential, from the registry.
            from iotmeter.db.engine import Database, build_engine
            from iotmeter.devicelink.credentials import credential_secret
            from iotmeter.devicelink.provision import simulator_passwords

            configured = settings.device_credential_secret
            secret = credential_secret(
                configured.get_secret_value() if configured else None,
                settings.device_credential_secret_file,
            )
            database = Database(build_engine(settings.database_url))
            try:
                password_for = await simulator_passwords(settings, database, secret)
            finally:
                await database.close()
        await run_simulator(settings, broker, password_for=password_for)

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(simulate())
    return 0


def _replay(settings: Settings, args: argparse.Namespace) -> int:
    import asyncio
    import time

    from iotmeter.api.timerange import parse_instant_us
    from iotmeter.db.engine import Database, build_engine
    from iotmeter.ingest.decode import DecodeLimits
    from iotmeter.services.replay import replay_device
    from iotmeter.storage.factory import open_archive, open_timeseries

    now_us = time.time_ns() // 1000
    start_us = parse_instant_us(args.start, "--start", now_us)
    stop_us = parse_instant_us(args.stop, "--stop", now_us)

    async def run() -> None:
        database = Database(build_engine(settings.database_url))
        try:
            async with (
                open_timeseries(settings, database) as timeseries,
                open_archive(settings) as archive,
            ):
                for device_id in args.device:
                    result = await replay_device(
                        database,
                        archive,
                        timeseries,
                        device_id,
                        start_us,
                        stop_us,
                        DecodeLimits.from_settings(settings),
                    )
                    print(
                        f"{device_id}: {result.messages} archived messages, "
                        f"{result.readings} reading sets written, {result.refused} refused"
                    )
        finally:
            await database.close()

    asyncio.run(run())
    return 0


def _format_default(value: object) -> str:
    if value is None or value == []:
        return ""
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, list):
        return "`" + ",".join(str(item) for item in value) + "`"
    return f"`{value}`"


def settings_table() -> str:
    """The configuration table of the README, generated from the settings' descriptions."""
    from iotmeter.config import env_name

    lines = ["| Variable | Default | Description |", "|---|---|---|"]
    # Settings' own fields first, then each part it is made of (HTTP, simulator), in order.
    parts = [name for base in Settings.__bases__ for name in base.model_fields]  # type: ignore[attr-defined]
    own = [name for name in Settings.model_fields if name not in parts]
    for name in own + parts:
        field = Settings.model_fields[name]
        default = field.get_default(call_default_factory=True)
        lines.append(
            f"| `{env_name(name)}` | {_format_default(default)} | {field.description or ''} |"
        )
    return "\n".join(lines)


def _settings_table(_settings: Settings | None, _args: argparse.Namespace) -> int:
    print(settings_table())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="iotmeter", description=__doc__)
    commands = parser.add_subparsers(dest="command")
    serve = commands.add_parser("serve", help="run the API, collector and (if enabled) simulator")
    serve.add_argument("--host", help="bind address (default: IOTMETER_HTTP_HOST)")
    serve.add_argument("--port", type=int, help="port (default: IOTMETER_HTTP_PORT)")
    serve.set_defaults(handler=_serve)
    migrate = commands.add_parser("migrate", help="upgrade the database schema")
    migrate.add_argument("revision", nargs="?", default="head")
    migrate.add_argument("--downgrade", action="store_true", help="downgrade to the revision")
    migrate.set_defaults(handler=_migrate)
    simulate = commands.add_parser("simulate", help="publish simulated device telemetry")
    simulate.add_argument("--devices", type=int, help="devices (IOTMETER_SIMULATOR_DEVICES)")
    simulate.add_argument(
        "--interval", type=float, help="seconds between messages (IOTMETER_SIMULATOR_INTERVAL_S)"
    )
    simulate.add_argument("--broker", help="mqtt://host:port (default: the app's broker)")
    simulate.set_defaults(handler=_simulate)
    replay = commands.add_parser(
        "replay", help="re-ingest archived raw messages into the time-series store"
    )
    replay.add_argument("device", nargs="+", help="device id(s)")
    replay.add_argument("--start", required=True, help="RFC 3339 or relative like -7d")
    replay.add_argument("--stop", default="now", help="RFC 3339, relative or now (default)")
    replay.set_defaults(handler=_replay)
    cli_keys.add_parser(commands)
    cli_export.add_parser(commands)
    cli_archive.add_parser(commands)
    table = commands.add_parser("settings", help="print the settings as a Markdown table")
    table.set_defaults(handler=_settings_table, needs_settings=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        args = parser.parse_args(["serve", *(argv or [])])
    settings = None
    if getattr(args, "needs_settings", True):
        try:
            settings = load_settings()
        except SettingsInvalid as exc:
            _refuse_settings(exc.message)
            return 2
        configure_logging(
            settings.log_level,
            settings.log_format,
            settings.log_repeat_window_s,
            secrets_of(settings),
        )
    try:
        result: int = args.handler(settings, args)
    except Exception:
        # Through the log handler: one JSON object with the traceback in JSON mode.
        logger.exception("iotmeter %s failed", args.command)
        return 1
    return result


def _refuse_settings(message: str) -> None:
    """Say why the settings are refused: a JSON log line when the logs are JSON (that one
    variable read by itself, as the settings could not be), else a line for a person."""
    if os.environ.get(env_name("log_format"), "").strip().lower() != "json":
        print(f"iotmeter: {message}", file=sys.stderr)
        return
    configure_logging("INFO", "json")
    variables = sorted(set(re.findall(r"\bIOTMETER_[A-Z0-9_]+", message)))
    logger.error("%s", message, extra={"variables": variables})


if __name__ == "__main__":
    sys.exit(main())
