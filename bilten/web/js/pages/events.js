// Events: search and browse published events, a page at a time (the API's cursors).

import { get, query } from "../api.js";
import { errorBlock, field, h, money, replace, values, when } from "../dom.js";

const PAGE = 12;

function card(event) {
  const price =
    event.min_price_cents === null || event.min_price_cents === undefined
      ? null
      : event.min_price_cents === event.max_price_cents
        ? money(event.min_price_cents, event.currency)
        : `from ${money(event.min_price_cents, event.currency)}`;
  return h(
    "a",
    { class: "card event-card", href: `#/events/${event.id}` },
    event.image_url ? h("img", { src: event.image_url, alt: "" }) : null,
    h("h3", {}, event.title),
    h("span", {}, when(event.starts_at)),
    h("span", { class: "muted" }, [event.city, event.category].filter(Boolean).join(" · ")),
    price ? h("span", {}, price) : null,
  );
}

export async function render(root, { query: params }) {
  const filters = Object.fromEntries(params.entries());
  const form = h(
    "form",
    { class: "row", role: "search", "aria-label": "Search events" },
    field("Search", h("input", { name: "q", type: "search", value: filters.q || "", placeholder: "Title or description" })),
    field("City", h("input", { name: "city", value: filters.city || "" })),
    field("Category", h("input", { name: "category", value: filters.category || "" })),
    h("div", { class: "field" }, h("button", { type: "submit" }, "Search")),
  );
  const list = h("div", { class: "grid", "aria-live": "polite" });
  const more = h("button", { class: "secondary", type: "button", hidden: true }, "More events");
  const status = h("div");
  replace(root, h("h1", {}, "Events"), form, status, list, h("p", {}, more));

  let cursor = null;
  async function load() {
    more.disabled = true;
    try {
      const page = await get(`/events${query({ ...filters, limit: PAGE, cursor })}`);
      list.append(...page.items.map(card));
      cursor = page.next_cursor;
      more.hidden = !cursor;
      if (!list.children.length) replace(status, h("p", { class: "muted" }, "No events match."));
    } catch (error) {
      replace(status, errorBlock(error));
    } finally {
      more.disabled = false;
    }
  }
  more.addEventListener("click", load);
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    const next = new URLSearchParams(values(form)).toString();
    location.hash = next ? `/?${next}` : "/";
  });
  await load();
}
