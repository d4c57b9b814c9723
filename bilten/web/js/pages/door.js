// The door: check tickets in by camera (QR) or by a typed/pasted code, for an event's organizer.
//
// With the network the server decides (POST /tickets/check-in). Without it the page decides
// alone: a code is base64url(ticket id ‖ event id ‖ Ed25519 signature of the first 32 bytes), so
// the event's public key, fetched when the page opens and kept in localStorage, tells a forged
// code from a real one. A ticket admitted offline is remembered on this device (a second scan
// here is caught) and queued; the queue is sent when the network is back. A ticket that was
// also admitted at another door meanwhile comes back as a conflict for a person to look at.
//
// The camera is read by the browser's BarcodeDetector where it has one, otherwise by the
// vendored jsQR (../../vendor/jsQR.js), loaded only then.

import { get, post, user } from "../api.js";
import { errorBlock, field, go, h, replace, toast, when } from "../dom.js";

const STORE = "bilten.door.";
const CODE_CHARS = 128; // 96 bytes in base64url, no padding
const SCAN_EVERY = 150; // ms between camera frames
const SYNC_EVERY = 15000; // ms between sync attempts while check-ins wait
const SAME_CODE_QUIET = 3000; // ms a code must be out of view before the camera reads it again
const UUID = /[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}/i;

// ---- codes and keys ----------------------------------------------------------------------

function unb64(text) {
  if (!/^[A-Za-z0-9_-]*$/.test(text)) return null;
  try {
    const binary = atob(text.replace(/-/g, "+").replace(/_/g, "/") + "===".slice((text.length + 3) % 4));
    return Uint8Array.from(binary, (c) => c.charCodeAt(0));
  } catch {
    return null;
  }
}

function uuidOf(bytes) {
  const x = Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  return `${x.slice(0, 8)}-${x.slice(8, 12)}-${x.slice(12, 16)}-${x.slice(16, 20)}-${x.slice(20)}`;
}

/** The parts of a well-formed code (its signature not yet checked), else null. */
export function parseCode(code) {
  if (code.length !== CODE_CHARS) return null;
  const raw = unb64(code);
  if (!raw || raw.length !== 96) return null;
  return {
    ticketId: uuidOf(raw.subarray(0, 16)),
    eventId: uuidOf(raw.subarray(16, 32)),
    message: raw.slice(0, 32),
    signature: raw.slice(32),
  };
}

/** The event's verification key for WebCrypto; throws where the browser has no Ed25519. */
async function importKey(publicKey) {
  if (!globalThis.crypto || !crypto.subtle) throw new Error("no WebCrypto (it needs an https page)");
  const raw = unb64(publicKey);
  if (!raw || raw.length !== 32) throw new Error("the event's key is malformed");
  return crypto.subtle.importKey("raw", raw, { name: "Ed25519" }, false, ["verify"]);
}

function signed(key, parsed) {
  return crypto.subtle.verify({ name: "Ed25519" }, key, parsed.signature, parsed.message);
}

// ---- QR decoding -------------------------------------------------------------------------

let jsQRLoading = null;

/** The vendored jsQR, added to the page as a classic script the first time it is needed. */
export function loadJsQR() {
  if (typeof window.jsQR === "function") return Promise.resolve(window.jsQR);
  if (!jsQRLoading) {
    jsQRLoading = new Promise((resolve, reject) => {
      const script = document.createElement("script");
      script.src = new URL("../../vendor/jsQR.js", import.meta.url).href;
      script.async = true;
      script.addEventListener("load", () =>
        typeof window.jsQR === "function" ? resolve(window.jsQR) : reject(new Error("The QR decoder did not start.")),
      );
      script.addEventListener("error", () => {
        jsQRLoading = null;
        script.remove();
        reject(new Error("The QR decoder could not be loaded."));
      });
      document.head.append(script);
    });
  }
  return jsQRLoading;
}

let nativeDetector;

async function detector() {
  if (nativeDetector === undefined) {
    nativeDetector = null;
    if ("BarcodeDetector" in window) {
      try {
        const formats = await window.BarcodeDetector.getSupportedFormats();
        if (formats.includes("qr_code")) nativeDetector = new window.BarcodeDetector({ formats: ["qr_code"] });
      } catch {}
    }
  }
  return nativeDetector;
}

