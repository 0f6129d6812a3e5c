// The device page's charts: one per field over a range, with server-side windows past 15 min
// (`every` ≈ span / 720), appended to live as readings arrive. Also the latest values table
// and "Download CSV" of the range shown.

import { api, devicePath, isAbort } from "../api.js";
import { FieldChart, loadUplot } from "../chart.js";
import {
  button,
  download,
  emptyRow,
  field,
  formatValue,
  h,
  parseTime,
  tableWrap,
  timeElement,
} from "../dom.js";

const MINUTE = 60_000;
const HOUR = 60 * MINUTE;
const DAY = 24 * HOUR;

export const RANGES = [
  { key: "15m", label: "15 min", span: 15 * MINUTE, start: "-15m" },
  { key: "1h", label: "1 h", span: HOUR, start: "-1h" },
  { key: "24h", label: "24 h", span: DAY, start: "-24h" },
  { key: "7d", label: "7 d", span: 7 * DAY, start: "-7d" },
];
const DEFAULT_RANGE = "1h";
const RAW_UP_TO_MS = 15 * MINUTE;
const TARGET_POINTS = 720;
const WINDOWS = [
  ["10s", 10],
  ["15s", 15],
  ["30s", 30],
  ["1m", 60],
  ["2m", 120],
  ["5m", 300],
  ["10m", 600],
  ["15m", 900],
  ["30m", 1800],
  ["1h", 3600],
  ["2h", 7200],
  ["6h", 21600],
  ["12h", 43200],
  ["1d", 86400],
];

/** The window for a span: none (raw points) up to 15 min, else ≈ span / 720 rounded up. */
export function everyFor(spanMs) {
  if (spanMs <= RAW_UP_TO_MS) return null;
  const wanted = spanMs / 1000 / TARGET_POINTS;
  const found = WINDOWS.find(([, seconds]) => seconds >= wanted) ?? WINDOWS[WINDOWS.length - 1];
  return { text: found[0], ms: found[1] * 1000 };
}

/** A reading's value as the store keeps it (booleans as 1 and 0), or null. */
function readingNumber(value) {
  if (typeof value === "boolean") return Number(value);
  return typeof value === "number" && Number.isFinite(value) ? value : null;
}

/** A `datetime-local` value (local time, to the minute) of epoch milliseconds. */
function localInput(ms) {
  const date = new Date(ms - new Date(ms).getTimezoneOffset() * MINUTE);
  return date.toISOString().slice(0, 16);
}

function isoOf(ms) {
  return new Date(ms).toISOString();
}

/**
 * The range state: a preset (sliding: its end follows the server's clock) or a custom
 * [from, to]. `query()` is what the telemetry and raw endpoints take.
 */
class Range {
  constructor(query) {
    const key = query.get("range") ?? DEFAULT_RANGE;
    const from = parseTime(query.get("from") ?? "");
    const to = parseTime(query.get("to") ?? "");
    if (key === "custom" && Number.isFinite(from) && Number.isFinite(to) && from < to) {
      this.setCustom(from, to);
    } else {
      this.setPreset(RANGES.find((range) => range.key === key)?.key ?? DEFAULT_RANGE);
    }
    this.clockOffset = 0; // server time - browser time, learnt from the answers
  }

  setPreset(key) {
    this.preset = RANGES.find((range) => range.key === key);
    this.from = null;
    this.to = null;
  }

  setCustom(from, to) {
    this.preset = null;
    this.from = from;
    this.to = to;
  }

  get key() {
    return this.preset ? this.preset.key : "custom";
  }

  get span() {
    return this.preset ? this.preset.span : this.to - this.from;
  }

  get every() {
    return everyFor(this.span);
  }

  /** Whether live readings belong in it (the range ends now, or later). */
  get live() {
    return this.preset !== null || this.to >= this.now();
  }

  now() {
    return Date.now() + this.clockOffset;
  }

  /** [start, stop] in epoch milliseconds, as of now. */
  bounds() {
    if (this.preset) {
      const now = this.now();
      return [now - this.preset.span, now];
    }
    return [this.from, this.to];
  }

  query() {
    if (this.preset) return { start: this.preset.start, stop: "now" };
    return { start: isoOf(this.from), stop: isoOf(this.to) };
  }

  hashQuery() {
    if (this.preset) return { range: this.preset.key };
    return { range: "custom", from: isoOf(this.from), to: isoOf(this.to) };
  }
}

/**
 * Builds the "Charts" section and the latest values into the given elements. Returns
 * `{onReadings, refetch, destroy, range}`; `onRangeChange(range)` is called after the user
 * picks another range.
 */
