// The device page's lower sections: raw archived messages (each shown as stored, byte for
// byte), the configuration with its editor, and the device's alerts.

import { api, devicePath } from "../api.js";
import {
  button,
  createPager,
  emptyRow,
  field,
  formatTime,
  h,
  jsonText,
  severityBadge,
  statusBadge,
  table,
  tableWrap,
  timeElement,
} from "../dom.js";

const RAW_PAGE = 10;
const ALERTS_SHOWN = 20;
const PAYLOAD_MARK = ',"payload":';

/** `/raw/{key}` with each path segment of the key encoded. */
function rawPath(key) {
  return `/raw/${key.split("/").map(encodeURIComponent).join("/")}`;
}

/**
 * The archived document is `{"topic", "received_at", "batch_index", "payload": <as received>}`
 * with the payload's bytes spliced in as they came: cut them out to show them unchanged.
 */
function payloadOf(text) {
  const at = text.indexOf(PAYLOAD_MARK);
  if (at < 0 || !text.endsWith("}")) return text;
  return text.slice(at + PAYLOAD_MARK.length, -1);
}

export function rawSection(ctx, deviceId, section) {
  const list = h("ol", { class: "plain-list raw-list" });
  let cursors = [null]; // the `after` of each page seen; the last is the current page's
  let query = null;
  let nextCursor = null;
  const pages = createPager("Raw message pages", (offset) => {
    const index = offset / RAW_PAGE;
    if (index >= cursors.length) cursors.push(nextCursor);
    else cursors = cursors.slice(0, index + 1);
    load();
  });

  section.append(
    h(
      "div",
      { class: "section-header" },
      h("h2", { id: "raw-heading", text: "Raw messages" }),
      h("span", { class: "muted", text: "Oldest first, as archived" }),
    ),
    list,
    pages.element,
  );

  async function load() {
    const after = cursors[cursors.length - 1];
    list.setAttribute("aria-busy", "true");
    try {
      const page = await api.get(
        devicePath(deviceId, "/raw"),
        { ...query, limit: RAW_PAGE, after },
        { signal: ctx.signal },
      );
      nextCursor = page.next_cursor;
      const bodies = await Promise.all(
        page.items.map((item) =>
          api.get(rawPath(item.key), {}, { signal: ctx.signal, as: "text" }).catch(() => null),
        ),
      );
      list.replaceChildren(
        ...(page.items.length
          ? page.items.map((item, index) => {
              const stored = bodies[index];
              const text = stored === null ? jsonText(item.document?.payload) : payloadOf(stored);
              return h(
                "li",
                { class: "raw-item" },
                h(
                  "div",
                  { class: "raw-meta" },
                  h("time", { datetime: item.ts, class: "nowrap", text: formatTime(item.ts) }),
                  h("code", { class: "muted wrap-anywhere", text: item.document?.topic ?? "" }),
                ),
                h("pre", { class: "raw", text }),
              );
            })
          : [h("li", { class: "muted", text: "No archived message in this range." })]),
      );
      const offset = (cursors.length - 1) * RAW_PAGE;
      pages.update({
        offset,
        limit: RAW_PAGE,
        total: null,
        shown: page.items.length,
        more: Boolean(nextCursor),
      });
    } catch (error) {
      ctx.fail(error);
    } finally {
      list.removeAttribute("aria-busy");
    }
  }

  return {
    /** Shows the first page of the range (`{start, stop}` as the API takes them). */
    show(range) {
      query = range;
      cursors = [null];
      return load();
    },
  };
}

/** Text typed as a config value: JSON when it parses, else the text as a string. */
function valueOf(text) {
  try {
    return JSON.parse(text);
  } catch {
    return text;
  }
}

