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
  formatWaitRange,
  isTransient,
  renderEvent,
  retryDelayMs,
  savePass,
  serverNow,
  setText,
  show,
  sleep,
  store,
  WaitEstimate,
  withRetries,
  messageBox,
} from "./common.js";

const eventId = eventIdFromPath();
/** The visitor token this tab was issued: it asks for WebSocket tickets where no cookie is kept. */
const TOKEN_KEY = "waitroom:visitor";
const firstKey = `waitroom:first:${eventId}`;
/** The place receipt of this fan's join: it puts the fan back in place if the line is lost. */
const receiptKey = `waitroom:receipt:${eventId}`;
/** Set once the fan left the line from this page: a reload shows that, not a new place. */
const leftKey = `waitroom:left:${eventId}`;

/** Consecutive WebSocket attempts that ended before any message, before falling back to polling. */
const FAILURES_BEFORE_POLLING = 3;
const POLL_MS = 2000;
/**
 * A node that is stopping (SIGTERM: a deploy, a scale-in) closes its sockets with 1012 and the
 * page reconnects through the load balancer to another node, within this many ms (at random):
 * a node's whole crowd, arriving on the others in the same instant, would be a flash sale of
 * its own. The place is kept: it lives in Redis, not in the node.
 */
const RESTART_SPREAD_MS = 4000;
/** While paused the server pushes no positions; a slow poll keeps the shown place honest. */
const PAUSED_REFRESH_MS = 5000;
/**
 * A place that has not moved for this long is explained (at least; a slow line gets longer:
 * see stallMs): a fan who sees the same number for half a minute wonders what is wrong.
 */
const STALL_MS = 15000;
/** How long the reason for a jump of the estimated wait stays on screen. */
const CHANGE_NOTE_MS = 120000;
/** How often the page looks again at what it shows (a stalled line, a note to retire). */
const REVIEW_MS = 2500;

const STALLED_TEXT =
  "The line has not moved for a while: the sale is limiting how many fans shop at once, so " +
  "fans go in as others finish. You keep your place.";
const LONGER_TEXT =
  "Your estimated wait grew: fans are going in more slowly right now, because the sale is " +
  "limiting how many fans shop at once. You keep your place.";
const SHORTER_TEXT = "Your estimated wait got shorter: fans are going in faster now.";

