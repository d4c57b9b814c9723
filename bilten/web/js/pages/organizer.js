// The organizer's pages: my events and venues (here); a new venue, a new event and one event
// managed (in ../organizer/).

import { user } from "../api.js";
import { h, replace, when } from "../dom.js";
import { eventForm } from "../organizer/event.js";
import { paged } from "../organizer/forms.js";
import { manage } from "../organizer/manage.js";
import { venueForm } from "../organizer/venue.js";

export async function render(root, params) {
  const u = user();
  if (!u || (u.role !== "organizer" && u.role !== "admin")) return notOrganizer(root, u);
  if (params.mode === "venue") return venueForm(root);
  if (params.mode === "event") return eventForm(root, params.query);
  if (params.mode === "manage") return manage(root, params.id);
  return home(root);
}

function notOrganizer(root, u) {
  const back = encodeURIComponent("/organizer");
  replace(
    root,
    h("h1", {}, "Organizer"),
    h(
      "div",
      { class: "card org-denied" },
      h(
        "p",
        {},
        u
          ? `You are signed in as ${u.name}, with an ${u.role} account. Creating venues and events needs an organizer account.`
          : "Creating venues and events needs an organizer account.",
      ),
      h(
        "p",
        {},
        h("a", { class: "button", href: `#/signup?role=organizer&next=${back}` }, "Sign up as an organizer"),
        u ? null : [" ", h("a", { class: "button secondary", href: `#/signin?next=${back}` }, "Sign in")],
      ),
      h("p", { class: "muted" }, "On the sign-up form, choose “organizing events”."),
    ),
  );
}



function eventItem(event) {
  return h(
    "li",
    { class: "card org-item", dataset: { id: event.id } },
    h("a", { class: "org-title", href: `#/organizer/events/${event.id}` }, event.title),
    h("span", { class: `badge ${event.status}` }, event.status),
    h("span", {}, h("time", { datetime: event.starts_at }, when(event.starts_at))),
    h("span", { class: "muted" }, [event.city, event.category].filter(Boolean).join(" · ")),
    event.status === "draft" ? h("span") : h("a", { href: `#/events/${event.id}` }, "Public page"),
  );
}

function venueItem(venue) {
  return h(
    "li",
    { class: "card org-item org-venue-item", dataset: { id: venue.id } },
    h("strong", {}, venue.name),
    h("span", { class: "muted" }, `${venue.city}, ${venue.country}`),
    h("span", {}, `${venue.seat_count} seats`),
    h("a", { href: `#/organizer/events/new?venue=${venue.id}` }, "New event here"),
  );
}

async function home(root) {
  const events = h("div", {}, h("p", { class: "muted" }, "Loading…"));
  const venues = h("div", {}, h("p", { class: "muted" }, "Loading…"));
  replace(
    root,
    h(
      "div",
      { class: "org-head" },
      h("h1", {}, "Organizer"),
      h(
        "div",
        { class: "org-actions" },
        h("a", { class: "button", href: "#/organizer/venues/new" }, "New venue"),
        h("a", { class: "button", href: "#/organizer/events/new" }, "New event"),
      ),
    ),
    h("section", { "aria-labelledby": "org-events" }, h("h2", { id: "org-events" }, "My events"), events),
    h("section", { "aria-labelledby": "org-venues" }, h("h2", { id: "org-venues" }, "My venues"), venues),
  );
  await Promise.all([
    paged(events, "/users/me/events", eventItem, "No events yet. Create a venue, then an event at it."),
    paged(venues, "/users/me/venues", venueItem, "No venues yet."),
  ]);
}
