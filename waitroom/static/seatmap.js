// The seat map page: draw the event's seats as an accessible SVG grid, keep it live, let the
// fan pick seats (or ask for the best available) and hold them with the queue pass.
//
// Order of loading: the live socket first, and the snapshot once the socket says "ready", so
// every change committed after the snapshot was read reaches the page (docs/seatmap.md).

import {
  $,
  announcer,
  api,
  backoffMs,
  checkoutUrl,
  el,
  eventApi,
  formatMoney,
  loadPass,
  newKey,
  renderEvent,
  setText,
  show,
  sleep,
  store,
  waitingUrl,
  withRetries,
  messageBox,
} from "./common.js";

// The page's own <svg> names the namespace (an absolute URL here would read as a load).
const SVG_NS = document.getElementById("seat-map").namespaceURI;
/** Seats one fan may pick at once (the server has the last word: per-fan limits). */
const MAX_PICK = 8;
/** Without the live socket, the snapshot is read again this often. */
const POLL_MS = 15000;
/** How long the page waits for the socket's "ready" before drawing from the snapshot alone. */
const READY_WAIT_MS = 4000;
/** Distinct on white and for most colour vision; states never rely on colour alone. */
const PALETTE = ["#1d4ed8", "#c2410c", "#047857", "#7e22ce", "#be123c", "#0e7490", "#a16207", "#4d7c0f"];
const STATE_WORDS = { f: "available", h: "held by another fan", s: "sold", x: "not available" };
const ACCESSIBLE = 1;
const RESTRICTED_VIEW = 2;

const eventId = eventIdFromSeatsPath(location.pathname);
const holdKey = `waitroom:hold:${eventId}`;
const speaker = announcer("announcer", 2500);

const state = {
  snapshot: null,
  levels: [],
  seats: new Map(), // id -> seat
  rows: [], // every row of every section, in map order: arrays of seats
  selected: new Set(), // seat ids, in the order picked
  focused: null,
  radius: 4,
  base: null, // the whole map's viewBox {x, y, w, h}
  view: null, // the current viewBox
  version: 0,
  pending: null, // changes that arrived while the snapshot was loading
  pass: null,
  busy: false,
};

/** The event id of /events/{id}/seats, or null. */
function eventIdFromSeatsPath(pathname) {
  const match = /^\/events\/([^/]+)\/seats\/?$/.exec(pathname);
  if (!match) return null;
  try {
    return decodeURIComponent(match[1]);
  } catch {
    return null;
  }
}

function svg(tag, attrs = {}) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, String(value));
  return node;
}

// --- messages -------------------------------------------------------------------------------

const messages = messageBox("message", speaker);
const message = messages.show;
const clearMessage = messages.clear;

function link(text, href) {
  return el("a", { text, className: "button", attrs: { href } });
}

function setConnection(kind, text) {
  $("connection").dataset.state = kind;
  setText("connection-text", text);
}

// --- names ----------------------------------------------------------------------------------

function price(level) {
  return level.currency ? formatMoney(level.price_minor, level.currency) : "";
}

/** What a screen reader says for a seat, e.g. "Section Stalls, row A, seat 3, Front
 * stalls, €45.00, available". */
function seatName(seat) {
  const level = state.levels[seat.level];
  const parts = [`Section ${seat.sectionName}`, `row ${seat.row}`, `seat ${seat.label}`, level.name];
  const amount = price(level);
  if (amount) parts.push(amount);
  if (seat.flags & ACCESSIBLE) parts.push("wheelchair accessible");
  if (seat.flags & RESTRICTED_VIEW) parts.push("restricted view");
  parts.push(STATE_WORDS[seat.state] || "not available");
  return parts.join(", ");
}

const shortName = (seat) => `row ${seat.row}, seat ${seat.label}`;

// --- drawing --------------------------------------------------------------------------------

/** The mark drawn over a seat, so that a state is never told by colour alone. */
function markerPath(mark, r) {
  const k = (f) => (f * r).toFixed(3);
  switch (mark) {
    case "picked": // a tick
      return `M${k(-0.45)} ${k(0)}L${k(-0.1)} ${k(0.35)}L${k(0.45)} ${k(-0.35)}`;
    case "h": // a bar
      return `M${k(-0.5)} 0H${k(0.5)}`;
    case "s": // a cross
      return `M${k(-0.4)} ${k(-0.4)}L${k(0.4)} ${k(0.4)}M${k(0.4)} ${k(-0.4)}L${k(-0.4)} ${k(0.4)}`;
    case "x": // a slash
      return `M${k(-0.45)} ${k(0.45)}L${k(0.45)} ${k(-0.45)}`;
    default:
      return "";
  }
}

