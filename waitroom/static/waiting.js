// The waiting page: join the line, watch the place live (WebSocket, polling as a fallback),
// and move on to checkout with the queue pass once admitted.

import {
  $,
  announcer,
  api,
  backoffMs,
  checkoutUrl,
  el,
  eventApi,
  eventIdFromPath,
  formatCount,
  formatDateTime,
  formatWait,
  isTransient,
  renderEvent,
  retryDelayMs,
  savePass,
  setText,
  show,
  sleep,
  store,
} from "./common.js";

const eventId = eventIdFromPath();
/** The visitor token this tab was issued, for the WebSocket's ?token= (browsers cannot set headers there). */
const TOKEN_KEY = "waitroom:visitor";
const firstKey = `waitroom:first:${eventId}`;

/** Consecutive WebSocket attempts that ended before any message, before falling back to polling. */
const FAILURES_BEFORE_POLLING = 3;
const POLL_MS = 2000;
/** While paused the server pushes no positions; a slow poll keeps the shown place honest. */
const PAUSED_REFRESH_MS = 5000;

const state = {
  done: false, // admitted, sold out, or out of line: nothing more to watch
  event: null,
  position: null,
  first: null, // the first (largest) position seen: the progress bar's 0 %
  paused: false,
};
let socket = null;
let wsFailures = 0;
let wsTimer = null;
let polling = false;
let pollTimer = null;
let pausedTimer = null;
let spokenPosition = null;

const speaker = announcer("announcer", 5000);

// --- what the fan sees ------------------------------------------------------------------

const CONNECTION_TEXT = {
  connecting: "Connecting…",
  live: "Live",
  reconnecting: "Reconnecting…",
  polling: "Polling (live updates unavailable)",
  closed: "Not connected",
};

function setConnection(name) {
  const badge = $("connection");
  badge.dataset.state = name;
  setText("connection-text", CONNECTION_TEXT[name]);
}

/** The message box under the line: `kind` is info, warning, error or success. */
function notice(kind, title, text, actions = []) {
  const box = $("notice");
  box.dataset.kind = kind;
  setText("notice-title", title);
  setText("notice-text", text);
  $("notice-actions").replaceChildren(...actions);
  box.hidden = false;
}

function clearNotice() {
  $("notice").hidden = true;
}

function linkButton(text, href) {
  return el("a", { text, className: "button", attrs: { href } });
}

function actionButton(text, onClick) {
  const button = el("button", { text, attrs: { type: "button" } });
  button.addEventListener("click", onClick);
  return button;
}

function showPosition(position, ahead, eta) {
  if (position == null) return;
  state.position = position;
  if (state.first == null || position > state.first) {
    state.first = position;
    store.set(firstKey, position);
  }
  show("lottery", false);
  show("line");
  setText("position", `You are number ${formatCount(position)} in line`);
  setText(
    "ahead",
    ahead === 0 ? "No one: you are next" : `${formatCount(ahead)} ${ahead === 1 ? "fan" : "fans"}`,
  );
  setText("eta", formatWait(eta));
  // 0 % where the fan was first seen, 100 % once admitted: the share of the way covered.
  const percent = Math.round((100 * (state.first - position)) / state.first);
  setProgress(percent);
  if (position !== spokenPosition) {
    spokenPosition = position;
    // Near the front every move matters; far back, one update every half minute is enough.
    speaker.say(
      `You are number ${formatCount(position)} in line. Estimated wait: ${formatWait(eta)}.`,
      { gapMs: position <= 20 ? 5000 : 30000 },
    );
  }
}

function setProgress(percent) {
  $("progress").value = percent;
  setText("progress-text", `${percent}% of the way to the front`);
}

function paused() {
  if (state.paused) return;
  state.paused = true;
  notice(
    "warning",
    "Admission is paused",
    "The organiser has paused admission for a moment. You keep your place in line; it resumes by itself.",
  );
  speaker.say("Admission is paused. You keep your place in line.");
  schedulePausedRefresh();
}

function unpaused() {
  if (!state.paused) return;
  state.paused = false;
  clearTimeout(pausedTimer);
  clearNotice();
}

function schedulePausedRefresh() {
  clearTimeout(pausedTimer);
  pausedTimer = setTimeout(async () => {
    if (!state.paused || state.done || polling) return;
    try {
      applyStatus((await api(`${eventApi(eventId)}/queue/me`)).data);
    } catch (error) {
      if (!isTransient(error)) return;
    }
    if (state.paused) schedulePausedRefresh();
  }, PAUSED_REFRESH_MS);
}

