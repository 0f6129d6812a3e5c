"""How fast the simulator publishes: N devices at a fixed interval against a real broker.

    .venv/bin/python bench/bench_simulator.py            # 1,000 devices, 0.1 s, QoS 1, 10 s
    .venv/bin/python bench/bench_simulator.py --devices 3000 --qos 0 --url mqtt://127.0.0.1:1883

Prints the messages per second the broker acknowledged (QoS 1) or took (QoS 0), against the
rate asked for (devices / interval), and the CPU time of this process per wall-clock second
(100 % = one core). The first interval is left out: it is when devices start, spread over it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time

from iotmeter.config import Settings
from iotmeter.simulator.publisher import Simulator


async def bench(url: str, devices: int, interval: float, qos: int, seconds: float) -> None:
    settings = Settings(
        simulator_devices=devices,
        simulator_interval_s=interval,
        simulator_qos=qos,
        simulator_id_prefix="bench",
    )
    simulator = Simulator(settings, url)
    task = asyncio.create_task(simulator.run())
    try:
        await asyncio.sleep(interval)
        published_at_start = simulator.stats.published
        wall_start, cpu_start = time.monotonic(), time.process_time()
        await asyncio.sleep(seconds)
        published = simulator.stats.published - published_at_start
        wall = time.monotonic() - wall_start
        cpu = time.process_time() - cpu_start
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    if task.done() and not task.cancelled() and task.exception() is not None:
        raise SystemExit(f"simulator failed: {task.exception()!r}")
    print(
        f"{devices} devices every {interval} s at QoS {qos} over {len(simulator.groups)} "
        f"connection(s), {wall:.1f} s measured"
    )
    print(f"asked for:  {devices / interval:10,.0f} msg/s")
    print(f"achieved:   {published / wall:10,.0f} msg/s ({published:,} messages)")
    print(f"CPU:        {100 * cpu / wall:10.0f} % of one core")
    print(f"dropouts {simulator.stats.dropouts}, reconnects {simulator.stats.reconnects}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="mqtt://127.0.0.1:1883")
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--interval", type=float, default=0.1)
    parser.add_argument("--qos", type=int, choices=(0, 1), default=1)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    asyncio.run(bench(args.url, args.devices, args.interval, args.qos, args.seconds))


if __name__ == "__main__":
    main()
