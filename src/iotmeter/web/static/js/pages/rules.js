// Alert rules: the list, the editor (create, change, delete) and the backtest over stored
// history (POST /alert-rules/{id}/backtest), whose result is shown below the list.

import { api } from "../api.js";
import {
  button,
  createPager,
  emptyRow,
  field,
  formatTime,
  formatValue,
  h,
  select,
  severityBadge,
  tableWrap,
} from "../dom.js";
import { ruleForm } from "./rule_form.js";

const PAGE_SIZE = 50;
const BACKTEST_RANGES = [
  ["-1h", "Last hour"],
  ["-24h", "Last 24 hours"],
  ["-7d", "Last 7 days"],
];

function scopeText(rule) {
  if (rule.device_id) return rule.device_id;
  if (rule.device_type) return `every ${rule.device_type}`;
  return "every device";
}

function conditionText(rule) {
  switch (rule.kind) {
    case "no_data":
      return `no reading for ${rule.timeout_s} s`;
    case "anomaly":
      return `${rule.field} beyond ${rule.k} σ (half-life ${rule.half_life}, warm-up ${rule.warmup})`;
    default: {
      const what = rule.kind === "rate_of_change" ? `rate of ${rule.field}` : rule.field;
      const limit =
        rule.operator === "outside"
          ? `outside [${rule.low}, ${rule.high}]`
          : `${rule.operator} ${rule.threshold}`;
      const hold = rule.duration_s ? ` for ${rule.duration_s} s` : "";
      return `${what} ${limit}${hold}`;
    }
  }
}

