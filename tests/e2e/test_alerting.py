"""Alerting end to end: rules evaluated on MQTT messages through a real Mosquitto, alerts in
PostgreSQL or SQLite, Standard Webhooks delivered to a local receiver and verified with the
`standardwebhooks` library."""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from standardwebhooks import Webhook

from tests.e2e.conftest import start_app
from tests.e2e.test_ingest_e2e import publish
from tests.e2e.test_ingest_rules import app_settings
from tests.e2e.test_serve_options import self_signed
from tests.fixtures.receiver import Receiver, webhook_receiver
from tests.fixtures.services import Mosquitto
from tests.fixtures.waiting import eventually

RULES = "/api/v1/alert-rules"


def at(device: str, ms: int, **values: float) -> tuple[str, bytes]:
    return f"iot/{device}/telemetry", orjson.dumps({"ts": ms, "metrics": values})


async def rule(api: httpx.AsyncClient, **fields: Any) -> dict[str, Any]:
    created = await api.post(RULES, json={"name": "r", **fields})
    assert created.status_code == 201, created.text
    body: dict[str, Any] = created.json()
    return body


async def channel(api: httpx.AsyncClient, receiver: Receiver, path: str = "/hook") -> str:
    created = await api.post(
        "/api/v1/channels", json={"name": "hook", "kind": "webhook", "url": receiver.url(path)}
    )
    assert created.status_code == 201, created.text
    secret: str = created.json()["secret"]
    return secret


async def alerts_of(api: httpx.AsyncClient, rule_id: int) -> list[dict[str, Any]]:
    response = await api.get("/api/v1/alerts", params={"limit": 100})
    items: list[dict[str, Any]] = response.json()["items"]
    return sorted((a for a in items if a["rule_id"] == rule_id), key=lambda a: a["id"])


async def wait_for(receiver: Receiver, path: str, count: int, within: float = 15.0) -> None:
    deadline = time.monotonic() + within
    while len(receiver.at(path)) < count:
        assert time.monotonic() < deadline, (
            f"{count} webhook(s) at {path} not received; got {len(receiver.at(path))}"
        )
        await asyncio.sleep(0.05)


@pytest.fixture
async def receiver() -> Any:
    async with webhook_receiver() as found:
        yield found


async def test_a_threshold_rule_waits_its_duration_clears_with_hysteresis_and_signs_its_webhooks(
    database_url: str, tmp_path: Path, mosquitto: Mosquitto, receiver: Receiver
) -> None:
    settings = app_settings(database_url, tmp_path, mosquitto, webhook_allow_private=True)
    base = int(time.time() * 1000) - 600_000
    async with start_app(settings) as api:
        secret = await channel(api, receiver)
        made = await rule(
            api,
            kind="threshold",
            device_id="hot-1",
            field="t",
            operator=">",
            threshold=30.0,
            hysteresis=2.0,
            duration_s=60,
            severity="critical",
            message="{device} {field} at {value} ({threshold})",
        )
        publish(
            mosquitto.port,
            [
                at("hot-1", base, t=20.0),
                at("hot-1", base + 10_000, t=31.0),  # breach begins: pending
                at("hot-1", base + 40_000, t=29.0),  # back under: pending forgotten
                at("hot-1", base + 50_000, t=32.0),  # pending again
                at("hot-1", base + 100_000, t=35.0),  # 50 s: still pending
                at("hot-1", base + 110_000, t=33.0),  # 60 s: fires, value 33
                at("hot-1", base + 120_000, t=36.5),  # extreme
                at("hot-1", base + 130_000, t=29.5),  # under 30 but not 2 below: stays open
            ],
        )
        await wait_for(receiver, "/hook", 1)
        alerts = await alerts_of(api, made["id"])
        assert len(alerts) == 1
        alert = alerts[0]
        assert alert["status"] == "active"
        assert alert["severity"] == "critical"
        assert alert["value"] == 33.0
        assert alert["message"] == "hot-1 t at 33 (> 30)"
        assert alert["first_breach_at"].startswith(
            time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime((base + 50_000) / 1000))
        )
        fired = receiver.at("/hook")[0]
        # Verified as any receiver would, with the Standard Webhooks library.
        payload = Webhook(secret).verify(fired.body, fired.headers)
        assert payload["type"] == "alert.fired"
        assert payload["data"]["alert_id"] == alert["id"]
        assert fired.headers["webhook-id"].startswith("msg_")
        with pytest.raises(Exception, match="signature"):
            Webhook(secret).verify(fired.body.replace(b"33", b"34"), fired.headers)
        publish(mosquitto.port, [at("hot-1", base + 140_000, t=27.9)])  # 2.1 below: clears
        await wait_for(receiver, "/hook", 2)
        resolved = Webhook(secret).verify(
            receiver.at("/hook")[1].body, receiver.at("/hook")[1].headers
        )
        assert resolved["type"] == "alert.resolved"
        alert = (await alerts_of(api, made["id"]))[0]
        assert alert["status"] == "resolved"
        assert alert["extreme_value"] == 36.5
        assert alert["breach_count"] >= 4
        # A late reading from before the alert, breaching, opens nothing.
        publish(mosquitto.port, [at("hot-1", base + 115_000, t=99.0)])
        stats = await eventually(
            lambda: api.get("/api/v1/stats"),
            lambda r: r.json()["alerting"]["late_readings_skipped"] == 1,
            what="the late reading counted as skipped",
        )
        alerting = stats.json()["alerting"]
        assert alerting["rules_enabled"] == 1
        assert alerting["notifications_by_status"] == {"delivered": 2}
        assert alerting["evaluated_events"] >= 2
        assert len(await alerts_of(api, made["id"])) == 1
        assert len(receiver.at("/hook")) == 2


