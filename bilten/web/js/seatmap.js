// The seat map: one SVG circle per seat at its x/y, coloured by price tier and status.
//
// Built for ten thousand seats: circles are made once; a change sets one attribute
// (data-status) and CSS does the rest. Zoom with the wheel, a pinch or the +/− buttons; pan by
// dragging. From the keyboard the map is one tab stop: arrow keys move a focus ring between
// seats, Enter or Space selects, and a live region reads out the seat under the ring.

import { h, money, s } from "./dom.js";

const R = 0.42;
const STATUS_WORDS = { available: "available", held: "held by someone", sold: "sold" };

function bounds(seats) {
  let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
  for (const seat of seats) {
    x0 = Math.min(x0, seat.x); y0 = Math.min(y0, seat.y);
    x1 = Math.max(x1, seat.x); y1 = Math.max(y1, seat.y);
  }
  if (!seats.length) return { x: 0, y: 0, w: 10, h: 10 };
  const pad = 1.5;
  // A small hall is not blown up to fill the box: at least 30 x 16 seat widths are shown.
  const w = Math.max(x1 - x0 + 2 * pad, 30);
  const h = Math.max(y1 - y0 + 2 * pad + 1, 16);
  return { x: (x0 + x1) / 2 - w / 2, y: (y0 + y1) / 2 - h / 2 - 0.5, w, h };
}

export class SeatMap {
  /**
   * ``seats``: the seat map's seats; ``currency``: for prices; ``onToggle(seat)``: a seat was
   * chosen or un-chosen by the user (return false to refuse); ``isSelected(id)``.
   */
  constructor({ seats, currency, onToggle, isSelected, label = "Seat map" }) {
    this.currency = currency;
    this.onToggle = onToggle || (() => true);
    this.isSelected = isSelected || (() => false);
    this.nodes = new Map();
    this.seats = new Map();
    this.claimed = new Set(); // asked for by queued bookings: shown held while the map says available
    this.order = [];
    this.cursor = null;
    this.svg = s("svg", {
      class: "seatmap",
      tabindex: "0",
      role: "application",
      "aria-label": `${label}. Arrow keys move between seats; Enter or Space chooses a seat; plus and minus zoom.`,
      "aria-describedby": "seat-readout",
    });
    this.layer = s("g", {});
    this.labels = s("g", {});
    this.ring = s("circle", { class: "cursor", r: R + 0.2, cx: -100, cy: -100 });
    this.svg.append(this.labels, this.layer, this.ring);
    this.readout = h("p", { id: "seat-readout", class: "sr-only", "aria-live": "polite" });
    this.legend = h("div", { class: "legend", "aria-label": "Legend" });
    const tool = (text, name, fn) => h("button", { type: "button", class: "secondary", "aria-label": name, onclick: fn }, text);
    this.element = h(
      "div",
      { class: "map-box" },
      h("div", { class: "map-tools" }, tool("+", "Zoom in", () => this.zoom(0.7)), tool("−", "Zoom out", () => this.zoom(1 / 0.7)), tool("Fit", "Show the whole map", () => this.fit())),
      this.svg,
      this.legend,
      this.readout,
    );
    this.bindPointer();
    this.bindKeys();
    this.load(seats);
  }

  /** Draw every seat again (a snapshot: news of claims missed meanwhile is forgotten too). */
  load(seats) {
    this.claimed.clear();
    this.layer.replaceChildren();
    this.labels.replaceChildren();
    this.nodes.clear();
    this.seats.clear();
    this.tiers = new Map();
    const fragment = document.createDocumentFragment();
    const sections = new Map();
    for (const seat of seats) {
      if (seat.tier && !this.tiers.has(seat.tier)) this.tiers.set(seat.tier, { index: this.tiers.size % 8, price: seat.price_cents });
      const tier = seat.tier ? this.tiers.get(seat.tier).index : null;
      const node = s("circle", {
        class: tier === null ? "seat" : `seat t${tier}`,
        cx: seat.x,
        cy: seat.y,
        r: R,
        dataset: { id: seat.id, status: seat.status },
      });
      if (this.isSelected(seat.id)) node.classList.add("selected");
      this.nodes.set(seat.id, node);
      this.seats.set(seat.id, { ...seat });
      fragment.append(node);
      const box = sections.get(seat.section) || { x0: Infinity, x1: -Infinity, y: Infinity };
      box.x0 = Math.min(box.x0, seat.x); box.x1 = Math.max(box.x1, seat.x); box.y = Math.min(box.y, seat.y);
      sections.set(seat.section, box);
    }
    this.layer.append(fragment);
    for (const [name, box] of sections) {
      this.labels.append(s("text", { class: "section-label", x: (box.x0 + box.x1) / 2, y: box.y - 0.9, "text-anchor": "middle" }, name));
    }
    this.order = [...this.seats.values()].sort((a, b) => a.y - b.y || a.x - b.x);
    this.home = bounds(seats);
    if (!this.view) this.fit();
    this.drawLegend();
    if (this.cursor && !this.seats.has(this.cursor)) this.cursor = null;
    this.placeRing();
  }

