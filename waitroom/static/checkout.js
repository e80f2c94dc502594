// The checkout page: with the queue pass from the waiting page, reserve tickets, pay for the
// hold before its deadline, and show the ticket codes.

import {
  $,
  announcer,
  api,
  el,
  eventApi,
  eventIdFromPath,
  formatClock,
  formatMoney,
  isTransient,
  loadPass,
  newKey,
  renderEvent,
  retryDelayMs,
  serverNow,
  setText,
  show,
  sleep,
  store,
  waitingUrl,
  withRetries,
  messageBox,
} from "./common.js";

const eventId = eventIdFromPath();
const holdKey = `waitroom:hold:${eventId}`;
const PAYMENT_POLL_MS = 500;
// Longest the server holds a reservation request while the payment is under way (?wait=):
// well inside the idle timeouts of proxies on the way (30 s in deploy/haproxy.cfg), even
// when a saturated node is seconds late.
const PAYMENT_WAIT_S = 10;

const state = {
  event: null,
  pass: null, // {pass, expires_at}
  hold: null, // the reservation being paid for
  paying: false,
  paymentId: null, // the attempt this page is waiting for
  paid: false,
};
let holdTimer = null;
let passTimer = null;
let warnedLastMinute = false;
const shownCodes = new Set();

const speaker = announcer("announcer", 3000);

// --- messages -----------------------------------------------------------------------------

/** The message box: `kind` is info, warning, error or success (read out at once). */
const messages = messageBox("message", speaker);
const message = messages.show;
const clearMessage = messages.clear;

function backToLineLink(text = "Back to the waiting line") {
  return el("a", { text, className: "button", attrs: { href: waitingUrl(eventId) } });
}

function button(text, onClick, className = "") {
  const element = el("button", { text, className, attrs: { type: "button" } });
  element.addEventListener("click", onClick);
  return element;
}

/**
 * Disable the buttons while a request runs; `text` says what runs, under the page. A payment
 * says so in its own card instead (payment-status), so it is said once, where the fan looks.
 */
function setBusy(busy, text = "") {
  for (const id of ["reserve", "pay", "cancel"]) {
    const element = $(id);
    if (element) element.disabled = busy;
  }
  $("main").setAttribute("aria-busy", busy ? "true" : "false");
  setText("progress-status", text);
}

/** "Back to the waiting line" is for fans who still need a turn: not after paying. */
function showBackToLine(visible) {
  show("back-to-line", visible);
}

function passHeaders(key) {
  const headers = { "X-Queue-Pass": state.pass.pass };
  if (key) headers["Idempotency-Key"] = key;
  return headers;
}

const retrying = (error, ms) =>
  setText("progress-status", `${error.message} Retrying in ${Math.ceil(ms / 1000)} s…`);

/** Turn an error answer into what the fan should read and can do next. */
function handleError(error) {
  const code = error.code || "";
  if (code.startsWith("pass_")) {
    passProblem(error.message);
  } else if (error.status === 401) {
    stopEverything();
    message("error", "Your session has expired", error.message, [backToLineLink()]);
  } else if (code === "sold_out") {
    message("error", "Sold out", error.message);
    refreshEvent();
  } else if (code === "tickets_held") {
    // Not sold out: other fans hold the rest and may not pay. Say so, and ask again by
    // ourselves after the server's Retry-After (a new request each time) until tickets
    // come back or they are really gone.
    const seconds = Math.max(1, Math.round(error.retryAfter ?? 5));
    const now = document.createElement("button");
    now.type = "button";
    now.textContent = "Try now";
    now.addEventListener("click", () => retryHeld(0));
    message("warning", "All tickets are held right now", `${error.message} Trying again in ${seconds} s…`, [now]);
    retryHeld(seconds * 1000);
    refreshEvent();
  } else if (code === "fan_limit") {
    message("warning", "Limit reached", error.message);
  } else if (code === "hold_expired") {
    holdExpired();
  } else if (code === "hold_cancelled" || code === "hold_not_found") {
    forgetHold();
    message("warning", "This hold is gone", error.message);
    showReserve();
  } else if (code === "hold_already_confirmed" && state.hold) {
    refreshHold(state.hold.id);
  } else if (isTransient(error)) {
    message("warning", "The service is busy", `${error.message} Please try again in a moment.`);
  } else {
    message("error", "Something went wrong", error.message);
  }
}

