// The shell: sign-in, the main navigation, the hash router, the error region and the live
// stream's state. Each page is a module in pages/, loaded when first visited.

import { ApiError, LiveStream, api, credentials, isAbort, onUnauthorized } from "./api.js";
import { button, clear, field, h } from "./dom.js";

const ROUTES = [
  { pattern: /^\/?$/, page: "overview", nav: "overview" },
  { pattern: /^\/devices\/?$/, page: "devices", nav: "devices" },
  { pattern: /^\/devices\/([^/]+)\/?$/, page: "device", nav: "devices" },
  { pattern: /^\/alerts\/?$/, page: "alerts", nav: "alerts" },
  { pattern: /^\/rules\/?$/, page: "rules", nav: "rules" },
  { pattern: /^\/dead-letters\/?$/, page: "dead_letters", nav: "dead-letters" },
];

const elements = {
  nav: document.getElementById("nav"),
  session: document.getElementById("session"),
  live: document.getElementById("live-status"),
  who: document.getElementById("who"),
  signOut: document.getElementById("sign-out"),
  error: document.getElementById("error"),
  errorText: document.getElementById("error-text"),
  notice: document.getElementById("notice"),
  page: document.getElementById("page"),
  main: document.getElementById("main"),
};

let user = null;
let current = null; // {controller, cleanup}
let rendered = 0;
let pendingNotice = null; // shown by the next page (a page that navigates away says why)

const live = new LiveStream((state) => {
  elements.live.hidden = state === null;
  if (state) {
    elements.live.textContent = state;
    elements.live.dataset.state = state;
  }
});

// --- messages -------------------------------------------------------------------------------

export function showError(message) {
  elements.errorText.textContent = message;
  elements.error.hidden = false;
}

export function clearError() {
  elements.errorText.textContent = "";
  elements.error.hidden = true;
}

let noticeTimer = 0;
export function notice(message) {
  clearTimeout(noticeTimer);
  elements.notice.textContent = message;
  elements.notice.hidden = !message;
  if (message) noticeTimer = setTimeout(() => notice(""), 8000);
}

// --- the hash: path and query ---------------------------------------------------------------

