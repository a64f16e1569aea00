// pvcoord beamline web client: devices, locks, queue, console, health and a plot, over PVWS.
//
// Every PV name comes from /pvws/names.json (built by the bridge from pvdb): this file spells
// none. Device PVs are the registry's devices (Registry:Devices); lock take/release goes to the
// bridge's /api/lock, queue control to /api/queue/{key} (the queue IOC's RPCs).
import { History, drawPlot } from "./plot.js";

const $ = (id) => document.getElementById(id);
const SCHEME = "pva://";
const HEARTBEAT_STALE_MS = 3000;

const state = {
  names: null,
  who: { user: null, writes: false, auth: "none" },
  ws: null,
  connected: false,
  watchers: new Map(), // subscribed pv -> [callback(update)]
  devices: new Map(), // device name -> row model
  heartbeats: new Map(), // process -> {at, severity, status: Map(pv -> text)}
  running: { uid: "", name: "", args: "", user: "", start: 0 },
  history: new History(),
  readbacks: new Map(), // pv -> {device, units}
};

// --- small helpers ------------------------------------------------------------------------------

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") e.className = v;
    else if (k === "text") e.textContent = v;
    else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c);
  return e;
}

function fill(template, device) {
  return template.split(state.names.deviceTemplate).join(device);
}

function pv(name) {
  return SCHEME + name;
}

function tableRows(update) {
  const t = update.table;
  if (!t || !t.columns) return [];
  const labels = Object.keys(t.columns);
  const n = labels.length ? t.columns[labels[0]].length : 0;
  const rows = [];
  for (let i = 0; i < n; i++) {
    const row = {};
    for (const l of labels) row[l] = t.columns[l][i];
    rows.push(row);
  }
  return rows;
}

function numberOf(update) {
  const v = update.value;
  if (typeof v === "number") return v;
  if (typeof v === "string") return v === "NaN" ? NaN : Number(v);
  return NaN;
}

function strings(update) {
  if (Array.isArray(update.value)) return update.value.map(String);
  if (update.value && typeof update.value.length === "number") return Array.from(update.value, String);
  if (typeof update.text === "string") return update.text ? update.text.split("\n") : [];
  return [];
}

function formatValue(update) {
  if (update.severity === "INVALID" && update.value === "NaN") return "disconnected";
  if (typeof update.text === "string" && update.text !== "") return update.text;
  const v = numberOf(update);
  if (!Number.isFinite(v)) return String(update.value ?? "");
  const p = Number.isInteger(update.precision) && update.precision >= 0 ? update.precision : 3;
  return v.toFixed(Math.min(p, 10));
}

function formatSeconds(s) {
  if (!Number.isFinite(s) || s <= 0) return "";
  if (s < 120) return `${Math.round(s)} s`;
  const m = Math.floor(s / 60);
  return m < 120 ? `${m} min ${Math.round(s - 60 * m)} s` : `${Math.floor(m / 60)} h ${m % 60} min`;
}

function setSeverity(node, severity) {
  for (const c of [...node.classList]) if (c.startsWith("sev-")) node.classList.remove(c);
  if (severity && severity !== "NONE") node.classList.add(`sev-${severity}`);
}

function showResult(node, reply) {
  node.classList.remove("error", "message");
  if (reply.error) {
    node.classList.add("error");
    node.textContent = reply.error.message;
    node.dataset.code = reply.error.code || "";
    node.dataset.holder = reply.error.holder || "";
  } else {
    node.classList.add("message");
    node.textContent = reply.message || "done";
    node.dataset.code = "ok";
    node.dataset.holder = "";
  }
}

async function postJSON(url, body) {
  try {
    const r = await fetch(url, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
      credentials: "same-origin",
    });
    const text = await r.text();
    let reply;
    try {
      reply = text ? JSON.parse(text) : {};
    } catch (e) {
      reply = { error: { code: "bad-reply", message: `HTTP ${r.status}: ${text.slice(0, 200)}` } };
    }
    if (!r.ok && !reply.error) {
      reply = { error: { code: `http-${r.status}`, message: `HTTP ${r.status} ${r.statusText}` } };
    }
    return reply;
  } catch (e) {
    return { error: { code: "network", message: `cannot reach the bridge: ${e}` } };
  }
}