async def test_no_data_fires_on_the_clock_and_resolves_on_the_next_message(
    database_url: str, tmp_path: Path, mosquitto: Mosquitto, receiver: Receiver
) -> None:
    settings = app_settings(database_url, tmp_path, mosquitto, webhook_allow_private=True)
    async with start_app(settings) as api:
        await channel(api, receiver)
        created = await api.post(
            "/api/v1/devices", json={"id": "quiet-1", "name": "q", "type": "m"}
        )
        assert created.status_code == 201
        made = await rule(api, kind="no_data", device_type="m", timeout_s=2, severity="warning")
        now_ms = int(time.time() * 1000)
        publish(mosquitto.port, [at("quiet-1", now_ms, t=1.0)])
        await wait_for(receiver, "/hook", 1, within=20)
        payload = receiver.at("/hook")[0].json
        assert payload["type"] == "alert.fired"
        assert payload["data"]["device_id"] == "quiet-1"
        publish(mosquitto.port, [at("quiet-1", int(time.time() * 1000), t=2.0)])
        await wait_for(receiver, "/hook", 2)
        assert receiver.at("/hook")[1].json["type"] == "alert.resolved"
        alerts = await alerts_of(api, made["id"])
        assert [a["status"] for a in alerts] == ["resolved"]


async def test_rate_of_change_and_anomaly_rules_fire_on_what_they_watch(
    database_url: str, tmp_path: Path, mosquitto: Mosquitto
) -> None:
    settings = app_settings(database_url, tmp_path, mosquitto)
    base = int(time.time() * 1000) - 3_600_000
    async with start_app(settings) as api:
        falling = await rule(
            api, kind="rate_of_change", device_id="rc-1", field="t", operator="<", threshold=-5.0
        )
        odd = await rule(
            api, kind="anomaly", device_id="an-1", field="p", k=4.0, half_life=20, warmup=30
        )
        messages = [at("rc-1", base + i * 60_000, t=20.0 - i) for i in range(5)]  # -1/min
        messages.append(at("rc-1", base + 5 * 60_000, t=5.0))  # -11/min: fires
        messages.append(at("rc-1", base + 6 * 60_000, t=4.5))  # -0.5/min: resolves
        messages += [
            at("an-1", base + i * 1000, p=100.0 + (i % 5) * 0.5) for i in range(60)
        ]  # steady around 101
        messages.append(at("an-1", base + 61_000, p=180.0))  # far outside
        messages.append(at("an-1", base + 62_000, p=101.0))  # back: resolves
        publish(mosquitto.port, messages)
        rate_alerts = await eventually(
            lambda: alerts_of(api, falling["id"]),
            lambda found: len(found) == 1 and found[0]["status"] == "resolved",
            what="the rate-of-change alert fired and resolved",
        )
        assert rate_alerts[0]["value"] == pytest.approx(-11.0)
        anomaly_alerts = await eventually(
            lambda: alerts_of(api, odd["id"]),
            lambda found: len(found) == 1 and found[0]["status"] == "resolved",
            what="the anomaly alert fired and resolved",
        )
        assert anomaly_alerts[0]["value"] == 180.0


