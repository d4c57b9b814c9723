// One event, managed: publish, image, cancel, and its sales, which follow a sale live (read again
// after the seat changes of the event's room, at most once a second, and every few seconds).

import { get, post, request } from "../api.js";
import { errorBlock, field, h, money, replace, toast, when } from "../dom.js";
import { join, on } from "../live.js";
import { salesChart } from "./chart.js";

const STATS_EVERY = 5000; // ms: the stats are read again this often anyway
const STATS_AT_MOST = 1000; // ms: and, in a sale, no more often than this
const MAX_IMAGE = 5 * 1024 * 1024;

function statsTiles(stats) {
  const tile = (label, key, value) => h("div", {}, h("dt", {}, label), h("dd", { dataset: { stat: key } }, value));
  const refunds = stats.refunds || { count: 0, amount_cents: 0, pending: 0, dead: 0 };
  return h(
    "dl",
    { class: "org-stats" },
    tile("Tickets sold", "tickets_sold", String(stats.tickets_sold)),
    tile("Revenue", "revenue", money(stats.revenue_cents, stats.currency)),
    tile("Checked in", "checked_in", `${stats.checked_in} of ${stats.tickets_sold}`),
    refunds.count || refunds.pending || refunds.dead
      ? tile("Refunds", "refunds", `${refunds.count} done (${money(refunds.amount_cents, stats.currency)})${refunds.pending ? `, ${refunds.pending} pending` : ""}${refunds.dead ? `, ${refunds.dead} failed` : ""}`)
      : null,
  );
}

function byTier(stats) {
  if (!stats.by_tier.length) return null;
  return h(
    "table",
    { class: "org-tier-table" },
    h("caption", { class: "sr-only" }, "Sales by tier"),
    h("thead", {}, h("tr", {}, ["Tier", "Kind", "Tickets", "Revenue"].map((t) => h("th", { scope: "col" }, t)))),
    h(
      "tbody",
      {},
      stats.by_tier.map((t) =>
        h("tr", {}, h("td", {}, t.tier), h("td", {}, t.kind === "seated" ? "seated" : "general admission"), h("td", {}, String(t.tickets)), h("td", {}, money(t.revenue_cents, stats.currency))),
      ),
    ),
  );
}

