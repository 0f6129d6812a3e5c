// One uPlot chart per field. uPlot (vendored, see /ui/vendor/uplot/VERSION) is loaded on the
// first page that draws a chart. The figure carries `data-points` and `data-last-time`, set on
// every redraw.

import { formatTime, formatValue, h, parseTime } from "./dom.js";

const UPLOT_URL = "/ui/vendor/uplot/uPlot.iife.min.js";
const PALETTE = ["--chart-1", "--chart-2", "--chart-3", "--chart-4", "--chart-5", "--chart-6"];

let loading = null;

export function loadUplot() {
  if (window.uPlot) return Promise.resolve(window.uPlot);
  loading ??= new Promise((resolve, reject) => {
    const script = document.createElement("script");
    script.src = UPLOT_URL;
    script.addEventListener("load", () => resolve(window.uPlot));
    script.addEventListener("error", () => {
      loading = null;
      reject(new Error("the chart library could not be loaded; reload the page"));
    });
    document.head.append(script);
  });
  return loading;
}

function cssVar(name) {
  return getComputedStyle(document.documentElement).getPropertyValue(name).trim();
}

/** The insertion index of `x` in ascending `xs`. */
function insertionIndex(xs, x) {
  let low = 0;
  let high = xs.length;
  while (low < high) {
    const middle = (low + high) >> 1;
    if (xs[middle] < x) low = middle + 1;
    else high = middle;
  }
  return low;
}

/** The y axis's width: room for its longest label (uPlot's default cuts long numbers). */
function yAxisSize(self, values, axisIndex, cycle) {
  const axis = self.axes[axisIndex];
  if (cycle > 1) return axis._size; // settle after two passes
  const longest = (values ?? []).reduce((most, text) => Math.max(most, String(text).length), 0);
  return Math.max(40, Math.ceil(longest * 7.2) + (axis.ticks.size ?? 10) + (axis.gap ?? 5) + 6);
}

export class FieldChart {
  /**
   * @param uPlot the library
   * @param field the field's name
   * @param index position, for the colour
   * @param range () => [startMs, stopMs]: the x axis spans the whole range
   */
  constructor(uPlot, field, index, range) {
    this.field = field;
    this.range = range;
    this.xs = []; // seconds since the epoch (uPlot's unit)
    this.ys = [];
    this.times = []; // the RFC 3339 texts, as received
    this.caption = h("span", { class: "chart-summary" });
    this.plotArea = h("div", { class: "plot" });
    this.empty = h("p", { class: "chart-empty muted", text: "No data in this range." });
    this.figure = h(
      "figure",
      { class: "chart card", dataset: { testid: `chart-${field}`, points: "0", lastTime: "" } },
      h("figcaption", {}, h("span", { class: "chart-field", text: field }), this.caption),
      this.plotArea,
      this.empty,
    );
    const color = cssVar(PALETTE[index % PALETTE.length]) || "#2563eb";
    const axis = {
      stroke: cssVar("--text-muted") || "#666",
      grid: { stroke: cssVar("--grid") || "#eee", width: 1 },
      ticks: { stroke: cssVar("--grid") || "#eee", width: 1 },
    };
    this.plot = new uPlot(
      {
        width: 400,
        height: 200,
        scales: {
          x: {
            time: true,
            range: () => {
              const [start, stop] = this.range();
              return [start / 1000, stop / 1000];
            },
          },
        },
        series: [
          { value: (_u, value) => (value == null ? "—" : formatTime(value * 1000)) },
          {
            label: field,
            stroke: color,
            width: 1.5,
            fill: `${color}1f`,
            spanGaps: false,
            value: (_u, value) => formatValue(value),
          },
        ],
        axes: [axis, { ...axis, size: yAxisSize }],
        legend: { live: true },
        cursor: { drag: { x: false, y: false } },
      },
      [[], []],
      this.plotArea,
    );
    this.resizer = new ResizeObserver(() => this.resize());
    this.resizer.observe(this.plotArea);
  }

  resize() {
    const width = Math.floor(this.plotArea.clientWidth);
    if (width > 0 && width !== this.plot.width) {
      this.plot.setSize({ width, height: window.innerWidth < 600 ? 170 : 200 });
    }
  }

  /** Replaces the points: `[{ts, value}]`, oldest first. */
  setPoints(points) {
    this.xs = [];
    this.ys = [];
    this.times = [];
    for (const point of points) this.add(point.ts, point.value);
  }

  /** Adds one point in time order; a point at the same time replaces the one there. */
  add(time, value) {
    const x = parseTime(time) / 1000;
    if (!Number.isFinite(x)) return;
    const last = this.xs.length - 1;
    if (last < 0 || x > this.xs[last]) {
      this.xs.push(x);
      this.ys.push(value);
      this.times.push(time);
      return;
    }
    const index = insertionIndex(this.xs, x);
    if (this.xs[index] === x) {
      this.ys[index] = value;
      return;
    }
    this.xs.splice(index, 0, x);
    this.ys.splice(index, 0, value);
    this.times.splice(index, 0, time);
  }

  /** Drops the points before `startMs`. */
  trim(startMs) {
    const cut = insertionIndex(this.xs, startMs / 1000);
    if (cut > 0) {
      this.xs.splice(0, cut);
      this.ys.splice(0, cut);
      this.times.splice(0, cut);
    }
  }

  redraw() {
    this.resize();
    this.plot.setData([this.xs, this.ys]);
    const count = this.xs.length;
    const lastTime = count ? this.times[count - 1] : "";
    this.figure.dataset.points = String(count);
    this.figure.dataset.lastTime = lastTime;
    this.empty.hidden = count > 0;
    this.caption.textContent = count
      ? `${count} point${count === 1 ? "" : "s"}, latest ${formatValue(this.ys[count - 1])} at ${formatTime(lastTime)}`
      : "no points";
  }

  destroy() {
    this.resizer.disconnect();
    this.plot.destroy();
    this.figure.remove();
  }
}
