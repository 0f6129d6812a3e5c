// One device: its facts, latest values, live charts, raw messages, configuration and alerts.
// Watches the device on the live stream; a gap or a reconnect refetches the charts.

import { api, devicePath } from "../api.js";
import { agoElement, button, formatTime, h, jsonText, refreshAgo } from "../dom.js";
import { deviceCharts } from "./device_charts.js";
import { deviceForm } from "./device_form.js";
import { alertsSection, configSection, rawSection } from "./device_sections.js";
import { onlineWindow, presence, presenceElement } from "./devices.js";

export async function render(ctx) {
  const deviceId = ctx.params[0];
  const edit = ctx.canWrite ? button("Edit", () => showForm()) : null;
  const remove = ctx.canWrite ? button("Delete", () => removeDevice(), { class: "danger" }) : null;
  ctx.title(deviceId, edit, remove);

  const facts = h("dl", { class: "facts" });
  // Not labelled by its heading: "Latest values" would also answer to the label "Value".
  const latestSection = h("section", { class: "panel" });
  const chartsSection = h("section", { class: "panel", "aria-labelledby": "charts-heading" });
  const rawPanel = h("section", { class: "panel", "aria-labelledby": "raw-heading" });
  const configPanel = h("section", { class: "panel", "aria-labelledby": "config-heading" });
  const alertsPanel = h("section", { class: "panel", "aria-labelledby": "alerts-heading" });
  const content = h(
    "div",
    {},
    facts,
    latestSection,
    chartsSection,
    rawPanel,
    configPanel,
    alertsPanel,
  );
  const formSlot = h("div", { hidden: true });
  ctx.root.append(content, formSlot);

  let device = null;
  let onlineWindowS = 300;

  const raw = rawSection(ctx, deviceId, rawPanel);
  const charts = deviceCharts(ctx, deviceId, {
    chartsSection,
    latestSection,
    onRangeChange: (range) => raw.show(range.query()),
  });
  const config = configSection(ctx, deviceId, configPanel);
  const alerts = alertsSection(ctx, deviceId, alertsPanel);

  function fact(label, value) {
    return h("div", {}, h("dt", { text: label }), h("dd", {}, value));
  }

  function showFacts() {
    if (!device) return;
    facts.replaceChildren(
      fact("Name", device.name),
      fact("Type", device.type),
      fact("Status", device.status),
      fact("Connection", presenceElement(presence(device, onlineWindowS))),
      fact("Last seen", agoElement(device.last_seen_at)),
      fact("Location", device.location ?? "—"),
      fact("Configuration", device.config_in_sync ? "in sync" : "not in sync"),
      fact("Registered", formatTime(device.created_at)),
      Object.keys(device.metadata ?? {}).length
        ? fact("Metadata", h("code", { class: "wrap-anywhere", text: jsonText(device.metadata) }))
        : null,
    );
  }

  async function loadDevice() {
    device = await api.get(devicePath(deviceId), {}, { signal: ctx.signal });
    showFacts();
  }

  function showForm() {
    if (!device) return;
    ctx.clearError();
    content.hidden = true;
    formSlot.hidden = false;
    edit.hidden = true;
    remove.hidden = true;
    const back = () => {
      formSlot.replaceChildren();
      formSlot.hidden = true;
      content.hidden = false;
      edit.hidden = false;
      remove.hidden = false;
      edit.focus();
    };
    deviceForm(ctx, formSlot, {
      device,
      onCancel: back,
      onDone: (saved) => {
        device = saved;
        showFacts();
        ctx.notice(`Device ${saved.id} saved.`);
        back();
      },
    });
  }

  async function removeDevice() {
    if (
      !window.confirm(
        `Delete device ${deviceId} with its configuration and alerts? Its telemetry and raw archive are kept.`,
      )
    )
      return;
    try {
      await api.delete(devicePath(deviceId), { signal: ctx.signal });
      ctx.navigate("#/devices", `Device ${deviceId} deleted.`);
    } catch (error) {
      ctx.fail(error);
    }
  }

  function onLive(type, data) {
    if (type === "readings" && Array.isArray(data)) {
      const mine = data.filter((reading) => reading.device_id === deviceId);
      if (!mine.length) return;
      charts.onReadings(mine);
      if (device) {
        const newest = mine[mine.length - 1].time;
        if (!device.last_seen_at || Date.parse(newest) > Date.parse(device.last_seen_at)) {
          device.last_seen_at = newest;
          showFacts();
        }
      }
    } else if (type === "gap" || type === "reopen") {
      charts.refetch();
    }
  }

  try {
    await loadDevice();
  } catch (error) {
    ctx.fail(error);
    if (error.status === 404) {
      content.replaceChildren(
        h("p", {}, h("a", { href: "#/devices", text: "Back to the device list" })),
      );
      if (edit) edit.hidden = true;
      if (remove) remove.hidden = true;
      return undefined;
    }
  }
  ctx.watch({ devices: [deviceId] }, onLive);
  onlineWindow().then((seconds) => {
    onlineWindowS = seconds;
    showFacts();
  });
  await Promise.all([charts.start(), raw.show(charts.range.query()), config.load(), alerts.load()]);
  const ago = setInterval(() => refreshAgo(facts), 5000);
  return () => {
    clearInterval(ago);
    charts.destroy();
  };
}