/**
 * The text of the QR code drawn on ``canvas``, or null. The browser's BarcodeDetector where it
 * has one (unless ``vendored``), else jsQR.
 */
export async function decode(canvas, { vendored = false } = {}) {
  const native = vendored ? null : await detector();
  if (native) {
    const found = await native.detect(canvas);
    return found.length ? found[0].rawValue : null;
  }
  const jsQR = await loadJsQR();
  const image = canvas.getContext("2d", { willReadFrequently: true }).getImageData(0, 0, canvas.width, canvas.height);
  const found = jsQR(image.data, image.width, image.height, { inversionAttempts: "dontInvert" });
  return found ? found.data : null;
}

// ---- what this device keeps --------------------------------------------------------------

function load(name, fallback) {
  try {
    const value = JSON.parse(localStorage.getItem(STORE + name));
    return value ?? fallback;
  } catch {
    return fallback;
  }
}

function save(name, value) {
  try {
    localStorage.setItem(STORE + name, JSON.stringify(value));
  } catch {
    toast("This device's storage is full: offline check-ins cannot be kept.", "error");
  }
}

// The queue and the conflicts are shared by every event's door page, so any open door page
// sends what is waiting; what was seen is kept per event.
const queued = () => load("queue", []);
const conflicts = () => load("conflicts", []);

// ---- small views -------------------------------------------------------------------------

function moment(iso) {
  const d = new Date(iso);
  if (Number.isNaN(d.getTime())) return h("span", {}, "an unknown time");
  const today = d.toDateString() === new Date().toDateString();
  const text = d.toLocaleString(undefined, today ? { timeStyle: "medium" } : { dateStyle: "medium", timeStyle: "medium" });
  return h("time", { datetime: iso }, text);
}

const short = (ticketId) => `Ticket …${ticketId.slice(-8)}`;

function plural(n, one, many) {
  return `${n} ${n === 1 ? one : many}`;
}

// ---- the pages ---------------------------------------------------------------------------

export async function render(root, params) {
  const me = user();
  if (!me) {
    replace(
      root,
      h("h1", {}, "Door"),
      h("p", {}, "Sign in as the event's organizer to check tickets in. ", h("a", { href: "#/signin" }, "Sign in")),
    );
    return;
  }
  if (me.role !== "organizer" && me.role !== "admin") {
    replace(
      root,
      h("h1", {}, "Door"),
      h(
        "div",
        { class: "error", role: "alert" },
        "The door page is for organizers: only an event's organizer (or an admin) can check its tickets in.",
      ),
      h("p", {}, h("a", { href: "#/tickets" }, "See my tickets")),
    );
    return;
  }
  return params.id ? door(root, params.id.toLowerCase()) : picker(root);
}

async function myEvents() {
  try {
    return { items: (await get("/users/me/events?limit=100")).items, all: false };
  } catch (error) {
    if (error.status !== 404 && error.status !== 405) throw error;
  }
  return { items: (await get("/events?limit=100")).items, all: true };
}

async function picker(root) {
  const list = h("div", { class: "door-events" }, h("p", { class: "muted" }, "Loading your events…"));
  const input = h("input", { name: "event", autocomplete: "off", spellcheck: "false", required: true });
  const problem = h("div");
  const form = h(
    "form",
    {
      class: "card door-pick",
      onsubmit: (e) => {
        e.preventDefault();
        const found = UUID.exec(input.value);
        if (!found) {
          replace(problem, errorBlock({ message: "That is not an event id (36 characters, with dashes) or a link to an event." }));
          return;
        }
        go(`/door/${found[0].toLowerCase()}`);
      },
    },
    field("Event id or link", input, "Paste it from the organizer page or the event's address."),
    h("button", { type: "submit" }, "Open the door"),
    problem,
  );
  replace(
    root,
    h(
      "div",
      { class: "door" },
      h("h1", {}, "Door"),
      h("p", { class: "muted" }, "Choose the event to check tickets in for."),
      list,
      form,
    ),
  );
  try {
    const { items, all } = await myEvents();
    replace(
      list,
      items.length
        ? h(
            "ul",
            { class: "door-event-list" },
            items.map((event) =>
              h(
                "li",
                {},
                h(
                  "a",
                  { class: "door-event", href: `#/door/${event.id}` },
                  h("strong", {}, event.title),
                  h(
                    "span",
                    { class: "muted" },
                    event.starts_at ? when(event.starts_at) : "",
                    event.status ? [" ", h("span", { class: `badge ${event.status}` }, event.status)] : null,
                  ),
                ),
              ),
            ),
          )
        : h("p", { class: "muted" }, all ? "No published events." : "You have no events yet."),
      all && items.length ? h("p", { class: "muted" }, "All published events; yours are among them.") : null,
    );
  } catch (error) {
    replace(list, errorBlock(error));
  }
}