function passProblem(text) {
  stopEverything();
  show("reserve-section", false);
  show("hold-section", false);
  message("error", "Your queue pass cannot be used", text, [backToLineLink()]);
}

function stopEverything() {
  state.paying = false;
  clearInterval(holdTimer);
  clearInterval(passTimer);
}

// --- the event and the reserve form -----------------------------------------------------------

/** Tickets of `type` a fan may still get: those left, and those only held by others (their
 * holds may lapse). Zero means sold out. */
function obtainable(type) {
  return type.available + (type.held || 0);
}

function limitOf(type) {
  const limit = Math.min(type.per_fan_limit, state.event.per_fan_limit || type.per_fan_limit);
  return Math.max(1, obtainable(type) > 0 ? Math.min(limit, obtainable(type)) : limit);
}

function selectedType() {
  const name = $("ticket-type").value;
  return state.event.ticket_types.find((t) => t.name === name) || null;
}

function renderOptions() {
  const select = $("ticket-type");
  const previous = select.value;
  select.replaceChildren(
    ...state.event.ticket_types.map((t) => {
      const price = formatMoney(t.price_minor, t.currency);
      const note =
        t.available > 0 ? "" : obtainable(t) > 0 ? " (held)" : " (sold out)";
      const option = el("option", { text: `${t.name} · ${price}${note}`, attrs: { value: t.name } });
      option.disabled = obtainable(t) <= 0;
      return option;
    }),
  );
  const open = state.event.ticket_types.filter((t) => obtainable(t) > 0);
  const keep = open.find((t) => t.name === previous) || open[0];
  if (keep) select.value = keep.name;
  $("reserve").disabled = !keep;
  if (!keep) message("error", "Sold out", "Every ticket of this event has been sold.");
  renderQuantities();
}

function renderQuantities() {
  const type = selectedType();
  const select = $("quantity");
  if (!type) {
    select.replaceChildren();
    return;
  }
  const limit = limitOf(type);
  const previous = Number(select.value) || 1;
  select.replaceChildren(
    ...Array.from({ length: limit }, (_, i) =>
      el("option", { text: String(i + 1), attrs: { value: String(i + 1) } }),
    ),
  );
  select.value = String(Math.min(previous, limit));
  const perFan = Math.min(type.per_fan_limit, state.event.per_fan_limit || type.per_fan_limit);
  setText("quantity-hint", `Up to ${perFan} ${perFan === 1 ? "ticket" : "tickets"} per fan.`);
}

async function loadEvent() {
  try {
    state.event = (await withRetries(() => api(eventApi(eventId)), { attempts: 4 })).data;
  } catch (error) {
    if (error.status === 404) {
      noSuchEvent();
    } else {
      message("error", "Could not load the event", error.message, [
        button("Try again", () => location.reload()),
      ]);
    }
    return false;
  }
  renderEvent(state.event);
  offerSeatMap();
  return true;
}

/** A seat's id (``stalls:A:3``) in words: "stalls, row A, seat 3". */
function seatWords(id) {
  const [section, row, seat] = String(id).split(":");
  return seat === undefined ? String(id) : `${section}, row ${row}, seat ${seat}`;
}

/** Events with a seat map are sold seat by seat there: point the fan to it. */
async function offerSeatMap() {
  try {
    await api(`${eventApi(eventId)}/seats`);
  } catch {
    return; // no seat map (404), or a hiccup: tickets by type, as always
  }
  $("seatmap-anchor").href = `${waitingUrl(eventId)}/seats`;
  show("seatmap-link");
}

const NO_EVENT_TEXT =
  "There is no event at this address. Check the link you were given, or ask the organiser.";

/** One friendly message: the heading says it, the box says what to do (no raw error). */
function noSuchEvent() {
  document.title = "No such event · checkout · waitroom";
  setText("event-name", "No such event");
  showBackToLine(false); // there is no line to go back to
  message("error", "", NO_EVENT_TEXT);
}

async function refreshEvent() {
  try {
    state.event = (await api(eventApi(eventId))).data;
    renderEvent(state.event);
    renderOptions();
  } catch {
    // the availability shown is a little stale; the next reservation tells the truth
  }
}

