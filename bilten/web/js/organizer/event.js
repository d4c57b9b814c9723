// A new event at one of my venues: details, times in the venue's time zone, price tiers over the
// venue's sections, general-admission ticket types.

import { get, post, query } from "../api.js";
import { errorBlock, field, go, h, replace, toast } from "../dom.js";
import { cents, clearProblem, input, integer, showProblem, toUtc } from "./forms.js";

const CATEGORIES = ["concert", "theatre", "sport", "comedy", "conference", "festival", "other"];
const CURRENCIES = ["EUR", "NOK", "SEK", "DKK", "GBP", "USD", "CHF", "PLN", "CZK"];

export async function eventForm(root, params) {
  replace(root, h("h1", {}, "New event"), h("p", { class: "muted" }, "Loading your venues…"));
  let venues;
  try {
    venues = (await get(`/users/me/venues${query({ limit: 100 })}`)).items;
  } catch (error) {
    replace(root, h("h1", {}, "New event"), errorBlock(error));
    return;
  }
  if (!venues.length) {
    replace(
      root,
      h("h1", {}, "New event"),
      h("div", { class: "card" }, h("p", {}, "An event takes place at one of your venues, and you have none yet."), h("a", { class: "button", href: "#/organizer/venues/new" }, "New venue")),
    );
    return;
  }
  const wanted = params && params.get("venue");
  let venue = venues.find((v) => v.id === wanted) || venues[0];
  let sectionNames = [];
  const tiers = [{ name: "Standard", price: "", sections: null }]; // null: every section
  const types = [];

  const venueSelect = input("venue_id", { tag: "select", name: "venue_id", required: true });
  venueSelect.append(...venues.map((v) => h("option", { value: v.id, selected: v.id === venue.id }, `${v.name} (${v.city}) · ${v.seat_count} seats`)));
  const zoneHints = [];
  const zoneHint = () => {
    const hint = h("small", {}, `In the venue's time zone (${venue.timezone}).`);
    zoneHints.push(hint);
    return hint;
  };
  const currency = input("currency", { name: "currency", required: true, maxlength: 3, value: "EUR", list: "org-currencies", class: "org-short" });
  currency.addEventListener("input", () => {
    currency.value = currency.value.toUpperCase();
    for (const el of form.querySelectorAll(".org-currency")) el.textContent = currency.value || "major units";
  });
  const tierBox = h("div", { class: "org-tiers" });
  const typeBox = h("div", { class: "org-types" });

  function priceLabel() {
    return ["Price (", h("span", { class: "org-currency" }, currency.value || "major units"), ")"];
  }

  function labelled(text, control, hint) {
    // field() with rich label content (the currency follows the currency field).
    const f = field("", control, hint);
    replace(f.querySelector("label"), text);
    return f;
  }

  function drawTiers(focus) {
    replace(
      tierBox,
      tiers.map((tier, i) => {
        const name = input(`price_tiers[${i}].name`, { value: tier.name, required: true, maxlength: 50 });
        name.addEventListener("input", () => (tier.name = name.value));
        const price = input(`price_tiers[${i}].price_cents`, { value: tier.price, required: true, inputmode: "decimal", placeholder: "45.00", class: "org-short" });
        price.addEventListener("input", () => (tier.price = price.value));
        const chosen = tier.sections || new Set(sectionNames);
        tier.sections = chosen;
        const boxes = sectionNames.map((section) => {
          const box = h("input", { type: "checkbox", value: section, checked: chosen.has(section) });
          box.addEventListener("change", () => (box.checked ? chosen.add(section) : chosen.delete(section)));
          return h("label", {}, box, section);
        });
        const remove = h("button", { type: "button", class: "link" }, `Remove tier ${i + 1}`);
        remove.addEventListener("click", () => {
          tiers.splice(i, 1);
          drawTiers(".org-add-tier");
        });
        return h(
          "fieldset",
          { class: "org-box", dataset: { tier: String(i) } },
          h("legend", {}, `Price tier ${i + 1}`),
          h("div", { class: "org-grid" }, field("Tier name", name), labelled(priceLabel(), price)),
          h(
            "fieldset",
            { class: "org-checks", dataset: { field: `price_tiers[${i}].sections` } },
            h("legend", {}, "Sections"),
            boxes.length ? boxes : h("span", { class: "muted" }, "Loading the venue's sections…"),
          ),
          remove,
        );
      }),
    );
    const target = focus && root.querySelector(focus);
    if (target) target.focus();
  }

  function drawTypes(focus) {
    replace(
      typeBox,
      types.map((type, i) => {
        const name = input(`ticket_types[${i}].name`, { value: type.name, required: true, maxlength: 50, placeholder: "Standing" });
        name.addEventListener("input", () => (type.name = name.value));
        const price = input(`ticket_types[${i}].price_cents`, { value: type.price, required: true, inputmode: "decimal", class: "org-short" });
        price.addEventListener("input", () => (type.price = price.value));
        const capacity = input(`ticket_types[${i}].capacity`, { type: "number", min: 1, value: type.capacity, required: true, class: "org-short" });
        capacity.addEventListener("input", () => (type.capacity = capacity.value));
        const remove = h("button", { type: "button", class: "link" }, `Remove ticket type ${i + 1}`);
        remove.addEventListener("click", () => {
          types.splice(i, 1);
          drawTypes(".org-add-type");
        });
        return h(
          "fieldset",
          { class: "org-box" },
          h("legend", {}, `General admission ${i + 1}`),
          h("div", { class: "org-grid" }, field("Ticket name", name), labelled(priceLabel(), price), field("Capacity", capacity, "How many can be sold.")),
          remove,
        );
      }),
    );
    const target = focus && root.querySelector(focus);
    if (target) target.focus();
  }

  async function loadVenue() {
    sectionNames = [];
    drawTiers();
    try {
      const detail = await get(`/venues/${venue.id}`);
      if (detail.id !== venue.id) return; // another venue was chosen meanwhile
      sectionNames = detail.sections.map((x) => x.name);
    } catch (error) {
      toast(error.message, "error");
    }
    // The new venue's sections: all of them in the first tier, none in the others.
    tiers.forEach((tier, i) => (tier.sections = i ? new Set() : null));
    drawTiers();
  }
  venueSelect.addEventListener("change", () => {
    venue = venues.find((v) => v.id === venueSelect.value) || venue;
    for (const hint of zoneHints) hint.textContent = `In the venue's time zone (${venue.timezone}).`;
    loadVenue();
  });

  const addTier = h("button", { type: "button", class: "secondary org-add-tier" }, "Add price tier");
  addTier.addEventListener("click", () => {
    const claimed = new Set(tiers.flatMap((t) => [...(t.sections || [])]));
    tiers.push({ name: "", price: "", sections: new Set(sectionNames.filter((x) => !claimed.has(x))) });
    drawTiers(`[data-field="price_tiers[${tiers.length - 1}].name"]`);
  });
  const addType = h("button", { type: "button", class: "secondary org-add-type" }, "Add general-admission tickets");
  addType.addEventListener("click", () => {
    types.push({ name: "", price: "", capacity: "" });
    drawTypes(`[data-field="ticket_types[${types.length - 1}].name"]`);
  });

  const problem = h("div");
  const submit = h("button", { type: "submit" }, "Create event");
  const form = h(
    "form",
    { class: "org-form", novalidate: true },
    h(
      "fieldset",
      { class: "org-box" },
      h("legend", {}, "The event"),
      field("Title", input("title", { name: "title", required: true, maxlength: 200 })),
      field("Description", input("description", { tag: "textarea", name: "description", rows: 4, maxlength: 20000 })),
      h(
        "div",
        { class: "org-grid" },
        field(
          "Category",
          input("category", { tag: "select", name: "category", required: true }),
        ),
        field("Venue", venueSelect),
        field("Starts", input("starts_at", { name: "starts_at", type: "datetime-local", required: true }), zoneHint()),
        field("Ends", input("ends_at", { name: "ends_at", type: "datetime-local", required: true }), zoneHint()),
        field("Sale starts", input("sale_starts_at", { name: "sale_starts_at", type: "datetime-local" }), "Optional: empty puts it on sale as soon as it is published."),
        field("Currency", currency, "ISO 4217, such as EUR."),
        field("Max tickets per order", input("max_tickets_per_order", { name: "max_tickets_per_order", type: "number", min: 1, max: 100, value: 10, class: "org-short" })),
      ),
      h("datalist", { id: "org-currencies" }, CURRENCIES.map((c) => h("option", { value: c }))),
    ),
    h("h2", {}, "Seated: price tiers"),
    h("p", { class: "muted" }, "Each tier prices the seats of the sections it names; a section belongs to one tier at most, and seats of a section in no tier are not sold."),
    tierBox,
    h("p", {}, addTier),
    h("h2", {}, "General admission"),
    h("p", { class: "muted" }, "Optional: tickets without a seat, up to a capacity."),
    typeBox,
    h("p", {}, addType),
    problem,
    h("p", {}, submit),
  );
  const category = form.querySelector('[name="category"]');
  category.append(...CATEGORIES.map((c) => h("option", { value: c }, c[0].toUpperCase() + c.slice(1))));

  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    const data = new FormData(form);
    const text = (name) => String(data.get(name) || "").trim();
    const body = {
      title: text("title"),
      description: text("description"),
      category: text("category"),
      venue_id: venue.id,
      starts_at: toUtc(text("starts_at"), venue.timezone),
      ends_at: toUtc(text("ends_at"), venue.timezone),
      currency: text("currency").toUpperCase(),
      sale_starts_at: toUtc(text("sale_starts_at"), venue.timezone),
      max_tickets_per_order: integer(text("max_tickets_per_order")) ?? undefined,
      price_tiers: tiers.map((t) => ({ name: t.name.trim(), price_cents: cents(t.price), sections: [...(t.sections || [])] })),
      ticket_types: types.map((t) => ({ name: t.name.trim(), price_cents: cents(t.price), capacity: integer(t.capacity) })),
    };
    submit.disabled = true;
    clearProblem(problem, form);
    try {
      const event = await post("/events", body);
      toast(`“${event.title}” saved as a draft.`);
      go(`/organizer/events/${event.id}`);
    } catch (error) {
      showProblem(problem, form, error);
    } finally {
      submit.disabled = false;
    }
  });

  replace(root, h("p", {}, h("a", { href: "#/organizer" }, "← Organizer")), h("h1", {}, "New event"), form);
  drawTypes();
  await loadVenue();
}