@pytest.mark.parametrize(
    "body",
    [
        {"kind": "bogus", "field": "t"},
        {"kind": "threshold", "field": "t", "operator": "outside", "low": 5.0, "high": 1.0},
        {"kind": "threshold", "field": "t", "operator": ">", "threshold": 1.0, "duration_s": -1},
        {"kind": "threshold", "field": "_t", "operator": ">", "threshold": 1.0},
        {"kind": "threshold", "operator": ">", "threshold": 1.0},
        {"kind": "threshold", "field": "t", "operator": ">"},
        {"kind": "no_data"},
        {"kind": "anomaly", "field": "t", "k": 3.0},
        {"kind": "threshold", "field": "t", "operator": ">", "threshold": False},
        {
            "kind": "threshold",
            "field": "t",
            "operator": ">",
            "threshold": 1,
            "device_id": "a",
            "device_type": "m",
        },
    ],
)
async def test_a_bad_rule_is_refused_with_what_to_fix(
    api: httpx.AsyncClient, body: dict[str, Any]
) -> None:
    response = await api.post(RULES, json={"name": "bad", **body})
    assert response.status_code in (400, 422), response.text
    assert response.json()["error"]["message"]


async def test_a_webhook_to_an_internal_address_is_refused(api: httpx.AsyncClient) -> None:
    for url in (
        "http://127.0.0.1:9/x",
        "http://localhost/x",
        "http://169.254.169.254/latest",
        "http://[::1]/x",
        "ftp://example.com/x",
    ):
        response = await api.post(
            "/api/v1/channels", json={"name": "h", "kind": "webhook", "url": url}
        )
        assert response.status_code == 400, (url, response.text)
        assert response.json()["error"]["message"]


async def test_a_failing_receiver_is_retried_and_a_hanging_one_blocks_no_other(
    database_url: str, tmp_path: Path, mosquitto: Mosquitto, receiver: Receiver
) -> None:
    settings = app_settings(database_url, tmp_path, mosquitto, webhook_allow_private=True)
    receiver.statuses["/flaky"] = [500]
    receiver.hang_paths.add("/hang")
    async with start_app(settings) as api:
        await channel(api, receiver, "/hang")
        await channel(api, receiver, "/flaky")
        await channel(api, receiver, "/good")
        made = await rule(
            api, kind="threshold", device_id="w-1", field="t", operator=">", threshold=1.0
        )
        publish(mosquitto.port, [at("w-1", int(time.time() * 1000), t=5.0)])
        await wait_for(receiver, "/good", 1)
        await wait_for(receiver, "/flaky", 2, within=30)  # 500, then 200 after a backoff
        first, second = receiver.at("/flaky")
        assert first.headers["webhook-id"] == second.headers["webhook-id"]
        # The outcome is recorded once the receiver has answered: wait for it.
        listed = await eventually(
            lambda: api.get("/api/v1/notifications", params={"status": "delivered"}),
            lambda r: any(n["event_id"] == first.headers["webhook-id"] for n in r.json()["items"]),
            what="the flaky receiver's notification recorded as delivered",
        )
        flaky = [n for n in listed.json()["items"] if n["event_id"] == first.headers["webhook-id"]]
        assert len(flaky) == 1
        detail = (await api.get(f"/api/v1/notifications/{flaky[0]['id']}")).json()
        assert [h["status_code"] for h in detail["history"]] == [500, 200]
        assert len(detail["history"][0]["response"]) <= 1024
        assert len(await alerts_of(api, made["id"])) == 1


