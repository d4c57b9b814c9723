// Sign in and sign up.

import { signIn, signUp } from "../api.js";
import { errorBlock, field, go, h, replace, toast, values } from "../dom.js";

export async function render(root, { mode, query }) {
  const up = mode === "signup";
  const next = query.get("next") || "/";
  const problem = h("div");
  const inputs = [
    up ? field("Name", h("input", { name: "name", required: true, autocomplete: "name", maxlength: 200 })) : null,
    field("Email", h("input", { name: "email", type: "email", required: true, autocomplete: "email" })),
    field(
      "Password",
      h("input", { name: "password", type: "password", required: true, minlength: up ? 12 : null, autocomplete: up ? "new-password" : "current-password" }),
      up ? "At least 12 characters." : null,
    ),
    up
      ? field(
          "I am",
          h(
            "select",
            { name: "role" },
            h("option", { value: "attendee" }, "buying tickets"),
            h("option", { value: "organizer", selected: query.get("role") === "organizer" }, "organizing events"),
          ),
        )
      : null,
  ];
  const button = h("button", { type: "submit" }, up ? "Create account" : "Sign in");
  const form = h("form", { class: "narrow card", novalidate: true }, inputs, problem, button);
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    button.disabled = true;
    replace(problem);
    try {
      const fields = values(form);
      if (up) await signUp(fields);
      else await signIn(fields.email || "", fields.password || "");
      toast(up ? "Welcome to Bilten." : "Signed in.");
      go(next);
    } catch (error) {
      replace(problem, errorBlock(error));
    } finally {
      button.disabled = false;
    }
  });
  const other = up
    ? h("p", {}, "Have an account? ", h("a", { href: `#/signin?next=${encodeURIComponent(next)}` }, "Sign in"))
    : h("p", {}, "New here? ", h("a", { href: `#/signup?next=${encodeURIComponent(next)}` }, "Create an account"));
  replace(root, h("h1", {}, up ? "Create an account" : "Sign in"), form, other);
  form.querySelector("input").focus();
}
