// The page's shell: hash routes (#/events/<id>, …) to page modules, the navigation bar and the
// live-connection badge. Each page module exports ``render(root, params)`` and may return a
// function that stops what the page started (timers, room subscriptions).

import { onSession, restore, signOut, user } from "./api.js";
import { go, h, replace, toast } from "./dom.js";
import { onState } from "./live.js";

const ROUTES = [
  [/^\/?$/, () => import("./pages/events.js")],
  [/^\/events\/(?<id>[0-9a-f-]{36})$/, () => import("./pages/event.js")],
  [/^\/signin$/, () => import("./pages/auth.js"), { mode: "signin" }],
  [/^\/signup$/, () => import("./pages/auth.js"), { mode: "signup" }],
  [/^\/bookings$/, () => import("./pages/account.js"), { mode: "bookings" }],
  [/^\/tickets$/, () => import("./pages/account.js"), { mode: "tickets" }],
  [/^\/organizer$/, () => import("./pages/organizer.js"), { mode: "home" }],
  [/^\/organizer\/venues\/new$/, () => import("./pages/organizer.js"), { mode: "venue" }],
  [/^\/organizer\/events\/new$/, () => import("./pages/organizer.js"), { mode: "event" }],
  [/^\/organizer\/events\/(?<id>[0-9a-f-]{36})$/, () => import("./pages/organizer.js"), { mode: "manage" }],
  [/^\/door(?:\/(?<id>[0-9a-f-]{36}))?$/, () => import("./pages/door.js")],
];

let stop = null;

function parse() {
  const raw = location.hash.replace(/^#/, "") || "/";
  const [path, search = ""] = raw.split("?");
  return { path, query: new URLSearchParams(search) };
}

async function route() {
  const { path, query } = parse();
  const main = document.getElementById("main");
  if (typeof stop === "function") stop();
  stop = null;
  for (const [pattern, load, extra] of ROUTES) {
    const match = pattern.exec(path);
    if (!match) continue;
    const module = await load();
    replace(main);
    stop = await module.render(main, { ...(match.groups || {}), ...(extra || {}), query });
    main.focus({ preventScroll: true });
    return;
  }
  replace(main, h("h1", {}, "Not found"), h("p", {}, h("a", { href: "#/" }, "See the events")));
}

function link(href, text) {
  const current = ("#" + (parse().path || "/")).startsWith(href) && href !== "#/";
  return h("a", { href, "aria-current": current ? "page" : null }, text);
}

function drawNav() {
  const u = user();
  const items = [link("#/", "Events")];
  if (u) {
    items.push(link("#/bookings", "My bookings"), link("#/tickets", "My tickets"));
    if (u.role === "organizer" || u.role === "admin") {
      items.push(link("#/organizer", "Organizer"), link("#/door", "Door"));
    }
    items.push(
      h("span", { class: "who" }, u.name),
      h(
        "button",
        {
          class: "link",
          onclick: async () => {
            await signOut();
            toast("Signed out.");
            go("/");
          },
        },
        "Sign out",
      ),
    );
  } else {
    items.push(link("#/signin", "Sign in"), link("#/signup", "Sign up"));
  }
  replace(document.getElementById("nav"), items);
}

onState((state) => {
  const badge = document.getElementById("live-status");
  badge.dataset.state = state;
  badge.textContent = { live: "● live", connecting: "○ connecting", reconnecting: "○ reconnecting", offline: "" }[state];
});

window.addEventListener("hashchange", () => {
  drawNav();
  route().catch((e) => toast(e.message, "error"));
});

onSession(drawNav);
await restore();
drawNav();
await route();
document.documentElement.dataset.ready = "true";
