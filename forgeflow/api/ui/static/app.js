// The page's router: #/jobs, #/jobs/<id>, #/run, #/templates, #/plugins. Each view renders into
// <main> and returns a cleanup function (it closes its WebSocket streams when the view is left).

import { h, setConnection } from "./dom.js";
import { jobsView } from "./jobs.js";
import { jobView } from "./job.js";
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
  for (const link of document.querySelectorAll("nav a")) {
    if (link.dataset.section === section) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  main.replaceChildren();
  let view;
  if (section === "jobs" && parts[1]) view = jobView(main, parts[1]);
  else if (section === "jobs") view = jobsView(main, params);
  else if (section === "run") view = runView(main, params, boot);
  else if (section === "templates") view = templatesView(main);
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
