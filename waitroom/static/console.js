// The operators' console: sign in with an admin token, pick a sale, watch it live, steer it.
// Plain ES module, no build step, no library; talks to this origin only.
//
// The token lives in sessionStorage (this tab only) and goes out as Authorization: Bearer.
// The live figures come from GET /v1/admin/events/{id}/live, a Server-Sent Events stream read
// with fetch() (EventSource cannot send the Authorization header); the controls call the
// same admin API as the CLI (PATCH .../admission, POST /v1/admin/passes/{jti}/revoke).

import { $, ApiError, api, announcer, backoffMs, el, formatCount, setText, show, store } from "./common.js";

const TOKEN_KEY = "waitroom:admin-token";
const WINDOW_S = 300; // the charts show the last five minutes
const STALE_MS = 6000; // no sample for this long: the stream is reconnected
const AUDIT_PAGE = 25;

const say = announcer("announcer", 2000);
const state = {
  token: store.get(TOKEN_KEY),
  events: [],
  eventId: null,
  stream: null, // AbortController of the open stream
  attempt: 0,
  lastSampleAt: 0,
  last: null, // the latest sample
  series: { line: [], admitted: [], sold: [], held: [] },
  auditBefore: null,
  filled: false, // the control inputs were filled from the sale's settings
};

// --- the API with the operator's token ------------------------------------------------------

const auth = () => ({ Authorization: `Bearer ${state.token}` });
const adminApi = (path, options = {}) =>
  api(path, { ...options, headers: { ...(options.headers || {}), ...auth() } });
const eventPath = (id) => `/v1/admin/events/${encodeURIComponent(id)}`;

/** An answer that means the token is wrong (or the admin API off): back to the sign-in form. */
function refused(error) {
  if (error instanceof ApiError && error.status === 401) {
    signOut(error.message);
    return true;
  }
  return false;
}

// --- signing in and out -----------------------------------------------------------------------

function showLogin(message) {
  show("app", false);
  show("sign-out", false);
  show("login");
  setConnection("idle", "Not connected");
  setText("login-error", message || "");
  show("login-error", Boolean(message));
  $("token").focus();
}

function signOut(message) {
  stopStream();
  state.token = null;
  store.remove(TOKEN_KEY);
  showLogin(message);
}

async function signIn(token) {
  state.token = token;
  try {
    await loadEvents();
  } catch (error) {
    state.token = null;
    if (error instanceof ApiError && error.status === 401) store.remove(TOKEN_KEY);
    const message =
      error instanceof ApiError && error.status === 401
        ? "This token was refused. Check it and try again."
        : error.message;
    showLogin(message);
    return;
  }
  store.set(TOKEN_KEY, token);
  show("login", false);
  show("login-error", false);
  show("app");
  show("sign-out");
  const wanted = new URLSearchParams(location.hash.slice(1)).get("event");
  const chosen = state.events.find((e) => e.id === wanted) || state.events[0];
  if (chosen) selectEvent(chosen.id);
}

$("login-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const token = $("token").value.trim();
  if (!token) {
    showLogin("Enter the admin token.");
    return;
  }
  $("token").value = "";
  signIn(token);
});

$("sign-out").addEventListener("click", () => signOut());

// --- events -------------------------------------------------------------------------------------

async function loadEvents() {
  const { data } = await adminApi("/v1/admin/events");
  state.events = data;
  const select = $("event-select");
  select.replaceChildren(
    ...data.map((e) => el("option", { text: `${e.name} (${e.id}) · ${e.status}`, attrs: { value: e.id } })),
  );
  show("events-empty", data.length === 0);
  select.disabled = data.length === 0;
  if (state.eventId) select.value = state.eventId;
}

$("event-select").addEventListener("change", (event) => selectEvent(event.target.value));
$("refresh-events").addEventListener("click", () => {
  loadEvents().catch((error) => refused(error) || result(error.message, "error"));
});

