"""The dead-letters page tells why a message was refused and what the sender should fix."""

from __future__ import annotations

from typing import Any

from playwright.async_api import expect

from tests.browser.conftest import Browsing, Dashboard, unique
from tests.fixtures.waiting import eventually


async def test_a_bad_payload_shows_its_reason_and_what_to_fix(
    dashboard: Dashboard, browsing: Browsing
) -> None:
    device = unique("garbled")
    payload = f"temperature=21.5 from {device}".encode()  # not JSON
    await dashboard.publish(device, payload)
    letters: dict[str, Any] = await eventually(
        lambda: dashboard.get_json("/api/v1/dead-letters", device_id=device),
        lambda body: body["total"] == 1,
        within=10,
        what="the dead letter stored",
    )
    letter = letters["items"][0]
    assert letter["reason"] == "not_json"

    page = await browsing.open(dashboard, "#/dead-letters", key=dashboard.viewer_key)
    await expect(page.get_by_role("heading", level=1)).to_have_text("Dead letters")
    headers = page.get_by_role("columnheader")
    for name in ("Reason", "Topic", "Payload", "What to fix"):
        await expect(headers.filter(has_text=name)).to_have_count(1)
    row = page.get_by_role("row").filter(has_text=f"iot/{device}/telemetry")
    await expect(row).to_have_count(1)
    texts = await row.get_by_role("cell").all_inner_texts()
    names = await headers.all_inner_texts()
    cells = dict(zip((name.strip() for name in names), texts, strict=False))
    assert "not_json" in cells["Reason"]
    assert payload.decode() in cells["Payload"]
    # The sentence the decoder wrote for the sender (its part after the diagnosis at least).
    advice = letter["detail"].rsplit(";", 1)[-1].strip()
    assert advice, letter
    assert advice in cells["What to fix"], (cells, letter["detail"])
