"""The log of a whole run in JSON, at DEBUG, with every kind of secret configured: each line is a
JSON object, and no secret is in it.

`python -m iotmeter serve` as a subprocess against real PostgreSQL (a password in the URL, which
trust authentication ignores), a Mosquitto that checks a password, and a SeaweedFS that checks
S3 signatures. The run ingests telemetry, answers API calls with a good key, a wrong key, a
valid and a forged JWT, and rides out an S3 outage (the archive sink fails and recovers)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import jwt
import orjson
import pytest

from tests.fixtures.delivery import AppProcess, app_environment
from tests.fixtures.devices import publish
from tests.fixtures.services import (
    Mosquitto,
    SeaweedFS,
    create_pg_database,
    drop_pg_database,
    free_port,
    running_seaweedfs,
    writable_by_mosquitto,
)
from tests.fixtures.waiting import eventually

MQTT_USER = "iotmeter-collector"
ISO_UTC_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def secret(name: str) -> str:
    """A value found nowhere else (so a match in the log is this secret, not a coincidence)."""
    return f"{name}-{uuid.uuid4().hex}"


class Secrets:
    def __init__(self) -> None:
        self.database = secret("pg-password")
        self.mqtt = secret("mqtt-password")
        self.s3_access = secret("s3-access")
        self.s3_secret = secret("s3-secret")
        self.jwt = secret("jwt-secret")
        self.device = secret("device-credential-secret")
        self.smtp = secret("smtp-password")

    def values(self) -> dict[str, str]:
        return dict(vars(self))


@pytest.fixture
def secrets() -> Secrets:
    return Secrets()


@pytest.fixture
def broker(secrets: Secrets) -> Iterator[Mosquitto]:
    """A Mosquitto that lets in only the collector's account and the test's publisher."""
    with tempfile.TemporaryDirectory(prefix="iotmeter-mosquitto-") as workdir:
        folder = Path(workdir)
        writable_by_mosquitto(folder)
        passwords = folder / "passwords"
        subprocess.run(
            ["mosquitto_passwd", "-c", "-b", str(passwords), MQTT_USER, secrets.mqtt],
            check=True,
            capture_output=True,
        )
        writable_by_mosquitto(passwords)
        mosquitto = Mosquitto(
            port=free_port(),
            workdir=folder,
            extra_config=("allow_anonymous false", f"password_file {passwords}"),
        )
        mosquitto.start()
        try:
            yield mosquitto
        finally:
            mosquitto.stop()


@pytest.fixture
def s3(secrets: Secrets) -> Iterator[SeaweedFS]:
    with running_seaweedfs(credentials=(secrets.s3_access, secrets.s3_secret)) as server:
        yield server


def publish_readings(broker: Mosquitto, password: str, device: str, count: int) -> None:
    """QoS 1, with the collector's account (the broker lets nobody else in), every PUBACK."""
    publish(
        broker.port,
        [
            (f"iot/{device}/telemetry", orjson.dumps({"seq": i, "metrics": {"t": 20.0 + i}}))
            for i in range(count)
        ],
        client_id=f"log-test-{uuid.uuid4().hex[:8]}",
        username=MQTT_USER,
        password=password,
    )


def with_password(url: str, password: str) -> str:
    parts = urlsplit(url)
    netloc = f"{parts.username}:{password}@{parts.hostname}:{parts.port or 5432}"
    return parts._replace(netloc=netloc).geturl()


def token(key: str, role: str = "viewer") -> str:
    claims = {"sub": "log-test", "role": role, "exp": int(time.time()) + 600}
    return jwt.encode(claims, key, algorithm="HS256")


async def stats(app: AppProcess) -> dict[str, Any]:
    return await app.stats() or {}


async def log_text(app: AppProcess) -> str:
    return app.log_path.read_text(errors="replace")