function paintSeat(seat) {
  const selected = state.selected.has(seat.id);
  seat.node.dataset.state = selected ? "picked" : seat.state;
  seat.node.setAttribute("aria-selected", selected ? "true" : "false");
  seat.node.setAttribute("aria-disabled", seat.state === "f" ? "false" : "true");
  seat.node.setAttribute("aria-label", seatName(seat));
  seat.marker.setAttribute("d", markerPath(seat.node.dataset.state, state.radius));
}

/** The radius that keeps neighbours apart: a little under half the closest spacing. */
function seatRadius(rows) {
  let closest = Infinity;
  for (const row of rows) {
    for (let i = 1; i < row.length; i += 1) {
      const d = Math.hypot(row[i].x - row[i - 1].x, row[i].y - row[i - 1].y);
      if (d > 0) closest = Math.min(closest, d);
    }
  }
  return Number.isFinite(closest) ? closest * 0.42 : 4;
}

function render(snapshot) {
  state.snapshot = snapshot;
  state.levels = snapshot.levels;
  state.seats = new Map();
  state.rows = [];
  let index = 0;
  for (const section of snapshot.sections) {
    for (const row of section.rows) {
      const seats = row.seats.map(([label, x, y, level, flags], position) => {
        const seat = {
          id: `${section.id}:${row.label}:${label}`,
          sectionName: section.name,
          row: row.label,
          label,
          x,
          y,
          level,
          flags,
          state: snapshot.states[index] || "x",
          rowIndex: state.rows.length,
          position,
          node: null,
          marker: null,
        };
        index += 1;
        state.seats.set(seat.id, seat);
        return seat;
      });
      state.rows.push(seats);
    }
  }
  for (const id of [...state.selected]) {
    const seat = state.seats.get(id);
    if (!seat || seat.state !== "f") state.selected.delete(id);
  }
  state.radius = seatRadius(state.rows);
  const map = $("seat-map");
  map.replaceChildren();
  let rowIndex = 0;
  for (const section of snapshot.sections) {
    const group = svg("g", { role: "rowgroup", "aria-label": `Section ${section.name}` });
    for (const row of section.rows) {
      const rowGroup = svg("g", { role: "row", "aria-label": `Row ${row.label}` });
      for (const seat of state.rows[rowIndex]) {
        const node = svg("g", {
          role: "gridcell",
          class: "seat",
          tabindex: "-1",
          transform: `translate(${seat.x} ${seat.y})`,
          "data-id": seat.id,
        });
        const circle = svg("circle", {
          r: state.radius,
          fill: PALETTE[seat.level % PALETTE.length],
          "stroke-width": state.radius * 0.25,
        });
        const marker = svg("path", { class: "marker", "stroke-width": state.radius * 0.28 });
        node.append(circle, marker);
        seat.node = node;
        seat.marker = marker;
        paintSeat(seat);
        rowGroup.append(node);
      }
      group.append(rowGroup);
      rowIndex += 1;
    }
    map.append(group, sectionLabel(section, state.rows.slice(rowIndex - section.rows.length, rowIndex)));
  }
  fitView();
  renderLegend();
  renderStanding(snapshot.standing || []);
  renderBestForm();
  renderSelection();
  const keep = state.focused && state.seats.get(state.focused.id);
  const first = keep || [...state.seats.values()].find((s) => s.state === "f") || state.rows.flat()[0];
  if (first) setFocus(first, false);
  show("map-section");
  show("choice-section");
  $("main").setAttribute("aria-busy", "false");
}

/** The section's name over its seats, for the eye (the grid already names it to readers). */
function sectionLabel(section, rows) {
  const seats = rows.flat();
  const xs = seats.map((s) => s.x);
  const top = Math.min(...seats.map((s) => s.y));
  const label = svg("text", {
    x: (Math.min(...xs) + Math.max(...xs)) / 2,
    y: top - state.radius * 1.6,
    "font-size": state.radius * 1.1,
    "text-anchor": "middle",
    class: "section-label",
    "aria-hidden": "true",
  });
  label.textContent = section.name;
  return label;
}

