// The live connection (/ws): one socket per tab, shared by every page.
//
// Rooms are kept across reconnects: after a reconnect each room is subscribed again with the
// last seat-map version this tab holds, so the server sends only what was missed (or a fresh
// snapshot when it cannot). A refreshed access token is handed to the open socket (``auth``);
// a socket closed for an expired or revoked session (4401) reconnects once a token is fresh.

import { accessToken, onSession, refresh } from "./api.js";

const PING_EVERY = 20000;
const handlers = new Map(); // message type -> Set of functions
const rooms = new Map(); // room -> {version}
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
  if (message.type === "seats.snapshot" || message.type === "seats") {
    const room = rooms.get(`event:${message.event_id}`);
    if (room) room.version = Math.max(room.version || 0, message.version);
  }
  for (const fn of handlers.get(message.type) || []) fn(message);
}

function sendJson(message) {
  if (socket && socket.readyState === WebSocket.OPEN) socket.send(JSON.stringify(message));
}

function subscribeMessage(room) {
  const known = rooms.get(room).version;
  return known ? { type: "subscribe", room, version: known } : { type: "subscribe", room };
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
 * later changes are sent.
 */
export function join(room, version = 0) {
  wanted = true;
  if (!rooms.has(room)) {
    rooms.set(room, { version });
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
