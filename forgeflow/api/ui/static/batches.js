// Batches: the list (progress, counts, files/s, ETA) and one batch (its files, each with its job),
// kept live by the `batch_progress` messages of the all-jobs WebSocket. Those messages are live only
// (not replayed after a reconnect), so each (re)connection reads the batches again to catch up.

import { api, LiveStream, may } from "./api.js";
import { elapsed, formatMs, formatTime, h, setConnection, statusBadge, TERMINAL } from "./dom.js";

const PAGE = 50;
/** File statuses that "Retry failed" gives a new job (as `POST /v1/batches/{id}/retry` does). */
const RETRYABLE = new Set(["failed", "crashed", "cancelled"]);

/** When a snapshot of a batch (a GET answer, or a `batch_progress` message) was taken. */
const takenAt = (snapshot) => Date.parse(snapshot.timestamp || snapshot.updated_at || "") || 0;

/**
 * Whether ``snapshot`` should replace ``current``: a GET answer and a message may cross on the way.
 * While the status stays the same the batch only moves forward (more files done); a new status wins
 * only when it is not older than what the page shows (a retry runs an ended batch again).
 */
function isNewer(snapshot, current) {
  if (!current) return true;
  if (snapshot.status === current.status) return (snapshot.counts?.done ?? 0) >= (current.counts?.done ?? 0);
  return takenAt(snapshot) >= takenAt(current);
}

/** Files ended per second: the service's figure, or (for a batch read from the list) done over its time. */
function filesPerSecond(batch) {
  if (batch.files_per_s !== undefined && batch.files_per_s !== null) return batch.files_per_s;
  const ms = elapsed(batch.created_at, batch.finished_at);
  return batch.counts.done && ms ? batch.counts.done / (ms / 1000) : null;
}

const formatRate = (batch) => {
  const rate = filesPerSecond(batch);
  return rate === null ? "–" : `${rate.toFixed(rate < 10 ? 2 : 1)} files/s`;
};
const formatEta = (batch) => (batch.status === "running" && batch.eta_s !== undefined && batch.eta_s !== null ? formatMs(batch.eta_s * 1000) : "–");

/** The batch's progress bar and "done / total". */
function progressOf(batch, label) {
  const { done, total } = batch.counts;
  return [h("progress", { max: total || 1, value: done, "aria-label": label, dataset: { done: String(done), total: String(total) } }),
    h("span", { class: "done" }, ` ${done}/${total}`)];
}

/** Applies a snapshot (message or GET answer) to ``batches`` when it is newer; whether it did. */
function merge(batches, snapshot) {
  const current = batches.get(snapshot.batch_id);
  if (!isNewer(snapshot, current)) return false;
  const { type, ...fields } = snapshot;
  batches.set(snapshot.batch_id, { ...(current || {}), ...fields, counts: { ...(current?.counts || {}), ...snapshot.counts } });
  return true;
}

export async function batchesView(main) {
  const count = h("p", { class: "muted", id: "batches-count", role: "status" });
  const body = h("tbody");
  main.append(h("h1", {}, "Batches"),
    h("p", { class: "muted" }, "One pipeline over many files, each file its own job (", h("code", {}, "POST /v1/batches"), ", ", h("code", {}, "forgeflow batch"), ")."),
    count,
    h("table", { id: "batches-table" },
      h("caption", { class: "muted caption" }, "Newest first; updates live."),
      h("thead", {}, h("tr", {},
        ["Batch", "Status", "Progress", "Succeeded", "Failed", "Reused", "Running", "Rate", "ETA", "Created", "By"].map((t) => h("th", { scope: "col" }, t)))),
      body));

  const batches = new Map(); // batch id -> the API's BatchSummaryItem, updated by messages
  let total = 0;
  let loaded = false;
  const early = [];

  const row = (b) => {
    const c = b.counts;
    const link = h("a", { href: `#/batches/${encodeURIComponent(b.batch_id)}` }, b.name);
    return h("tr", { dataset: { batchId: b.batch_id, status: b.status } },
      h("td", {}, link, b.name !== b.batch_id ? h("div", { class: "muted" }, b.batch_id) : null),
      h("td", {}, statusBadge(b.status), b.cancel_requested && b.status === "running" ? h("div", { class: "muted" }, "cancelling") : null),
      h("td", { class: "progress" }, progressOf(b, `Files done of batch ${b.name}`)),
      h("td", { class: "succeeded" }, String(c.succeeded)),
      h("td", { class: "failed" }, String(c.failed + c.crashed)),
      h("td", { class: "reused" }, String(c.reused)),
      h("td", { class: "running" }, String(c.running)),
      h("td", { class: "rate" }, formatRate(b)),
      h("td", { class: "eta" }, formatEta(b)),
      h("td", {}, formatTime(b.created_at)),
      h("td", {}, b.created_by || "–"));
  };
  const draw = () => {
    const shown = [...batches.values()].sort((a, b) => (b.created_at || "").localeCompare(a.created_at || ""));
    body.replaceChildren(...shown.map(row));
    count.textContent = shown.length ? `${total} batch${total === 1 ? "" : "es"}${total > shown.length ? `, the newest ${shown.length} shown` : ""}` : "No batches yet.";
  };

  const fetching = new Set();
  const apply = async (message) => {
    if (message.type !== "batch_progress") return;
    if (!loaded) { early.push(message); return; }
    if (!batches.has(message.batch_id)) {
      // A batch this page has not listed yet: read it (its name, source, creator), then the message.
      if (fetching.has(message.batch_id)) return;
      fetching.add(message.batch_id);
      try {
        const batch = await api(`/v1/batches/${encodeURIComponent(message.batch_id)}`);
        if (!batches.has(batch.batch_id)) total += 1;
        merge(batches, batch);
      } catch { /* gone, or not ours to read */ } finally { fetching.delete(message.batch_id); }
    }
    if (batches.has(message.batch_id)) merge(batches, message);
    draw();
  };

  const load = async () => {
    const list = await api(`/v1/batches?limit=${PAGE}`);
    for (const item of list.items) merge(batches, item);
    total = list.total;
    loaded = true;
    draw();
    for (const message of early.splice(0)) await apply(message);
  };

  // The stream first, then the list; its batch messages are not replayed, so every open reads again.
  const stream = new LiveStream("/v1/ws/jobs", {
    key: "cursor", param: "after_cursor", onMessage: apply, onState: setConnection,
    onOpen: () => { loaded = false; load().catch(() => {}); },
  }).start();
  return () => stream.stop();
}