function swatch(colour, mark) {
  const icon = svg("svg", { viewBox: "-6 -6 12 12", width: 18, height: 18, "aria-hidden": "true", class: "swatch" });
  const node = svg("g", { class: "seat", "data-state": mark });
  node.append(
    svg("circle", { r: 5, fill: colour, "stroke-width": 1.2 }),
    svg("path", { class: "marker", "stroke-width": 1.4, d: markerPath(mark, 5) }),
  );
  icon.append(node);
  return icon;
}

function renderLegend() {
  $("legend").replaceChildren(
    ...state.levels.map((level, i) =>
      el("li", {}, [
        swatch(PALETTE[i % PALETTE.length], "f"),
        el("span", { text: level.name, className: "tt-name" }),
        el("span", { text: price(level), className: "tt-price" }),
      ]),
    ),
  );
  const grey = "#6b7280";
  $("state-legend").replaceChildren(
    el("li", {}, [swatch(PALETTE[0], "picked"), el("span", { text: "your pick" })]),
    el("li", {}, [swatch(PALETTE[0], "h"), el("span", { text: "held by another fan" })]),
    el("li", {}, [swatch(grey, "s"), el("span", { text: "sold" })]),
    el("li", {}, [swatch(grey, "x"), el("span", { text: "not available" })]),
  );
}

function renderStanding(areas) {
  const list = $("standing");
  list.replaceChildren(
    ...areas.map((area) =>
      el("li", {
        text: `${area.name}: standing (${area.ticket_type} tickets), chosen on the checkout page`,
      }),
    ),
  );
  list.hidden = areas.length === 0;
}

function renderBestForm() {
  const levels = $("best-level");
  const current = levels.value;
  levels.replaceChildren(
    ...state.levels.map((level) => el("option", { text: `${level.name} · ${price(level)}`, attrs: { value: level.id } })),
  );
  if (current) levels.value = current;
  const counts = $("best-count");
  if (!counts.options.length) {
    for (let n = 1; n <= MAX_PICK; n += 1) counts.append(el("option", { text: String(n), attrs: { value: String(n) } }));
    counts.value = "2";
  }
}

// --- the view: zoom and pan -------------------------------------------------------------------

function fitView() {
  const seats = [...state.seats.values()];
  if (!seats.length) return;
  const margin = state.radius * 2;
  const labels = state.radius * 2.2; // room for the section names above the seats
  const xs = seats.map((s) => s.x);
  const ys = seats.map((s) => s.y);
  const x = Math.min(...xs) - margin;
  const y = Math.min(...ys) - margin - labels;
  const w = Math.max(Math.max(...xs) - Math.min(...xs) + 2 * margin, state.radius * 8);
  const h = Math.max(Math.max(...ys) - Math.min(...ys) + 2 * margin + labels, state.radius * 8);
  const changed = !state.base || state.base.w !== w || state.base.h !== h;
  state.base = { x, y, w, h };
  // The frame takes the map's shape (CSS caps its height), so a wide map leaves no empty band.
  $("seat-map").style.aspectRatio = `${w} / ${h}`;
  if (changed || !state.view) setView({ ...state.base });
  else setView(state.view);
}

function setView(view) {
  const base = state.base;
  const w = Math.min(base.w, Math.max(base.w / 10, view.w));
  const h = (w / base.w) * base.h;
  const x = Math.min(base.x + base.w - w, Math.max(base.x, view.x + (view.w - w) / 2));
  const y = Math.min(base.y + base.h - h, Math.max(base.y, view.y + (view.h - h) / 2));
  state.view = { x, y, w, h };
  $("seat-map").setAttribute("viewBox", `${x} ${y} ${w} ${h}`);
  $("zoom-out").disabled = w >= base.w;
  $("zoom-in").disabled = w <= base.w / 10 + 1e-9;
}

