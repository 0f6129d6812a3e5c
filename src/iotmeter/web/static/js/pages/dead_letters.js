// Dead letters: messages the collector refused, newest first, with the reason, the topic, a
// preview of the payload and the API's sentence saying what to fix (`detail`).

import { api } from "../api.js";
import {
  button,
  createPager,
  download,
  emptyRow,
  field,
  h,
  select,
  tableWrap,
  timeElement,
} from "../dom.js";

const PAGE_SIZE = 50;
/** `iotmeter.readings.RejectReason`: the reasons the `reason` filter takes. */
const REASONS = [
  "not_utf8",
  "not_json",
  "too_large",
  "too_deep",
  "not_object",
  "no_readings",
  "not_finite",
  "bad_value_type",
  "bad_field_name",
  "bad_timestamp",
  "future_timestamp",
  "device_mismatch",
  "bad_topic",
  "bad_attribute",
  "missing_timestamp",
  "too_many_fields",
  "unknown_device",
  "device_limit",
  "series_limit",
  "refused_by_store",
  "sink_failed",
  "bad_reported_config",
  "bad_status",
  "internal_error",
];

function sizeText(bytes) {
  if (bytes < 1024) return `${bytes} B`;
  if (bytes < 1024 * 1024) return `${(bytes / 1024).toFixed(1)} KiB`;
  return `${(bytes / 1024 / 1024).toFixed(1)} MiB`;
}

export async function render(ctx) {
  ctx.title("Dead letters");
  const state = {
    reason: ctx.query.get("reason") ?? "",
    offset: Math.max(0, Number.parseInt(ctx.query.get("offset") ?? "0", 10) || 0),
  };
  const reasons =
    REASONS.includes(state.reason) || !state.reason ? REASONS : [...REASONS, state.reason];
  const reasonSelect = select(
    [["", "All reasons"], ...reasons.map((name) => [name, name])],
    state.reason,
  );
  const tbody = h("tbody");
  const headers = ["Received", "Reason", "Device", "Topic", "Payload", "What to fix"];
  const lettersTable = h(
    "table",
    { class: "dead-letters" },
    h(
      "thead",
      {},
      h(
        "tr",
        {},
        headers.map((text) => h("th", { scope: "col", text })),
      ),
    ),
    tbody,
  );
  const pages = createPager("Dead letter pages", (offset) => {
    state.offset = offset;
    syncQuery();
    load();
  });
  ctx.root.append(
    h("div", { class: "toolbar", role: "search" }, field("Reason", reasonSelect)),
    tableWrap(lettersTable, "Dead letters"),
    pages.element,
  );

  function syncQuery() {
    ctx.setQuery({ reason: state.reason, offset: state.offset || null });
  }

  async function downloadPayload(letter) {
    try {
      const blob = await api.get(
        `/dead-letters/${letter.id}/payload`,
        {},
        { signal: ctx.signal, as: "blob" },
      );
      download(blob, `dead-letter-${letter.id}.bin`);
    } catch (error) {
      ctx.fail(error);
    }
  }

  function payloadCell(letter) {
    const note = [
      letter.payload_encoding === "base64" ? "not UTF-8, shown as base64" : null,
      sizeText(letter.payload_size),
      letter.payload_truncated ? `only the first ${sizeText(letter.payload_stored)} kept` : null,
    ]
      .filter(Boolean)
      .join(", ");
    return h(
      "td",
      {},
      h("code", { class: "payload", text: letter.payload_preview || "(empty)" }),
      h(
        "div",
        { class: "payload-meta" },
        h("span", { class: "muted", text: note }),
        button("Download", () => downloadPayload(letter), {
          class: "small quiet",
          "aria-label": `Download the payload of dead letter ${letter.id}`,
        }),
      ),
    );
  }

  function row(letter) {
    return h(
      "tr",
      {},
      h("td", { class: "nowrap" }, timeElement(letter.received_at)),
      h("td", {}, h("span", { class: "badge badge-warn", text: letter.reason })),
      h(
        "td",
        { class: "wrap-anywhere" },
        letter.device_id
          ? h("a", {
              href: `#/devices/${encodeURIComponent(letter.device_id)}`,
              text: letter.device_id,
            })
          : h("span", { class: "muted", text: "—" }),
      ),
      h("td", { class: "topic" }, h("code", { class: "wrap-anywhere", text: letter.topic })),
      payloadCell(letter),
      h("td", { class: "fix", text: letter.detail }),
    );
  }

  async function load() {
    lettersTable.setAttribute("aria-busy", "true");
    try {
      const page = await api.get(
        "/dead-letters",
        { reason: state.reason, limit: PAGE_SIZE, offset: state.offset },
        { signal: ctx.signal },
      );
      ctx.clearError();
      tbody.replaceChildren(
        ...(page.items.length
          ? page.items.map(row)
          : [emptyRow(headers.length, "No dead letters.")]),
      );
      pages.update({
        offset: page.offset,
        limit: PAGE_SIZE,
        total: page.total,
        shown: page.items.length,
      });
    } catch (error) {
      ctx.fail(error);
    } finally {
      lettersTable.removeAttribute("aria-busy");
    }
  }

  reasonSelect.addEventListener("change", () => {
    state.reason = reasonSelect.value;
    state.offset = 0;
    syncQuery();
    load();
  });

  await load();
}
