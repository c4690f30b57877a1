// Drawing helpers shared by the views: elements, colour scales, token text, a heatmap in SVG, a tooltip.
// Colours are set as SVG presentation attributes and through the CSSOM, never inline style markup, so that the
// page's Content-Security-Policy (style-src 'self') holds.

const SVG = "http://www.w3.org/2000/svg";

function build(node, attrs, children) {
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null) continue;
    if (k === "text") node.textContent = v;
    else if (k === "data") for (const [d, dv] of Object.entries(v)) node.dataset[d] = String(dv);
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, String(v));
  }
  for (const c of children.flat()) if (c !== undefined && c !== null) node.append(c);
  return node;
}

export const h = (tag, attrs, ...children) => build(document.createElement(tag), attrs, children);
export const s = (tag, attrs, ...children) => build(document.createElementNS(SVG, tag), attrs, children);

export function clear(node) {
  while (node.firstChild) node.firstChild.remove();
  return node;
}

function interpolate(stops, t) {
  t = Math.min(1, Math.max(0, Number.isFinite(t) ? t : 0));
  const x = t * (stops.length - 1);
  const i = Math.min(stops.length - 2, Math.floor(x));
  const f = x - i;
  const c = stops[i].map((v, k) => Math.round(v + (stops[i + 1][k] - v) * f));
  return `rgb(${c[0]},${c[1]},${c[2]})`;
}

// viridis, at 8 stops: perceptually even, readable in grey
const VIRIDIS = [
  [68, 1, 84], [70, 50, 127], [54, 92, 141], [39, 127, 142], [31, 161, 135], [74, 194, 109], [159, 218, 58],
  [253, 231, 37],
];
const BLUES = [[255, 255, 255], [222, 235, 247], [158, 202, 225], [66, 146, 198], [8, 81, 156], [8, 48, 107]];
const RED_BLUE = [[33, 102, 172], [103, 169, 207], [209, 229, 240], [247, 247, 247], [253, 219, 199],
  [239, 138, 98], [178, 24, 43]];

export const viridis = (t) => interpolate(VIRIDIS, t);
export const blues = (t) => interpolate(BLUES, t);
export const diverging = (t) => interpolate(RED_BLUE, (t + 1) / 2); // -1 blue, 0 white, +1 red

export function ink(rgb) {
  const [r, g, b] = rgb.match(/\d+/g).map(Number);
  return 0.299 * r + 0.587 * g + 0.114 * b > 150 ? "#111" : "#fff";
}

// A token's text as it reads on screen: spaces and control characters made visible.
export function visible(text) {
  return String(text)
    .replace(/^ /, "␣")
    .replace(/ $/, "␣")
    .replaceAll("\n", "⏎")
    .replaceAll("\t", "⇥")
    .replaceAll("\r", "␍");
}

// A tokenizer's vocabulary entry (GPT-2's byte-level "Ġ" for a space, SentencePiece's "▁") as it reads.
export function tokenLabel(piece) {
  return visible(String(piece).replaceAll("Ġ", " ").replaceAll("▁", " ").replaceAll("Ċ", "\n").replaceAll("ĉ", "\t"));
}

export function short(text, n) {
  return text.length > n ? `${text.slice(0, n - 1)}…` : text;
}

export const fmt = (x, digits = 3) => (x === null || x === undefined ? "–" : Number(x).toFixed(digits));

// The tooltip: a fixed box near the pointer, its text set per element.
const tips = new WeakMap();
export function tip(node, text) {
  tips.set(node, text);
  return node;
}
export function installTooltip(root) {
  const box = document.getElementById("tip");
  root.addEventListener("mousemove", (e) => {
    let node = e.target;
    while (node && node !== root && !tips.has(node)) node = node.parentNode;
    if (!node || node === root) {
      box.hidden = true;
      return;
    }
    const text = tips.get(node);
    box.textContent = typeof text === "function" ? text() : text;
    box.hidden = false;
    const x = Math.min(e.clientX + 14, window.innerWidth - box.offsetWidth - 8);
    const y = Math.min(e.clientY + 14, window.innerHeight - box.offsetHeight - 8);
    box.style.left = `${Math.max(4, x)}px`;
    box.style.top = `${Math.max(4, y)}px`;
  });
  root.addEventListener("mouseleave", () => {
    box.hidden = true;
  });
}

const CHAR = 7; // px per character of the 12px labels, for margins