/** Zoom by `factor` (above 1: closer) keeping the map point (cx, cy) where it is. */
function zoom(factor, cx, cy) {
  if (!state.view) return;
  const v = state.view;
  const base = state.base;
  const w = Math.min(base.w, Math.max(base.w / 10, v.w / factor));
  const h = (w / base.w) * base.h;
  const px = cx ?? v.x + v.w / 2;
  const py = cy ?? v.y + v.h / 2;
  setView({ x: px - ((px - v.x) * w) / v.w, y: py - ((py - v.y) * h) / v.h, w, h });
}

function mapPoint(clientX, clientY) {
  const map = $("seat-map");
  const matrix = map.getScreenCTM();
  if (!matrix) return null;
  const point = new DOMPoint(clientX, clientY).matrixTransform(matrix.inverse());
  return { x: point.x, y: point.y };
}

/** Pan so that `seat` is in view (keyboard moves can leave the zoomed-in part). */
function reveal(seat) {
  const v = state.view;
  if (!v) return;
  const r = state.radius * 1.5;
  if (seat.x - r >= v.x && seat.x + r <= v.x + v.w && seat.y - r >= v.y && seat.y + r <= v.y + v.h) return;
  setView({ x: seat.x - v.w / 2, y: seat.y - v.h / 2, w: v.w, h: v.h });
}

function wireZoom() {
  $("zoom-in").addEventListener("click", () => zoom(1.5));
  $("zoom-out").addEventListener("click", () => zoom(1 / 1.5));
  $("zoom-reset").addEventListener("click", () => setView({ ...state.base }));
  const map = $("seat-map");
  map.addEventListener(
    "wheel",
    (event) => {
      if (!state.view) return;
      event.preventDefault();
      const at = mapPoint(event.clientX, event.clientY);
      zoom(event.deltaY < 0 ? 1.2 : 1 / 1.2, at?.x, at?.y);
    },
    { passive: false },
  );
  // Pointers: one drags the map, two pinch it.
  const pointers = new Map();
  let dragged = false;
  let pinch = null;
  map.addEventListener("pointerdown", (event) => {
    pointers.set(event.pointerId, { x: event.clientX, y: event.clientY });
    dragged = false;
    if (pointers.size === 2) {
      const [a, b] = [...pointers.values()];
      pinch = Math.hypot(a.x - b.x, a.y - b.y);
    }
  });
  map.addEventListener("pointermove", (event) => {
    const last = pointers.get(event.pointerId);
    if (!last || !state.view) return;
    const now = { x: event.clientX, y: event.clientY };
    if (pointers.size >= 2) {
      pointers.set(event.pointerId, now);
      const [a, b] = [...pointers.values()];
      const distance = Math.hypot(a.x - b.x, a.y - b.y);
      if (pinch && distance > 0) {
        const at = mapPoint((a.x + b.x) / 2, (a.y + b.y) / 2);
        zoom(distance / pinch, at?.x, at?.y);
      }
      pinch = distance;
      dragged = true;
      return;
    }
    const from = mapPoint(last.x, last.y);
    const to = mapPoint(now.x, now.y);
    if (Math.hypot(now.x - last.x, now.y - last.y) < 3 && !dragged) return;
    pointers.set(event.pointerId, now);
    if (event.buttons === 0 && event.pointerType === "mouse") return;
    if (from && to && state.view.w < state.base.w) {
      dragged = true;
      const v = state.view;
      setView({ x: v.x - (to.x - from.x), y: v.y - (to.y - from.y), w: v.w, h: v.h });
    }
  });
  const up = (event) => {
    pointers.delete(event.pointerId);
    if (pointers.size < 2) pinch = null;
  };
  map.addEventListener("pointerup", up);
  map.addEventListener("pointercancel", up);
  map.addEventListener("click", (event) => {
    if (dragged) {
      dragged = false;
      return;
    }
    const node = event.target.closest?.(".seat");
    const seat = node && state.seats.get(node.dataset.id);
    if (seat) {
      setFocus(seat, true);
      toggle(seat);
    }
  });
}

// --- keyboard: a grid of seats ----------------------------------------------------------------

function setFocus(seat, move = true) {
  if (state.focused && state.focused.node && state.focused !== seat) {
    state.focused.node.setAttribute("tabindex", "-1");
  }
  state.focused = seat;
  seat.node.setAttribute("tabindex", "0");
  if (move) {
    reveal(seat);
    seat.node.focus({ preventScroll: true });
  }
}