// --- the websocket ------------------------------------------------------------------------------

function watch(name, callback) {
  const key = pv(name);
  const list = state.watchers.get(key);
  if (list) {
    list.push(callback);
    const last = state.ws && state.ws.values[key];
    if (last) callback(last);
    return;
  }
  state.watchers.set(key, [callback]);
  if (state.connected) state.ws.subscribe([key]);
}

function onConnect(connected) {
  state.connected = connected;
  renderHealth();
  if (!connected) return;
  if (state.watchers.size) state.ws.subscribe([...state.watchers.keys()]);
  const unknown = [...state.devices.values()].filter((r) => !state.names.classes[r.deviceClass]);
  if (unknown.length) state.ws.send({ type: "device", devices: unknown.map((r) => r.name) });
}

function onMessage(msg) {
  if (msg.type === "update") {
    for (const cb of state.watchers.get(msg.pv) || []) cb(msg);
  } else if (msg.type === "device") {
    onDeviceMessage(msg);
  } else if (msg.type === "error") {
    onSocketError(msg);
  }
}

function onSocketError(msg) {
  for (const row of state.devices.values()) {
    if (row.setpointPV && msg.pv === row.setpointPV) {
      showResult(row.result, { error: msg });
      return;
    }
  }
  showResult($("ws-error"), { error: msg });
}

function openSocket() {
  if (state.ws) state.ws.close();
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const path = location.pathname.split("/pvws")[0].replace(/\/[^/]*$/, "");
  state.ws = new globalThis.PVWS(`${scheme}://${location.host}${path}/pvws/pv`, onConnect, onMessage);
  state.ws.reconnect_ms = 2000;
  state.ws.open();
}

// --- session ------------------------------------------------------------------------------------

async function loadWho() {
  try {
    const r = await fetch("whoami", { credentials: "same-origin" });
    state.who = await r.json();
  } catch (e) {
    state.who = { user: null, writes: false, auth: "none" };
  }
  const who = state.who;
  $("whoami").textContent = who.user
    ? `${who.user}${who.writes ? "" : " (read only: bridge writes off)"}`
    : who.auth === "password" ? "not logged in" : "read only (no login on this bridge)";
  $("login-form").hidden = Boolean(who.user) || who.auth !== "password";
  $("logout-button").hidden = !who.user || who.auth !== "password";
  for (const row of state.devices.values()) renderDevice(row);
  renderQueueControls();
}

async function login(event) {
  event.preventDefault();
  const reply = await postJSON("login", {
    user: $("login-user").value,
    password: $("login-password").value,
  });
  $("login-password").value = "";
  if (reply.error) {
    showResult($("login-error"), reply);
    return;
  }
  $("login-error").textContent = "";
  await loadWho();
  openSocket(); // the socket's identity is the session cookie of its upgrade request
}

async function logout() {
  await postJSON("logout", {});
  await loadWho();
  openSocket();
}

// --- devices ------------------------------------------------------------------------------------

