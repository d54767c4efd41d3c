// Metrics in the run viewer: RUN_DIR/viewer-metrics.js (window.T2I_VIEWER_METRICS, written by runner/eval/summary.py:
// {columns, higher, scores: {file: {column: value}}, rows: [{label, set, weight, step, files, mean, std}], fronts})
// gives every image its metric values (in its tooltip and record), colours cells and images by a metric, filters
// and sorts by one, and draws the summary table and two plots (SVG, offline); clicking a row or a point shows the
// images behind it, and clicking one of those opens it. Nothing here runs when the run has no scores.
"use strict";
(function () {
  const M = window.T2I_VIEWER_METRICS, V = window.t2iViewer;
  if (!M || !V || !M.columns || !M.columns.length) return;
  const $ = (id) => document.getElementById(id);
  const cols = M.columns, scores = M.scores || {}, rows = M.rows || [], higher = M.higher || {};
  const fronts = M.fronts || {};
  const st = {colour: "", sort: "", filter: "", min: "", max: "", tcol: "", tdir: -1,
    x: Object.keys(fronts)[0] || cols.find((c) => c !== "clip_t") || cols[0], line: cols[0], picked: null};
  const range = {};
  for (const c of cols) {
    let lo = Infinity, hi = -Infinity;
    for (const s of Object.values(scores)) if (typeof s[c] === "number") { lo = Math.min(lo, s[c]); hi = Math.max(hi, s[c]); }
    range[c] = [lo, hi];
  }
  const val = (f, c) => { const s = scores[f]; return s && typeof s[c] === "number" ? s[c] : null; };
  const fmt = (v) => v === null || v === undefined ? "—" : Math.abs(v) >= 1 ? v.toFixed(2) : v.toFixed(4);
  function colour(c, v, alpha) { // red (worst) to green (best) over the column's range
    const [lo, hi] = range[c];
    let t = hi > lo ? (v - lo) / (hi - lo) : 0.5;
    if (higher[c] === false) t = 1 - t;
    return "hsla(" + Math.round(120 * t) + ", 70%, 42%, " + (alpha === undefined ? 1 : alpha) + ")";
  }

  window.T2I_METRICS_VIEW = {
    keep(f) {
      if (!st.filter) return true;
      const v = val(f, st.filter);
      if (v === null) return false;
      return !(st.min !== "" && v < +st.min) && !(st.max !== "" && v > +st.max);
    },
    sortCell(list, fileOf) {
      if (!st.sort) return;
      const sign = higher[st.sort] === false ? 1 : -1; // best first
      const key = (i) => { const v = val(fileOf(i), st.sort); return v === null ? Infinity : sign * v; };
      list.sort((a, b) => key(a) - key(b));
    },
    thumb(t, f) {
      const s = scores[f];
      if (!s) return;
      t.title += "\n" + cols.map((c) => c + ": " + fmt(val(f, c))).join("\n");
      const c = st.colour || st.sort;
      if (!c || val(f, c) === null) return;
      if (st.colour) { t.style.outline = "3px solid " + colour(c, val(f, c)); t.style.outlineOffset = "-3px"; }
      const b = document.createElement("span");
      b.className = "metric-badge"; b.textContent = fmt(val(f, c));
      t.appendChild(b);
    },
    cell(el, files) {
      if (!st.colour) return;
      const vs = files.map((f) => val(f, st.colour)).filter((v) => v !== null);
      if (vs.length) el.style.background = colour(st.colour, vs.reduce((a, b) => a + b, 0) / vs.length, 0.35);
    },
    record(f, row) { for (const c of cols) row(c, fmt(val(f, c))); },
  };

  // ---- the panel: controls, table, plots, picked images -------------------------------------------------
  const style = document.createElement("style");
  style.textContent = "#metrics{padding:4px 8px;border-bottom:1px solid #8884}#metrics .mrow{display:flex;gap:12px;" +
    "flex-wrap:wrap;align-items:center;margin:4px 0}#metrics table{border-collapse:collapse;font-size:12px}" +
    "#metrics th,#metrics td{padding:2px 6px;border-bottom:1px solid #8883;text-align:right}#metrics th{cursor:pointer}" +
    "#metrics td:first-child,#metrics th:first-child{text-align:left}#metrics tr.front td:first-child{font-weight:bold}" +
    "#metrics tr.pick{background:#fc04}#metrics tbody tr{cursor:pointer}#metrics svg{background:#fff;border:1px solid #8884}" +
    "#metrics svg .pt{cursor:pointer}#metrics .picked img{width:64px;height:64px;object-fit:cover;cursor:pointer;margin:1px}" +
    ".metric-badge{position:absolute;left:1px;bottom:1px;font:10px monospace;background:#000a;color:#fff;padding:0 2px}" +
    ".thumb{position:relative}#metrics .tbl{max-height:220px;overflow:auto}";
  document.head.appendChild(style);
  const box = $("metrics");
  box.hidden = false;
  const el = (tag, attrs, text) => {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
    if (text !== undefined) e.textContent = text;
    return e;
  };
  function select(id, label, options, value, onchange) {
    const l = el("label", {}, label + " ");
    const s = el("select", {id});
    for (const [v, t] of options) { const o = el("option", {value: v}, t); if (v === value) o.selected = true; s.appendChild(o); }
    s.addEventListener("change", () => onchange(s.value));
    l.appendChild(s);
    return l;
  }
  const none = [["", "none"]].concat(cols.map((c) => [c, c]));
  const details = el("details", {open: ""});
  details.appendChild(el("summary", {}, "Metrics (" + cols.join(", ") + "; " + Object.keys(scores).length +
    " images scored)"));
  const controls = el("div", {class: "mrow"});
  controls.appendChild(select("metric-colour", "Colour by", none, st.colour, (v) => { st.colour = v; V.render(); }));
  controls.appendChild(select("metric-sort", "Sort in cell by", none, st.sort, (v) => { st.sort = v; V.render(); }));
  controls.appendChild(select("metric-filter", "Filter by", none, st.filter, (v) => { st.filter = v; V.render(); }));
  for (const which of ["min", "max"]) {
    const l = el("label", {}, which + " ");
    const i = el("input", {id: "metric-" + which, type: "number", step: "any", style: "width:6em"});
    i.addEventListener("input", () => { st[which] = i.value; V.render(); });
    l.appendChild(i);
    controls.appendChild(l);
  }
  details.appendChild(controls);
  const tableBox = el("div", {class: "tbl"});
  details.appendChild(tableBox);
  const plots = el("div", {class: "mrow"});
  details.appendChild(plots);
  const picked = el("div", {class: "picked", id: "metric-picked"});
  details.appendChild(picked);
  box.appendChild(details);
  const onFront = new Set(Object.values(fronts).flat());

  function drawTable() {
    const t = el("table", {id: "metric-table"});
    const head = el("tr");
    for (const [k, text] of [["label", "LoRA set × weight × step"], ["n", "n"]].concat(cols.map((c) => [c, c]))) {
      const th = el("th", {"data-col": k}, text + (st.tcol === k ? (st.tdir > 0 ? " ▲" : " ▼") : ""));
      th.addEventListener("click", () => { st.tdir = st.tcol === k ? -st.tdir : -1; st.tcol = k; drawTable(); });
      head.appendChild(th);
    }
    const thead = el("thead"); thead.appendChild(head); t.appendChild(thead);
    const key = (r) => st.tcol === "label" ? r.label : st.tcol === "n" ? r.files.length : r.mean[st.tcol];
    const list = rows.slice();
    if (st.tcol) list.sort((a, b) => {
      const x = key(a), y = key(b);
      if (x === null || x === undefined) return 1;
      if (y === null || y === undefined) return -1;
      return (x < y ? -1 : x > y ? 1 : 0) * st.tdir;
    });
    const body = el("tbody");
    for (const r of list) {
      const tr = el("tr", {class: (onFront.has(r.label) ? "front " : "") + (st.picked === r ? "pick" : "")});
      tr.appendChild(el("td", {}, r.label + (onFront.has(r.label) ? " ★" : "")));
      tr.appendChild(el("td", {}, String(r.files.length)));
      for (const c of cols) {
        const td = el("td", {}, r.mean[c] === null ? "—" : fmt(r.mean[c]) + " ± " + fmt(r.std[c]));
        if (st.colour === c && r.mean[c] !== null) td.style.background = colour(c, r.mean[c], 0.35);
        tr.appendChild(td);
      }
      tr.addEventListener("click", () => pick(r));
      body.appendChild(tr);
    }
    t.appendChild(body);
    tableBox.replaceChildren(t);
  }

  const NS = ["http:", "", "www.w3.org", "2000", "svg"].join("/"); // the SVG namespace (a name, not a request)
  function svg(tag, attrs, text) {
    const e = document.createElementNS(NS, tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
    if (text !== undefined) e.textContent = text;
    return e;
  }
  const PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"];
  function plot(id, title, xl, yl, series, line) { // series: {name: [{x, y, row}]}
    const W = 420, H = 280, L = 50, R = 10, T = 22, B = 36;
    const pts = Object.values(series).flat();
    const s = svg("svg", {id, width: W, height: H, viewBox: "0 0 " + W + " " + H, role: "img"});
    s.appendChild(svg("text", {x: W / 2, y: 14, "text-anchor": "middle", "font-size": 12}, title));
    if (!pts.length) return s;
    let [x0, x1] = [Math.min(...pts.map((p) => p.x)), Math.max(...pts.map((p) => p.x))];
    let [y0, y1] = [Math.min(...pts.map((p) => p.y)), Math.max(...pts.map((p) => p.y))];
    if (x1 === x0) { x0 -= 1; x1 += 1; }
    if (y1 === y0) { y0 -= 1; y1 += 1; }
    const X = (v) => L + (v - x0) / (x1 - x0) * (W - L - R), Y = (v) => H - B - (v - y0) / (y1 - y0) * (H - T - B);
    s.appendChild(svg("line", {x1: L, y1: H - B, x2: W - R, y2: H - B, stroke: "#888"}));
    s.appendChild(svg("line", {x1: L, y1: T, x2: L, y2: H - B, stroke: "#888"}));
    for (let k = 0; k <= 4; k++) {
      const xv = x0 + (x1 - x0) * k / 4, yv = y0 + (y1 - y0) * k / 4;
      s.appendChild(svg("text", {x: X(xv), y: H - B + 12, "text-anchor": "middle", "font-size": 9}, fmt(xv)));
      s.appendChild(svg("text", {x: L - 3, y: Y(yv) + 3, "text-anchor": "end", "font-size": 9}, fmt(yv)));
    }
    s.appendChild(svg("text", {x: (L + W - R) / 2, y: H - 4, "text-anchor": "middle", "font-size": 11}, xl));
    s.appendChild(svg("text", {x: 12, y: (T + H - B) / 2, "font-size": 11, transform: "rotate(-90 12 " + (T + H - B) / 2 + ")",
      "text-anchor": "middle"}, yl));
    Object.entries(series).forEach(([name, list], n) => {
      const color = name === "Pareto front" ? "#d62728" : PALETTE[n % PALETTE.length];
      const sorted = list.slice().sort((a, b) => a.x - b.x);
      if (line || name === "Pareto front") {
        s.appendChild(svg("polyline", {points: sorted.map((p) => X(p.x) + "," + Y(p.y)).join(" "), fill: "none",
          stroke: color, "stroke-width": 1.5}));
      }
      for (const p of sorted) {
        const c = svg("circle", {cx: X(p.x), cy: Y(p.y), r: name === "Pareto front" ? 5 : 4, fill: color,
          class: "pt", "data-row": p.row.label, "fill-opacity": name === "Pareto front" ? 0.5 : 0.9,
          // the front's ring lies over the same row's own point: clicks go through to it
          ...(name === "Pareto front" ? {"pointer-events": "none"} : {})});
        c.appendChild(svg("title", {}, p.row.label + "\n" + xl + " " + fmt(p.x) + ", " + yl + " " + fmt(p.y)));
        c.addEventListener("click", () => pick(p.row));
        s.appendChild(c);
      }
      if (name !== "points") {
        s.appendChild(svg("text", {x: W - R - 4, y: T + 12 + 12 * n, "text-anchor": "end", "font-size": 10, fill: color}, name));
      }
    });
    return s;
  }

  function drawPlots() {
    plots.replaceChildren();
    const c1 = el("div");
    if (cols.includes("clip_t") && st.x && st.x !== "clip_t") {
      const opts = cols.filter((c) => c !== "clip_t").map((c) => [c, c]);
      c1.appendChild(select("metric-plot-x", "Trade-off: clip_t vs", opts, st.x, (v) => { st.x = v; drawPlots(); }));
      const pts = rows.filter((r) => r.mean.clip_t !== null && r.mean[st.x] !== null)
        .map((r) => ({x: r.mean[st.x], y: r.mean.clip_t, row: r}));
      const front = pts.filter((p) => (fronts[st.x] || []).includes(p.row.label));
      c1.appendChild(el("br"));
      c1.appendChild(plot("metric-scatter", "clip_t vs " + st.x, st.x, "clip_t", {points: pts, "Pareto front": front}, false));
    }
    const c2 = el("div");
    c2.appendChild(select("metric-plot-line", "Per set vs weight:", cols.map((c) => [c, c]), st.line,
      (v) => { st.line = v; drawPlots(); }));
    const series = {};
    for (const r of rows) {
      if (r.set === "nolora" || typeof r.weight !== "number" || r.mean[st.line] === null) continue;
      const name = r.set + (r.step !== null ? " step " + r.step : "");
      (series[name] = series[name] || []).push({x: r.weight, y: r.mean[st.line], row: r});
    }
    c2.appendChild(el("br"));
    c2.appendChild(plot("metric-lines", st.line + " vs LoRA weight", "weight", st.line, series, true));
    plots.appendChild(c1);
    plots.appendChild(c2);
  }

  function pick(r) {
    st.picked = r;
    drawTable();
    picked.replaceChildren(el("div", {}, r.label + ": " + r.files.length + " image(s)" +
      cols.map((c) => (r.mean[c] === null ? "" : ", " + c + " " + fmt(r.mean[c]))).join("")));
    const byFile = new Map(V.images().map((im) => [im.f, im]));
    for (const f of r.files.slice(0, 120)) {
      const im = byFile.get(f);
      const img = el("img", {src: (im && (im.s || im.t)) || f, alt: f, title: f + "\n" +
        cols.map((c) => c + ": " + fmt(val(f, c))).join("\n"), "data-file": f});
      img.onerror = () => { if (img.getAttribute("src") !== f) img.src = f; };
      img.addEventListener("click", () => V.openFile(f));
      picked.appendChild(img);
    }
  }

  drawTable();
  drawPlots();
  V.render();
})();
