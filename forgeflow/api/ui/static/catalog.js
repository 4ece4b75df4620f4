// Templates (saved pipelines with their run statistics) and plugins (lifecycle state, last error).

import { api, may } from "./api.js";
import { formatMs, formatTime, h } from "./dom.js";

/** The colour of a lifecycle state (the state's name is shown too). */
const STATE_CLASS = { FAILED: "failed", UNAVAILABLE: "crashed", RUNNING: "running", INITIALIZED: "succeeded", LOADED: "queued" };

/** Cancels and deletes with the token that asked (GET /v1/audit). */
async function auditSection() {
  const audit = await api("/v1/audit?limit=20");
  const words = { "job.cancel": "cancelled job", "template.delete": "deleted template" };
  return h("section", { "aria-labelledby": "audit-heading" }, h("h2", { id: "audit-heading" }, "Who cancelled and deleted what"),
    audit.items.length
      ? h("ul", { id: "audit" }, audit.items.map((a) => h("li", {}, `${formatTime(a.at)}: ${a.actor || "no token"} ${words[a.action] || a.action} `, h("code", {}, a.target))))
      : h("p", { class: "muted", id: "audit" }, "Nothing cancelled or deleted yet."));
}

export async function templatesView(main, me = null) {
  main.append(h("h1", {}, "Templates"));
  const list = await api("/v1/pipelines");
  if (!list.length) {
    main.append(h("p", {}, "No templates yet. Save one from the ", h("a", { href: "#/run" }, "Run"), " page or with POST /v1/pipelines."), await auditSection());
    return null;
  }
  const remove = async (t, button) => {
    button.disabled = true;
    try {
      await api(`/v1/pipelines/${encodeURIComponent(t.id)}`, { method: "DELETE" });
      location.hash = "#/templates?deleted=" + encodeURIComponent(t.id);
    } catch (error) {
      button.disabled = false;
      button.after(h("span", { class: "error" }, ` ${error.message}`));
    }
  };
  const details = await Promise.all(list.map((t) => api(`/v1/pipelines/${encodeURIComponent(t.id)}`)));
  const rows = details.map((t) => {
    const runs = Object.entries(t.runs || {}).filter(([, n]) => n).map(([s, n]) => `${n} ${s}`).join(", ") || "none";
    return h("tr", { dataset: { templateId: t.id } },
      h("th", { scope: "row" }, t.name, h("div", { class: "muted" }, t.id)),
      h("td", {}, h("ol", { start: 0, class: "issues" }, t.stage_stats.map((s) =>
        h("li", {}, `${s.plugin}.${s.tool}`, h("span", { class: "muted" }, ` · mean ${formatMs(s.mean_duration_ms)}, ${s.runs} run(s), ${s.failed} failed`))))),
      h("td", {}, runs),
      h("td", { class: "success-rate" }, t.success_rate === null || t.success_rate === undefined ? "–" : `${Math.round(t.success_rate * 100)} %`),
      h("td", {}, formatMs(t.mean_duration_ms)),
      h("td", { class: "last-used" }, formatTime(t.last_used)),
      h("td", { class: "created-by" }, t.created_by || "–"),
      h("td", {},
        may(me, "run") ? h("a", { href: `#/run?template=${encodeURIComponent(t.id)}` }, `Run ${t.name}`) : null,
        may(me, "admin") ? h("button", { type: "button", class: "secondary delete-template", onclick: (event) => remove(t, event.currentTarget) }, `Delete ${t.name}`) : null));
  });
  main.append(h("table", { id: "templates-table" },
    h("thead", {}, h("tr", {}, ["Template", "Stages (mean duration)", "Runs", "Success rate", "Mean duration", "Last used", "Saved by", ""].map((c) => h("th", { scope: "col" }, c)))),
    h("tbody", {}, rows)), await auditSection());
  return null;
}

export async function pluginsView(main) {
  main.append(h("h1", {}, "Plugins"));
  const plugins = await api("/v1/plugins");
  const rows = plugins.map((p) => {
    const life = p.lifecycle || {};
    return h("tr", { dataset: { plugin: p.name } },
      h("th", { scope: "row" }, p.name, p.aliases?.length ? h("div", { class: "muted" }, `aliases: ${p.aliases.join(", ")}`) : null),
      h("td", {}, p.version || "–"),
      h("td", { class: "plugin-state" }, h("span", { class: `status status-${STATE_CLASS[life.state] || "pending"}` }, life.state || "–")),
      h("td", {}, `${life.calls ?? 0} / ${life.failures ?? 0}`),
      h("td", { class: "last-error" }, p.available ? (life.last_error ? `${life.last_error_type || "Error"}: ${life.last_error}` : "–") : `unavailable: ${p.unavailable_reason}`),
      h("td", {}, (p.tools || []).map((t) => t.name).join(", ")));
  });
  main.append(h("table", { id: "plugins-table" },
    h("thead", {}, h("tr", {}, ["Plugin", "Version", "State", "Calls / failures", "Last error", "Tools"].map((c) => h("th", { scope: "col" }, c)))),
    h("tbody", {}, rows)));
  return null;
}
