"""Command line: `iotmeter serve | migrate | settings`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from iotmeter.config import Settings, load_settings
from iotmeter.errors import SettingsInvalid


def _serve(settings: Settings, args: argparse.Namespace) -> int:
    import uvicorn

    from iotmeter.app import create_app

    uvicorn.run(
        create_app(settings),
        host=args.host or settings.http_host,
        port=args.port or settings.http_port,
        log_level=settings.log_level.lower(),
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


def _settings_table(_settings: Settings | None, _args: argparse.Namespace) -> int:
    from iotmeter.config import env_name

    print("| Variable | Default | Description |")
    print("|---|---|---|")
    for name, field in Settings.model_fields.items():
        default = field.default if field.default_factory is None else field.default_factory()  # type: ignore[call-arg]
        shown = "" if default is None or default == [] else f"`{default}`"
        print(f"| `{env_name(name)}` | {shown} | {field.description or ''} |")
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
            print(f"iotmeter: {exc.message}", file=sys.stderr)
            return 2
    result: int = args.handler(settings, args)
    return result


if __name__ == "__main__":
    sys.exit(main())