export function deviceCharts(ctx, deviceId, { chartsSection, latestSection, onRangeChange }) {
  const range = new Range(ctx.query);
  const charts = new Map(); // field -> FieldChart
  const latest = new Map(); // field -> {ts, value}
  let uPlot = null;
  let loading = null; // AbortController of the telemetry request in flight
  let buffered = null; // live readings that arrived while it was in flight
  let frame = 0;
  let destroyed = false;

  // --- latest values --------------------------------------------------------------------
  const latestBody = h("tbody");
  latestSection.append(
    h("h2", { id: "latest-heading", text: "Latest values" }),
    tableWrap(
      h(
        "table",
        { dataset: { testid: "latest-values" } },
        h(
          "thead",
          {},
          h(
            "tr",
            {},
            ["Field", "Value", "Time"].map((text) => h("th", { scope: "col", text })),
          ),
        ),
        latestBody,
      ),
      "Latest readings",
    ),
  );
  latestSection.lastElementChild.classList.add("latest");

  function showLatest() {
    const names = [...latest.keys()].sort();
    latestBody.replaceChildren(
      ...(names.length
        ? names.map((name) => {
            const { ts, value } = latest.get(name);
            return h(
              "tr",
              { dataset: { field: name } },
              h("th", { scope: "row", text: name }),
              h("td", { class: "num", text: formatValue(value) }),
              h("td", { class: "nowrap" }, timeElement(ts)),
            );
          })
        : [emptyRow(3, "No readings stored yet.")]),
    );
  }

  async function loadLatest() {
    const answer = await api.get(devicePath(deviceId, "/latest"), {}, { signal: ctx.signal });
    for (const [name, point] of Object.entries(answer.fields)) {
      const known = latest.get(name);
      if (!known || parseTime(point.ts) >= parseTime(known.ts)) latest.set(name, point);
    }
    showLatest();
  }

  // --- range controls -------------------------------------------------------------------
  const rangeButtons = RANGES.map((preset) =>
    button(preset.label, () => pickPreset(preset.key), { "aria-pressed": "false", class: "small" }),
  );
  const customButton = button("Custom", () => toggleCustom(), {
    "aria-pressed": "false",
    "aria-expanded": "false",
    "aria-controls": "custom-range",
    class: "small",
  });
  const fromInput = h("input", { type: "datetime-local", required: true });
  const toInput = h("input", { type: "datetime-local", required: true });
  const customForm = h(
    "form",
    { class: "custom-range", id: "custom-range", hidden: true },
    field("From", fromInput),
    field("To", toInput),
    h("button", { type: "submit", class: "small primary", text: "Show range" }),
  );
  const note = h("span", { class: "range-note", "aria-live": "polite" });
  const csvButton = button("Download CSV", () => downloadCsv(), { class: "small" });
  const chartGrid = h("div", { class: "charts" });
  const emptyCharts = h("p", { class: "muted", text: "No field has data yet.", hidden: true });

  chartsSection.append(
    h(
      "div",
      { class: "section-header" },
      h("h2", { id: "charts-heading", text: "Charts" }),
      csvButton,
    ),
    h(
      "div",
      { class: "range-bar" },
      h(
        "div",
        { class: "segmented", role: "group", "aria-label": "Range" },
        rangeButtons,
        customButton,
      ),
      note,
    ),
    customForm,
    chartGrid,
    emptyCharts,
  );

  function showRangeState() {
    for (const [index, preset] of RANGES.entries()) {
      rangeButtons[index].setAttribute("aria-pressed", String(range.key === preset.key));
    }
    customButton.setAttribute("aria-pressed", String(range.key === "custom"));
    const every = range.every;
    note.textContent = every ? `mean per ${every.text} window` : "raw points";
  }

  function pickPreset(key) {
    range.setPreset(key);
    customForm.hidden = true;
    customButton.setAttribute("aria-expanded", "false");
    changed();
  }

  function toggleCustom() {
    const open = customForm.hidden;
    customForm.hidden = !open;
    customButton.setAttribute("aria-expanded", String(open));
    if (open) {
      const [start, stop] = range.bounds();
      fromInput.value = localInput(start);
      toInput.value = localInput(stop + MINUTE - 1); // to the minute, up: the newest points stay in
      fromInput.focus();
    }
  }

  customForm.addEventListener("submit", (event) => {
    event.preventDefault();
    const from = new Date(fromInput.value).getTime();
    const to = new Date(toInput.value).getTime();
    if (!Number.isFinite(from) || !Number.isFinite(to) || from >= to) {
      ctx.showError("The custom range needs a start before its end.");
      return;
    }
    ctx.clearError();
    range.setCustom(from, to);
    changed();
  });

  function changed() {
    ctx.setQuery(range.hashQuery());
    showRangeState();
    refetch();
    onRangeChange(range);
  }

  // --- charts ---------------------------------------------------------------------------
  function chartFor(name) {
    let chart = charts.get(name);
    if (!chart) {
      chart = new FieldChart(uPlot, name, charts.size, () => range.bounds());
      charts.set(name, chart);
      const names = [...charts.keys()].sort();
      const next = names[names.indexOf(name) + 1];
      chartGrid.insertBefore(chart.figure, next ? charts.get(next).figure : null);
    }
    return chart;
  }

  function redrawSoon() {
    if (frame) return;
    frame = requestAnimationFrame(() => {
      frame = 0;
      if (destroyed) return;
      const every = range.every;
      const [start] = range.bounds();
      for (const chart of charts.values()) {
        if (range.preset) chart.trim(start - (every ? every.ms : 0));
        chart.redraw();
      }
      emptyCharts.hidden = charts.size > 0;
    });
  }

  function applyReadings(readings) {
    for (const reading of readings) {
      const time = parseTime(reading.time);
      const [start, stop] = range.bounds();
      const inRange =
        range.live && time >= start - (range.every?.ms ?? 0) && (range.preset || time < stop);
      for (const [name, value] of Object.entries(reading.fields ?? {})) {
        const number = readingNumber(value);
        if (number !== null && inRange) chartFor(name).add(reading.time, number);
      }
    }
    redrawSoon();
  }

  async function refetch() {
    loading?.abort();
    const controller = new AbortController();
    loading = controller;
    buffered = [];
    const every = range.every;
    const signal = AbortSignal.any([ctx.signal, controller.signal]);
    chartGrid.setAttribute("aria-busy", "true");
    try {
      uPlot ??= await loadUplot();
      const answer = await api.get(
        devicePath(deviceId, "/telemetry"),
        { ...range.query(), every: every?.text, aggregate: every ? "mean" : null },
        { signal },
      );
      if (range.preset) range.clockOffset = parseTime(answer.stop) - Date.now();
      const seen = new Set();
      for (const series of answer.series) {
        seen.add(series.field);
        chartFor(series.field).setPoints(series.points);
      }
      // Fields known from the latest values get a chart too: "no data in this range".
      for (const name of latest.keys()) if (!seen.has(name)) chartFor(name).setPoints([]);
      for (const [name, chart] of charts)
        if (!seen.has(name) && !latest.has(name)) {
          chart.destroy();
          charts.delete(name);
        }
      const pending = buffered;
      buffered = null;
      applyReadings(pending);
    } catch (error) {
      if (!isAbort(error)) ctx.fail(error);
    } finally {
      if (loading === controller) {
        loading = null;
        buffered = null;
        chartGrid.removeAttribute("aria-busy");
      }
    }
  }

  async function downloadCsv() {
    const every = range.every;
    csvButton.disabled = true;
    try {
      const blob = await api.get(
        devicePath(deviceId, "/telemetry"),
        { ...range.query(), every: every?.text, aggregate: every ? "mean" : null, format: "csv" },
        { signal: ctx.signal, as: "blob" },
      );
      const [start, stop] = range.bounds();
      const stamp = (ms) => isoOf(ms).slice(0, 16).replace(/[:]/g, "");
      download(blob, `${deviceId}_${stamp(start)}_${stamp(stop)}.csv`);
    } catch (error) {
      ctx.fail(error);
    } finally {
      csvButton.disabled = false;
    }
  }

  function onReadings(readings) {
    let changedLatest = false;
    for (const reading of readings) {
      for (const [name, value] of Object.entries(reading.fields ?? {})) {
        const number = readingNumber(value);
        if (number === null) continue;
        const known = latest.get(name);
        if (!known || parseTime(reading.time) >= parseTime(known.ts)) {
          latest.set(name, { ts: reading.time, value: number });
          changedLatest = true;
        }
      }
    }
    if (changedLatest) showLatest();
    if (buffered) buffered.push(...readings);
    else if (uPlot) applyReadings(readings);
  }

  showRangeState();
  showLatest();

  return {
    range,
    async start() {
      try {
        await loadLatest();
      } catch (error) {
        ctx.fail(error);
      }
      await refetch();
    },
    onReadings,
    refetch: async () => {
      try {
        await loadLatest();
      } catch (error) {
        ctx.fail(error);
      }
      await refetch();
    },
    destroy() {
      destroyed = true;
      cancelAnimationFrame(frame);
      loading?.abort();
      for (const chart of charts.values()) chart.destroy();
      charts.clear();
    },
  };
}