function selectEvent(id) {
  state.eventId = id;
  state.last = null;
  state.filled = false;
  state.series = { line: [], admitted: [], sold: [], held: [] };
  history.replaceState(null, "", `#event=${encodeURIComponent(id)}`);
  $("event-select").value = id;
  const summary = state.events.find((e) => e.id === id);
  setText("sale-name", summary ? summary.name : id);
  setText("sale-meta", `${id}${summary ? ` · ${summary.queue_mode} · ${summary.status}` : ""}`);
  for (const name of ["fig-waiting", "fig-rate", "fig-active", "fig-sold"]) setText(name, "–");
  $("stock-body").replaceChildren();
  result("");
  show("sale");
  drawCharts();
  loadAudit(true);
  startStream();
}

// --- the live stream ----------------------------------------------------------------------------

function setConnection(kind, text) {
  $("connection").dataset.state = kind;
  setText("connection-text", text);
}

function stopStream() {
  if (state.stream) state.stream.abort();
  state.stream = null;
}

function startStream() {
  stopStream();
  const controller = new AbortController();
  state.stream = controller;
  state.lastSampleAt = performance.now();
  setConnection("connecting", "Connecting…");
  runStream(state.eventId, controller).then(
    (ended) => {
      if (state.stream !== controller) return;
      // The server ends a stream after a while (or when the event is gone): reconnect.
      state.attempt = 0;
      if (ended !== "event_gone") startStream();
    },
    async (error) => {
      if (state.stream !== controller) return;
      if (refused(error)) return;
      if (error instanceof ApiError && error.status === 404) {
        setConnection("error", "Event not found");
        problem("This event does not exist (any more).");
        return;
      }
      const ms = error && error.retryAfter != null ? error.retryAfter * 1000 : backoffMs(state.attempt, 1000, 15000);
      state.attempt += 1;
      setConnection("reconnecting", "Reconnecting…");
      problem(`Live figures interrupted (${error.message}); retrying in ${Math.ceil(ms / 1000)} s.`);
      await new Promise((resolve) => setTimeout(resolve, ms));
      if (state.stream === controller) startStream();
    },
  );
}

/** Read one stream to its end; resolves with the reason of its `end` event. */
async function runStream(eventId, controller) {
  let response;
  try {
    response = await fetch(`${eventPath(eventId)}/live`, {
      headers: { ...auth(), Accept: "text/event-stream" },
      cache: "no-store",
      signal: controller.signal,
    });
  } catch (error) {
    throw new ApiError(0, "network", "no answer from the server", {}, null);
  }
  if (!response.ok) {
    let body = null;
    try {
      body = await response.json();
    } catch {
      body = null;
    }
    const detail = (body && body.error) || {};
    const retry = Number(response.headers.get("Retry-After"));
    throw new ApiError(
      response.status,
      detail.code || `http_${response.status}`,
      detail.message || `the server answered ${response.status}`,
      detail.details,
      Number.isFinite(retry) && retry > 0 ? retry : null,
    );
  }
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let ended = null;
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value.replace(/\r\n?/g, "\n");
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        const outcome = onBlock(block);
        if (outcome) ended = outcome;
      }
    }
  } catch (error) {
    if (controller.signal.aborted) return "aborted";
    throw new ApiError(0, "network", "the stream broke off", {}, null);
  }
  if (ended == null && !controller.signal.aborted) {
    throw new ApiError(0, "network", "the stream ended", {}, null);
  }
  return ended;
}

/** One Server-Sent Event; returns the reason of an `end` event. */
function onBlock(block) {
  let type = "message";
  const data = [];
  for (const line of block.split("\n")) {
    if (!line || line.startsWith(":")) continue;
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
    if (field === "event") type = value;
    else if (field === "data") data.push(value);
  }
  if (!data.length) return null;
  let payload;
  try {
    payload = JSON.parse(data.join("\n"));
  } catch {
    return null;
  }
  if (type === "sample") onSample(payload);
  else if (type === "problem") problem(payload.error ? payload.error.message : "a problem on the server");
  else if (type === "end") return payload.reason || "ended";
  return null;
}

// Watchdog: a stream that went quiet (a proxy holding it, a laptop waking up) is replaced.
setInterval(() => {
  const watched = ["live", "connecting"].includes($("connection").dataset.state);
  if (state.stream && watched && performance.now() - state.lastSampleAt > STALE_MS) {
    setConnection("reconnecting", "Reconnecting…");
    startStream();
  }
}, 1000);

