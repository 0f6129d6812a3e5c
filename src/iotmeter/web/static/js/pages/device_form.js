// The device form: register (POST /devices) or edit (PATCH /devices/{id}, only what changed).
// Shown in place of the page's content, so its "Type" and "Status" are the only ones there.

import { api, devicePath } from "../api.js";
import { button, field, h, jsonText, select } from "../dom.js";

const STATUSES = ["active", "inactive", "maintenance"];

/**
 * Renders the form into `container`; `onDone(device)` after a save, `onCancel()` otherwise.
 * `device`: the device to edit, or null to register one.
 */
export function deviceForm(ctx, container, { device, onDone, onCancel }) {
  const editing = Boolean(device);
  const idInput = h("input", {
    name: "id",
    required: true,
    maxlength: "64",
    pattern: "[A-Za-z0-9_.\\-]{1,64}",
    autocomplete: "off",
    spellcheck: "false",
  });
  const nameInput = h("input", {
    name: "name",
    required: true,
    maxlength: "200",
    value: device?.name ?? "",
  });
  const typeInput = h("input", {
    name: "type",
    required: true,
    maxlength: "32",
    pattern: "[a-z0-9_]+",
    list: "device-type-options",
    value: device?.type ?? "",
    autocomplete: "off",
  });
  const types = h(
    "datalist",
    { id: "device-type-options" },
    ["temperature", "humidity", "power_meter"].map((name) => h("option", { value: name })),
  );
  const locationInput = h("input", {
    name: "location",
    maxlength: "200",
    value: device?.location ?? "",
  });
  const statusSelect = select(
    STATUSES.map((name) => [name, name]),
    device?.status ?? "active",
    { name: "status" },
  );
  const metadataInput = h("textarea", { name: "metadata", rows: "4", spellcheck: "false" });
  metadataInput.value = jsonText(device?.metadata ?? {}, 2);

  const save = h("button", { type: "submit", class: "primary", text: "Save" });
  const form = h(
    "form",
    { class: "card form", novalidate: true },
    h("h2", { text: editing ? `Edit device ${device.id}` : "Register device" }),
    h(
      "div",
      { class: "form-grid" },
      editing
        ? null
        : field(
            "Device ID",
            idInput,
            "1-64 letters, digits, '-', '_' or '.': the id in MQTT topics.",
          ),
      field("Name", nameInput),
      field("Type", typeInput, "A lowercase word: temperature, humidity, power_meter…"),
      field("Location", locationInput),
      field("Status", statusSelect),
      h("div", { class: "wide" }, field("Metadata (JSON object)", metadataInput)),
    ),
    types,
    h("div", { class: "form-actions" }, save, button("Cancel", onCancel)),
  );

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    ctx.clearError();
    let metadata;
    try {
      metadata = metadataInput.value.trim() ? JSON.parse(metadataInput.value) : {};
    } catch (error) {
      ctx.showError(`Metadata is not valid JSON: ${error.message}`);
      metadataInput.focus();
      return;
    }
    if (metadata === null || typeof metadata !== "object" || Array.isArray(metadata)) {
      ctx.showError('Metadata must be a JSON object, like {"floor": 2}.');
      metadataInput.focus();
      return;
    }
    const values = {
      name: nameInput.value.trim(),
      type: typeInput.value.trim(),
      location: locationInput.value.trim() || null,
      status: statusSelect.value,
      metadata,
    };
    save.disabled = true;
    try {
      let saved;
      if (editing) {
        const changes = {};
        for (const [name, value] of Object.entries(values)) {
          if (jsonText(value) !== jsonText(device[name] ?? null)) changes[name] = value;
        }
        saved = Object.keys(changes).length
          ? await api.patch(devicePath(device.id), changes, { signal: ctx.signal })
          : device;
      } else {
        if (values.location === null) delete values.location;
        saved = await api.post(
          "/devices",
          { id: idInput.value.trim(), ...values },
          { signal: ctx.signal },
        );
      }
      onDone(saved);
    } catch (error) {
      ctx.fail(error);
    } finally {
      save.disabled = false;
    }
  });

  form.addEventListener("keydown", (event) => {
    if (event.key === "Escape") onCancel();
  });
  container.replaceChildren(form);
  (editing ? nameInput : idInput).focus();
}
