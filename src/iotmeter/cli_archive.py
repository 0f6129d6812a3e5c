"""`iotmeter archive verify`: re-read archived objects and check each against its content hash.

It opens the archive the app's settings describe (`IOTMETER_S3_*` or `IOTMETER_ARCHIVE_DIR`),
reads both layouts, and prints one line per object that is `altered`, `missing` or `unhashed`,
then a summary. Exit status: 0 every checked object is intact, 1 some are altered or missing,
or carry no hash (an object rewritten by something other than iotmeter loses its recorded hash;
`--allow-unhashed` accepts those, for archives written before hashes were recorded or copied
without extended attributes), 2 the check could not run (archive unavailable, bad arguments).
How the hashes are kept, and what a check cannot see: `iotmeter.storage.archive.integrity`.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator

from iotmeter.cli_export import ProgressBar
from iotmeter.config import Settings
from iotmeter.errors import IotmeterError
from iotmeter.storage.archive.integrity import Checked, archived_keys, verify_keys
from iotmeter.storage.archive.segments import LayeredArchive

BATCH = 256
"""Objects read concurrently per step (16 reads in flight at a time)."""
REPORTED: frozenset[str] = frozenset({"altered", "missing"})
"""Verdicts that always fail the check (`unhashed` fails unless --allow-unhashed)."""


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    archive = commands.add_parser("archive", help="check the raw archive")
    actions = archive.add_subparsers(dest="archive_command", required=True)
    verify = actions.add_parser(
        "verify",
        help="re-read archived objects and check each against its content hash",
        description="Report altered and missing archived objects; exit 1 when there are any.",
    )
    verify.add_argument(
        "--device", action="append", default=[], help="device id (repeatable; default all)"
    )
    verify.add_argument("--start", default="1970-01-01T00:00:00Z", help="RFC 3339 or like -7d")
    verify.add_argument("--stop", default="now", help="RFC 3339, relative or now (default)")
    verify.add_argument(
        "--allow-unhashed",
        action="store_true",
        help="objects without a recorded hash do not fail the check (older archives)",
    )
    progress = verify.add_mutually_exclusive_group()
    progress.add_argument(
        "--progress",
        action="store_true",
        default=None,
        help="show a progress bar (default: when standard error is a terminal)",
    )
    progress.add_argument("--no-progress", dest="progress", action="store_false")
    verify.set_defaults(handler=run)


def run(settings: Settings, args: argparse.Namespace) -> int:
    from iotmeter.api.timerange import parse_instant_us

    now_us = time.time_ns() // 1000
    try:
        start_us = parse_instant_us(args.start, "--start", now_us)
        stop_us = parse_instant_us(args.stop, "--stop", now_us)
        counts, devices = asyncio.run(_verify(settings, args, start_us, stop_us))
    except IotmeterError as exc:
        print(f"iotmeter archive verify: {exc.message}", file=sys.stderr)
        return 2
    summary = ", ".join(
        f"{counts[verdict]} {verdict}" for verdict in ("ok", "altered", "missing", "unhashed")
    )
    print(f"checked {counts.total()} objects of {devices} devices: {summary}")
    failing = REPORTED if args.allow_unhashed else REPORTED | {"unhashed"}
    return 1 if any(counts[verdict] for verdict in failing) else 0


async def _verify(
    settings: Settings, args: argparse.Namespace, start_us: int, stop_us: int
) -> tuple[Counter[str], int]:
    """Counts of each verdict, and how many devices were checked."""
    from iotmeter.storage.factory import open_archive

    counts: Counter[str] = Counter()
    show = REPORTED | {"unhashed"}
    enabled = sys.stderr.isatty() if args.progress is None else args.progress
    async with open_archive(settings) as archive:
        devices: list[str] = args.device or await archive.store.devices()
        with ProgressBar(enabled, unit="objects") as bar:
            for device_id in devices:
                async for results in _batches(archive, device_id, start_us, stop_us):
                    for result in results:
                        counts[result.verdict] += 1
                        if result.verdict in show:
                            bar.print(f"{result.verdict} {result.key}: {result.detail}")
                    bar.update(counts.total())
    return counts, len(devices)


async def _batches(
    archive: LayeredArchive, device_id: str, start_us: int, stop_us: int
) -> AsyncIterator[list[Checked]]:
    keys: list[str] = []
    async for key in archived_keys(archive, device_id, start_us, stop_us):
        keys.append(key)
        if len(keys) == BATCH:
            yield await verify_keys(archive, keys)
            keys = []
    if keys:
        yield await verify_keys(archive, keys)