function problem(text) {
  setText("stream-problem", text);
  show("stream-problem", Boolean(text));
}

// --- figures ------------------------------------------------------------------------------------

const rateText = (r) => (r == null ? "–" : `${Number(r.toFixed(2))}/s`);

function waitText(seconds) {
  if (seconds == null) return "no estimate while paused";
  if (seconds < 60) return `last fan in ~${Math.round(seconds)} s`;
  if (seconds < 3600) return `last fan in ~${Math.round(seconds / 60)} min`;
  return `last fan in ~${(seconds / 3600).toFixed(1)} h`;
}

function saleState(a) {
  if (a.sold_out || a.status === "sold_out") return ["sold_out", "Sold out"];
  if (a.status === "closed") return ["closed", "Closed"];
  if (a.paused) return ["paused", "Paused"];
  if (a.status === "scheduled") return ["scheduled", "Not open yet"];
  return ["admitting", "Admitting"];
}

function onSample(s) {
  const a = s.admission;
  if (a.event_id !== state.eventId) return;
  const now = Date.parse(a.at) / 1000;
  const before = state.last;
  state.last = s;
  state.lastSampleAt = performance.now();
  state.attempt = 0;
  setConnection("live", "Live");
  problem("");

  const summary = state.events.find((e) => e.id === a.event_id);
  setText("sale-meta", `${a.event_id}${summary ? ` · ${summary.queue_mode}` : ""} · ${a.status}`);
  const [kind, label] = saleState(a);
  const badge = $("sale-state");
  if (badge.dataset.state !== kind) {
    if (badge.dataset.state !== "unknown") say.say(`The sale is now: ${label}`, { urgent: true });
    badge.dataset.state = kind;
    badge.textContent = label;
  }
  setText("fig-waiting", formatCount(a.fans_waiting));
  setText("fig-wait", waitText(a.last_fan_wait_s));
  setText("fig-rate", rateText(a.observed_rate));
  setText(
    "fig-rate-set",
    `observed · set to ${rateText(a.rate_per_second)}${a.leader ? "" : " · no admission leader"}`,
  );
  setText("fig-active", `${formatCount(a.active_passes)} of ${formatCount(a.max_active)}`);
  const meter = $("active-meter");
  meter.max = Math.max(1, a.max_active);
  meter.high = a.max_active * 0.9;
  meter.value = Math.min(a.active_passes, a.max_active);
  setText("fig-sold", `${formatCount(s.sold)} of ${formatCount(s.quantity)}`);
  setText("fig-left", `${formatCount(s.held)} held · ${formatCount(s.available)} left`);
  renderStock(s.ticket_types);

  if (!state.filled) {
    $("rate-input").value = String(a.rate_per_second);
    $("max-input").value = String(a.max_active);
    state.filled = true;
  }

  push(state.series.line, now, a.fans_waiting);
  if (before) {
    const dt = now - Date.parse(before.admission.at) / 1000;
    const admitted = a.admitted_total - before.admission.admitted_total;
    if (dt > 0) push(state.series.admitted, now, Math.max(0, admitted) / dt);
  }
  push(state.series.sold, now, s.sold);
  push(state.series.held, now, s.held);
  drawCharts();
}

function renderStock(types) {
  $("stock-body").replaceChildren(
    ...types.map((t) =>
      el("tr", {}, [
        el("th", { text: t.name, attrs: { scope: "row" } }),
        el("td", { text: formatCount(t.quantity) }),
        el("td", { text: formatCount(t.held) }),
        el("td", { text: formatCount(t.sold) }),
        el("td", { text: formatCount(t.available) }),
      ]),
    ),
  );
}

function push(series, t, v) {
  series.push({ t, v });
  while (series.length && series[0].t < t - WINDOW_S) series.shift();
}

// --- charts (canvas, drawn here: a few lines, no library) -------------------------------------

