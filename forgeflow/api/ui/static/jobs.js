// Jobs: the list, filtered by status and template, kept live by the all-jobs WebSocket.

import { api, LiveStream, may } from "./api.js";
import { elapsed, formatMs, formatTime, h, setConnection, statusBadge, TERMINAL } from "./dom.js";

const STATUSES = ["queued", "running", "succeeded", "failed", "cancelled", "crashed"];
const PAGE = 100;

export async function jobsView(main, params, me = null) {
  const status = params.get("status") || "";
  const template = params.get("pipeline_id") || "";
  const heading = h("h1", {}, "Jobs");
  const statusSelect = h("select", { id: "filter-status", name: "status" },
    h("option", { value: "" }, "All statuses"), STATUSES.map((s) => h("option", { value: s, selected: s === status }, s)));
  const templateSelect = h("select", { id: "filter-template", name: "pipeline_id" }, h("option", { value: "" }, "All templates"));
  const applyFilters = () => {
    const query = new URLSearchParams();
    if (statusSelect.value) query.set("status", statusSelect.value);
    if (templateSelect.value) query.set("pipeline_id", templateSelect.value);
    location.hash = `#/jobs${query.toString() ? `?${query}` : ""}`;
  };
  statusSelect.addEventListener("change", applyFilters);
  templateSelect.addEventListener("change", applyFilters);
  const count = h("p", { class: "muted", id: "jobs-count", role: "status" });
  const body = h("tbody");
  const table = h("table", { id: "jobs-table" },
    h("caption", { class: "muted caption" }, "Newest first; updates live."),
    h("thead", {}, h("tr", {},
      ["Job", "Status", "Pipeline", "Current stage", "Progress", "Duration", "Created", "By"].map((t) => h("th", { scope: "col" }, t)))),
    body);
  main.append(heading,
    h("form", { class: "filters", role: "search", "aria-label": "Filter jobs", onsubmit: (e) => e.preventDefault() },
      h("div", {}, h("label", { for: "filter-status" }, "Status"), statusSelect),
      h("div", {}, h("label", { for: "filter-template" }, "Template"), templateSelect),
      may(me, "run") ? h("a", { href: "#/run" }, "Run a pipeline") : null),
    count, table);

  api("/v1/pipelines").then((templates) => {
    for (const t of templates) templateSelect.append(h("option", { value: t.id, selected: t.id === template }, t.name));
  }).catch(() => {});

  const jobs = new Map(); // job id -> summary (the API's JobSummary, updated by messages)
  let total = 0;
  let loaded = false;
  const early = []; // messages that came before the list

  const matches = (job) => (!status || job.status === status) && (!template || job.pipeline_id === template);

  const row = (job) => {
    const stage = job.current_stage;
    const progress = h("progress", { max: job.stages_total || 1, value: job.stages_completed || 0,
      "aria-label": `Stages completed of job ${job.job_id}` });
    const tr = h("tr", { dataset: { jobId: job.job_id, status: job.status } },
      h("td", {}, h("a", { href: `#/jobs/${encodeURIComponent(job.job_id)}` }, job.job_id)),
      h("td", {}, statusBadge(job.status)),
      h("td", {}, (job.stages || []).join(" → ") || "–", job.pipeline_id ? h("div", { class: "muted" }, `template ${job.pipeline_id}`) : null),
      h("td", { class: "current-stage" }, stage !== null && stage !== undefined && job.stages?.[stage] ? `${stage}: ${job.stages[stage]}` : "–",
        job.stage_fraction !== undefined && job.stage_fraction !== null ? h("div", { class: "muted" }, `${Math.round(job.stage_fraction * 100)} % of the stage`) : null),
      h("td", {}, progress, ` ${job.stages_completed}/${job.stages_total}`),
      h("td", { class: "duration" }, formatMs(elapsed(job.started_at, job.finished_at))),
      h("td", {}, formatTime(job.created_at)),
      h("td", { class: "created-by" }, job.created_by || "–"));
    return tr;
  };

  const draw = () => {
    const shown = [...jobs.values()].filter(matches).sort((a, b) => (b.created_at || "").localeCompare(a.created_at || ""));
    body.replaceChildren(...shown.map(row));
    count.textContent = shown.length ? `${total} job${total === 1 ? "" : "s"}${total > shown.length ? `, the newest ${shown.length} shown` : ""}` : "No jobs yet.";
  };

  const fetching = new Map(); // job id -> messages that came while its state was being fetched
  const apply = async (message) => {
    if (!loaded) { early.push(message); return; }
    let job = jobs.get(message.job_id);
    if (!job) {
      // A job this page has not listed yet: read its state, then apply what came after it.
      if (fetching.has(message.job_id)) { fetching.get(message.job_id).push(message); return; }
      fetching.set(message.job_id, [message]);
      try { job = await api(`/v1/jobs/${encodeURIComponent(message.job_id)}`); } catch { fetching.delete(message.job_id); return; }
      job.stages = ((job.pipeline || {}).stages || []).map((s) => `${s.plugin}.${s.tool}`);
      if (matches(job)) total += 1;
      jobs.set(job.job_id, job);
      const later = fetching.get(job.job_id).filter((m) => m.seq > job.last_seq);
      fetching.delete(job.job_id);
      for (const m of later) await apply(m);
      draw();
      return;
    }
    if (message.type === "job_status") {
      job.status = message.status;
      if (message.status === "running" && !job.started_at) job.started_at = message.timestamp;
      if (TERMINAL.has(message.status)) { job.finished_at = message.timestamp; job.current_stage = null; }
    } else if (message.type === "pipeline_stage_start") {
      job.current_stage = message.stage_index;
      job.stage_fraction = null;
      if (job.status === "queued") job.status = "running";
    } else if (message.type === "pipeline_stage_progress") {
      job.current_stage = message.stage_index;
      job.stage_fraction = message.fraction;
    } else if (message.type === "pipeline_progress") {
      job.stages_completed = message.stages_completed;
      job.stages_total = message.stages_total;
    }
    draw();
  };

  const load = async () => {
    const query = new URLSearchParams({ limit: String(PAGE) });
    if (status) query.set("status", status);
    if (template) query.set("pipeline_id", template);
    const list = await api(`/v1/jobs?${query}`);
    jobs.clear();
    for (const job of list.items) jobs.set(job.job_id, job);
    total = list.total;
    loaded = true;
    draw();
    for (const message of early.splice(0)) await apply(message);
  };

  // The stream first, then the list: nothing that happens in between is missed.
  let firstOpen = true;
  const stream = new LiveStream("/v1/ws/jobs", {
    key: "cursor",
    param: "after_cursor",
    onMessage: apply,
    onState: setConnection,
    onOpen: () => {
      // A reconnect without a cursor yet cannot resume: read the list again.
      if (firstOpen || stream.position === null) { firstOpen = false; loaded = false; load().catch(() => {}); }
    },
  }).start();
  const ticker = setInterval(() => {
    for (const tr of body.querySelectorAll("tr[data-status='running']")) {
      const job = jobs.get(tr.dataset.jobId);
      if (job) tr.querySelector(".duration").textContent = formatMs(elapsed(job.started_at, job.finished_at));
    }
  }, 1000);
  return () => { stream.stop(); clearInterval(ticker); };
}
