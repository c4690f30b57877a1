// The page: which view, on what, comes from the URL (so a link reproduces a picture); the form writes the URL back.
import { ApiError, call, curl } from "./api.js";
import { clear, h, installTooltip } from "./draw.js";
import attention from "./attention.js";
import lens from "./lens.js";
import patch from "./patch.js";
import probes from "./probes.js";
import steer from "./steer.js";

const VIEWS = { lens, attention, steer, patch, probes };
const $ = (id) => document.getElementById(id);

const state = { view: lens, params: {}, run: null, requests: [] };

function paramsFromUrl() {
  const q = new URLSearchParams(location.search);
  const view = VIEWS[q.get("view") || "lens"] || lens;
  const params = { model: q.get("model") || "" };
  for (const f of view.fields) params[f.name] = q.has(f.name) ? q.get(f.name) : (f.default ?? "");
  return { view, params };
}

function urlOf(view, params) {
  const q = new URLSearchParams();
  if (params.model) q.set("model", params.model);
  if (view !== lens) q.set("view", view.name);
  for (const f of view.fields) {
    const v = params[f.name];
    if (v !== undefined && v !== "" && v !== (f.default ?? "")) q.set(f.name, v);
  }
  return `/viewer?${q.toString()}`;
}

// The same model and text, in another view (a steering prompt is the others' text).
function navigate() {
  const nav = clear($("views"));
  const text = state.params.text ?? state.params.prompt ?? state.params.clean ?? "";
  for (const view of Object.values(VIEWS)) {
    const p = { model: state.params.model };
    if (view.fields.some((f) => f.name === "text")) p.text = text;
    if (view.fields.some((f) => f.name === "prompt")) p.prompt = text;
    const a = h("a", { href: urlOf(view, p), text: view.title, data: { view: view.name } });
    if (view === state.view) a.setAttribute("aria-current", "page");
    nav.append(a);
  }
}

function buildForm() {
  const box = clear($("fields"));
  $("model").value = state.params.model;
  for (const f of state.view.fields) {
    const value = state.params[f.name] ?? "";
    let input;
    if (f.kind === "textarea") {
      input = h("textarea", { name: f.name, rows: f.rows || 2, placeholder: f.placeholder, spellcheck: "false" });
      input.value = value;
      input.addEventListener("keydown", (e) => {
        if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) $("form").requestSubmit();
      });
    } else if (f.kind === "select") {
      input = h("select", { name: f.name }, f.options.map((o) => h("option", { value: o, text: o })));
      input.value = value;
    } else {
      input = h("input", { name: f.name, type: f.kind || "text", placeholder: f.placeholder, spellcheck: "false" });
      if (f.step) input.step = f.step;
      if (f.list) input.setAttribute("list", `${f.name}-list`);
      input.value = value;
    }
    const label = h("label", { class: `field ${f.wide ? "wide" : ""}`, title: f.help }, f.label, input);
    if (f.list) label.append(h("datalist", { id: `${f.name}-list` }));
    box.append(label);
  }
}

function readForm() {
  const form = $("form");
  const params = { model: $("model").value.trim() };
  for (const f of state.view.fields) params[f.name] = form.elements[f.name].value;
  return params;
}

// A spinner with the elapsed time while a request runs; the problem's detail when it fails.
const status = {
  timer: null,
  busy(label) {
    this.stop();
    const started = performance.now();
    const el = $("status");
    el.className = "busy";
    el.dataset.state = "busy";
    const tick = () => {
      el.textContent = `${label} · ${((performance.now() - started) / 1000).toFixed(1)} s`;
    };
    tick();
    this.timer = setInterval(tick, 100);
  },
  stop() {
    if (this.timer) clearInterval(this.timer);
    this.timer = null;
  },
  done(text) {
    this.stop();
    const el = $("status");
    el.className = "";
    el.dataset.state = "done";
    el.textContent = text || "";
  },
  error(err) {
    this.stop();
    const el = $("status");
    el.className = "error";
    el.dataset.state = "error";
    if (err instanceof ApiError) {
      const p = err.problem;
      el.textContent = `${p.status || err.status} ${p.title || ""}: ${p.detail || ""}`;
    } else {
      el.textContent = String(err.message || err);
    }
  },
};

