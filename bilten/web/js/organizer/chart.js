// Tickets sold per minute, drawn in SVG, with its summary and a table for screen readers.

import { h, s } from "../dom.js";

function niceCeiling(n) {
  if (n <= 4) return 4;
  const step = 10 ** Math.floor(Math.log10(n));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * step >= n) return m * step;
  return 10 * step;
}

function clock(ms, withDate) {
  const options = withDate ? { month: "short", day: "numeric", hour: "2-digit", minute: "2-digit" } : { hour: "2-digit", minute: "2-digit" };
  return new Date(ms).toLocaleString(undefined, options);
}

/** Tickets sold per minute as bars on a time axis, with a text summary and a table for screen readers. */
export function salesChart(perMinute, width) {
  const W = Math.max(300, Math.min(900, Math.round(width) || 640));
  const H = 220;
  const left = 42;
  const right = 12;
  const top = 12;
  const bottom = 42;
  const plotW = W - left - right;
  const plotH = H - top - bottom;
  const points = perMinute.map((p) => ({ t: Date.parse(p.minute), n: p.tickets })).sort((a, b) => a.t - b.t);
  const total = points.reduce((sum, p) => sum + p.n, 0);
  const peak = points.reduce((best, p) => (p.n > best.n ? p : best), { t: 0, n: 0 });
  const end = points.length ? points[points.length - 1].t + 60000 : Date.now();
  const start = points.length ? Math.min(points[0].t, end - 10 * 60000) : end - 10 * 60000;
  const span = end - start;
  const withDate = span > 20 * 3600000;
  const yMax = niceCeiling(peak.n);
  const x = (t) => left + ((t - start) / span) * plotW;
  const y = (n) => top + plotH - (n / yMax) * plotH;
  const barW = Math.max(1.5, (60000 / span) * plotW * 0.8);

  const summary = points.length
    ? `Sales per minute: ${total} ${total === 1 ? "ticket" : "tickets"} sold in ${points.length} ${points.length === 1 ? "minute" : "minutes"} between ${clock(points[0].t, withDate)} and ${clock(end - 60000, withDate)}; the busiest minute, ${clock(peak.t, withDate)}, sold ${peak.n}.`
    : "Sales per minute: no tickets sold yet.";

  const parts = [];
  for (const tick of [0, yMax / 2, yMax]) {
    parts.push(
      s("line", { class: "gridline", x1: left, x2: left + plotW, y1: y(tick), y2: y(tick) }),
      s("text", { x: left - 6, y: y(tick) + 4, "text-anchor": "end" }, String(tick)),
    );
  }
  for (const p of points) {
    parts.push(
      s(
        "rect",
        { class: "bar", x: x(p.t) + 0.1 * barW, y: y(p.n), width: barW, height: Math.max(0, top + plotH - y(p.n)) },
        s("title", {}, `${clock(p.t, withDate)}: ${p.n} ${p.n === 1 ? "ticket" : "tickets"}`),
      ),
    );
  }
  parts.push(
    s("line", { class: "axis", x1: left, x2: left, y1: top, y2: top + plotH }),
    s("line", { class: "axis", x1: left, x2: left + plotW, y1: top + plotH, y2: top + plotH }),
    s("text", { x: left, y: top + plotH + 16, "text-anchor": "start" }, clock(start, withDate)),
    s("text", { x: left + plotW / 2, y: top + plotH + 16, "text-anchor": "middle" }, clock(start + span / 2, withDate)),
    s("text", { x: left + plotW, y: top + plotH + 16, "text-anchor": "end" }, clock(end, withDate)),
    s("text", { class: "axis-title", x: left + plotW / 2, y: H - 4, "text-anchor": "middle" }, "Time (your clock)"),
    s("text", { class: "axis-title", x: 12, y: top + plotH / 2, "text-anchor": "middle", transform: `rotate(-90 12 ${top + plotH / 2})` }, "Tickets per minute"),
  );
  if (!points.length) {
    parts.push(s("text", { class: "empty", x: left + plotW / 2, y: top + plotH / 2, "text-anchor": "middle" }, "No sales yet"));
  }
  const chart = s("svg", { class: "org-chart", viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": summary }, parts);
  const recent = points.slice(-120);
  const table = h(
    "table",
    { class: "sr-only" },
    h("caption", {}, points.length > recent.length ? "Tickets sold per minute (the last 120 minutes with sales)" : "Tickets sold per minute"),
    h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "Minute"), h("th", { scope: "col" }, "Tickets"))),
    h("tbody", {}, recent.map((p) => h("tr", {}, h("td", {}, clock(p.t, withDate)), h("td", {}, String(p.n))))),
  );
  return [chart, table];
}
