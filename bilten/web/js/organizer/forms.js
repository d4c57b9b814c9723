// What the organizer's pages share: inputs the API's errors can point at, the error shown over a
// form, cursor-paginated lists, and the conversions of prices, counts and local times.

import { errorBlock, h, replace } from "../dom.js";
import { paged as pagedList } from "../paged.js";


/** An input that the API's error ``details.fields`` can point at (``data-field``). */
export function input(path, attrs = {}) {
  return h(attrs.tag || "input", { ...attrs, tag: null, dataset: { field: path } });
}

/** Show an API error over a form and mark the inputs of the fields it names. */
export function showProblem(box, form, error) {
  replace(box, errorBlock(error));
  for (const el of form.querySelectorAll("[aria-invalid]")) el.removeAttribute("aria-invalid");
  const fields = (error.details && error.details.fields) || [];
  let first = null;
  for (const f of fields) {
    let name = typeof f === "string" ? f : f && f.field;
    // A missing field is named only in the message ("Object missing required field starts_at").
    const missing = /missing required field (\S+)/.exec((f && f.message) || "");
    if (missing) name = name ? `${name}.${missing[1]}` : missing[1];
    if (!name) continue;
    for (const el of form.querySelectorAll("[data-field]")) {
      if (el.dataset.field !== name) continue;
      el.setAttribute("aria-invalid", "true");
      first = first || el;
    }
  }
  if (first && typeof first.focus === "function" && first.matches("input, select, textarea")) first.focus();
  else box.scrollIntoView({ block: "nearest" });
}

export function clearProblem(box, form) {
  replace(box);
  for (const el of form.querySelectorAll("[aria-invalid]")) el.removeAttribute("aria-invalid");
}

/** Cursor-paginated lists of the organizer's pages: a bulleted list, "Show more". */
export function paged(box, path, drawItem, empty) {
  return pagedList(box, path, drawItem, empty, { tag: "ul", className: "org-list", more: "Show more" });
}

/** "45.5" (major units) → 4550; anything else is passed on for the API to name. */
export function cents(text) {
  const value = String(text).trim().replace(",", ".");
  if (!/^\d+(\.\d{1,2})?$/.test(value)) return value === "" ? null : value;
  const [whole, part = ""] = value.split(".");
  return Number(whole) * 100 + Number(part.padEnd(2, "0"));
}

export function integer(text) {
  const value = String(text).trim();
  return /^\d+$/.test(value) ? Number(value) : value === "" ? null : value;
}

/** The UTC offset (ms) of a time zone at an instant. */
function offsetAt(ms, timeZone) {
  const parts = {};
  const format = new Intl.DateTimeFormat("en-US", {
    timeZone,
    hourCycle: "h23",
    year: "numeric",
    month: "2-digit",
    day: "2-digit",
    hour: "2-digit",
    minute: "2-digit",
    second: "2-digit",
  });
  for (const p of format.formatToParts(new Date(ms))) parts[p.type] = p.value;
  const wall = Date.UTC(+parts.year, +parts.month - 1, +parts.day, +parts.hour, +parts.minute, +parts.second);
  return wall - Math.floor(ms / 1000) * 1000;
}

/** A datetime-local value, read as a wall-clock time in ``timeZone``, as an RFC 3339 UTC string. */
export function toUtc(local, timeZone) {
  const m = /^(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2})(?::(\d{2}))?/.exec(local || "");
  if (!m) return undefined;
  const wall = Date.UTC(+m[1], +m[2] - 1, +m[3], +m[4], +m[5], +(m[6] || 0));
  let instant;
  try {
    instant = wall - offsetAt(wall, timeZone);
    instant = wall - offsetAt(instant, timeZone); // once more, across a DST change
  } catch {
    instant = new Date(local).getTime(); // an unknown zone: the browser's own
  }
  return new Date(instant).toISOString().replace(".000Z", "Z");
}
