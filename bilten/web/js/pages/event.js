// An event: its live seat map, the basket, the hold's countdown, payment, the queue position
// and the result, without a reload.
//
// Steps: choose seats (or a general-admission quantity) → hold (POST /holds) → pay
// (POST /bookings with an Idempotency-Key) → queued (live position from queue.position and
// queue.served) → booking.result (confirmed: the tickets and their QR codes). The request's
// status is also read over HTTP every few seconds, in case the socket misses a message.

import { ApiError, del, get, imageUrl, post, request, user } from "../api.js";
import { errorBlock, field, h, money, replace, toast, when } from "../dom.js";
import { join, on, onState, start } from "../live.js";
import { SeatMap } from "../seatmap.js";

const CARDS = [
  ["tok_visa", "Visa 4242 (succeeds)"],
  ["tok_chargeDeclined", "Card declined"],
  ["tok_insufficientFunds", "Insufficient funds"],
];
const POLL = 3000;

function key() {
  if (crypto.randomUUID) return crypto.randomUUID();
  const b = crypto.getRandomValues(new Uint8Array(16));
  return [...b].map((x) => x.toString(16).padStart(2, "0")).join("");
}

export async function render(root, { id }) {
  const stops = [];
  const event = await get(`/events/${id}`);
  const seatMap = await get(`/events/${id}/seats`);
  const picked = new Map(); // seat id -> seat
  let version = seatMap.version;
  let hold = null; // the hold once made
  let pending = null; // {request_id, ticket}
  let timer = null;

  const basket = h("section", { class: "card basket", "aria-labelledby": "basket-title" });
  const map = seatMap.seats.length
    ? new SeatMap({
        seats: seatMap.seats,
        currency: event.currency,
        label: `Seat map of ${event.title}`,
        isSelected: (sid) => picked.has(sid),
        onToggle: (seat) => {
          if (hold || pending) return toast("Release your hold to change seats.");
          if (picked.has(seat.id)) picked.delete(seat.id);
          else if (map.status(seat.id) !== "available") return toast(`${seat.label} is ${map.status(seat.id)}.`);
          else if (picked.size >= event.max_tickets_per_order) return toast(`At most ${event.max_tickets_per_order} tickets per order.`);
          else picked.set(seat.id, seat);
          map.mark(seat.id, picked.has(seat.id));
          draw();
        },
      })
    : null;

  // Live seat changes: each seat's change applied if newer than what the map shows of it (a
  // change may commit after a later one); a snapshot (after a reconnect) replaces all.
  stops.push(
    on("seats", (m) => {
      if (m.event_id !== id) return;
      version = Math.max(version, m.version);
      const applied = map ? map.apply(m.changes) : [];
      let lost = false;
      for (const c of applied) {
        if (!hold && !pending && picked.has(c.seat_id) && c.status !== "available") {
          picked.delete(c.seat_id);
          map.mark(c.seat_id, false);
          lost = true;
        }
      }
      if (lost) {
        toast("A seat you chose was just taken by someone else.");
        draw();
      }
    }),
    // Seats claimed by queued bookings show held until they sell or come back; news missed
    // while the socket was down (a release, say) is not replayed, so a gap forgets them all.
    onState((state) => {
      if (state !== "live" && map) map.forgetClaims();
    }),
    on("seats.claimed", (m) => {
      if (m.event_id === id && map) map.claim(m.seat_ids, true);
    }),
    on("seats.released", (m) => {
      if (m.event_id === id && map) map.claim(m.seat_ids, false);
    }),
    on("seats.snapshot", (m) => {
      if (m.event_id !== id || !map) return;
      version = m.version;
      map.load(m.seats);
    }),
    on("queue.position", (m) => {
      if (pending && m.request_id === pending.request_id) {
        pending.ticket = m.ticket;
        pending.position = m.position;
        draw();
      }
    }),
    on("queue.served", (m) => {
      if (pending && m.event_id === id && pending.ticket) {
        pending.position = Math.max(0, pending.ticket - m.served);
        draw();
      }
    }),
    on("booking.result", (m) => {
      if (pending && m.request_id === pending.request_id) finish(m);
    }),
  );
  stops.push(join(`event:${id}`, version, seatMap.seats.map((seat) => seat.id)));
  start();

  function total() {
    let sum = 0;
    for (const seat of picked.values()) sum += seat.price_cents || 0;
    const ga = gaChoice();
    if (ga) sum += ga.type.price_cents * ga.quantity;
    return sum;
  }

  const gaType = event.ticket_types.length
    ? h("select", { name: "ticket_type" }, event.ticket_types.map((t) =>
        h("option", { value: t.id, disabled: t.remaining <= 0 }, `${t.name} — ${money(t.price_cents, event.currency)} (${t.remaining} left)`)))
    : null;
  const gaQty = h("input", { type: "number", name: "quantity", min: 0, max: event.max_tickets_per_order, value: 0, inputmode: "numeric" });
  gaQty.addEventListener("input", () => draw());
  gaType && gaType.addEventListener("change", () => draw());

  function gaChoice() {
    const quantity = Number(gaQty.value) || 0;
    if (!gaType || quantity <= 0) return null;
    return { type: event.ticket_types.find((t) => t.id === gaType.value), quantity };
  }

  function countdown() {
    const node = basket.querySelector(".countdown");
    if (!hold || !node) return;
    const left = Math.max(0, Math.round((Date.parse(hold.expires_at) - Date.now()) / 1000));
    node.textContent = `${Math.floor(left / 60)}:${String(left % 60).padStart(2, "0")}`;
    node.classList.toggle("low", left < 60);
    if (left === 0 && !pending) {
      toast("Your hold ran out; the seats are free again.", "error");
      reset();
    }
  }

  function reset() {
    clearInterval(timer);
    timer = null;
    for (const sid of picked.keys()) map && map.mark(sid, false);
    picked.clear();
    hold = null;
    pending = null;
    draw();
  }

  async function makeHold(button, problem) {
    if (!user()) {
      location.hash = `/signin?next=${encodeURIComponent(`/events/${id}`)}`;
      return;
    }
    button.disabled = true;
    const ga = gaChoice();
    const body = { event_id: id };
    if (picked.size) body.seat_ids = [...picked.keys()];
    else if (ga) Object.assign(body, { ticket_type_id: ga.type.id, quantity: ga.quantity });
    try {
      hold = await post("/holds", body);
      timer = setInterval(countdown, 1000);
      draw();
    } catch (error) {
      button.disabled = false;
      replace(problem, errorBlock(error));
      if (error.code === "seat_unavailable") {
        for (const sid of error.details.seat_ids || []) {
          picked.delete(sid);
          map && map.mark(sid, false);
        }
      }
    }
  }

  async function release() {
    const was = hold;
    reset();
    if (was) await del(`/holds/${was.id}`).catch((e) => toast(e.message, "error"));
  }

  async function pay(token, button, problem) {
    button.disabled = true;
    const attempt = (pending = { key: key(), request_id: null, ticket: null, position: null });
    const body = { event_id: id, hold_id: hold.id, payment: { method: "card", token } };
    try {
      const answer = await request("POST", "/bookings", { body, headers: { "Idempotency-Key": attempt.key } });
      attempt.request_id = answer.request_id;
      attempt.position = answer.position;
      draw();
      poll(attempt);
    } catch (error) {
      pending = null;
      button.disabled = false;
      replace(problem, errorBlock(error));
    }
  }

  async function poll(attempt) {
    while (pending === attempt) {
      await new Promise((r) => setTimeout(r, POLL));
      if (pending !== attempt) return;
      try {
        const status = await get(`/bookings/requests/${attempt.request_id}`);
        if (status.status === "confirmed" || status.status === "failed") {
          finish({ request_id: attempt.request_id, booking_id: status.booking_id, status: status.status, error: status.error });
        } else if (typeof status.position === "number") {
          attempt.position = status.position;
          draw();
        }
      } catch {}
    }
  }

  async function finish(result) {
    if (!pending || pending.request_id !== result.request_id || pending.done) return;
    pending.done = true;
    clearInterval(timer);
    if (result.status !== "confirmed") {
      const error = result.error || { code: "failed", message: "The booking failed." };
      pending = null;
      hold = null;
      for (const sid of picked.keys()) map && map.mark(sid, false);
      picked.clear();
      draw();
      basket.prepend(errorBlock(new ApiError(409, error.code, error.message, error.details || {})));
      return;
    }
    const booking = await get(`/bookings/${result.booking_id}`);
    for (const sid of picked.keys()) map && map.mark(sid, false);
    picked.clear();
    hold = null;
    pending = null;
    drawDone(booking);
  }

  function drawDone(booking) {
    const list = h("div", { class: "tickets" });
    replace(
      basket,
      h("h2", { id: "basket-title" }, "You have tickets"),
      h("p", { class: "notice", role: "status" }, `Booking confirmed: ${money(booking.total_cents, booking.currency)}.`),
      list,
      h("p", {}, h("a", { href: "#/tickets" }, "All my tickets"), " · ", h("a", { href: "#/bookings" }, "My bookings")),
      h("button", { type: "button", class: "secondary", onclick: () => draw() }, "Buy more"),
    );
    for (const ticket of booking.tickets) {
      const img = h("img", { alt: `QR code of ticket ${ticket.label}` });
      list.append(h("figure", { class: "ticket card" }, img, h("figcaption", {}, ticket.label)));
      imageUrl(`/tickets/${ticket.id}/qr.svg`).then((url) => (img.src = url)).catch(() => {});
    }
  }

  function draw() {
    const problem = h("div");
    const title = h("h2", { id: "basket-title" }, "Your order");
    if (pending && pending.request_id) {
      replace(
        basket,
        title,
        h("p", {}, "Your booking is in the queue."),
        h("p", { role: "status", "aria-live": "polite" }, "Position ", h("span", { class: "position" }, pending.position ?? "…")),
        h("p", { class: "muted" }, "Keep this page open: the result appears here."),
      );
      return;
    }
    if (hold) {
      const token = h("select", { name: "card" }, CARDS.map(([v, label]) => h("option", { value: v }, label)));
      const payButton = h("button", { type: "button" }, `Pay ${money(total(), event.currency)}`);
      payButton.addEventListener("click", () => pay(token.value, payButton, problem));
      replace(
        basket,
        title,
        h("p", {}, "Held for you for ", h("span", { class: "countdown", role: "timer" }, "…")),
        h("ul", {}, [...picked.values()].map((seat) => h("li", {}, seat.label)), hold.quantity && !picked.size ? h("li", {}, `${hold.quantity} × ${gaChoice()?.type.name || "ticket"}`) : null),
        field("Test card", token, "Test cards of the payment provider: no money moves."),
        problem,
        h("div", { class: "row" }, payButton, h("button", { type: "button", class: "secondary", onclick: release }, "Release")),
      );
      countdown();
      return;
    }
    const items = [...picked.values()];
    const holdButton = h("button", { type: "button", disabled: !items.length && !gaChoice() }, user() ? "Hold seats" : "Sign in to book");
    holdButton.addEventListener("click", () => makeHold(holdButton, problem));
    replace(
      basket,
      title,
      map ? h("p", { class: "muted" }, items.length ? null : "Choose seats on the map.") : null,
      items.length
        ? h("ul", {}, items.map((seat) => h("li", {}, `${seat.label} — ${money(seat.price_cents || 0, event.currency)}`)))
        : null,
      gaType && !items.length ? [h("h3", {}, "General admission"), field("Ticket type", gaType), field("Quantity", gaQty)] : null,
      h("p", {}, "Total ", h("strong", {}, money(total(), event.currency))),
      problem,
      holdButton,
    );
  }

  const header = h(
    "header",
    {},
    h("h1", {}, event.title),
    h("p", {}, `${when(event.starts_at)} · ${event.city}`, event.status !== "published" ? h("span", { class: `badge ${event.status}` }, event.status) : null),
    event.sale_starts_at && Date.parse(event.sale_starts_at) > Date.now()
      ? h("p", { class: "notice" }, `Sale starts ${when(event.sale_starts_at)}.`)
      : null,
  );
  replace(
    root,
    header,
    h("div", { class: "event-layout" }, map ? map.element : h("div", { class: "card" }, "General admission only."), basket),
    event.image_url ? h("img", { class: "event-image", src: event.image_url, alt: "" }) : null,
    h("h2", {}, "About"),
    h("p", {}, event.description),
  );
  draw();
  return () => {
    clearInterval(timer);
    for (const stop of stops) stop();
  };
}
