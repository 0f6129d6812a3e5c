// The API client: the key from the sign-in form, JSON in and out, the API's error messages,
// and the live event stream (fetch + a reader: EventSource cannot send the Authorization header).

const KEY_STORAGE = "iotmeter.apiKey";
const API = "/api/v1";

/** The API key of this tab (sessionStorage: gone when the tab closes). */
export const credentials = {
  get key() {
    return sessionStorage.getItem(KEY_STORAGE);
  },
  set(key) {
    sessionStorage.setItem(KEY_STORAGE, key);
  },
  clear() {
    sessionStorage.removeItem(KEY_STORAGE);
  },
};

let unauthorized = () => {};

/** Called when the API answers 401: the key is unknown, revoked or expired. */
export function onUnauthorized(handler) {
  unauthorized = handler;
}

export class ApiError extends Error {
  constructor(message, status, code) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.code = code;
  }
}

export function isAbort(error) {
  return error?.name === "AbortError";
}

/** `path` below /api/v1 with the query's set values (arrays repeat the parameter). */
export function apiUrl(path, query = {}) {
  const params = new URLSearchParams();
  for (const [name, value] of Object.entries(query)) {
    for (const item of Array.isArray(value) ? value : [value]) {
      if (item !== undefined && item !== null && item !== "") params.append(name, String(item));
    }
  }
  const text = params.toString();
  return `${API}${path}${text ? `?${text}` : ""}`;
}

function authHeaders() {
  const key = credentials.key;
  return key ? { Authorization: `Bearer ${key}` } : {};
}

async function errorOf(response) {
  let message = `${response.status} ${response.statusText}`.trim();
  let code = "http_error";
  try {
    const body = await response.json();
    if (body?.error?.message) {
      message = body.error.message;
      code = body.error.code ?? code;
    } else if (typeof body?.detail === "string") {
      message = body.detail;
    }
  } catch {
    // Not JSON (a proxy's page): the status line says enough.
  }
  if (response.status === 429) {
    const wait = response.headers.get("Retry-After");
    if (wait) message += ` (try again in ${wait} s)`;
  }
  return new ApiError(message, response.status, code);
}

/**
 * One API call. `as`: "json" (default), "text" or "blob". Answers 204 with null.
 * Throws ApiError with the API's own message, or the fetch's AbortError.
 */
export async function request(path, { method = "GET", query, body, signal, as = "json" } = {}) {
  const headers = { ...authHeaders(), Accept: as === "json" ? "application/json" : "*/*" };
  const init = { method, headers, signal, cache: "no-store" };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(apiUrl(path, query), init);
  } catch (error) {
    if (isAbort(error)) throw error;
    throw new ApiError(
      "Cannot reach the server; check the connection and try again.",
      0,
      "network",
    );
  }
  if (response.status === 401) {
    const error = await errorOf(response);
    unauthorized(error);
    throw error;
  }
  if (!response.ok) throw await errorOf(response);
  if (response.status === 204) return null;
  if (as === "text") return response.text();
  if (as === "blob") return response.blob();
  return response.json();
}

export const api = {
  get: (path, query, options = {}) => request(path, { ...options, query }),
  post: (path, body, options = {}) => request(path, { ...options, method: "POST", body }),
  put: (path, body, options = {}) => request(path, { ...options, method: "PUT", body }),
  patch: (path, body, options = {}) => request(path, { ...options, method: "PATCH", body }),
  delete: (path, options = {}) => request(path, { ...options, method: "DELETE" }),
};

/** `/devices/{id}` with the id encoded. */
export function devicePath(deviceId, rest = "") {
  return `/devices/${encodeURIComponent(deviceId)}${rest}`;
}

// --- server-sent events -----------------------------------------------------------------

/** Reads a text/event-stream body, calling `dispatch(type, data)` per event. */
export async function readEvents(body, dispatch) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let type = "";
  let data = [];
  const line = (text) => {
    if (text === "") {
      if (data.length) dispatch(type || "message", data.join("\n"));
      type = "";
      data = [];
      return;
    }
    if (text.startsWith(":")) return; // a keep-alive comment
    const colon = text.indexOf(":");
    const name = colon < 0 ? text : text.slice(0, colon);
    let value = colon < 0 ? "" : text.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (name === "event") type = value;
    else if (name === "data") data.push(value);
  };
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let start = 0;
    for (let index = 0; index < buffer.length; index++) {
      const char = buffer[index];
      if (char !== "\n" && char !== "\r") continue;
      // A "\r" at the end may be the first half of "\r\n": wait for the next chunk.
      if (char === "\r" && index === buffer.length - 1) break;
      line(buffer.slice(start, index));
      if (char === "\r" && buffer[index + 1] === "\n") index++;
      start = index + 1;
    }
    buffer = buffer.slice(start);
  }
}

const MAX_BACKOFF_MS = 30_000;
const STABLE_AFTER_MS = 10_000;

function sleep(ms, signal) {
  return new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    signal.addEventListener("abort", () => {
      clearTimeout(timer);
      resolve();
    });
  });
}

/**
 * The tab's one live stream (`GET /api/v1/live`). `open()` replaces what it watches;
 * `onState` hears "connecting" (first try), "live", "reconnecting", or null when closed. After a reconnect the
 * handler hears a "reopen" event: readings may have been missed meanwhile.
 */
export class LiveStream {
  constructor(onState) {
    this.onState = onState;
    this.controller = null;
  }

  open({ devices = [], stats = false }, onEvent) {
    this.close();
    const controller = new AbortController();
    this.controller = controller;
    const url = apiUrl("/live", { device_id: devices.slice(0, 100), stats: stats ? "true" : null });
    this.run(url, onEvent, controller.signal);
  }

  close() {
    if (this.controller) {
      this.controller.abort();
      this.controller = null;
    }
    this.onState(null);
  }

  async run(url, onEvent, signal) {
    let failures = 0;
    let opened = false;
    while (!signal.aborted) {
      this.onState(opened || failures ? "reconnecting" : "connecting");
      let openedAt = 0;
      try {
        const response = await fetch(url, {
          headers: { ...authHeaders(), Accept: "text/event-stream" },
          cache: "no-store",
          signal,
        });
        if (response.status === 401) {
          unauthorized(await errorOf(response));
          return;
        }
        if (response.ok && response.body) {
          openedAt = Date.now();
          this.onState("live");
          if (opened) onEvent("reopen", null);
          opened = true;
          await readEvents(response.body, (type, text) => {
            if (signal.aborted) return;
            let data = null;
            try {
              data = JSON.parse(text);
            } catch {
              return;
            }
            onEvent(type, data);
          });
        } else {
          await response.body?.cancel();
        }
      } catch {
        if (signal.aborted) return;
        // A dropped connection: try again below.
      }
      if (signal.aborted) return;
      failures = openedAt && Date.now() - openedAt > STABLE_AFTER_MS ? 0 : failures + 1;
      this.onState("reconnecting");
      const delay = Math.min(MAX_BACKOFF_MS, 500 * 2 ** failures) * (0.8 + Math.random() * 0.4);
      await sleep(delay, signal);
    }
  }
}
