// The server's public API, from this page's own origin: JSON calls, server-sent event streams, the API key
// (asked once, kept in sessionStorage for this tab), problem+json errors, and the same request as a curl command.

const KEY = "loom-api-key";

export class ApiError extends Error {
  constructor(problem, status) {
    super(problem.detail || problem.title || `HTTP ${status}`);
    this.problem = problem;
    this.status = status;
  }
}

let asking = null; // one dialog for all the requests that got a 401 at once (the two steering streams)

function askKey(reason) {
  if (asking) return asking;
  const dialog = document.getElementById("key-dialog");
  const input = document.getElementById("key-input");
  document.getElementById("key-reason").textContent = reason;
  input.value = "";
  asking = new Promise((resolve) => {
    const done = (key) => {
      dialog.removeEventListener("close", onClose);
      document.getElementById("key-cancel").removeEventListener("click", onCancel);
      asking = null;
      resolve(key);
    };
    const onClose = () => done(dialog.returnValue === "ok" && input.value ? input.value : null);
    const onCancel = () => dialog.close("cancel");
    dialog.addEventListener("close", onClose);
    document.getElementById("key-cancel").addEventListener("click", onCancel);
    dialog.showModal();
    input.focus();
  });
  return asking;
}

function headers(json) {
  const h = {};
  if (json) h["Content-Type"] = "application/json";
  const key = sessionStorage.getItem(KEY);
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

async function problemOf(res) {
  const text = await res.text();
  try {
    const body = JSON.parse(text);
    if (body && typeof body === "object") return body;
  } catch {
    // not JSON: a proxy's page, say
  }
  return { title: res.statusText || "Error", status: res.status, detail: text.slice(0, 300) };
}

async function send(method, path, body, signal) {
  for (;;) {
    const res = await fetch(path, {
      method,
      headers: headers(body !== undefined),
      body: body === undefined ? undefined : JSON.stringify(body),
      signal,
      cache: "no-store",
    });
    if (res.ok) return res;
    const problem = await problemOf(res);
    if (res.status === 401) {
      const key = await askKey(problem.detail || "This server needs an API key.");
      if (key) {
        sessionStorage.setItem(KEY, key);
        continue;
      }
    }
    throw new ApiError(problem, res.status);
  }
}

export async function call(method, path, body, signal) {
  return (await send(method, path, body, signal)).json();
}

// POST a streaming request; onEvent(event, data) for each server-sent event, data parsed from JSON.
export async function stream(path, body, onEvent, signal) {
  const res = await send("POST", path, body, signal);
  const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let event = "message";
  let data = [];
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let m;
    while ((m = /\r\n|\n|\r/.exec(buffer)) !== null) {
      if (m[0] === "\r" && m.index === buffer.length - 1) break; // maybe the first half of a \r\n
      const line = buffer.slice(0, m.index);
      buffer = buffer.slice(m.index + m[0].length);
      if (line === "") {
        if (data.length) onEvent(event, JSON.parse(data.join("\n")));
        event = "message";
        data = [];
      } else if (!line.startsWith(":")) {
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        let v = colon < 0 ? "" : line.slice(colon + 1);
        if (v.startsWith(" ")) v = v.slice(1);
        if (field === "event") event = v;
        else if (field === "data") data.push(v);
      }
    }
  }
}

function shellQuote(s) {
  return `'${s.replaceAll("'", "'\\''")}'`;
}

// The request as a command that gets the same answer: the key stays out of it (an environment variable instead).
export function curl({ method = "POST", path, body, streaming = false }) {
  const parts = [streaming ? "curl -sN" : "curl -s"];
  if (method !== "GET" && method !== "POST") parts.push(`-X ${method}`);
  parts.push(shellQuote(location.origin + path));
  if (sessionStorage.getItem(KEY)) parts.push('-H "Authorization: Bearer $LOOM_API_KEY"');
  if (body !== undefined) parts.push("-H 'Content-Type: application/json'", `-d ${shellQuote(JSON.stringify(body))}`);
  return parts.join(" ");
}
