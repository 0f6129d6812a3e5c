// The alert rule editor: create (POST /alert-rules) or change (PATCH, only what changed).
// Only the fields the chosen kind uses are shown; the API says what is missing or wrong.

import { api } from "../api.js";
import { button, field, h, select } from "../dom.js";

const KINDS = [
  ["threshold", "threshold: a value past a limit"],
  ["rate_of_change", "rate_of_change: a value changing too fast"],
  ["no_data", "no_data: a device gone silent"],
  ["anomaly", "anomaly: a value far from its recent mean"],
];
const OPERATORS = [">", ">=", "<", "<=", "outside"].map((name) => [name, name]);
const SEVERITIES = ["info", "warning", "critical"].map((name) => [name, name]);
const SCOPES = [
  ["device", "One device"],
  ["type", "Every device of a type"],
  ["all", "Every device"],
];
const DEFAULT_MESSAGE = "{rule}: {device} {field} = {value} ({threshold})";

/** Which numeric and text inputs each kind uses (besides name, scope, severity, message...). */
const USES = {
  threshold: ["field", "operator", "limits", "hysteresis", "duration_s"],
  rate_of_change: ["field", "operator", "limits", "hysteresis", "duration_s"],
  no_data: ["timeout_s"],
  anomaly: ["field", "k", "half_life", "warmup", "duration_s"],
};

function numberInput(name, value, step = "any") {
  return h("input", { type: "number", name, step, value: value ?? "", inputmode: "decimal" });
}

