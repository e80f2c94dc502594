// The door staff's check-in page: type or paste a ticket (a scanner that types works too),
// POST /v1/checkin, show the verdict in large type. The staff token stays in this tab's
// sessionStorage and goes out as Authorization: Bearer; nothing is loaded from elsewhere.

const KEY = "waitroom.checkin";
const $ = (id) => document.getElementById(id);

function load() {
  try {
    return JSON.parse(sessionStorage.getItem(KEY) || "null");
  } catch {
    return null;
  }
}

function show(session) {
  $("login").hidden = Boolean(session);
  $("scan").hidden = !session;
  $("sign-out").hidden = !session;
  if (session) {
    const parts = [];
    if (session.gate) parts.push(`Gate: ${session.gate}`);
    if (session.event) parts.push(`Event: ${session.event}`);
    $("where").textContent = parts.join(" · ");
    $("ticket").focus();
  }
}

function verdict(ok, title, detail) {
  const box = $("result");
  box.hidden = false;
  box.dataset.verdict = ok ? "ok" : "refused";
  $("result-title").textContent = title;
  $("result-detail").textContent = detail;
}

function when(iso) {
  const at = new Date(iso);
  return Number.isNaN(at.getTime()) ? iso : at.toLocaleString();
}

function refusal(status, error) {
  const d = error.details || {};
  switch (error.code) {
    case "ticket_already_used":
      return ["ALREADY USED", `First checked in ${when(d.used_at)}` +
        (d.gate ? ` at ${d.gate}` : "") + (d.checked_in_by ? ` by ${d.checked_in_by}` : "")];
    case "ticket_voided":
      return ["VOIDED", `Voided ${when(d.voided_at)}` + (d.reason ? `: ${d.reason}` : "")];
    case "ticket_wrong_event":
      return ["WRONG EVENT", `This ticket is for ${d.ticket_event_id}`];
    case "ticket_not_found":
      return ["UNKNOWN TICKET", "No ticket has this code"];
    case "ticket_invalid":
      return ["INVALID TICKET", error.message];
    default:
      if (status === 401) return ["NOT SIGNED IN", error.message];
      return [`REFUSED (${status})`, error.message || ""];
  }
}

async function checkIn(session, ticket) {
  const body = { ticket };
  if (session.gate) body.gate = session.gate;
  if (session.event) body.event_id = session.event;
  let response;
  try {
    response = await fetch("/v1/checkin", {
      method: "POST",
      headers: { "Content-Type": "application/json", Authorization: `Bearer ${session.token}` },
      body: JSON.stringify(body),
    });
  } catch {
    verdict(false, "NO CONNECTION", "The server did not answer; try again");
    return;
  }
  let data = {};
  try {
    data = await response.json();
  } catch {
    data = {};
  }
  if (response.ok) {
    verdict(true, "VALID: WELCOME", `${data.ticket_type} · ${data.event_id} · ${data.code}`);
    return;
  }
  const [title, detail] = refusal(response.status, data.error || {});
  verdict(false, title, detail);
  if (response.status === 401) {
    sessionStorage.removeItem(KEY);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  show(load());
  $("login-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const token = $("token").value.trim();
    if (!token) return;
    const session = { token, gate: $("gate").value.trim(), event: $("event").value.trim() };
    sessionStorage.setItem(KEY, JSON.stringify(session));
    $("token").value = "";
    show(session);
  });
  $("scan-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    const session = load();
    const ticket = $("ticket").value.trim();
    if (!session || !ticket) return;
    $("check").disabled = true;
    try {
      await checkIn(session, ticket);
    } finally {
      $("check").disabled = false;
      $("ticket").value = "";
      $("ticket").focus();
    }
  });
  $("sign-out").addEventListener("click", () => {
    sessionStorage.removeItem(KEY);
    $("result").hidden = true;
    show(null);
  });
});