function addDevice(name, deviceClass, description) {
  if (state.devices.has(name)) return;
  const row = {
    name, deviceClass,
    tr: el("tr", { "data-device": name }),
    readback: el("td", { class: "num readback" }),
    setpoint: el("input", { class: "setpoint", "aria-label": `${name} setpoint`, disabled: "" }),
    setButton: el("button", { type: "button", class: "set", text: "Set", disabled: "" }),
    lock: el("span", { class: "pill lock lock-Free", text: "?" }),
    owner: el("td", { class: "owner" }),
    lease: el("td", { class: "num lease" }),
    take: el("button", { type: "button", class: "take", text: "Take" }),
    release: el("button", { type: "button", class: "release", text: "Release" }),
    renew: el("button", { type: "button", class: "renew", text: "Renew", title: "extend the lease" }),
    reason: el("div", { class: "reason" }),
    result: el("div", { class: "result" }),
    setpointUpdate: null, readbackUpdate: null, stateText: "", ownerText: "",
    readbackPV: null, setpointPV: null,
  };
  row.tr.append(
    el("td", { class: "name", title: `${deviceClass}: ${description}`, text: name }),
    row.readback,
    el("td", {}, row.setpoint, row.setButton),
    el("td", {}, row.lock),
    row.owner, row.lease,
    el("td", {}, row.take, row.release, row.renew),
    el("td", {}, row.reason, row.result),
  );
  const rows = [...$("devices").tBodies[0].rows];
  const before = rows.find((r) => r.dataset.device > name);
  $("devices").tBodies[0].insertBefore(row.tr, before || null);
  state.devices.set(name, row);

  row.setpoint.addEventListener("keydown", (e) => {
    if (e.key === "Enter") writeSetpoint(name, row.setpoint.value);
  });
  row.setpoint.addEventListener("change", () => {
    if (row.setpoint.tagName === "SELECT") writeSetpoint(name, row.setpoint.value);
  });
  row.setpoint.addEventListener("input", () => { row.setpoint.dataset.edited = "1"; });
  row.setButton.addEventListener("click", () => writeSetpoint(name, row.setpoint.value));
  row.take.addEventListener("click", () => lockAction(name, "take"));
  row.release.addEventListener("click", () => lockAction(name, "release"));
  row.renew.addEventListener("click", () => lockAction(name, "renew"));

  const d = state.names.device;
  watch(fill(d.state, name), (u) => { row.stateText = u.text || ""; renderDevice(row); });
  watch(fill(d.owner, name), (u) => { row.ownerText = u.text || ""; renderDevice(row); });
  watch(fill(d.remaining, name), (u) => { row.lease.textContent = formatSeconds(numberOf(u)); });

  const roles = state.names.classes[deviceClass];
  if (roles) {
    useSignals(row, pv(fill(roles.readback, name)), roles.setpoint ? pv(fill(roles.setpoint, name)) : null);
  } else if (state.connected) {
    state.ws.send({ type: "device", devices: [name] }); // the registry's signals of the device
  }
  renderDevice(row);
}

function useSignals(row, readbackPV, setpointPV) {
  row.readbackPV = readbackPV;
  row.setpointPV = setpointPV;
  const strip = (p) => p.slice(SCHEME.length);
  watch(strip(readbackPV), (u) => {
    row.readbackUpdate = u;
    const y = numberOf(u);
    state.history.add(readbackPV, updateTime(u), y);
    renderDevice(row);
    if ($("plot-pv").value === readbackPV) schedulePlot();
  });
  if (!state.readbacks.has(readbackPV)) {
    state.readbacks.set(readbackPV, { device: row.name });
    const opt = el("option", { value: readbackPV, text: `${row.name} ${strip(readbackPV)}` });
    $("plot-pv").append(opt);
  }
  if (setpointPV) watch(strip(setpointPV), (u) => { row.setpointUpdate = u; renderDevice(row); });
}

function updateTime(u) {
  if (Number.isFinite(u.seconds) && u.seconds > 0) return u.seconds * 1000 + (u.nanos || 0) / 1e6;
  return Date.now();
}

function readonlyReason(row) {
  const u = row.setpointUpdate;
  if (!row.setpointPV) return "this device class has no setpoint";
  if (!state.who.user) return "log in to write";
  if (!state.who.writes) return "the bridge runs with writes off";
  if (!u) return "waiting for the setpoint PV";
  if (u.readonly === false) return "";
  return u.readonly_reason || "read-only for you";
}

function renderSetpointInput(row) {
  const u = row.setpointUpdate;
  const wantSelect = u && Array.isArray(u.labels) && u.labels.length > 0;
  if (wantSelect && row.setpoint.tagName !== "SELECT") {
    const sel = el("select", { class: "setpoint", "aria-label": `${row.name} setpoint` });
    u.labels.forEach((l, i) => sel.append(el("option", { value: String(i), text: l })));
    sel.addEventListener("change", () => writeSetpoint(row.name, sel.value));
    row.setpoint.replaceWith(sel);
    row.setpoint = sel;
  }
  if (!u) return;
  const focused = document.activeElement === row.setpoint;
  if (row.setpoint.tagName === "SELECT") {
    if (!focused && Number.isInteger(u.value)) row.setpoint.value = String(u.value);
  } else if (!focused && !row.setpoint.dataset.edited) {
    row.setpoint.value = formatValue(u);
  }
  row.setpoint.title = u.units ? `units: ${u.units}` : "";
}