async def test_the_simulators_spikes_and_dropouts_drive_threshold_and_offline_alerts(
    database_url: str, tmp_path: Path, mosquitto: Mosquitto
) -> None:
    """The in-process simulator, as a user would run it: spikes (+15..30 degrees) fire a
    threshold rule and the next normal reading resolves it; dropped messages leave gaps that
    fire a no_data rule, and the next message resolves it."""
    settings = app_settings(
        database_url,
        tmp_path,
        mosquitto,
        simulator_enabled=True,
        simulator_devices=2,
        simulator_kinds=["temperature"],
        simulator_interval_s=0.1,
        simulator_jitter=0.0,
        simulator_spike_rate=0.2,
        simulator_dropout_rate=0.85,
    )
    async with start_app(settings) as api:
        latest = await eventually(
            lambda: api.get("/api/v1/devices/sim-temperature-0001/latest"),
            lambda r: r.status_code == 200 and "temperature" in r.json()["fields"],
            what="the simulator's first reading",
        )
        normal = latest.json()["fields"]["temperature"]["value"]
        hot = await rule(
            api,
            kind="threshold",
            device_type="temperature",
            field="temperature",
            operator=">",
            threshold=normal + 10.0,
        )
        quiet = await rule(api, kind="no_data", device_type="temperature", timeout_s=1)
        await eventually(
            lambda: alerts_of(api, hot["id"]),
            lambda found: any(a["status"] == "resolved" for a in found),
            within=60,
            what="a spike fired the threshold rule and a normal reading resolved it",
        )
        await eventually(
            lambda: alerts_of(api, quiet["id"]),
            lambda found: any(a["status"] == "resolved" for a in found),
            within=60,
            what="a gap fired the no_data rule and the next message resolved it",
        )
        for alert in await alerts_of(api, hot["id"]):
            assert alert["value"] > normal + 10.0


async def test_a_person_raising_acknowledging_and_resolving_an_alert_is_notified(
    database_url: str, tmp_path: Path, mosquitto: Mosquitto, receiver: Receiver
) -> None:
    settings = app_settings(database_url, tmp_path, mosquitto, webhook_allow_private=True)
    async with start_app(settings) as api:
        secret = await channel(api, receiver)
        quiet = await api.post(
            "/api/v1/channels",
            json={
                "name": "crit",
                "kind": "webhook",
                "url": receiver.url("/crit"),
                "min_severity": "critical",
            },
        )
        assert quiet.status_code == 201
        await api.post("/api/v1/devices", json={"id": "man-1", "name": "m", "type": "m"})
        raised = await api.post(
            "/api/v1/alerts",
            json={"device_id": "man-1", "severity": "warning", "message": "door open"},
        )
        assert raised.status_code == 201, raised.text
        alert_id = raised.json()["id"]
        assert (await api.post(f"/api/v1/alerts/{alert_id}/acknowledge")).status_code == 200
        assert (await api.post(f"/api/v1/alerts/{alert_id}/resolve")).status_code == 200
        await wait_for(receiver, "/hook", 3)
        events = [Webhook(secret).verify(r.body, r.headers) for r in receiver.at("/hook")]
        # Delivered concurrently (each in its own task): receivers order by the event's time.
        assert sorted(e["type"] for e in events) == [
            "alert.acknowledged",
            "alert.fired",
            "alert.resolved",
        ]
        assert {e["data"]["alert_id"] for e in events} == {alert_id}
        assert receiver.at("/crit") == []  # a warning is below that channel's severity