/** The seat of `row` closest across to `seat` (rows need not line up). */
function nearestIn(row, seat) {
  let best = row[0];
  for (const candidate of row) {
    if (Math.abs(candidate.x - seat.x) < Math.abs(best.x - seat.x)) best = candidate;
  }
  return best;
}

function onKey(event) {
  const seat = state.focused;
  if (!seat) return;
  const row = state.rows[seat.rowIndex];
  let next = null;
  switch (event.key) {
    case "ArrowLeft":
      next = row[seat.position - 1];
      break;
    case "ArrowRight":
      next = row[seat.position + 1];
      break;
    case "ArrowUp":
      if (seat.rowIndex > 0) next = nearestIn(state.rows[seat.rowIndex - 1], seat);
      break;
    case "ArrowDown":
      if (seat.rowIndex < state.rows.length - 1) next = nearestIn(state.rows[seat.rowIndex + 1], seat);
      break;
    case "Home":
      next = row[0];
      break;
    case "End":
      next = row[row.length - 1];
      break;
    case "Enter":
    case " ":
      event.preventDefault();
      toggle(seat);
      return;
    case "+":
    case "=":
      event.preventDefault();
      zoom(1.5, seat.x, seat.y);
      return;
    case "-":
      event.preventDefault();
      zoom(1 / 1.5, seat.x, seat.y);
      return;
    default:
      return;
  }
  event.preventDefault();
  if (next) setFocus(next);
}

// --- picking --------------------------------------------------------------------------------

function total(ids) {
  const byCurrency = new Map();
  for (const id of ids) {
    const level = state.levels[state.seats.get(id).level];
    byCurrency.set(level.currency, (byCurrency.get(level.currency) || 0) + level.price_minor);
  }
  return [...byCurrency].map(([currency, minor]) => formatMoney(minor, currency)).join(" + ");
}

function toggle(seat) {
  if (state.selected.has(seat.id)) {
    state.selected.delete(seat.id);
    paintSeat(seat);
    renderSelection();
    speaker.say(`Removed ${shortName(seat)}. ${selectionWords()}`, { urgent: true });
    return;
  }
  if (seat.state !== "f") {
    speaker.say(`${shortName(seat)} is ${STATE_WORDS[seat.state] || "not available"}: it cannot be picked.`, {
      urgent: true,
    });
    return;
  }
  if (state.selected.size >= MAX_PICK) {
    speaker.say(`You can pick up to ${MAX_PICK} seats.`, { urgent: true });
    return;
  }
  state.selected.add(seat.id);
  paintSeat(seat);
  renderSelection();
  speaker.say(`Selected ${shortName(seat)}. ${selectionWords()}`, { urgent: true });
}

function selectionWords() {
  const n = state.selected.size;
  if (!n) return "No seats picked.";
  return `${n} ${n === 1 ? "seat" : "seats"} picked, ${total(state.selected)} in total.`;
}

function renderSelection() {
  const items = [...state.selected].map((id) => {
    const seat = state.seats.get(id);
    const level = state.levels[seat.level];
    const remove = el("button", {
      text: "Remove",
      className: "secondary small",
      attrs: { type: "button", "aria-label": `Remove ${shortName(seat)}` },
    });
    remove.addEventListener("click", () => toggle(seat));
    return el("li", {}, [
      el("span", { text: `${seat.sectionName}, ${shortName(seat)} · ${level.name} · ${price(level)}` }),
      remove,
    ]);
  });
  $("selection").replaceChildren(...items);
  setText("selection-summary", state.selected.size ? selectionWords() : "No seats picked yet.");
  $("hold-selected").disabled = state.busy || state.selected.size === 0;
  $("clear-selection").disabled = state.busy || state.selected.size === 0;
}

// --- live changes ---------------------------------------------------------------------------