function colours() {
  const css = getComputedStyle(document.documentElement);
  const get = (name, fallback) => css.getPropertyValue(name).trim() || fallback;
  return {
    line: get("--accent", "#3b5bdb"),
    second: get("--warning-border", "#e8890c"),
    grid: get("--border", "#d9dce5"),
    text: get("--muted", "#5a6275"),
  };
}

function drawCharts() {
  const c = colours();
  drawChart($("chart-line"), [{ points: state.series.line, colour: c.line }], c, formatCount);
  drawChart($("chart-admitted"), [{ points: state.series.admitted, colour: c.line }], c, (v) =>
    rateText(v),
  );
  drawChart(
    $("chart-sales"),
    [
      { points: state.series.sold, colour: c.line },
      { points: state.series.held, colour: c.second, dashed: true },
    ],
    c,
    formatCount,
  );
}

function drawChart(canvas, lines, c, label) {
  const ratio = window.devicePixelRatio || 1;
  const width = Math.max(1, canvas.clientWidth);
  const height = Math.max(1, canvas.clientHeight);
  if (canvas.width !== Math.round(width * ratio)) canvas.width = Math.round(width * ratio);
  if (canvas.height !== Math.round(height * ratio)) canvas.height = Math.round(height * ratio);
  const g = canvas.getContext("2d");
  g.setTransform(ratio, 0, 0, ratio, 0, 0);
  g.clearRect(0, 0, width, height);
  const all = lines.flatMap((l) => l.points);
  const top = Math.max(1, ...all.map((p) => p.v));
  const pad = { left: 4, right: 4, top: 16, bottom: 4 };
  const plotW = width - pad.left - pad.right;
  const plotH = height - pad.top - pad.bottom;
  const end = all.length ? Math.max(...all.map((p) => p.t)) : 0;
  const start = all.length ? Math.min(...all.map((p) => p.t)) : 0;
  // The time axis grows with the data up to the window, so a new sale fills the chart.
  const span = Math.min(WINDOW_S, Math.max(30, end - start));
  const x = (t) => pad.left + plotW * (1 - (end - t) / span);
  const y = (v) => pad.top + plotH * (1 - v / top);

  g.strokeStyle = c.grid;
  g.lineWidth = 1;
  g.setLineDash([]);
  for (const f of [0, 0.5, 1]) {
    g.beginPath();
    g.moveTo(pad.left, Math.round(y(top * f)) + 0.5);
    g.lineTo(width - pad.right, Math.round(y(top * f)) + 0.5);
    g.stroke();
  }
  g.fillStyle = c.text;
  g.font = "11px system-ui, sans-serif";
  g.textBaseline = "top";
  g.fillText(`max ${label(top)}`, pad.left + 2, 1);
  for (const l of lines) {
    if (!l.points.length) continue;
    g.strokeStyle = l.colour;
    g.lineWidth = 2;
    g.setLineDash(l.dashed ? [5, 4] : []);
    g.beginPath();
    l.points.forEach((p, i) => (i ? g.lineTo(x(p.t), y(p.v)) : g.moveTo(x(p.t), y(p.v))));
    g.stroke();
    const last = l.points[l.points.length - 1];
    g.fillStyle = l.colour;
    g.beginPath();
    g.arc(x(last.t), y(last.v), 3, 0, 2 * Math.PI);
    g.fill();
  }
  g.setLineDash([]);
  const latest = lines[0].points[lines[0].points.length - 1];
  if (latest) {
    const text = `now ${label(latest.v)}`;
    g.fillStyle = c.text;
    g.fillText(text, width - pad.right - g.measureText(text).width - 2, 1);
  }
}

window.addEventListener("resize", () => drawCharts());

// --- controls -----------------------------------------------------------------------------------

function result(text, kind = "") {
  const node = $("control-result");
  node.textContent = text;
  node.dataset.kind = kind;
}

async function control(call, done) {
  const buttons = document.querySelectorAll(".controls button");
  buttons.forEach((b) => (b.disabled = true));
  try {
    const { data } = await call();
    result(done(data), "ok");
    loadAudit(true);
  } catch (error) {
    if (!refused(error)) result(`Not changed: ${error.message}`, "error");
  } finally {
    buttons.forEach((b) => (b.disabled = false));
  }
}

