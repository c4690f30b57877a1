// Steering side by side: the greedy generation without and with a stored vector added at a site, both streamed
// token by token from /generate/stream; the scale slider reruns the steered side.
import { ApiError, stream } from "./api.js";
import { clear, h, tip } from "./draw.js";
import * as P from "./params.js";

let vectors = [];
const panes = {};

async function loadVectors(ctx) {
  const answer = await ctx.call("GET", "/vectors");
  vectors = answer.vectors || [];
  const list = document.getElementById("vector-list");
  if (!list) return;
  clear(list);
  for (const v of vectors) {
    list.append(h("option", { value: v.name, text: `[${v.shape.join(" x ")}] at ${v.site ?? "?"}${v.model ? ` · ${v.model}` : ""}` }));
  }
}

async function siteOf(ctx, name, signal) {
  let v = vectors.find((x) => x.name === name);
  if (!v) v = await ctx.call("GET", `/vectors/${encodeURIComponent(name)}`, undefined, signal); // its 404 says why
  if (v.site === null || v.site === undefined || v.site === "") {
    throw new Error(`site: the vector ${name} was stored without a site; give one`);
  }
  return v.site;
}

function requests(p, site) {
  const base = { model: p.model, prompt: p.prompt, max_tokens: P.integer(p.max_tokens || "24"), temperature: 0 };
  const steered = { ...base, interventions: [{ site: P.site(site), op: "add", vector: p.vector, scale: P.number(p.scale) }] };
  return { base, steered };
}

async function side(name, body, signal) {
  const { pane, meta } = panes[name];
  clear(pane);
  clear(meta);
  pane.dataset.state = "running";
  delete pane.dataset.text;
  await stream(
    "/generate/stream",
    body,
    (event, data) => {
      if (event === "token") {
        const cls = data.text.includes("\n") ? "tok nl" : "tok"; // a line break, marked so that it shows
        const span = h("span", { class: cls, data: { index: data.index, tokenId: data.token_id }, text: data.text });
        pane.append(tip(span, `token ${data.index}: id ${data.token_id}`));
      } else if (event === "done") {
        pane.dataset.text = data.text;
        pane.dataset.tokenCount = data.token_count;
        pane.dataset.finishReason = data.finish_reason;
        pane.dataset.state = "done";
        meta.textContent = `${data.token_count} tokens · finish: ${data.finish_reason} · ${data.metadata.tokens_per_second} tokens/s`;
      } else if (event === "error") {
        pane.dataset.state = "error";
        throw new ApiError(data, data.status);
      }
    },
    signal,
  );
}

function layout(ctx, p, site) {
  const fig = clear(ctx.figure);
  const box = (name, title) => {
    panes[name] = { pane: h("div", { class: "pane", data: { side: name } }), meta: h("p", { class: "meta" }) };
    return h("div", { class: "pane-box" }, title, panes[name].pane, panes[name].meta);
  };
  const scale = Number(p.scale);
  const reach = Math.max(16, Math.ceil(Math.abs(scale) * 2));
  const slider = h("input", { type: "range", name: "scale-slider", min: -reach, max: reach, step: 0.5 });
  slider.value = String(scale);
  const out = h("output", { text: String(scale) });
  const title = h("h3", { text: `with ${p.vector} x ${scale} at ${site}` });
  slider.addEventListener("input", () => {
    out.textContent = slider.value;
  });
  slider.addEventListener("change", () => {
    ctx.setParam("scale", slider.value);
    title.textContent = `with ${p.vector} x ${slider.value} at ${site}`;
    // the base side does not depend on the scale: only the steered one runs again, unless the base never finished
    const baseDone = panes.base.pane.dataset.state === "done";
    ctx.run((signal) => (baseDone ? steerOnly(ctx, site, signal) : run(ctx, signal)));
  });
  fig.append(
    h("p", { class: "prompt" }, h("span", { class: "hint", text: "prompt " }), h("span", { text: p.prompt })),
    h("div", { class: "panes" }, box("base", h("h3", { text: "without the vector" })), box("steered", title)),
    h("label", { class: "slider" }, "scale", slider, out),
  );
}

function show(ctx, base, steered) {
  ctx.showRequests([
    { path: "/generate/stream", body: base, streaming: true, label: "without the vector" },
    { path: "/generate/stream", body: steered, streaming: true, label: "with the vector" },
  ]);
}

async function steerOnly(ctx, site, signal) {
  const { base, steered } = requests(ctx.params, site);
  show(ctx, base, steered);
  ctx.status.busy("streaming the steered generation");
  await side("steered", steered, signal);
  ctx.status.done("greedy (temperature 0): the same prompt, without and with the vector");
}

async function run(ctx, signal) {
  const p = ctx.params;
  const site = p.site || (await siteOf(ctx, p.vector, signal));
  const { base, steered } = requests(p, site);
  show(ctx, base, steered);
  layout(ctx, p, site);
  ctx.status.busy("streaming both generations");
  await Promise.all([side("base", base, signal), side("steered", steered, signal)]);
  ctx.status.done("greedy (temperature 0): the same prompt, without and with the vector");
}

export default {
  name: "steer",
  title: "Steering",
  hint: "Give a model, a prompt and a stored vector (POST /vectors or /vectors/contrast), then Run.",
  fields: [
    { name: "prompt", label: "prompt", kind: "textarea", wide: true },
    { name: "vector", label: "vector", list: true, placeholder: "a stored vector's name" },
    { name: "site", label: "site", placeholder: "the vector's own", help: "where it is added: a hidden-state index or a hook point" },
    { name: "scale", label: "scale", kind: "number", step: "any", default: "4" },
    { name: "max_tokens", label: "max tokens", kind: "number", default: "24" },
  ],
  ready: (p) => Boolean(p.model && p.prompt && p.vector),
  prepare: loadVectors,
  run,
};
