// The API as the page uses it: REST calls with the bearer token (asked for when the service answers
// 401), media fetched as blobs (a <video> cannot send a header), and WebSocket streams that resume
// from the last position they delivered after a dropped connection, so no message is lost or repeated.
// The token never goes into a URL (URLs are logged): a WebSocket carries it in a subprotocol.

const TOKEN_KEY = "forgeflow.api-token";

export class ApiError extends Error {
  constructor(status, body) {
    super(body?.error || `HTTP ${status}`);
    this.status = status;
    this.body = body || {};
    this.errorType = this.body.error_type;
    this.field = this.body.field;
    this.issues = this.body.issues || [];
  }
}

export function currentToken() {
  return sessionStorage.getItem(TOKEN_KEY);
}

/** The subprotocols a WebSocket offers: "forgeflow.v1" (the one the service answers) and, with a
 * token, "forgeflow.bearer.<base64url of the token>" (a browser cannot set an Authorization header). */
export function streamProtocols() {
  const token = currentToken();
  if (!token) return ["forgeflow.v1"];
  const bytes = new TextEncoder().encode(token);
  const encoded = btoa(String.fromCharCode(...bytes)).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
  return ["forgeflow.v1", `forgeflow.bearer.${encoded}`];
}

let caller = null; // [token, promise of GET /v1/auth/me]

/** Who the page's token is and what it may do: {name, scopes, auth_required} (asked once per token). */
export function whoami() {
  const token = currentToken();
  if (!caller || caller[0] !== token) {
    const asked = api("/v1/auth/me");
    caller = [token, asked];
    // The call may have asked for a token on the way: keep its answer under the token it ended with.
    asked.then(() => { caller = [currentToken(), asked]; }, () => { caller = null; });
  }
  return caller[1];
}

/** Whether ``me`` (from whoami) may do what ``scope`` allows: "read", "run" or "admin" (not knowing
 * who the token is, the page offers everything and the service decides). */
export function may(me, scope) {
  return !me || me.scopes.includes(scope);
}

let pendingPrompt = null;
// Escape does not close the token dialog: nothing works without a token.
document.getElementById("token-dialog").addEventListener("cancel", (event) => event.preventDefault());

/** Show the token dialog; resolves once a token was entered. */
export function askForToken(reason) {
  if (pendingPrompt) return pendingPrompt;
  const dialog = document.getElementById("token-dialog");
  const input = document.getElementById("token-input");
  document.getElementById("token-reason").textContent = reason;
  pendingPrompt = new Promise((resolve) => {
    const form = document.getElementById("token-form");
    const done = (event) => {
      event.preventDefault();
      if (!input.value.trim()) return;
      sessionStorage.setItem(TOKEN_KEY, input.value.trim());
      input.value = "";
      form.removeEventListener("submit", done);
      dialog.close();
      pendingPrompt = null;
      resolve();
    };
    form.addEventListener("submit", done);
    dialog.showModal();
    input.focus();
  });
  return pendingPrompt;
}

/** A REST call: the parsed JSON (null for 204), or an ApiError with the service's error body. */
export async function api(path, { method = "GET", json, form, response = false } = {}) {
  for (;;) {
    const sent = currentToken();
    const headers = sent ? { Authorization: `Bearer ${sent}` } : {};
    let body;
    if (json !== undefined) {
      headers["Content-Type"] = "application/json";
      body = JSON.stringify(json);
    } else if (form !== undefined) {
      body = form;
    }
    const res = await fetch(path, { method, headers, body });
    if (res.status === 401) {
      // A call sent before a new token was entered is refused for the old one: retry with the new
      // token rather than forget it (calls in flight together would otherwise ask again).
      if (currentToken() !== sent) continue;
      sessionStorage.removeItem(TOKEN_KEY);
      await askForToken(sent ? "That token was not accepted: enter the service's API token." : "This service requires an API token (FORGEFLOW_API_TOKEN).");
      continue;
    }
    if (!res.ok) {
      let detail;
      try { detail = await res.json(); } catch { detail = { error: `${res.status} ${res.statusText}` }; }
      throw new ApiError(res.status, detail);
    }
    if (response) return res;
    return res.status === 204 ? null : res.json();
  }
}

const mediaUrls = new Map();

/** An object URL for a stored media ref (fetched once per page). */
export async function mediaObjectUrl(ref) {
  if (!mediaUrls.has(ref)) {
    const res = await api(`/v1/media/${encodeURIComponent(ref)}/content`, { response: true });
    mediaUrls.set(ref, URL.createObjectURL(await res.blob()));
  }
  return mediaUrls.get(ref);
}

/**
 * A WebSocket stream that reconnects. ``key`` is the message field that orders the stream ("seq" on
 * one job's stream, "cursor" on all jobs'), ``param`` the query parameter that resumes after it.
 * A message at or before the last delivered position is dropped; a reconnect asks for what follows it.
 */
export class LiveStream {
  constructor(path, { key, param, position = null, onMessage, onState = () => {}, onOpen = () => {} }) {
    Object.assign(this, { path, key, param, position, onMessage, onState, onOpen });
    this.attempts = 0;
    this.stopped = false;
    this.finished = false;
    this.socket = null;
    this.timer = null;
  }

  url() {
    const base = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}${this.path}`;
    const query = new URLSearchParams();
    if (this.position !== null) query.set(this.param, String(this.position));
    const text = query.toString();
    return text ? `${base}?${text}` : base;
  }

  start() {
    this.stopped = false;
    this.connect();
    return this;
  }

  connect() {
    if (this.stopped) return;
    this.onState(this.attempts ? "reconnecting" : "connecting");
    const socket = new WebSocket(this.url(), streamProtocols());
    this.socket = socket;
    let opened = false;
    socket.onopen = () => {
      opened = true;
      this.attempts = 0;
      this.onState("live");
      this.onOpen();
    };
    socket.onmessage = (event) => {
      const message = JSON.parse(event.data);
      const position = message[this.key];
      if (typeof position === "number") {
        if (this.position !== null && position <= this.position) return; // delivered before the reconnect
        this.position = position;
      }
      this.onMessage(message);
    };
    socket.onclose = async (event) => {
      if (this.socket !== socket || this.stopped) return;
      if (event.code === 1000 && event.reason === "job finished") {
        this.finished = true;
        this.onState("finished");
        return;
      }
      this.attempts += 1;
      this.onState("reconnecting");
      if (!opened) {
        // Refused before it opened: a wrong token shows as a failed handshake; ask the REST side why.
        try { await api("/v1/jobs?limit=1"); } catch { /* the service is down: retry below */ }
      }
      const delay = Math.min(5000, 200 * 2 ** Math.min(this.attempts, 5));
      this.timer = setTimeout(() => this.connect(), delay);
    };
  }

  stop() {
    this.stopped = true;
    clearTimeout(this.timer);
    if (this.socket) this.socket.close(1000, "page left");
    this.socket = null;
  }
}
