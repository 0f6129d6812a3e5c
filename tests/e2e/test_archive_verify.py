"""`iotmeter archive verify` as a user runs it (a subprocess, configured by IOTMETER_*), on
the local folder and on S3 (a real SeaweedFS), both layouts: a clean archive passes; altered
objects, one still listed whose data is gone, and one rewritten without its hash are reported,
and the exit status says so. An object deleted outright is not listed any more: only the count
of checked objects shows it (see `iotmeter.storage.archive.integrity`)."""

from __future__ import annotations

import asyncio
import gzip
import os
import subprocess
import sys
from pathlib import Path

from iotmeter.readings import ReadingSet
from iotmeter.storage.archive.local import LocalArchiveStore
from iotmeter.storage.archive.s3 import S3ArchiveStore
from iotmeter.storage.archive.segments import LayeredArchive, build_segment, segment_line
from tests.fixtures.s3 import new_bucket_name, open_test_s3_store, s3_settings
from tests.fixtures.services import SeaweedFS

T0 = 1_790_000_000_000_000  # 2026-09-21
DEVICES = ("verify-a", "verify-b")


def message(device_id: str, n: int) -> ReadingSet:
    epoch_us = T0 + n * 1000
    return ReadingSet(
        device_id=device_id,
        epoch_us=epoch_us,
        values={"v": float(n)},
        topic=f"iot/{device_id}/telemetry",
        received_at_us=epoch_us + 7,
        raw=b'{"v":%d,"msg_id":"m%d"}' % (n, n),
        msg_id=f"m{n}",
    )


async def fill(archive: LayeredArchive) -> tuple[list[str], str]:
    """10 messages per device and one gzip segment of verify-a; (message keys, segment key)."""
    readings = [message(device, n) for device in DEVICES for n in range(10)]
    await archive.put(readings)
    lines = [(m.epoch_us, segment_line(m)) for m in (message("verify-a", n) for n in range(20, 30))]
    segment_key, body = build_segment("verify-a", lines, compress=True)
    await archive.put_objects([(segment_key, body)])
    return [reading.archive_key for reading in readings], segment_key


def verify(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "iotmeter", "archive", "verify", "--no-progress", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def report(result: subprocess.CompletedProcess[str]) -> dict[str, str]:
    """{key: verdict} of the report lines."""
    found = {}
    for line in result.stdout.splitlines():
        verdict, _, rest = line.partition(" ")
        if verdict in ("altered", "missing", "unhashed"):
            found[rest.partition(":")[0]] = verdict
    return found


async def test_local_archive_verify_reports_altered_and_unreadable_files(tmp_path: Path) -> None:
    root = tmp_path / "archive"
    archive = LayeredArchive(LocalArchiveStore(root), lookback_us=3_600_000_000)
    keys, segment_key = await fill(archive)
    env = {"IOTMETER_ARCHIVE_DIR": str(root)}

    clean = verify(env)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "checked 21 objects of 2 devices: 21 ok, 0 altered, 0 missing, 0 unhashed" in (
        clean.stdout
    )

    # One message's bytes changed in place (its recorded hash stays), one segment byte flipped.
    altered = root / keys[3]
    altered.write_bytes(altered.read_bytes().replace(b'"v":3', b'"v":4'))
    segment = root / segment_key
    content = bytearray(gzip.decompress(segment.read_bytes()))
    content[40] ^= 1
    segment.write_bytes(gzip.compress(bytes(content), mtime=0))
    # One still listed, but its data is gone (a dangling name, as a damaged disk leaves).
    lost = root / keys[12]
    lost.unlink()
    lost.symlink_to(tmp_path / "nowhere")
    # One deleted outright: nothing lists it any more, so only the count shows it.
    (root / keys[15]).unlink()

    result = verify(env, "--start", "2026-09-01T00:00:00Z", "--stop", "2026-10-01T00:00:00Z")
    assert result.returncode == 1, result.stdout + result.stderr
    assert report(result) == {keys[3]: "altered", segment_key: "altered", keys[12]: "missing"}
    assert "checked 20 objects of 2 devices: 17 ok, 2 altered, 1 missing, 0 unhashed" in (
        result.stdout
    )
    # Restricted to the other device, whose damage is a missing file only.
    only_b = verify(env, "--device", "verify-b")
    assert only_b.returncode == 1
    assert report(only_b) == {keys[12]: "missing"}
    # A range with none of the damaged objects passes.
    early = verify(env, "--device", "verify-a", "--stop", "2026-09-21T14:13:20.003Z")
    assert early.returncode == 0, early.stdout


async def test_s3_archive_verify_reports_altered_and_unhashed_objects(
    seaweedfs: SeaweedFS,
) -> None:
    settings = s3_settings(seaweedfs, new_bucket_name())
    env = {f"IOTMETER_{name.upper()}": str(value) for name, value in settings.items()}
    async with open_test_s3_store(seaweedfs, bucket=settings["s3_bucket"]) as s3:
        keys, _segment = await fill(LayeredArchive(s3, lookback_us=3_600_000_000))

    clean = await asyncio.to_thread(verify, env)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "checked 21 objects of 2 devices: 21 ok" in clean.stdout

    async with open_test_s3_store(seaweedfs, bucket=settings["s3_bucket"]) as s3:
        # Other bytes under a key, the recorded hash copied along (not recomputed).
        stored = await s3.read_object(keys[2])
        await overwrite(s3, keys[2], stored.body.replace(b'"v":2', b'"v":5'), stored.sha256)
        # Other bytes written by a tool that knows nothing of the hash.
        await overwrite(s3, keys[11], b'{"forged":true}', None)
        # Deleted outright: nothing lists it any more, so only the count shows it.
        await s3.client.delete_object(Bucket=s3.bucket, Key=keys[14])

    result = await asyncio.to_thread(verify, env)
    assert result.returncode == 1, result.stdout + result.stderr
    assert report(result) == {keys[2]: "altered", keys[11]: "unhashed"}
    assert "checked 20 objects of 2 devices: 18 ok, 1 altered, 0 missing, 1 unhashed" in (
        result.stdout
    )
    # verify-b's only damage is an object without a hash: accepted with --allow-unhashed.
    strict = await asyncio.to_thread(verify, env, "--device", "verify-b")
    assert strict.returncode == 1
    relaxed = await asyncio.to_thread(verify, env, "--allow-unhashed", "--device", "verify-b")
    assert relaxed.returncode == 0, relaxed.stdout
    assert report(relaxed) == {keys[11]: "unhashed"}


async def overwrite(s3: S3ArchiveStore, key: str, body: bytes, sha256: str | None) -> None:
    metadata = {"sha256": sha256} if sha256 else {}
    await s3.client.put_object(Bucket=s3.bucket, Key=key, Body=body, Metadata=metadata)