// A rows x cols grid in SVG. cell(r, c) -> {fill, cls, data, text, tip}; labels along the left and the top
// (rotated when long); onColumn(c) makes the top labels clickable.
export function heatmap({ rows, cols, cellW, cellH, cell, title, onColumn, selectedColumn }) {
  const left = Math.max(...rows.map((r) => r.length), 2) * CHAR + 12;
  const longest = Math.max(...cols.map((c) => c.length), 1);
  const rotate = longest * CHAR > cellW - 4;
  const top = rotate ? Math.min(140, longest * CHAR * 0.72 + 16) : 22;
  const width = left + cols.length * cellW + 4;
  const height = top + rows.length * cellH + 4;
  const svg = s("svg", { width, height, viewBox: `0 0 ${width} ${height}`, class: "heatmap", role: "img" });
  if (title) svg.append(s("title", { text: title }));
  cols.forEach((label, c) => {
    const x = left + c * cellW + cellW / 2;
    const attrs = rotate
      ? { x, y: top - 6, transform: `rotate(-45 ${x} ${top - 6})`, "text-anchor": "start" }
      : { x, y: top - 7, "text-anchor": "middle" };
    const cls = `col-label${onColumn ? " clickable" : ""}${selectedColumn === c ? " selected" : ""}`;
    const t = s("text", { ...attrs, class: cls, data: { column: c }, text: label });
    if (onColumn) t.addEventListener("click", () => onColumn(c));
    svg.append(t);
  });
  rows.forEach((label, r) => {
    svg.append(s("text", { x: left - 8, y: top + r * cellH + cellH / 2 + 4, "text-anchor": "end", class: "row-label", text: label }));
    cols.forEach((_, c) => {
      const spec = cell(r, c);
      const g = s("g", { class: `cell ${spec.cls || ""}`, data: spec.data });
      g.append(s("rect", { x: left + c * cellW, y: top + r * cellH, width: cellW - 1, height: cellH - 1, fill: spec.fill }));
      if (spec.text !== undefined) {
        g.append(s("text", {
          x: left + c * cellW + cellW / 2,
          y: top + r * cellH + cellH / 2 + 4,
          "text-anchor": "middle",
          fill: ink(spec.fill),
          text: spec.text,
        }));
      }
      if (spec.tip) tip(g, spec.tip);
      svg.append(g);
    });
  });
  return svg;
}

// A horizontal colour bar from lo to hi with its end labels.
export function legend(scale, lo, hi, label) {
  const w = 180;
  const svg = s("svg", { width: w + 16 + label.length * CHAR, height: 34, class: "legend" });
  const n = 36;
  for (let i = 0; i < n; i++) {
    svg.append(s("rect", { x: i * (w / n), y: 4, width: w / n + 0.5, height: 12, fill: scale(i / (n - 1)) }));
  }
  svg.append(s("text", { x: 0, y: 30, text: lo }));
  svg.append(s("text", { x: w, y: 30, "text-anchor": "end", text: hi }));
  svg.append(s("text", { x: w + 8, y: 14, text: label }));
  return svg;
}

// A line chart of ys against categorical xs; points carry data (pointData(i)) and a tooltip.
export function lineChart({ xs, ys, title, invert = false, log = false, pointData, pointTip, yLabel }) {
  const W = 360;
  const H = 190;
  const m = { l: 52, r: 12, t: 24, b: 44 };
  const tr = (v) => (log ? Math.log10(1 + v) : v);
  const vals = ys.map(tr);
  let lo = Math.min(...vals);
  let hi = Math.max(...vals);
  if (lo === hi) {
    lo -= 1;
    hi += 1;
  }
  const px = (i) => m.l + (xs.length === 1 ? (W - m.l - m.r) / 2 : (i * (W - m.l - m.r)) / (xs.length - 1));
  const py = (v) => {
    const f = (tr(v) - lo) / (hi - lo);
    return invert ? m.t + f * (H - m.t - m.b) : H - m.b - f * (H - m.t - m.b);
  };
  const svg = s("svg", { width: W, height: H, class: "chart" });
  svg.append(s("text", { x: m.l, y: 14, class: "chart-title", text: title }));
  svg.append(s("line", { x1: m.l, y1: H - m.b, x2: W - m.r, y2: H - m.b, class: "axis" }));
  svg.append(s("line", { x1: m.l, y1: m.t, x2: m.l, y2: H - m.b, class: "axis" }));
  const ticks = [Math.min(...ys), Math.max(...ys)];
  for (const v of ticks) {
    svg.append(s("text", { x: m.l - 6, y: py(v) + 4, "text-anchor": "end", class: "tick", text: yLabel(v) }));
  }
  xs.forEach((x, i) => {
    svg.append(s("text", { x: px(i), y: H - m.b + 16, "text-anchor": "middle", class: "tick", text: x }));
  });
  svg.append(s("polyline", { points: ys.map((v, i) => `${px(i)},${py(v)}`).join(" "), class: "line" }));
  ys.forEach((v, i) => {
    svg.append(tip(s("circle", { cx: px(i), cy: py(v), r: 4, class: "point target-point", data: pointData(i) }), pointTip(i)));
  });
  return svg;
}
