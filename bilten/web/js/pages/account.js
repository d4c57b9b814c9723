// My bookings (with cancellation where the rules allow) and my tickets (with their QR codes).

import { get, imageUrl, post, user } from "../api.js";
import { errorBlock, h, money, replace, toast, when } from "../dom.js";
import { on, start } from "../live.js";
import { paged } from "../paged.js";

const titles = new Map();
function eventTitle(id) {
  if (!titles.has(id)) titles.set(id, get(`/events/${id}`).then((e) => e.title, () => "An event"));
  return titles.get(id);
}

function bookingCard(booking) {
  const problem = h("div");
  const card = h("article", { class: "card booking", dataset: { id: booking.id } });
  const cancel = h("button", { type: "button", class: "danger" }, "Cancel booking");
  cancel.addEventListener("click", async () => {
    if (!confirm("Cancel this booking? The payment is refunded and the seats are released.")) return;
    cancel.disabled = true;
    try {
      const updated = await post(`/bookings/${booking.id}/cancel`);
      card.replaceWith(await bookingCard(updated));
      toast("Booking cancelled; the refund is on its way.");
    } catch (error) {
      cancel.disabled = false;
      replace(problem, errorBlock(error));
    }
  });
  return eventTitle(booking.event_id).then((title) =>
    replace(
      card,
      h("h2", {}, h("a", { href: `#/events/${booking.event_id}` }, title)),
      h(
        "p",
        {},
        h("span", { class: `badge ${booking.status}` }, booking.status),
        " ",
        `${money(booking.total_cents, booking.currency)} · booked ${when(booking.created_at)} · payment `,
        h("span", { class: `badge ${booking.payment.status}`, dataset: { role: "payment" } }, booking.payment.status),
      ),
      h("ul", {}, booking.items.map((item) => h("li", {}, `${item.label} — ${money(item.price_cents, booking.currency)}`))),
      booking.failure ? h("p", { class: "error" }, booking.failure.message) : null,
      problem,
      booking.status === "confirmed" ? cancel : null,
    ),
  );
}

function ticketCard(ticket) {
  const img = h("img", { alt: `QR code of ticket ${ticket.label}`, width: 220, height: 220 });
  imageUrl(`/tickets/${ticket.id}/qr.svg`).then((url) => (img.src = url)).catch(() => (img.alt = "QR code unavailable"));
  return eventTitle(ticket.event_id).then((title) =>
    h(
      "figure",
      { class: "card ticket", dataset: { id: ticket.id } },
      img,
      h(
        "figcaption",
        {},
        h("strong", {}, title),
        h("br"),
        ticket.label,
        " ",
        h("span", { class: `badge ${ticket.status}` }, ticket.status.replace("_", " ")),
        ticket.checked_in_at ? h("small", {}, ` at ${when(ticket.checked_in_at)}`) : null,
      ),
    ),
  );
}

export async function render(root, { mode }) {
  if (!user()) {
    replace(root, h("h1", {}, mode === "tickets" ? "My tickets" : "My bookings"), h("p", {}, h("a", { href: `#/signin?next=/${mode}` }, "Sign in"), " to see them."));
    return;
  }
  if (mode === "tickets") {
    const box = h("div");
    replace(root, h("h1", {}, "My tickets"), h("p", { class: "muted" }, "Show the QR code at the door."), box);
    await paged(box, "/tickets", ticketCard, "No tickets yet.", { className: "list tickets" });
    return;
  }
  const box = h("div");
  replace(root, h("h1", {}, "My bookings"), box);
  await paged(box, "/bookings", bookingCard, "No bookings yet.");
  // A refund's progress (refunding → refunded) shows without a reload.
  start();
  return on("payment.status", (m) => {
    const badge = root.querySelector(`[data-id="${m.booking_id}"] [data-role="payment"]`);
    if (badge) {
      badge.textContent = m.status;
      badge.className = `badge ${m.status}`;
    }
  });
}