function showReserve() {
  state.hold = null;
  state.paying = false;
  clearInterval(holdTimer);
  show("hold-section", false);
  show("reserve-section");
  if (state.event) renderOptions();
}

async function reserve(event) {
  event.preventDefault();
  const type = selectedType();
  if (!type || $("reserve").disabled) return;
  const quantity = Number($("quantity").value);
  clearMessage();
  // One key per click; the automatic retries below reuse it, so a retried request whose first
  // answer was lost returns the same hold instead of holding twice.
  const key = newKey();
  setBusy(true, "Reserving…");
  try {
    const { data } = await withRetries(
      () =>
        api(`${eventApi(eventId)}/reservations`, {
          method: "POST",
          body: { ticket_type: type.name, quantity },
          headers: passHeaders(key),
        }),
      { onRetry: retrying },
    );
    store.set(holdKey, data.id);
    setBusy(false);
    showHold(data);
    refreshEvent(); // the availability shown now counts this hold
    speaker.say(`Reserved. You have ${formatClock(secondsLeft(data))} to pay.`, { urgent: true });
  } catch (error) {
    setBusy(false);
    handleError(error);
  }
}

let heldRetry = null;

/** Ask for the tickets again in `ms` (one pending retry at a time). */
function retryHeld(ms) {
  if (heldRetry !== null) clearTimeout(heldRetry);
  heldRetry = setTimeout(() => {
    heldRetry = null;
    if (!state.hold && !$("reserve").disabled) $("reserve-form").requestSubmit();
  }, ms);
}

// --- the hold, its countdown, paying and cancelling -------------------------------------------

function secondsLeft(hold) {
  return (Date.parse(hold.expires_at) - serverNow()) / 1000;
}

function showHold(hold) {
  state.hold = hold;
  show("reserve-section", false);
  show("hold-section");
  const total = formatMoney(hold.amount_minor, hold.currency);
  const noun = hold.quantity === 1 ? "ticket" : "tickets";
  setText("hold-summary", `${hold.quantity} × ${hold.ticket_type} ${noun}, ${total} in total`);
  const seats = Array.isArray(hold.seats) ? hold.seats : [];
  setText("hold-seats", `Seats: ${seats.map(seatWords).join("; ")}`);
  show("hold-seats", seats.length > 0);
  setText("pay", `Pay ${total}`);
  warnedLastMinute = false;
  tick();
  clearInterval(holdTimer);
  holdTimer = setInterval(tick, 1000);
}

function tick() {
  if (!state.hold) return;
  const left = secondsLeft(state.hold);
  setText("countdown", formatClock(left));
  $("countdown-block").classList.toggle("urgent", left <= 60);
  if (left <= 60 && left > 0 && !warnedLastMinute) {
    warnedLastMinute = true;
    speaker.say("Less than a minute left to pay.");
  }
  // While a payment runs, the server decides whether it made it in time.
  if (left <= 0 && !state.paying) holdExpired();
}

function forgetHold() {
  store.remove(holdKey);
  clearInterval(holdTimer);
  state.hold = null;
  state.paying = false;
}

// A queue pass has one hold cycle: once its hold is cancelled or has expired, the tickets
// are back on sale for the fans behind in line, and this pass cannot reserve again.
const PASS_USED_TEXT = "A queue pass reserves once, so this one cannot reserve again.";

function holdExpired() {
  forgetHold();
  show("hold-section", false);
  show("reserve-section", false);
  message("warning", "Your hold expired", `The tickets went back on sale. ${PASS_USED_TEXT}`);
}

function selectedMethod() {
  const checked = document.querySelector('input[name="payment_method"]:checked');
  return checked ? checked.value : "card";
}

async function pay(event) {
  event.preventDefault();
  if (!state.hold || state.paying) return;
  const holdId = state.hold.id;
  clearMessage();
  const key = newKey();
  state.paying = true;
  setBusy(true);
  setText("payment-status", "Processing your payment…");
  try {
    const { data } = await withRetries(
      () =>
        api(`/v1/reservations/${encodeURIComponent(holdId)}/confirm`, {
          method: "POST",
          body: { payment_method: selectedMethod() },
          headers: passHeaders(key),
        }),
      { onRetry: retrying },
    );
    state.paymentId = data.payment ? data.payment.id : null;
    if (!applyReservation(data)) await followPayment(holdId);
  } catch (error) {
    state.paying = false;
    setBusy(false);
    setText("payment-status", "");
    handleError(error);
  }
}