const patchAdmission = (body) =>
  adminApi(`${eventPath(state.eventId)}/admission`, { method: "PATCH", body });

$("rate-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const rate = Number($("rate-input").value);
  if (!(rate > 0)) {
    result("Enter a rate above 0 fans per second.", "error");
    return;
  }
  control(
    () => patchAdmission({ rate_per_second: rate }),
    (s) => `Admission rate set to ${rateText(s.rate_per_second)}.`,
  );
});

$("max-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const max = Number($("max-input").value);
  if (!Number.isInteger(max) || max < 1) {
    result("Enter a whole number of shoppers, 1 or more.", "error");
    return;
  }
  control(
    () => patchAdmission({ max_active: max }),
    (s) => `At most ${formatCount(s.max_active)} shoppers at once.`,
  );
});

$("pause").addEventListener("click", () =>
  control(
    () => patchAdmission({ paused: true }),
    () => "Admission paused: fans keep their places.",
  ),
);

$("resume").addEventListener("click", () =>
  control(
    () => patchAdmission({ paused: false }),
    () => "Admission resumed.",
  ),
);

$("revoke-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const jti = $("jti-input").value.trim();
  if (!/^[A-Za-z0-9_-]{1,64}$/.test(jti)) {
    result("A pass id (jti) is letters, digits, '-' and '_', at most 64.", "error");
    return;
  }
  control(
    () => adminApi(`/v1/admin/passes/${encodeURIComponent(jti)}/revoke`, { method: "POST" }),
    (r) => {
      $("jti-input").value = "";
      return `Pass ${r.jti} of fan ${r.fan_id} revoked.`;
    },
  );
});

// --- the audit trail ----------------------------------------------------------------------------

function changeText(entry) {
  const { old: before, new: after } = entry;
  if (before && after && typeof before === "object" && typeof after === "object") {
    const keys = Object.keys(after).filter((k) => JSON.stringify(before[k]) !== JSON.stringify(after[k]));
    if (keys.length) return keys.map((k) => `${k}: ${JSON.stringify(before[k])} → ${JSON.stringify(after[k])}`).join(", ");
    return "no change";
  }
  if (after && typeof after === "object") {
    const shown = JSON.stringify(after);
    return shown.length > 160 ? `${shown.slice(0, 160)}…` : shown;
  }
  return "";
}

function auditItem(entry) {
  const when = new Date(entry.at).toLocaleString(undefined, { dateStyle: "short", timeStyle: "medium" });
  const from = [entry.client_address && `from ${entry.client_address}`, entry.request_id && `request ${entry.request_id}`]
    .filter(Boolean)
    .join(" · ");
  return el("li", { attrs: { "data-id": String(entry.id), "data-action": entry.action } }, [
    el("span", { className: "audit-action", text: `${entry.action} by ${entry.actor}` }),
    el("span", { className: "audit-change", text: changeText(entry) }),
    el("span", { className: "audit-meta", text: [when, from].filter(Boolean).join(" · ") }),
  ]);
}

async function loadAudit(fresh) {
  const eventId = state.eventId;
  const query = new URLSearchParams({ limit: String(AUDIT_PAGE) });
  if (!fresh && state.auditBefore != null) query.set("before", String(state.auditBefore));
  try {
    const { data } = await adminApi(`${eventPath(eventId)}/audit?${query}`);
    if (eventId !== state.eventId) return;
    const items = data.entries.map(auditItem);
    if (fresh) $("audit-list").replaceChildren(...items);
    else $("audit-list").append(...items);
    state.auditBefore = data.next_before;
    show("audit-more", data.next_before != null);
    show("audit-empty", fresh && data.entries.length === 0);
  } catch (error) {
    if (!refused(error)) result(`Could not load the audit trail: ${error.message}`, "error");
  }
}

$("audit-refresh").addEventListener("click", () => loadAudit(true));
$("audit-more").addEventListener("click", () => loadAudit(false));

// --- start --------------------------------------------------------------------------------------

if (state.token) signIn(state.token);
else showLogin();
