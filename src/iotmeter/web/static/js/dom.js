// Building the DOM without innerHTML: every text from the server goes in as a text node.

/**
 * `h("a", {href, class, text, dataset, on: {click}}, ...children)`. Attributes named like
 * DOM properties (`hidden`, `value`, `disabled`, `checked`) are set as properties; `for` as
 * the attribute; null, undefined and false are left out.
 */
export function h(tag, attributes = {}, ...children) {
  const element = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes ?? {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "class") element.className = value;
    else if (name === "text") element.textContent = value;
    else if (name === "dataset") Object.assign(element.dataset, value);
    else if (name === "on") {
      for (const [event, handler] of Object.entries(value))
        element.addEventListener(event, handler);
    } else if (["hidden", "value", "disabled", "checked", "selected", "required"].includes(name)) {
      element[name] = value;
    } else element.setAttribute(name, value === true ? "" : String(value));
  }
  append(element, children);
  return element;
}

function append(element, children) {
  for (const child of children) {
    if (child === null || child === undefined || child === false) continue;
    if (Array.isArray(child)) append(element, child);
    else element.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

export function clear(element) {
  element.replaceChildren();
  return element;
}

let nextId = 0;
export function uid(prefix = "field") {
  nextId += 1;
  return `${prefix}-${nextId}`;
}

/** A labelled control: `<div class="field"><label for>...</label>control hint</div>`. */
export function field(label, control, hint) {
  if (!control.id) control.id = uid();
  const labelElement = h("label", { for: control.id, text: label });
  const check = control.type === "checkbox";
  const parts = check ? [control, labelElement] : [labelElement, control];
  if (hint) {
    const hintId = uid("hint");
    control.setAttribute("aria-describedby", hintId);
    parts.push(h("p", { class: "hint", id: hintId, text: hint }));
  }
  return h("div", { class: check ? "field field-check" : "field" }, parts);
}

/** `<select>` of `[value, text]` pairs. */
export function select(options, value, attributes = {}) {
  return h(
    "select",
    attributes,
    options.map(([optionValue, text]) =>
      h("option", { value: optionValue, text, selected: optionValue === value }),
    ),
  );
}

export function button(text, onClick, attributes = {}) {
  return h("button", { type: "button", ...attributes, on: { click: onClick } }, text);
}

/** A table in a scrollable, keyboard-reachable region (phones scroll it sideways). */
export function tableWrap(element, label) {
  return h(
    "div",
    { class: "table-wrap", role: "region", "aria-label": label, tabindex: "0" },
    element,
  );
}

/** `<table>` with a header row; `rows` are arrays of cells (a cell: node, text, or `{th}`). */
export function table(headers, rows, attributes = {}) {
  return h(
    "table",
    attributes,
    h(
      "thead",
      {},
      h(
        "tr",
        {},
        headers.map((text) => h("th", { scope: "col", text })),
      ),
    ),
    h("tbody", {}, rows),
  );
}

export function emptyRow(columns, text) {
  return h("tr", { class: "empty" }, h("td", { colspan: String(columns), text }));
}

// --- formatting -----------------------------------------------------------------------------

/** Milliseconds since the epoch of an RFC 3339 time (microseconds are cut to milliseconds). */
export function parseTime(text) {
  if (!text) return NaN;
  const match = /^(.*?)(\.\d+)?(Z|[+-]\d\d:\d\d)$/.exec(text);
  if (!match) return Date.parse(text);
  const fraction = match[2] ? Number(`0${match[2]}`) * 1000 : 0;
  return Date.parse(`${match[1]}${match[3]}`) + fraction;
}

const timeFormat = new Intl.DateTimeFormat(undefined, {
  year: "numeric",
  month: "2-digit",
  day: "2-digit",
  hour: "2-digit",
  minute: "2-digit",
  second: "2-digit",
  hour12: false,
});

/** Local date and time, to the second. */
export function formatTime(text) {
  const ms = typeof text === "number" ? text : parseTime(text);
  return Number.isFinite(ms) ? timeFormat.format(ms) : "—";
}

const clockFormat = new Intl.DateTimeFormat(undefined, {
  hour: "2-digit",
  minute: "2-digit",
  second: "2-digit",
  hour12: false,
});
const dayFormat = new Intl.DateTimeFormat(undefined, {
  month: "short",
  day: "numeric",
  hour: "2-digit",
  minute: "2-digit",
  hour12: false,
});
const dateFormat = new Intl.DateTimeFormat(undefined, { dateStyle: "medium" });

/** A compact time for tables: the clock today, the day this year, else the date. */
export function formatShortTime(text, now = new Date()) {
  const ms = typeof text === "number" ? text : parseTime(text);
  if (!Number.isFinite(ms)) return "—";
  const date = new Date(ms);
  if (date.toDateString() === now.toDateString()) return clockFormat.format(date);
  if (date.getFullYear() === now.getFullYear()) return dayFormat.format(date);
  return dateFormat.format(date);
}

/** A `<time>` showing the compact time, with the full local time as its tooltip. */
export function timeElement(text) {
  if (!text) return h("span", { class: "muted", text: "—" });
  return h("time", { datetime: text, title: formatTime(text), text: formatShortTime(text) });
}

/** "12 s ago", "3 min ago", "2 h ago", "5 d ago". */
export function formatAgo(text, now = Date.now()) {
  const ms = typeof text === "number" ? text : parseTime(text);
  if (!Number.isFinite(ms)) return "never";
  const seconds = Math.max(0, Math.round((now - ms) / 1000));
  if (seconds < 60) return `${seconds} s ago`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)} min ago`;
  if (seconds < 86400) return `${Math.floor(seconds / 3600)} h ago`;
  return `${Math.floor(seconds / 86400)} d ago`;
}

/** A time element showing "x ago", with the local time as its tooltip. */
export function agoElement(text) {
  if (!text) return h("span", { class: "muted", text: "never" });
  return h("time", {
    datetime: text,
    title: formatTime(text),
    dataset: { ago: text },
    text: formatAgo(text),
  });
}

/** Refreshes every "x ago" text under `root`. */
export function refreshAgo(root) {
  const now = Date.now();
  for (const element of root.querySelectorAll("[data-ago]")) {
    element.textContent = formatAgo(element.dataset.ago, now);
  }
}

/** A number without float noise (10 significant digits) and without grouping. */
export function formatValue(value) {
  if (value === null || value === undefined) return "—";
  if (typeof value !== "number") return String(value);
  return String(Number(value.toPrecision(10)));
}

export function formatCount(value) {
  return value === null || value === undefined ? "—" : String(value);
}

/** A pill with text: colour is never the only signal. */
export function badge(text, tone) {
  return h("span", { class: `badge badge-${tone}`, text });
}

export function severityBadge(severity) {
  const tone = { critical: "danger", warning: "warn", info: "info" }[severity] ?? "neutral";
  return badge(severity, tone);
}

export function statusBadge(status) {
  const tone = { active: "danger", acknowledged: "warn", resolved: "ok" }[status] ?? "neutral";
  return badge(status, tone);
}

/** JSON of a value for display. */
export function jsonText(value, indent = 0) {
  try {
    return JSON.stringify(value, null, indent);
  } catch {
    return String(value);
  }
}

// --- pagination -----------------------------------------------------------------------------

/**
 * "Previous" / "1–50 of 1234" / "Next" for offset pagination. The buttons stay in place
 * between pages (keyboard focus stays on them); `update()` after every load.
 */
export function createPager(label, onPage) {
  let state = { offset: 0, limit: 50 };
  const previous = button("Previous", () => onPage(Math.max(0, state.offset - state.limit)), {
    disabled: true,
  });
  const next = button("Next", () => onPage(state.offset + state.limit), { disabled: true });
  const status = h("span", { class: "pager-status", "aria-live": "polite" });
  const element = h("nav", { class: "pager", "aria-label": label }, previous, status, next);
  return {
    element,
    /** `total`: null when unknown (cursor pages); `more`: a next page exists. */
    update({ offset, limit, total, shown, more }) {
      state = { offset, limit };
      previous.disabled = offset === 0;
      const last = offset + shown;
      next.disabled = total === null || total === undefined ? !more : last >= total;
      const range = shown ? `${offset + 1}–${last}` : "0";
      status.textContent = total === null || total === undefined ? range : `${range} of ${total}`;
    },
  };
}

/** Calls `fn` once input has paused for `ms`. */
export function debounce(fn, ms) {
  let timer = 0;
  return (...args) => {
    clearTimeout(timer);
    timer = setTimeout(() => fn(...args), ms);
  };
}

/** Offers `blob` as a file download. */
export function download(blob, filename) {
  const url = URL.createObjectURL(blob);
  const link = h("a", { href: url, download: filename, class: "visually-hidden" });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10_000);
}
