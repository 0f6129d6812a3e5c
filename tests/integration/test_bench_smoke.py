"""The benchmark harness works end to end: a small run (`--smoke`) on real services.

It proves the harness starts its services, the app and the load processes, measures every figure
and loses nothing. It asserts no timing: the figures of a smoke run on a shared machine mean
nothing, only that they were measured.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HARNESS = ROOT / "bench" / "harness.py"


def test_harness_smoke_run_measures_everything_and_loses_nothing(tmp_path: Path) -> None:
    summary_path = tmp_path / "smoke.json"
    env = {name: value for name, value in os.environ.items() if not name.startswith("IOTMETER_")}
    result = subprocess.run(
        [sys.executable, str(HARNESS), "--smoke", "--json", str(summary_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    summary = json.loads(summary_path.read_text())
    assert "error" not in summary

    ceiling = summary["ceiling"]
    assert ceiling["msg_per_s"] > 0
    assert ceiling["received"] >= ceiling["acked"] > 0
    assert ceiling["drained"] == "complete"

    ingest = summary["iotmeter"]
    assert ingest["stored"] > 0
    assert ingest["stored_msg_per_s"] > 0
    assert ingest["drained"] == "complete"
    assert ingest["loss"] == 0
    assert ingest["stored"] == ingest["acked"]
    assert ingest["rejected"] == 0
    assert ingest["sql_rows_check"]["missing"] == 0
    assert summary["ratio_stored_to_ceiling"] > 0
    latency = ingest["latency"]
    assert latency["samples"] > 0
    assert latency["never_visible"] == 0
    assert latency["p50_ms"] is not None
    assert latency["p99_ms"] >= latency["p50_ms"]
    assert ingest["app_cpu_percent"] > 0
    assert ingest["app_rss_peak_mb"] > 0
    assert ingest["timeline"]

    puts = summary["s3_put_ceiling"]
    assert puts["puts_per_s"] > 0
    assert puts["failures"] == 0

    api = summary["api"]
    assert set(api) == {
        "device_get",
        "device_list",
        "telemetry_1h_1m",
        "telemetry_1h_1m_10s_device",
        "device_get_open_loop",
    }
    # The seeded hour behind the telemetry test: 100 devices, a reading set every 10 s.
    assert summary["history"]["reading_sets"] == 100 * 360
    for name, figures in api.items():
        assert figures["ok"] > 0, name
        assert set(figures["statuses"]) == {"200"}, (name, figures["statuses"])
        assert not figures["errors"], (name, figures["errors"])
        assert figures["p99_ms"] >= figures["p50_ms"] > 0, name
        assert figures["requests_per_s"] > 0, name

    assert summary["app_stop"] == "graceful"
    assert "Traceback" not in summary["app_log_tail"]
    # The table the harness prints names every figure.
    for label in ("ceiling", "stored", "ratio", "p50 / p99", "CPU", "RSS", "loss", "device_get"):
        assert label in result.stdout, label


def test_harness_backlog_smoke_run_drains_everything(tmp_path: Path) -> None:
    """The backlog mode: the app's session holds a backlog published while it was down; the
    harness times the app's drain against a bare subscriber's drain of the same backlog."""
    summary_path = tmp_path / "backlog.json"
    env = {name: value for name, value in os.environ.items() if not name.startswith("IOTMETER_")}
    result = subprocess.run(
        [
            sys.executable,
            str(HARNESS),
            "--mode",
            "backlog",
            "--smoke",
            "--no-api",
            "--json",
            str(summary_path),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    summary = json.loads(summary_path.read_text())
    assert "error" not in summary
    bare = summary["bare_drain"]
    backlog = summary["backlog"]
    assert bare["msg_per_s"] > 0
    assert backlog["messages"] == 5000
    assert backlog["broker_dropped"] == 0
    assert backlog["stored"] == backlog["received"] == 5000
    assert backlog["loss"] == 0
    assert backlog["sql_rows_check"]["missing"] == 0
    assert backlog["msg_per_s_from_first_received"] > 0
    assert backlog["app_rss_peak_mb"] > 0
    assert summary["ratio_drain_to_bare"] > 0
    assert "Traceback" not in summary["app_log_tail"]
