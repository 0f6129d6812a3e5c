"""Decode throughput on typical messages: `python bench/bench_decode.py [messages]`.

Measures `decode_message` alone (no MQTT, no stores), single-threaded, and prints messages/s.
"""

from __future__ import annotations

import sys
import time

import orjson

from iotmeter.ingest.decode import DecodeLimits, decode_message

DEVICES = 100


def typical_messages(count: int, start_ms: int) -> list[tuple[bytes, str]]:
    """What a fleet of `DEVICES` sensors sends: one reading set per message, ms timestamps."""
    messages = []
    for n in range(count):
        payload = {
            "ts": start_ms + n,
            "msg_id": f"m-{n:08d}",
            "seq": n,
            "metrics": {
                "temperature": 21.5 + (n % 7) / 10,
                "humidity": 40.1,
                "voltage": 229.8,
                "on": n % 2 == 0,
            },
        }
        messages.append((orjson.dumps(payload), f"iot/sensor-{n % DEVICES:04d}/telemetry"))
    return messages


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    received_at_us = time.time_ns() // 1000
    messages = typical_messages(count, received_at_us // 1000 - count)
    limits = DecodeLimits()
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        accepted = 0
        for payload, topic in messages:
            accepted += len(decode_message(payload, topic, received_at_us, limits).readings)
        best = min(best, time.perf_counter() - started)
        if accepted != count:
            raise SystemExit(f"only {accepted} of {count} messages accepted")
    print(
        f"decoded {count} messages in {best:.3f} s (best of 5): {count / best:,.0f} messages/s "
        f"({best / count * 1e6:.2f} us/message)"
    )


if __name__ == "__main__":
    main()