function showRequests(requests) {
  state.requests = requests;
  $("request").hidden = requests.length === 0;
  $("curl").textContent = requests.map((r) => (r.label ? `# ${r.label}\n` : "") + curl(r)).join("\n\n");
}

const ctx = {
  call,
  status,
  figure: $("figure"),
  summary: $("summary"),
  showRequests,
  get params() {
    return state.params;
  },
  // A view changes a parameter without a new run (a head, a position): the URL follows.
  setParam(name, value) {
    state.params[name] = String(value);
    const input = $("form").elements[name];
    if (input) input.value = String(value);
    history.replaceState(null, "", urlOf(state.view, state.params));
    navigate();
  },
  rerun() {
    this.run((signal) => state.view.run(this, signal));
  },
  async run(fn) {
    if (state.run) state.run.abort();
    const controller = new AbortController();
    state.run = controller;
    status.busy(state.view.title); // at once, before the view's first await: "busy" until an answer or an error
    try {
      await fn(controller.signal);
    } catch (err) {
      if (err.name !== "AbortError") status.error(err);
    } finally {
      if (state.run === controller) state.run = null;
      showRequests(state.requests); // with the key's header, if one was asked for meanwhile
    }
  },
};

async function fillModels() {
  try {
    const answer = await call("GET", "/models");
    const list = clear($("models"));
    for (const m of answer.loaded_models || []) list.append(h("option", { value: m.model_id, text: `${m.kind || ""} · ${m.state}` }));
    document.body.dataset.models = String(list.children.length);
    // no model in the URL: offer the first loaded causal model (every view needs an LM head or generation)
    const causal = (answer.loaded_models || []).find((m) => m.kind === "causal" && m.state === "ready");
    if (!$("model").value && causal) $("model").value = causal.model_id;
  } catch (err) {
    status.error(err);
  }
}

// Opened from another site's page (the server marks the page so): that site chose the URL, so its request waits for
// the user's Run instead of running, with this tab's key, as the page loads.
const OPENED_ELSEWHERE = "Opened from another site's link: check the fields, then Run.";

function start() {
  ({ view: state.view, params: state.params } = paramsFromUrl());
  document.body.dataset.view = state.view.name;
  document.title = `${state.view.title} · The Loom viewer`;
  navigate();
  buildForm();
  clear(ctx.figure);
  clear(ctx.summary);
  showRequests([]);
  const elsewhere = document.body.dataset.openedFrom === "another-site";
  status.done(state.view.ready(state.params) ? (elsewhere ? OPENED_ELSEWHERE : "") : state.view.hint);
  if (state.view.prepare) state.view.prepare(ctx).catch((err) => status.error(err)); // pickers: vectors, probes
  if (state.view.ready(state.params) && !elsewhere) ctx.run((signal) => state.view.run(ctx, signal));
}

$("form").addEventListener("submit", (e) => {
  e.preventDefault();
  delete document.body.dataset.openedFrom; // the user ran it: this tab's own history runs from now on
  state.params = readForm();
  history.pushState(null, "", urlOf(state.view, state.params));
  navigate();
  if (!state.view.ready(state.params)) {
    status.done(state.view.hint);
    return;
  }
  ctx.run((signal) => state.view.run(ctx, signal));
});

$("copy").addEventListener("click", async () => {
  const text = $("curl").textContent;
  try {
    await navigator.clipboard.writeText(text);
    $("copy").textContent = "Copied";
  } catch {
    getSelection().selectAllChildren($("curl")); // no clipboard permission: select it for Ctrl+C
  }
  setTimeout(() => {
    $("copy").textContent = "Copy";
  }, 1500);
});

window.addEventListener("popstate", start);
installTooltip(document.body);
start();
fillModels();