async function prequeue(commitment) {
  show("line", false);
  show("lottery");
  const opens = state.event && state.event.opens_at ? formatDateTime(state.event.opens_at) : "";
  setText(
    "lottery-opens",
    opens
      ? `The sale opens ${opens}. The draw happens when the sale opens.`
      : "The draw happens when the sale opens.",
  );
  if (commitment == null && !$("commitment").textContent) {
    try {
      commitment = (await api(`${eventApi(eventId)}/lottery`)).data.commitment;
    } catch {
      commitment = null; // shown once the WebSocket brings it
    }
  }
  if (commitment) {
    setText("commitment", commitment);
    show("commitment-block");
  }
  if (spokenPosition !== "prequeue") {
    spokenPosition = "prequeue";
    speaker.say("You are in the lottery. The draw happens when the sale opens.");
  }
}

// --- the end states -----------------------------------------------------------------------

function finish() {
  state.done = true;
  stopPolling();
  clearTimeout(wsTimer);
  clearTimeout(pausedTimer);
  if (socket) {
    const closing = socket;
    socket = null;
    closing.close(1000, "done");
  }
}

function admitted(queuePass, expiresAt) {
  if (state.done) return;
  finish();
  savePass(eventId, queuePass, expiresAt);
  store.remove(firstKey);
  setConnection("closed");
  show("lottery", false);
  show("line");
  setText("position", "It's your turn!");
  setText("ahead", "No one");
  setText("eta", "now");
  setProgress(100);
  const url = checkoutUrl(eventId);
  notice("success", "It's your turn", "Taking you to checkout…", [
    linkButton("Go to checkout", url),
  ]);
  speaker.say("It's your turn. Taking you to checkout.", { urgent: true });
  // replace(): "back" from checkout must not land on a page that forwards straight again.
  location.replace(url);
}

function soldOut() {
  if (state.done) return;
  finish();
  setConnection("closed");
  show("line", false);
  show("lottery", false);
  notice("error", "Sold out", "Every ticket has been sold, so waiting longer will not help. Sorry!");
  speaker.say("Sold out. Every ticket has been sold.", { urgent: true });
}

function noSuchEvent(message) {
  finish();
  setConnection("closed");
  setText("event-name", "No such event");
  setText("event-venue", "");
  show("ticket-types-block", false);
  show("line", false);
  show("lottery", false);
  notice(
    "error",
    "No such event",
    message || "There is no event at this address. Check the link you were given.",
  );
  speaker.say("No such event.", { urgent: true });
}

function outOfLine(title, text) {
  finish();
  setConnection("closed");
  show("line", false);
  show("lottery", false);
  notice("warning", title, text, [actionButton("Join the line again", rejoin)]);
  speaker.say(title, { urgent: true });
}

function notInLine() {
  outOfLine(
    "You are no longer in line",
    "You left the line, or were away for longer than the room allows. Joining again puts you at the back.",
  );
}

function sessionLost() {
  outOfLine("Your session has expired", "Join again to get a new place in line.");
}

function rejoin() {
  state.done = false;
  state.first = null;
  state.position = null;
  state.paused = false;
  spokenPosition = null;
  wsFailures = 0;
  store.remove(firstKey);
  clearNotice();
  start();
}

// --- the server's answers --------------------------------------------------------------

/** Apply a QueueStatus body (join, or GET .../queue/me). */
function applyStatus(body) {
  if (!body || state.done) return;
  switch (body.status) {
    case "admitted":
      if (body.queue_pass) admitted(body.queue_pass, null);
      break;
    case "sold_out":
      soldOut();
      break;
    case "prequeue":
      prequeue(null);
      break;
    case "paused":
      showPosition(body.position, body.fans_ahead, body.eta_seconds);
      paused();
      break;
    default:
      showPosition(body.position, body.fans_ahead, body.eta_seconds);
      unpaused();
  }
}

/** Apply a WebSocket message (see waitroom/messages.py). */
function applyMessage(message) {
  if (state.done) return;
  switch (message.type) {
    case "position":
      showPosition(message.position, message.fans_ahead, message.eta_seconds);
      unpaused();
      break;
    case "admitted":
      admitted(message.pass, message.expires_at);
      break;
    case "sold_out":
      soldOut();
      break;
    case "paused":
      paused();
      break;
    case "prequeue":
      prequeue(message.commitment);
      break;
    default:
      break; // a newer server's message: ignore rather than break the page
  }
}

/** Keep the token only while it names the fan the cookie names (the WebSocket sends it). */
function rememberIdentity(body) {
  const saved = store.get(TOKEN_KEY);
  if (body.visitor_token) {
    store.set(TOKEN_KEY, { fan_id: body.fan_id, token: body.visitor_token });
  } else if (saved && saved.fan_id !== body.fan_id) {
    store.remove(TOKEN_KEY);
  }
}

// --- joining --------------------------------------------------------------------------------

