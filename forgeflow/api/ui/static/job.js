// One job: its stage timeline filled in by the job's WebSocket messages as they arrive (start,
// in-stage progress, end, error), the failure with its partial result, the result envelope, the
// annotated media the job stored, and every message received (seq, type) in order.

import { api, ApiError, LiveStream, mediaObjectUrl, may } from "./api.js";
import { elapsed, formatBytes, formatMs, formatTime, h, prettyJson, setConnection, statusBadge, TERMINAL } from "./dom.js";

export async function jobView(main, jobId, me = null) {
  const path = `/v1/jobs/${encodeURIComponent(jobId)}`;
  let job;
  let pipeline;
  try {
    [job, pipeline] = await Promise.all([api(path), api(`${path}/pipeline`)]);
  } catch (error) {
    if (error instanceof ApiError && error.status === 404) {
      main.append(h("h1", {}, "Job not found"), h("p", {}, `There is no job ${jobId}. `, h("a", { href: "#/jobs" }, "See all jobs.")));
      return null;
    }
    throw error;
  }

  const state = {
    status: job.status,
    flowRunId: job.flow_run_id,
    startedAt: job.started_at,
    finishedAt: job.finished_at,
    stages: pipeline.stages.map((s) => ({ ...s })),
    completed: pipeline.stages_executed,
    waiting: null,
    envelopeShown: null,
    cancelledBy: job.cancelled_by,
  };

  const statusCell = h("dd", { id: "job-status" });
  const cancelledByCell = h("dd", { id: "job-cancelled-by" });
  // Its own jobs a "run" token may cancel; another's takes "admin".
  const mayCancel = may(me, "admin") || (may(me, "run") && (!me || job.created_by === me.name));
  const durationCell = h("dd", { id: "job-duration" });
  const stagesCell = h("dd", { id: "job-stages" });
  const flowRunCell = h("dd", { id: "job-flow-run" });
  const waitingCell = h("p", { class: "muted", role: "status" });
  const cancelButton = h("button", { type: "button", class: "secondary", id: "cancel-job" }, "Cancel job");
  cancelButton.addEventListener("click", async () => {
    cancelButton.disabled = true;
    try {
      const answer = await api(`${path}/cancel`, { method: "POST" });
      state.cancelledBy = answer.cancelled_by;
      render();
    } catch (error) { cancelButton.after(h("span", { class: "error" }, ` ${error.message}`)); }
  });
  // A job that ended without success may be retried: a linked job that resumes its work.
  const retryButton = h("button", { type: "button", class: "secondary", id: "retry-job" }, "Retry (resume)");
  retryButton.addEventListener("click", async () => {
    retryButton.disabled = true;
    try {
      const answer = await api(`${path}/retry`, { method: "POST" });
      location.hash = `#/jobs/${encodeURIComponent(answer.job_id)}`;
    } catch (error) { retryButton.disabled = false; retryButton.after(h("span", { class: "error" }, ` ${error.message}`)); }
  });
  const timeline = h("ol", { class: "timeline", id: "stages", "aria-labelledby": "stages-heading" });
  const failure = h("section", { id: "failure", "aria-labelledby": "failure-heading", hidden: true });
  const media = h("section", { id: "media", class: "media", "aria-labelledby": "media-heading" },
    h("h2", { id: "media-heading" }, "Annotated media"), h("p", { class: "muted" }, "Made by the job when it ends."));
  const envelopePre = h("pre", { id: "envelope", tabindex: "0", "aria-label": "Result envelope as JSON" });
  const envelopeSummary = h("p", { id: "envelope-summary" }, "The job has not ended yet.");
  const messages = h("ol", { class: "messages", id: "messages", "aria-label": "Messages received", tabindex: "0" });
  const messagesSummary = h("summary", {}, "Messages (0)");

  main.append(
    h("h1", {}, "Job ", h("code", {}, jobId)),
    h("section", { class: "panel", "aria-label": "Job summary" },
      h("dl", { class: "kv" },
        h("dt", {}, "Status"), statusCell,
        h("dt", {}, "Pipeline"), h("dd", {}, job.pipeline_id ? h("a", { href: "#/templates" }, `template ${job.pipeline_id}`) : `${job.source} pipeline`),
        h("dt", {}, "Input"), h("dd", {}, h("code", {}, JSON.stringify(job.input))),
        h("dt", {}, "Created"), h("dd", {}, formatTime(job.created_at)),
        h("dt", {}, "Submitted by"), h("dd", { id: "job-created-by" }, job.created_by || "–"),
        h("dt", {}, "Cancelled by"), cancelledByCell,
        ...(job.retry_of ? [h("dt", {}, "Retry of"), h("dd", {}, h("a", { href: `#/jobs/${encodeURIComponent(job.retry_of)}` }, job.retry_of))] : []),
        ...(job.batch_id ? [h("dt", {}, "Batch"), h("dd", {}, h("a", { href: `#/batches/${encodeURIComponent(job.batch_id)}` }, job.batch_id))] : []),
        ...(job.reused_from ? [h("dt", {}, "Reused the result of"), h("dd", {}, h("a", { href: `#/jobs/${encodeURIComponent(job.reused_from)}` }, job.reused_from))] : []),
        h("dt", {}, "Duration"), durationCell,
        h("dt", {}, "Stages"), stagesCell,
        h("dt", {}, "Flow run"), flowRunCell),
      waitingCell,
      h("div", { class: "row" }, cancelButton, retryButton, h("a", { href: "#/jobs" }, "All jobs"))),
    h("section", { "aria-labelledby": "stages-heading" }, h("h2", { id: "stages-heading" }, "Stages"), h("div", { class: "panel" }, timeline)),
    failure,
    media,
    h("section", { "aria-labelledby": "envelope-heading" }, h("h2", { id: "envelope-heading" }, "Result envelope"), envelopeSummary,
      h("details", {}, h("summary", {}, "The envelope as JSON"), envelopePre)),
    h("section", { "aria-labelledby": "messages-heading" }, h("h2", { id: "messages-heading" }, "Messages"),
      h("details", {}, messagesSummary, messages)),
  );

  const stageAt = (index, message) => {
    while (state.stages.length <= index) {
      state.stages.push({ index: state.stages.length, plugin: "", tool: "", status: "pending", attempt: 1 });
    }
    const stage = state.stages[index];
    if (message?.plugin && !stage.plugin) { stage.plugin = message.plugin; stage.tool = message.tool || ""; }
    return stage;
  };

  const stageItem = (stage) => {
    const details = [];
    const add = (term, ...value) => details.push(h("div", {}, h("dt", {}, term), h("dd", {}, ...value)));
    const running = stage.status === "running";
    add("Duration", running ? formatMs(elapsed(stage.started_at)) : formatMs(stage.duration_ms));
    const p = stage.progress;
    if (p && (running || stage.status === "completed" || stage.status === "failed")) {
      const fraction = p.fraction ?? null;
      add("Progress",
        h("progress", { max: 1, value: stage.status === "completed" ? 1 : fraction ?? undefined, "aria-label": `Progress of stage ${stage.index}` }),
        ` ${p.message || `${p.done}${p.total ? ` / ${p.total}` : ""}`}`,
        running && p.rate ? ` · ${p.rate.toFixed(1)}/s` : "",
        running && p.eta_s !== null && p.eta_s !== undefined ? ` · ETA ${formatMs(p.eta_s * 1000)}` : "");
    }
    if (stage.result_size_bytes !== undefined && stage.result_size_bytes !== null) add("Output", formatBytes(stage.result_size_bytes));
    if (stage.peak_memory_mb !== undefined && stage.peak_memory_mb !== null) add("Peak memory", `${Math.round(stage.peak_memory_mb)} MB`);
    if (stage.attempt > 1) add("Attempt", String(stage.attempt));
    return h("li", { dataset: { stageIndex: String(stage.index), status: stage.status } },
      h("span", { class: "index", "aria-hidden": "true" }, String(stage.index)),
      h("div", {},
        h("div", { class: "row" }, h("span", { class: "name" }, `Stage ${stage.index}: ${stage.plugin}.${stage.tool}`), statusBadge(stage.status)),
        h("dl", {}, details),
        stage.error ? h("div", { class: "stage-error" }, `${stage.error_type || "Error"}: ${stage.error}`) : null));
  };

  const showEnvelope = async (view) => {
    const envelope = view.envelope;
    if (!envelope || state.envelopeShown === envelope) return;
    state.envelopeShown = envelope;
    envelopePre.textContent = prettyJson(envelope);
    const result = envelope.ok ? envelope.result : envelope.partial_result;
    const parts = Object.entries(result || {}).map(([key, value]) => (Array.isArray(value) ? `${key}: ${value.length} item(s)` : key));
    envelopeSummary.textContent = `${envelope.ok ? "Succeeded" : "Did not succeed"}: ${envelope.stages_executed ?? 0} stage(s) executed; `
      + `${envelope.ok ? "result" : "partial result"}: ${parts.join(", ") || "empty"}.`;
    if (!envelope.ok) {
      failure.hidden = false;
      failure.className = "alert";
      failure.setAttribute("role", "alert");
      const failedAt = envelope.stage_failed;
      const stage = failedAt !== null && failedAt !== undefined ? state.stages[failedAt] : null;
      failure.replaceChildren(
        h("h2", { id: "failure-heading" }, `Job ${view.status}`),
        h("p", { id: "failure-error" }, stage ? `Stage ${failedAt} (${stage.plugin}.${stage.tool}) failed: ` : "", h("strong", {}, envelope.error_type || "Error"), `: ${envelope.error || ""}`),
        h("h3", {}, "Partial result"),
        h("p", { class: "muted" }, `What the ${envelope.stages_executed ?? 0} completed stage(s) produced before it stopped.`),
        h("pre", { id: "partial-result", tabindex: "0", "aria-label": "Partial result as JSON" }, prettyJson(envelope.partial_result ?? {})));
    }
    const annotated = envelope.annotated_media;
    const heading = h("h2", { id: "media-heading" }, "Annotated media");
    if (annotated && annotated.ref && media.dataset.ref === annotated.ref) return; // shown (and maybe playing)
    if (annotated && annotated.ref) {
      media.dataset.ref = annotated.ref;
      const url = await mediaObjectUrl(annotated.ref);
      const label = `Annotated ${annotated.kind} of job ${jobId}: boxes, track ids, skeletons and actions`;
      const element = annotated.kind === "video"
        ? h("video", { src: url, controls: true, muted: true, playsinline: true, loop: true, "aria-label": label, id: "annotated-media" })
        : h("img", { src: url, alt: label, id: "annotated-media" });
      media.replaceChildren(heading, h("figure", {}, element,
        h("figcaption", { class: "muted" }, `${annotated.media_type}, ${formatBytes(annotated.size_bytes)}${annotated.frames ? `, ${annotated.frames} frames` : ""} · `,
          h("a", { href: url, download: `annotated-${jobId}.${annotated.kind === "video" ? "mp4" : "jpg"}` }, "Download"))));
    } else if (envelope.annotated_media_error) {
      media.replaceChildren(heading, h("p", { class: "error" }, `The annotated media could not be made: ${envelope.annotated_media_error}`));
    } else {
      media.replaceChildren(heading, h("p", { class: "muted" }, "None: the job had no media input, or its result has nothing to draw."));
    }
  };

  const render = () => {
    statusCell.replaceChildren(statusBadge(state.status));
    durationCell.textContent = formatMs(elapsed(state.startedAt, state.finishedAt));
    stagesCell.textContent = `${state.completed} of ${state.stages.length} completed`;
    flowRunCell.textContent = state.flowRunId || "–";
    cancelButton.hidden = TERMINAL.has(state.status) || !mayCancel;
    retryButton.hidden = !TERMINAL.has(state.status) || state.status === "succeeded" || !may(me, "run");
    cancelledByCell.textContent = state.cancelledBy || "–";
    waitingCell.textContent = state.status === "queued" && state.waiting ? `Waiting for ${state.waiting}` : "";
    timeline.replaceChildren(...state.stages.map(stageItem));
  };
  let scheduled = false;
  const renderSoon = () => {
    if (scheduled) return;
    scheduled = true;
    setTimeout(() => { scheduled = false; render(); }, 30);
  };

  const refresh = async () => {
    const [view, stages] = await Promise.all([api(path), api(`${path}/pipeline`)]);
    state.status = view.status;
    state.flowRunId = view.flow_run_id || state.flowRunId;
    state.startedAt = view.started_at;
    state.finishedAt = view.finished_at;
    state.cancelledBy = view.cancelled_by;
    state.stages = stages.stages.map((s) => ({ ...s }));
    state.completed = stages.stages_executed;
    render();
    await showEnvelope(view);
  };

  const describe = (m) => {
    const stage = m.stage_index !== undefined && m.stage_index !== null ? ` stage ${m.stage_index}` : "";
    if (m.type === "job_status") return `${m.status}`;
    if (m.type === "pipeline_stage_progress") return `${stage}: ${m.done}${m.total ? `/${m.total}` : ""}`;
    if (m.type === "pipeline_stage_end") return `${stage}: ${m.ok ? "ok" : "failed"} in ${formatMs(m.duration_ms)}`;
    if (m.type === "pipeline_error") return `${stage}: ${m.error_type}`;
    if (m.type === "pipeline_progress") return ` ${m.stages_completed}/${m.stages_total}`;
    return stage;
  };

  const apply = (m) => {
    messages.append(h("li", { value: m.seq, dataset: { seq: String(m.seq), type: m.type } }, `${m.type}${describe(m)} · ${formatTime(m.timestamp)}`));
    messagesSummary.textContent = `Messages (${messages.childElementCount}, last seq ${m.seq})`;
    const stage = m.stage_index !== undefined && m.stage_index !== null ? stageAt(m.stage_index, m) : null;
    switch (m.type) {
      case "job_status":
        state.status = m.status;
        state.waiting = m.waiting_for || null;
        if (m.flow_run_id) state.flowRunId = m.flow_run_id; // a job submitted here gets its flow run when it starts
        if (m.status === "running" && !state.startedAt) state.startedAt = m.timestamp;
        if (TERMINAL.has(m.status)) {
          state.finishedAt = state.finishedAt || m.timestamp;
          refresh().catch(() => {});
        }
        break;
      case "pipeline_stage_start":
        Object.assign(stage, { status: "running", started_at: m.timestamp, attempt: m.attempt || 1, progress: null, error: null, error_type: null, duration_ms: null });
        if (state.status === "queued") state.status = "running";
        break;
      case "pipeline_stage_progress":
        stage.progress = { done: m.done, total: m.total, fraction: m.fraction, message: m.message, rate: m.rate, eta_s: m.eta_s };
        if (stage.status === "pending") stage.status = "running";
        break;
      case "pipeline_stage_end":
        Object.assign(stage, { status: m.ok ? "completed" : "failed", duration_ms: m.duration_ms, result_size_bytes: m.result_size_bytes, peak_memory_mb: m.peak_memory_mb, ended_at: m.timestamp });
        break;
      case "pipeline_error":
        if (stage) {
          stage.error = m.error;
          stage.error_type = m.error_type;
          if (m.error_type === "cancelled") stage.status = "cancelled";
          else if (stage.status !== "completed") stage.status = "failed";
        }
        break;
      case "pipeline_progress":
        state.completed = m.stages_completed;
        break;
      default:
        break;
    }
    renderSoon();
  };

  render();
  if (TERMINAL.has(job.status)) await showEnvelope(job);
  // Every message from the first: the page shows the job's whole history, then what follows live.
  const stream = new LiveStream(`${path.replace("/v1/jobs/", "/v1/ws/jobs/")}`, {
    key: "seq", param: "after_seq", position: 0, onMessage: apply, onState: setConnection,
  }).start();
  const ticker = setInterval(() => { if (state.status === "running") render(); }, 1000);
  return () => { stream.stop(); clearInterval(ticker); };
}