export function configSection(ctx, deviceId, section) {
  const summary = h("p", { class: "muted" });
  const tbody = h("tbody");
  const headers = ["Key", "Value", "Changed"];
  if (ctx.canWrite) headers.push("Actions");
  const keysTable = table(headers, []);
  keysTable.tBodies[0].replaceWith(tbody);
  section.append(
    h("h2", { id: "config-heading", text: "Configuration" }),
    summary,
    tableWrap(keysTable, "Configuration table"),
  );

  const keyInput = h("input", {
    name: "key",
    required: true,
    maxlength: "128",
    autocomplete: "off",
    spellcheck: "false",
  });
  const valueInput = h("input", {
    name: "value",
    required: true,
    autocomplete: "off",
    spellcheck: "false",
  });
  if (ctx.canWrite) {
    const save = h("button", { type: "submit", class: "primary", text: "Save" });
    const hint = h("p", {
      class: "hint",
      id: `config-value-hint`,
      text: 'Value: JSON (30, true, "fast", {"a": 1}); other text is kept as a string. Saving a key that exists replaces its value.',
    });
    valueInput.setAttribute("aria-describedby", hint.id);
    const form = h(
      "form",
      { class: "config-editor toolbar" },
      field("Key", keyInput),
      field("Value", valueInput),
      h("div", { class: "form-actions" }, save),
    );
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      const key = keyInput.value.trim();
      if (!key) {
        ctx.showError("Give the configuration key to set.");
        keyInput.focus();
        return;
      }
      save.disabled = true;
      try {
        await api.put(
          devicePath(deviceId, `/configs/${encodeURIComponent(key)}`),
          { value: valueOf(valueInput.value) },
          { signal: ctx.signal },
        );
        ctx.clearError();
        ctx.notice(`Configuration key ${key} saved.`);
        keyInput.value = "";
        valueInput.value = "";
        await load();
      } catch (error) {
        ctx.fail(error);
      } finally {
        save.disabled = false;
      }
    });
    section.append(h("h3", { class: "editor-heading", text: "Set a key" }), form, hint);
  }

  async function remove(key) {
    if (!window.confirm(`Remove the configuration key ${key}?`)) return;
    try {
      await api.delete(devicePath(deviceId, `/configs/${encodeURIComponent(key)}`), {
        signal: ctx.signal,
      });
      ctx.notice(`Configuration key ${key} removed.`);
      await load();
    } catch (error) {
      ctx.fail(error);
    }
  }

  async function load() {
    try {
      const state = await api.get(devicePath(deviceId, "/configs"), {}, { signal: ctx.signal });
      const sync = state.in_sync ? "in sync" : "not in sync";
      summary.textContent =
        `Desired version ${state.desired_version}, reported ` +
        `${state.reported_version ?? "none"}: ${sync}` +
        (state.reported_at ? ` (reported ${formatTime(state.reported_at)})` : "");
      tbody.replaceChildren(
        ...(state.items.length
          ? state.items.map((item) => {
              const text = jsonText(item.value);
              const cells = [
                h("th", { scope: "row", class: "mono", text: item.key }),
                h("td", {}, h("code", { class: "wrap-anywhere", text })),
                h("td", { class: "nowrap" }, timeElement(item.updated_at)),
              ];
              if (ctx.canWrite) {
                cells.push(
                  h(
                    "td",
                    {},
                    h(
                      "div",
                      { class: "row-actions" },
                      button(
                        ["Change", h("span", { class: "visually-hidden", text: ` ${item.key}` })],
                        () => {
                          keyInput.value = item.key;
                          valueInput.value = text;
                          valueInput.focus();
                        },
                        { class: "small" },
                      ),
                      button(
                        ["Remove", h("span", { class: "visually-hidden", text: ` ${item.key}` })],
                        () => remove(item.key),
                        {
                          class: "small danger",
                        },
                      ),
                    ),
                  ),
                );
              }
              return h("tr", {}, cells);
            })
          : [emptyRow(headers.length, "No configuration keys.")]),
      );
    } catch (error) {
      ctx.fail(error);
    }
  }

  return { load };
}

export function alertsSection(ctx, deviceId, section) {
  const tbody = h("tbody");
  const alertsTable = table(["Created", "Severity", "Status", "Message"], []);
  alertsTable.tBodies[0].replaceWith(tbody);
  const more = h("a", {
    href: `#/alerts?device=${encodeURIComponent(deviceId)}`,
    text: "Open in the alert list",
  });
  section.append(
    h("div", { class: "section-header" }, h("h2", { id: "alerts-heading", text: "Alerts" }), more),
    tableWrap(alertsTable, "Alerts of this device"),
  );

  async function load() {
    try {
      const page = await api.get(
        "/alerts",
        { device_id: deviceId, limit: ALERTS_SHOWN },
        { signal: ctx.signal },
      );
      tbody.replaceChildren(
        ...(page.items.length
          ? page.items.map((alert) =>
              h(
                "tr",
                {},
                h("td", { class: "nowrap" }, timeElement(alert.created_at)),
                h("td", {}, severityBadge(alert.severity)),
                h("td", {}, statusBadge(alert.status)),
                h("td", { class: "text", text: alert.message }),
              ),
            )
          : [emptyRow(4, "No alerts for this device.")]),
      );
      if (page.total > page.items.length) {
        tbody.append(emptyRow(4, `The ${page.items.length} newest of ${page.total} are shown.`));
      }
    } catch (error) {
      ctx.fail(error);
    }
  }

  return { load };
}
