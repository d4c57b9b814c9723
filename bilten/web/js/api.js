// The API client: JSON in and out, the bearer token attached, errors in the API's one shape.
//
// The access token lives in memory only. The refresh token is kept in sessionStorage, so that a
// reload of the tab keeps its session while another tab or a closed browser does not; it is
// single-use, so only one refresh runs at a time (a second use would revoke the session).

const REFRESH_KEY = "bilten.refresh";

export class ApiError extends Error {
  constructor(status, code, message, details = {}) {
    super(message);
    this.status = status;
    this.code = code;
    this.details = details;
  }
}

const session = { access: null, user: null, timer: null, refreshing: null };
const listeners = new Set();

export function user() {
  return session.user;
}

export function accessToken() {
  return session.access;
}

/** Call ``fn(user)`` on every sign-in, sign-out and token refresh. */
export function onSession(fn) {
  listeners.add(fn);
  return () => listeners.delete(fn);
}

function announce() {
  for (const fn of listeners) fn(session.user);
}

async function adopt(tokens) {
  session.access = tokens.access_token;
  sessionStorage.setItem(REFRESH_KEY, tokens.refresh_token);
  if (tokens.user) session.user = tokens.user;
  clearTimeout(session.timer);
  // Renew a little before expiry, so the WebSocket can re-authenticate in place.
  const lead = Math.max(5, Math.min(60, tokens.expires_in / 5));
  session.timer = setTimeout(() => refresh().catch(() => {}), (tokens.expires_in - lead) * 1000);
  if (!tokens.user) session.user = await request("GET", "/auth/me");
  announce();
}

function forget() {
  clearTimeout(session.timer);
  session.access = null;
  session.user = null;
  sessionStorage.removeItem(REFRESH_KEY);
  announce();
}

/** A new token pair from the stored refresh token; false when there is none or it is spent. */
export function refresh() {
  if (!session.refreshing) {
    session.refreshing = (async () => {
      const token = sessionStorage.getItem(REFRESH_KEY);
      if (!token) return false;
      try {
        await adopt(await request("POST", "/auth/refresh", { body: { refresh_token: token }, auth: false }));
        return true;
      } catch (error) {
        if (error.status === 401) forget();
        return false;
      }
    })().finally(() => {
      session.refreshing = null;
    });
  }
  return session.refreshing;
}

export async function signIn(email, password) {
  await adopt(await request("POST", "/auth/login", { body: { email, password }, auth: false }));
}

export async function signUp(fields) {
  await adopt(await request("POST", "/auth/register", { body: fields, auth: false }));
}

export async function signOut() {
  const token = sessionStorage.getItem(REFRESH_KEY);
  if (token) await request("POST", "/auth/logout", { body: { refresh_token: token } }).catch(() => {});
  forget();
}

/** On page load: the session of this tab, if it has one. */
export async function restore() {
  if (sessionStorage.getItem(REFRESH_KEY)) await refresh();
}

async function send(method, path, { body, headers = {}, form, auth = true }) {
  const init = { method, headers: { Accept: "application/json", ...headers } };
  if (auth && session.access) init.headers.Authorization = `Bearer ${session.access}`;
  if (form) {
    init.body = form;
  } else if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  try {
    return await fetch(path, init);
  } catch {
    throw new ApiError(0, "network", "The server cannot be reached. Check the connection and try again.");
  }
}

async function errorOf(response) {
  let body = null;
  try {
    body = await response.json();
  } catch {}
  const e = body && body.error;
  if (e && e.code) return new ApiError(response.status, e.code, e.message, e.details || {});
  return new ApiError(response.status, "http_" + response.status, `The server answered ${response.status}.`);
}

/**
 * One API call. Resolves to the parsed body (null for 204); rejects with an ApiError. A 401 on
 * an authenticated call is retried once after a refresh.
 */
export async function request(method, path, options = {}) {
  let response = await send(method, path, options);
  if (response.status === 401 && options.auth !== false && session.access && (await refresh())) {
    response = await send(method, path, options);
  }
  if (response.status === 204) return null;
  if (!response.ok && response.status !== 202) throw await errorOf(response);
  const text = await response.text();
  const data = text ? JSON.parse(text) : null;
  if (data && typeof data === "object" && options.withStatus) data.__status = response.status;
  return data;
}

export const get = (path) => request("GET", path);
export const post = (path, body, headers) => request("POST", path, { body, headers });
export const patch = (path, body) => request("PATCH", path, { body });
export const del = (path) => request("DELETE", path);

/** A protected image (a ticket's QR code) as an object URL for an <img>. */
export async function imageUrl(path) {
  let response = await send("GET", path, {});
  if (response.status === 401 && (await refresh())) response = await send("GET", path, {});
  if (!response.ok) throw await errorOf(response);
  return URL.createObjectURL(await response.blob());
}

/** A query string from an object, leaving out empty values. */
export function query(params) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) if (v !== undefined && v !== null && v !== "") q.set(k, v);
  const text = q.toString();
  return text ? `?${text}` : "";
}