function parseHash() {
  const text = location.hash.replace(/^#/, "") || "/";
  const [path, search = ""] = text.split("?", 2);
  return { path, query: new URLSearchParams(search) };
}

/** Replaces the hash's query without a new history entry or a re-render. */
function setQuery(values) {
  const { path } = parseHash();
  const params = new URLSearchParams();
  for (const [name, value] of Object.entries(values)) {
    if (value !== undefined && value !== null && value !== "") params.set(name, String(value));
  }
  const search = params.toString();
  history.replaceState(history.state, "", `#${path}${search ? `?${search}` : ""}`);
}

// --- pages ----------------------------------------------------------------------------------

function leavePage() {
  if (!current) return;
  current.controller.abort();
  try {
    current.cleanup?.();
  } catch (error) {
    console.warn("page cleanup failed", error);
  }
  current = null;
  live.close();
}

function setNav(active) {
  for (const link of elements.nav.querySelectorAll("a[data-nav]")) {
    if (link.dataset.nav === active) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
}

async function route() {
  if (!user) return;
  leavePage();
  clearError();
  notice(pendingNotice ?? "");
  pendingNotice = null;
  const { path, query } = parseHash();
  const found = ROUTES.map((entry) => ({ entry, match: entry.pattern.exec(path) })).find(
    (item) => item.match,
  );
  const controller = new AbortController();
  current = { controller, cleanup: null };
  const focus = rendered > 0;
  rendered += 1;
  // Each page renders into a root of its own: a page left while it still loads writes
  // into a detached element, never into the next page.
  const root = h("div", { class: "page" });
  clear(elements.page).append(root);
  const title = (text, ...actions) => pageTitle(root, text, actions);
  if (!found) {
    setNav(null);
    const heading = title("Not found");
    root.append(
      h(
        "p",
        {},
        "There is no page here. ",
        h("a", { href: "#/", text: "Go to the overview" }),
        ".",
      ),
    );
    if (focus) heading.focus();
    return;
  }
  setNav(found.entry.nav);
  const params = found.match.slice(1).map((part) => decodeURIComponent(part));
  const ctx = {
    params,
    query,
    signal: controller.signal,
    role: user.role,
    canWrite: user.role === "operator" || user.role === "admin",
    root,
    title,
    setQuery,
    navigate: (hash, message) => {
      pendingNotice = message ?? null;
      location.hash = hash;
    },
    showError,
    clearError,
    notice,
    fail: (error) => {
      if (isAbort(error) || controller.signal.aborted) return;
      showError(
        error instanceof ApiError ? error.message : `Something went wrong: ${error.message}`,
      );
      if (!(error instanceof ApiError)) console.error(error);
    },
    watch: (what, onEvent) => {
      if (!controller.signal.aborted) live.open(what, onEvent);
    },
    unwatch: () => live.close(),
  };
  root.append(h("p", { class: "muted loading", text: "Loading…" }));
  try {
    const module = await import(`./pages/${found.entry.page}.js`);
    if (controller.signal.aborted) return;
    clear(root);
    const cleanup = await module.render(ctx);
    if (controller.signal.aborted) {
      cleanup?.();
      return;
    }
    current.cleanup = cleanup ?? null;
    if (focus && !root.contains(document.activeElement)) root.querySelector("h1")?.focus();
  } catch (error) {
    ctx.fail(error);
  }
}

/** The page's `<h1>` (focusable, so a route change can move focus to it) and its buttons. */
function pageTitle(root, text, actions) {
  const heading = h("h1", { tabindex: "-1", text });
  const header = h("div", { class: "page-header" }, heading);
  const shown = actions.filter(Boolean);
  if (shown.length) header.append(h("div", { class: "page-actions" }, shown));
  root.append(header);
  document.title = `${text} · iotmeter`;
  return heading;
}

// --- signing in -----------------------------------------------------------------------------

function showSignIn(message) {
  leavePage();
  user = null;
  elements.nav.hidden = true;
  elements.session.hidden = true;
  clear(elements.page);
  clearError();
  if (message) showError(message);
  const input = h("input", {
    type: "password",
    name: "api-key",
    autocomplete: "off",
    spellcheck: "false",
    required: true,
  });
  const submit = h("button", { type: "submit", class: "primary", text: "Sign in" });
  const form = h(
    "form",
    { class: "card sign-in" },
    h("h1", { tabindex: "-1", text: "Sign in" }),
    h("p", {
      class: "muted",
      text: "The dashboard reads and changes data through the API with your key.",
    }),
    field("API key", input, "Kept in this browser tab only; it is forgotten when the tab closes."),
    h("div", { class: "form-actions" }, submit),
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const key = input.value.trim();
    if (!key) return;
    submit.disabled = true;
    clearError();
    credentials.set(key);
    try {
      await signedIn(await api.get("/whoami"));
    } catch (error) {
      credentials.clear();
      showError(error instanceof ApiError ? error.message : String(error));
      input.focus();
    } finally {
      submit.disabled = false;
    }
  });
  elements.page.append(form);
  document.title = "Sign in · iotmeter";
  input.focus();
}

async function signedIn(whoami) {
  user = whoami;
  elements.nav.hidden = false;
  elements.session.hidden = false;
  elements.who.textContent = whoami.auth === "off" ? "authentication off" : `${whoami.role}`;
  elements.who.title = whoami.actor;
  elements.signOut.hidden = whoami.auth === "off";
  await route();
}

function signOut(message) {
  credentials.clear();
  showSignIn(message);
}

onUnauthorized((error) => {
  // During sign-in the form shows the error itself.
  if (user) signOut(`Signed out: ${error.message}`);
});

/**
 * Whether the API serves without a key. Asked without a key, /ready tells its backends only
 * when authentication is off; this spares a 401 on every first visit.
 */
async function authIsOff() {
  try {
    const response = await fetch("/ready", {
      cache: "no-store",
      headers: { Accept: "application/json" },
    });
    const body = await response.json();
    return Boolean(body?.backends);
  } catch {
    return false;
  }
}

async function start() {
  elements.signOut.addEventListener("click", () => signOut());
  document.getElementById("error-dismiss").addEventListener("click", clearError);
  document.querySelector(".skip-link").addEventListener("click", (event) => {
    event.preventDefault();
    elements.main.focus();
  });
  window.addEventListener("hashchange", route);
  if (!credentials.key && !(await authIsOff())) {
    showSignIn();
    return;
  }
  try {
    await signedIn(await api.get("/whoami"));
  } catch (error) {
    if (error instanceof ApiError && error.status === 401) {
      const hadKey = Boolean(credentials.key);
      credentials.clear();
      showSignIn(hadKey ? error.message : null);
    } else {
      clear(elements.page);
      showError(`The dashboard could not start: ${error.message}`);
      elements.page.append(button("Try again", () => location.reload()));
    }
  }
}

start();
