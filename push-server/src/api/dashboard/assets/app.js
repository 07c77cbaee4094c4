// lpush ops dashboard: vanilla JS, no build step, no external resources.
// Everything from the server is inserted with textContent (never innerHTML).
"use strict";

const $ = (sel) => document.querySelector(sel);
let me = null;
let overview = null;
let source = null;

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v; else if (k.startsWith("data-")) e.setAttribute(k, v); else e[k] = v;
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(c == null ? "" : String(c)));
  return e;
}

function ago(ms) {
  if (!ms) return "–";
  const s = Math.max(0, Math.round((Date.now() - ms) / 1000));
  if (s < 60) return s + " s";
  if (s < 3600) return Math.floor(s / 60) + " min";
  if (s < 86400) return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min";
  return Math.floor(s / 86400) + " d";
}
const time = (ms) => (ms ? new Date(ms).toLocaleString() : "–");
const dur = (a, b) => (a && b ? ((b - a) / 1000).toFixed(1) + " s" : "–");
// Wall-clock time of a Unix ms: the time alone today, with the date otherwise.
function clock(ms) {
  if (!ms) return "–";
  const d = new Date(ms);
  const t = d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" });
  return d.toDateString() === new Date().toDateString() ? t : d.toLocaleDateString() + " " + t;
}
// A length of time in ms, for people.
function span(ms) {
  if (ms == null) return "–";
  const s = Math.max(0, ms) / 1000;
  return s < 60 ? s.toFixed(1) + " s" : Math.floor(s / 60) + " min " + Math.round(s % 60) + " s";
}

async function api(path, opts) {
  const r = await fetch(path, Object.assign({ credentials: "same-origin" }, opts || {}));
  if (r.status === 401) { showLogin(); throw new Error("unauthorized"); }
  if (!r.ok) throw new Error((await r.json().catch(() => ({}))).error || r.statusText);
  return r.status === 204 ? null : r.json();
}

function showLogin() {
  $("#app").hidden = true; $("#who").hidden = true; $("#login").hidden = false; $("#keys-box").hidden = true;
  if (source) { source.close(); source = null; }
}

async function start() {
  try { me = await api("/api/me"); } catch (e) { return; }
  $("#login").hidden = true; $("#app").hidden = false; $("#who").hidden = false;
  $("#node").textContent = me.node; $("#user").textContent = me.name; $("#role").textContent = me.role;
  connect();
  route();
  // The device list paints as soon as its page arrives, without waiting for the rest.
  await Promise.all([loadDevices(), refresh()]);
}

// Cluster mode: Redis as this node sees it, and every node with its heartbeat.
function renderCluster() {
  const c = overview.cluster;
  if (!c) { $("#cluster").textContent = ""; return; }
  const redis = c.redis_up ? "Redis up" : `Redis DOWN (${c.redis_error})`;
  const nodes = c.nodes.map(([n, alive]) => `${n} ${alive ? "✓" : "✗"}`).join(", ");
  $("#cluster").textContent = `· ${redis} · nodes: ${nodes}`;
  $("#cluster").className = c.redis_up ? "" : "bad";
}

// Everything but the device rows: counters, sites, diagnoses, charts, calls, enrollments, keys.
async function refresh() {
  overview = await api("/api/overview");
  renderCluster();
  renderStats(overview.counts); renderDiagnoses(); renderSites(); renderCharts();
  await renderCalls();
  await renderEnrollments();
  if (me && me.role === "admin") await renderKeys();
}

async function renderEnrollments() {
  const r = await api("/api/enrollments");
  $("#enrollments tbody").replaceChildren(...r.enrollments.slice(0, 50).map((x) => el("tr", {},
    el("td", {}, time(x.at_ms)), el("td", {}, x.device_id), el("td", {}, x.kind),
    el("td", {}, x.key_name + " (" + x.key_id + ")"), el("td", {}, (x.source || "–") + " · " + x.via),
    el("td", {}, x.groups.join(", ") || "–"), el("td", {}, time(x.expires_at_ms)))));
}

// Admins only: keys by id (never the key), with a revoke button for active ones.
async function renderKeys() {
  $("#keys-box").hidden = false;
  const r = await api("/api/keys");
  $("#keys tbody").replaceChildren(...r.keys.map((k) => {
    const button = el("button", { type: "button", class: "danger" }, "Revoke");
    button.addEventListener("click", () => revokeKey(k));
    return el("tr", { class: k.state, "data-key": k.id },
      el("td", {}, k.id), el("td", {}, k.name), el("td", { class: "state " + k.state }, k.state),
      el("td", {}, k.scopes.join(", ")), el("td", {}, k.enroll_groups.join(", ") || "–"),
      el("td", {}, time(k.created_at_ms)), el("td", {}, k.expires_at_ms ? time(k.expires_at_ms) : "never"),
      el("td", {}, k.state === "active" ? button : ""));
  }));
}