function renderDevice(row) {
  const rb = row.readbackUpdate;
  if (rb) {
    row.readback.textContent = formatValue(rb) + (rb.units ? ` ${rb.units}` : "");
    setSeverity(row.readback, rb.severity);
  }
  renderSetpointInput(row);
  if (row.setpointUpdate) setSeverity(row.setpoint, row.setpointUpdate.severity);
  const reason = readonlyReason(row);
  row.setpoint.disabled = reason !== "";
  row.setButton.disabled = reason !== "";
  row.reason.textContent = reason;
  row.tr.dataset.readonly = reason ? "true" : "false";
  const s = row.stateText || "?";
  row.lock.textContent = s;
  row.lock.className = `pill lock lock-${s}`;
  row.owner.textContent = row.ownerText;
  const me = state.who.user;
  const canLock = Boolean(me && state.who.writes);
  row.take.disabled = !canLock;
  row.release.disabled = !canLock || !row.ownerText.startsWith(`${me}@`);
  row.renew.hidden = row.release.disabled;
  const why = !me ? "log in to take locks" : !state.who.writes ? "the bridge runs with writes off" : "";
  row.take.title = why;
  row.release.title = why || (row.release.disabled ? "you do not hold this device" : "");
}

function writeSetpoint(device, text) {
  const row = state.devices.get(device);
  if (!row || !row.setpointPV) return false;
  const u = row.setpointUpdate || {};
  let value = text;
  if (u.vtype && !/String/.test(u.vtype)) {
    value = Number(text);
    if (String(text).trim() === "" || !Number.isFinite(value)) {
      showResult(row.result, { error: { code: "bad-value", message: `not a number: ${text}` } });
      return false;
    }
  }
  row.result.textContent = "";
  row.result.dataset.code = "";
  delete row.setpoint.dataset.edited;
  return state.ws.write(row.setpointPV, value) !== false;
}

async function lockAction(device, action) {
  const row = state.devices.get(device);
  const body = { action, device };
  if (action === "take") body.reason = "web client";
  const reply = await postJSON("api/lock", body);
  if (row) showResult(row.result, reply);
  return reply;
}

function onDeviceMessage(msg) {
  const row = state.devices.get(msg.device);
  if (!row || row.readbackPV || !Array.isArray(msg.pvs) || msg.pvs.length === 0) return;
  useSignals(row, msg.pvs[0], null);
}

function watchRegistry() {
  watch(state.names.pv.registryDevices, (u) => {
    for (const r of tableRows(u)) addDevice(String(r.name), String(r.deviceClass || ""), String(r.description || ""));
  });
  const bl = state.names.beamline;
  let blState = "?";
  let blOwner = "";
  const render = () => {
    const node = $("beamline-lock");
    node.textContent = `beamline: ${blState}${blOwner ? " " + blOwner : ""}`;
    node.className = `pill lock-${blState}`;
  };
  watch(fill(state.names.device.state, bl), (u) => { blState = u.text || "?"; render(); });
  watch(fill(state.names.device.owner, bl), (u) => { blOwner = u.text || ""; render(); });
}

// --- health -------------------------------------------------------------------------------------

function watchHealth() {
  for (const h of state.names.health) {
    const entry = { at: 0, severity: "NONE", status: new Map() };
    state.heartbeats.set(h.process, entry);
    watch(h.heartbeat, (u) => { entry.at = Date.now(); entry.severity = u.severity || entry.severity; renderHealth(); });
    for (const s of h.status) watch(s, (u) => { entry.status.set(s, u.text || ""); renderHealth(); });
  }
  const conn = { text: "?" };
  state.heartbeats.set("re-manager", { connection: conn });
  watch(state.names.pv.connection, (u) => { conn.text = u.text || "?"; renderHealth(); });
}

const healthPills = new Map(); // process -> its pill, updated in place

