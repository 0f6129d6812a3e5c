// Devices: the registry, one server-side page at a time (never all of them), filtered by text,
// type, status and connection; register, edit, delete. The devices shown are watched live, so
// "last seen" and "online" follow their readings.

import { api, devicePath } from "../api.js";
import {
  agoElement,
  button,
  createPager,
  debounce,
  emptyRow,
  field,
  h,
  refreshAgo,
  select,
  tableWrap,
} from "../dom.js";
import { deviceForm } from "./device_form.js";

const PAGE_SIZE = 50;
const DEFAULT_ONLINE_WINDOW_S = 300;

/**
 * "online" or "offline": what the device last said on its status topic; a device that never
 * said counts as online while it was seen within the online window.
 */
export function presence(device, onlineWindowS, now = Date.now()) {
  if (device.connected === true) return "online";
  if (device.connected === false) return "offline";
  const seen = device.last_seen_at ? Date.parse(device.last_seen_at) : NaN;
  return Number.isFinite(seen) && now - seen <= onlineWindowS * 1000 ? "online" : "offline";
}

let knownWindow = null;

/** `online_window_s` of the server (from /stats; asked once per page load). */
export function onlineWindow(stats) {
  if (stats) {
    knownWindow = Promise.resolve(stats.devices.online_window_s ?? DEFAULT_ONLINE_WINDOW_S);
  }
  knownWindow ??= api
    .get("/stats")
    .then((answer) => answer.devices.online_window_s ?? DEFAULT_ONLINE_WINDOW_S)
    .catch(() => {
      knownWindow = null;
      return DEFAULT_ONLINE_WINDOW_S;
    });
  return knownWindow;
}

export function presenceElement(state) {
  return h("span", { class: `presence ${state}`, text: state });
}