export async function render(ctx) {
  // The backtest writes nothing: the API lets viewers run it too.
  const canBacktest = true;
  const newRule = ctx.canWrite
    ? button("New rule", () => showForm(null), { class: "primary" })
    : null;
  ctx.title("Alert rules", newRule);
  const body = h("div");
  ctx.root.append(body);
  let offset = 0;

  const tbody = h("tbody");
  const headers = ["Name", "Kind", "Scope", "Condition", "Severity", "Enabled"];
  if (ctx.canWrite || canBacktest) headers.push("Actions");
  const rulesTable = h(
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
  const rangeSelect = select(BACKTEST_RANGES, "-24h");
  const pages = createPager("Rule pages", (next) => {
    offset = next;
    load();
  });
  const result = h("section", {
    class: "card backtest",
    dataset: { testid: "backtest-result" },
    "aria-live": "polite",
    "aria-label": "Backtest result",
    hidden: true,
  });
  const listView = h(
    "div",
    {},
    canBacktest
      ? h(
          "div",
          { class: "toolbar" },
          field(
            "Backtest range",
            rangeSelect,
            "Backtest runs a rule over stored readings; it raises nothing.",
          ),
        )
      : null,
    tableWrap(rulesTable, "Alert rules"),
    pages.element,
    result,
  );

  function row(rule) {
    const cells = [
      h("th", { scope: "row", class: "wrap-anywhere", text: rule.name }),
      h("td", { text: rule.kind }),
      h("td", { class: "wrap-anywhere", text: scopeText(rule) }),
      h("td", { class: "wrap-anywhere", text: conditionText(rule) }),
      h("td", {}, severityBadge(rule.severity)),
      h("td", { text: rule.enabled ? "yes" : "no" }),
    ];
    if (ctx.canWrite || canBacktest) {
      cells.push(
        h(
          "td",
          {},
          h(
            "div",
            { class: "row-actions" },
            canBacktest
              ? button("Backtest", (event) => backtest(rule, event.currentTarget), {
                  class: "small",
                })
              : null,
            ctx.canWrite ? button("Edit", () => showForm(rule), { class: "small" }) : null,
            ctx.canWrite ? button("Delete", () => remove(rule), { class: "small danger" }) : null,
          ),
        ),
      );
    }
    return h("tr", { dataset: { rule: String(rule.id) } }, cells);
  }

  async function load() {
    try {
      const page = await api.get(
        "/alert-rules",
        { limit: PAGE_SIZE, offset },
        { signal: ctx.signal },
      );
      tbody.replaceChildren(
        ...(page.items.length
          ? page.items.map(row)
          : [emptyRow(headers.length, "No alert rules yet.")]),
      );
      pages.update({
        offset: page.offset,
        limit: PAGE_SIZE,
        total: page.total,
        shown: page.items.length,
      });
    } catch (error) {
      ctx.fail(error);
    }
  }

  async function backtest(rule, control) {
    control.disabled = true;
    result.hidden = false;
    result.setAttribute("aria-busy", "true");
    result.replaceChildren(
      h("h2", { text: `Backtest of ${rule.name}` }),
      h("p", { class: "muted", text: "Running…" }),
    );
    try {
      const answer = await api.post(`/alert-rules/${rule.id}/backtest`, undefined, {
        query: { start: rangeSelect.value, stop: "now" },
        signal: ctx.signal,
      });
      ctx.clearError();
      showBacktest(rule, answer);
    } catch (error) {
      result.replaceChildren(
        h("h2", { text: `Backtest of ${rule.name}` }),
        h("p", { text: `The backtest failed: ${error.message}` }),
      );
      ctx.fail(error);
    } finally {
      control.disabled = false;
      result.removeAttribute("aria-busy");
    }
  }

  function showBacktest(rule, answer) {
    const count = answer.alerts.length;
    const summary =
      `${count} alert${count === 1 ? "" : "s"} would have fired, from ${answer.readings} readings of ` +
      `${answer.devices} device${answer.devices === 1 ? "" : "s"} between ${formatTime(answer.start)} ` +
      `and ${formatTime(answer.stop)}` +
      (answer.suppressed ? `; ${answer.suppressed} more suppressed by the flap window.` : ".");
    const rows = answer.alerts.map((alert) =>
      h(
        "tr",
        {},
        h("th", { scope: "row", text: alert.device_id }),
        h("td", { class: "nowrap", text: formatTime(alert.fired_at) }),
        h("td", {
          class: "nowrap",
          text: alert.resolved_at ? formatTime(alert.resolved_at) : "still open",
        }),
        h("td", { class: "num", text: formatValue(alert.value) }),
        h("td", { class: "num", text: formatValue(alert.extreme_value) }),
        h("td", { class: "num", text: String(alert.breach_count) }),
        h("td", { class: "text", text: alert.message }),
      ),
    );
    // The spaces keep the heading's and the summary's words apart in the region's text.
    result.replaceChildren(
      h("h2", { text: `Backtest of ${rule.name}` }),
      " ",
      h("p", { text: summary }),
      " ",
      count
        ? tableWrap(
            h(
              "table",
              {},
              h(
                "thead",
                {},
                h(
                  "tr",
                  {},
                  ["Device", "Fired", "Resolved", "Value", "Extreme", "Breaches", "Message"].map(
                    (text) => h("th", { scope: "col", text }),
                  ),
                ),
              ),
              h("tbody", {}, rows),
            ),
            "Backtest alerts",
          )
        : null,
    );
  }

  async function remove(rule) {
    if (!window.confirm(`Delete the rule ${rule.name}? Its alerts stay.`)) return;
    try {
      await api.delete(`/alert-rules/${rule.id}`, { signal: ctx.signal });
      ctx.notice(`Rule ${rule.name} deleted.`);
      await load();
    } catch (error) {
      ctx.fail(error);
    }
  }

  function showList() {
    ctx.clearError();
    body.replaceChildren(listView);
    if (newRule) newRule.hidden = false;
  }

  function showForm(rule) {
    ctx.clearError();
    if (newRule) newRule.hidden = true;
    ruleForm(ctx, body, {
      rule,
      onCancel: showList,
      onDone: (saved) => {
        ctx.notice(`Rule ${saved.name} saved.`);
        showList();
        load();
      },
    });
  }

  showList();
  await load();
}
