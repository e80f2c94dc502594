// Shared by the waiting page and the checkout page: the JSON API, retries, storage, formats.
// Plain ES module, no build step; everything talks to this origin only.

/** An error answer of the API ({"error": {"code", "message", "details"}}) or a network failure. */
export class ApiError extends Error {
  constructor(status, code, message, details, retryAfter) {
    super(message);
    this.name = "ApiError";
    this.status = status; // 0 when the request never got an answer
    this.code = code;
    this.details = details || {};
    this.retryAfter = retryAfter; // seconds, or null
  }
}

/** Seconds to wait from a Retry-After header (delta-seconds or an HTTP date), or null. */
export function parseRetryAfter(value) {
  if (!value) return null;
  const seconds = Number(value);
  if (Number.isFinite(seconds)) return Math.max(0, seconds);
  const date = Date.parse(value);
  return Number.isNaN(date) ? null : Math.max(0, (date - Date.now()) / 1000);
}

/**
 * Call the JSON API. Resolves with {status, data}; rejects with an ApiError.
 * The visitor cookie (HttpOnly) identifies the fan, so credentials stay same-origin.
 */
export async function api(path, { method = "GET", body, headers = {} } = {}) {
  const init = {
    method,
    credentials: "same-origin",
    cache: "no-store",
    headers: { Accept: "application/json", ...headers },
  };
  if (body !== undefined) {
    init.body = JSON.stringify(body);
    init.headers["Content-Type"] = "application/json";
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch {
    throw new ApiError(0, "network", "Could not reach the server; check your connection.", {}, null);
  }
  noteServerDate(response.headers.get("Date"));
  const retryAfter = parseRetryAfter(response.headers.get("Retry-After"));
  let data = null;
  try {
    const text = await response.text();
    data = text ? JSON.parse(text) : null;
  } catch {
    data = null; // a proxy's HTML error page, a cut-off body: the status still says enough
  }
  if (!response.ok) {
    const error = data && data.error ? data.error : {};
    throw new ApiError(
      response.status,
      error.code || `http_${response.status}`,
      error.message || `The server answered ${response.status}; please try again.`,
      error.details,
      retryAfter,
    );
  }
  return { status: response.status, data };
}

let clockOffsetMs = 0;

/**
 * Track how far this device's clock is from the server's, from the Date header (whole
 * seconds), so a hold's countdown is right even on a device whose clock is off by minutes.
 * Offsets under 1.5 s are ignored: the header's rounding would only add noise.
 */
function noteServerDate(header) {
  const date = Date.parse(header || "");
  if (Number.isNaN(date)) return;
  const offset = date + 500 - Date.now();
  clockOffsetMs = Math.abs(offset) > 1500 ? offset : 0;
}

/** The server's idea of now, in milliseconds since the epoch. */
export const serverNow = () => Date.now() + clockOffsetMs;

/** True for failures worth retrying unchanged: no answer, overload, a dependency down. */
export function isTransient(error) {
  return error instanceof ApiError && [0, 429, 502, 503, 504].includes(error.status);
}

export const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/**
 * Exponential backoff with jitter: between half and all of min(cap, base * 2^attempt).
 * The jitter spreads a crowd that lost its connections at once, so it does not come back at once.
 */
export function backoffMs(attempt, baseMs = 500, capMs = 30000) {
  const ceiling = Math.min(capMs, baseMs * 2 ** Math.min(attempt, 16));
  return ceiling / 2 + Math.random() * (ceiling / 2);
}

/** How long to wait before retrying after `error`: the server's Retry-After wins. */
export function retryDelayMs(error, attempt) {
  if (error && error.retryAfter != null) return Math.max(250, error.retryAfter * 1000);
  return backoffMs(attempt);
}

/**
 * Run `call` until it succeeds or fails for good; transient failures are retried (the caller
 * reuses its Idempotency-Key, so a retried write is applied once). `onRetry(error, ms)` may
 * tell the user.
 */
export async function withRetries(call, { attempts = 6, onRetry } = {}) {
  for (let attempt = 0; ; attempt += 1) {
    try {
      return await call();
    } catch (error) {
      if (!isTransient(error) || attempt + 1 >= attempts) throw error;
      const ms = retryDelayMs(error, attempt);
      if (onRetry) onRetry(error, ms);
      await sleep(ms);
    }
  }
}

/** A fresh Idempotency-Key (crypto.randomUUID needs a secure context; this does not). */
export function newKey() {
  const bytes = new Uint8Array(16);
  crypto.getRandomValues(bytes);
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

/** The event id of a page at /events/{id} or /events/{id}/checkout, or null. */
export function eventIdFromPath(pathname = location.pathname) {
  const match = /^\/events\/([^/]+)(?:\/checkout)?\/?$/.exec(pathname);
  if (!match) return null;
  try {
    return decodeURIComponent(match[1]);
  } catch {
    return null;
  }
}

export const waitingUrl = (eventId) => `/events/${encodeURIComponent(eventId)}`;
export const checkoutUrl = (eventId) => `/events/${encodeURIComponent(eventId)}/checkout`;
export const eventApi = (eventId) => `/v1/events/${encodeURIComponent(eventId)}`;

// --- session storage (per tab: a pass must not leak into another tab's fan) -------------

/** sessionStorage can be missing or throw (disabled storage, some private modes). */
export const store = {
  get(key) {
    try {
      const raw = sessionStorage.getItem(key);
      return raw == null ? null : JSON.parse(raw);
    } catch {
      return null;
    }
  },
  set(key, value) {
    try {
      sessionStorage.setItem(key, JSON.stringify(value));
    } catch {
      // Without storage the fan still gets through; only a reload loses the state.
    }
  },
  remove(key) {
    try {
      sessionStorage.removeItem(key);
    } catch {
      // nothing stored, nothing to remove
    }
  },
};

export const passKey = (eventId) => `waitroom:pass:${eventId}`;

/** The `exp` claim of a JWT, read without verifying it: for display only. */
export function jwtExpiry(token) {
  try {
    const payload = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    const claims = JSON.parse(atob(payload + "=".repeat((4 - (payload.length % 4)) % 4)));
    return typeof claims.exp === "number" ? claims.exp : null;
  } catch {
    return null;
  }
}

export function savePass(eventId, queuePass, expiresAt) {
  store.set(passKey(eventId), { pass: queuePass, expires_at: expiresAt ?? jwtExpiry(queuePass) });
}

/** The stored pass of `eventId`: {pass, expires_at (unix seconds or null)}, or null. */
export function loadPass(eventId) {
  const value = store.get(passKey(eventId));
  return value && typeof value.pass === "string" && value.pass ? value : null;
}

// --- formats ----------------------------------------------------------------------------

const integer = new Intl.NumberFormat();

export const formatCount = (n) => integer.format(n);

/** An amount in minor units (cents) in its currency, e.g. 2000 EUR → "€20.00". */
export function formatMoney(minor, currency) {
  try {
    const format = new Intl.NumberFormat(undefined, { style: "currency", currency });
    const digits = format.resolvedOptions().maximumFractionDigits;
    return format.format(minor / 10 ** digits);
  } catch {
    return `${(minor / 100).toFixed(2)} ${currency}`;
  }
}

/** A wait in words: "less than a minute", "about 5 minutes", "about 2 h 10 min". */
export function formatWait(seconds) {
  if (seconds == null || !Number.isFinite(seconds)) return "estimating…";
  if (seconds < 60) return "less than a minute";
  const minutes = Math.round(seconds / 60);
  if (minutes < 90) return minutes === 1 ? "about 1 minute" : `about ${minutes} minutes`;
  const hours = Math.floor(minutes / 60);
  return `about ${hours} h ${minutes % 60} min`;
}

/** Minutes in words: "45 min", "1 h", "1 h 30 min". */
function formatMinutes(minutes) {
  if (minutes < 60) return `${minutes} min`;
  const rest = minutes % 60;
  return rest ? `${Math.floor(minutes / 60)} h ${rest} min` : `${Math.floor(minutes / 60)} h`;
}

/**
 * A wait between `low` and `high` seconds in words: "less than a minute", "about 3 minutes",
 * "5–8 minutes", "up to 2 minutes", "1 h 10 min – 1 h 40 min". The longer the wait, the
 * coarser the steps: nobody can use "1 h 7 min", and a coarse text changes less often.
 */
export function formatWaitRange(low, high) {
  if (low == null || high == null || !Number.isFinite(low) || !Number.isFinite(high)) {
    return "estimating…";
  }
  if (high < 60) return "less than a minute";
  const top = high / 60;
  const step = top < 20 ? 1 : top < 60 ? 5 : top < 180 ? 10 : 30;
  const hi = Math.max(1, Math.round(top / step) * step);
  const lo = Math.min(hi, Math.round(low / 60 / step) * step);
  const upper = hi === 1 ? "1 minute" : hi < 90 ? `${hi} minutes` : formatMinutes(hi);
  if (lo < 1) return `up to ${upper}`;
  if (lo === hi) return `about ${upper}`;
  return hi < 90 ? `${lo}–${hi} minutes` : `${formatMinutes(lo)} – ${formatMinutes(hi)}`;
}

/**
 * A steady estimate of the wait, from the server's estimates as they come (its
 * ``eta_seconds``: the fans ahead over the admission rate it observes, which swings when
 * admission speeds up or slows down).
 *
 * - Time passing shortens the wait by itself: between two updates the estimate counts down.
 * - A new server figure moves the estimate only part of the way, the more the longer it has
 *   been since the last one (time constant `tauS`), and in proportion (log scale): a jump from
 *   2 to 12 minutes shows over half a minute or so, not at once, and a blip hardly shows.
 * - The range around it is as wide as the server's figures have been scattered lately
 *   (at least ±`minSpread`, on a log scale), so a shaky estimate says so.
 * - `change` tells when the estimate has moved far (by half, and by a minute or more) from
 *   where it stood when last told: "longer" or "shorter", so the page can say why.
 *
 * Pure: every call takes the time (`nowMs`, milliseconds on any steady clock).
 */
export class WaitEstimate {
  constructor({ tauS = 30, minSpread = 0.2, startSpread = 0.35, maxSpread = 0.7 } = {}) {
    this.tauS = tauS;
    this.minSpread = minSpread;
    this.startSpread = startSpread;
    this.maxSpread = maxSpread;
    this.reset();
  }

  reset() {
    this.center = null; // seconds
    this.spread = this.startSpread;
    this.baseline = null; // the center when a change was last told (counting down too)
    this.at = 0;
  }

  /**
   * Take the server's estimate `seconds` (null when it has none) seen at `nowMs`.
   * Returns {low, high, center, change}, or null while there is no estimate.
   */
  update(seconds, nowMs) {
    if (seconds == null || !Number.isFinite(seconds)) {
      this.reset();
      return null;
    }
    const figure = Math.max(0, seconds);
    if (this.center == null) {
      this.center = this.baseline = figure;
      this.at = nowMs;
      return this.range(null);
    }
    const elapsed = Math.max(0, (nowMs - this.at) / 1000);
    this.at = nowMs;
    const predicted = Math.max(0, this.center - elapsed);
    this.baseline = Math.max(0, this.baseline - elapsed);
    const alpha = 1 - Math.exp(-elapsed / this.tauS);
    // Log scale with a 30 s offset: proportional for long waits, calm for short ones.
    const from = Math.log(predicted + 30);
    const to = Math.log(figure + 30);
    const scatter = Math.min(this.maxSpread, Math.max(this.minSpread, Math.abs(to - from)));
    this.spread += alpha * (scatter - this.spread);
    this.center = Math.max(0, Math.exp(from + alpha * (to - from)) - 30);
    let change = null;
    if (this.center > this.baseline * 1.5 && this.center - this.baseline >= 60) change = "longer";
    if (this.center * 1.5 < this.baseline && this.baseline - this.center >= 60) change = "shorter";
    if (change) this.baseline = this.center;
    return this.range(change);
  }

  range(change) {
    const factor = Math.exp(this.spread);
    return {
      low: this.center / factor,
      high: this.center * factor,
      center: this.center,
      change,
    };
  }
}

/** A countdown as m:ss (or h:mm:ss). */
export function formatClock(totalSeconds) {
  const s = Math.max(0, Math.floor(totalSeconds));
  const hours = Math.floor(s / 3600);
  const minutes = Math.floor((s % 3600) / 60);
  const seconds = String(s % 60).padStart(2, "0");
  return hours > 0 ? `${hours}:${String(minutes).padStart(2, "0")}:${seconds}` : `${minutes}:${seconds}`;
}

export function formatDateTime(iso) {
  const date = new Date(iso);
  if (Number.isNaN(date.getTime())) return "";
  return date.toLocaleString(undefined, { dateStyle: "medium", timeStyle: "short" });
}

// --- DOM helpers ------------------------------------------------------------------------

export const $ = (id) => document.getElementById(id);

/** Set an element's text (never HTML: every string from the server is shown as text). */
export function setText(id, text) {
  const element = $(id);
  if (element) element.textContent = text;
}

export function show(id, visible = true) {
  const element = $(id);
  if (element) element.hidden = !visible;
}

/** An element with text and attributes, for lists built from API data. */
export function el(tag, { text, className, attrs } = {}, children = []) {
  const element = document.createElement(tag);
  if (text != null) element.textContent = text;
  if (className) element.className = className;
  for (const [name, value] of Object.entries(attrs || {})) element.setAttribute(name, value);
  for (const child of children) element.append(child);
  return element;
}

/** Fill the event header: name, venue, start, ticket types with prices and availability. */
export function renderEvent(event) {
  document.title = `${event.name} · waitroom`;
  setText("event-name", event.name);
  const where = [event.venue, event.starts_at ? formatDateTime(event.starts_at) : ""]
    .filter(Boolean)
    .join(" · ");
  setText("event-venue", where);
  const list = $("ticket-types");
  if (!list) return;
  list.replaceChildren(
    ...event.ticket_types.map((t) =>
      el("li", {}, [
        el("span", { text: t.name, className: "tt-name" }),
        el("span", { text: formatMoney(t.price_minor, t.currency), className: "tt-price" }),
        el("span", {
          text:
            t.available > 0
              ? `${formatCount(t.available)} left`
              : (t.held || 0) > 0
                ? "all held: may come back"
                : "sold out",
          className: t.available > 0 ? "tt-left" : "tt-left tt-none",
        }),
      ]),
    ),
  );
  show("ticket-types-block");
}

/**
 * A polite live region for screen readers. `say` is throttled: at most one announcement per
 * `minGapMs` (or the call's `gapMs`), the latest text winning, so a position ticking every
 * second does not chatter; `urgent` messages (admitted, sold out) go out at once.
 */
export function announcer(id, minGapMs) {
  let lastAt = -Infinity;
  let pending = null;
  let timer = null;
  const flush = () => {
    timer = null;
    if (pending == null) return;
    setText(id, pending);
    pending = null;
    lastAt = performance.now();
  };
  return {
    say(text, { urgent = false, gapMs = minGapMs } = {}) {
      pending = text;
      const wait = urgent ? 0 : lastAt + gapMs - performance.now();
      if (wait <= 0) {
        if (timer) clearTimeout(timer);
        flush();
      } else if (!timer) {
        timer = setTimeout(flush, wait);
      }
    },
  };
}

/**
 * A page's message box: the element `id` with `${id}-title`, `${id}-text` and
 * `${id}-actions` inside. `show(kind, title, text, actions)` fills and shows it (`kind`:
 * info, warning, error or success, for the styles); with a `speaker` (an `announcer`) the
 * message is also read out at once. `clear()` hides it.
 */
export function messageBox(id, speaker = null) {
  return {
    show(kind, title, text, actions = []) {
      const box = $(id);
      box.dataset.kind = kind;
      setText(`${id}-title`, title);
      $(`${id}-title`).hidden = !title;
      setText(`${id}-text`, text);
      $(`${id}-actions`).replaceChildren(...actions);
      box.hidden = false;
      if (speaker) speaker.say(title ? `${title}. ${text}` : text, { urgent: true });
    },
    clear() {
      $(id).hidden = true;
    },
  };
}
