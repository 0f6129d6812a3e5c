"""Plausible sensor readings for simulated devices: pure and deterministic given a seeded RNG.

Each signal keeps its own state between samples (slow drift, an energy counter), so samples must
be asked for in time order; a time that goes backwards counts as no time passing. Naive
datetimes are taken as UTC.
"""

from __future__ import annotations

import math
import random
from abc import ABC, abstractmethod
from datetime import UTC, datetime
from typing import ClassVar, Literal

from iotmeter.config import SimulatorKind

Anomaly = Literal["spike"]

_SECONDS_PER_HOUR = 3600.0


def _epoch_seconds(at: datetime) -> float:
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    return at.timestamp()


def _clamp(value: float, low: float, high: float) -> float:
    return min(max(value, low), high)


def _circular_distance(hour: float, center: float) -> float:
    """Signed distance in hours between two times of day, in [-12, 12)."""
    return (hour - center + 12.0) % 24.0 - 12.0


class Signal(ABC):
    """One device's readings over time; `anomaly` tells whether the last sample was altered."""

    kind: ClassVar[SimulatorKind]

    def __init__(self, rng: random.Random, *, spike_rate: float = 0.0) -> None:
        if not 0.0 <= spike_rate <= 1.0:
            raise ValueError(f"spike_rate must be within [0, 1], got {spike_rate}")
        self._rng = rng
        self._spike_rate = spike_rate
        # A stream of its own, so the undisturbed signal is the same whatever the spike rate.
        self._anomaly_rng = random.Random(rng.getrandbits(64))
        self.anomaly: Anomaly | None = None
        self._last_epoch: float | None = None

    def sample(self, at: datetime) -> dict[str, float]:
        """The readings at `at` (call in time order)."""
        epoch = _epoch_seconds(at)
        if self._last_epoch is None:
            dt_hours = 0.0
            self._last_epoch = epoch
        else:
            dt_hours = max(0.0, epoch - self._last_epoch) / _SECONDS_PER_HOUR
            self._last_epoch = max(self._last_epoch, epoch)
        hour_of_day = (epoch % 86400.0) / _SECONDS_PER_HOUR
        readings = self._advance(hour_of_day, dt_hours)
        self.anomaly = None
        if self._anomaly_rng.random() < self._spike_rate:
            self.anomaly = "spike"
            readings = self._spike(readings, self._anomaly_rng)
        return readings

    @abstractmethod
    def _advance(self, hour_of_day: float, dt_hours: float) -> dict[str, float]:
        """Move the state on by `dt_hours` and return the undisturbed readings."""

    @abstractmethod
    def _spike(self, readings: dict[str, float], rng: random.Random) -> dict[str, float]:
        """The readings with an injected spike."""


class _TemperatureModel:
    """Daily cycle (minimum near 04:00, maximum near 15:00) plus bounded drift and noise."""

    MAX_DRIFT = 3.0

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self.base = rng.uniform(18.0, 24.0)
        self._amplitude = rng.uniform(2.5, 5.0)
        # Devices sit at different longitudes, so their day is shifted against UTC.
        self._phase_hours = rng.uniform(-1.5, 1.5)
        self._drift = 0.0
        self._drift_per_sqrt_hour = 0.25

    def advance(self, hour_of_day: float, dt_hours: float) -> float:
        """The true temperature (without measurement noise) after `dt_hours`."""
        if dt_hours > 0:
            step = self._rng.gauss(0.0, self._drift_per_sqrt_hour * math.sqrt(dt_hours))
            # Mild pull back to zero, so the walk wanders instead of sitting at a bound.
            self._drift += step - self._drift * min(1.0, 0.02 * dt_hours)
            if abs(self._drift) > self.MAX_DRIFT:
                self._drift = math.copysign(2 * self.MAX_DRIFT - abs(self._drift), self._drift)
                self._drift = _clamp(self._drift, -self.MAX_DRIFT, self.MAX_DRIFT)
        return self.base + self._amplitude * self._daily(hour_of_day) + self._drift

    def _daily(self, hour_of_day: float) -> float:
        """-1 at 04:00, +1 at 15:00 (device-local), smooth in between."""
        hour = (hour_of_day + self._phase_hours) % 24.0
        if 4.0 <= hour < 15.0:
            return -math.cos(math.pi * (hour - 4.0) / 11.0)
        since_max = (hour - 15.0) % 24.0
        return math.cos(math.pi * since_max / 13.0)


class TemperatureSignal(Signal):
    """Air temperature in °C: daily cycle around a per-device base, drift and noise."""

    kind = "temperature"

    def __init__(self, rng: random.Random, *, spike_rate: float = 0.0) -> None:
        super().__init__(rng, spike_rate=spike_rate)
        self._model = _TemperatureModel(rng)
        self._noise = 0.15

    def _advance(self, hour_of_day: float, dt_hours: float) -> dict[str, float]:
        value = self._model.advance(hour_of_day, dt_hours) + self._rng.gauss(0.0, self._noise)
        return {"temperature": round(value, 2)}

    def _spike(self, readings: dict[str, float], rng: random.Random) -> dict[str, float]:
        return {**readings, "temperature": round(readings["temperature"] + rng.uniform(15, 30), 2)}


