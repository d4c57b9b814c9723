// The live connection (/ws): one socket per tab, shared by every page.
//
// Rooms are kept across reconnects: after a reconnect each room is subscribed again with the
// last seat-map version this tab holds, so the server sends only what was missed (or a fresh
// snapshot when it cannot). A refreshed access token is handed to the open socket (``auth``);
// a socket closed for an expired or revoked session (4401) reconnects once a token is fresh.
//
// A room joined with its seats' ids in the seat map's order asks for seats named by index
// (``"indexed": true``, a sixth of the bytes in a rush); its ``seats.indexed`` and
// ``claims.indexed`` messages are handed on as the ``seats``, ``seats.claimed`` and
// ``seats.released`` messages they stand for, so pages see one form only.

import { accessToken, onSession, refresh } from "./api.js";

const PING_EVERY = 20000;
const handlers = new Map(); // message type -> Set of functions
const rooms = new Map(); // room -> {version, order: seat ids by index, or null}
let socket = null;
let backoff = 500;
let pinger = null;
let wanted = false;
let state = "offline";
const stateListeners = new Set();

function setState(next) {
  state = next;
  for (const fn of stateListeners) fn(state);
}

export function onState(fn) {
  stateListeners.add(fn);
  fn(state);
  return () => stateListeners.delete(fn);
}

/** Call ``fn(message)`` for every message of ``type``; returns the function that stops it. */
export function on(type, fn) {
  if (!handlers.has(type)) handlers.set(type, new Set());
  handlers.get(type).add(fn);
  return () => handlers.get(type).delete(fn);
}

function dispatch(message) {
  const room = message.event_id ? rooms.get(`event:${message.event_id}`) : undefined;
  if (message.type === "seats.indexed" || message.type === "claims.indexed") {
    if (room && room.order) for (const plain of unindexed(message, room.order)) dispatch(plain);
    return;
  }
  if (room && (message.type === "seats.snapshot" || message.type === "seats")) {
    room.version = Math.max(room.version || 0, message.version);
  }
  for (const fn of handlers.get(message.type) || []) fn(message);
}

/** The messages an indexed one stands for, seats named by id again. */
function unindexed(message, order) {
  const { event_id } = message;
  if (message.type === "seats.indexed") {
    const changes = [];
    for (const [status, pairs] of Object.entries(message.changes)) {
      for (let n = 0; n + 1 < pairs.length; n += 2) {
        const seat_id = order[pairs[n]];
        if (seat_id) changes.push({ seat_id, status, version: message.version - pairs[n + 1] });
      }
    }
    return [{ type: "seats", event_id, version: message.version, changes }];
  }
  const ids = (indexes) => indexes.map((n) => order[n]).filter(Boolean);
  const out = [];
  if (message.claimed.length) out.push({ type: "seats.claimed", event_id, seat_ids: ids(message.claimed) });
  if (message.released.length) out.push({ type: "seats.released", event_id, seat_ids: ids(message.released) });
  return out;
}

function sendJson(message) {
  if (socket && socket.readyState === WebSocket.OPEN) socket.send(JSON.stringify(message));
}

function subscribeMessage(room) {
  const { version, order } = rooms.get(room);
  const message = { type: "subscribe", room };
  if (version) message.version = version;
  if (order) message.indexed = true;
  return message;
}

function connect() {
  if (socket || !wanted) return;
  const token = accessToken();
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const url = `${scheme}://${location.host}/ws${token ? `?token=${encodeURIComponent(token)}` : ""}`;
  setState("connecting");
  const ws = (socket = new WebSocket(url));
  ws.addEventListener("open", () => {
    backoff = 500;
    setState("live");
    for (const room of rooms.keys()) sendJson(subscribeMessage(room));
    pinger = setInterval(() => sendJson({ type: "ping" }), PING_EVERY);
  });
  ws.addEventListener("message", (event) => {
    let message;
    try {
      message = JSON.parse(event.data);
    } catch {
      return;
    }
    dispatch(message);
  });
  ws.addEventListener("close", async (event) => {
    clearInterval(pinger);
    socket = null;
    if (!wanted) return setState("offline");
    setState("reconnecting");
    if (event.code === 4401) await refresh();
    const wait = backoff * (0.5 + Math.random());
    backoff = Math.min(backoff * 2, 8000);
    setTimeout(connect, event.code === 4429 ? Math.max(wait, 5000) : wait);
  });
}

/**
 * Follow a room (``event:<id>``): its seat changes arrive as ``seats`` messages. ``version``:
 * the seat-map version the page already holds (from GET /events/{id}/seats), so that only
 * later changes are sent; ``order``: that seat map's seat ids, in its order (seats are then
 * named by index on the wire).
 */
export function join(room, version = 0, order = null) {
  wanted = true;
  if (!rooms.has(room)) {
    rooms.set(room, { version, order: order && order.length ? order : null });
    sendJson(subscribeMessage(room));
  }
  connect();
  return () => leave(room);
}

export function leave(room) {
  if (rooms.delete(room)) sendJson({ type: "unsubscribe", room });
}

/** Keep the socket open without a room (personal messages: queue position, booking result). */
export function start() {
  wanted = true;
  connect();
}

/** Drop the socket and connect again (a new session: other personal messages). */
function reconnect() {
  if (socket) socket.close(1000);
  else connect();
}

let lastUser;
onSession((u) => {
  const id = u ? u.id : null;
  if (id !== lastUser) {
    lastUser = id;
    if (wanted) reconnect();
  } else if (u && accessToken()) {
    sendJson({ type: "auth", token: accessToken() });
  }
});
