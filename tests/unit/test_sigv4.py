"""The archive's PutObject signer gives exactly the headers botocore's S3 SigV4 signer gives."""

from __future__ import annotations

from datetime import UTC, datetime
from urllib.parse import quote

import pytest
from botocore import auth as botocore_auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from hypothesis import given
from hypothesis import strategies as st

from iotmeter.storage.archive.sigv4 import PutSigner, host_header

KEYS = st.text(
    alphabet=st.characters(min_codepoint=33, max_codepoint=0x2FF, exclude_characters="\\"),
    min_size=1,
    max_size=40,
)
MOMENTS = st.datetimes(
    min_value=datetime(2000, 1, 1), max_value=datetime(2099, 12, 31), timezones=st.just(UTC)
)


def botocore_headers(
    url: str, body: bytes, content_type: str, moment: datetime, region: str
) -> dict[str, str]:
    request = AWSRequest(method="PUT", url=url, data=body, headers={"Content-Type": content_type})
    signer = botocore_auth.S3SigV4Auth(Credentials("AKIDEXAMPLE", "s3cr3t/+key"), "s3", region)
    original = botocore_auth.get_current_datetime
    botocore_auth.get_current_datetime = lambda: moment.replace(tzinfo=None)
    try:
        signer.add_auth(request)
    finally:
        botocore_auth.get_current_datetime = original
    return {name: str(value) for name, value in request.headers.items()}


@pytest.mark.parametrize(
    ("endpoint", "region"),
    [
        ("http://127.0.0.1:8333", "us-east-1"),
        ("http://minio.internal", "eu-central-1"),
        ("https://s3.example.com:443", "us-east-1"),
        ("https://s3.example.com:9000", "ap-south-1"),
    ],
)
@given(key=KEYS, body=st.binary(max_size=300), moment=MOMENTS)
def test_headers_equal_botocores(
    endpoint: str, region: str, key: str, body: bytes, moment: datetime
) -> None:
    path = f"/iot-data/{quote(key, safe='/~')}"
    ours = PutSigner(
        access_key="AKIDEXAMPLE",
        secret_key="s3cr3t/+key",
        region=region,
        host=host_header(endpoint),
    ).headers(path, body, "application/json", now=moment)
    assert ours == botocore_headers(endpoint + path, body, "application/json", moment, region)


def test_the_signing_key_follows_the_day() -> None:
    signer = PutSigner(access_key="a", secret_key="b", region="us-east-1", host="h")
    first = signer.headers(
        "/b/k", b"x", "text/plain", now=datetime(2026, 11, 27, 23, 59, tzinfo=UTC)
    )
    second = signer.headers(
        "/b/k", b"x", "text/plain", now=datetime(2026, 11, 28, 0, 0, tzinfo=UTC)
    )
    assert "20261127/us-east-1/s3/aws4_request" in first["Authorization"]
    assert "20261128/us-east-1/s3/aws4_request" in second["Authorization"]
    again = PutSigner(access_key="a", secret_key="b", region="us-east-1", host="h").headers(
        "/b/k", b"x", "text/plain", now=datetime(2026, 11, 28, 0, 0, tzinfo=UTC)
    )
    assert second == again
