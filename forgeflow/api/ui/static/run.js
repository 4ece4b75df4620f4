// Run: upload an image or video, choose a saved template or write a pipeline (checked while typing
// by POST /v1/pipeline-checks, the rules of POST /v1/jobs), submit, and go to the job's page.

import { api, ApiError, may } from "./api.js";
import { formatBytes, h } from "./dom.js";

/** "Stage 1 (pose-estimator.estimate_poses), field config.model: message" for a validation issue. */
export function describeIssue(issue) {
  const where = [];
  if (issue.stage_index !== null && issue.stage_index !== undefined) {
    where.push(`Stage ${issue.stage_index}${issue.plugin ? ` (${issue.plugin}${issue.tool ? `.${issue.tool}` : ""})` : ""}`);
  }
  if (issue.field) where.push(`field ${issue.field}`);
  return `${where.length ? `${where.join(", ")}: ` : ""}${issue.message || issue.error}`;
}

function errorList(body) {
  const issues = body.issues && body.issues.length ? body.issues : [body];
  return h("ul", { class: "issues" }, issues.map((issue) => h("li", {}, describeIssue(issue))));
}

export async function runView(main, params, boot, me = null) {
  if (!may(me, "run")) {
    main.append(h("h1", { id: "run-heading" }, "Run a pipeline"),
      h("p", { id: "run-refused", role: "status" }, `The token ${me.name} may ${me.scopes.join(", ") || "do nothing"}: running pipelines needs the "run" scope.`));
    return null;
  }
  let media = null; // the upload's MediaView
  const fileInput = h("input", { id: "media-file", type: "file", accept: "image/*,video/*", "aria-describedby": "media-status" });
  const mediaStatus = h("p", { id: "media-status", role: "status", "aria-live": "polite", class: "muted" }, "No file yet.");
  const useTemplate = h("input", { type: "radio", name: "source", id: "source-template", value: "template" });
  const useJson = h("input", { type: "radio", name: "source", id: "source-json", value: "json", checked: true });
  const templateSelect = h("select", { id: "template", name: "template", disabled: true });
  const templateInfo = h("p", { class: "muted", id: "template-info" });
  const textarea = h("textarea", { id: "pipeline-json", name: "pipeline", spellcheck: "false", "aria-describedby": "pipeline-status" },
    JSON.stringify(boot.example_pipeline, null, 2));
  const pipelineStatus = h("div", { id: "pipeline-status", role: "status", "aria-live": "polite" });
  const inputArea = h("textarea", { id: "job-input", name: "input", spellcheck: "false", class: "short", "aria-describedby": "input-help" }, "{}");
  const inputHelp = h("p", { id: "input-help", class: "muted" }, "Any other fields the first stages read from the job input; the uploaded file is added as \"media\".");
  const submit = h("button", { type: "submit", id: "submit-job" }, "Run pipeline");
  const submitStatus = h("div", { id: "submit-status", "aria-live": "assertive" });
  const templateName = h("input", { type: "text", id: "template-name", name: "template-name", placeholder: "soccer analysis" });
  const saveButton = h("button", { type: "button", class: "secondary", id: "save-template" }, "Save as template");
  const saveStatus = h("span", { id: "save-status", role: "status" });

  const form = h("form", { id: "run-form", "aria-labelledby": "run-heading", novalidate: true },
    h("div", { class: "field panel" },
      h("label", { for: "media-file" }, "Image or video"), fileInput, mediaStatus),
    h("fieldset", { class: "field panel" },
      h("legend", {}, "Pipeline"),
      h("div", { class: "row" },
        h("span", {}, useJson, h("label", { for: "source-json", class: "inline-label" }, " Write or paste a pipeline")),
        h("span", {}, useTemplate, h("label", { for: "source-template", class: "inline-label" }, " Use a saved template"))),
      h("div", { class: "field", id: "template-field" }, h("label", { for: "template" }, "Template"), templateSelect, templateInfo),
      h("div", { class: "field", id: "json-field" },
        h("label", { for: "pipeline-json" }, "Pipeline (JSON: a list of stages, or an object with \"stages\")"),
        textarea, pipelineStatus,
        h("div", { class: "row" },
          h("label", { for: "template-name", class: "inline-label" }, "Template name"), templateName, saveButton, saveStatus))),
    h("div", { class: "field panel" }, h("label", { for: "job-input" }, "Other job input (JSON object)"), inputArea, inputHelp),
    h("div", { class: "row" }, submit, submitStatus));
  main.append(h("h1", { id: "run-heading" }, "Run a pipeline"), form);

  let templates = [];
  try { templates = await api("/v1/pipelines"); } catch { /* shown as an empty list */ }
  templateSelect.append(...templates.map((t) => h("option", { value: t.id }, `${t.name} (${t.stages.map((s) => `${s.plugin}.${s.tool}`).join(" → ")})`)));
  if (!templates.length) { templateSelect.append(h("option", { value: "" }, "No templates saved yet")); useTemplate.disabled = true; }
  const wanted = params.get("template");
  if (wanted && templates.some((t) => t.id === wanted)) { templateSelect.value = wanted; useTemplate.checked = true; }

  const sourceIsTemplate = () => useTemplate.checked;
  const updateSource = () => {
    templateSelect.disabled = !sourceIsTemplate();
    textarea.disabled = sourceIsTemplate();
    document.getElementById("json-field").hidden = sourceIsTemplate();
    document.getElementById("template-field").hidden = !sourceIsTemplate();
    check();
  };
  useTemplate.addEventListener("change", updateSource);
  useJson.addEventListener("change", updateSource);
  templateSelect.addEventListener("change", () => check());

  let parsed = null;
  let checkNumber = 0;
  let needs = []; // the job input fields the chosen pipeline needs
  let needsFor = null; // ... as of this form state (a check may still be on its way)
  const formState = () => JSON.stringify([sourceIsTemplate(), templateSelect.value, textarea.value, inputArea.value]);

  /** The job input: the JSON object typed, with the upload as "media" (null when both are empty). */
  function jobInput() {
    let extra;
    try { extra = JSON.parse(inputArea.value || "{}"); } catch (error) { throw new Error(`the job input is not valid JSON: ${error.message}`); }
    if (extra === null || typeof extra !== "object" || Array.isArray(extra)) throw new Error("the job input must be a JSON object");
    const input = media ? { ...extra, media: media.ref } : extra;
    return Object.keys(input).length ? input : null;
  }

  async function check() {
    const number = ++checkNumber;
    const checkedState = formState();
    if (sourceIsTemplate()) {
      const template = templates.find((t) => t.id === templateSelect.value);
      templateInfo.textContent = template?.description || "";
      pipelineStatus.replaceChildren();
      if (template) {
        try {
          needs = (await api(`/v1/pipelines/${encodeURIComponent(template.id)}`)).job_input_fields;
          needsFor = checkedState;
        } catch { needs = []; }
        if (number === checkNumber) {
          // The description is the author's text, the hint ours: each its own sentence on its own line.
          const hint = `The job input needs: ${needs.join(", ") || "nothing"}.`;
          templateInfo.replaceChildren(...(template.description ? [template.description, h("br"), hint] : [hint]));
        }
      }
      return;
    }
    try {
      parsed = JSON.parse(textarea.value);
    } catch (error) {
      parsed = null;
      textarea.setAttribute("aria-invalid", "true");
      pipelineStatus.replaceChildren(h("p", { class: "error" }, `Not valid JSON: ${error.message}`));
      return;
    }
    let input;
    try {
      input = jobInput();
      inputArea.removeAttribute("aria-invalid");
    } catch (error) {
      inputArea.setAttribute("aria-invalid", "true");
      pipelineStatus.replaceChildren(h("p", { class: "error" }, `Not checked: ${error.message}`));
      return;
    }
    let result;
    try {
      result = { valid: true, ...(await api("/v1/pipeline-checks", { method: "POST", json: { pipeline: parsed, input } })) };
    } catch (error) {
      if (number !== checkNumber) return;
      if (!(error instanceof ApiError && error.status === 422)) {
        pipelineStatus.replaceChildren(h("p", { class: "error" }, `Cannot check it: ${error.message}`));
        return;
      }
      result = { valid: false, stages: [], job_input_fields: [], ...error.body }; // what a submission would get
    }
    if (number !== checkNumber) return; // a newer edit is being checked
    needs = result.job_input_fields;
    needsFor = checkedState;
    textarea.setAttribute("aria-invalid", String(!result.valid));
    if (result.valid) {
      const needs = result.job_input_fields.length ? `; the job input needs ${result.job_input_fields.join(", ")}` : "";
      const warnings = result.warnings || [];
      pipelineStatus.replaceChildren(h("p", { class: "ok" }, `Valid: ${result.stages.length} stage(s), ${result.stages.join(" → ")}${needs}.`),
        ...(warnings.length ? [h("p", { class: "warning", id: "pipeline-warnings" }, "Warning:"),
          h("ul", { class: "issues warning" }, warnings.map((w) => h("li", {}, describeIssue(w))))] : []));
    } else {
      pipelineStatus.replaceChildren(h("p", { class: "error" }, `Not valid (${result.error_type}${result.field ? `, ${result.field}` : ""}):`), errorList(result));
    }
  }
  let debounce = null;
  textarea.addEventListener("input", () => { clearTimeout(debounce); debounce = setTimeout(check, 300); });
  inputArea.addEventListener("input", () => { clearTimeout(debounce); debounce = setTimeout(check, 300); });

  fileInput.addEventListener("change", async () => {
    const file = fileInput.files[0];
    media = null;
    if (!file) { mediaStatus.textContent = "No file yet."; return; }
    mediaStatus.className = "muted";
    mediaStatus.textContent = `Uploading ${file.name} (${formatBytes(file.size)})…`;
    const body = new FormData();
    body.append("file", file, file.name);
    try {
      media = await api("/v1/media", { method: "POST", form: body });
      mediaStatus.className = "ok";
      mediaStatus.textContent = `Uploaded ${media.filename || file.name}: ${media.kind}, ${media.media_type}, ${formatBytes(media.size_bytes)} (${media.ref.slice(0, 19)}…)`;
      mediaStatus.dataset.ref = media.ref;
    } catch (error) {
      mediaStatus.className = "error";
      mediaStatus.textContent = `Upload failed: ${error.message}`;
    }
    check();
  });

  saveButton.addEventListener("click", async () => {
    saveStatus.className = "";
    if (!templateName.value.trim()) { saveStatus.className = "error"; saveStatus.textContent = "Give the template a name."; templateName.focus(); return; }
    try {
      const stages = Array.isArray(parsed) ? { stages: parsed }
        : { stages: parsed?.stages, timeout_seconds: parsed?.timeout_seconds, description: parsed?.description, runner: parsed?.runner };
      const saved = await api("/v1/pipelines", { method: "POST", json: { name: templateName.value.trim(), ...stages } });
      saveStatus.className = "ok";
      saveStatus.textContent = `Saved as ${saved.id}.`;
      templates.push(saved);
      templateSelect.append(h("option", { value: saved.id }, saved.name));
      useTemplate.disabled = false;
    } catch (error) {
      saveStatus.className = "error";
      saveStatus.textContent = `Not saved: ${error.message}`;
    }
  });

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    submitStatus.replaceChildren();
    if (!media && needsFor === formState() && needs.includes("media")) {
      submitStatus.replaceChildren(h("p", { class: "error", role: "alert" }, "This pipeline reads media: choose an image or video first."));
      fileInput.focus();
      return;
    }
    let input;
    try { input = jobInput() || {}; } catch (error) {
      submitStatus.replaceChildren(h("p", { class: "error", role: "alert" }, `Not submitted: ${error.message}`));
      inputArea.focus();
      return;
    }
    if (!sourceIsTemplate()) {
      try { parsed = JSON.parse(textarea.value); } catch { parsed = null; }
    }
    if (!sourceIsTemplate() && parsed === null) {
      submitStatus.replaceChildren(h("p", { class: "error", role: "alert" }, "Not submitted: the pipeline is not valid JSON."));
      textarea.focus();
      return;
    }
    const body = sourceIsTemplate() ? { pipeline_id: templateSelect.value, input } : { pipeline: parsed, input };
    submit.disabled = true;
    try {
      const accepted = await api("/v1/jobs", { method: "POST", json: body });
      location.hash = `#/jobs/${encodeURIComponent(accepted.job_id)}`;
    } catch (error) {
      submitStatus.replaceChildren(h("div", { class: "error", role: "alert" },
        h("p", {}, `Not submitted: ${error.message}${error.field ? ` (${error.field})` : ""}`), error instanceof ApiError ? errorList(error.body) : null));
    } finally {
      submit.disabled = false;
    }
  });

  updateSource();
  return null;
}