  drawLegend() {
    const items = [...this.tiers].map(([name, t]) =>
      h("span", { class: `k-t${t.index}` }, h("span", { class: "name" }, `${name} ${money(t.price, this.currency)}`)),
    );
    this.legend.replaceChildren(
      ...items,
      h("span", { class: "k-mine" }, h("span", { class: "name" }, "Your choice")),
      h("span", { class: "k-held" }, h("span", { class: "name" }, "Held")),
      h("span", { class: "k-sold" }, h("span", { class: "name" }, "Sold")),
    );
  }

  /**
   * Apply seat changes ``[{seat_id, status, version}]``, each only if it is newer than what the
   * map shows of that seat (changes may commit, and so arrive, out of version order). Returns
   * the changes applied.
   */
  apply(changes) {
    const applied = [];
    for (const change of changes) {
      const node = this.nodes.get(change.seat_id);
      const seat = this.seats.get(change.seat_id);
      if (!node || (change.version !== undefined && seat.version !== undefined && change.version <= seat.version)) continue;
      this.claimed.delete(change.seat_id); // the change tells how the claim ended
      node.dataset.status = change.status;
      seat.status = change.status;
      if (change.version !== undefined) seat.version = change.version;
      applied.push(change);
    }
    if (this.cursor) this.announce();
    return applied;
  }

  /**
   * Seats claimed by queued bookings (``seats.claimed``), or given back unsold
   * (``seats.released``): shown held, or as the map has them again.
   */
  claim(ids, claimed) {
    for (const id of ids) {
      const node = this.nodes.get(id);
      if (!node) continue;
      if (claimed) this.claimed.add(id);
      else this.claimed.delete(id);
      node.dataset.status = this.status(id);
    }
    if (this.cursor) this.announce();
  }

  forgetClaims() {
    this.claim([...this.claimed], false);
  }

  /** The status a seat is shown with: held while a queued booking claims it. */
  status(id) {
    const seat = this.seats.get(id);
    if (!seat) return null;
    return seat.status === "available" && this.claimed.has(id) ? "held" : seat.status;
  }

  /** Show a seat as chosen (or not) by this user. */
  mark(id, chosen) {
    const node = this.nodes.get(id);
    if (node) node.classList.toggle("selected", chosen);
  }

  setView(v) {
    this.view = v;
    this.svg.setAttribute("viewBox", `${v.x} ${v.y} ${v.w} ${v.h}`);
  }

  fit() {
    this.setView({ ...this.home });
  }

  zoom(factor, cx, cy) {
    const v = this.view;
    const w = Math.min(Math.max(v.w * factor, 4), this.home.w * 3);
    const f = w / v.w;
    const px = cx === undefined ? v.x + v.w / 2 : cx;
    const py = cy === undefined ? v.y + v.h / 2 : cy;
    this.setView({ x: px - (px - v.x) * f, y: py - (py - v.y) * f, w, h: v.h * f });
  }

  /** The map coordinates of a point on the screen. */
  point(clientX, clientY) {
    const rect = this.svg.getBoundingClientRect();
    const v = this.view;
    // preserveAspectRatio "xMidYMid meet": one scale, centred
    const scale = Math.min(rect.width / v.w, rect.height / v.h);
    const ox = (rect.width - v.w * scale) / 2, oy = (rect.height - v.h * scale) / 2;
    return { x: v.x + (clientX - rect.left - ox) / scale, y: v.y + (clientY - rect.top - oy) / scale, scale };
  }