async def test_a_buffer_flushed_after_an_outage_notifies_a_cleared_breach_once_as_resolved(
    database_url: str, tmp_path: Path, mosquitto: Mosquitto, receiver: Receiver
) -> None:
    """A device back online sends its buffer in one message: a breach that began and cleared
    inside it is recorded with its device times and notified once, as `alert.resolved` with
    `late: true`, never as a new `alert.fired`."""
    settings = app_settings(database_url, tmp_path, mosquitto, webhook_allow_private=True)
    base = int(time.time() * 1000) - 3_600_000
    async with start_app(settings) as api:
        secret = await channel(api, receiver)
        made = await rule(
            api, kind="threshold", device_id="buf-1", field="t", operator=">", threshold=30.0
        )
        buffer = [
            {"ts": base + i * 60_000, "metrics": {"t": value}}
            for i, value in enumerate([20.0, 31.0, 35.0, 25.0, 22.0])
        ]
        publish(mosquitto.port, [("iot/buf-1/telemetry", orjson.dumps(buffer))])
        await wait_for(receiver, "/hook", 1)
        await asyncio.sleep(1.5)  # nothing else comes
        assert len(receiver.at("/hook")) == 1
        event = Webhook(secret).verify(
            receiver.at("/hook")[0].body, receiver.at("/hook")[0].headers
        )
        assert event["type"] == "alert.resolved"
        assert event["data"]["late"] is True
        assert event["data"]["extreme_value"] == 35.0
        (alert,) = await alerts_of(api, made["id"])
        assert alert["status"] == "resolved"
        assert alert["breach_count"] == 2
        assert alert["first_breach_at"].startswith(
            time.strftime("%Y-%m-%dT%H:%M", time.gmtime((base + 60_000) / 1000))
        )


@pytest.mark.parametrize("security", ["plain", "starttls"])
async def test_an_email_channel_sends_one_mail_per_event_through_a_local_smtp_server(
    database_url: str, tmp_path: Path, mosquitto: Mosquitto, security: str
) -> None:
    """A real SMTP conversation with aiosmtpd on a free loopback port: in the clear, and with
    STARTTLS required by both sides, the server's certificate checked against a CA file."""
    from aiosmtpd.controller import Controller

    class Inbox:
        def __init__(self) -> None:
            self.mails: list[tuple[str, list[str], str]] = []

        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
            self.mails.append(
                (envelope.mail_from, list(envelope.rcpt_tos), envelope.content.decode())
            )
            return "250 OK"

    inbox = Inbox()
    with socket.socket() as probe:  # a free port (the controller checks it by connecting)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    tls: dict[str, Any] = {}
    smtp: dict[str, Any] = {"smtp_url": f"smtp://127.0.0.1:{port}"}
    if security == "starttls":
        cert, key = self_signed(tmp_path)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert, key)
        tls = {"tls_context": context, "require_starttls": True}
        smtp = {"smtp_url": f"smtp://127.0.0.1:{port}?starttls=required", "smtp_ca_file": cert}
    controller = Controller(inbox, hostname="127.0.0.1", port=port, **tls)
    controller.start()
    try:
        settings = app_settings(
            database_url,
            tmp_path,
            mosquitto,
            smtp_from="alerts@iotmeter.test",
            public_url="https://iot.example.com",
            **smtp,
        )
        async with start_app(settings) as api:
            created = await api.post(
                "/api/v1/channels",
                json={"name": "ops", "kind": "email", "email_to": ["ops@example.com"]},
            )
            assert created.status_code == 201, created.text
            bad = await api.post(
                "/api/v1/channels",
                json={"name": "x", "kind": "email", "email_to": ["not an address"]},
            )
            assert bad.status_code == 422
            made = await rule(
                api,
                kind="threshold",
                device_id="mail-1",
                field="t",
                operator=">",
                threshold=30.0,
                severity="critical",
                message="{device} too warm: {value}",
            )
            now = int(time.time() * 1000)
            publish(mosquitto.port, [at("mail-1", now, t=35.0), at("mail-1", now + 1, t=20.0)])
            await eventually(
                lambda: asyncio.sleep(0, len(inbox.mails)),
                lambda count: count >= 2,
                what="two mails: fired and resolved",
            )
            (alert,) = await alerts_of(api, made["id"])
        sender, recipients, content = inbox.mails[0]
        assert sender == "alerts@iotmeter.test"
        assert recipients == ["ops@example.com"]
        assert "Subject: [iotmeter CRITICAL]" in content
        assert "mail-1 too warm: 35" in content
        assert f"https://iot.example.com/api/v1/alerts/{alert['id']}" in content
        subjects = sorted(mail[2].split("Subject: ")[1].split(":")[0] for mail in inbox.mails)
        assert subjects == ["[iotmeter CRITICAL] fired", "[iotmeter CRITICAL] resolved"]
    finally:
        controller.stop()