const state = {
  done: false, // admitted, sold out, or out of line: nothing more to watch
  event: null,
  position: null,
  ahead: null,
  first: null, // the first (largest) position seen: the progress bar's 0 %
  eta: null, // the server's last estimate (seconds), as sent
  wait: null, // the page's steady estimate: {low, high, center, change} or null
  change: null, // {kind: "longer"|"shorter", until}: why the estimate moved, while shown
  movedAt: 0, // performance.now() when the place last changed
  paused: false,
  waitlist: null, // sold out with a waitlist: {returned} (tickets that came back), else null
  leaving: false, // the fan confirmed leaving; the DELETE is on its way
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
const estimate = new WaitEstimate();

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
const notices = messageBox("notice");
const notice = notices.show;
const clearNotice = notices.clear;

function linkButton(text, href) {
  return el("a", { text, className: "button", attrs: { href } });
}

function actionButton(text, onClick) {
  const button = el("button", { text, attrs: { type: "button" } });
  button.addEventListener("click", onClick);
  return button;
}

function fansText(count) {
  if (count == null) return "–";
  return `${formatCount(count)} ${count === 1 ? "fan" : "fans"}`;
}

/** Take a place in line from the server (the ETA is ignored while paused: there is none). */
function showPosition(position, ahead, eta) {
  if (position == null) return;
  const now = performance.now();
  if (position !== state.position) state.movedAt = now;
  state.position = position;
  if (ahead != null) state.ahead = ahead;
  if (state.first == null || position > state.first) {
    state.first = position;
    store.set(firstKey, position);
  }
  if (!state.paused) {
    state.eta = eta ?? null;
    state.wait = estimate.update(state.eta, now);
    if (state.wait && state.wait.change) {
      state.change = { kind: state.wait.change, until: now + CHANGE_NOTE_MS };
    }
  }
  renderLine();
  if (position !== spokenPosition && !state.paused) {
    spokenPosition = position;
    // Near the front every move matters; far back, one update every half minute is enough.
    speaker.say(`You are number ${formatCount(position)} in line. Estimated wait: ${waitText()}.`, {
      gapMs: position <= 20 ? 5000 : 30000,
    });
  }
}

/** 0 % where the fan was first seen, 100 % once admitted: the share of the fan's own way. */
function progressPercent() {
  const { first, position } = state;
  if (!first || position == null || position >= first) return 0;
  // Any step forward shows: 1 place of 300 is not 0 %.
  return Math.max(1, Math.round((100 * (first - position)) / first));
}

function beforeOpening() {
  const opens = state.event && state.event.opens_at ? Date.parse(state.event.opens_at) : NaN;
  return Number.isFinite(opens) && serverNow() < opens;
}

/** How long the place may stay put before the page explains: longer for a slow line. */
function stallMs() {
  const perPlace = state.eta != null && state.ahead ? state.eta / state.ahead : 0;
  return Math.max(STALL_MS, 4000 * perPlace);
}

function isStalled(now = performance.now()) {
  return (
    !state.paused && state.position != null && state.movedAt > 0 && now - state.movedAt >= stallMs()
  );
}

function waitText() {
  if (state.wait) return formatWaitRange(state.wait.low, state.wait.high);
  return isStalled() && !beforeOpening() ? "unknown while the line is not moving" : "estimating…";
}

/** Why the wait is what it is, when that is not obvious: before opening, stalled, a jump. */
function noteText(now) {
  if (beforeOpening()) {
    return `The sale opens ${formatDateTime(state.event.opens_at)}: the line starts moving then.`;
  }
  if (isStalled(now)) return STALLED_TEXT;
  if (state.change && state.change.until > now) {
    return state.change.kind === "longer" ? LONGER_TEXT : SHORTER_TEXT;
  }
  return "";
}

/** Draw the line card from `state`. */
function renderLine() {
  const { position, ahead } = state;
  if (position == null || state.done) return;
  show("lottery", false);
  show("line");
  showLeave(true);
  $("line").dataset.paused = String(state.paused);
  $("line").dataset.waitlist = String(state.waitlist != null);
  setText("line-heading", state.waitlist ? "Your place on the waitlist" : "Your place in line");
  setText("position", `You are number ${formatCount(position)} in line`);
  const percent = progressPercent();
  $("progress").value = percent;
  if (state.waitlist && !state.paused) {
    // Sold out: whether a ticket comes back at all is unknowable, so no wait is shown.
    setText("ahead", ahead === 0 ? "No one: you are first on the waitlist" : fansText(ahead));
    setText("eta", "None on the waitlist");
    setText("progress-text", waitlistText(state.waitlist.returned, ahead));
    setNote("");
    return;
  }
  if (state.paused) {
    // Nobody goes in while paused: no estimate, no "next", no progress to speak of.
    setText("ahead", ahead === 0 ? "No one" : fansText(ahead));
    setText("eta", "None while the line is paused");
    setText("progress-text", "The line is paused: you keep your place.");
    setNote("");
    return;
  }
  setText("ahead", ahead === 0 ? "No one: you are next" : fansText(ahead));
  setText("eta", waitText());
  const moved = state.first - position;
  setText(
    "progress-text",
    moved > 0
      ? `${percent}% of the way to the front: up ${formatCount(moved)} ` +
          `${moved === 1 ? "place" : "places"} so far`
      : `${percent}% of the way to the front`,
  );
  setNote(noteText(performance.now()));
}

function setNote(text) {
  const note = $("eta-note");
  if (note.textContent !== text) {
    note.textContent = text;
    if (text) speaker.say(text);
  }
  note.hidden = !text;
}

function setProgress(percent) {
  $("progress").value = percent;
  setText("progress-text", `${percent}% of the way to the front`);
}

/** The waitlist in one sentence (the page's notice, the progress line and the announcer). */
function waitlistText(returned, ahead) {
  const tickets = `${formatCount(returned)} ${returned === 1 ? "ticket has" : "tickets have"}`;
  const fans = ahead == null ? "" : `, ${fansText(ahead)} ahead of you`;
  return `You are on the waitlist — ${tickets} come back${fans}.`;
}

/** Sold out, but this fan stays on the waitlist for tickets that come back (no ETA). */
function waitlisted(position, ahead, returned) {
  if (position == null) return;
  const changed =
    !state.waitlist || state.waitlist.returned !== returned || state.ahead !== ahead;
  state.waitlist = { returned: returned ?? 0 };
  state.eta = null;
  state.wait = null;
  state.change = null;
  if (position !== state.position) state.movedAt = performance.now();
  state.position = position;
  if (ahead != null) state.ahead = ahead;
  if (state.first == null || position > state.first) {
    state.first = position;
    store.set(firstKey, position);
  }
  if (!state.paused) {
    const text = waitlistText(state.waitlist.returned, state.ahead);
    notice(
      "warning",
      "Sold out: you are on the waitlist",
      `${text} Tickets that come back (expired holds, cancellations, refunds) go to the ` +
        "waitlist in line order, so keep this page open: it takes you to checkout if one is " +
        "yours.",
    );
    if (changed) speaker.say(text);
  }
  renderLine();
}

/** Back from the waitlist to a moving line (the organiser turned the waitlist off). */
function unwaitlisted() {
  if (!state.waitlist) return;
  state.waitlist = null;
  estimate.reset();
  clearNotice();
}

function paused() {
  if (state.paused) return;
  state.paused = true;
  state.change = null;
  notice(
    "warning",
    "The line is paused",
    "The organiser has paused admission, so nobody goes in for now and there is no wait " +
      "estimate. You keep your place in line; it resumes by itself.",
  );
  renderLine();
  speaker.say("The line is paused. You keep your place in line.");
  schedulePausedRefresh();
}

function unpaused() {
  if (!state.paused) return;
  state.paused = false;
  clearTimeout(pausedTimer);
  // The rate seen before the pause says little about the rate after it: start afresh.
  estimate.reset();
  state.wait = null;
  state.movedAt = performance.now();
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
  showLeave(true);
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
  showLeave(false);
  stopPolling();
  clearTimeout(wsTimer);
  clearTimeout(pausedTimer);
  if (socket) {
    const closing = socket;
    socket = null;
    closing.close(1000, "done");
  }
}

/** Longest the page waits, once admitted over the WebSocket, for its status to come back. */
const ROUTE_HINT_MS = 1000;

function admitted(queuePass, expiresAt, { viaSocket = false } = {}) {
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
  setNote("");
  setProgress(100);
  const url = checkoutUrl(eventId);
  notice("success", "It's your turn", "Taking you to checkout…", [
    linkButton("Go to checkout", url),
  ]);
  speaker.say("It's your turn. Taking you to checkout.", { urgent: true });
  // replace(): "back" from checkout must not land on a page that forwards straight again.
  const go = () => location.replace(url);
  if (!viaSocket) {
    go();
    return;
  }
  // One status request first: its answer may set the cookie that lets the load balancer
  // send this fan's checkout straight to the node selling the event's tickets (a WebSocket
  // message cannot set a cookie). Bounded: checkout never waits long for it.
  const status = api(`${eventApi(eventId)}/queue/me`).catch(() => {});
  Promise.race([status, sleep(ROUTE_HINT_MS)]).then(go);
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

/** One friendly message: the heading says it, the notice says what to do (no raw error). */
function noSuchEvent() {
  finish();
  setConnection("closed");
  document.title = "No such event · waitroom";
  setText("event-name", "No such event");
  setText("event-venue", "");
  show("ticket-types-block", false);
  show("line", false);
  show("lottery", false);
  show("pow", false);
  notice("error", "", NO_EVENT_TEXT);
  speaker.say(`No such event. ${NO_EVENT_TEXT}`, { urgent: true });
}

const NO_EVENT_TEXT =
  "There is no event at this address. Check the link you were given, or ask the organiser.";

function outOfLine(title, text) {
  finish();
  setConnection("closed");
  show("line", false);
  show("lottery", false);
  notice("warning", title, text, [actionButton("Join the line again", rejoin)]);
  speaker.say(title, { urgent: true });
}

function notInLine() {
  if (state.leaving) return; // of course: the fan just left
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
  store.remove(leftKey);
  state.restoreTried = false;
  state.done = false;
  state.first = null;
  state.position = null;
  state.ahead = null;
  state.eta = null;
  state.wait = null;
  state.change = null;
  state.paused = false;
  state.leaving = false;
  state.replaced = false;
  estimate.reset();
  spokenPosition = null;
  wsFailures = 0;
  store.remove(firstKey);
  clearNotice();
  start();
}

// --- leaving the line -------------------------------------------------------------------

function showLeave(visible) {
  const shown = visible && !state.done;
  show("leave", shown);
  if (!shown) {
    show("leave-confirm", false);
    show("leave-button");
    $("leave-button").setAttribute("aria-expanded", "false");
  }
}

function openLeaveConfirm() {
  if (state.done) return;
  show("leave-error", false);
  show("leave-button", false);
  $("leave-button").setAttribute("aria-expanded", "true");
  show("leave-confirm");
  // The safe answer has the focus: Enter right away keeps the place.
  $("leave-no").focus();
}

function closeLeaveConfirm() {
  if (state.leaving) return;
  show("leave-confirm", false);
  show("leave-button");
  $("leave-button").setAttribute("aria-expanded", "false");
  $("leave-button").focus();
}

function setLeaveBusy(busy) {
  $("leave-yes").disabled = busy;
  $("leave-no").disabled = busy;
  setText("leave-yes", busy ? "Leaving…" : "Yes, leave the line");
}

/** DELETE .../queue/me as this fan: the cookie names it, or the tab's token without one. */
async function leaveRequest() {
  const path = `${eventApi(eventId)}/queue/me`;
  const saved = store.get(TOKEN_KEY);
  if (!saved || !saved.token) return api(path, { method: "DELETE" });
  const headers = { Authorization: `Bearer ${saved.token}` };
  try {
    return await api(path, { method: "DELETE", headers });
  } catch (error) {
    if (error.status !== 401) throw error;
    store.remove(TOKEN_KEY); // the tab's token went bad; the cookie may still name the fan
    return api(path, { method: "DELETE" });
  }
}

/** Leave the line, after the fan confirmed. */
async function leaveLine() {
  if (state.leaving || state.done) return;
  state.leaving = true;
  setLeaveBusy(true);
  try {
    // A retry of a leave that went through answers 404 not_in_line: left all the same.
    await withRetries(leaveRequest, { attempts: 3 });
    leftLine();
  } catch (error) {
    state.leaving = false;
    setLeaveBusy(false);
    if (state.done) return; // admitted meanwhile: on the way to checkout
    if (error.code === "not_in_line") {
      leftLine();
    } else if (error.status === 404) {
      noSuchEvent();
    } else if (error.status === 401) {
      sessionLost();
    } else if (error.code === "already_admitted") {
      // Too late to leave: it is the fan's turn, and the pass is there to take.
      show("leave-confirm", false);
      try {
        applyStatus((await api(`${eventApi(eventId)}/queue/me`)).data);
      } catch {
        // the WebSocket brings the pass too
      }
    } else {
      setText("leave-error", `Could not leave the line: ${error.message} You are still in line.`);
      show("leave-error");
      if (!socket && !polling) connect();
    }
  }
}

function leftLine() {
  finish();
  store.remove(receiptKey); // the place was given up: nothing to restore
  store.remove(firstKey);
  store.set(leftKey, true);
  state.leaving = false;
  showLeft();
  $("notice").focus();
}

function showLeft() {
  state.done = true;
  setConnection("closed");
  show("line", false);
  show("lottery", false);
  show("pow", false);
  showLeave(false);
  notice(
    "info",
    "You left the line",
    "You gave up your place. Joining again puts you at the back of the line.",
    [actionButton("Join the line again", rejoin)],
  );
  speaker.say("You left the line.", { urgent: true });
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
      paused();
      showPosition(body.position, body.fans_ahead, null);
      break;
    case "waitlist":
      unpaused();
      waitlisted(body.position, body.fans_ahead, body.returned);
      break;
    default:
      unpaused();
      unwaitlisted();
      showPosition(body.position, body.fans_ahead, body.eta_seconds);
  }
}

/** Apply a WebSocket message (see waitroom/messages.py). */
function applyMessage(message) {
  if (state.done) return;
  switch (message.type) {
    case "position":
      unpaused();
      unwaitlisted();
      showPosition(message.position, message.fans_ahead, message.eta_seconds);
      break;
    case "waitlist":
      unpaused();
      waitlisted(message.position, message.fans_ahead, message.returned);
      break;
    case "admitted":
      admitted(message.pass, message.expires_at, { viaSocket: true });
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
        noSuchEvent();
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
      noSuchEvent();
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
    // Leaving: the server closes the socket of a fan no longer in line (4404), as it should.
    if (state.done || state.leaving) return;
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
      case 1001: // going away
      case 1012: // service restart: the node is draining
        restarting();
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

/** The node closed the socket because it is stopping: reconnect soon (RESTART_SPREAD_MS). */
function restarting() {
  wsFailures = 0;
  if (!polling) setConnection("reconnecting");
  wsTimer = setTimeout(connect, Math.random() * RESTART_SPREAD_MS);
}

/** A WebSocket ended (1006, 1011, 1013 try later...): back off, then try again. */
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
  if (state.leaving) {
    pollTimer = setTimeout(poll, POLL_MS);
    return;
  }
  let next = POLL_MS;
  try {
    applyStatus((await api(`${eventApi(eventId)}/queue/me`)).data);
  } catch (error) {
    if (error.status === 404) {
      if (error.code === "not_in_line") notInLine();
      else noSuchEvent();
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
        noSuchEvent();
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
    noSuchEvent();
    return;
  }
  $("leave-button").addEventListener("click", openLeaveConfirm);
  $("leave-no").addEventListener("click", closeLeaveConfirm);
  $("leave-yes").addEventListener("click", leaveLine);
  $("leave-confirm").addEventListener("keydown", (event) => {
    if (event.key === "Escape") closeLeaveConfirm();
  });
  const first = Number(store.get(firstKey));
  if (Number.isInteger(first) && first > 0) state.first = first;
  if (!(await loadEvent())) return;
  if (store.get(leftKey)) {
    showLeft(); // left from this tab: a reload must not quietly take a new place
    return;
  }
  await start();
}

// A place that stops moving, a note that has said its piece: look again now and then.
setInterval(() => {
  if (!state.done && !state.leaving) renderLine();
}, REVIEW_MS);

// A laptop waking up or a network coming back: reconnect now rather than after the backoff.
window.addEventListener("online", () => {
  if (!state.done && !socket && !state.replaced) connect();
});

main();