  bindPointer() {
    const pointers = new Map();
    let moved = 0;
    let pinch = null;
    this.svg.addEventListener("wheel", (e) => {
      e.preventDefault();
      const p = this.point(e.clientX, e.clientY);
      this.zoom(e.deltaY > 0 ? 1.15 : 1 / 1.15, p.x, p.y);
    }, { passive: false });
    this.svg.addEventListener("pointerdown", (e) => {
      pointers.set(e.pointerId, { x: e.clientX, y: e.clientY });
      moved = 0;
      if (pointers.size === 2) {
        const [a, b] = [...pointers.values()];
        pinch = Math.hypot(a.x - b.x, a.y - b.y);
      }
    });
    this.svg.addEventListener("pointermove", (e) => {
      const last = pointers.get(e.pointerId);
      if (!last) return;
      const dx = e.clientX - last.x, dy = e.clientY - last.y;
      pointers.set(e.pointerId, { x: e.clientX, y: e.clientY });
      moved += Math.abs(dx) + Math.abs(dy);
      // Captured only once it is a drag: a plain click still reaches the seat under it.
      if (moved > 6 && !this.svg.hasPointerCapture(e.pointerId)) this.svg.setPointerCapture(e.pointerId);
      if (pointers.size === 2 && pinch) {
        const [a, b] = [...pointers.values()];
        const d = Math.hypot(a.x - b.x, a.y - b.y);
        const mid = this.point((a.x + b.x) / 2, (a.y + b.y) / 2);
        this.zoom(pinch / d, mid.x, mid.y);
        pinch = d;
      } else if (pointers.size === 1) {
        const { scale } = this.point(0, 0);
        const v = this.view;
        this.setView({ ...v, x: v.x - dx / scale, y: v.y - dy / scale });
      }
    });
    const up = (e) => {
      pointers.delete(e.pointerId);
      if (pointers.size < 2) pinch = null;
    };
    this.svg.addEventListener("pointerup", up);
    this.svg.addEventListener("pointercancel", up);
    this.svg.addEventListener("click", (e) => {
      if (moved > 6) return;
      const id = e.target.dataset && e.target.dataset.id;
      if (id) {
        this.cursor = id;
        this.placeRing();
        this.toggle(id);
      }
    });
  }

  toggle(id) {
    const seat = this.seats.get(id);
    if (seat) this.onToggle(seat);
    this.announce();
  }

  bindKeys() {
    const DIRS = { ArrowLeft: [-1, 0], ArrowRight: [1, 0], ArrowUp: [0, -1], ArrowDown: [0, 1] };
    this.svg.addEventListener("keydown", (e) => {
      if (DIRS[e.key]) {
        e.preventDefault();
        this.move(...DIRS[e.key]);
      } else if (e.key === "Enter" || e.key === " ") {
        e.preventDefault();
        if (this.cursor) this.toggle(this.cursor);
      } else if (e.key === "+" || e.key === "=") {
        this.zoom(0.7);
      } else if (e.key === "-") {
        this.zoom(1 / 0.7);
      } else if (e.key === "0") {
        this.fit();
      }
    });
    this.svg.addEventListener("focus", () => {
      if (!this.cursor) {
        const first = this.order.find((seat) => seat.status === "available") || this.order[0];
        if (first) this.cursor = first.id;
      }
      this.placeRing();
      this.announce();
    });
  }

  /** To the nearest seat in direction (dx, dy): straight ahead counts more than sideways. */
  move(dx, dy) {
    const from = this.seats.get(this.cursor);
    if (!from) return;
    let best = null, bestScore = Infinity;
    for (const seat of this.order) {
      const ax = seat.x - from.x, ay = seat.y - from.y;
      const ahead = ax * dx + ay * dy;
      if (ahead <= 0.01) continue;
      const side = Math.abs(ax * dy - ay * dx);
      const score = ahead + side * 3;
      if (score < bestScore) { bestScore = score; best = seat; }
    }
    if (best) {
      this.cursor = best.id;
      this.placeRing();
      this.announce();
    }
  }

  placeRing() {
    const seat = this.cursor && this.seats.get(this.cursor);
    this.ring.setAttribute("cx", seat ? seat.x : -100);
    this.ring.setAttribute("cy", seat ? seat.y : -100);
    if (!seat || !this.view) return;
    const v = this.view;
    if (seat.x < v.x || seat.x > v.x + v.w || seat.y < v.y || seat.y > v.y + v.h) {
      this.setView({ ...v, x: seat.x - v.w / 2, y: seat.y - v.h / 2 });
    }
  }

  announce() {
    const seat = this.cursor && this.seats.get(this.cursor);
    if (!seat) return;
    const shown = this.status(seat.id);
    const mine = this.isSelected(seat.id) ? "your choice" : STATUS_WORDS[shown] || shown;
    const price = seat.price_cents === null || seat.price_cents === undefined ? "" : `, ${money(seat.price_cents, this.currency)}`;
    this.readout.textContent = `${seat.label}${seat.tier ? `, ${seat.tier}` : ""}${price}: ${mine}`;
  }
}
