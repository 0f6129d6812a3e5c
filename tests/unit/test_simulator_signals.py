"""The simulated signals stay physical, keep their counters monotonic and are reproducible."""

from __future__ import annotations

import itertools
import random
import statistics
from datetime import UTC, datetime, timedelta, timezone

import orjson
import pytest

from iotmeter.config import Settings, SimulatorKind
from iotmeter.ingest.broker import BrokerAddress
from iotmeter.simulator.publisher import (
    SimulatedDevice,
    format_timestamp,
    plan_devices,
)
from iotmeter.simulator.signals import (
    HumiditySignal,
    PowerMeterSignal,
    Signal,
    TemperatureSignal,
    make_signal,
)

SEEDS = range(12)
START = datetime(2026, 3, 1, tzinfo=UTC)
THREE_DAYS_BY_MINUTE = [START + timedelta(minutes=step) for step in range(3 * 24 * 60)]


def run(signal: Signal, times: list[datetime]) -> list[dict[str, float]]:
    return [signal.sample(at) for at in times]


@pytest.mark.parametrize("seed", SEEDS)
def test_temperature_stays_in_range_and_follows_the_day(seed: int) -> None:
    samples = run(TemperatureSignal(random.Random(seed)), THREE_DAYS_BY_MINUTE)

    values = [sample["temperature"] for sample in samples]
    assert all(-40 <= value <= 60 for value in values)
    assert max(values) - min(values) > 3, "a daily cycle of a few °C"
    hours = [at.hour for at in THREE_DAYS_BY_MINUTE]
    early_morning = [v for v, h in zip(values, hours, strict=True) if 2 <= h < 6]
    afternoon = [v for v, h in zip(values, hours, strict=True) if 13 <= h < 17]
    assert statistics.mean(afternoon) > statistics.mean(early_morning) + 2


@pytest.mark.parametrize("seed", SEEDS)
def test_humidity_stays_within_0_and_100_and_falls_as_it_warms(seed: int) -> None:
    samples = run(HumiditySignal(random.Random(seed), spike_rate=0.05), THREE_DAYS_BY_MINUTE)

    assert all(0 <= sample["humidity"] <= 100 for sample in samples)
    assert all(-40 <= sample["temperature"] <= 60 for sample in samples)
    humidity = [sample["humidity"] for sample in samples]
    temperature = [sample["temperature"] for sample in samples]
    assert statistics.correlation(humidity, temperature) < -0.5


@pytest.mark.parametrize("seed", SEEDS)
def test_power_meter_stays_physical(seed: int) -> None:
    samples = run(PowerMeterSignal(random.Random(seed)), THREE_DAYS_BY_MINUTE)

    for sample in samples:
        assert 200 <= sample["voltage"] <= 260
        assert 0.7 <= sample["power_factor"] <= 1.0
        assert sample["current"] >= 0
        assert sample["active_power"] >= 0
        product = sample["voltage"] * sample["current"] * sample["power_factor"]
        assert sample["active_power"] == pytest.approx(product, abs=0.006)
    currents = [sample["current"] for sample in samples]
    assert max(currents) > 2 * min(currents), "the load varies over the day"


@pytest.mark.parametrize("seed", SEEDS)
def test_energy_counter_integrates_power_and_never_decreases(seed: int) -> None:
    rng = random.Random(seed + 1000)
    at = START
    times = []
    for _ in range(5000):
        # Irregular gaps, including repeated and out-of-order timestamps.
        at += timedelta(seconds=rng.choice([0.0, 0.05, 1.0, 7.3, 60.0, 900.0, -30.0]))
        times.append(at)
    samples = run(PowerMeterSignal(random.Random(seed), spike_rate=0.1), times)

    energy = [sample["energy_kwh"] for sample in samples]
    assert all(later >= earlier for earlier, later in itertools.pairwise(energy))
    assert energy[-1] > energy[0]


def test_energy_counter_matches_the_power_drawn() -> None:
    signal = PowerMeterSignal(random.Random(7))
    samples = run(signal, THREE_DAYS_BY_MINUTE)

    mean_power_w = statistics.mean(sample["active_power"] for sample in samples)
    hours = (THREE_DAYS_BY_MINUTE[-1] - THREE_DAYS_BY_MINUTE[0]).total_seconds() / 3600
    consumed = samples[-1]["energy_kwh"] - samples[0]["energy_kwh"]
    assert consumed == pytest.approx(mean_power_w * hours / 1000, rel=0.01)


@pytest.mark.parametrize(
    ("kind", "spiked_fields"),
    [
        ("temperature", {"temperature"}),
        ("humidity", {"humidity"}),
        ("power_meter", {"current", "active_power"}),
    ],
)
def test_spike_rate_one_spikes_every_sample_and_zero_none(
    kind: SimulatorKind, spiked_fields: set[str]
) -> None:
    times = THREE_DAYS_BY_MINUTE[:600]
    calm = make_signal(kind, random.Random(3), spike_rate=0.0)
    spiky = make_signal(kind, random.Random(3), spike_rate=1.0)

    for at in times:
        normal, spiked = calm.sample(at), spiky.sample(at)
        assert calm.anomaly is None
        assert spiky.anomaly == "spike"
        # Spikes leave the underlying signal alone: everything else is identical.
        assert {name for name in normal if normal[name] != spiked[name]} <= spiked_fields
        if kind == "temperature":
            assert 15 <= spiked["temperature"] - normal["temperature"] <= 30
        elif kind == "humidity":
            assert min(100.0, normal["humidity"] + 20) - 0.01 <= spiked["humidity"] <= 100.0
        else:
            assert spiked["active_power"] == pytest.approx(3 * normal["active_power"], abs=0.02)


