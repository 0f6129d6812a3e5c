"""The enabled rules, the channels and the registry's devices, as the alert sink needs them:
read once, kept in memory, read again when the API changes them (`invalidate`) or after
`TTL_S` (changes made by another process). No query per message."""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select

from iotmeter.alerting.evaluate import Rule
from iotmeter.alerting.outbox import wants
from iotmeter.db.engine import Database
from iotmeter.db.models import AlertRule, Device, NotificationChannel

TTL_S = 30.0


def rule_of(row: Any) -> Rule:
    """A rule from an `AlertRule` or a row of its table."""
    return Rule(
        id=row.id,
        name=row.name,
        kind=row.kind,
        device_id=row.device_id,
        device_type=row.device_type,
        field=row.field,
        operator=row.operator,
        threshold=row.threshold,
        low=row.low,
        high=row.high,
        hysteresis=row.hysteresis,
        duration_s=row.duration_s,
        timeout_s=row.timeout_s,
        k=row.k,
        half_life=row.half_life,
        warmup=row.warmup,
        flap_window_s=row.flap_window_s,
        severity=row.severity,
        message=row.message,
        enabled=row.enabled,
        created_at_us=round(row.created_at.timestamp() * 1_000_000),
    )


@dataclass(frozen=True, slots=True)
class Channel:
    id: int
    kind: str
    url: str | None
    secret: str | None
    topic: str | None
    min_severity: str
    rule_ids: frozenset[int] | None

    def wants(self, rule: Rule) -> bool:
        return wants(self.min_severity, self.rule_ids, rule.severity, rule.id)


@dataclass(slots=True)
class DeviceRules:
    """The rules that apply to one device, by field."""

    by_field: dict[str, list[Rule]] = field(default_factory=dict)
    no_data: list[Rule] = field(default_factory=list)


@dataclass(slots=True)
class Snapshot:
    rules: list[Rule]
    channels: list[Channel]
    devices: dict[str, str]
    """Registered device id -> type (for the scopes of `no_data` rules)."""
    _per_device: dict[tuple[str, str], DeviceRules] = field(default_factory=dict)

    def for_device(self, device_id: str, device_type: str) -> DeviceRules:
        key = (device_id, device_type)
        found = self._per_device.get(key)
        if found is None:
            by_field: defaultdict[str, list[Rule]] = defaultdict(list)
            no_data = []
            for rule in self.rules:
                if not rule.applies_to(device_id, device_type):
                    continue
                if rule.kind == "no_data":
                    no_data.append(rule)
                elif rule.field is not None:
                    by_field[rule.field].append(rule)
            found = self._per_device[key] = DeviceRules(dict(by_field), no_data)
        return found

    def channels_for(self, rule: Rule) -> list[Channel]:
        return [channel for channel in self.channels if channel.wants(rule)]


class RuleBook:
    def __init__(self, database: Database) -> None:
        self.database = database
        self._snapshot: Snapshot | None = None
        self._read_at = 0.0
        self._generation = 0

    def invalidate(self, *_args: object) -> None:
        """Rules, channels or devices changed: read them again before the next use."""
        self._snapshot = None
        self._generation += 1

    async def snapshot(self) -> Snapshot:
        while self._snapshot is None or time.monotonic() - self._read_at > TTL_S:
            generation = self._generation
            read_at = time.monotonic()
            snapshot = await self._read()
            if generation == self._generation:  # no change was committed during the read
                self._snapshot, self._read_at = snapshot, read_at
            else:
                self._snapshot = None
        return self._snapshot

    async def _read(self) -> Snapshot:
        async with self.database.reader() as connection:
            rules_table, channels_table = AlertRule.__table__, NotificationChannel.__table__
            rule_rows = (
                await connection.execute(select(rules_table).where(rules_table.c.enabled.is_(True)))
            ).all()
            channel_rows = (
                await connection.execute(
                    select(channels_table).where(channels_table.c.enabled.is_(True))
                )
            ).all()
            rules = [rule_of(row) for row in rule_rows]
            devices: dict[str, str] = {}
            if any(rule.kind == "no_data" for rule in rules):
                rows = await connection.execute(select(Device.id, Device.type))
                devices = {str(device_id): str(kind) for device_id, kind in rows}
        channels = [
            Channel(
                id=row.id,
                kind=row.kind,
                url=row.url,
                secret=row.secret,
                topic=row.topic,
                min_severity=row.min_severity,
                rule_ids=frozenset(row.rule_ids) if row.rule_ids is not None else None,
            )
            for row in channel_rows
        ]
        return Snapshot(rules, channels, devices)