async def test_a_json_run_logs_no_secret(
    tmp_path: Path, secrets: Secrets, broker: Mosquitto, s3: SeaweedFS
) -> None:
    database_url = await create_pg_database("iotmeter_logs")
    env = app_environment(
        database_url=with_password(database_url, secrets.database),
        mqtt_url=f"mqtt://{MQTT_USER}:{secrets.mqtt}@127.0.0.1:{broker.port}",
        workdir=tmp_path,
        client_id=f"iotmeter-logs-{uuid.uuid4().hex[:8]}",
        s3={
            "s3_endpoint_url": s3.endpoint_url,
            "s3_access_key": secrets.s3_access,
            "s3_secret_key": secrets.s3_secret,
            "s3_bucket": f"logs-{uuid.uuid4().hex[:8]}",
        },
        LOG_FORMAT="json",
        LOG_LEVEL="DEBUG",
        AUTH_JWT_SECRET=secrets.jwt,
        DEVICE_CREDENTIAL_SECRET=secrets.device,
        SMTP_URL=f"smtp://alerts:{secrets.smtp}@127.0.0.1:{free_port()}",
        BATCH_MAX_DELAY_S="0.05",
    )
    app = AppProcess(env, tmp_path)
    try:
        await app.start(wait="ready")
        admin_key = app.headers["Authorization"].removeprefix("Bearer ")
        publish_readings(broker, secrets.mqtt, "log-dev-1", 5)
        await eventually(
            lambda: stats(app),
            lambda body: body.get("messages", {}).get("stored") == 5,
            within=30,
            what="5 messages stored",
        )

        wrong_key = f"iotm_{admin_key.split('_')[1]}_{'W' * 43}"
        forged = token(secret("another-key"))
        valid = token(secrets.jwt)
        async with httpx.AsyncClient(base_url=app.base_url, timeout=10) as client:
            answers = {
                "admin": await client.get(
                    "/api/v1/devices",
                    headers={**app.headers, "X-Request-ID": "log-test-admin"},
                ),
                "wrong key": await client.get(
                    "/api/v1/devices", headers={"Authorization": f"Bearer {wrong_key}"}
                ),
                "forged jwt": await client.get(
                    "/api/v1/devices", headers={"Authorization": f"Bearer {forged}"}
                ),
                "valid jwt": await client.get(
                    "/api/v1/devices", headers={"Authorization": f"Bearer {valid}"}
                ),
                "key header": await client.get("/api/v1/devices", headers={"X-API-Key": "x"}),
                # A client's mistake: the key in the URL, which the access log shows.
                "key in the URL": await client.get(
                    "/api/v1/devices", params={"api_key": admin_key, "token": valid}
                ),
            }
        statuses = {name: answer.status_code for name, answer in answers.items()}
        assert statuses == {
            "admin": 200,
            "wrong key": 401,
            "forged jwt": 401,
            "valid jwt": 200,
            "key header": 401,
            "key in the URL": 401,
        }

        # The broker goes away and comes back: the collector says so, naming the broker.
        await asyncio.to_thread(broker.stop)
        await asyncio.sleep(1.0)
        await asyncio.to_thread(broker.start)
        await eventually(
            lambda: log_text(app),
            lambda text: "MQTT connection" in text and "recovered after" in text,
            within=30,
            what="the collector back on the broker",
        )

        # The archive sink fails while S3 is down, and recovers when it is back.
        await asyncio.to_thread(s3.stop)
        publish_readings(broker, secrets.mqtt, "log-dev-1", 3)
        await eventually(
            lambda: stats(app),
            lambda body: "archive" in body.get("spool", {}).get("failing_sinks", {}),
            within=60,
            what="the archive sink failing",
        )
        await asyncio.to_thread(s3.start)
        await eventually(
            lambda: stats(app),
            lambda body: body.get("spool", {}).get("failing_sinks") == {},
            within=90,
            what="the archive sink recovered",
        )
        assert await app.terminate() == 0
    finally:
        app.close()
        await drop_pg_database(database_url)

    text = app.log_path.read_text(errors="replace")
    lines = [line for line in text.splitlines() if line.strip() and not line.startswith("=====")]
    records = []
    for line in lines:
        record = json.loads(line)  # every line is one JSON object
        assert isinstance(record, dict), line
        assert {"time", "level", "logger", "message"} <= set(record), line
        assert ISO_UTC_MS.match(record["time"]), line
        records.append(record)

    leaked = {
        name: value
        for name, value in {
            **secrets.values(),
            "admin key's secret": admin_key.split("_", 2)[2],
            "wrong key's secret": wrong_key.split("_", 2)[2],
            "valid JWT": valid,
            "forged JWT": forged,
            "valid JWT's signature": valid.rsplit(".", 1)[1],
        }.items()
        if value in text
    }
    assert not leaked, f"in the log: {sorted(leaked)}"

    # The run really logged what the secrets could have leaked through.
    levels = {record["level"] for record in records}
    assert {"DEBUG", "INFO", "WARNING"} <= levels, levels
    messages = [record["message"] for record in records]
    assert any("archive sink failing" in message for message in messages), messages
    assert any("archive sink recovered" in message for message in messages), messages
    access = [record for record in records if record["logger"] == "uvicorn.access"]
    assert any(
        record.get("request_id") == "log-test-admin" and " 200" in record["message"]
        for record in access
    ), access
    assert any(" 401" in record["message"] for record in access), access
    assert any("collector subscribed" in message for message in messages)
    broker_address = f"127.0.0.1:{broker.port}"
    lost = [r for r in records if "MQTT connection" in r["message"] and "failing" in r["message"]]
    back = [r for r in records if "MQTT connection" in r["message"] and "recovered" in r["message"]]
    assert lost, messages
    assert back, messages
    assert {r.get("broker") for r in lost + back} == {broker_address}
    assert any("?api_key=***&token=*** " in record["message"] for record in access), access


def test_refused_settings_are_one_json_line_without_the_secret(tmp_path: Path) -> None:
    too_short = secret("short")[:20]  # IOTMETER_DEVICE_CREDENTIAL_SECRET needs 32 bytes
    access_key = secret("s3-access")  # without IOTMETER_S3_ENDPOINT_URL
    environment = {key: value for key, value in os.environ.items() if "IOTMETER_" not in key}
    environment.update(
        IOTMETER_LOG_FORMAT="json",
        IOTMETER_DEVICE_CREDENTIAL_SECRET=too_short,
        IOTMETER_S3_ACCESS_KEY=access_key,
    )

    result = subprocess.run(
        [sys.executable, "-m", "iotmeter", "serve"],
        env=environment,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    (line,) = result.stderr.splitlines()
    record = json.loads(line)
    assert record["level"] == "ERROR"
    assert record["message"].startswith("invalid settings: ")
    assert record["variables"] == [
        "IOTMETER_DEVICE_CREDENTIAL_SECRET",
        "IOTMETER_S3_ACCESS_KEY",
        "IOTMETER_S3_ENDPOINT_URL",
    ]
    assert too_short not in result.stderr
    assert access_key not in result.stderr