async function revokeKey(k) {
  if (!confirm("Revoke API key " + k.name + " (" + k.id + ")? Everything using it stops at once.")) return;
  try {
    await api("/api/keys/" + encodeURIComponent(k.id) + "/revoke", { method: "POST", headers: { "x-lpush-csrf": "1" } });
    $("#keys-result").textContent = "revoked " + k.name;
  } catch (e) { $("#keys-result").textContent = "failed: " + e.message; }
  renderKeys().catch(() => {});
}

// Work that live events ask for, at most once per `ms` (the first at once, later ones
// coalesced into one at the end of the interval): a burst of events costs a few requests.
function throttled(ms, work) {
  let last = 0, timer = null;
  return () => {
    if (timer) return;
    timer = setTimeout(() => { timer = null; last = Date.now(); work().catch(() => {}); }, Math.max(0, last + ms - Date.now()));
  };
}
const reloadSoon = throttled(1000, () => loadDevices());
const refreshSoon = throttled(2000, () => refresh());
const detailSoon = throttled(1000, () => (currentDetail() ? loadDetail(currentDetail()) : Promise.resolve()));

// The server batches what changed (device ids, or "many") every quarter second.
function connect() {
  if (source) source.close();
  source = new EventSource("/api/events");
  source.addEventListener("hello", () => $("#live").classList.add("on"));
  source.addEventListener("changed", (e) => {
    const c = JSON.parse(e.data);
    const hit = (id) => c.many || c.ids.includes(id);
    if (c.overview) refreshSoon();
    if (currentDetail() && hit(currentDetail())) detailSoon();
    // Only a change to a row on screen, or one that may move rows into or within the page.
    if (c.many || c.ids.some((id) => shown.has(id)) || orderMayChange()) reloadSoon();
  });
  // Our key was revoked or expired: the session is gone.
  source.addEventListener("logout", () => showLogin());
  source.onerror = () => $("#live").classList.remove("on");
}

function renderStats(counts) {
  $("#stat-online").textContent = counts.online;
  $("#stat-total").textContent = counts.total;
  $("#stat-queued").textContent = counts.queued;
  $("#stat-flagged").textContent = counts.flagged;
  $("#stat-problems").textContent = counts.problems;
}

function renderDiagnoses() {
  const box = $("#diagnoses");
  box.replaceChildren(...overview.diagnoses.slice(0, 5).map((d) =>
    el("div", { class: "diag " + d.kind },
      el("b", {}, d.kind.replace("_", " ")), " · ",
      d.device_id ? d.device_id + " · " : "", d.ssid ? "SSID " + d.ssid + " · " : "",
      time(d.at_ms), ": ", d.detail)));
}

function renderSites() {
  $("#sites tbody").replaceChildren(...overview.sites.map((s) =>
    el("tr", { class: s.drop_flagged ? "flagged" : "" },
      el("td", {}, s.ssid), el("td", {}, s.online + " / " + s.expected),
      el("td", {}, s.reconnects_per_device.toFixed(2)), el("td", {}, s.heartbeat_misses),
      el("td", {}, s.duplicate_instances), el("td", {}, s.left_wifi),
      el("td", { class: "ios-stops" }, Object.entries(s.provider_stops).map(([k, n]) => k + " " + n).join(", ") || "–"),
      el("td", {}, s.drop_flagged ? el("span", { class: "flag" }, "site-wide drop") : "ok"))));
  const sel = $("#filter-ssid"), cur = sel.value;
  const ssids = overview.sites.map((s) => s.ssid);
  if (cur && !ssids.includes(cur)) ssids.push(cur);
  sel.replaceChildren(el("option", { value: "" }, "every SSID"), ...ssids.map((s) => el("option", { value: s }, s)));
  sel.value = cur;
}

function stateOf(d) { return d.revoked ? "revoked" : d.online ? "online" : "offline"; }

