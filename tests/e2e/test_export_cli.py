"""`iotmeter export` against a served app (`iotmeter serve` in a subprocess, PostgreSQL): a
download cut mid-way by the network and resumed with `--resume` gives the same file, byte for
byte, as one uninterrupted export; a raw export keeps every archived document exactly; and the
server's memory does not grow with the export's size."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import sys
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import httpx
import pytest

from iotmeter.db.engine import Database, build_engine
from iotmeter.storage.archive.local import LocalArchiveStore
from iotmeter.storage.timeseries.sql import SqlTimeSeriesStore
from tests.fixtures.delivery import AppProcess, app_environment
from tests.fixtures.readings import SECOND_US, reading
from tests.fixtures.services import free_port

BASE_US = 1_767_225_600_000_000  # 2026-01-01T00:00:00Z
STEPS = 50_000  # x 4 fields: 200,000 points of meter-1
FIELDS = ("energy", "power", "v.l1", "v.l2")


async def write_points(database_url: str, device_id: str, steps: int) -> None:
    database = Database(build_engine(database_url))
    try:
        store = SqlTimeSeriesStore(database)
        for first in range(0, steps, 10_000):
            await store.write(
                [
                    reading(
                        device_id,
                        BASE_US + n * SECOND_US + n % 7,
                        {name: n / (index + 1) for index, name in enumerate(FIELDS)},
                    )
                    for n in range(first, min(first + 10_000, steps))
                ]
            )
    finally:
        await database.close()


@pytest.fixture
async def served(empty_pg_url: str, tmp_path: Path) -> AsyncIterator[AppProcess]:
    env = app_environment(
        database_url=empty_pg_url,
        mqtt_url="mqtt://127.0.0.1:1",
        workdir=tmp_path / "app",
        client_id="export",
        IOTMETER_COLLECTOR_ENABLED="false",
        IOTMETER_CONFIG_PUSH_ENABLED="false",
        IOTMETER_LOG_LEVEL="WARNING",
    )
    app = AppProcess(env, tmp_path / "app")
    try:
        await app.start(wait="health")
        async with httpx.AsyncClient(base_url=app.base_url, headers=app.headers) as client:
            for device_id in ("meter-1", "meter-2"):
                device = {"id": device_id, "name": device_id, "type": "meter"}
                assert (await client.post("/api/v1/devices", json=device)).status_code == 201
        await write_points(empty_pg_url, "meter-1", STEPS)
        await write_points(empty_pg_url, "meter-2", 5_000)
        yield app
    finally:
        app.close()


class CuttingProxy:
    """Forwards one connection to the app and drops it after `limit` bytes of the answer, as a
    broken network would; later connections pass whole."""

    def __init__(self, upstream_port: int, limit: int) -> None:
        self.upstream_port = upstream_port
        self.limit = limit
        self.port = free_port()
        self.cuts = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> CuttingProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        return self

    async def __aexit__(self, *_exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        limit = self.limit if self.cuts == 0 else None
        self.cuts += 1

        async def upstream() -> None:
            while data := await reader.read(65536):
                up_writer.write(data)
                await up_writer.drain()

        sending = asyncio.create_task(upstream())
        sent = 0
        try:
            while data := await up_reader.read(65536):
                if limit is not None and sent + len(data) >= limit:
                    writer.write(data[: limit - sent])
                    await writer.drain()
                    break
                writer.write(data)
                sent += len(data)
                await writer.drain()
        finally:
            sending.cancel()
            writer.close()
            up_writer.close()


async def run_cli(app: AppProcess, url: str, *args: str) -> tuple[int, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("IOTMETER_")}
    env["IOTMETER_API_KEY"] = app.headers["Authorization"].removeprefix("Bearer ")
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "iotmeter",
        "export",
        "--url",
        url,
        *args,
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, stderr = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode is not None
    return process.returncode, stderr.decode()


@pytest.mark.parametrize("form", ["csv", "ndjson"])
async def test_a_cut_export_resumed_equals_an_uncut_one(
    served: AppProcess, tmp_path: Path, form: str
) -> None:
    selection = ["meter-2", "meter-1", "--format", form, "--stop", "2026-02-01T00:00:00Z"]
    whole = tmp_path / f"whole.{form}"
    code, stderr = await run_cli(
        served, served.base_url, *selection, "-o", str(whole), "--progress"
    )
    assert code == 0, stderr
    # The progress bar's last state (rows, rate, time taken), then the summary.
    assert re.search(r"(?m)^\S+ 220,000 rows [\d,]+ rows/s \d+:\d\d:\d\d$", stderr), stderr
    assert re.search(r"(?m)^exported 220,000 rows in [\d.]+ s \([\d,]+ rows/s\)$", stderr), stderr

    cut = tmp_path / f"cut.{form}"
    async with CuttingProxy(served.port, limit=3_000_000) as proxy:
        code, stderr = await run_cli(
            served, f"http://127.0.0.1:{proxy.port}", *selection, "-o", str(cut)
        )
        assert code == 1, stderr
        assert "--resume" in stderr, stderr
        assert Path(f"{cut}.export-state").exists()
        assert 0 < cut.stat().st_size < whole.stat().st_size
        code, stderr = await run_cli(
            served, f"http://127.0.0.1:{proxy.port}", *selection, "-o", str(cut), "--resume"
        )
    assert code == 0, stderr

    assert cut.read_bytes() == whole.read_bytes()
    assert not Path(f"{cut}.export-state").exists()
    lines = whole.read_bytes().splitlines()
    assert len(lines) == 220_000 + (1 if form == "csv" else 0)
    assert lines[-1].startswith(b"meter-2," if form == "csv" else b'{"device_id":"meter-2"')


async def test_resume_refuses_another_export(served: AppProcess, tmp_path: Path) -> None:
    output = tmp_path / "out.csv"
    code, stderr = await run_cli(served, served.base_url, "meter-2", "-o", str(output), "--resume")
    assert code == 1, stderr
    assert "nothing to resume" in stderr, stderr

    other = {"path": "/api/v1/devices/meter-1/telemetry/export"}
    (tmp_path / "out.csv.export-state").write_text(
        json.dumps({"request": other, "cursor": "x", "bytes": 0})
    )
    code, stderr = await run_cli(served, served.base_url, "meter-2", "-o", str(output), "--resume")
    assert code == 1, stderr
    assert "belongs to another export" in stderr, stderr


def _memory_kib(pid: int) -> dict[str, int]:
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            values[name] = int(rest.split()[0])
    return values


async def peak_growth_mib(app: AppProcess, device_id: str) -> tuple[float, int]:
    """Peak RSS growth of the app while it streams the device's whole export to a client that
    reads at about 8 MB/s (slower than the server reads its store, so a server that read ahead
    without bound would pile rows up), and the rows."""
    assert app.process is not None
    pid = app.process.pid
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    before = _memory_kib(pid)["VmRSS"]
    lines = comments = 0
    last = b""
    async with (
        httpx.AsyncClient(base_url=app.base_url, headers=app.headers, timeout=60) as client,
        client.stream(
            "GET", f"/api/v1/devices/{device_id}/telemetry/export", params={"format": "csv"}
        ) as response,
    ):
        assert response.status_code == 200, (await response.aread())[:2000]
        async for chunk in response.aiter_bytes(65536):
            lines += chunk.count(b"\n")
            comments += (last + chunk).count(b"\n#")
            last = chunk[-1:]
            await asyncio.sleep(0.008)
    return (_memory_kib(pid)["VmHWM"] - before) / 1024, lines - comments - 1  # the header


async def test_server_memory_does_not_grow_with_the_export(served: AppProcess) -> None:
    """200,000 points cost the server no more memory than 20,000: it holds a chunk at a time.
    (Measured: about 1 MiB of growth streaming; a server that built the answer whole grew by
    33 MiB here.)"""
    await peak_growth_mib(served, "meter-2")  # warm: first use of every code path

    small, small_rows = await peak_growth_mib(served, "meter-2")
    large, large_rows = await peak_growth_mib(served, "meter-1")

    assert (small_rows, large_rows) == (20_000, 200_000)
    assert large < 20, f"RSS grew {large:.1f} MiB during a 200,000-point export"
    assert large < small + 8, f"{large:.1f} MiB for 200,000 points, {small:.1f} for 20,000"


async def test_raw_export_to_a_file_keeps_each_archived_document_exactly(
    served: AppProcess, tmp_path: Path
) -> None:
    archive = LocalArchiveStore(Path(served.env["IOTMETER_ARCHIVE_DIR"]))
    sets = [
        replace(
            reading("meter-2", BASE_US + n * SECOND_US, {"energy": float(n)}),
            raw=b'{"ts": %d, "energy": %d}' % (BASE_US // 1000 + n * 1000, n),
            msg_id=f"m{n}",
        )
        for n in range(250)  # three pages of the raw export
    ]
    sets[7] = replace(sets[7], raw=b'{\n  "energy": 7\n}')  # pretty-printed: base64
    await archive.put(sets)
    output = tmp_path / "raw.ndjson"

    code, stderr = await run_cli(served, served.base_url, "meter-2", "--raw", "-o", str(output))

    assert code == 0, stderr
    lines = output.read_bytes().splitlines()
    assert len(lines) == 250
    for line, reading_set in zip(lines, sets, strict=True):
        item = json.loads(line)
        stored = (await archive.get(reading_set.archive_key)).body
        assert item["key"] == reading_set.archive_key
        if "document" in item:
            assert line[line.index(b'"document":') + len(b'"document":') : -1] == stored
        else:
            assert base64.b64decode(item["document_base64"]) == stored
