// Logit lens: the prompt's tokens across, layers down; each cell the top next token that layer's state predicts
// (the server's lens: the model's own final norm and LM head), coloured by its probability.
import { clear, fmt, h, heatmap, legend, lineChart, short, tokenLabel, viridis, visible } from "./draw.js";
import * as P from "./params.js";

let shown = null; // the last answer, redrawn when a position is picked without asking again

function draw(ctx) {
  const { ans, keys, target } = shown;
  const lens = ans.logit_lens;
  const positions = lens[keys[0]].positions;
  const asked = ctx.params.position === "" ? -1 : positions.indexOf(Number(ctx.params.position));
  const picked = asked >= 0 ? asked : positions.length - 1; // the last position unless one of these is asked for
  const fig = clear(ctx.figure);
  const map = heatmap({
    rows: keys,
    cols: positions.map((pos) => short(tokenLabel(ans.tokens[pos]), 12)),
    cellW: 76,
    cellH: 26,
    title: "top next token by layer and position",
    selectedColumn: target ? picked : undefined,
    onColumn: target ? (c) => { ctx.setParam("position", positions[c]); draw(ctx); } : undefined,
    cell: (r, c) => {
      const entry = lens[keys[r]];
      const top = entry.top_k[c];
      const best = top[0];
      const pos = entry.positions[c];
      return {
        fill: viridis(Math.exp(best.logprob)),
        cls: "lens-cell",
        text: short(visible(best.token), 9),
        data: { layer: keys[r], position: pos, token: best.token, tokenId: best.token_id, logprob: best.logprob },
        tip: () =>
          [
            `layer ${keys[r]} · position ${pos} · input ${tokenLabel(ans.tokens[pos])}`,
            ...top.map((t, i) => `${String(i + 1).padStart(2)}. ${visible(t.token).padEnd(14)} ${fmt(t.logprob)}`),
          ].join("\n"),
      };
    },
  });
  fig.append(
    h("div", { class: "figure-head" }, h("h2", { text: "Top next token" }), legend(viridis, "0", "1", "probability of the top token")),
    h("div", { class: "scroll" }, map),
  );
  if (!target) return;
  const pos = positions[picked];
  const curve = keys.map((k) => lens[k].tokens[target]);
  const point = (i) => ({ layer: keys[i], position: pos, rank: curve[i].rank[picked], logprob: curve[i].logprob[picked] });
  const pointTip = (i) => `layer ${keys[i]}: rank ${curve[i].rank[picked]}, log-prob ${fmt(curve[i].logprob[picked])}`;
  fig.append(
    h("h2", { text: `${visible(target)} at position ${pos} (${tokenLabel(ans.tokens[pos])}) across layers` }),
    h("p", { class: "hint", text: "Click a token above to draw the curve at that position." }),
    h(
      "div",
      { class: "charts", data: { target } },
      lineChart({
        xs: keys,
        ys: curve.map((t) => t.rank[picked]),
        title: "rank (0 = top)",
        invert: true,
        log: true,
        yLabel: (v) => String(v),
        pointData: point,
        pointTip,
      }),
      lineChart({
        xs: keys,
        ys: curve.map((t) => t.logprob[picked]),
        title: "log-probability",
        yLabel: (v) => fmt(v, 2),
        pointData: point,
        pointTip,
      }),
    ),
  );
}

export default {
  name: "lens",
  title: "Logit lens",
  hint: "Give a model and a text, then Run.",
  fields: [
    { name: "text", label: "text", kind: "textarea", wide: true },
    { name: "layers", label: "layers", default: "all", help: '"all" (every block\'s output) or indices and hook points, comma-separated' },
    { name: "top_k", label: "top-k", kind: "number", default: "5" },
    { name: "target", label: "target token", placeholder: "one token, e.g. \" the\"", help: "its rank and log-probability across layers" },
    { name: "position", label: "curve at position", placeholder: "last", help: "where the target's curve is read (click a token)" },
    { name: "tuned", label: "tuned lens", placeholder: "a stored tuned lens (optional)", help: "read each layer through its translator first (POST /probes/{name}?kind=tuned_lens)" },
    { name: "interventions", label: "edit (interventions JSON)", kind: "textarea", wide: true, rows: 1, placeholder: '[{"site": "blocks.0.attn.hook_z", "op": "zero", "heads": [1]}]' },
  ],
  ready: (p) => Boolean(p.model && p.text),
  async run(ctx, signal) {
    const p = ctx.params;
    const layers = P.sites(p.layers || "all");
    const body = P.compact({
      model: p.model,
      text: p.text,
      positions: "all",
      hidden_state_layers: [], // the lens only: no states on the wire
      logit_lens: P.compact({
        layers,
        top_k: P.integer(p.top_k || "5"),
        tokens: p.target ? [p.target] : undefined,
        tuned: p.tuned || undefined,
      }),
      interventions: P.json(p.interventions, "interventions"),
    });
    ctx.showRequests([{ path: "/extract", body }]);
    ctx.status.busy("POST /extract");
    const ans = await ctx.call("POST", "/extract", body, signal);
    const keys = Array.isArray(layers) ? layers.map(String) : Object.keys(ans.logit_lens);
    shown = { ans, keys, target: p.target || null };
    ctx.status.done(`${ans.token_count} tokens · ${keys.length} layers · ${ans.metadata.inference_time_ms} ms on the server`);
    draw(ctx);
  },
};
