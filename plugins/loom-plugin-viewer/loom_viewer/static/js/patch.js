// Activation patching: /patch's normalized effect, (patched - corrupted) / (clean - corrupted), as a sites x
// positions heatmap: 1 where the clean activation alone restores the clean answer, 0 where it changes nothing.
import { clear, diverging, fmt, h, heatmap, legend, short, tokenLabel } from "./draw.js";
import * as P from "./params.js";

const FAMILIES = ["resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out"];

function metricOf(p) {
  return p.metric === "logprob"
    ? { type: "logprob", token: p.token }
    : { type: "logit_diff", correct: p.correct, incorrect: p.incorrect };
}

function draw(ctx, ans) {
  const { clean, corrupted } = ans.tokens;
  const cols = ans.positions.map((pos) => {
    const a = short(tokenLabel(clean[pos]), 10);
    const b = short(tokenLabel(corrupted[pos]), 10);
    return a === b ? a : `${a} / ${b}`;
  });
  const m = ans.metric;
  const map = heatmap({
    rows: ans.sites,
    cols,
    cellW: 64,
    cellH: 26,
    title: "normalized effect of patching the clean activation into the corrupted run",
    cell: (r, c) => {
      const v = ans.normalized[r][c];
      const fill = v === null ? "#ddd" : diverging(Math.max(-1, Math.min(1, v)));
      return {
        fill,
        cls: "patch-cell",
        text: v === null ? "–" : fmt(v, 2),
        data: { site: ans.sites[r], position: ans.positions[c], value: v === null ? "" : v, patched: ans.patched[r][c] },
        tip: [
          `${ans.sites[r]} · position ${ans.positions[c]} (${cols[c]})`,
          `${m.type} patched ${fmt(ans.patched[r][c], 4)}`,
          `normalized ${v === null ? "undefined (clean = corrupted)" : fmt(v, 4)}`,
        ].join("\n"),
      };
    },
  });
  clear(ctx.figure).append(
    h(
      "div",
      { class: "figure-head" },
      h("h2", { text: "Normalized effect" }),
      legend((t) => diverging(2 * t - 1), "-1", "1", "(patched - corrupted) / (clean - corrupted)"),
    ),
    h("div", { class: "scroll" }, map),
  );
  clear(ctx.summary).append(
    h("p", {
      class: "metric",
      data: { clean: m.clean, corrupted: m.corrupted },
      text: `${m.type}: clean ${fmt(m.clean, 4)}, corrupted ${fmt(m.corrupted, 4)} · ${ans.runs} runs in ${ans.calls} batched calls`,
    }),
  );
}

export default {
  name: "patch",
  title: "Patching",
  hint: "Give a model, a clean and a corrupted text of the same token count, and a metric, then Run.",
  fields: [
    { name: "clean", label: "clean", kind: "textarea", wide: true, rows: 1 },
    { name: "corrupted", label: "corrupted", kind: "textarea", wide: true, rows: 1 },
    { name: "sites", label: "sites", default: "resid_pre", list: true, help: `a family (${FAMILIES.join(", ")}) or sites, comma-separated` },
    { name: "positions", label: "positions", default: "all", help: '"all" or token indices, comma-separated' },
    { name: "metric", label: "metric", kind: "select", options: ["logit_diff", "logprob"], default: "logit_diff" },
    { name: "correct", label: "correct token", placeholder: 'logit_diff: e.g. " string"' },
    { name: "incorrect", label: "incorrect token", placeholder: 'logit_diff: e.g. " class"' },
    { name: "token", label: "token", placeholder: "logprob: one token" },
  ],
  ready: (p) =>
    Boolean(p.model && p.clean && p.corrupted && (p.metric === "logprob" ? p.token : p.correct && p.incorrect)),
  async prepare() {
    const list = document.getElementById("sites-list");
    if (list) for (const f of FAMILIES) list.append(h("option", { value: f }));
  },
  async run(ctx, signal) {
    const p = ctx.params;
    const body = {
      model: p.model,
      clean: p.clean,
      corrupted: p.corrupted,
      sites: FAMILIES.includes(p.sites.trim()) ? p.sites.trim() : P.sites(p.sites, []),
      positions: P.sites(p.positions || "all"),
      metric: metricOf(p),
    };
    ctx.showRequests([{ path: "/patch", body }]);
    ctx.status.busy("POST /patch");
    clear(ctx.summary);
    const ans = await ctx.call("POST", "/patch", body, signal);
    ctx.status.done(`${ans.sites.length} sites x ${ans.positions.length} positions`);
    draw(ctx, ans);
  },
};