/** Apply `changes` (seat id -> state letter); say what matters to this fan. */
function applyChanges(changes) {
  const lost = [];
  let taken = 0;
  let freed = 0;
  for (const [id, next] of Object.entries(changes)) {
    const seat = state.seats.get(id);
    if (!seat || seat.state === next) continue;
    if (next === "f") freed += 1;
    else if (seat.state === "f") taken += 1;
    seat.state = next;
    if (next !== "f" && state.selected.delete(id)) lost.push(seat);
    paintSeat(seat);
  }
  if (lost.length) {
    renderSelection();
    const names = lost.map(shortName).join("; ");
    message(
      "warning",
      lost.length === 1 ? "A seat you picked was just taken" : "Seats you picked were just taken",
      `${names}: taken by another fan and removed from your selection.`,
    );
  } else if (taken || freed) {
    const parts = [];
    if (taken) parts.push(`${taken} ${taken === 1 ? "seat was" : "seats were"} just taken`);
    if (freed) parts.push(`${freed} ${freed === 1 ? "seat is" : "seats are"} available again`);
    speaker.say(`${parts.join(", ")}.`);
  }
}

let socket = null;
let stopped = false;
let reconnects = 0;
let pollTimer = null;
let readyTimer = null;

function liveUrl() {
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  return `${scheme}://${location.host}${eventApi(eventId)}/seats/live`;
}

function connectLive() {
  clearTimeout(readyTimer);
  // Without the socket's "ready" in time, draw from the snapshot alone (polling meanwhile).
  readyTimer = setTimeout(() => {
    if (!state.snapshot) loadSnapshot();
    startPolling();
  }, READY_WAIT_MS);
  try {
    socket = new WebSocket(liveUrl());
  } catch {
    startPolling();
    return;
  }
  socket.addEventListener("message", (event) => {
    let data;
    try {
      data = JSON.parse(event.data);
    } catch {
      return;
    }
    if (data.type === "ready") {
      clearTimeout(readyTimer);
      reconnects = 0;
      stopPolling();
      setConnection("live", "Live");
      state.version = data.version || 0;
      loadSnapshot(state.version);
    } else if (data.type === "seats") {
      if (typeof data.version === "number" && data.version < state.version) {
        loadSnapshot(); // the counter restarted: the snapshot is the truth again
        state.version = 0;
      }
      state.version = Math.max(state.version, data.version || 0);
      if (state.pending) state.pending.push(data.changes || {});
      else if (state.snapshot) applyChanges(data.changes || {});
    }
  });
  socket.addEventListener("close", (event) => {
    socket = null;
    // An unknown event (the snapshot says so), or a page that has nothing live to show.
    if (event.code === 4404 || stopped) return;
    setConnection("reconnecting", "Reconnecting…");
    reconnects += 1;
    startPolling();
    setTimeout(connectLive, backoffMs(reconnects, 1000, 30000));
  });
}

function startPolling() {
  if (pollTimer !== null || stopped) return;
  if (!socket || socket.readyState !== WebSocket.OPEN) setConnection("polling", "Updates every 15 s");
  pollTimer = setInterval(loadSnapshot, POLL_MS);
}

function stopPolling() {
  clearInterval(pollTimer);
  pollTimer = null;
}

let loading = null;

/**
 * Read the snapshot and draw it; changes arriving meanwhile are applied after it. `atLeast`
 * is the version the live socket was ready at: an older snapshot (a cache's) may miss a change
 * the socket will not repeat, so it is read again under another URL (docs/seatmap.md).
 */
async function loadSnapshot(atLeast = 0) {
  if (loading) {
    // A read under way (a poll) may be older than the socket's ready: read again after it.
    return loading.then(() => ((state.snapshot?.version || 0) < atLeast ? loadSnapshot(atLeast) : undefined));
  }
  state.pending = [];
  loading = (async () => {
    try {
      let data = null;
      for (let attempt = 0; attempt < 3; attempt += 1) {
        const query = atLeast ? `?v=${atLeast}${attempt ? `&try=${attempt}` : ""}` : "";
        data = (await api(`${eventApi(eventId)}/seats${query}`)).data;
        if ((data.version || 0) >= atLeast) break;
        await sleep(250 * (attempt + 1));
      }
      render(data);
      for (const changes of state.pending) applyChanges(changes);
    } catch (error) {
      if (error.code === "seat_map_not_found") {
        message("info", "No seat map for this event", "Tickets for this event are chosen by type.", [
          link("Go to the checkout", checkoutUrl(eventId)),
        ]);
        stopLive();
      } else if (error.status === 404) {
        noSuchEvent();
      } else if (!state.snapshot) {
        message("warning", "The seat map could not be loaded", `${error.message} Retrying…`);
        setTimeout(loadSnapshot, 3000);
      }
    } finally {
      state.pending = null;
      loading = null;
    }
  })();
  return loading;
}