async function join() {
  let renewed = false;
  for (let attempt = 0; !state.done; attempt += 1) {
    try {
      const { data } = await api(`${eventApi(eventId)}/queue`, { method: "POST" });
      rememberIdentity(data);
      return data;
    } catch (error) {
      if (error.status === 404) {
        noSuchEvent(error.message);
        return null;
      }
      if (error.status === 401 && !renewed) {
        // The server cleared a bad or expired visitor cookie: join as a new visitor.
        renewed = true;
        store.remove(TOKEN_KEY);
        continue;
      }
      if (!isTransient(error)) {
        notice("error", "Could not join the line", error.message, [
          actionButton("Try again", () => location.reload()),
        ]);
        setConnection("closed");
        return null;
      }
      const ms = retryDelayMs(error, attempt);
      setConnection("reconnecting");
      notice(
        "warning",
        "The line is very busy",
        `${error.message} Trying again in ${Math.ceil(ms / 1000)} s; keep this page open.`,
      );
      await sleep(ms);
    }
  }
  return null;
}

// --- live updates: WebSocket, with polling as the fallback ----------------------------------

function connect() {
  if (state.done || socket) return;
  clearTimeout(wsTimer);
  const saved = store.get(TOKEN_KEY);
  const query = saved && saved.token ? `?token=${encodeURIComponent(saved.token)}` : "";
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  let ws;
  try {
    ws = new WebSocket(`${scheme}//${location.host}${eventApi(eventId)}/queue/ws${query}`);
  } catch {
    failed(false);
    return;
  }
  socket = ws;
  let heard = false;
  ws.addEventListener("message", (event) => {
    if (socket !== ws) return;
    if (!heard) {
      heard = true;
      wsFailures = 0;
      stopPolling();
      setConnection("live");
    }
    let message;
    try {
      message = JSON.parse(event.data);
    } catch {
      return;
    }
    applyMessage(message);
  });
  ws.addEventListener("close", (event) => {
    if (socket !== ws) return; // closed on purpose (finish) or replaced
    socket = null;
    if (state.done) return;
    if (event.code === 4404) {
      if (/event/i.test(event.reason)) noSuchEvent();
      else notInLine();
      return;
    }
    if (event.code === 4401) {
      if (query) {
        // The tab's token went bad; the cookie may still name the fan.
        store.remove(TOKEN_KEY);
        wsTimer = setTimeout(connect, 0);
      } else {
        sessionLost();
      }
      return;
    }
    failed(heard);
  });
}

/** A WebSocket ended (1006, 1012 restart, 1013 try later...): back off, then try again. */
function failed(wasLive) {
  if (state.done) return;
  wsFailures = wasLive ? 1 : wsFailures + 1;
  if (wsFailures >= FAILURES_BEFORE_POLLING) {
    startPolling();
  } else if (!polling) {
    setConnection("reconnecting");
  }
  // Polling keeps the place meanwhile, so the WebSocket is retried only now and then.
  const cap = polling ? 30000 : 8000;
  wsTimer = setTimeout(connect, backoffMs(wsFailures - 1, 500, cap));
}

function startPolling() {
  if (polling || state.done) return;
  polling = true;
  setConnection("polling");
  clearTimeout(pollTimer);
  pollTimer = setTimeout(poll, 0);
}

function stopPolling() {
  polling = false;
  clearTimeout(pollTimer);
}

async function poll() {
  if (!polling || state.done) return;
  let next = POLL_MS;
  try {
    applyStatus((await api(`${eventApi(eventId)}/queue/me`)).data);
  } catch (error) {
    if (error.status === 404) {
      if (error.code === "not_in_line") notInLine();
      else noSuchEvent(error.message);
      return;
    }
    if (error.status === 401) {
      sessionLost();
      return;
    }
    if (error.retryAfter != null) next = Math.max(next, error.retryAfter * 1000);
  }
  if (polling && !state.done) pollTimer = setTimeout(poll, next);
}

// --- start ----------------------------------------------------------------------------------

async function loadEvent() {
  for (let attempt = 0; attempt < 5; attempt += 1) {
    try {
      state.event = (await api(eventApi(eventId))).data;
      renderEvent(state.event);
      return true;
    } catch (error) {
      if (error.status === 404) {
        noSuchEvent(error.message);
        return false;
      }
      if (!isTransient(error)) return true; // the line may still work; the header stays plain
      await sleep(retryDelayMs(error, attempt));
    }
  }
  return true;
}

async function start() {
  setConnection("connecting");
  const body = await join();
  if (!body || state.done) return;
  clearNotice();
  applyStatus(body);
  if (!state.done) connect();
}

async function main() {
  if (!eventId) {
    noSuchEvent("This address does not name an event.");
    return;
  }
  const first = Number(store.get(firstKey));
  if (Number.isInteger(first) && first > 0) state.first = first;
  if (!(await loadEvent())) return;
  await start();
}

// A laptop waking up or a network coming back: reconnect now rather than after the backoff.
window.addEventListener("online", () => {
  if (!state.done && !socket) connect();
});

main();