export async function manage(root, id) {
  let event;
  try {
    event = await get(`/events/${id}`);
  } catch (error) {
    replace(root, h("p", {}, h("a", { href: "#/organizer" }, "← Organizer")), h("h1", {}, "Event"), errorBlock(error));
    return;
  }
  // Left while the event loaded: start nothing (the router has no cleanup to call yet).
  if (!location.hash.startsWith(`#/organizer/events/${id}`)) return;
  let stopped = false;
  const head = h("div");
  const actions = h("section", { class: "card", "aria-labelledby": "org-actions" });
  const image = h("section", { class: "card org-image", "aria-labelledby": "org-image" });
  const details = h("section", { class: "card", "aria-labelledby": "org-details" });
  const statsBody = h("div", { "aria-busy": "true" }, h("p", { class: "muted" }, "Loading the sales…"));
  const chartBox = h("div", { class: "org-chart-box" });
  let shown = null; // the stats drawn last, for a redraw at another width
  const updated = h("p", { class: "muted org-updated" });
  const stats = h("section", { class: "card org-sales", "aria-labelledby": "org-sales" }, h("h2", { id: "org-sales" }, "Sales"), statsBody, updated);

  function drawHead() {
    replace(
      head,
      h("p", {}, h("a", { href: "#/organizer" }, "← Organizer")),
      h("div", { class: "org-title-line" }, h("h1", {}, event.title), h("span", { class: `badge ${event.status}`, dataset: { status: event.status } }, event.status)),
      h("p", { class: "muted" }, `${when(event.starts_at)} – ${when(event.ends_at)} · ${event.city} · ${event.category}`),
      h(
        "p",
        { class: "org-actions" },
        h("a", { href: `#/events/${event.id}` }, "Public event page"),
        h("a", { href: `#/door/${event.id}` }, "Door check-in"),
      ),
    );
  }

  function drawActions() {
    const problem = h("div");
    const items = [h("h2", { id: "org-actions" }, "Status")];
    if (event.status === "draft") {
      const publish = h("button", { type: "button" }, "Publish");
      publish.addEventListener("click", async () => {
        publish.disabled = true;
        try {
          event = await post(`/events/${id}/publish`);
          toast("Published: the event is on sale.");
          drawAll();
          follow();
        } catch (error) {
          publish.disabled = false;
          replace(problem, errorBlock(error));
        }
      });
      items.push(h("p", {}, "A draft is seen only by you (and admins). Publishing lists it and opens the sale."), h("p", {}, publish));
    } else if (event.status === "published") {
      items.push(h("p", {}, event.sale_starts_at ? `Published; on sale from ${when(event.sale_starts_at)}.` : "Published and on sale."));
    } else {
      items.push(h("p", {}, `This event is ${event.status}.`));
    }
    if (event.status === "draft" || event.status === "published") {
      const ask = h("button", { type: "button", class: "danger", "aria-expanded": "false" }, "Cancel event…");
      const confirmBox = h("div", { class: "org-confirm", hidden: true, role: "group", "aria-label": "Confirm the cancellation" });
      const yes = h("button", { type: "button", class: "danger" }, "Yes, cancel the event");
      const no = h("button", { type: "button", class: "secondary" }, "Keep the event");
      replace(
        confirmBox,
        h("p", {}, h("strong", {}, "Cancel this event?"), " The sale stops at once and the event cannot be published again."),
        h("p", {}, "Every confirmed booking is refunded in full, to the card it was paid with, whatever its tickets' state (checked in or not). Refunds are sent within seconds and retried until the payment provider confirms them; their progress shows under Sales."),
        h("p", { class: "row" }, yes, no),
      );
      ask.addEventListener("click", () => {
        confirmBox.hidden = false;
        ask.setAttribute("aria-expanded", "true");
        no.focus();
      });
      no.addEventListener("click", () => {
        confirmBox.hidden = true;
        ask.setAttribute("aria-expanded", "false");
        ask.focus();
      });
      yes.addEventListener("click", async () => {
        yes.disabled = true;
        try {
          event = await post(`/events/${id}/cancel`);
          toast("Event cancelled; its bookings are being refunded.");
          drawAll();
          refreshStats();
        } catch (error) {
          yes.disabled = false;
          replace(problem, errorBlock(error));
        }
      });
      items.push(h("p", {}, ask), confirmBox);
    }
    items.push(problem);
    replace(actions, items);
  }

  function drawImage() {
    const problem = h("div");
    const file = h("input", { type: "file", name: "file", accept: "image/jpeg,image/png,image/webp", required: true });
    const send = h("button", { type: "submit" }, "Upload image");
    const form = h("form", { novalidate: true }, field("Event image", file, "JPEG, PNG or WebP, at most 5 MB; shown on the event's page."), problem, send);
    form.addEventListener("submit", async (e) => {
      e.preventDefault();
      const chosen = file.files && file.files[0];
      if (!chosen) return replace(problem, errorBlock({ code: "validation_error", message: "Choose an image file first." }));
      if (chosen.size > MAX_IMAGE) return replace(problem, errorBlock({ code: "payload_too_large", message: "The image is larger than 5 MB." }));
      const body = new FormData();
      body.append("file", chosen);
      send.disabled = true;
      replace(problem);
      try {
        const done = await request("POST", `/events/${id}/image`, { form: body });
        event = { ...event, image_url: done.image_url };
        toast("Image uploaded.");
        drawImage();
      } catch (error) {
        send.disabled = false;
        replace(problem, errorBlock(error));
      }
    });
    replace(
      image,
      h("h2", { id: "org-image" }, "Image"),
      event.image_url ? h("img", { src: event.image_url, alt: `The image of ${event.title}` }) : h("p", { class: "muted" }, "No image yet."),
      event.status === "draft" || event.status === "published" ? form : null,
    );
  }

  function drawDetails() {
    const tiers = event.price_tiers.map((t) => h("li", {}, `${t.name}: ${money(t.price_cents, event.currency)} — ${t.sections.join(", ")}`));
    const types = event.ticket_types.map((t) => h("li", {}, `${t.name}: ${money(t.price_cents, event.currency)} — ${t.remaining} of ${t.capacity} left`));
    replace(
      details,
      h("h2", { id: "org-details" }, "Details"),
      event.description ? h("p", { class: "org-description" }, event.description) : null,
      h(
        "dl",
        { class: "org-facts" },
        h("dt", {}, "Seats"),
        h("dd", {}, `${event.available_seats} of ${event.seat_count} available`),
        h("dt", {}, "Per order"),
        h("dd", {}, `at most ${event.max_tickets_per_order} tickets`),
        h("dt", {}, "Currency"),
        h("dd", {}, event.currency),
      ),
      tiers.length ? [h("h3", {}, "Price tiers"), h("ul", {}, tiers)] : null,
      types.length ? [h("h3", {}, "General admission"), h("ul", {}, types)] : null,
    );
  }

  function drawAll() {
    drawHead();
    drawActions();
    drawImage();
    drawDetails();
  }

  // The stats: read every few seconds, and soon after each seat change of the event's room, but
  // at most once a second however busy the sale.
  let last = 0;
  let reading = false;
  let again = false;
  let pending = null;
  async function refreshStats() {
    if (stopped) return;
    if (reading) {
      again = true;
      return;
    }
    reading = true;
    last = Date.now();
    try {
      const [found, fresh] = await Promise.all([get(`/events/${id}/stats`), get(`/events/${id}`).catch(() => null)]);
      if (stopped) return;
      shown = found;
      replace(chartBox, salesChart(found.sales_per_minute, chartBox.clientWidth || statsBody.clientWidth));
      replace(statsBody, statsTiles(found), byTier(found), h("h3", {}, "Tickets per minute"), chartBox);
      statsBody.removeAttribute("aria-busy");
      if (fresh && fresh.status !== event.status) {
        event = fresh; // changed elsewhere (another tab, an admin)
        drawAll();
      } else if (fresh) {
        event = { ...event, available_seats: fresh.available_seats, seat_count: fresh.seat_count, ticket_types: fresh.ticket_types };
        drawDetails();
      }
      updated.textContent = `Updated ${new Date().toLocaleTimeString()}${leaveRoom ? ", live" : ""}.`;
    } catch (error) {
      if (!stopped) replace(statsBody, errorBlock(error));
    } finally {
      reading = false;
      if (again) {
        again = false;
        soon();
      }
    }
  }
  function soon() {
    if (pending || stopped) return;
    pending = setTimeout(() => {
      pending = null;
      refreshStats();
    }, Math.max(0, last + STATS_AT_MOST - Date.now()));
  }
  let leaveRoom = null;
  function follow() {
    if (!leaveRoom && event.status === "published") leaveRoom = join(`event:${id}`);
  }
  const stopSeats = on("seats", (m) => {
    if (m.event_id === id) soon();
  });
  const timer = setInterval(refreshStats, STATS_EVERY);
  // The chart is drawn at its box's width, so that its text keeps its size on a phone.
  let drawnWidth = 0;
  const resized = new ResizeObserver(() => {
    const width = chartBox.clientWidth;
    if (!shown || !width || Math.abs(width - drawnWidth) < 20) return;
    drawnWidth = width;
    replace(chartBox, salesChart(shown.sales_per_minute, width));
  });
  resized.observe(chartBox);

  drawAll();
  replace(root, head, h("div", { class: "org-manage" }, stats, actions, image, details));
  follow();
  refreshStats(); // not awaited: the cleanup below must reach the router at once
  return () => {
    stopped = true;
    clearInterval(timer);
    clearTimeout(pending);
    resized.disconnect();
    stopSeats();
    if (leaveRoom) leaveRoom();
  };
}
