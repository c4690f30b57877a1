// Probes and SAE features along the tokens: a score strip per stored probe (a row per label), and for a sparse
// autoencoder the features most active at each token, all from one /extract with `probes`.
import { blues, clear, diverging, fmt, h, heatmap, legend, s, short, tip, tokenLabel } from "./draw.js";

let stored = [];

async function loadProbes(ctx) {
  const answer = await ctx.call("GET", "/probes");
  stored = answer.probes || [];
  const box = document.getElementById("probe-chips") || h("div", { id: "probe-chips", class: "chips" });
  clear(box);
  for (const p of stored) {
    const chip = h("button", { type: "button", class: "chip", text: `${p.name} · ${p.kind || "linear"} at ${p.site}` });
    chip.addEventListener("click", () => {
      const input = document.getElementById("form").elements.probes;
      const names = input.value.split(",").map((x) => x.trim()).filter(Boolean);
      input.value = (names.includes(p.name) ? names.filter((n) => n !== p.name) : [...names, p.name]).join(",");
    });
    box.append(chip);
  }
  const input = document.getElementById("form").elements.probes;
  if (input && !box.isConnected) input.closest("label").after(box);
}

function strip(name, scores, tokens) {
  const labels = scores.labels;
  const flat = scores.data.flat();
  const unit = flat.every((v) => v >= 0 && v <= 1); // sigmoid and softmax probes; a linear one is unbounded
  const reach = unit ? 1 : Math.max(...flat.map(Math.abs), 1e-12);
  const colour = (v) => (unit ? blues(v) : diverging(v / reach));
  const map = heatmap({
    rows: labels,
    cols: tokens,
    cellW: 64,
    cellH: 24,
    title: `probe ${name}`,
    cell: (r, c) => {
      const v = scores.data[c][r];
      return {
        fill: colour(v),
        cls: "probe-cell",
        text: fmt(v, 2),
        data: { probe: name, label: labels[r], position: scores.positions[c], score: v },
        tip: `${name} · ${labels[r]} at position ${scores.positions[c]} (${tokens[c]}): ${fmt(v, 4)}`,
      };
    },
  });
  return h(
    "section",
    { class: "strip" },
    h("div", { class: "figure-head" }, h("h2", { text: `Probe ${name}` }),
      unit ? legend(blues, "0", "1", "score") : legend((t) => diverging(2 * t - 1), fmt(-reach, 2), fmt(reach, 2), "score")),
    h("div", { class: "scroll" }, map),
  );
}

function features(name, sae, tokens) {
  const W = 86;
  const ROW = 20;
  const top = 40;
  const left = 44;
  const most = Math.max(1, ...sae.top_features.map((f) => f.length));
  const peak = Math.max(1e-12, ...sae.top_features.flat().map((f) => f.value));
  const width = left + tokens.length * W + 4;
  const svg = s("svg", { width, height: top + (most + 1) * ROW + 8, class: "features" });
  svg.append(s("text", { x: left - 8, y: top + ROW - 6, "text-anchor": "end", class: "row-label", text: "L0" }));
  tokens.forEach((tok, c) => {
    const x = left + c * W;
    const pos = sae.positions[c];
    svg.append(s("text", { x: x + W / 2, y: 16, "text-anchor": "middle", class: "col-label", text: short(tok, 11) }));
    svg.append(s("text", { x: x + W / 2, y: 32, "text-anchor": "middle", class: "tick", text: `pos ${pos}` }));
    svg.append(s("text", { x: x + W / 2, y: top + ROW - 6, "text-anchor": "middle", class: "l0", data: { probe: name, position: pos, l0: sae.l0[c] }, text: String(sae.l0[c]) }));
    sae.top_features[c].forEach((f, i) => {
      const y = top + (i + 1) * ROW;
      const g = s("g", { class: "cell sae-feature", data: { probe: name, position: pos, feature: f.index, value: f.value } });
      g.append(s("rect", { x: x + 2, y, width: W - 4, height: ROW - 2, fill: "#f1f3f6" }));
      g.append(s("rect", { x: x + 2, y, width: Math.max(1, ((W - 4) * f.value) / peak), height: ROW - 2, fill: "#f0b45c" }));
      g.append(s("text", { x: x + 6, y: y + ROW - 7, text: `#${f.index} ${fmt(f.value, 2)}` }));
      svg.append(tip(g, `${name}: feature ${f.index} = ${fmt(f.value, 4)} at position ${pos} (${tok})`));
    });
  });
  return h(
    "section",
    { class: "strip" },
    h("h2", { text: `SAE ${name}: most active features per token` }),
    h("p", { class: "hint", text: "L0: how many features are active at the token; bars: each value against the largest shown" }),
    h("div", { class: "scroll" }, svg),
  );
}

export default {
  name: "probes",
  title: "Probes",
  hint: "Give a model, a text and stored probes or SAEs (POST /probes, /probes/fit), then Run.",
  fields: [
    { name: "text", label: "text", kind: "textarea", wide: true },
    { name: "probes", label: "probes", placeholder: "names, comma-separated (click below)", wide: true },
  ],
  ready: (p) => Boolean(p.model && p.text && p.probes),
  prepare: loadProbes,
  async run(ctx, signal) {
    const p = ctx.params;
    const names = p.probes.split(",").map((x) => x.trim()).filter(Boolean);
    const body = { model: p.model, text: p.text, positions: "all", hidden_state_layers: [], probes: names };
    ctx.showRequests([{ path: "/extract", body }]);
    ctx.status.busy("POST /extract");
    const ans = await ctx.call("POST", "/extract", body, signal);
    ctx.status.done(`${ans.token_count} tokens · ${names.length} probes · ${ans.metadata.inference_time_ms} ms on the server`);
    const fig = clear(ctx.figure);
    for (const name of names) {
      const scores = ans.probe_scores[name];
      const tokens = scores.positions.map((pos) => short(tokenLabel(ans.tokens[pos]), 10));
      fig.append(scores.top_features ? features(name, scores, tokens) : strip(name, scores, tokens));
    }
  },
};
