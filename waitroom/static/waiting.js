// The waiting page: join the line, watch the place live (WebSocket, polling as a fallback),
// and move on to checkout with the queue pass once admitted.

import {
  $,
  ApiError,
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
/** The visitor token this tab was issued: it asks for WebSocket tickets where no cookie is kept. */
const TOKEN_KEY = "waitroom:visitor";
const firstKey = `waitroom:first:${eventId}`;
/** The place receipt of this fan's join: it puts the fan back in place if the line is lost. */
const receiptKey = `waitroom:receipt:${eventId}`;

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
  replaced: false, // the socket gave way to one of a newer tab (4409): wait for "Watch here"
  restoreTried: false, // the stored place receipt was tried once since the line was lost
};
let socket = null;
let connecting = false; // asking for a ticket, before the socket exists
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
  // The server may have lost the line (its Redis restarted empty): the receipt of our join
  // puts us back exactly where we were, once. A line that was not lost answers 410, and a fan
  // who was dropped for being away joins again at the back, as before.
  const receipt = store.get(receiptKey);
  if (receipt && !state.restoreTried) {
    state.restoreTried = true;
    restorePlace(receipt);
    return;
  }
  store.remove(receiptKey);
  outOfLine(
    "You are no longer in line",
    "You left the line, or were away for longer than the room allows. Joining again puts you at the back.",
  );
}

async function restorePlace(receipt) {
  try {
    const headers = { "X-Place-Receipt": receipt };
    const { data } = await api(`${eventApi(eventId)}/queue`, { method: "POST", headers });
    rememberIdentity(data);
    clearNotice();
    applyStatus(data);
    if (!state.done) connect();
  } catch {
    notInLine();
  }
}

function sessionLost() {
  outOfLine("Your session has expired", "Join again to get a new place in line.");
}