class HumiditySignal(Signal):
    """Relative humidity in %RH, falling as the room warms; also reports its temperature."""

    kind = "humidity"

    def __init__(self, rng: random.Random, *, spike_rate: float = 0.0) -> None:
        super().__init__(rng, spike_rate=spike_rate)
        self._temperature = _TemperatureModel(rng)
        self._base = rng.uniform(40.0, 60.0)
        self._per_degree = rng.uniform(2.0, 3.5)
        self._drift = 0.0

    def _advance(self, hour_of_day: float, dt_hours: float) -> dict[str, float]:
        temperature = self._temperature.advance(hour_of_day, dt_hours)
        if dt_hours > 0:
            step = self._rng.gauss(0.0, 0.5 * math.sqrt(dt_hours))
            self._drift = _clamp(self._drift + step, -5.0, 5.0)
        humidity = (
            self._base
            - self._per_degree * (temperature - self._temperature.base)
            + self._drift
            + self._rng.gauss(0.0, 0.4)
        )
        measured_temperature = temperature + self._rng.gauss(0.0, 0.15)
        return {
            "humidity": round(_clamp(humidity, 0.0, 100.0), 2),
            "temperature": round(measured_temperature, 2),
        }

    def _spike(self, readings: dict[str, float], rng: random.Random) -> dict[str, float]:
        spiked = _clamp(readings["humidity"] + rng.uniform(20, 40), 0.0, 100.0)
        return {**readings, "humidity": round(spiked, 2)}


class PowerMeterSignal(Signal):
    """A household meter: voltage, current, power factor, active power and an energy counter."""

    kind = "power_meter"

    def __init__(self, rng: random.Random, *, spike_rate: float = 0.0) -> None:
        super().__init__(rng, spike_rate=spike_rate)
        self._voltage_offset = rng.uniform(-4.0, 4.0)
        self._base_load = rng.uniform(0.3, 1.2)
        self._morning_peak = rng.uniform(2.0, 6.0)
        self._daytime_load = rng.uniform(0.5, 3.0)
        self._evening_peak = rng.uniform(3.0, 10.0)
        self._phase_hours = rng.uniform(-1.5, 1.5)
        self._power_factor = rng.uniform(0.85, 0.97)
        self._energy_kwh = rng.uniform(100.0, 50_000.0)
        self._last_power_w: float | None = None

    def _load(self, hour: float) -> float:
        def bump(center: float, width: float) -> float:
            return math.exp(-0.5 * (_circular_distance(hour, center) / width) ** 2)

        return (
            self._base_load
            + self._morning_peak * bump(7.5, 1.0)
            + self._daytime_load * bump(13.5, 2.5)
            + self._evening_peak * bump(19.5, 1.5)
        )

    def _advance(self, hour_of_day: float, dt_hours: float) -> dict[str, float]:
        hour = (hour_of_day + self._phase_hours) % 24.0
        rng = self._rng
        current = max(0.0, self._load(hour) * (1.0 + rng.gauss(0.0, 0.05)))
        # The grid sags a little under load; EN 50160 keeps it within 230 V ± 10 %.
        voltage = _clamp(
            230.0 + self._voltage_offset - 0.15 * current + rng.gauss(0.0, 0.8), 207.0, 253.0
        )
        # Light loads are mostly electronics, whose power factor is worse.
        power_factor = _clamp(
            self._power_factor - 0.08 * math.exp(-current) + rng.gauss(0.0, 0.01), 0.7, 1.0
        )
        # Round first, so that the published numbers agree: active_power = V * I * pf.
        voltage, current, power_factor = (
            round(voltage, 2),
            round(current, 3),
            round(power_factor, 3),
        )
        power = round(voltage * current * power_factor, 2)
        if self._last_power_w is not None:
            # Trapezoid rule between the two samples; dt is never negative.
            self._energy_kwh += (self._last_power_w + power) / 2.0 * dt_hours / 1000.0
        self._last_power_w = power
        return {
            "voltage": voltage,
            "current": current,
            "power_factor": power_factor,
            "active_power": power,
            "energy_kwh": round(self._energy_kwh, 6),
        }

    def _spike(self, readings: dict[str, float], rng: random.Random) -> dict[str, float]:
        # A momentary surge in the reading; the counter keeps integrating the real load.
        factor = 3.0
        return {
            **readings,
            "current": round(readings["current"] * factor, 3),
            "active_power": round(readings["active_power"] * factor, 2),
        }


SIGNAL_CLASSES: dict[SimulatorKind, type[Signal]] = {
    "temperature": TemperatureSignal,
    "humidity": HumiditySignal,
    "power_meter": PowerMeterSignal,
}


def make_signal(kind: SimulatorKind, rng: random.Random, *, spike_rate: float = 0.0) -> Signal:
    """The signal of one simulated device of `kind`."""
    return SIGNAL_CLASSES[kind](rng, spike_rate=spike_rate)
