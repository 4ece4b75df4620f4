// Small DOM and formatting helpers. Every value from the API reaches the page as text (textContent),
// never as HTML.

/** h("a", {href: "#/jobs", class: "x"}, "text", child, ...): an element. */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key.startsWith("on") && typeof value === "function") el.addEventListener(key.slice(2), value);
    else if (key === "class") el.className = value;
    else if (key === "dataset") Object.assign(el.dataset, value);
    else if (key in el && typeof value !== "string") el[key] = value;
    else el.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

export function statusBadge(status) {
  return h("span", { class: `status status-${status}` }, status);
}

export function formatMs(ms) {
  if (ms === null || ms === undefined || Number.isNaN(ms)) return "–";
  if (ms < 1000) return `${Math.round(ms)} ms`;
  const s = ms / 1000;
  if (s < 60) return `${s.toFixed(s < 10 ? 2 : 1)} s`;
  const m = Math.floor(s / 60);
  return `${m} min ${Math.round(s - m * 60)} s`;
}

export function formatBytes(n) {
  if (n === null || n === undefined) return "–";
  if (n < 1024) return `${n} B`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} KB`;
  return `${(n / 1024 / 1024).toFixed(1)} MB`;
}

export function formatTime(iso) {
  if (!iso) return "–";
  const d = new Date(iso);
  return Number.isNaN(d.getTime()) ? iso : d.toLocaleString();
}

/** Milliseconds between two ISO times (the second defaults to now). */
export function elapsed(startIso, endIso) {
  if (!startIso) return null;
  const end = endIso ? Date.parse(endIso) : Date.now();
  return Math.max(0, end - Date.parse(startIso));
}

/** JSON for a <pre>, cut at ``limit`` characters with a note saying so. */
export function prettyJson(value, limit = 200_000) {
  const text = JSON.stringify(value, null, 2) ?? "null";
  if (text.length <= limit) return text;
  return `${text.slice(0, limit)}\n… ${text.length - limit} more characters (the whole document: GET the job)`;
}

export const TERMINAL = new Set(["succeeded", "failed", "cancelled", "crashed"]);

/** Shown in the header: the state of the view's live stream. */
export function setConnection(state) {
  const words = { connecting: "Connecting…", live: "Live", reconnecting: "Reconnecting…", finished: "Job finished" };
  const connection = document.getElementById("connection");
  connection.textContent = words[state] ?? state;
  connection.dataset.state = state;
}
