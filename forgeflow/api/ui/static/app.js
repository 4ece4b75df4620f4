// The page's router: #/jobs, #/jobs/<id>, #/batches, #/batches/<id>, #/run, #/templates, #/plugins. Each view renders into
// <main> and returns a cleanup function (it closes its WebSocket streams when the view is left).
// The page offers only what the token may do (GET /v1/auth/me): no Run page without "run", no
// cancel of another's job without "admin", no template deletes without "admin".

import { may, whoami } from "./api.js";
import { h, setConnection } from "./dom.js";
import { jobsView } from "./jobs.js";
import { jobView } from "./job.js";
import { batchesView, batchView } from "./batches.js";
import { runView } from "./run.js";
import { pluginsView, templatesView } from "./catalog.js";

export const boot = JSON.parse(document.getElementById("boot").textContent);

const main = document.getElementById("main");
let cleanup = null;

function parseRoute() {
  const hash = location.hash.startsWith("#/") ? location.hash.slice(2) : "jobs";
  const [path, query = ""] = hash.split("?");
  const parts = path.split("/").filter(Boolean).map(decodeURIComponent);
  return { parts, params: new URLSearchParams(query) };
}

async function render(navigated) {
  if (cleanup) cleanup();
  cleanup = null;
  setConnection("");
  const { parts, params } = parseRoute();
  const section = parts[0] || "jobs";
  let me = null;
  try { me = await whoami(); } catch { /* unknown: offer everything, the service still decides */ }
  const caller = document.getElementById("caller");
  caller.textContent = me && me.name ? `${me.name} · ${me.scopes.join(", ")}` : "";
  caller.title = me && me.name ? "The API token of this tab: its name and what it may do" : "";
  for (const link of document.querySelectorAll("nav a")) {
    if (link.dataset.section === section) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
    if (link.dataset.section === "run") link.hidden = !may(me, "run");
  }
  main.replaceChildren();
  let view;
  if (section === "jobs" && parts[1]) view = jobView(main, parts[1], me);
  else if (section === "jobs") view = jobsView(main, params, me);
  else if (section === "batches" && parts[1]) view = batchView(main, parts[1], me);
  else if (section === "batches") view = batchesView(main);
  else if (section === "run") view = runView(main, params, boot, me);
  else if (section === "templates") view = templatesView(main, me);
  else if (section === "plugins") view = pluginsView(main);
  else {
    main.append(h("h1", {}, "Not found"), h("p", {}, "No such page. ", h("a", { href: "#/jobs" }, "Go to the jobs.")));
  }
  try {
    cleanup = (await view) || null;
  } catch (error) {
    main.append(h("p", { class: "error", role: "alert" }, `Could not load this page: ${error.message}`));
  }
  // After a navigation the focus goes to the new view's heading (as a page load would put it at the
  // top), unless something in the view took it already.
  const heading = main.querySelector("h1");
  if (navigated && heading && document.activeElement === document.body) {
    heading.setAttribute("tabindex", "-1");
    heading.focus({ preventScroll: true });
  }
}

document.querySelector(".skip-link").addEventListener("click", (event) => {
  event.preventDefault(); // "#main" is not a route
  main.focus();
});
window.addEventListener("hashchange", () => render(true));
render(false);