export async function render(ctx) {
  const state = {
    q: ctx.query.get("q") ?? "",
    type: ctx.query.get("type") ?? "",
    status: ctx.query.get("status") ?? "",
    connection: ctx.query.get("connection") ?? "",
    offset: Math.max(0, Number.parseInt(ctx.query.get("offset") ?? "0", 10) || 0),
  };
  let onlineWindowS = DEFAULT_ONLINE_WINDOW_S;
  let devices = [];
  let loadController = null;

  const register = ctx.canWrite
    ? button("Register device", () => showForm(null), { class: "primary" })
    : null;
  ctx.title("Devices", register);
  const body = h("div");
  ctx.root.append(body);

  const search = h("input", {
    type: "search",
    value: state.q,
    placeholder: "id or name",
    autocomplete: "off",
  });
  const typeSelect = select([["", "All types"]], state.type);
  const statusSelect = select(
    [
      ["", "All statuses"],
      ["active", "active"],
      ["inactive", "inactive"],
      ["maintenance", "maintenance"],
    ],
    state.status,
  );
  const connectionSelect = select(
    [
      ["", "Any"],
      ["online", "online"],
      ["offline", "offline"],
    ],
    state.connection,
  );
  const tbody = h("tbody");
  const tableElement = h(
    "table",
    { class: "devices" },
    h(
      "thead",
      {},
      h(
        "tr",
        {},
        [
          "Device",
          "Connection",
          "Last seen",
          "Name",
          "Type",
          "Status",
          "Location",
          ctx.canWrite ? "Actions" : null,
        ]
          .filter(Boolean)
          .map((text) => h("th", { scope: "col", text })),
      ),
    ),
    tbody,
  );
  const pages = createPager("Device pages", (offset) => {
    state.offset = offset;
    syncQuery();
    load();
  });
  let watched = null;
  const listView = h(
    "div",
    {},
    h(
      "div",
      { class: "toolbar", role: "search" },
      field("Search", search),
      field("Type", typeSelect),
      field("Status", statusSelect),
      field("Connection", connectionSelect),
    ),
    tableWrap(tableElement, "Devices"),
    pages.element,
  );
  const columns = ctx.canWrite ? 8 : 7;

  function syncQuery() {
    ctx.setQuery({ ...state, offset: state.offset || null });
  }

  function row(device) {
    const link = h("a", { href: `#/devices/${encodeURIComponent(device.id)}`, text: device.id });
    const cells = [
      h("th", { scope: "row" }, link),
      h("td", { dataset: { cell: "presence" } }, presenceElement(presence(device, onlineWindowS))),
      h("td", { class: "nowrap", dataset: { cell: "seen" } }, agoElement(device.last_seen_at)),
      h("td", { text: device.name }),
      h("td", { text: device.type }),
      h("td", { text: device.status }),
      h("td", { text: device.location ?? "" }),
    ];
    if (ctx.canWrite) {
      cells.push(
        h(
          "td",
          {},
          h(
            "div",
            { class: "row-actions" },
            button("Edit", () => showForm(device), { class: "small" }),
            button("Delete", () => remove(device), { class: "small danger" }),
          ),
        ),
      );
    }
    return h("tr", { dataset: { device: device.id } }, cells);
  }

  function showRows(page) {
    devices = page.items;
    tbody.replaceChildren(
      ...(devices.length ? devices.map(row) : [emptyRow(columns, "No device matches.")]),
    );
    pages.update({
      offset: page.offset,
      limit: PAGE_SIZE,
      total: page.total,
      shown: devices.length,
    });
    const ids = devices.slice(0, 100).map((device) => device.id);
    if (ids.join("\n") !== watched) {
      watched = ids.join("\n");
      if (ids.length) ctx.watch({ devices: ids }, onLive);
      else ctx.unwatch();
    }
  }

  async function load() {
    loadController?.abort();
    loadController = new AbortController();
    const signal = AbortSignal.any([ctx.signal, loadController.signal]);
    tableElement.setAttribute("aria-busy", "true");
    try {
      const page = await api.get(
        "/devices",
        {
          q: state.q.trim(),
          type: state.type,
          status: state.status,
          connected:
            state.connection === "online"
              ? "true"
              : state.connection === "offline"
                ? "false"
                : null,
          limit: PAGE_SIZE,
          offset: state.offset,
        },
        { signal },
      );
      if (page.items.length === 0 && state.offset > 0 && page.total > 0) {
        state.offset = Math.max(0, Math.floor((page.total - 1) / PAGE_SIZE) * PAGE_SIZE);
        syncQuery();
        return load();
      }
      ctx.clearError();
      showRows(page);
    } catch (error) {
      ctx.fail(error);
    } finally {
      tableElement.removeAttribute("aria-busy");
    }
  }

  function onLive(type, data) {
    if (type === "reopen" || type === "gap") {
      load(); // readings were missed: the list says when each device was last seen
      return;
    }
    if (type !== "readings" || !Array.isArray(data)) return;
    for (const reading of data) {
      const device = devices.find((item) => item.id === reading.device_id);
      if (!device) continue;
      if (!device.last_seen_at || Date.parse(reading.time) > Date.parse(device.last_seen_at)) {
        device.last_seen_at = reading.time;
      }
      const tr = [...tbody.rows].find((item) => item.dataset.device === device.id);
      if (!tr) continue;
      tr.querySelector('[data-cell="seen"]').replaceChildren(agoElement(device.last_seen_at));
      tr.querySelector('[data-cell="presence"]').replaceChildren(
        presenceElement(presence(device, onlineWindowS)),
      );
    }
  }

  async function loadTypes() {
    try {
      const stats = await api.get("/stats", {}, { signal: ctx.signal });
      onlineWindowS = await onlineWindow(stats);
      const names = new Set(Object.keys(stats.devices.by_type));
      if (state.type) names.add(state.type);
      typeSelect.replaceChildren(
        h("option", { value: "", text: "All types" }),
        ...[...names]
          .sort()
          .map((name) => h("option", { value: name, text: name, selected: name === state.type })),
      );
    } catch (error) {
      ctx.fail(error);
    }
  }

  function showList() {
    ctx.clearError();
    body.replaceChildren(listView);
    if (register) register.hidden = false;
  }

  function showForm(device) {
    ctx.clearError();
    ctx.unwatch();
    watched = null;
    if (register) register.hidden = true;
    deviceForm(ctx, body, {
      device,
      onCancel: () => {
        showList();
        load();
      },
      onDone: (saved) => {
        if (!device) {
          // Show the new device: with thousands registered it would not be on this page.
          state.q = saved.id;
          state.offset = 0;
          search.value = saved.id;
          syncQuery();
          ctx.notice(`Device ${saved.id} registered.`);
        } else {
          ctx.notice(`Device ${saved.id} saved.`);
        }
        showList();
        load();
      },
    });
  }

  async function remove(device) {
    if (
      !window.confirm(
        `Delete device ${device.id} with its configuration and alerts? Its telemetry and raw archive are kept.`,
      )
    )
      return;
    try {
      await api.delete(devicePath(device.id), { signal: ctx.signal });
      ctx.notice(`Device ${device.id} deleted.`);
      await load();
    } catch (error) {
      ctx.fail(error);
    }
  }

  const reload = debounce(() => load(), 250);
  search.addEventListener("input", () => {
    state.q = search.value;
    state.offset = 0;
    syncQuery();
    reload();
  });
  for (const [control, name] of [
    [typeSelect, "type"],
    [statusSelect, "status"],
    [connectionSelect, "connection"],
  ]) {
    control.addEventListener("change", () => {
      state[name] = control.value;
      state.offset = 0;
      syncQuery();
      load();
    });
  }

  showList();
  await Promise.all([load(), loadTypes()]);
  const ago = setInterval(() => refreshAgo(tbody), 5000);
  return () => {
    clearInterval(ago);
    loadController?.abort();
  };
}
