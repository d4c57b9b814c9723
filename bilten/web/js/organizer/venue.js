// A new venue: its sections and rows, with the layout drawn as it is typed, by the server's rule.

import { post } from "../api.js";
import { field, go, h, replace, s, toast } from "../dom.js";
import { clearProblem, input, integer, showProblem } from "./forms.js";

// The server's layout rule (bilten/venues.py, layout()): sections stacked top to bottom, seats
// one unit apart along a row, rows one unit apart and centred on the section's widest row.
const SEAT_SPACING = 1.0;
const ROW_SPACING = 1.0;
const SECTION_GAP = 2.0;
// Past this many seats the preview draws each row as one bar: thousands of circles redrawn on
// every key press would make typing lag.
const DRAW_SEATS_UP_TO = 4000;

function rowLabel(n) {
  let label = "";
  for (let i = n + 1; i > 0; i = Math.floor((i - 1) / 26)) label = String.fromCharCode(65 + ((i - 1) % 26)) + label;
  return label;
}

function seatCount(row) {
  return Number.isInteger(row.seats) && row.seats > 0 ? row.seats : 0;
}

/** The server's layout of ``sections``: each row as a segment, each section's label position. */
export function layout(sections) {
  const rows = [];
  const labels = [];
  let nextY = 0;
  let width = 0;
  let total = 0;
  for (const section of sections) {
    const widest = Math.max(0, ...section.rows.map(seatCount));
    const x = 0;
    const y = nextY;
    labels.push({ name: section.name, x: x + ((widest - 1) * SEAT_SPACING) / 2, y });
    section.rows.forEach((row, index) => {
      const seats = seatCount(row);
      const offset = ((widest - seats) * SEAT_SPACING) / 2;
      if (seats) rows.push({ x: x + offset, y: y + index * ROW_SPACING, seats });
      total += seats;
    });
    width = Math.max(width, x + widest * SEAT_SPACING);
    nextY = Math.max(nextY, y + section.rows.length * ROW_SPACING + SECTION_GAP);
  }
  return { rows, labels, width, height: Math.max(0, nextY - SECTION_GAP), total };
}

function drawPreview(svg, summary, sections) {
  const plan = layout(sections);
  const named = sections.filter((x) => x.name.trim()).length;
  const words = `${plan.total} ${plan.total === 1 ? "seat" : "seats"} in ${sections.length} ${sections.length === 1 ? "section" : "sections"}`;
  summary.textContent = `${words}${named < sections.length ? " (name every section)" : ""}.`;
  svg.setAttribute("aria-label", `Layout preview: ${words}, stacked top to bottom.`);
  const pad = 1;
  svg.setAttribute("viewBox", `${-pad} ${-pad - 1.2} ${Math.max(plan.width, 4) + pad} ${Math.max(plan.height, 1) + 2 * pad + 1.2}`);
  const shapes = [];
  if (plan.total <= DRAW_SEATS_UP_TO) {
    for (const row of plan.rows) {
      for (let n = 0; n < row.seats; n++) {
        shapes.push(s("circle", { class: "seat", cx: row.x + n * SEAT_SPACING, cy: row.y, r: 0.4 }));
      }
    }
  } else {
    for (const row of plan.rows) {
      shapes.push(s("line", { class: "rowbar", x1: row.x, x2: row.x + (row.seats - 1) * SEAT_SPACING, y1: row.y, y2: row.y }));
    }
  }
  for (const label of plan.labels) {
    shapes.push(s("text", { class: "section-label", x: label.x, y: label.y - 0.9, "text-anchor": "middle" }, label.name));
  }
  replace(svg, shapes);
}