/**
 * Follow the reservation until the payment this page started settles: a long poll (the
 * server answers as soon as the order is paid or the payment failed, or after
 * PAYMENT_WAIT_S with the reservation as it is), never more often than PAYMENT_POLL_MS.
 */
async function followPayment(holdId) {
  let attempt = 0;
  const path = `/v1/reservations/${encodeURIComponent(holdId)}?wait=${PAYMENT_WAIT_S}`;
  while (state.paying && state.hold && state.hold.id === holdId) {
    const asked = Date.now();
    try {
      const { data } = await api(path);
      attempt = 0;
      if (applyReservation(data)) return;
      // Answered early without news (a server that cannot wait now): poll as before.
      await sleep(Math.max(0, PAYMENT_POLL_MS - (Date.now() - asked)));
    } catch (error) {
      if (!isTransient(error)) {
        state.paying = false;
        setBusy(false);
        handleError(error);
        return;
      }
      await sleep(retryDelayMs(error, attempt));
      attempt += 1;
    }
  }
}

/** Whether the reservation's payment is still pending or processing. */
function paymentUnderWay(reservation) {
  const payment = reservation.payment;
  return Boolean(payment && ["pending", "processing"].includes(payment.state));
}

/**
 * Whether the reservation is paid for, tickets and all. The hold turns "paid" when the
 * event's actor confirms it, a moment before the payment worker writes the paid order with
 * its tickets: in between, the payment is still processing and the page keeps following it.
 */
function isPaid(reservation) {
  if (reservation.order_status === "paid") return true;
  return reservation.status === "paid" && !paymentUnderWay(reservation);
}

/** Show a reservation's state; true once it needs no more polling. */
function applyReservation(reservation) {
  if (isPaid(reservation)) {
    paid(reservation);
    return true;
  }
  const payment = reservation.payment;
  const settled = payment && (state.paymentId == null || payment.id === state.paymentId);
  if (settled && payment.state === "failed") {
    state.paying = false;
    setBusy(false);
    const reason = payment.last_error || "the payment did not go through";
    setText("payment-status", "");
    setText("pay", "Try payment again");
    // The test card that declines is a one-off choice: trying again means the normal card
    // (the fan may pick the declining one again on purpose).
    const card = document.querySelector('input[name="payment_method"][value="card"]');
    if (card) card.checked = true;
    message(
      "error",
      "Payment failed",
      `Your payment failed (${reason}). Your tickets are still held, so you can try again.`,
    );
    if (secondsLeft(reservation) <= 0) holdExpired();
    return true;
  }
  if (reservation.status === "expired" || reservation.status === "cancelled") {
    if (!payment || !["pending", "processing"].includes(payment.state)) {
      holdExpired();
      return true;
    }
  }
  return false;
}

function paid(reservation) {
  state.paid = true;
  forgetHold();
  setBusy(false);
  clearInterval(passTimer);
  show("hold-section", false);
  show("reserve-section", false);
  setText("payment-status", "");
  showBackToLine(false);
  renderTickets(reservation.tickets);
  const n = reservation.tickets.length;
  message(
    "success",
    "Payment complete",
    `You're going! Your ${n === 1 ? "ticket is" : `${n} tickets are`} below.`,
  );
  setText("pass-clock", "Order paid");
}

async function cancelHold() {
  if (!state.hold || state.paying) return;
  const holdId = state.hold.id;
  const key = newKey();
  setBusy(true, "Releasing your tickets…");
  try {
    await withRetries(
      () =>
        api(`/v1/reservations/${encodeURIComponent(holdId)}`, {
          method: "DELETE",
          headers: passHeaders(key),
        }),
      { onRetry: retrying },
    );
    setBusy(false);
    forgetHold();
    show("hold-section", false);
    show("reserve-section", false);
    refreshEvent();
    message("info", "Hold released", `Your tickets went back on sale. ${PASS_USED_TEXT}`);
  } catch (error) {
    setBusy(false);
    handleError(error);
  }
}