// The device table: one page from the server, which filters, searches and sorts every device.
const view = { q: "", state: "", ssid: "", sort: "device", desc: false, offset: 0, limit: 50 };
let page = null; // the last /api/devices answer
let shown = new Set(); // ids of the rows on screen
let pageRequest = null; // the AbortController of the page request in flight
const orderMayChange = () => view.sort !== "device" || view.state !== "" || view.ssid !== "" || view.q !== "";

async function loadDevices() {
  if (pageRequest) pageRequest.abort(); // a newer question replaces the one in flight
  const ctl = (pageRequest = new AbortController());
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(view)) if (v !== "" && v !== false) q.set(k, v);
  let r;
  try { r = await api("/api/devices?" + q, { signal: ctl.signal }); } catch (e) {
    if (e.name !== "AbortError") $("#page-info").textContent = "failed: " + e.message;
    return;
  } finally { if (pageRequest === ctl) pageRequest = null; }
  page = r;
  renderDevices();
  renderStats(r.counts);
}

const problemNames = { offline_expected: "offline while expected" };
// The last stop reason, with why iOS stopped the provider when it said, and whether the phone
// left the Wi-Fi (not a fault) rather than going silent on it.
function stopReason(d) {
  return (d.last_stop_reason || "–") + (d.last_provider_stop_reason ? " · iOS: " + d.last_provider_stop_reason : "") +
    (d.left_wifi ? " · left the Wi-Fi" : "");
}
function renderDevices() {
  shown = new Set(page.rows.map((d) => d.device_id));
  $("#devices tbody").replaceChildren(...(page.rows.length ? page.rows.map((d) => {
    const s = stateOf(d);
    const call = d.last_call_path ? d.last_call_path + " (" + d.last_call_state + ")" : "–";
    const marks = d.flags.map((f) => el("span", { class: "flag" }, f.replace("_", " ")));
    if (problemNames[d.problem]) marks.push(el("span", { class: "flag mild" }, problemNames[d.problem]));
    return el("tr", { class: s + (d.problem ? " flagged" : ""), "data-device": d.device_id, "data-state": s, "data-problem": d.problem },
      el("td", {}, el("a", { href: "#device/" + encodeURIComponent(d.device_id) }, d.device_id)),
      el("td", { class: "state " + s }, s),
      el("td", {}, d.ssid || "–"), el("td", {}, d.node),
      el("td", {}, d.online ? ago(d.session_started_ms) : "–"),
      el("td", {}, d.online ? ago(d.last_heard_ms) + " ago" : "last seen " + ago(d.last_seen_ms) + " ago"),
      el("td", {}, d.sdk_version || "–"),
      el("td", { class: "reason" }, stopReason(d)),
      el("td", {}, call), el("td", {}, d.queued), el("td", {}, ...marks));
  }) : [none(11, "no device matches")]));
  const last = page.offset + page.rows.length;
  $("#page-info").textContent = (page.rows.length ? (page.offset + 1) + "–" + last : "0") + " of " + page.matched +
    (page.matched === page.counts.total ? " devices" : " matching (" + page.counts.total + " devices)");
  $("#page-prev").disabled = page.offset === 0;
  $("#page-next").disabled = last >= page.matched;
  for (const th of document.querySelectorAll("#devices th[data-sort]")) {
    th.classList.toggle("sorted", th.dataset.sort === view.sort);
    th.classList.toggle("desc", th.dataset.sort === view.sort && view.desc);
  }
  if (!performance.getEntriesByName("lpush:devices-painted").length) performance.mark("lpush:devices-painted");
}

// A new question about the list starts at its first page.
function ask(change) { Object.assign(view, change, { offset: 0 }); loadDevices(); }

// Inline SVG charts, drawn here (no chart library).
function svgEl(tag, attrs, text) {
  const e = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (text != null) e.textContent = text;
  return e;
}