def test_some_spikes_at_a_partial_rate() -> None:
    signal = TemperatureSignal(random.Random(11), spike_rate=0.1)
    flags = []
    for at in THREE_DAYS_BY_MINUTE[:2000]:
        signal.sample(at)
        flags.append(signal.anomaly == "spike")
    assert 100 < sum(flags) < 300


@pytest.mark.parametrize("kind", ["temperature", "humidity", "power_meter"])
def test_same_seed_same_readings(kind: SimulatorKind) -> None:
    times = THREE_DAYS_BY_MINUTE[:1000]
    first = run(make_signal(kind, random.Random(42), spike_rate=0.2), times)
    again = run(make_signal(kind, random.Random(42), spike_rate=0.2), times)
    other = run(make_signal(kind, random.Random(43), spike_rate=0.2), times)
    assert first == again
    assert first != other


def test_naive_times_count_as_utc() -> None:
    aware = run(TemperatureSignal(random.Random(5)), THREE_DAYS_BY_MINUTE[:300])
    naive_times = [at.replace(tzinfo=None) for at in THREE_DAYS_BY_MINUTE[:300]]
    assert run(TemperatureSignal(random.Random(5)), naive_times) == aware


def test_spike_rate_outside_0_and_1_is_refused() -> None:
    with pytest.raises(ValueError, match="spike_rate"):
        TemperatureSignal(random.Random(0), spike_rate=1.5)


def test_plan_devices_names_kinds_round_robin_with_stable_seeds() -> None:
    settings = Settings(simulator_devices=7, simulator_id_prefix="lab")
    devices = plan_devices(settings)

    assert [device.device_id for device in devices] == [
        "lab-temperature-0001",
        "lab-humidity-0001",
        "lab-power_meter-0001",
        "lab-temperature-0002",
        "lab-humidity-0002",
        "lab-power_meter-0002",
        "lab-temperature-0003",
    ]
    assert [device.kind for device in devices] == [device.signal.kind for device in devices]
    at = START
    again = plan_devices(settings)
    assert [d.signal.sample(at) for d in devices] == [d.signal.sample(at) for d in again]
    assert len({orjson.dumps(d.signal.sample(at)) for d in devices}) == len(devices)


def test_plan_devices_uses_only_the_configured_kinds() -> None:
    settings = Settings(simulator_devices=4, simulator_kinds=["power_meter"])
    assert {device.kind for device in plan_devices(settings)} == {"power_meter"}


def test_payload_has_the_documented_shape_and_counts_seq() -> None:
    settings = Settings(simulator_devices=1, simulator_spike_rate=1.0)
    (device,) = plan_devices(settings)
    at = datetime(2026, 11, 27, 9, 5, 11, 123456, tzinfo=UTC)

    messages = [orjson.loads(device.next_payload(at) or b"") for _ in range(3)]

    assert device.topic == "iot/sim-temperature-0001/telemetry"
    first = messages[0]
    assert set(first) == {"ts", "seq", "msg_id", "type", "metrics", "anomaly"}
    assert first["ts"] == "2026-11-27T09:05:11.123Z"
    assert first["type"] == "temperature"
    assert first["anomaly"] == "spike"
    assert set(first["metrics"]) == {"temperature"}
    assert [message["seq"] for message in messages] == [0, 1, 2]
    assert len({message["msg_id"] for message in messages}) == 3


def test_dropouts_skip_messages_but_use_up_their_seq() -> None:
    device = SimulatedDevice(
        device_id="d-1",
        kind="temperature",
        signal=TemperatureSignal(random.Random(1)),
        dropout_rate=0.5,
        dropout_rng=random.Random(1),
    )
    payloads = [device.next_payload(START + timedelta(seconds=i)) for i in range(400)]
    sent = [orjson.loads(payload) for payload in payloads if payload is not None]

    assert 120 < len(sent) < 280
    seqs = [message["seq"] for message in sent]
    assert seqs == sorted(seqs)
    assert seqs[-1] - seqs[0] + 1 > len(sent), "a dropped message leaves a gap in seq"


def test_format_timestamp_converts_to_utc() -> None:
    local = datetime(2026, 1, 2, 3, 4, 5, 600000, tzinfo=timezone(timedelta(hours=2)))
    assert format_timestamp(local) == "2026-01-02T01:04:05.600Z"


def test_broker_url_gives_host_port_and_decoded_credentials() -> None:
    address = BrokerAddress.from_url("mqtt://sim%40lab:p%3Ass@broker.local:1884")
    assert (address.host, address.port, address.tls) == ("broker.local", 1884, False)
    assert (address.username, address.password) == ("sim@lab", "p:ss")
    assert "p:ss" not in repr(address)
    assert BrokerAddress.from_url("mqtt://127.0.0.1") == BrokerAddress("127.0.0.1", 1883)
    assert BrokerAddress.from_url("mqtts://example.org").port == 8883


@pytest.mark.parametrize("url", ["auto", "embedded", "http://127.0.0.1:1883", "mqtt://"])
def test_broker_url_must_be_an_mqtt_url(url: str) -> None:
    with pytest.raises(ValueError, match="broker URL"):
        BrokerAddress.from_url(url)