function door(root, eventId) {
  let stopped = false;
  let key = null; // CryptoKey for offline checks
  let offlineProblem = "The event's key is not on this device yet.";
  let reachable = true; // the last request got an answer
  let syncing = false;
  let chain = Promise.resolve();
  let audio = null;
  let stream = null;
  let scanTimer = null;
  let lastCode = null;
  let lastSeen = 0;
  const canvas = document.createElement("canvas");

  // ---- the view ----
  const title = h("h1", {}, "Door");
  const net = h("span", { class: "door-net" });
  const waiting = h("span", { class: "door-waiting" });
  const syncButton = h("button", { type: "button", class: "link", onclick: () => sync(true) }, "Sync now");
  const offlineNote = h("p", { class: "door-offline muted" }, "Fetching the event's key…");
  const verdict = h("span", { class: "door-verdict" }, "Ready");
  const detail = h("span", { class: "door-detail" }, "Scan a ticket or type its code.");
  const result = h(
    "div",
    { class: "door-result", dataset: { kind: "idle" }, role: "status", "aria-live": "assertive", "aria-atomic": "true" },
    verdict,
    detail,
  );
  const input = h("input", {
    name: "code",
    autocomplete: "off",
    autocapitalize: "off",
    spellcheck: "false",
    enterkeyhint: "go",
    class: "door-input",
  });
  const form = h(
    "form",
    {
      class: "door-code",
      onsubmit: (e) => {
        e.preventDefault();
        wake();
        const code = input.value;
        input.value = "";
        enqueueCheck(code).then(() => input.focus({ preventScroll: true }));
      },
    },
    field("Ticket code", input),
    h("button", { type: "submit" }, "Check"),
    h("small", { id: "door-code-hint", class: "muted" }, "Type, paste, or use a scanner that types the code and Enter."),
  );
  input.setAttribute("aria-describedby", "door-code-hint");
  const video = h("video", { class: "door-video", playsinline: true, muted: true, hidden: true });
  video.muted = true;
  const startButton = h("button", { type: "button", onclick: () => startCamera() }, "Start camera");
  const stopButton = h("button", { type: "button", class: "secondary", hidden: true, onclick: () => stopCamera() }, "Stop camera");
  const cameraNote = h("p", { class: "muted door-camera-note" });
  const conflictBox = h("section", { class: "door-conflicts", hidden: true, "aria-labelledby": "door-conflicts-h" });
  const recentList = h("ol", { class: "door-recent" });

  if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
    startButton.disabled = true;
    cameraNote.textContent = "No camera on this page (the camera needs an https address): type or paste codes.";
  }

  replace(
    root,
    h(
      "div",
      { class: "door", dataset: { event: eventId } },
      title,
      h("p", { class: "door-bar" }, net, " · ", waiting, " ", syncButton),
      result,
      form,
      h("div", { class: "door-camera" }, video, h("div", { class: "row" }, startButton, stopButton), cameraNote),
      offlineNote,
      conflictBox,
      h("details", { class: "door-history" }, h("summary", {}, "Recent scans"), recentList),
      h("p", {}, h("a", { href: "#/door" }, "Another event")),
    ),
  );

  // ---- status line ----
  function drawStatus() {
    const online = navigator.onLine && reachable;
    net.dataset.state = online ? "online" : "offline";
    net.textContent = online ? "Online" : navigator.onLine ? "Server unreachable" : "Offline";
    const n = queued().length;
    waiting.dataset.count = String(n);
    waiting.textContent = `${plural(n, "check-in", "check-ins")} waiting to sync`;
    syncButton.hidden = n === 0;
    drawConflicts();
  }

  function drawConflicts() {
    const mine = conflicts().filter((c) => c.event_id === eventId);
    conflictBox.hidden = mine.length === 0;
    replace(
      conflictBox,
      h("h2", { id: "door-conflicts-h" }, `Conflicts to look at (${mine.length})`),
      h(
        "p",
        { class: "muted" },
        "These tickets were let in while offline, but the server refused them when the check-ins were sent.",
      ),
      h(
        "ul",
        {},
        mine.map((c) =>
          h(
            "li",
            { dataset: { ticket: c.ticket_id, reason: c.reason } },
            h("strong", {}, short(c.ticket_id)),
            ": let in offline at ",
            moment(c.scanned_at),
            c.reason === "already_checked_in"
              ? [" — already checked in at ", c.first ? moment(c.first) : "an unknown time", " elsewhere."]
              : [` — ${c.message}`],
          ),
        ),
      ),
      h(
        "button",
        {
          type: "button",
          class: "secondary",
          onclick: () => {
            save("conflicts", conflicts().filter((c) => c.event_id !== eventId));
            drawConflicts();
          },
        },
        "Clear the list",
      ),
    );
  }

  // ---- showing a result ----
  function wake() {
    // Sound may only start from a tap or key press; later beeps reuse this context.
    if (audio || !(navigator.userActivation && navigator.userActivation.isActive)) return;
    try {
      audio = new AudioContext();
    } catch {}
  }

  function signal(kind) {
    try {
      if (navigator.vibrate && navigator.userActivation && navigator.userActivation.hasBeenActive) {
        navigator.vibrate(kind === "valid" ? 80 : [120, 80, 120]);
      }
      if (!audio) return;
      const tone = audio.createOscillator();
      const gain = audio.createGain();
      tone.frequency.value = { valid: 880, already: 520 }[kind] || 220;
      gain.gain.value = 0.08;
      tone.connect(gain).connect(audio.destination);
      tone.start();
      tone.stop(audio.currentTime + (kind === "valid" ? 0.12 : 0.3));
    } catch {}
  }

  function show(kind, headline, ...lines) {
    result.dataset.kind = kind;
    verdict.textContent = headline;
    replace(detail, lines);
    result.classList.remove("fresh");
    void result.offsetWidth; // restart the flash animation
    result.classList.add("fresh");
    signal(kind);
    recentList.prepend(
      h("li", { dataset: { kind } }, new Date().toLocaleTimeString(), " ", h("strong", {}, headline), " ", detail.textContent),
    );
    while (recentList.children.length > 10) recentList.lastChild.remove();
  }

  // ---- checking ----
  function seen() {
    return load(`seen.${eventId}`, {});
  }

  function remember(ticketId, at) {
    const all = seen();
    if (!all[ticketId]) {
      all[ticketId] = at;
      save(`seen.${eventId}`, all);
    }
  }

  function enqueueCheck(code) {
    chain = chain.then(() => check(code)).catch((error) => show("error", "NOT CHECKED", error.message));
    return chain;
  }

  async function check(raw) {
    const code = raw.replace(/\s+/g, "");
    if (!code) return;
    const parsed = parseCode(code);
    if (!parsed) return show("invalid", "INVALID", "Not a ticket code.");
    if (parsed.eventId !== eventId) return show("invalid", "INVALID", "This ticket is for another event.");
    const waitingHere = queued().find((q) => q.ticket_id === parsed.ticketId);
    if (waitingHere) {
      return show("already", "ALREADY SCANNED HERE", "Let in at ", moment(waitingHere.scanned_at), " on this device (not synced yet).");
    }
    if (!navigator.onLine) return checkOffline(code, parsed);
    let answer;
    try {
      answer = await post("/tickets/check-in", { code });
    } catch (error) {
      if (error.code === "network" || error.status >= 500 || error.status === 429) {
        reachable = false;
        drawStatus();
        return checkOffline(code, parsed);
      }
      reachable = true;
      drawStatus();
      if (error.code === "already_checked_in") {
        const first = error.details && error.details.checked_in_at;
        if (first) remember(parsed.ticketId, first);
        return show("already", "ALREADY CHECKED IN", "First check-in: ", first ? moment(first) : "time unknown", ".");
      }
      if (error.status === 404) return show("invalid", "INVALID", "Forged, altered, void or unknown ticket.");
      if (error.status === 403) return show("error", "NOT ALLOWED", error.message);
      if (error.status === 401) return show("error", "SIGNED OUT", "Sign in again to check tickets in.");
      return show("error", "NOT CHECKED", error.message);
    }
    reachable = true;
    remember(parsed.ticketId, answer.checked_in_at);
    drawStatus();
    sync();
    return show("valid", "VALID", answer.ticket.label);
  }

  async function checkOffline(code, parsed) {
    if (!key) return show("error", "CANNOT CHECK OFFLINE", offlineProblem);
    if (!(await signed(key, parsed))) return show("invalid", "INVALID", "The code's signature is wrong: forged or altered.");
    const first = seen()[parsed.ticketId];
    if (first) return show("already", "ALREADY SCANNED HERE", "First scanned at ", moment(first), " on this device.");
    const now = new Date().toISOString();
    remember(parsed.ticketId, now);
    save("queue", [...queued(), { code, event_id: eventId, ticket_id: parsed.ticketId, scanned_at: now }]);
    drawStatus();
    return show("valid", "VALID (offline)", `${short(parsed.ticketId)} — sent to the server when the network is back.`);
  }

  // ---- sending what waits ----
  async function sync(asked = false) {
    if (syncing || stopped || !navigator.onLine) return;
    if (!queued().length) return;
    syncing = true;
    let refused = 0;
    try {
      for (const entry of queued()) {
        let outcome = null;
        try {
          await post("/tickets/check-in", { code: entry.code });
          reachable = true;
        } catch (error) {
          if (error.code === "network" || error.status >= 500 || error.status === 429 || error.status === 401) {
            reachable = error.code !== "network" && error.status < 500;
            if (asked) toast(`Not synced yet: ${error.message}`, "error");
            break;
          }
          reachable = true;
          outcome = {
            ...entry,
            reason: error.code,
            message: error.message,
            first: error.details ? error.details.checked_in_at || null : null,
          };
        }
        save("queue", queued().filter((q) => q.code !== entry.code));
        if (outcome) {
          refused += 1;
          save("conflicts", [...conflicts(), outcome]);
        }
        drawStatus();
      }
    } finally {
      syncing = false;
      if (!stopped) drawStatus();
    }
    if (refused) toast(`${plural(refused, "check-in was", "check-ins were")} refused by the server: see the conflicts.`, "error");
  }

  // ---- the camera ----
  function frame() {
    const w = video.videoWidth;
    const hgt = video.videoHeight;
    const scale = Math.min(1, 800 / Math.max(w, hgt));
    canvas.width = Math.round(w * scale);
    canvas.height = Math.round(hgt * scale);
    canvas.getContext("2d", { willReadFrequently: true }).drawImage(video, 0, 0, canvas.width, canvas.height);
    return canvas;
  }

  let reading = false;
  async function scan() {
    if (reading || !stream || !video.videoWidth) return;
    reading = true;
    try {
      const code = await decode(frame());
      if (!code) return;
      const quiet = Date.now() - lastSeen > SAME_CODE_QUIET;
      lastSeen = Date.now();
      if (code === lastCode && !quiet) return;
      lastCode = code;
      await enqueueCheck(code);
    } catch {
      // A frame that cannot be read is skipped; the next one is ~150 ms away.
    } finally {
      reading = false;
    }
  }

  async function startCamera() {
    wake();
    startButton.disabled = true;
    cameraNote.textContent = "Starting the camera…";
    try {
      const found = await navigator.mediaDevices.getUserMedia({ video: { facingMode: { ideal: "environment" } }, audio: false });
      if (stopped) return found.getTracks().forEach((t) => t.stop());
      stream = found;
      if (!(await detector())) await loadJsQR();
    } catch (error) {
      stopCamera();
      cameraNote.textContent =
        error.name === "NotAllowedError"
          ? "The camera was not allowed: allow it in the browser's settings for this site, or type codes."
          : error.name === "NotFoundError"
            ? "No camera found: type or paste codes."
            : `The camera could not start: ${error.message}`;
      return;
    }
    video.srcObject = stream;
    video.hidden = false;
    await video.play().catch(() => {});
    startButton.hidden = true;
    stopButton.hidden = false;
    cameraNote.textContent = "Hold a ticket's QR code in front of the camera.";
    scanTimer = setInterval(scan, SCAN_EVERY);
  }

  function stopCamera() {
    clearInterval(scanTimer);
    scanTimer = null;
    if (stream) stream.getTracks().forEach((t) => t.stop());
    stream = null;
    video.srcObject = null;
    video.hidden = true;
    startButton.hidden = false;
    startButton.disabled = !navigator.mediaDevices || !navigator.mediaDevices.getUserMedia;
    stopButton.hidden = true;
    cameraNote.textContent = "";
  }

  // ---- the event's key ----
  async function adoptKey(saved) {
    try {
      key = await importKey(saved.public_key);
      offlineNote.dataset.state = "ready";
      offlineNote.textContent = "Offline checks ready: the event's key is on this device.";
    } catch (error) {
      key = null;
      offlineNote.dataset.state = "unsupported";
      offlineProblem = `Offline checks are not possible on this browser (${error.message || "no Ed25519 in WebCrypto"}).`;
      offlineNote.textContent = offlineProblem;
    }
  }

  async function fetchKey() {
    const cached = load(`key.${eventId}`, null);
    if (cached) {
      if (cached.title) title.textContent = `Door · ${cached.title}`;
      await adoptKey(cached);
    }
    try {
      const [ticketKey, event] = await Promise.all([
        get(`/events/${eventId}/ticket-key`),
        get(`/events/${eventId}`).catch(() => null),
      ]);
      if (stopped) return;
      const saved = {
        public_key: ticketKey.public_key,
        title: event ? event.title : cached && cached.title,
        fetched_at: new Date().toISOString(),
      };
      save(`key.${eventId}`, saved);
      if (saved.title) title.textContent = `Door · ${saved.title}`;
      if (!cached || cached.public_key !== saved.public_key || !key) await adoptKey(saved);
    } catch (error) {
      if (stopped) return;
      if (error.status === 404) {
        replace(
          root,
          h(
            "div",
            { class: "door" },
            h("h1", {}, "Door"),
            errorBlock({ message: "No published event with this id: a draft has no tickets to check." }),
            h("p", {}, h("a", { href: "#/door" }, "Choose another event")),
          ),
        );
        stop();
        return;
      }
      if (!cached) {
        offlineNote.dataset.state = "missing";
        offlineProblem = `The event's key could not be fetched (${error.message}); offline checks are not possible until it is.`;
        offlineNote.textContent = offlineProblem;
      }
    }
  }

  // ---- life ----
  const onOnline = () => {
    reachable = true;
    drawStatus();
    sync();
  };
  const onOffline = () => drawStatus();
  window.addEventListener("online", onOnline);
  window.addEventListener("offline", onOffline);
  const syncTimer = setInterval(sync, SYNC_EVERY);

  function stop() {
    stopped = true;
    clearInterval(syncTimer);
    window.removeEventListener("online", onOnline);
    window.removeEventListener("offline", onOffline);
    stopCamera();
    if (audio) audio.close().catch(() => {});
  }

  drawStatus();
  fetchKey().then(() => sync());
  // A keyboard scanner types into the focused field; on a touch screen a focused field would
  // only bring up the keyboard over the camera.
  if (matchMedia("(pointer: fine)").matches) setTimeout(() => input.focus({ preventScroll: true }), 0);
  return stop;
}