async def test_an_mqtt_channel_publishes_the_event_on_the_devices_alert_topic(
    database_url: str, tmp_path: Path, mosquitto: Mosquitto
) -> None:
    import paho.mqtt.client as mqtt

    received: list[tuple[str, bytes]] = []
    listener = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="alert-listener")
    listener.on_message = lambda _c, _u, message: received.append((message.topic, message.payload))
    listener.connect("127.0.0.1", mosquitto.port)
    listener.subscribe("iot/+/alerts", qos=1)
    listener.loop_start()
    try:
        settings = app_settings(database_url, tmp_path, mosquitto)
        async with start_app(settings) as api:
            created = await api.post(
                "/api/v1/channels",
                json={"name": "siren", "kind": "mqtt", "topic": "iot/{device_id}/alerts"},
            )
            assert created.status_code == 201, created.text
            await rule(
                api, kind="threshold", device_id="mq-1", field="t", operator=">", threshold=1.0
            )
            publish(mosquitto.port, [at("mq-1", int(time.time() * 1000), t=5.0)])
            await eventually(
                lambda: asyncio.sleep(0, len(received)),
                lambda count: count >= 1,
                what="the alert on iot/mq-1/alerts",
            )
        topic, payload = received[0]
        assert topic == "iot/mq-1/alerts"
        event = orjson.loads(payload)
        assert event["type"] == "alert.fired"
        assert event["data"]["device_id"] == "mq-1"
    finally:
        listener.loop_stop()
        listener.disconnect()


async def test_a_channel_test_event_is_delivered_and_its_attempts_listed(
    database_url: str, tmp_path: Path, mosquitto: Mosquitto, receiver: Receiver
) -> None:
    settings = app_settings(database_url, tmp_path, mosquitto, webhook_allow_private=True)
    async with start_app(settings) as api:
        secret = await channel(api, receiver)
        channels = (await api.get("/api/v1/channels")).json()
        sent = await api.post(f"/api/v1/channels/{channels[0]['id']}/test")
        assert sent.status_code == 202, sent.text
        await wait_for(receiver, "/hook", 1)
        event = Webhook(secret).verify(
            receiver.at("/hook")[0].body, receiver.at("/hook")[0].headers
        )
        assert event["type"] == "alert.test"
        detail = await eventually(
            lambda: api.get(f"/api/v1/notifications/{sent.json()['id']}"),
            lambda r: r.json()["status"] == "delivered",
            what="the test event recorded as delivered",
        )
        (attempt,) = detail.json()["history"]
        assert attempt["status_code"] == 200
        assert attempt["latency_ms"] > 0
        assert "secret" not in channels[0]
        again = await api.post(f"/api/v1/notifications/{sent.json()['id']}/retry")
        assert again.status_code == 409  # delivered already


async def test_a_change_that_would_break_a_rule_is_refused_and_changes_nothing(
    api: httpx.AsyncClient,
) -> None:
    made = await rule(
        api, kind="threshold", field="t", operator="outside", low=1.0, high=5.0, duration_s=10
    )
    broken = await api.patch(f"{RULES}/{made['id']}", json={"low": 9.0})
    assert broken.status_code == 422, broken.text
    assert "low (9) is above high (5)" in broken.json()["error"]["message"]
    changed = await api.patch(f"{RULES}/{made['id']}", json={"high": 12.5, "enabled": False})
    assert changed.status_code == 200
    current = (await api.get(f"{RULES}/{made['id']}")).json()
    assert (current["low"], current["high"], current["enabled"]) == (1.0, 12.5, False)