function rejoin() {
  store.remove(receiptKey); // a new place at the back, with a receipt of its own
  state.restoreTried = false;
  state.done = false;
  state.first = null;
  state.position = null;
  state.paused = false;
  state.replaced = false;
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

/** Answers of a join that a (new) solved challenge fixes: solve one and join again. */
const CHALLENGE_CODES = new Set([
  "challenge_required",
  "challenge_invalid",
  "challenge_expired",
  "challenge_replayed",
  "challenge_wrong_address",
]);
/** Challenges solved for one join at most: a server that keeps refusing is not helped by more. */
const MAX_SOLVES = 3;
/** Web Workers solving one challenge together (each sweeps its share of the numbers). */
const POW_WORKERS = Math.max(1, Math.min(navigator.hardwareConcurrency || 1, 4));

function showPow(tried, maxnumber) {
  show("pow");
  // The number sought is anywhere in [0, maxnumber]: the bar shows the share of the range
  // searched, so it usually stops short of 100 %.
  $("pow-progress").value = Math.min(100, Math.round((100 * tried) / (maxnumber + 1)));
}

/** Solve an ALTCHA challenge (see pow-worker.js) in Web Workers; resolves to the number. */
function solveInWorkers(challenge) {
  return new Promise((resolve, reject) => {
    const workers = [];
    const tried = new Array(POW_WORKERS).fill(0);
    let exhausted = 0;
    const stop = () => workers.forEach((worker) => worker.terminate());
    for (let index = 0; index < POW_WORKERS; index += 1) {
      const worker = new Worker("/static/pow-worker.js");
      workers.push(worker);
      worker.onmessage = ({ data }) => {
        if (data.type === "progress") {
          tried[index] = data.tried;
          showPow(tried.reduce((a, b) => a + b, 0), challenge.maxnumber);
        } else if (data.type === "solved") {
          stop();
          resolve(data.number);
        } else if (data.type === "exhausted") {
          exhausted += 1;
          if (exhausted === POW_WORKERS) {
            stop();
            reject(new Error("no number solves the challenge"));
          }
        } else {
          stop();
          reject(new Error(data.message || "the solver failed"));
        }
      };
      worker.onerror = (event) => {
        stop();
        reject(new Error(event.message || "the solver could not start"));
      };
      worker.postMessage({ ...challenge, index, count: POW_WORKERS });
    }
  });
}

/** Get a challenge, solve it, and return the X-Challenge-Solution of the next join. */
async function payForPlace() {
  const { data: challenge } = await api(`${eventApi(eventId)}/challenge`, { method: "POST" });
  const started = performance.now();
  showPow(0, challenge.maxnumber);
  const number = await solveInWorkers(challenge);
  const pow = $("pow");
  pow.dataset.solvedMs = String(Math.round(performance.now() - started));
  pow.dataset.maxnumber = String(challenge.maxnumber);
  show("pow", false);
  const { algorithm, salt, signature } = challenge;
  return btoa(JSON.stringify({ algorithm, challenge: challenge.challenge, number, salt, signature }));
}

async function join() {
  let renewed = false;
  let solution = null;
  let solves = 0;
  for (let attempt = 0; !state.done; attempt += 1) {
    try {
      const headers = solution ? { "X-Challenge-Solution": solution } : {};
      const { data } = await api(`${eventApi(eventId)}/queue`, { method: "POST", headers });
      rememberIdentity(data);
      if (data.place_receipt) store.set(receiptKey, data.place_receipt);
      return data;
    } catch (caught) {
      let error = caught;
      if (error.status === 404) {
        noSuchEvent(error.message);
        return null;
      }
      if (CHALLENGE_CODES.has(error.code) && solves < MAX_SOLVES) {
        // A new place costs a little work (the server's proof-of-work): a fan already in line
        // never gets here, so a reload does not pay twice.
        solves += 1;
        try {
          solution = await payForPlace();
        } catch (failure) {
          show("pow", false);
          if (!(failure instanceof ApiError)) {
            // No Web Workers or no crypto.subtle (a page served over plain http elsewhere
            // than localhost is not a secure context): nothing a retry would fix.
            notice(
              "error",
              "Could not join the line",
              `This browser could not finish the check (${failure.message}).`,
              [actionButton("Try again", () => location.reload())],
            );
            setConnection("closed");
            return null;
          }
          solution = null;
          solves -= 1;
          error = failure; // a 429 or 503 while fetching the challenge: back off below
        }
        if (solution) continue;
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

/**
 * A one-time ticket for the WebSocket (POST .../queue/ws-ticket): no token ever travels in
 * the socket's URL, where proxies and logs would keep it. The cookie identifies the fan;
 * the tab's saved token too, where the browser keeps no cookie.
 */
async function wsTicket() {
  const saved = store.get(TOKEN_KEY);
  const headers = saved && saved.token ? { Authorization: `Bearer ${saved.token}` } : {};
  try {
    return (await api(`${eventApi(eventId)}/queue/ws-ticket`, { method: "POST", headers })).data;
  } catch (error) {
    if (error.status === 401 && saved && saved.token) {
      // The tab's token went bad; the cookie may still name the fan.
      store.remove(TOKEN_KEY);
      return wsTicket();
    }
    throw error;
  }
}

async function connect() {
  if (state.done || socket || connecting) return;
  clearTimeout(wsTimer);
  connecting = true;
  let ticket;
  try {
    ticket = await wsTicket();
  } catch (error) {
    connecting = false;
    if (state.done) return;
    if (error.status === 404) {
      noSuchEvent(error.message);
    } else if (error.status === 401) {
      sessionLost();
    } else if (error.status === 429) {
      tooManyConnections(error.retryAfter);
    } else {
      failed(false);
    }
    return;
  }
  connecting = false;
  if (state.done || socket) return;
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  let ws;
  try {
    ws = new WebSocket(`${scheme}//${location.host}${ticket.url}`);
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
      if (state.replaced) {
        state.replaced = false;
        clearNotice();
      }
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
    switch (event.code) {
      case 4404:
        if (/event/i.test(event.reason)) noSuchEvent();
        else notInLine();
        return;
      case 4409:
        replaced();
        return;
      case 4429:
        tooManyConnections(null);
        return;
      case 4403:
        // This page's origin may not open the socket (a proxy or configuration problem):
        // retrying will not change that, polling still works.
        startPolling();
        return;
      default:
        // 4401 too: the ticket expired or was used (a tab asleep between asking and
        // connecting); the next attempt asks for a new one.
        failed(heard);
    }
  });
}

/** The fan opened the line in more tabs than the server keeps live: this, the oldest, yields. */
function replaced() {
  state.replaced = true;
  stopPolling();
  setConnection("closed");
  notice("info", "Open in another tab", "This line is live in another tab or window.", [
    actionButton("Watch here", () => {
      wsFailures = 0;
      connect();
    }),
  ]);
}

/** The client address has too many sockets: poll for a while, try the socket again later. */
function tooManyConnections(retryAfter) {
  wsFailures = Math.max(wsFailures, FAILURES_BEFORE_POLLING);
  startPolling();
  const ms = retryAfter != null ? retryAfter * 1000 : backoffMs(wsFailures - 1, 500, 30000);
  wsTimer = setTimeout(connect, Math.max(ms, POLL_MS));
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
  if (!state.done && !socket && !state.replaced) connect();
});

main();