function stopLive() {
  stopPolling();
  clearTimeout(readyTimer);
  stopped = true;
  if (socket) socket.close();
  socket = null;
  setConnection("polling", "Not live");
}

function noSuchEvent() {
  stopLive();
  setText("event-name", "Event not found");
  $("main").setAttribute("aria-busy", "false");
  message("error", "No such event", "Check the link you followed.");
}

// --- holding --------------------------------------------------------------------------------

function setBusy(busy, text = "") {
  state.busy = busy;
  $("hold-best").disabled = busy;
  $("main").setAttribute("aria-busy", busy ? "true" : "false");
  setText("progress-status", text);
  renderSelection();
}

async function hold(body) {
  clearMessage();
  if (!state.pass) {
    show("no-pass");
    message("warning", "You need a queue pass to hold seats", "Join the waiting line: seats are held when your turn comes.", [
      link("Go to the waiting line", waitingUrl(eventId)),
    ]);
    return;
  }
  // One key per click, reused by the retries: a retried request whose answer was lost
  // returns the first hold instead of holding twice.
  const key = newKey();
  setBusy(true, "Holding your seats…");
  try {
    const { data } = await withRetries(
      () =>
        api(`${eventApi(eventId)}/reservations`, {
          method: "POST",
          body,
          headers: { "X-Queue-Pass": state.pass.pass, "Idempotency-Key": key },
        }),
      {
        onRetry: (error, ms) => setText("progress-status", `${error.message} Retrying in ${Math.ceil(ms / 1000)} s…`),
      },
    );
    store.set(holdKey, data.id);
    speaker.say("Your seats are held. Opening the checkout.", { urgent: true });
    location.assign(checkoutUrl(eventId));
  } catch (error) {
    setBusy(false);
    holdFailed(error);
  }
}

function holdFailed(error) {
  const code = error.code || "";
  if (code === "seats_unavailable") {
    const details = error.details || {};
    const ids = details.seats || details.seat_ids || [];
    const seats = ids.map((id) => state.seats.get(id)).filter(Boolean);
    const changes = {};
    for (const seat of seats) if (seat.state === "f") changes[seat.id] = "h";
    for (const seat of seats) state.selected.delete(seat.id);
    applyChanges(changes);
    for (const seat of seats) paintSeat(seat);
    renderSelection();
    const names = seats.length ? seats.map(shortName).join("; ") : "Some of the seats";
    message("warning", "Those seats were just taken", `${names}: another fan got there first. Pick others.`);
    loadSnapshot(state.version);
  } else if (code.startsWith("pass_") || error.status === 403 || error.status === 401) {
    message("error", "Your queue pass cannot be used", error.message, [link("Back to the waiting line", waitingUrl(eventId))]);
  } else if (code === "sold_out") {
    message("error", "Sold out", error.message);
    loadSnapshot(state.version);
  } else {
    message("error", "The seats could not be held", error.message);
  }
}

// --- start ----------------------------------------------------------------------------------

async function main() {
  for (const a of document.querySelectorAll("a[data-back-to-line]")) a.href = eventId ? waitingUrl(eventId) : "/";
  if (!eventId) {
    noSuchEvent();
    return;
  }
  state.pass = loadPass(eventId);
  if (!state.pass) show("no-pass");
  wireZoom();
  $("seat-map").addEventListener("keydown", onKey);
  $("hold-selected").addEventListener("click", () => hold({ seats: [...state.selected] }));
  $("clear-selection").addEventListener("click", () => {
    const seats = [...state.selected].map((id) => state.seats.get(id));
    state.selected.clear();
    for (const seat of seats) paintSeat(seat);
    renderSelection();
    speaker.say("Selection cleared.", { urgent: true });
  });
  $("best-form").addEventListener("submit", (event) => {
    event.preventDefault();
    hold({ best_available: { level: $("best-level").value, count: Number($("best-count").value) } });
  });
  try {
    renderEvent((await api(eventApi(eventId))).data);
  } catch (error) {
    if (error.status === 404) {
      noSuchEvent();
      return;
    }
  }
  connectLive();
}

main();
