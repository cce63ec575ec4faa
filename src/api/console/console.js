// The admin console (SPEC §17). It speaks only the §9 API of its own
// origin; the token lives in this tab's sessionStorage, never in a URL
// or a cookie, and every value from the server is put in the page as
// text (textContent), never as markup.
"use strict";

const TOKEN_KEY = "scaiwave.admin_token";
// limits::CONSOLE_PEERS_REFRESH_MS (a unit test keeps them equal).
const PEERS_REFRESH_MS = 2000;
const AUDIT_PAGE = 50;
const AUDIT_FETCH = 1000;
const PAGES = ["identity", "peers", "policy", "audit", "rooms"];

const $ = (id) => document.getElementById(id);
let peersTimer = null;
let auditRows = [];
let auditOffset = 0;

function token() {
  return sessionStorage.getItem(TOKEN_KEY);
}

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

// One call to the admin or client API; the §10 error body becomes an ApiError.
async function api(method, path, body) {
  const headers = { Authorization: "Bearer " + token() };
  const init = { method, headers, cache: "no-store", credentials: "omit" };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let resp;
  try {
    resp = await fetch(path, init);
  } catch (e) {
    throw new ApiError(0, "NETWORK", "the server did not answer: " + e.message);
  }
  const text = await resp.text();
  let json = null;
  try { json = text ? JSON.parse(text) : null; } catch (_) { json = null; }
  if (!resp.ok) {
    const err = (json && json.error) || {};
    throw new ApiError(resp.status, err.code || "HTTP_" + resp.status, err.message || text || resp.statusText);
  }
  return json;
}

function el(tag, props, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props || {})) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("data-") || k.startsWith("aria-") || ["for", "scope", "role"].includes(k)) node.setAttribute(k, v);
    else node[k] = v;
  }
  for (const c of children) node.append(c);
  return node;
}

function show(statusId, message, bad) {
  const s = $(statusId);
  s.textContent = message || "";
  s.classList.toggle("bad", !!bad);
}

function errorText(e) {
  return e instanceof ApiError ? `${e.code}: ${e.message}` : String(e);
}

// A modal confirmation; resolves true only on the named action.
function confirmAction(title, text, action) {
  const dialog = $("confirm");
  $("confirm-title").textContent = title;
  $("confirm-text").textContent = text;
  $("confirm-ok").textContent = action;
  return new Promise((resolve) => {
    const done = (ok) => {
      $("confirm-ok").onclick = null;
      $("confirm-cancel").onclick = null;
      dialog.onclose = null;
      if (dialog.open) dialog.close();
      resolve(ok);
    };
    $("confirm-ok").onclick = () => done(true);
    $("confirm-cancel").onclick = () => done(false);
    dialog.onclose = () => done(false);
    dialog.showModal();
    $("confirm-cancel").focus();
  });
}

// ---- sign in --------------------------------------------------------------

async function signIn(event) {
  event.preventDefault();
  const value = $("token").value.trim();
  $("signin-error").textContent = "";
  if (!value) {
    $("signin-error").textContent = "Paste an admin token first.";
    return;
  }
  sessionStorage.setItem(TOKEN_KEY, value);
  try {
    const id = await api("GET", "/v1/admin/federation/identity");
    $("token").value = "";
    enter(id);
  } catch (e) {
    sessionStorage.removeItem(TOKEN_KEY);
    $("signin-error").textContent = e.status === 401 || e.status === 403
      ? `That token was refused (${e.code}): ${e.message}`
      : errorText(e);
    $("token").setAttribute("aria-invalid", "true");
    $("token").focus();
  }
}

function signOut() {
  sessionStorage.removeItem(TOKEN_KEY);
  stopPeers();
  $("nav").hidden = true;
  $("tenant").textContent = "";
  for (const p of PAGES) $("page-" + p).hidden = true;
  $("signin").hidden = false;
  location.hash = "";
  $("token").focus();
}

function enter(identity) {
  $("signin").hidden = true;
  $("nav").hidden = false;
  $("token").removeAttribute("aria-invalid");
  $("tenant").textContent = identity.server_name;
  document.title = identity.server_name + " · ScaiWave federation";
  route();
}

// ---- pages ----------------------------------------------------------------

