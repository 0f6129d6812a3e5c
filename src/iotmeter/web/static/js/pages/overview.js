// Overview: device counts, the live ingest rate, rejected messages by reason, spool and sink
// lag, active alerts. GET /stats every 10 s; the live stream's `stats` events every 2 s.

import { api } from "../api.js";
import {
  agoElement,
  emptyRow,
  formatCount,
  h,
  refreshAgo,
  severityBadge,
  table,
  tableWrap,
} from "../dom.js";

const REFRESH_MS = 10_000;
const SEVERITIES = ["critical", "warning", "info"];

function statCard(label, testId, unit) {
  const value = h("span", { class: "stat-value", dataset: { testid: testId }, text: "—" });
  const note = h("p", { class: "stat-note" });
  const card = h(
    "div",
    { class: "card stat" },
    h("p", { class: "stat-label", text: label }),
    h("div", {}, value, unit ? h("span", { class: "stat-unit", text: unit }) : null),
    note,
  );
  return { card, value, note };
}

export async function render(ctx) {
  ctx.title("Overview");
  const total = statCard("Devices", "devices-total");
  const online = statCard("Online", "devices-online");
  const rate = statCard("Ingest rate", "ingest-rate", "readings/s");
  const spool = statCard("Spool depth", "spool-depth", "messages");
  const alerts = statCard("Active alerts", "alerts-active");

  const byType = h("ul", { class: "plain-list", dataset: { testid: "devices-by-type" } });
  const rejectedBody = h("tbody");
  const rejected = h(
    "table",
    { dataset: { testid: "rejected-by-reason" } },
    h(
      "caption",
      {},
      "Refused messages are kept with the reason in the ",
      h("a", { href: "#/dead-letters", text: "Dead letters" }),
      ".",
    ),
    h(
      "thead",
      {},
      h(
        "tr",
        {},
        h("th", { scope: "col", text: "Reason" }),
        h("th", { scope: "col", class: "num", text: "Messages" }),
      ),
    ),
    rejectedBody,
  );
  const sinksBody = h("tbody");
  const sinks = table(["Sink", "Lag (records)", "State"], [], {});
  sinks.tBodies[0].replaceWith(sinksBody);
  const messages = h("dl", { class: "facts" });

  ctx.root.append(
    h("div", { class: "cards" }, total.card, online.card, rate.card, spool.card, alerts.card),
    h(
      "div",
      { class: "grid-2" },
      h(
        "section",
        { class: "card", "aria-labelledby": "by-type-heading" },
        h("h2", { id: "by-type-heading", text: "Devices by type" }),
        byType,
      ),
      h(
        "section",
        { class: "card", "aria-labelledby": "rejected-heading" },
        h("h2", { id: "rejected-heading", text: "Rejected messages by reason" }),
        tableWrap(rejected, "Rejected messages by reason"),
      ),
    ),
    h(
      "div",
      { class: "grid-2" },
      h(
        "section",
        { class: "card", "aria-labelledby": "messages-heading" },
        h("h2", { id: "messages-heading", text: "Messages since start" }),
        messages,
      ),
      h(
        "section",
        { class: "card", "aria-labelledby": "sinks-heading" },
        h("h2", { id: "sinks-heading", text: "Spool and sinks" }),
        tableWrap(sinks, "Sink lag"),
      ),
    ),
  );

  let lastStats = null;

  function showMessages(received, stored, rejectedCount, lastAt) {
    messages.replaceChildren(
      h(
        "div",
        {},
        h("dt", { text: "Messages received" }),
        h("dd", { class: "count", text: formatCount(received) }),
      ),
      h(
        "div",
        {},
        h("dt", { text: "Reading sets stored" }),
        h("dd", { class: "count", text: formatCount(stored) }),
      ),
      h(
        "div",
        {},
        h("dt", { text: "Messages rejected" }),
        h("dd", { class: "count", text: formatCount(rejectedCount) }),
      ),
      h(
        "div",
        {},
        h("dt", { text: "Last message" }),
        h("dd", {}, lastAt === undefined ? "—" : agoElement(lastAt)),
      ),
    );
  }

  function showSinks(lagBySink, failing = {}, stalled = {}) {
    const names = Object.keys(lagBySink ?? {}).sort();
    sinksBody.replaceChildren(
      ...(names.length
        ? names.map((name) => {
            let stateCell;
            if (failing[name])
              stateCell = h(
                "td",
                {},
                h("span", { class: "badge badge-danger", text: "failing" }),
                " ",
                failing[name],
              );
            else if (stalled[name] !== undefined)
              stateCell = h(
                "td",
                {},
                h("span", { class: "badge badge-warn", text: `stalled ${stalled[name]} s` }),
              );
            else stateCell = h("td", {}, h("span", { class: "badge badge-ok", text: "ok" }));
            return h(
              "tr",
              {},
              h("th", { scope: "row", text: name }),
              h("td", { class: "num", text: String(lagBySink[name]) }),
              stateCell,
            );
          })
        : [emptyRow(3, "No collector runs in this process.")]),
    );
  }

  function showStats(stats) {
    lastStats = stats;
    total.value.textContent = String(stats.devices.total);
    online.value.textContent = String(stats.devices.online);
    online.note.textContent = `seen in the last ${Math.round(stats.devices.online_window_s / 60)} min`;
    rate.value.textContent = stats.messages.ingest_rate_per_s.toFixed(1);
    rate.note.textContent = "reading sets stored per second (last minute), live";
    spool.value.textContent = stats.spool ? String(stats.spool.depth) : "—";
    spool.note.textContent = stats.spool
      ? stats.spool.full
        ? "the spool is full: intake is held"
        : "not yet in every sink"
      : "no collector in this process";
    const bySeverity = stats.active_alerts_by_severity ?? {};
    const activeTotal = Object.values(bySeverity).reduce((sum, count) => sum + count, 0);
    alerts.value.textContent = String(activeTotal);
    alerts.note.replaceChildren(
      ...SEVERITIES.filter((name) => bySeverity[name]).flatMap((name) => [
        severityBadge(name),
        ` ${bySeverity[name]}  `,
      ]),
    );
    if (!activeTotal) alerts.note.textContent = "none open";

    const types = Object.entries(stats.devices.by_type).sort(([a], [b]) => a.localeCompare(b));
    byType.replaceChildren(
      ...(types.length
        ? types.map(([name, count]) =>
            h(
              "li",
              {},
              h("span", { text: name }),
              h("span", { class: "count", text: String(count) }),
            ),
          )
        : [h("li", { class: "muted", text: "No devices registered yet." })]),
    );

    const reasons = Object.entries(stats.messages.rejected_by_reason)
      .filter(([, count]) => count > 0)
      .sort(([, a], [, b]) => b - a);
    rejectedBody.replaceChildren(
      ...(reasons.length
        ? reasons.map(([reason, count]) =>
            h(
              "tr",
              {},
              h(
                "th",
                { scope: "row" },
                h("a", {
                  href: `#/dead-letters?reason=${encodeURIComponent(reason)}`,
                  text: reason,
                }),
              ),
              h("td", { class: "num", text: String(count) }),
            ),
          )
        : [emptyRow(2, "No message was rejected since start.")]),
    );
    showMessages(
      stats.messages.received,
      stats.messages.stored,
      stats.messages.rejected,
      stats.messages.last_message_at,
    );
    showSinks(stats.spool?.lag_by_sink, stats.spool?.failing_sinks, stats.spool?.stalled_sinks);
  }

  function showLive(figures) {
    rate.value.textContent = Number(figures.ingest_rate_per_s).toFixed(1);
    spool.value.textContent = figures.spool_depth === null ? "—" : String(figures.spool_depth);
    const last = lastStats?.messages.last_message_at;
    showMessages(
      figures.messages_received,
      figures.readings_stored,
      figures.messages_rejected,
      last,
    );
    if (lastStats?.spool) {
      showSinks(figures.lag_by_sink, lastStats.spool.failing_sinks, lastStats.spool.stalled_sinks);
    }
  }

  async function load() {
    try {
      showStats(await api.get("/stats", {}, { signal: ctx.signal }));
      ctx.clearError(); // an earlier refresh may have failed
    } catch (error) {
      ctx.fail(error);
    }
  }

  await load();
  ctx.watch({ stats: true }, (type, data) => {
    if (type === "stats" && data) showLive(data);
    else if (type === "reopen") load();
  });
  const timer = setInterval(load, REFRESH_MS);
  const ago = setInterval(() => refreshAgo(ctx.root), 5000);
  return () => {
    clearInterval(timer);
    clearInterval(ago);
  };
}