function renderCharts() {
  const W = 400, H = 120, L = 30, B = 18;
  // Connected devices over time: a step line.
  const svg = $("#chart-online");
  const pts = overview.series.concat([[Date.now(), overview.counts.online]]);
  const t0 = pts[0][0], t1 = Math.max(pts[pts.length - 1][0], t0 + 1);
  const max = Math.max(1, ...pts.map((p) => p[1]));
  const x = (t) => L + ((t - t0) / (t1 - t0)) * (W - L - 5), y = (v) => H - B - (v / max) * (H - B - 10);
  let d = "";
  pts.forEach((p, i) => { d += (i ? " H" + x(p[0]).toFixed(1) + " V" : "M" + x(p[0]).toFixed(1) + " ") + y(p[1]).toFixed(1); });
  svg.replaceChildren(
    svgEl("line", { x1: L, y1: H - B, x2: W, y2: H - B, stroke: "#ccd" }),
    svgEl("text", { x: 2, y: y(max) + 4 }, max), svgEl("text", { x: 2, y: H - B }, 0),
    svgEl("text", { x: L, y: H - 4 }, new Date(t0).toLocaleTimeString()),
    svgEl("text", { x: W - 60, y: H - 4 }, "now"),
    svgEl("path", { d, fill: "none", stroke: "#2f6fde", "stroke-width": 2 }));
  // Delivery latency: histogram of recent deliveries, local vs APNs.
  const lat = $("#chart-latency");
  const edges = [5, 10, 25, 50, 100, 250, 500, 1000, 5000, Infinity];
  const names = ["<5", "<10", "<25", "<50", "<100", "<250", "<500", "<1k", "<5k", "5k+"];
  const count = (path) => edges.map((e, i) => overview.latencies.filter((l) => l[2] === path && l[3] < e && (i === 0 || l[3] >= edges[i - 1])).length);
  const local = count("local"), apns = count("apns");
  const top = Math.max(1, ...local.map((v, i) => v + apns[i]));
  const bw = (W - L) / edges.length;
  const bars = [];
  edges.forEach((_, i) => {
    const hl = (local[i] / top) * (H - B - 10), ha = (apns[i] / top) * (H - B - 10);
    bars.push(svgEl("rect", { x: L + i * bw + 2, y: H - B - hl, width: bw - 4, height: hl, fill: "#2f6fde" }));
    bars.push(svgEl("rect", { x: L + i * bw + 2, y: H - B - hl - ha, width: bw - 4, height: ha, fill: "#d98b00" }));
    bars.push(svgEl("text", { x: L + i * bw + 4, y: H - 4 }, names[i]));
  });
  lat.replaceChildren(svgEl("text", { x: 2, y: 14 }, top), ...bars,
    svgEl("text", { x: W - 110, y: 12 }, "■ local"), svgEl("text", { x: W - 60, y: 12, fill: "#d98b00" }, "■ apns"));
}

// Calls (hash routes #calls and #call/ID): live and recent, from what the server remembers.
const currentCall = () => (location.hash.startsWith("#call/") ? decodeURIComponent(location.hash.slice(6)) : null);
const callLink = (id) => el("a", { href: "#call/" + encodeURIComponent(id) }, id);
const caller = (c) => (c.caller_name || "–") + (c.caller_handle ? " (" + c.caller_handle + ")" : "");

// A callee's state (ringing, answered, declined, missed, cancelled, ...) and the path that rang it.
function chip(status, path, label, title) {
  return el("span", { class: "chip " + status, "data-status": status, title: title || "" },
    (label ? label + " " : "") + status + (path ? " · " + path : ""));
}
const callee = (c) => { const e = chip(c.status, c.path, c.device_id, c.reason || c.state); e.dataset.device = c.device_id; return e; };

function stepsCell(c) {
  return el("div", { class: "steps" }, ...c.steps.map((s) => el("div", {},
    "step " + s.index + ": " + s.device_ids.join(", ") + " · " +
    (s.started_at_ms ? "rang " + clock(s.started_at_ms) : "due " + clock(s.due_at_ms)) +
    (s.stop_earlier ? " · stops earlier" : ""))));
}

const none = (cols, text) => el("tr", {}, el("td", { colSpan: cols, class: "note" }, text));

async function renderCalls() {
  const r = await api("/api/calls");
  $("#calls-live-count").textContent = r.live.length ? r.live.length + " live" : "";
  $("#calls-live tbody").replaceChildren(...(r.live.length ? r.live.map((c) =>
    el("tr", { "data-call": c.call_id, "data-state": c.state },
      el("td", {}, clock(c.placed_at_ms)), el("td", {}, callLink(c.call_id)), el("td", {}, caller(c)),
      el("td", {}, span(r.now_ms - c.placed_at_ms)), el("td", {}, clock(c.deadline_ms)),
      el("td", {}, stepsCell(c)), el("td", {}, ...c.callees.map(callee))))
    : [none(7, "no call is ringing")]));
  $("#calls-recent tbody").replaceChildren(...(r.recent.length ? r.recent.map((c) =>
    el("tr", { "data-call": c.call_id, "data-state": c.state },
      el("td", {}, clock(c.placed_at_ms)), el("td", {}, callLink(c.call_id)), el("td", {}, caller(c)),
      el("td", { class: "state " + c.state }, c.state), el("td", {}, c.answered_by || "–"),
      el("td", {}, span(c.time_to_answer_ms)), el("td", {}, clock(c.ended_at_ms)),
      el("td", {}, stepsCell(c)), el("td", {}, ...c.callees.map(callee))))
    : [none(9, "no call ended in the last 15 minutes")]));
  const id = currentCall();
  if (id) await loadCall(id);
}