function renderHealth() {
  const box = $("health");
  const pill = (name, ok, title) => {
    let node = healthPills.get(name);
    if (!node) {
      node = el("span", { "data-process": name, text: name });
      healthPills.set(name, node);
      box.append(node);
    }
    node.className = `pill ${ok ? "ok" : "bad"}`;
    node.dataset.ok = String(ok);
    node.title = title;
  };
  pill("bridge", state.connected, state.connected ? "websocket open" : "websocket closed");
  const now = Date.now();
  for (const [name, e] of state.heartbeats) {
    if (e.connection) {
      pill(name, e.connection.text !== "Disconnected" && e.connection.text !== "?", `RE Manager: ${e.connection.text}`);
      continue;
    }
    const fresh = now - e.at < HEARTBEAT_STALE_MS && e.severity !== "INVALID";
    const problems = [...e.status.values()].filter((t) => t !== "OK" && t !== "");
    const title = !fresh ? "heartbeat stopped" : problems.length ? problems.join("; ") : "OK";
    pill(name, fresh && problems.length === 0, title);
  }
}

// --- queue --------------------------------------------------------------------------------------

function renderQueueControls() {
  const rpcs = state.names ? state.names.queueRpc : {};
  const allowed = Boolean(state.who.user && state.who.writes);
  for (const b of document.querySelectorAll("button[data-rpc]")) {
    b.hidden = !(b.dataset.rpc in rpcs);
    b.disabled = !allowed;
    b.title = allowed ? "" : "log in (with bridge writes on) to control the queue";
  }
  $("add-button").disabled = !allowed;
  renderItems(null);
}

async function queueCall(key, args = {}) {
  const reply = await postJSON(`api/queue/${key}`, args);
  showResult(reply.error ? $("queue-error") : $("queue-message"), reply);
  if (reply.error) $("queue-message").textContent = "";
  else $("queue-error").textContent = "";
  return reply;
}

function addItem(event) {
  event.preventDefault();
  const args = { name: $("add-plan").value.trim() };
  if ($("add-args").value.trim()) args.args = $("add-args").value.trim();
  if ($("add-kwargs").value.trim()) args.kwargs = $("add-kwargs").value.trim();
  return queueCall("add", args);
}

let lastItems = null;

function renderItems(u) {
  if (u) lastItems = u;
  if (!lastItems) return;
  const body = $("queue-items").tBodies[0];
  const rows = tableRows(lastItems);
  const canMove = "move" in state.names.queueRpc;
  const allowed = Boolean(state.who.user && state.who.writes);
  const key = JSON.stringify([rows, allowed]);
  if (body.dataset.key === key) return; // unchanged: keep the buttons under the pointer
  body.dataset.key = key;
  body.textContent = "";
  rows.forEach((r, i) => {
    const remove = el("button", { type: "button", class: "remove", text: "Remove", title: "remove from the queue" });
    remove.disabled = !allowed;
    remove.addEventListener("click", () => queueCall("remove", { uid: String(r.itemUid) }));
    const cell = el("td", {}, remove);
    if (canMove) {
      const up = el("button", { type: "button", class: "up", text: "\u2191", title: "move up" });
      const down = el("button", { type: "button", class: "down", text: "\u2193", title: "move down" });
      up.disabled = !allowed || i === 0;
      down.disabled = !allowed || i === rows.length - 1;
      up.addEventListener("click", () => queueCall("move", { uid: String(r.itemUid), posDest: String(i - 1) }));
      down.addEventListener("click", () => queueCall("move", { uid: String(r.itemUid), posDest: String(i + 1) }));
      cell.prepend(up, down);
    }
    body.append(el("tr", { "data-uid": String(r.itemUid) },
      el("td", { text: String(i + 1) }), el("td", { class: "plan", text: String(r.name) }),
      el("td", { text: String(r.args) }), el("td", { text: String(r.user) }),
      el("td", { text: String(r.devices) }), cell));
  });
}

