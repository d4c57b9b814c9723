// A list read a page at a time from a cursor-paginated API path ({items, next_cursor}).

import { get, query } from "./api.js";
import { errorBlock, h, replace } from "./dom.js";

/**
 * Fill ``box`` with the items of ``path``, drawn by ``drawItem`` (which may be async), and a
 * button for the next page. ``empty``: the words shown when there is nothing.
 */
export async function paged(box, path, drawItem, empty, { tag = "div", className = "list", more = "More" } = {}) {
  const list = h(tag, { class: className });
  const next = h("button", { type: "button", class: "secondary", hidden: true }, more);
  const status = h("div");
  replace(box, status, list, h("p", {}, next));
  let cursor = null;
  async function load() {
    next.disabled = true;
    try {
      const page = await get(`${path}${query({ limit: 20, cursor })}`);
      for (const item of page.items) list.append(await drawItem(item));
      cursor = page.next_cursor;
      next.hidden = !cursor;
      if (!list.children.length) replace(status, h("p", { class: "muted" }, empty));
    } catch (error) {
      replace(status, errorBlock(error));
    } finally {
      next.disabled = false;
    }
  }
  next.addEventListener("click", load);
  await load();
  return list;
}
