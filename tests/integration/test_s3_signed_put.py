"""The archive's own signed PutObject against a SeaweedFS that checks every signature.

The S3 store writes with `SignedPut` (botocore's SigV4 signer, sent with aiohttp) instead of
aiobotocore's `put_object`. Our usual SeaweedFS accepts any key, which would let a wrong
signature pass unnoticed; this one demands one key pair and verifies each request.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from iotmeter.errors import BackendUnavailable
from iotmeter.storage.archive.s3 import S3ArchiveStore
from tests.fixtures.readings import reading
from tests.fixtures.services import SeaweedFS, running_seaweedfs

ACCESS_KEY = "iotmeter-test"
SECRET_KEY = "a-secret-with/slash+plus"
T0 = 1_767_225_600_000_000


@pytest.fixture(scope="module")
def checking_seaweedfs() -> Iterator[SeaweedFS]:
    with running_seaweedfs(credentials=(ACCESS_KEY, SECRET_KEY)) as server:
        yield server


@pytest.fixture
async def store(checking_seaweedfs: SeaweedFS) -> AsyncIterator[S3ArchiveStore]:
    async with S3ArchiveStore.open(
        endpoint_url=checking_seaweedfs.endpoint_url,
        bucket="signed-put",
        access_key=ACCESS_KEY,
        secret_key=SECRET_KEY,
    ) as opened:
        yield opened


async def test_signed_puts_are_accepted_and_read_back(store: S3ArchiveStore) -> None:
    readings = [reading("dev-1", T0 + n * 1000, {"t": float(n)}) for n in range(20)]
    await store.put(readings)
    segment = ("dev-2/20260101T000000.000Z_20260101T000001.000Z_0123456789abcdef.ndjson", b"{}\n")
    await store.put_objects([segment])

    page = await store.list("dev-1", start_us=T0, stop_us=T0 + 10**9, limit=100)
    assert page.keys == [r.archive_key for r in readings]
    assert await store.get_object(segment[0]) == segment[1]


async def test_a_wrong_secret_is_refused_with_the_servers_reason(
    checking_seaweedfs: SeaweedFS,
) -> None:
    async with S3ArchiveStore.open(
        endpoint_url=checking_seaweedfs.endpoint_url,
        bucket="signed-put",
        access_key=ACCESS_KEY,
        secret_key="not-the-secret",
    ) as wrong:
        # Bypass the bucket check (aiobotocore's, refused too): the signed PUT itself must fail.
        wrong._bucket_ready = True
        with pytest.raises(BackendUnavailable, match=r"SignatureDoesNotMatch|AccessDenied"):
            await wrong.put([reading("dev-1", T0, {"t": 1.0})])