export function venueForm(root) {
  const sections = [{ name: "", rows: Array.from({ length: 5 }, (_, i) => ({ label: rowLabel(i), seats: 10 })) }];
  const editor = h("div", { class: "org-sections" });
  const preview = s("svg", { class: "org-preview", role: "img", "aria-label": "Layout preview" });
  const summary = h("p", { class: "org-summary", "aria-live": "polite" });
  let frame = 0;
  const redraw = () => {
    cancelAnimationFrame(frame);
    frame = requestAnimationFrame(() => drawPreview(preview, summary, sections));
  };

  const zone = Intl.DateTimeFormat().resolvedOptions().timeZone || "UTC";
  const zones = typeof Intl.supportedValuesOf === "function" ? Intl.supportedValuesOf("timeZone") : [];
  const country = input("country", { name: "country", required: true, maxlength: 2, autocomplete: "country", placeholder: "NO", class: "org-short" });
  country.addEventListener("input", () => (country.value = country.value.toUpperCase()));

  function drawEditor(focus) {
    replace(editor, sections.map((section, i) => sectionBox(section, i)));
    const target = focus && root.querySelector(focus);
    if (target) target.focus();
    redraw();
  }

  function sectionBox(section, i) {
    const name = input(`sections[${i}].name`, { name: `section-${i}`, value: section.name, required: true, maxlength: 50, placeholder: i ? "Balcony" : "Stalls" });
    name.addEventListener("input", () => {
      section.name = name.value;
      redraw();
    });
    const count = h("input", { type: "number", min: 1, max: 500, value: section.rows.length || 5, class: "org-short" });
    const per = h("input", { type: "number", min: 1, max: 1000, value: (section.rows[0] && section.rows[0].seats) || 10, class: "org-short" });
    const fill = h("button", { type: "button", class: "secondary" }, "Fill rows");
    fill.addEventListener("click", () => {
      const n = Math.min(500, Math.max(1, integer(count.value) || 1));
      const m = integer(per.value);
      section.rows = Array.from({ length: n }, (_, r) => ({ label: rowLabel(r), seats: Number.isInteger(m) ? m : per.value }));
      drawEditor(`[data-section="${i}"] .org-fill button`);
    });
    const rows = section.rows.map((row, r) => rowLine(section, i, row, r));
    const addRow = h("button", { type: "button", class: "secondary" }, "Add row");
    addRow.addEventListener("click", () => {
      const last = section.rows[section.rows.length - 1];
      section.rows.push({ label: rowLabel(section.rows.length), seats: last ? last.seats : 10 });
      drawEditor(`[data-field="sections[${i}].rows[${section.rows.length - 1}].label"]`);
    });
    const removeSection = h("button", { type: "button", class: "link", "aria-label": `Remove section ${i + 1}` }, "Remove section");
    removeSection.addEventListener("click", () => {
      sections.splice(i, 1);
      drawEditor(".org-add-section");
    });
    return h(
      "fieldset",
      { class: "org-box", dataset: { section: String(i) } },
      h("legend", {}, `Section ${i + 1}`),
      field("Section name", name),
      h(
        "div",
        { class: "org-fill row" },
        field("Rows", count),
        field("Seats per row", per),
        h("div", { class: "field" }, fill),
      ),
      h("div", { class: "org-rows", role: "group", "aria-label": `Rows of section ${i + 1}` }, rows),
      h("div", { class: "row" }, addRow, sections.length > 1 ? removeSection : null),
    );
  }

  function rowLine(section, i, row, r) {
    const label = input(`sections[${i}].rows[${r}].label`, { value: row.label, required: true, maxlength: 20, class: "org-short" });
    const seats = input(`sections[${i}].rows[${r}].seats`, { type: "number", min: 1, max: 1000, value: row.seats, required: true, class: "org-short" });
    label.addEventListener("input", () => (row.label = label.value));
    seats.addEventListener("input", () => {
      row.seats = integer(seats.value) ?? "";
      redraw();
    });
    const remove = h("button", { type: "button", class: "link", "aria-label": `Remove row ${row.label || r + 1} of section ${i + 1}` }, "Remove");
    remove.addEventListener("click", () => {
      section.rows.splice(r, 1);
      drawEditor(`[data-section="${i}"] .org-rows + .row button`);
    });
    return h(
      "div",
      { class: "org-rowline" },
      h("label", {}, "Row ", label),
      h("label", {}, "Seats ", seats),
      section.rows.length > 1 ? remove : null,
    );
  }

  const addSection = h("button", { type: "button", class: "secondary org-add-section" }, "Add section");
  addSection.addEventListener("click", () => {
    sections.push({ name: "", rows: [{ label: "A", seats: 10 }] });
    drawEditor(`[data-field="sections[${sections.length - 1}].name"]`);
  });

  const problem = h("div");
  const submit = h("button", { type: "submit" }, "Create venue");
  const form = h(
    "form",
    { class: "org-form", novalidate: true, "aria-labelledby": "org-venue-title" },
    h(
      "fieldset",
      { class: "org-box" },
      h("legend", {}, "The venue"),
      h(
        "div",
        { class: "org-grid" },
        field("Name", input("name", { name: "name", required: true, maxlength: 200, autocomplete: "organization" })),
        field("Address", input("address", { name: "address", required: true, maxlength: 200, autocomplete: "street-address" })),
        field("City", input("city", { name: "city", required: true, maxlength: 200, autocomplete: "address-level2" })),
        field("Country", country, "Two-letter code (ISO 3166), such as NO or DE."),
        field(
          "Timezone",
          input("timezone", { name: "timezone", required: true, maxlength: 64, value: zone, list: "org-zones", autocomplete: "off" }),
          "An IANA time zone, such as Europe/Oslo.",
        ),
      ),
      h("datalist", { id: "org-zones" }, zones.map((z) => h("option", { value: z }))),
    ),
    h("h2", {}, "Sections and rows"),
    h("p", { class: "muted" }, "Sections are placed top to bottom, each row centred on the section's widest row."),
    editor,
    h("p", {}, addSection),
    problem,
    h("p", {}, submit),
  );
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    const data = new FormData(form);
    const body = {
      name: String(data.get("name")).trim(),
      address: String(data.get("address")).trim(),
      city: String(data.get("city")).trim(),
      country: String(data.get("country")).trim().toUpperCase(),
      timezone: String(data.get("timezone")).trim(),
      sections: sections.map((section) => ({
        name: section.name.trim(),
        rows: section.rows.map((row) => ({ label: String(row.label).trim(), seats: row.seats === "" ? null : row.seats })),
      })),
    };
    submit.disabled = true;
    clearProblem(problem, form);
    try {
      const venue = await post("/venues", body);
      toast(`Venue “${venue.name}” created with ${venue.seat_count} seats.`);
      go(`/organizer/events/new?venue=${venue.id}`);
    } catch (error) {
      showProblem(problem, form, error);
    } finally {
      submit.disabled = false;
    }
  });

  replace(
    root,
    h("p", {}, h("a", { href: "#/organizer" }, "← Organizer")),
    h("h1", { id: "org-venue-title" }, "New venue"),
    h(
      "div",
      { class: "org-venue" },
      form,
      h("aside", { class: "card org-preview-box", "aria-label": "Layout preview" }, h("h2", {}, "Preview"), preview, summary),
    ),
  );
  drawEditor();
  form.querySelector("input").focus();
}
