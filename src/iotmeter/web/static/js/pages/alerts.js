// Alerts: newest first, filtered by status, severity and device; acknowledge and resolve.

import { api } from "../api.js";
import {
  button,
  createPager,
  debounce,
  emptyRow,
  field,
  formatValue,
  h,
  select,
  severityBadge,
  statusBadge,
  tableWrap,
  timeElement,
} from "../dom.js";

const PAGE_SIZE = 50;
const STATUSES = ["active", "acknowledged", "resolved"];
const SEVERITIES = ["critical", "warning", "info"];

export async function render(ctx) {
  ctx.title("Alerts");
  const state = {
    status: ctx.query.get("status") ?? "",
    severity: ctx.query.get("severity") ?? "",
    device: ctx.query.get("device") ?? "",
    offset: Math.max(0, Number.parseInt(ctx.query.get("offset") ?? "0", 10) || 0),
  };
  let loadController = null;

  const statusSelect = select(
    [["", "All statuses"], ...STATUSES.map((name) => [name, name])],
    state.status,
  );
  const severitySelect = select(
    [["", "All severities"], ...SEVERITIES.map((name) => [name, name])],
    state.severity,
  );
  const deviceInput = h("input", {
    type: "search",
    value: state.device,
    placeholder: "exact device id",
    autocomplete: "off",
    spellcheck: "false",
  });
  const tbody = h("tbody");
  const headers = ["Created", "Device", "Severity", "Status", "Message", "Value"];
  if (ctx.canWrite) headers.push("Actions");
  const alertsTable = h(
    "table",
    {},
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
  const pages = createPager("Alert pages", (offset) => {
    state.offset = offset;
    syncQuery();
    load();
  });
  ctx.root.append(
    h(
      "div",
      { class: "toolbar", role: "search" },
      field("Status", statusSelect),
      field("Severity", severitySelect),
      field("Device", deviceInput),
    ),
    tableWrap(alertsTable, "Alerts"),
    pages.element,
  );

  function syncQuery() {
    ctx.setQuery({ ...state, offset: state.offset || null });
  }

  function actions(alert, tr) {
    const cell = h("div", { class: "row-actions" });
    if (alert.status === "active") {
      cell.append(
        button("Acknowledge", () => transition(alert, "acknowledge", tr), { class: "small" }),
      );
    }
    if (alert.status !== "resolved") {
      cell.append(button("Resolve", () => transition(alert, "resolve", tr), { class: "small" }));
    }
    return h("td", {}, cell);
  }

  function row(alert) {
    const tr = h("tr", { dataset: { alert: String(alert.id) } });
    const cells = [
      h("td", { class: "nowrap" }, timeElement(alert.created_at)),
      h(
        "th",
        { scope: "row" },
        h("a", { href: `#/devices/${encodeURIComponent(alert.device_id)}`, text: alert.device_id }),
      ),
      h("td", {}, severityBadge(alert.severity)),
      h("td", { dataset: { cell: "status" } }, statusBadge(alert.status)),
      h("td", { class: "text", text: alert.message }),
      h(
        "td",
        { class: "num" },
        formatValue(alert.value),
        alert.threshold === null
          ? null
          : h("span", { class: "sub", text: `limit ${formatValue(alert.threshold)}` }),
      ),
    ];
    if (ctx.canWrite) cells.push(actions(alert, tr));
    tr.append(...cells);
    return tr;
  }

  async function transition(alert, action, tr) {
    for (const control of tr.querySelectorAll("button")) control.disabled = true;
    try {
      const updated = await api.post(`/alerts/${alert.id}/${action}`, undefined, {
        signal: ctx.signal,
      });
      ctx.clearError();
      const replacement = row(updated);
      tr.replaceWith(replacement);
      ctx.notice(`Alert ${updated.id} ${updated.status}.`);
      (replacement.querySelector("button") ?? replacement.querySelector("a"))?.focus();
    } catch (error) {
      ctx.fail(error);
      for (const control of tr.querySelectorAll("button")) control.disabled = false;
    }
  }

  async function load() {
    loadController?.abort();
    loadController = new AbortController();
    const signal = AbortSignal.any([ctx.signal, loadController.signal]);
    alertsTable.setAttribute("aria-busy", "true");
    try {
      const page = await api.get(
        "/alerts",
        {
          status: state.status,
          severity: state.severity,
          device_id: state.device.trim(),
          limit: PAGE_SIZE,
          offset: state.offset,
        },
        { signal },
      );
      ctx.clearError();
      tbody.replaceChildren(
        ...(page.items.length
          ? page.items.map(row)
          : [emptyRow(headers.length, "No alert matches.")]),
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
      alertsTable.removeAttribute("aria-busy");
    }
  }

  for (const [control, name] of [
    [statusSelect, "status"],
    [severitySelect, "severity"],
  ]) {
    control.addEventListener("change", () => {
      state[name] = control.value;
      state.offset = 0;
      syncQuery();
      load();
    });
  }
  const reload = debounce(load, 300);
  deviceInput.addEventListener("input", () => {
    state.device = deviceInput.value;
    state.offset = 0;
    syncQuery();
    reload();
  });

  await load();
  return () => loadController?.abort();
}
