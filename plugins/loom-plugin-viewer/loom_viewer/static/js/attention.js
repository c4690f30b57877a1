// Attention: one head's pattern, query x key, from /extract's return_attention (per layer [heads, queries, keys]).
import { blues, clear, fmt, h, heatmap, legend, short, tokenLabel } from "./draw.js";
import * as P from "./params.js";

let shown = null;

function picker(label, name, values, current, onPick) {
  const select = h("select", { name: `pick-${name}`, data: { picker: name } }, values.map((v) => h("option", { value: v, text: v })));
  select.value = current;
  select.addEventListener("change", () => onPick(select.value));
  return h("label", { class: "picker" }, label, select);
}

function draw(ctx) {
  const { ans, key } = shown;
  const att = ans.attentions[key];
  const [heads, , k] = att.shape;
  const head = Math.min(Math.max(0, Number(ctx.params.head) || 0), heads - 1);
  const queries = ans.positions;
  const labels = ans.tokens.map((t, i) => `${short(tokenLabel(t), 12)} ${i}`);
  const pattern = att.data[head];
  const n = ans.metadata.num_layers;
  const layers = Array.from({ length: n }, (_, i) => String(i + 1));
  if (!layers.includes(key)) layers.unshift(key);
  const fig = clear(ctx.figure);
  const pickers = h(
    "div",
    { class: "pickers" },
    picker("layer", "layer", layers, key, (v) => {
      ctx.setParam("layer", v);
      ctx.rerun();
    }),
    picker("head", "head", Array.from({ length: heads }, (_, i) => String(i)), String(head), (v) => {
      ctx.setParam("head", v);
      draw(ctx);
    }),
  );
  const cell = Math.max(14, Math.min(34, Math.floor(640 / Math.max(queries.length, k))));
  const map = heatmap({
    rows: queries.map((q) => labels[q]),
    cols: labels.slice(0, k),
    cellW: cell,
    cellH: cell,
    title: `layer ${key}, head ${head}: query (rows) attends to key (columns)`,
    cell: (r, c) => {
      const w = pattern[r][c];
      return {
        fill: blues(w),
        cls: `attn-cell${c > queries[r] ? " masked" : ""}`,
        data: { query: queries[r], key: c, weight: w },
        tip: `query ${labels[queries[r]]} → key ${labels[c]}: ${fmt(w, 4)}`,
      };
    },
  });
  fig.append(
    pickers,
    h("div", { class: "figure-head" }, h("h2", { text: `Layer ${key}, head ${head}` }), legend(blues, "0", "1", "attention weight")),
    h("p", { class: "hint", text: "Rows are queries, columns the keys they attend to; each row sums to 1." }),
    h("div", { class: "scroll" }, map),
  );
}

export default {
  name: "attention",
  title: "Attention",
  hint: "Give a model and a text, then Run.",
  fields: [
    { name: "text", label: "text", kind: "textarea", wide: true },
    { name: "layer", label: "layer", default: "1", help: "the block whose attention (1..N, or negative from the end)" },
    { name: "head", label: "head", kind: "number", default: "0" },
    { name: "interventions", label: "edit (interventions JSON)", kind: "textarea", wide: true, rows: 1, placeholder: '[{"site": "blocks.0.attn.hook_z", "op": "zero", "heads": [1]}]' },
  ],
  ready: (p) => Boolean(p.model && p.text),
  async run(ctx, signal) {
    const p = ctx.params;
    const layer = P.integer(p.layer || "1");
    const body = P.compact({
      model: p.model,
      text: p.text,
      positions: "all",
      hidden_state_layers: [layer],
      return_attention: true,
      interventions: P.json(p.interventions, "interventions"),
    });
    ctx.showRequests([{ path: "/extract", body }]);
    ctx.status.busy("POST /extract");
    const ans = await ctx.call("POST", "/extract", body, signal);
    shown = { ans, key: String(layer) };
    const [heads, q, k] = ans.attentions[String(layer)].shape;
    ctx.status.done(`${heads} heads · ${q} queries x ${k} keys · ${ans.metadata.inference_time_ms} ms on the server`);
    draw(ctx);
  },
};
