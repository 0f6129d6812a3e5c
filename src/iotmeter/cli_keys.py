"""`iotmeter keys create|list|revoke`: API keys from the command line (straight to the
database in IOTMETER_DATABASE_URL, so it works while the app is down or locked out)."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

from iotmeter.api.timerange import from_epoch_us, parse_instant_us
from iotmeter.config import Settings
from iotmeter.db.base import utcnow
from iotmeter.db.engine import Database, build_engine
from iotmeter.db.migrate import upgrade_async
from iotmeter.errors import IotmeterError
from iotmeter.repositories.api_keys import ApiKeyRepository
from iotmeter.security.keys import ROLE_NAMES, key_status
from iotmeter.services import keys as service


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    keys = commands.add_parser("keys", help="create, list or revoke API keys")
    actions = keys.add_subparsers(dest="action", required=True)
    create = actions.add_parser("create", help="create a key and print it (shown only now)")
    create.add_argument("--name", required=True, help="what the key is for, e.g. grafana")
    create.add_argument("--role", required=True, choices=ROLE_NAMES)
    create.add_argument("--expires", help="RFC 3339 time or relative like +30d (default never)")
    actions.add_parser("list", help="list keys (never the keys themselves)")
    revoke = actions.add_parser("revoke", help="revoke a key by its id")
    revoke.add_argument("key_id", help="the key id (the 12 hex characters after iotm_)")
    keys.set_defaults(handler=run)


def run(settings: Settings, args: argparse.Namespace) -> int:
    try:
        return asyncio.run(_run(settings, args))
    except IotmeterError as exc:
        print(f"iotmeter: {exc.message}", file=sys.stderr)
        return 1


async def _run(settings: Settings, args: argparse.Namespace) -> int:
    if settings.auto_migrate:
        await upgrade_async(settings.database_url)
    database = Database(build_engine(settings.database_url, pool_size=1))
    try:
        async with database.transaction() as session:
            if args.action == "create":
                expires_at = None
                if args.expires:
                    now_us = time.time_ns() // 1000
                    expires_at = from_epoch_us(parse_instant_us(args.expires, "--expires", now_us))
                row, key = await service.create_key(
                    session, name=args.name, role=args.role, expires_at=expires_at
                )
                print(key)
                print(
                    f"key id {row.key_id}, role {row.role}: store the key now, it is not "
                    "shown again",
                    file=sys.stderr,
                )
            elif args.action == "list":
                for row in await ApiKeyRepository(session).list():
                    state = key_status(row.expires_at, row.revoked_at, utcnow())
                    expires = row.expires_at.isoformat() if row.expires_at else "never"
                    used = row.last_used_at.isoformat() if row.last_used_at else "never"
                    print(
                        f"{row.key_id}  {row.role:<8}  {state:<7}  expires {expires}  "
                        f"last used {used}  {row.name}"
                    )
            else:
                await service.revoke_key(session, args.key_id)
                print(f"revoked {args.key_id}", file=sys.stderr)
    finally:
        await database.close()
    return 0
