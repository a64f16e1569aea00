// pvcoord's PVWS client: the interface of the PVWS project's pvws.js, written for pvcoord.
//
//   const ws = new PVWS(url, connected => ..., message => ...);
//   ws.open(); ws.subscribe(["pva://X"]); ws.write("pva://X", 1); ws.clear(["pva://X"]);
//   ws.list(); ws.ping(); ws.close();
//
// As in pvws.js: `message` is the merged state of the PV for an `update` (the last value of
// every field, starting from {pv, readonly: true}), any other message (`error`, `list`, ...) is
// passed as received; an idle socket sends {"type": "ping"} after `idle_check_ms`; a closed
// socket is reopened after `reconnect_ms` and the page subscribes again in its connect handler.
// Arrays (b64dbl, b64flt, b64int, b64srt, b64byt) are decoded into `value` as typed arrays.
// A classic script (no module): it defines the global class PVWS, as DBWR expects.
"use strict";

class PVWS {
  /**
   * @param {string} url websocket URL, e.g. "ws://host:8080/pvws/pv"
   * @param {function(boolean)} connect_handler called with true / false on open / close
   * @param {function(Object)} message_handler called with each merged update or other message
   */
  constructor(url, connect_handler, message_handler) {
    this.url = url;
    this.connect_handler = connect_handler;
    this.message_handler = message_handler;
    this.values = {};
    this.reconnect_ms = 10000;
    this.idle_check_ms = 30000;
    this.socket = null;
    this.idle = true;
    this.idle_timer = null;
    this.closing = false;
  }

  /** Open the socket (again). */
  open() {
    this.closing = false;
    this.socket = new WebSocket(this.url);
    this.socket.onopen = () => this._opened();
    this.socket.onmessage = (event) => this._received(event.data);
    this.socket.onclose = (event) => this._closed(event);
    this.socket.onerror = () => {};
  }

  /** Close the socket for good (no reconnect). */
  close() {
    this.closing = true;
    this._stopIdle();
    if (this.socket) this.socket.close();
  }

  /** True while the socket is open. */
  connected() {
    return this.socket !== null && this.socket.readyState === WebSocket.OPEN;
  }

  /** Subscribe to one PV name or an array of names. */
  subscribe(pvs) {
    this.send({ type: "subscribe", pvs: Array.isArray(pvs) ? pvs : [pvs] });
  }

  /** Stop the updates of one PV name or an array of names, and forget their state. */
  clear(pvs) {
    const names = Array.isArray(pvs) ? pvs : [pvs];
    this.send({ type: "clear", pvs: names });
    for (const pv of names) delete this.values[pv];
  }

  /** Ask for the PVs subscribed on this socket (reply {"type": "list", "pvs": [...]}). */
  list() {
    this.send({ type: "list" });
  }

  /** Write a number or string to a subscribed PV (a refusal arrives as an `error` message). */
  write(pv, value) {
    this.send({ type: "write", pv, value });
  }

  /** Ask the server for a websocket ping. */
  ping() {
    this.send({ type: "ping" });
  }

  /** Send one JSON message (for messages beyond PVWS, e.g. {"type": "device"}). */
  send(message) {
    if (!this.connected()) return false;
    this.idle = false;
    this.socket.send(JSON.stringify(message));
    return true;
  }

  _opened() {
    this.idle = true;
    this._stopIdle();
    this.idle_timer = setInterval(() => this._checkIdle(), this.idle_check_ms);
    this.connect_handler(true);
  }

  _closed() {
    this._stopIdle();
    this.values = {};
    this.connect_handler(false);
    if (!this.closing) setTimeout(() => this.open(), this.reconnect_ms);
  }

  _stopIdle() {
    if (this.idle_timer !== null) clearInterval(this.idle_timer);
    this.idle_timer = null;
  }

  _checkIdle() {
    if (this.idle) this.ping();
    this.idle = true;
  }

  _received(text) {
    this.idle = false;
    let msg;
    try {
      msg = JSON.parse(text);
    } catch (e) {
      return;
    }
    if (msg === null || typeof msg !== "object" || Array.isArray(msg)) return;
    if (msg.type === "update" && typeof msg.pv === "string") {
      PVWS.decodeArray(msg);
      const merged = Object.assign(this.values[msg.pv] || { pv: msg.pv, readonly: true }, msg);
      this.values[msg.pv] = merged;
      this.message_handler(merged);
    } else {
      this.message_handler(msg);
    }
  }

  /** Replace a b64* field of an update by the decoded typed array in `value`. */
  static decodeArray(msg) {
    const kinds = {
      b64dbl: Float64Array, b64flt: Float32Array, b64int: Int32Array,
      b64srt: Int16Array, b64byt: Uint8Array,
    };
    for (const [field, Type] of Object.entries(kinds)) {
      if (typeof msg[field] !== "string") continue;
      const bin = atob(msg[field]);
      const bytes = new Uint8Array(bin.length);
      for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
      const n = Math.floor(bytes.length / Type.BYTES_PER_ELEMENT);
      const view = new DataView(bytes.buffer);
      const out = new Type(n);
      for (let i = 0; i < n; i++) {
        const at = i * Type.BYTES_PER_ELEMENT;
        if (Type === Float64Array) out[i] = view.getFloat64(at, true);
        else if (Type === Float32Array) out[i] = view.getFloat32(at, true);
        else if (Type === Int32Array) out[i] = view.getInt32(at, true);
        else if (Type === Int16Array) out[i] = view.getInt16(at, true);
        else out[i] = bytes[at];
      }
      msg.value = out;
      delete msg[field];
    }
  }
}

globalThis.PVWS = PVWS;