/** Downloads an API file with the page's token (a plain link could not send it). */
async function download(path, filename) {
  const res = await api(path, { response: true });
  const url = URL.createObjectURL(await res.blob());
  const anchor = h("a", { href: url, download: filename, hidden: true });
  document.body.append(anchor);
  anchor.click();
  anchor.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10_000);
}

export async function batchView(main, batchId, me = null) {
  const path = `/v1/batches/${encodeURIComponent(batchId)}`;
  const batches = new Map();
  let batch;
  try {
    batch = await api(path);
  } catch (error) {
    if (error.status === 404) {
      main.append(h("h1", {}, "Batch not found"), h("p", {}, `There is no batch ${batchId}. `, h("a", { href: "#/batches" }, "See all batches.")));
      return null;
    }
    throw error;
  }
  merge(batches, batch);
  const jobFiles = new Map(); // job id -> file position: job messages update a file before the next GET

  const statusCell = h("dd", { id: "batch-status" });
  const progressCell = h("dd", { id: "batch-progress" });
  const countsCell = h("dd", { id: "batch-counts" });
  const rateCell = h("dd", { id: "batch-rate" });
  const etaCell = h("dd", { id: "batch-eta" });
  const finishedCell = h("dd", { id: "batch-finished" });
  const actionNote = h("span", { class: "error", role: "alert" });
  const files = h("tbody");
  const runAction = (button, action) => async () => {
    button.disabled = true;
    actionNote.textContent = "";
    try {
      await api(`${path}/${action}`, { method: "POST" });
      await refresh();
    } catch (error) { actionNote.textContent = error.message; }
    button.disabled = false;
  };
  const cancelButton = h("button", { type: "button", class: "secondary", id: "cancel-batch" }, "Cancel batch");
  cancelButton.addEventListener("click", runAction(cancelButton, "cancel"));
  const retryButton = h("button", { type: "button", class: "secondary", id: "retry-batch" }, "Retry failed files");
  retryButton.addEventListener("click", runAction(retryButton, "retry"));
  const downloadLink = (kind, label) => {
    const href = `${path}/summary.${kind}`;
    const link = h("a", { href, download: `${batchId}-summary.${kind}`, id: `summary-${kind}` }, label);
    link.addEventListener("click", (event) => {
      event.preventDefault();
      download(href, `${batchId}-summary.${kind}`).catch((error) => { actionNote.textContent = error.message; });
    });
    return link;
  };

  const source = batch.source.folder ? `${batch.source.folder} (${batch.source.pattern || "*"})` : `${batch.source.media ?? batch.files_total} uploaded file(s)`;
  const stages = ((batch.pipeline || {}).stages || []).map((s) => `${s.plugin}.${s.tool}`).join(" → ");
  main.append(
    h("h1", {}, "Batch ", h("code", {}, batch.name)),
    h("section", { class: "panel", "aria-label": "Batch summary" },
      h("dl", { class: "kv" },
        h("dt", {}, "Status"), statusCell,
        h("dt", {}, "Progress"), progressCell,
        h("dt", {}, "Files"), countsCell,
        h("dt", {}, "Rate"), rateCell,
        h("dt", {}, "ETA"), etaCell,
        h("dt", {}, "Id"), h("dd", {}, h("code", {}, batch.batch_id)),
        h("dt", {}, "Pipeline"), h("dd", {}, stages || "–", batch.pipeline_id ? h("div", { class: "muted" }, `template ${batch.pipeline_id}`) : null),
        h("dt", {}, "Source"), h("dd", {}, source),
        h("dt", {}, "At once"), h("dd", {}, `${batch.max_concurrency} job(s)${batch.force ? ", computing every file again (force)" : ""}`),
        h("dt", {}, "Created"), h("dd", {}, formatTime(batch.created_at)),
        h("dt", {}, "Submitted by"), h("dd", {}, batch.created_by || "–"),
        h("dt", {}, "Finished"), finishedCell),
      h("div", { class: "row" }, cancelButton, retryButton,
        h("span", {}, "Summary: ", downloadLink("parquet", "Parquet"), " · ", downloadLink("csv", "CSV")),
        h("a", { href: "#/batches" }, "All batches"), actionNote)),
    h("section", { "aria-labelledby": "files-heading" }, h("h2", { id: "files-heading" }, "Files"),
      h("table", { id: "batch-files", "aria-labelledby": "files-heading" },
        h("thead", {}, h("tr", {}, ["#", "File", "Status", "Job", "Attempts", "Error"].map((t) => h("th", { scope: "col" }, t)))),
        files)));

  const jobLink = (id) => h("a", { href: `#/jobs/${encodeURIComponent(id)}` }, id);
  const fileRow = (f) => h("tr", { dataset: { position: String(f.position), name: f.name, status: f.status, jobId: f.job_id || "" } },
    h("td", {}, String(f.position)),
    h("td", { class: "name" }, f.name),
    h("td", { class: "file-status" }, statusBadge(f.status)),
    h("td", { class: "job" }, f.job_id ? jobLink(f.job_id) : "–",
      f.reused_from ? h("div", { class: "muted reused" }, "reused the result of ", jobLink(f.reused_from)) : null),
    h("td", {}, String(f.attempts)),
    h("td", { class: "file-error error" }, f.error ? `${f.error_type || "Error"}: ${f.error}` : ""));

  const render = () => {
    const b = batches.get(batchId);
    const c = b.counts;
    statusCell.replaceChildren(statusBadge(b.status), b.cancel_requested && b.status === "running" ? " cancelling…" : "");
    progressCell.replaceChildren(...progressOf(b, "Files done of the batch"), ` done (${c.queued} queued, ${c.running} running)`);
    countsCell.textContent = `${c.succeeded} succeeded (${c.reused} reused), ${c.failed} failed, ${c.crashed} crashed, ${c.cancelled} cancelled`;
    rateCell.textContent = formatRate(b);
    etaCell.textContent = formatEta(b);
    finishedCell.textContent = b.finished_at ? formatTime(b.finished_at) : "–";
    const mayRun = may(me, "run");
    cancelButton.hidden = !mayRun || b.status !== "running" || b.cancel_requested;
    retryButton.hidden = !mayRun || b.status === "running" || !(b.files || []).some((f) => f.media && RETRYABLE.has(f.status));
    files.replaceChildren(...(b.files || []).map(fileRow));
    jobFiles.clear();
    for (const f of b.files || []) if (f.job_id) jobFiles.set(f.job_id, f.position);
  };

  // One GET at a time; a change that comes during one asks for one more after it.
  let reading = null;
  let again = false;
  const refresh = async () => {
    if (reading) { again = true; return reading; }
    reading = (async () => {
      do {
        again = false;
        merge(batches, await api(path));
        render();
      } while (again);
    })().finally(() => { reading = null; });
    return reading;
  };

  const apply = (m) => {
    const b = batches.get(batchId);
    if (m.type === "batch_progress" && m.batch_id === batchId) {
      if (merge(batches, m)) render();
      refresh().catch(() => {});
    } else if (m.type === "job_status" && jobFiles.has(m.job_id)) {
      const file = b.files.find((f) => f.position === jobFiles.get(m.job_id));
      if (file && file.job_id === m.job_id && !TERMINAL.has(file.status)) { file.status = m.status; render(); }
    }
  };

  render();
  const stream = new LiveStream("/v1/ws/jobs", {
    key: "cursor", param: "after_cursor", onMessage: apply, onState: setConnection,
    onOpen: () => { refresh().catch(() => {}); }, // batch messages are not replayed: read the batch again
  }).start();
  return () => stream.stop();
}