function route() {
  if (!token()) return;
  const page = PAGES.includes(location.hash.slice(1)) ? location.hash.slice(1) : "peers";
  for (const p of PAGES) $("page-" + p).hidden = p !== page;
  for (const a of document.querySelectorAll("nav a")) {
    if (a.dataset.page === page) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  stopPeers();
  ({ identity: loadIdentity, peers: startPeers, policy: loadPolicy, audit: loadAudit, rooms: loadRooms })[page]();
}

async function guarded(statusId, work) {
  try {
    await work();
  } catch (e) {
    if (e.status === 401) { signOut(); $("signin-error").textContent = "Signed out: " + e.message; return; }
    show(statusId, errorText(e), true);
  }
}

// Identity: the key, its rotation, old keys.
function loadIdentity() {
  return guarded("identity-status", async () => {
    const id = await api("GET", "/v1/admin/federation/identity");
    const dl = $("identity");
    dl.replaceChildren();
    for (const [label, key] of [["Server name", "server_name"], ["Key id", "key_id"], ["Public key", "public_key"],
      ["Created", "created_at"], ["Rotates", "rotates_at"], ["Protocol versions", "protocol_versions"]]) {
      const v = id[key];
      dl.append(el("dt", { text: label }), el("dd", { text: Array.isArray(v) ? v.join(", ") : (v ?? "—") }));
    }
    const tbody = $("old-keys");
    tbody.replaceChildren();
    for (const k of id.old_keys || []) {
      tbody.append(el("tr", {}, el("td", { class: "mono", text: k.key_id }), el("td", { class: "mono", text: k.public_key }),
        el("td", { text: k.expired_at ?? k.expires_at ?? "—" })));
    }
    if (!(id.old_keys || []).length) tbody.append(el("tr", {}, el("td", { colSpan: 3, text: "None yet." })));
  });
}

async function rotate() {
  const ok = await confirmAction("Rotate the signing key?",
    "A new key signs from now on. Peers fetch it from the descriptor; the old key stays valid for the overlap period.",
    "Rotate key");
  if (!ok) return;
  await guarded("identity-status", async () => {
    const r = await api("POST", "/v1/admin/federation/key/rotate", {});
    await loadIdentity();
    show("identity-status", "Rotated: the new key is " + r.key_id + ".");
  });
}

// Peers: the §9 table, refreshed while the page is shown.
function startPeers() {
  $("refresh-secs").textContent = String(PEERS_REFRESH_MS / 1000);
  loadPeers();
  peersTimer = setInterval(loadPeers, PEERS_REFRESH_MS);
}

function stopPeers() {
  if (peersTimer) clearInterval(peersTimer);
  peersTimer = null;
}

function cell(label, text, cls) {
  return el("td", { "data-label": label, text: text ?? "—", class: cls || "" });
}

// A refresh updates rows in place: replacing them would drop a click that
// lands mid-refresh and move keyboard focus off the row's button.
function peerRow(p) {
  const remove = el("button", { type: "button", class: "secondary", text: "Remove", "data-peer": p.server_name,
    "aria-label": "Remove " + p.server_name });
  remove.addEventListener("click", () => removePeer(p.server_name));
  return el("tr", { "data-peer-row": p.server_name },
    cell("Server", p.server_name, "mono"), el("td", { "data-label": "Status" }, el("span")), cell("Last seen"),
    cell("Last error"), cell("Queue", "", "num"), cell("Next retry"), cell("Sent 24 h", "", "num"),
    cell("Received 24 h", "", "num"), el("td", { "data-label": "" }, remove));
}

function fillPeerRow(row, p) {
  const [, status, seen, err, queue, retry, sent, received] = row.children;
  const badge = status.firstChild;
  badge.className = "badge " + p.status;
  badge.textContent = p.status;
  seen.textContent = p.last_seen ?? "—";
  err.textContent = p.last_error ? `${p.last_error.code}: ${p.last_error.message} (${p.last_error.at})` : "—";
  queue.textContent = String(p.queue_depth);
  retry.textContent = p.next_retry_at ?? "—";
  sent.textContent = String(p.events_sent_24h);
  received.textContent = String(p.events_received_24h);
}

function loadPeers() {
  return guarded("peers-status", async () => {
    const { peers } = await api("GET", "/v1/admin/federation/peers");
    const tbody = $("peers");
    const existing = new Map([...tbody.querySelectorAll("tr[data-peer-row]")].map((r) => [r.dataset.peerRow, r]));
    const rows = peers.map((p) => {
      const row = existing.get(p.server_name) || peerRow(p);
      fillPeerRow(row, p);
      return row;
    });
    const same = rows.length === tbody.children.length && rows.every((r, i) => tbody.children[i] === r);
    if (!same) {
      tbody.replaceChildren(...rows);
      if (!peers.length) tbody.append(el("tr", {}, el("td", { colSpan: 9, text: "No peers yet." })));
    }
    show("peers-status", "");
  });
}

async function removePeer(name) {
  const ok = await confirmAction("Remove " + name + "?",
    `This severs every room shared with ${name}: its participants leave the rooms this server hosts, ` +
    `this server's participants leave the rooms ${name} hosts, its queue is dropped and it is added to denied_peers.`,
    "Remove and sever");
  if (!ok) return;
  await guarded("peers-status", async () => {
    const r = await api("DELETE", "/v1/admin/federation/peers/" + encodeURIComponent(name));
    await loadPeers();
    show("peers-status", `Removed ${name}: ${r.kicked} of its participants removed from rooms hosted here, ` +
      `left ${r.left} room(s) it hosts, ${r.dropped} queued item(s) dropped; it is now in denied_peers.`);
  });
}

// Policy: the §7 form. A refused value is shown at its field; nothing changed.
const POLICY_FIELDS = ["default_mode", "allowed_peers", "denied_peers", "max_foreign_participants_per_room",
  "max_backfill_events_per_request", "min_signature_protocol"];
const LIST_FIELDS = ["allowed_peers", "denied_peers"];
const NUMBER_FIELDS = ["max_foreign_participants_per_room", "max_backfill_events_per_request"];
let policyShown = null;

function clearFieldErrors() {
  for (const f of POLICY_FIELDS) {
    $("e-" + f).textContent = "";
    $("p-" + f).removeAttribute("aria-invalid");
  }
}

function fillPolicy(policy) {
  policyShown = policy;
  for (const f of POLICY_FIELDS) {
    const v = policy[f];
    $("p-" + f).value = Array.isArray(v) ? v.join("\n") : String(v);
  }
}

function loadPolicy() {
  clearFieldErrors();
  show("policy-status", "");
  return guarded("policy-status", async () => fillPolicy(await api("GET", "/v1/admin/federation/policy")));
}

function policyPatch() {
  const patch = {};
  for (const f of POLICY_FIELDS) {
    const raw = $("p-" + f).value;
    let v = raw;
    if (LIST_FIELDS.includes(f)) v = raw.split("\n").map((s) => s.trim()).filter((s) => s);
    else if (NUMBER_FIELDS.includes(f)) v = /^-?\d+$/.test(raw.trim()) ? Number(raw.trim()) : raw;
    if (JSON.stringify(v) !== JSON.stringify(policyShown[f])) patch[f] = v;
  }
  return patch;
}

async function savePolicy(event) {
  event.preventDefault();
  clearFieldErrors();
  show("policy-status", "");
  const patch = policyPatch();
  if (!Object.keys(patch).length) { show("policy-status", "Nothing changed."); return; }
  try {
    fillPolicy(await api("PUT", "/v1/admin/federation/policy", patch));
    show("policy-status", "Saved: " + Object.keys(patch).join(", ") + ".");
  } catch (e) {
    // §7: a 400 names the field ("policy field `x`: …"); the policy is unchanged.
    const m = /field `([a-z_]+)`/.exec(e.message || "");
    if (e.status === 400 && m && POLICY_FIELDS.includes(m[1])) {
      $("e-" + m[1]).textContent = e.message;
      $("p-" + m[1]).setAttribute("aria-invalid", "true");
      $("p-" + m[1]).focus();
      show("policy-status", "Not saved: the policy is unchanged.", true);
    } else if (e.status === 401) {
      signOut();
    } else {
      show("policy-status", "Not saved: " + errorText(e), true);
    }
  }
}

// Audit: newest first, filtered by action and peer, paged here.
function loadAudit(event) {
  if (event) event.preventDefault();
  return guarded("audit-status", async () => {
    const q = new URLSearchParams({ limit: String(AUDIT_FETCH) });
    const action = $("audit-action").value.trim();
    const peer = $("audit-peer").value.trim();
    if (action) q.set("action", action);
    if (peer) q.set("peer", peer);
    auditRows = (await api("GET", "/v1/admin/audit?" + q)).rows;
    auditOffset = 0;
    renderAudit();
  });
}

function renderAudit() {
  const tbody = $("audit");
  tbody.replaceChildren();
  for (const r of auditRows.slice(auditOffset, auditOffset + AUDIT_PAGE)) {
    const detail = r.detail == null ? "—" : (typeof r.detail === "string" ? r.detail : JSON.stringify(r.detail));
    tbody.append(el("tr", {}, el("td", { text: r.at }), el("td", { class: "mono", text: r.action }),
      el("td", { class: "mono", text: r.peer ?? "—" }), el("td", { class: "mono", text: r.code ?? "—" }),
      el("td", { class: "mono", text: r.room_id ?? r.event_id ?? "—" }),
      el("td", { text: (r.unverified ? "(unverified) " : "") + detail })));
  }
  if (!auditRows.length) tbody.append(el("tr", {}, el("td", { colSpan: 6, text: "No matching rows." })));
  const last = Math.min(auditOffset + AUDIT_PAGE, auditRows.length);
  $("audit-page").textContent = auditRows.length ? `${auditOffset + 1}–${last} of ${auditRows.length}` : "";
  $("audit-newer").disabled = auditOffset === 0;
  $("audit-older").disabled = last >= auditRows.length;
}

function pageAudit(delta) {
  auditOffset = Math.max(0, auditOffset + delta * AUDIT_PAGE);
  renderAudit();
}

// Room types that never federate (SPEC §6): shown with the reason, no controls.
const NEVER_FEDERATE = ["incognito", "bridge", "sidekick"];

// Rooms: the federate flag and foreign invitations (admin routes of §9).
function roomItem(room) {
  const id = room.room_id;
  const head = [
    el("p", { class: "title" }, el("span", { text: room.name || id })),
    el("p", { class: "mono hint", text: id + (room.room_type ? " · " + room.room_type : "") }),
  ];
  if (NEVER_FEDERATE.includes(room.room_type)) {
    return el("li", { "data-room": id }, ...head,
      el("p", { class: "why", text: `${room.room_type} rooms never federate: their traffic stays on this server (SW_FED_ROOM_TYPE_FORBIDDEN).` }));
  }
  const slug = id.replace(/[^A-Za-z0-9]/g, "_");
  const flag = el("input", { type: "checkbox", id: "fed-" + slug, checked: !!room.federated });
  const status = el("p", { class: "status", role: "status", id: "st-" + slug });
  const say = (text, bad) => { status.textContent = text; status.classList.toggle("bad", !!bad); };
  flag.addEventListener("change", async () => {
    try {
      await api("PUT", `/v1/admin/rooms/${encodeURIComponent(id)}/federate`, { enabled: flag.checked });
      say(flag.checked ? "Federated: foreign servers can join." : "No longer federated.");
      badge.hidden = !flag.checked;
    } catch (e) {
      flag.checked = !flag.checked;
      say(errorText(e), true);
    }
  });
  const badge = el("span", { text: " 🌐", title: "federated", "aria-label": "federated" });
  badge.hidden = !room.federated;
  const fqid = el("input", { id: "inv-" + slug, placeholder: "@bob:b.example.org", spellcheck: false });
  const invite = el("form", { class: "inline", noValidate: true },
    el("div", { class: "field" }, el("label", { for: "inv-" + slug, text: "Invite a foreign FQID" }), fqid),
    el("button", { type: "submit", text: "Invite" }));
  invite.addEventListener("submit", async (event) => {
    event.preventDefault();
    try {
      const r = await api("POST", `/v1/admin/rooms/${encodeURIComponent(id)}/federation/invite`, { fqid: fqid.value.trim() });
      say(`Invited ${fqid.value.trim()} (invitation ${r.invite_id}).`);
      fqid.value = "";
    } catch (e) {
      say(errorText(e), true);
    }
  });
  head[0].append(badge);
  return el("li", { "data-room": id }, ...head,
    el("label", { class: "check", for: "fed-" + slug }, flag, el("span", { text: "Federated" })),
    invite, status);
}

function loadRooms() {
  return guarded("rooms-status", async () => {
    const { rooms } = await api("GET", "/v1/rooms");
    const list = $("rooms");
    list.replaceChildren(...rooms.map(roomItem));
    if (!rooms.length) list.append(el("li", { text: "This admin belongs to no rooms; name one below." }));
  });
}

function showRoom(event) {
  event.preventDefault();
  const id = $("room-id").value.trim();
  if (!id) return;
  const list = $("rooms");
  if (!list.querySelector(`[data-room="${CSS.escape(id)}"]`)) list.prepend(roomItem({ room_id: id, name: id }));
  show("rooms-status", "");
}

// ---- wiring ---------------------------------------------------------------

document.addEventListener("DOMContentLoaded", async () => {
  $("signin-form").addEventListener("submit", signIn);
  $("signout").addEventListener("click", signOut);
  $("rotate").addEventListener("click", rotate);
  $("policy-form").addEventListener("submit", savePolicy);
  $("audit-form").addEventListener("submit", loadAudit);
  $("audit-newer").addEventListener("click", () => pageAudit(-1));
  $("audit-older").addEventListener("click", () => pageAudit(1));
  $("room-form").addEventListener("submit", showRoom);
  window.addEventListener("hashchange", () => { route(); $("main").focus(); });
  if (!token()) { $("token").focus(); return; }
  try {
    enter(await api("GET", "/v1/admin/federation/identity"));
  } catch (_) {
    signOut();
  }
});