async function loadCall(id) {
  $("#call-id").textContent = id;
  let c;
  try { c = await api("/api/calls/" + encodeURIComponent(id)); } catch (e) {
    $("#call-facts").replaceChildren(el("div", {}, el("span", {}, "Not found"), e.message));
    $("#call-steps tbody").replaceChildren(); $("#call-callees tbody").replaceChildren();
    return;
  }
  const facts = [["State", c.state], ["Caller", caller(c)], ["Video", c.video ? "yes" : "no"], ["Placed", clock(c.placed_at_ms)],
    ["Rings until", clock(c.deadline_ms)], ["Ended", clock(c.ended_at_ms)], ["Answered by", c.answered_by || "–"],
    ["Time to answer", span(c.time_to_answer_ms)], ["Hung up", clock(c.hung_up_at_ms)], ["Call UUID", c.call_uuid]];
  $("#call-facts").replaceChildren(...facts.map(([k, v]) => el("div", { "data-fact": k }, el("span", {}, k), String(v))));
  $("#call-steps tbody").replaceChildren(...c.steps.map((s) => el("tr", {},
    el("td", {}, s.index), el("td", {}, clock(s.due_at_ms) + (s.index ? " (+" + span(s.due_at_ms - c.placed_at_ms) + ")" : "")),
    el("td", {}, s.started_at_ms ? clock(s.started_at_ms) : "did not ring"), el("td", {}, s.stop_earlier ? "yes" : "no"),
    el("td", {}, s.device_ids.join(", ")))));
  $("#call-callees tbody").replaceChildren(...c.callees.map((x) => el("tr", { "data-device": x.device_id },
    el("td", {}, el("a", { href: "#device/" + encodeURIComponent(x.device_id) }, x.device_id)), el("td", {}, x.step),
    el("td", {}, chip(x.status, "")), el("td", {}, x.path || "–"), el("td", {}, clock(x.at_ms)), el("td", {}, x.reason || ""))));
}

// Per-device page (hash route #device/ID).
const currentDetail = () => (location.hash.startsWith("#device/") ? decodeURIComponent(location.hash.slice(8)) : null);

function route() {
  const id = currentDetail(), call = currentCall(), list = location.hash === "#calls";
  const onCalls = !!call || list;
  // The device page opens over the list, which keeps its page, sort and scroll position.
  $("#detail").hidden = !id; $("#call-detail").hidden = !call; $("#calls-box").hidden = !list;
  $("#list").hidden = onCalls;
  $("#tab-calls").classList.toggle("on", onCalls); $("#tab-devices").classList.toggle("on", !onCalls);
  if (id) loadDetail(id);
  if (call) loadCall(call);
}

