"""Archive retention: the local folder deletes expired files itself, in bounded rounds (the
cutoff is passed in: a fake clock, no sleeping); S3 gets a lifecycle rule at start-up, and,
when asked, a bucket with Object Lock (checked against a real SeaweedFS)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from iotmeter.readings import ReadingSet
from iotmeter.storage.archive.bucket import RULE_ID
from iotmeter.storage.archive.local import LocalArchiveStore
from iotmeter.storage.archive.segments import LayeredArchive, build_segment, segment_line
from tests.fixtures.s3 import new_bucket_name, open_test_s3_store
from tests.fixtures.services import SeaweedFS

DAY_US = 86_400_000_000
T0 = 1_790_000_000_000_000


def message(device_id: str, epoch_us: int, n: int = 0) -> ReadingSet:
    return ReadingSet(
        device_id=device_id,
        epoch_us=epoch_us,
        values={"v": float(n)},
        topic=f"iot/{device_id}/telemetry",
        received_at_us=epoch_us,
        raw=b'{"v":%d}' % n,
        msg_id=f"m{n}",
    )


def segment(device_id: str, first_us: int, last_us: int) -> tuple[str, bytes]:
    lines = [
        (at, segment_line(message(device_id, at, n))) for n, at in enumerate((first_us, last_us))
    ]
    return build_segment(device_id, lines, compress=True)


def files(root: Path) -> set[str]:
    return {
        str(path.relative_to(root))
        for path in root.rglob("*")
        if path.is_file() and not path.name.startswith(".")
    }


async def test_local_expiry_deletes_both_layouts_by_their_last_time(tmp_path: Path) -> None:
    root = tmp_path / "archive"
    archive = LayeredArchive(LocalArchiveStore(root), lookback_us=DAY_US)
    cutoff = T0 + 10 * DAY_US
    await archive.put(
        [message("old-only", T0 + n * 1000, n) for n in range(3)]
        + [message("mixed", T0 + DAY_US, 1), message("mixed", cutoff, 2)]
    )
    expired_segment = segment("mixed", T0, cutoff - 1000)  # last reading before the cutoff
    spanning_segment = segment("mixed", T0, cutoff + DAY_US)  # still holds kept data
    await archive.put_objects([expired_segment, spanning_segment])
    assert await archive.expire(cutoff, limit=100) == 5
    assert files(root) == {
        f"mixed/{message('mixed', cutoff, 2).archive_key.partition('/')[2]}",
        spanning_segment[0],
    }
    # The emptied device folder went too; a second round finds nothing.
    assert not (root / "old-only").exists()
    assert await archive.expire(cutoff, limit=100) == 0
    usage = await archive.usage()
    assert usage.oldest_us == T0  # the spanning segment's first reading
    assert usage.bytes_used is not None
    assert usage.bytes_used > 0


async def test_local_expiry_is_bounded_per_call(tmp_path: Path) -> None:
    root = tmp_path / "archive"
    archive = LayeredArchive(LocalArchiveStore(root), lookback_us=DAY_US)
    await archive.put([message(f"dev-{n % 4}", T0 + n * 1000, n) for n in range(50)])
    rounds = []
    while deleted := await archive.expire(T0 + DAY_US, limit=7):
        rounds.append(deleted)
    assert rounds == [7] * 7 + [1]
    assert files(root) == set()


async def test_a_file_arriving_late_in_a_checked_folder_still_expires(tmp_path: Path) -> None:
    """A folder found clean is skipped while it is unchanged; a new (old-dated) file changes
    it, and the next round finds that file."""
    archive = LayeredArchive(LocalArchiveStore(tmp_path / "archive"), lookback_us=DAY_US)
    await archive.put([message("late", T0 + 5 * DAY_US)])
    assert await archive.expire(T0 + DAY_US, limit=10) == 0
    await archive.put([message("late", T0, 1)])  # a replayed old message
    assert await archive.expire(T0 + DAY_US, limit=10) == 1


async def test_s3_expiry_is_left_to_the_lifecycle_rule(seaweedfs: SeaweedFS) -> None:
    async with open_test_s3_store(seaweedfs, retention_days=30) as s3:
        archive = LayeredArchive(s3, lookback_us=DAY_US)
        await archive.put([message("s3-old", T0)])
        assert await archive.expire(T0 + 100 * DAY_US, limit=10) == 0
        assert (await archive.get(message("s3-old", T0).archive_key)).device_id == "s3-old"
        usage = await archive.usage()
        assert usage.oldest_us == T0
        assert usage.bytes_used == len((await archive.get(message("s3-old", T0).archive_key)).body)


async def test_start_up_puts_a_lifecycle_rule_and_keeps_the_buckets_others(
    seaweedfs: SeaweedFS,
) -> None:
    bucket = new_bucket_name()
    async with open_test_s3_store(seaweedfs, bucket=bucket) as s3:
        other = {
            "ID": "logs-cleanup",
            "Status": "Enabled",
            "Filter": {"Prefix": "logs/"},
            "Expiration": {"Days": 3},
        }
        await s3.client.put_bucket_lifecycle_configuration(
            Bucket=bucket, LifecycleConfiguration={"Rules": [other]}
        )
    for days, expected in ((29.5, 30), (45, 45)):
        async with open_test_s3_store(seaweedfs, bucket=bucket, retention_days=days) as s3:
            rules = (await s3.client.get_bucket_lifecycle_configuration(Bucket=bucket))["Rules"]
            by_id = {rule["ID"]: rule for rule in rules}
            assert set(by_id) == {"logs-cleanup", RULE_ID}
            assert by_id[RULE_ID]["Expiration"] == {"Days": expected}
            assert by_id[RULE_ID]["Status"] == "Enabled"


async def test_a_shorter_rule_of_the_bucket_is_warned_about(
    seaweedfs: SeaweedFS, caplog: pytest.LogCaptureFixture
) -> None:
    bucket = new_bucket_name()
    async with open_test_s3_store(seaweedfs, bucket=bucket) as s3:
        rule = {"ID": "short", "Status": "Enabled", "Filter": {}, "Expiration": {"Days": 2}}
        await s3.client.put_bucket_lifecycle_configuration(
            Bucket=bucket, LifecycleConfiguration={"Rules": [rule]}
        )
    with caplog.at_level(logging.WARNING):
        async with open_test_s3_store(seaweedfs, bucket=bucket, retention_days=10):
            pass
    assert "short (2 d) expire archived objects sooner than IOTMETER_ARCHIVE_RETENTION_DAYS" in (
        caplog.text
    )


async def test_a_new_bucket_gets_object_lock_in_governance_mode(seaweedfs: SeaweedFS) -> None:
    async with open_test_s3_store(seaweedfs, object_lock_days=3) as s3:
        lock = await s3.client.get_object_lock_configuration(Bucket=s3.bucket)
        assert lock["ObjectLockConfiguration"] == {
            "ObjectLockEnabled": "Enabled",
            "Rule": {"DefaultRetention": {"Mode": "GOVERNANCE", "Days": 3}},
        }
        assert await s3.health() == f"{s3.endpoint_url}/{s3.bucket} (object lock: governance 3 d)"
        reading = message("locked", T0)
        await s3.put([reading])
        head = await s3.client.head_object(Bucket=s3.bucket, Key=reading.archive_key)
        assert head["ObjectLockMode"] == "GOVERNANCE"
        # Locked: not even a delete of that version goes through without the bypass right.
        with pytest.raises(Exception, match="AccessDenied"):
            await s3.client.delete_object(
                Bucket=s3.bucket, Key=reading.archive_key, VersionId=head["VersionId"]
            )


async def test_an_existing_bucket_without_lock_is_used_with_a_warning(
    seaweedfs: SeaweedFS, caplog: pytest.LogCaptureFixture
) -> None:
    bucket = new_bucket_name()
    async with open_test_s3_store(seaweedfs, bucket=bucket):
        pass
    with caplog.at_level(logging.WARNING):
        async with open_test_s3_store(seaweedfs, bucket=bucket, object_lock_days=3) as s3:
            await s3.put([message("unlocked", T0)])
            assert s3.object_lock == "missing"
            assert (await s3.health() or "").endswith("(object lock: missing)")
    assert "IOTMETER_ARCHIVE_OBJECT_LOCK_DAYS=3, but the bucket exists without Object Lock" in (
        caplog.text
    )