async function refreshHold(holdId) {
  try {
    const { data } = await api(`/v1/reservations/${encodeURIComponent(holdId)}`);
    // Confirmed by the actor while the payment worker has yet to write the paid order.
    const confirming = data.status === "paid" && paymentUnderWay(data);
    if (isPaid(data)) {
      paid(data);
    } else if (confirming || (data.status === "held" && secondsLeft(data) > 0)) {
      showHold(data);
      const payment = data.payment;
      if (paymentUnderWay(data)) {
        state.paying = true;
        state.paymentId = payment.id;
        setBusy(true);
        setText("payment-status", "Processing your payment…");
        await followPayment(holdId);
      } else if (payment && payment.state === "failed") {
        state.paymentId = payment.id;
        applyReservation(data);
      }
    } else {
      store.remove(holdKey);
      showReserve();
    }
  } catch (error) {
    if (error.status === 404) {
      store.remove(holdKey);
      showReserve();
    } else {
      handleError(error);
    }
  }
}

// --- tickets ----------------------------------------------------------------------------------

function renderTickets(tickets) {
  const list = $("tickets");
  for (const ticket of tickets) {
    if (shownCodes.has(ticket.code)) continue;
    shownCodes.add(ticket.code);
    list.append(
      el("li", { className: "ticket" }, [
        el("span", {
          text: ticket.seat ? `${ticket.ticket_type} · ${seatWords(ticket.seat)}` : ticket.ticket_type,
          className: "ticket-type",
        }),
        el("code", { text: ticket.code, className: "ticket-code" }),
        // The signed ticket as a QR code, for the door (the visitor cookie says whose it is).
        el("img", {
          className: "ticket-qr",
          attrs: {
            src: `/v1/tickets/${encodeURIComponent(ticket.code)}/qr.svg`,
            alt: `QR code of ticket ${ticket.code}`,
            width: "192",
            height: "192",
          },
        }),
      ]),
    );
  }
  if (shownCodes.size > 0) show("tickets-section");
}

/** Tickets this fan bought earlier for this event (a reload after paying shows them again). */
async function loadOrders() {
  try {
    const { data } = await api("/v1/orders");
    const mine = data.filter((o) => o.event_id === eventId && o.status === "paid");
    for (const order of mine) renderTickets(order.tickets);
    return mine.length > 0;
  } catch {
    return false; // no identity yet, or a hiccup: nothing to show
  }
}

// --- the pass -------------------------------------------------------------------------------

function passClock() {
  const expires = state.pass.expires_at;
  if (typeof expires !== "number") return;
  const update = () => {
    const left = expires - serverNow() / 1000;
    if (left > 0) {
      setText("pass-clock", `Pass valid for ${formatClock(left)}`);
    } else {
      clearInterval(passTimer);
      setText("pass-clock", "Pass expired");
      if (!state.paid && !state.paying) {
        passProblem("Your queue pass has expired. Join the line again to get a new one.");
      }
    }
  };
  update();
  passTimer = setInterval(update, 1000);
}

// --- start ----------------------------------------------------------------------------------

async function main() {
  for (const link of document.querySelectorAll("a[data-back-to-line]")) {
    link.href = eventId ? waitingUrl(eventId) : "/";
  }
  if (!eventId) {
    noSuchEvent();
    return;
  }
  $("reserve-form").addEventListener("submit", reserve);
  $("ticket-type").addEventListener("change", renderQuantities);
  $("pay-form").addEventListener("submit", pay);
  $("cancel").addEventListener("click", cancelHold);

  state.pass = loadPass(eventId);
  if (!(await loadEvent())) return;
  const hadOrders = await loadOrders();
  // A fan with a paid order has had the turn: the line would only bring them back here.
  if (hadOrders) showBackToLine(false);
  if (!state.pass) {
    if (!hadOrders) show("no-pass");
    return;
  }
  const holdId = store.get(holdKey);
  if (typeof holdId === "string" && holdId) {
    passClock();
    await refreshHold(holdId);
  } else if (hadOrders) {
    // Back after paying: the pass is spent, so the tickets are all there is to show.
    state.paid = true;
    setText("pass-clock", "Order paid");
  } else {
    passClock();
    showReserve();
  }
}

main();