export function ruleForm(ctx, container, { rule, onDone, onCancel }) {
  const editing = Boolean(rule);
  const inputs = {
    name: h("input", { name: "name", required: true, maxlength: "200", value: rule?.name ?? "" }),
    kind: select(KINDS, rule?.kind ?? "threshold", { name: "kind", disabled: editing }),
    scope: select(
      SCOPES,
      rule ? (rule.device_id ? "device" : rule.device_type ? "type" : "all") : "device",
      { name: "scope" },
    ),
    device_id: h("input", {
      name: "device_id",
      maxlength: "64",
      value: rule?.device_id ?? "",
      autocomplete: "off",
      spellcheck: "false",
    }),
    device_type: h("input", {
      name: "device_type",
      maxlength: "32",
      value: rule?.device_type ?? "",
      autocomplete: "off",
      spellcheck: "false",
    }),
    field: h("input", {
      name: "field",
      maxlength: "64",
      value: rule?.field ?? "",
      autocomplete: "off",
      spellcheck: "false",
    }),
    operator: select(OPERATORS, rule?.operator ?? ">", { name: "operator" }),
    threshold: numberInput("threshold", rule?.threshold),
    low: numberInput("low", rule?.low),
    high: numberInput("high", rule?.high),
    hysteresis: numberInput("hysteresis", rule?.hysteresis ?? 0),
    duration_s: numberInput("duration_s", rule?.duration_s ?? 0),
    timeout_s: numberInput("timeout_s", rule?.timeout_s),
    k: numberInput("k", rule?.k ?? 3),
    half_life: numberInput("half_life", rule?.half_life ?? 50, "1"),
    warmup: numberInput("warmup", rule?.warmup ?? 20, "1"),
    flap_window_s: numberInput("flap_window_s", rule?.flap_window_s ?? 0),
    severity: select(SEVERITIES, rule?.severity ?? "warning", { name: "severity" }),
    message: h("input", {
      name: "message",
      maxlength: "500",
      value: rule?.message ?? DEFAULT_MESSAGE,
    }),
    enabled: h("input", { type: "checkbox", name: "enabled", checked: rule ? rule.enabled : true }),
  };
  const wrappers = {
    device_id: field("Device ID", inputs.device_id),
    device_type: field("Device type", inputs.device_type, "temperature, humidity, power_meter…"),
    field: field("Field", inputs.field, "The reading's name, e.g. temperature."),
    operator: field("Operator", inputs.operator),
    threshold: field("Threshold", inputs.threshold),
    low: field("Low", inputs.low),
    high: field("High", inputs.high),
    hysteresis: field(
      "Hysteresis",
      inputs.hysteresis,
      "How far back inside the value must come to clear.",
    ),
    duration_s: field(
      "Duration (s)",
      inputs.duration_s,
      "How long the condition must hold before firing.",
    ),
    timeout_s: field("Timeout (s)", inputs.timeout_s, "Seconds of silence before it fires."),
    k: field("k (standard deviations)", inputs.k),
    half_life: field("Half-life (readings)", inputs.half_life),
    warmup: field("Warm-up (readings)", inputs.warmup),
  };

  function shown(name) {
    const kind = inputs.kind.value;
    const uses = USES[kind];
    const outside = inputs.operator.value === "outside";
    if (name === "device_id") return inputs.scope.value === "device";
    if (name === "device_type") return inputs.scope.value === "type";
    if (name === "threshold") return uses.includes("limits") && !outside;
    if (name === "low" || name === "high") return uses.includes("limits") && outside;
    return uses.includes(name);
  }

  function refresh() {
    for (const [name, wrapper] of Object.entries(wrappers)) wrapper.hidden = !shown(name);
  }

  const save = h("button", { type: "submit", class: "primary", text: "Save" });
  const form = h(
    "form",
    { class: "card form", novalidate: true },
    h("h2", { text: editing ? `Edit rule ${rule.name}` : "New rule" }),
    h(
      "div",
      { class: "form-grid" },
      field("Name", inputs.name),
      field(
        "Kind",
        inputs.kind,
        editing ? "The kind of a rule cannot change; make a new rule." : null,
      ),
      field("Scope", inputs.scope),
      wrappers.device_id,
      wrappers.device_type,
      wrappers.field,
      wrappers.operator,
      wrappers.threshold,
      wrappers.low,
      wrappers.high,
      wrappers.hysteresis,
      wrappers.duration_s,
      wrappers.timeout_s,
      wrappers.k,
      wrappers.half_life,
      wrappers.warmup,
      field(
        "Flap window (s)",
        inputs.flap_window_s,
        "After an alert resolves, no new one for this long.",
      ),
      field("Severity", inputs.severity),
      h(
        "div",
        { class: "wide" },
        field(
          "Message",
          inputs.message,
          "{device}, {field}, {value}, {threshold}, {rule} and {severity} are filled in.",
        ),
      ),
      field("Enabled", inputs.enabled),
    ),
    h("div", { class: "form-actions" }, save, button("Cancel", onCancel)),
  );
  for (const control of [inputs.kind, inputs.scope, inputs.operator])
    control.addEventListener("change", refresh);
  refresh();

  /** The rule's values as the API takes them; `null` for an empty input. */
  function values() {
    const number = (name) => (inputs[name].value.trim() === "" ? null : Number(inputs[name].value));
    const text = (name) => inputs[name].value.trim() || null;
    const kind = inputs.kind.value;
    const all = {
      name: inputs.name.value.trim(),
      kind,
      device_id: inputs.scope.value === "device" ? text("device_id") : null,
      device_type: inputs.scope.value === "type" ? text("device_type") : null,
      severity: inputs.severity.value,
      message: inputs.message.value,
      enabled: inputs.enabled.checked,
      flap_window_s: number("flap_window_s") ?? 0,
    };
    for (const name of ["field", "operator"])
      if (shown(name)) all[name] = inputs[name].value.trim() || null;
    for (const name of [
      "threshold",
      "low",
      "high",
      "hysteresis",
      "duration_s",
      "timeout_s",
      "k",
      "half_life",
      "warmup",
    ]) {
      if (shown(name)) all[name] = number(name);
    }
    if (all.hysteresis === null) all.hysteresis = 0;
    if (all.duration_s === null) all.duration_s = 0;
    return all;
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    ctx.clearError();
    const all = values();
    const bad = Object.entries(all).find(
      ([, value]) => typeof value === "number" && !Number.isFinite(value),
    );
    if (bad) {
      ctx.showError(`${bad[0]} is not a number.`);
      return;
    }
    save.disabled = true;
    try {
      let saved;
      if (editing) {
        const changes = {};
        for (const [name, value] of Object.entries(all)) {
          if (name !== "kind" && value !== (rule[name] ?? null)) changes[name] = value;
        }
        saved = Object.keys(changes).length
          ? await api.patch(`/alert-rules/${rule.id}`, changes, { signal: ctx.signal })
          : rule;
      } else {
        const body = Object.fromEntries(Object.entries(all).filter(([, value]) => value !== null));
        saved = await api.post("/alert-rules", body, { signal: ctx.signal });
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
  inputs.name.focus();
}