function renderHistory(u) {
  const body = $("history").tBodies[0];
  body.textContent = "";
  const rows = tableRows(u).reverse().slice(0, 30);
  for (const r of rows) {
    const start = Number(r.timeStart) > 0 ? new Date(Number(r.timeStart) * 1000).toLocaleTimeString() : "";
    body.append(el("tr", { "data-uid": String(r.itemUid) },
      el("td", { class: "plan", text: String(r.name) }), el("td", { text: String(r.args) }),
      el("td", { class: `exit exit-${r.exitStatus}`, text: String(r.exitStatus) }),
      el("td", { text: start }), el("td", { class: "error", text: String(r.msg || "") })));
  }
}

function renderRunning() {
  const r = state.running;
  const node = $("running");
  if (!r.uid) {
    node.textContent = "none";
    node.dataset.uid = "";
    return;
  }
  const elapsed = r.start > 0 ? formatSeconds(Date.now() / 1000 - r.start) || "0 s" : "";
  node.textContent = `${r.name}(${r.args}) by ${r.user}${elapsed ? ", running for " + elapsed : ""}`;
  node.dataset.uid = r.uid;
}

function watchQueue() {
  const p = state.names.pv;
  watch(p.managerState, (u) => { $("manager-state").textContent = u.text || "?"; setSeverity($("manager-state"), u.severity); });
  watch(p.reState, (u) => { $("re-state").textContent = `RE ${u.text || "?"}`; });
  const running = [["runningUid", "uid"], ["runningName", "name"], ["runningArgs", "args"], ["runningUser", "user"]];
  for (const [key, field] of running) watch(p[key], (u) => { state.running[field] = u.text || ""; renderRunning(); });
  watch(p.runningStart, (u) => { state.running.start = numberOf(u); renderRunning(); });
  watch(p.items, renderItems);
  watch(p.history, renderHistory);
  watch(p.stopReason, (u) => { $("stop-reason").textContent = u.text || ""; });
  watch(p.consoleLines, (u) => {
    const c = $("console");
    const atEnd = c.scrollTop + c.clientHeight >= c.scrollHeight - 4;
    c.textContent = strings(u).join("\n");
    if (atEnd) c.scrollTop = c.scrollHeight;
  });
  for (const b of document.querySelectorAll("button[data-rpc]")) {
    b.addEventListener("click", () => queueCall(b.dataset.rpc));
  }
  $("add-form").addEventListener("submit", addItem);
}

// --- plot ---------------------------------------------------------------------------------------

let plotPending = false;

function schedulePlot() {
  if (plotPending) return;
  plotPending = true;
  requestAnimationFrame(() => { plotPending = false; renderPlot(); });
}

function renderPlot() {
  const sel = $("plot-pv").value;
  if (!sel) return;
  const windowS = Number($("plot-window").value);
  const now = Date.now();
  const row = state.devices.get((state.readbacks.get(sel) || {}).device);
  const units = row && row.readbackUpdate ? row.readbackUpdate.units : "";
  drawPlot($("plot"), state.history.since(sel, now - windowS * 1000), now, windowS, sel.slice(SCHEME.length), units);
}

// --- start --------------------------------------------------------------------------------------

async function start() {
  try {
    const r = await fetch("pvws/names.json", { credentials: "same-origin" });
    if (!r.ok) throw new Error(`HTTP ${r.status} ${r.statusText}`);
    state.names = await r.json();
  } catch (e) {
    $("page-error").textContent = `cannot load the PV list (pvws/names.json): ${e.message}`;
    return;
  }
  $("prefix").textContent = state.names.prefix;
  $("login-form").addEventListener("submit", login);
  $("logout-button").addEventListener("click", logout);
  $("plot-pv").addEventListener("change", renderPlot);
  $("plot-window").addEventListener("change", renderPlot);
  const wsError = el("div", { id: "ws-error", class: "error", role: "alert" });
  $("devices-panel").querySelector("h2").after(wsError);
  await loadWho();
  openSocket();
  watchHealth();
  watchRegistry();
  watchQueue();
  setInterval(() => { renderHealth(); renderRunning(); renderPlot(); }, 1000);
  document.body.dataset.ready = "true";
}

// For the browser tests and the console: the same functions the controls call.
globalThis.pvcoord = { state, writeSetpoint, lockAction, queueCall, login, renderPlot };

start();