async function loadDetail(id) {
  const r = await api("/api/devices/" + encodeURIComponent(id));
  const d = r.device;
  $("#detail-id").textContent = d.device_id;
  const facts = [["State", stateOf(d)], ["SSID", d.ssid || "–"], ["Node", d.node], ["Groups", d.groups.join(", ") || "–"],
    ["Session age", d.online ? ago(d.session_started_ms) : "–"], ["Last heard", d.online ? ago(d.last_heard_ms) + " ago" : "–"],
    ["Last seen", time(d.last_seen_ms)], ["SDK", d.sdk_version || "–"], ["Instance", d.instance_id || "–"],
    ["Last stop reason", stopReason(d)], ["iOS stop reason", d.last_provider_stop_reason || "–"], ["Last call path", d.last_call_path || "–"], ["VoIP token", d.voip_token],
    ["Queued", d.queued], ["Heartbeat misses", d.heartbeat_misses], ["Instance changes (window)", d.instance_changes], ["Flags", d.flags.join(", ") || "none"]];
  $("#detail-facts").replaceChildren(...facts.map(([k, v]) => el("div", {}, el("span", {}, k), String(v))));
  $("#revoke").hidden = !(me && me.role === "admin") || d.revoked;
  $("#detail-sessions tbody").replaceChildren(...r.sessions.map((s) => el("tr", {},
    el("td", {}, s.session_id), el("td", {}, time(s.started_ms)), el("td", {}, s.ended_ms ? time(s.ended_ms) : "live"),
    el("td", {}, dur(s.started_ms, s.ended_ms || Date.now())), el("td", {}, s.ssid), el("td", {}, s.instance_id),
    el("td", {}, s.sdk_version), el("td", {}, s.reason || "–"),
    el("td", { class: "ios" }, s.provider_stop_reason || "–"), el("td", {}, s.left_wifi ? "left the Wi-Fi" : ""))));
  $("#detail-deliveries tbody").replaceChildren(...r.deliveries.map((x) => el("tr", {},
    el("td", {}, time(x.at_ms)), el("td", {}, x.id), el("td", {}, x.kind), el("td", {}, x.state), el("td", {}, x.path || "–"),
    el("td", {}, x.latency_ms == null ? "–" : x.latency_ms + " ms"), el("td", {}, x.reason || ""))));
  $("#detail-calls tbody").replaceChildren(...(r.calls.length ? r.calls.map((x) => el("tr", { "data-call": x.call_id },
    el("td", {}, clock(x.placed_at_ms)), el("td", {}, callLink(x.call_id)), el("td", {}, x.caller_name || "–"),
    el("td", {}, chip(x.status, x.path, "", x.reason)), el("td", {}, x.step),
    el("td", { class: "state " + x.call_state }, x.call_state), el("td", {}, x.answered_by || "–"),
    el("td", {}, span(x.time_to_answer_ms))))
    : [none(8, "no call rang it in the last 15 minutes")]));
}

async function revoke() {
  const id = currentDetail();
  if (!id || !confirm("Revoke every credential of " + id + "? Its session ends now and it must be re-enrolled.")) return;
  try {
    const r = await api("/api/devices/" + encodeURIComponent(id) + "/revoke", { method: "POST", headers: { "x-lpush-csrf": "1" } });
    $("#revoke-result").textContent = r.session_closed ? "revoked; its session was closed" : "revoked";
  } catch (e) { $("#revoke-result").textContent = "failed: " + e.message; }
  loadDetail(id);
}

document.addEventListener("DOMContentLoaded", () => {
  $("#login-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    $("#login-error").textContent = "";
    const r = await fetch("/api/login", { method: "POST", credentials: "same-origin", headers: { "content-type": "application/json" }, body: JSON.stringify({ api_key: $("#api-key").value }) });
    $("#api-key").value = "";
    if (!r.ok) { $("#login-error").textContent = (await r.json().catch(() => ({}))).error || "login failed"; return; }
    start();
  });
  $("#logout").addEventListener("click", async () => { await fetch("/api/logout", { method: "POST", credentials: "same-origin" }); showLogin(); });
  $("#revoke").addEventListener("click", revoke);
  let typing = null;
  $("#search").addEventListener("input", () => { clearTimeout(typing); typing = setTimeout(() => ask({ q: $("#search").value.trim() }), 50); });
  $("#filter-state").addEventListener("input", () => ask({ state: $("#filter-state").value }));
  $("#filter-ssid").addEventListener("input", () => ask({ ssid: $("#filter-ssid").value }));
  $("#page-size").addEventListener("input", () => ask({ limit: Number($("#page-size").value) }));
  $("#problems-first").addEventListener("click", () => ask({ sort: "problems", desc: false }));
  for (const th of document.querySelectorAll("#devices th[data-sort]")) {
    th.addEventListener("click", () => ask({ sort: th.dataset.sort, desc: view.sort === th.dataset.sort && !view.desc }));
  }
  $("#page-prev").addEventListener("click", () => { view.offset = Math.max(0, view.offset - view.limit); loadDevices(); });
  $("#page-next").addEventListener("click", () => { view.offset += view.limit; loadDevices(); });
  // Closing the device page leaves the list exactly where it was (no jump to the top).
  const closeDetail = () => { history.pushState(null, "", location.pathname + location.search); route(); };
  $("#detail-close").addEventListener("click", closeDetail);
  document.addEventListener("keydown", (e) => { if (e.key === "Escape" && currentDetail()) closeDetail(); });
  window.addEventListener("hashchange", route);
  // Counters, sites, charts and the rows' ages refresh every 5 s; rows that change refresh
  // live (at most once a second).
  setInterval(() => { if (!$("#app").hidden) { refresh().catch(() => {}); loadDevices(); } }, 5000);
  start();
});
