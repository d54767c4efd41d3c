// t2i-runner's run viewer. Reads window.T2I_VIEWER_DATA (viewer-data.js beside this page, written by
// runner/outputs/viewer.py; its format is described there) and never touches the network: every URL it
// builds is relative to this page. Works from file:// (scripts, not fetch) and from `t2i-serve` (/runs).
"use strict";
(function () {
  const $ = (id) => document.getElementById(id);
  const J = (v) => JSON.stringify(v);
  const MAX_SHOWN = 64; // images drawn in one cell; the rest are a "+N" badge (the image view pages through all)
  const MIN_TILE = 32; // smallest tile (CSS px) of an image in a cell: a bigger cell size shows more of them
  const SMALL_PX = 64; // tiles up to this many device pixels use the small thumbnails
  const POLL_RUNNING = 2000, POLL_IDLE = 15000, STALE_S = 60;

  let D = null; // the data
  let axes = [], images = [], byFile = new Map(), byAxes = null;
  const S = {
    x: null, y: null, filters: {}, hidden: {}, size: 160,
    focus: {r: 0, c: 0, k: 0}, A: null, B: null, detail: null, mode: "side", ref: "baseline", gain: 1, pos: 50,
  };
  let G = null; // the current layout
  const live = new Map(), liveCols = new Map(), liveRows = new Map();
  const scroller = $("scroller"), space = $("space");

  // ---- 1. data ------------------------------------------------------------------------------------------

  function load(data) {
    D = data;
    axes = data.axes || [];
    images = data.images || [];
    byFile = new Map(images.map((im, i) => [im.f, i]));
    byAxes = null;
  }

  function record(i) {
    const im = images[i];
    return Object.assign({}, D.common, im.r, {file: im.f});
  }

  function axisIndex(name) { return axes.findIndex((a) => a.name === name); }

  function url(rel) { // a path relative to this page, each segment encoded
    return rel.split("/").map((s) => (s === ".." || s === "." ? s : encodeURIComponent(s))).join("/");
  }

  function labels(i, skip) { // "axis: value" of an image on every axis (but those in `skip`)
    const im = images[i];
    return axes.map((a, k) => (skip && skip.includes(k)) || im.a[k] === a.wildcard ? null : a.labels[im.a[k]])
      .filter((t) => t !== null);
  }

  // ---- 2. state from and to the URL hash (a reload, a live update or a shared link keeps the view) -------

  function readHash() {
    const p = new URLSearchParams(location.hash.slice(1));
    if (p.has("x") || p.has("y")) S.chosen = true;
    if (p.has("x")) S.x = p.get("x") || null;
    if (p.has("y")) S.y = p.get("y") || null;
    if (p.has("size")) S.size = Math.max(48, Math.min(512, parseInt(p.get("size"), 10) || 160));
    for (const [k, v] of p) {
      if (k.startsWith("f.")) S.filters[k.slice(2)] = v;
      if (k.startsWith("h.")) S.hidden[k.slice(2)] = new Set(JSON.parse(v));
    }
  }

  function writeHash() {
    const p = new URLSearchParams();
    p.set("x", S.x || "");
    p.set("y", S.y || "");
    p.set("size", String(S.size));
    for (const [k, v] of Object.entries(S.filters)) p.set("f." + k, v);
    for (const [k, v] of Object.entries(S.hidden)) if (v.size) p.set("h." + k, J([...v]));
    history.replaceState(null, "", "#" + p.toString());
  }

  function settle() { // make the state fit the data: valid axes, a filter value for every other axis
    const names = axes.map((a) => a.name);
    if (!S.chosen && S.x === null && S.y === null) { // the PNG grids' choice, else the last swept axes
      const d = D.default || {};
      S.x = names.includes(d.x) ? d.x : names.length ? names[names.length - 1] : null;
      S.y = names.includes(d.y) && d.y !== S.x ? d.y : names.filter((n) => n !== S.x).pop() || null;
    }
    if (S.x !== null && !names.includes(S.x)) S.x = null;
    if (S.y !== null && !names.includes(S.y)) S.y = null;
    if (S.x !== null && S.x === S.y) S.y = null;
    for (const a of axes) {
      if (a.name === S.x || a.name === S.y) continue;
      const cur = S.filters[a.name];
      if (cur === "*" || (cur !== undefined && a.values.some((v) => J(v) === cur))) continue;
      if (a.name === "seed") { S.filters[a.name] = "*"; continue; } // seeds are the batch: all of them, side by side
      const k = a.values.findIndex((_, n) => n !== a.wildcard);
      S.filters[a.name] = J(a.values[k]);
    }
  }

  // ---- 3. layout: which images go in which cell -----------------------------------------------------------

  function shownValues(ai) {
    const a = axes[ai], hid = S.hidden[a.name];
    const out = [];
    a.values.forEach((v, k) => { if (k !== a.wildcard && !(hid && hid.has(J(v)))) out.push(k); });
    return out;
  }

  function layout() {
    const xa = S.x === null ? -1 : axisIndex(S.x), ya = S.y === null ? -1 : axisIndex(S.y);
    const xs = xa >= 0 ? shownValues(xa) : [null], ys = ya >= 0 ? shownValues(ya) : [null];
    const xpos = new Map(xs.map((v, n) => [v, n])), ypos = new Map(ys.map((v, n) => [v, n]));
    const want = axes.map((a, k) => {
      if (k === xa || k === ya) return -2;
      const f = S.filters[a.name];
      return f === "*" ? -1 : a.values.findIndex((v) => J(v) === f);
    });
    const mode = xa < 0 && ya < 0 ? "flat" : ya < 0 ? "wrap" : "table";
    const cells = new Map();
    const M = window.T2I_METRICS_VIEW || null; // metric filter and sort (viewer_assets/metrics.js)
    let shown = 0;
    images.forEach((im, i) => {
      if (M && !M.keep(im.f)) return;
      for (let k = 0; k < axes.length; k++) {
        if (want[k] >= 0 && im.a[k] !== want[k] && im.a[k] !== axes[k].wildcard) return;
      }
      const cols = xa < 0 ? [0] : im.a[xa] === axes[xa].wildcard ? xs.map((_, n) => n) : [xpos.get(im.a[xa])];
      const rows = ya < 0 ? [0] : im.a[ya] === axes[ya].wildcard ? ys.map((_, n) => n) : [ypos.get(im.a[ya])];
      if (cols[0] === undefined || rows[0] === undefined) return;
      shown++;
      if (mode === "flat") { cells.set(cells.size, [i]); return; }
      for (const r of rows) for (const c of cols) {
        const key = r * xs.length + c;
        if (!cells.has(key)) cells.set(key, []);
        cells.get(key).push(i);
      }
    });
    if (M) for (const list of cells.values()) M.sortCell(list, (i) => images[i].f);
    const inner = S.size - 6;
    const fit = Math.max(1, Math.floor((inner + 2) / (MIN_TILE + 2))); // tiles per side that stay >= MIN_TILE
    let maxK = 1;
    for (const list of cells.values()) maxK = Math.max(maxK, Math.min(list.length, MAX_SHOWN, fit * fit));
    const kc = Math.ceil(Math.sqrt(maxK)), kr = Math.ceil(maxK / kc);
    const ratio = aspect();
    const tw = Math.max(8, Math.floor((inner - 2 * (kc - 1)) / kc));
    const th = Math.max(8, Math.round(tw * ratio));
    const cap = mode === "table" ? 0 : 16;
    const small = tw * (window.devicePixelRatio || 1) <= SMALL_PX; // many tiny tiles: the 64 px thumbnails
    const g = {xa, ya, xs, ys, mode, cells, shown, kc, kr, tw, th, limit: maxK, small,
      cw: S.size, ch: kr * th + 2 * (kr - 1) + 6 + cap};
    g.count = mode === "flat" ? cells.size : xs.length * (mode === "table" ? ys.length : 1);
    reflow(g);
    return g;
  }

  function reflow(g) { // rows and columns of the layout for the current width
    if (g.mode === "table") { g.ncols = g.xs.length; g.nrows = g.ys.length; return; }
    g.ncols = Math.max(1, Math.floor((scroller.clientWidth || 800) / g.cw));
    g.nrows = Math.ceil(g.count / g.ncols);
  }

  function aspect() { // height / width of the images (most common), for the cell shape
    const seen = new Map();
    const step = Math.max(1, Math.floor(images.length / 200));
    for (let i = 0; i < images.length; i += step) {
      const r = record(i);
      const q = r.width && r.height ? Math.round((r.height / r.width) * 100) / 100 : 1;
      seen.set(q, (seen.get(q) || 0) + 1);
    }
    let best = 1, n = 0;
    for (const [q, c] of seen) if (c > n) { best = q; n = c; }
    return Math.max(0.25, Math.min(4, best));
  }

  function cellIndex(r, c) { // logical cell number at grid position (r, c), or -1
    if (r < 0 || c < 0 || r >= G.nrows || c >= G.ncols) return -1;
    const n = G.mode === "table" ? r * G.xs.length + c : r * G.ncols + c;
    return n < G.count ? n : -1;
  }

  function cellImages(n) { return n < 0 ? [] : G.cells.get(n) || []; }

  function cellLabel(n) { // the label of a cell in wrap mode (its x value), else ""
    if (G.mode !== "wrap") return G.mode === "flat" ? (images[cellImages(n)[0]] || {}).f || "" : "";
    return axes[G.xa].labels[G.xs[n]];
  }

  // ---- 4. drawing: only the cells in view exist in the page (10,000 images scroll like 50) ----------------

  function render() {
    writeHash();
    G = layout();
    S.focus.r = Math.max(0, Math.min(S.focus.r, G.nrows - 1));
    S.focus.c = Math.max(0, Math.min(S.focus.c, G.ncols - 1));
    const view = $("view");
    view.classList.toggle("no-rows", G.mode !== "table" || G.ya < 0);
    view.classList.toggle("no-cols", G.mode !== "table" || G.xa < 0);
    for (const m of [live, liveCols, liveRows]) { for (const node of m.values()) node.remove(); m.clear(); }
    resize();
    drawControls();
    const empty = $("empty");
    empty.hidden = G.shown > 0;
    if (!images.length) empty.textContent = D.progress && D.progress.state === "running"
      ? "Waiting for the first image…" : "This run has no images.";
    else empty.textContent = "No image matches these filters.";
    $("count").textContent = G.shown + (G.shown === 1 ? " image" : " images") + " shown of " + images.length;
    paint();
  }

  function resize() {
    reflow(G);
    space.style.width = G.ncols * G.cw + "px";
    space.style.height = G.nrows * G.ch + "px";
    $("colhead-inner").style.width = G.ncols * G.cw + "px";
    $("rowhead-inner").style.height = G.nrows * G.ch + "px";
  }

  let painting = false, flinging = false, lastTop = 0, settle_ = 0;
  function schedule() {
    if (Math.abs(scroller.scrollTop - lastTop) > G.ch / 2) flinging = true; // half a row or more per event
    lastTop = scroller.scrollTop;
    clearTimeout(settle_);
    settle_ = setTimeout(sharpen, 150);
    if (painting) return;
    painting = true;
    requestAnimationFrame(() => { painting = false; paint(); });
  }

  function sharpen() { // the scrolling stopped: the cells in view get their sharp thumbnails
    flinging = false;
    for (const img of space.querySelectorAll("img[data-sharp]")) { img.src = img.dataset.sharp; delete img.dataset.sharp; }
  }

  function paint() {
    const sl = scroller.scrollLeft, st = scroller.scrollTop;
    const vw = scroller.clientWidth, vh = scroller.clientHeight;
    $("colhead-inner").style.transform = "translateX(" + -sl + "px)";
    $("rowhead-inner").style.transform = "translateY(" + -st + "px)";
    const c0 = Math.max(0, Math.floor(sl / G.cw) - 1), c1 = Math.min(G.ncols - 1, Math.floor((sl + vw) / G.cw) + 1);
    const r0 = Math.max(0, Math.floor(st / G.ch) - 1), r1 = Math.min(G.nrows - 1, Math.floor((st + vh) / G.ch) + 1);
    const want = new Set();
    const frag = document.createDocumentFragment();
    for (let r = r0; r <= r1; r++) {
      for (let c = c0; c <= c1; c++) {
        const n = cellIndex(r, c);
        if (n < 0) continue;
        const key = r + ":" + c;
        want.add(key);
        if (!live.has(key)) { const node = makeCell(r, c, n); live.set(key, node); frag.appendChild(node); }
      }
    }
    space.appendChild(frag);
    for (const [key, node] of live) if (!want.has(key)) { node.remove(); live.delete(key); }
    if (G.mode === "table") {
      headers(liveCols, $("colhead-inner"), G.xa, G.xs, c0, c1, (k) => [k * G.cw, 0, G.cw, null]);
      headers(liveRows, $("rowhead-inner"), G.ya, G.ys, r0, r1, (k) => [0, k * G.ch, null, G.ch]);
    }
  }

  function headers(map, box, ai, values, k0, k1, place) {
    if (ai < 0) return;
    const a = axes[ai];
    const want = new Set();
    for (let k = k0; k <= k1 && k < values.length; k++) {
      want.add(k);
      if (map.has(k)) continue;
      const v = values[k];
      const el = document.createElement("div");
      el.className = "label" + (v === a.baseline ? " baseline" : "");
      const [x, y, w, h] = place(k);
      el.style.left = x + "px"; el.style.top = y + "px";
      el.style.width = w === null ? "100%" : w + "px";
      el.style.height = h === null ? "100%" : h + "px";
      const span = document.createElement("span");
      span.textContent = a.labels[v];
      if (v === a.baseline) { const b = document.createElement("b"); b.className = "badge"; b.textContent = "baseline"; span.appendChild(b); }
      el.title = a.labels[v];
      el.appendChild(span);
      el.dataset.axis = a.name;
      el.dataset.value = J(a.values[v]);
      map.set(k, el);
      box.appendChild(el);
    }
    for (const [k, el] of map) if (!want.has(k)) { el.remove(); map.delete(k); }
  }

  function makeCell(r, c, n) {
    const list = cellImages(n);
    const el = document.createElement("div");
    el.className = "cell";
    el.style.left = c * G.cw + "px"; el.style.top = r * G.ch + "px";
    el.style.width = G.cw + "px"; el.style.height = G.ch + "px";
    el.style.gridTemplateColumns = "repeat(" + G.kc + ", " + G.tw + "px)";
    el.style.gridAutoRows = G.th + "px";
    el.dataset.r = r; el.dataset.c = c;
    el.setAttribute("role", "gridcell");
    if (G.mode === "table") {
      if (G.ya >= 0 && G.ys[r] === axes[G.ya].baseline) el.classList.add("base-row");
      if (G.xa >= 0 && G.xs[c] === axes[G.xa].baseline) el.classList.add("base-col");
    }
    if (!list.length) {
      el.classList.add("empty");
      if (D.progress && D.progress.state === "running") el.classList.add("pending");
    }
    list.slice(0, G.limit).forEach((i, k) => {
      const im = images[i];
      const t = document.createElement("div");
      t.className = "thumb";
      t.dataset.i = i; t.dataset.k = k; t.dataset.file = im.f;
      t.title = labels(i).join("\n") || im.f;
      const img = document.createElement("img");
      img.decoding = "async";
      img.draggable = false;
      img.alt = im.f;
      // while the grid scrolls fast, the 64 px thumbnails (sharp ones replace them when it stops); a missing
      // thumbnail falls back to the next, then to the PNG
      const tries = [(G.small || flinging) && im.s, im.t, im.f].filter(Boolean);
      img.src = url(tries.shift());
      if (flinging && !G.small && im.s) img.dataset.sharp = url(im.t);
      img.onerror = () => { if (tries.length) img.src = url(tries.shift()); };
      t.appendChild(img);
      if (window.T2I_METRICS_VIEW) window.T2I_METRICS_VIEW.thumb(t, im.f);
      el.appendChild(t);
    });
    if (window.T2I_METRICS_VIEW) window.T2I_METRICS_VIEW.cell(el, list.map((i) => images[i].f));
    if (list.length > G.limit) {
      const more = document.createElement("span");
      more.className = "more";
      more.textContent = "+" + (list.length - G.limit);
      more.title = "more images in this cell: a bigger Size shows more; [ ] in the image view steps through all";
      el.appendChild(more);
    }
    const text = cellLabel(n);
    if (text) {
      const cap = document.createElement("div");
      cap.className = "cap"; cap.textContent = text; cap.title = text;
      el.appendChild(cap);
    }
    mark(el);
    return el;
  }

  function mark(el) { // focus and A/B marks of one cell node
    const f = S.focus;
    const on = +el.dataset.r === f.r && +el.dataset.c === f.c;
    el.classList.toggle("focus", on);
    for (const t of el.querySelectorAll(".thumb")) {
      t.classList.toggle("kfocus", on && +t.dataset.k === f.k && el.querySelectorAll(".thumb").length > 1);
      t.classList.toggle("sel-a", t.dataset.file === S.A);
      t.classList.toggle("sel-b", t.dataset.file === S.B);
    }
  }

  function remark() { for (const el of live.values()) mark(el); }

  // ---- 5. controls ---------------------------------------------------------------------------------------

  function option(value, text, selected) {
    const o = document.createElement("option");
    o.value = value; o.textContent = text; o.selected = selected;
    return o;
  }

  function drawControls() {
    for (const [id, cur] of [["x-axis", S.x], ["y-axis", S.y]]) {
      const sel = $(id);
      sel.replaceChildren(option("", "none", cur === null),
        ...axes.map((a) => option(a.name, a.name + " (" + (a.values.length - (a.wildcard === null ? 0 : 1)) + ")",
          a.name === cur)));
    }
    const box = $("filters");
    box.replaceChildren();
    axes.forEach((a) => {
      if (a.name === S.x || a.name === S.y) return;
      const label = document.createElement("label");
      label.append(a.name + " ");
      const sel = document.createElement("select");
      sel.dataset.axis = a.name;
      a.values.forEach((v, k) => {
        if (k === a.wildcard) return;
        const text = a.labels[k].slice(a.name.length + 2) + (k === a.baseline ? " (baseline)" : "");
        sel.appendChild(option(J(v), text, S.filters[a.name] === J(v)));
      });
      sel.appendChild(option("*", "all (in each cell)", S.filters[a.name] === "*"));
      sel.addEventListener("change", () => { S.filters[a.name] = sel.value; render(); });
      label.appendChild(sel);
      box.appendChild(label);
    });
    const shown = $("shown");
    shown.replaceChildren();
    for (const [name, what] of [[S.x, "Columns"], [S.y, "Rows"]]) {
      const ai = name === null ? -1 : axisIndex(name);
      if (ai < 0 || axes[ai].values.length > 80) continue;
      const a = axes[ai], hid = S.hidden[a.name] || new Set();
      const det = document.createElement("details");
      const sum = document.createElement("summary");
      const all = a.values.filter((_, k) => k !== a.wildcard);
      sum.textContent = what + " shown: " + all.filter((v) => !hid.has(J(v))).length + " of " + all.length;
      det.appendChild(sum);
      const chips = document.createElement("div");
      chips.className = "chips";
      a.values.forEach((v, k) => {
        if (k === a.wildcard) return;
        const l = document.createElement("label");
        const cb = document.createElement("input");
        cb.type = "checkbox"; cb.checked = !hid.has(J(v)); cb.dataset.value = J(v);
        cb.addEventListener("change", () => {
          const h = S.hidden[a.name] || (S.hidden[a.name] = new Set());
          if (cb.checked) h.delete(J(v)); else h.add(J(v));
          det.dataset.keep = "1";
          render();
        });
        l.append(cb, " " + a.labels[k].slice(a.name.length + 2));
        chips.appendChild(l);
      });
      det.appendChild(chips);
      det.open = !!openShown[what];
      det.addEventListener("toggle", () => { openShown[what] = det.open; });
      shown.appendChild(det);
    }
    $("size").value = S.size;
    drawSlots();
  }
  const openShown = {};

  function drawSlots() {
    for (const [id, f] of [["slot-a", S.A], ["slot-b", S.B]]) {
      const b = $(id);
      b.disabled = !f || !byFile.has(f);
      b.textContent = f && byFile.has(f) ? labels(byFile.get(f)).join(", ") || f : "none";
      b.title = f || "";
    }
  }

  function setAxis(which, name) {
    S.chosen = true;
    const other = which === "x" ? "y" : "x";
    if (name !== null && S[other] === name) S[other] = S[which];
    S[which] = name;
    settle();
    S.focus = {r: 0, c: 0, k: 0};
    render();
  }

  $("x-axis").addEventListener("change", (e) => setAxis("x", e.target.value || null));
  $("y-axis").addEventListener("change", (e) => setAxis("y", e.target.value || null));
  $("swap").addEventListener("click", () => { S.chosen = true; [S.x, S.y] = [S.y, S.x]; settle(); render(); });
  $("size").addEventListener("input", (e) => { S.size = +e.target.value; render(); });
  $("slot-a").addEventListener("click", () => S.A && openDetail(byFile.get(S.A)));
  $("slot-b").addEventListener("click", () => S.B && openDetail(byFile.get(S.B)));
  $("compare-open").addEventListener("click", () => openCompare("side"));
  $("help-open").addEventListener("click", () => openOverlay("help"));
  scroller.addEventListener("scroll", schedule, {passive: true});
  window.addEventListener("resize", () => { if (G && G.mode !== "table") render(); else if (G) { resize(); paint(); } });

  space.addEventListener("click", (e) => {
    const t = e.target.closest(".thumb");
    if (!t) return;
    const cell = t.closest(".cell");
    S.focus = {r: +cell.dataset.r, c: +cell.dataset.c, k: +t.dataset.k};
    remark();
    openDetail(+t.dataset.i);
  });

  // ---- 6. keyboard -----------------------------------------------------------------------------------------

  function focused() { // the image index under the keyboard focus, or -1
    const list = cellImages(cellIndex(S.focus.r, S.focus.c));
    return list.length ? list[Math.min(S.focus.k, list.length - 1)] : -1;
  }

  function moveFocus(dr, dc) {
    let {r, c} = S.focus;
    if (G.mode === "table") {
      r = Math.max(0, Math.min(G.nrows - 1, r + dr));
      c = Math.max(0, Math.min(G.ncols - 1, c + dc));
    } else {
      let n = Math.max(0, Math.min(G.count - 1, r * G.ncols + c + dc + dr * G.ncols));
      r = Math.floor(n / G.ncols); c = n % G.ncols;
    }
    S.focus = {r, c, k: 0};
    reveal();
  }

  function reveal() { // scroll the focused cell into view and mark it
    const {r, c} = S.focus;
    const x = c * G.cw, y = r * G.ch;
    if (x < scroller.scrollLeft) scroller.scrollLeft = x;
    else if (x + G.cw > scroller.scrollLeft + scroller.clientWidth) scroller.scrollLeft = x + G.cw - scroller.clientWidth;
    if (y < scroller.scrollTop) scroller.scrollTop = y;
    else if (y + G.ch > scroller.scrollTop + scroller.clientHeight) scroller.scrollTop = y + G.ch - scroller.clientHeight;
    paint();
    remark();
  }

  function stepInCell(d) {
    const list = cellImages(cellIndex(S.focus.r, S.focus.c));
    if (!list.length) return;
    S.focus.k = (Math.min(S.focus.k, list.length - 1) + d + list.length) % list.length;
    remark();
  }

  function cycleAxis(which) {
    const names = [null, ...axes.map((a) => a.name)];
    const k = names.indexOf(S[which]);
    setAxis(which, names[(k + 1) % names.length]);
  }

  function setSlot(slot, i) {
    if (i < 0) return;
    S[slot] = images[i].f;
    drawSlots();
    remark();
    if (!$("detail").hidden) drawDetail();
  }

  const ARROWS = {ArrowLeft: [0, -1], ArrowRight: [0, 1], ArrowUp: [-1, 0], ArrowDown: [1, 0]};

  document.addEventListener("keydown", (e) => {
    if (e.ctrlKey || e.metaKey || e.altKey) return;
    const tag = e.target.tagName;
    const ov = topOverlay();
    if (e.key === "Escape") { if (ov) { closeOverlay(ov); e.preventDefault(); } return; }
    if ((tag === "INPUT" || tag === "SELECT" || tag === "TEXTAREA") && e.target.type !== "checkbox") return;
    if (ov === "help") return;
    if (ov === "compare") {
      if (e.key === "1" || e.key === "2" || e.key === "3") setMode(["side", "slider", "diff"][+e.key - 1]);
      else if (S.mode === "slider" && (e.key === "ArrowLeft" || e.key === "ArrowRight")) {
        setPos(S.pos + (e.key === "ArrowLeft" ? -5 : 5));
      } else return;
      e.preventDefault();
      return;
    }
    let handled = true;
    if (ARROWS[e.key]) {
      moveFocus(...ARROWS[e.key]);
      if (ov === "detail") { const i = focused(); if (i >= 0) openDetail(i); }
    } else if (e.key === "Home" || e.key === "End") {
      S.focus = {r: S.focus.r, c: e.key === "Home" ? 0 : G.ncols - 1, k: 0};
      reveal();
    } else if (e.key === "[" || e.key === "]") {
      stepInCell(e.key === "[" ? -1 : 1);
      if (ov === "detail") { const i = focused(); if (i >= 0) openDetail(i); }
    } else if (e.key === "Enter" && !ov) {
      const i = focused(); if (i >= 0) openDetail(i);
    } else if (e.key === "a" || e.key === "b") {
      setSlot(e.key.toUpperCase(), ov === "detail" ? S.detail : focused());
    } else if (e.key === "c") {
      openCompare("side");
    } else if (e.key === "d") {
      const i = ov === "detail" ? S.detail : focused();
      if (i >= 0) { S.A = images[i].f; S.ref = "baseline"; drawSlots(); openCompare("diff"); }
    } else if (!ov && e.key === "x") cycleAxis("x");
    else if (!ov && e.key === "y") cycleAxis("y");
    else if (!ov && e.key === "s") $("swap").click();
    else if (!ov && (e.key === "+" || e.key === "=" || e.key === "-")) {
      S.size = Math.max(48, Math.min(512, S.size + (e.key === "-" ? -16 : 16)));
      render();
    } else if (e.key === "?") openOverlay("help");
    else handled = false;
    if (handled) e.preventDefault();
  });

  // ---- 7. overlays: the image view, compare, help ----------------------------------------------------------

  const stack = [];
  function openOverlay(id) {
    const el = $(id);
    if (el.hidden) { el.hidden = false; stack.push(id); }
    const close = el.querySelector(".close");
    if (close && !el.contains(document.activeElement)) close.focus();
  }
  function closeOverlay(id) {
    $(id).hidden = true;
    const k = stack.indexOf(id);
    if (k >= 0) stack.splice(k, 1);
    if (id === "detail") S.detail = null;
    if (!stack.length) { scroller.focus(); remark(); }
  }
  function topOverlay() { return stack.length ? stack[stack.length - 1] : null; }
  document.querySelectorAll("[data-close]").forEach((b) => b.addEventListener("click", () => closeOverlay(b.dataset.close)));
  document.querySelectorAll(".overlay").forEach((o) => o.addEventListener("click", (e) => {
    if (e.target === o) closeOverlay(o.id);
  }));

  function openDetail(i) {
    if (i === undefined || i < 0) return;
    S.detail = i;
    drawDetail();
    openOverlay("detail");
  }

  function drawDetail() {
    const i = S.detail, im = images[i], rec = record(i);
    $("detail-title").textContent = labels(i).join(" · ") || im.f;
    fitDetail(rec);
    $("detail-img").src = url(im.f);
    $("detail-img").alt = rec.prompt || im.f;
    $("detail-link").href = url(im.f);
    $("detail-caption").textContent = im.f + (rec.width ? "  (" + rec.width + "×" + rec.height + ")" : "");
    $("cmd-from").textContent = fromImageCommand(im.f);
    $("cmd-over").textContent = overridesCommand(rec);
    $("copy-note").textContent = "";
    $("detail-diff").disabled = baselineOf(i) < 0;
    $("detail-a").textContent = S.A === im.f ? "A ✓" : "Set A";
    $("detail-b").textContent = S.B === im.f ? "B ✓" : "Set B";
    const list = cellImages(cellIndex(S.focus.r, S.focus.c));
    $("detail-prev").disabled = $("detail-next").disabled = list.length < 2;
    drawRecord(rec);
    $("raw-json").textContent = JSON.stringify(rec, null, 2);
  }

  function fitDetail(rec) { // small images are enlarged by whole pixels (pixelated), big ones fit the window
    const img = $("detail-img"), w = rec.width || 512, h = rec.height || 512;
    const wide = window.innerWidth > 640;
    const maxW = Math.max(64, (wide ? 0.55 : 1) * window.innerWidth - 48), maxH = Math.max(64, window.innerHeight * (wide ? 1 : 0.6) - 140);
    const fit = Math.min(maxW / w, maxH / h), s = fit >= 2 ? Math.floor(fit) : Math.min(1, fit);
    img.style.width = Math.round(w * s) + "px";
    img.style.height = Math.round(h * s) + "px";
    img.classList.toggle("pixelated", s > 1);
  }

  $("detail-prev").addEventListener("click", () => { stepInCell(-1); openDetail(focused()); });
  $("detail-next").addEventListener("click", () => { stepInCell(1); openDetail(focused()); });
  $("detail-a").addEventListener("click", () => setSlot("A", S.detail));
  $("detail-b").addEventListener("click", () => setSlot("B", S.detail));
  $("detail-diff").addEventListener("click", () => {
    S.A = images[S.detail].f; S.ref = "baseline"; drawSlots(); openCompare("diff");
  });

  const SHOWN = new Set();
  function row(table, name, value, cls) {
    const tr = document.createElement("tr");
    if (cls) tr.className = cls;
    const th = document.createElement("th");
    th.textContent = name;
    const td = document.createElement("td");
    if (value instanceof Node) td.appendChild(value); else td.textContent = value === null || value === undefined ? "—" : String(value);
    tr.append(th, td);
    table.appendChild(tr);
  }

  function small(head, rows) {
    const t = document.createElement("table");
    const tr = document.createElement("tr");
    for (const h of head) { const th = document.createElement("th"); th.textContent = h; tr.appendChild(th); }
    t.appendChild(tr);
    for (const r of rows) {
      const tr2 = document.createElement("tr");
      for (const v of r) {
        const td = document.createElement("td");
        if (v && typeof v === "object" && "text" in v) { td.textContent = v.text; td.title = v.title; } else td.textContent = v === null || v === undefined ? "—" : String(v);
        tr2.appendChild(td);
      }
      t.appendChild(tr2);
    }
    return t;
  }

  function drawRecord(rec) {
    const t = $("record");
    t.replaceChildren();
    SHOWN.clear();
    const use = (k) => { SHOWN.add(k); return rec[k]; };
    row(t, "Prompt", use("prompt"), "section");
    for (const k of Object.keys(rec)) { // an expanded / templated prompt, whatever its field is called
      if (/prompt/.test(k) && k !== "prompt" && k !== "negative_prompt" && typeof rec[k] === "string") {
        row(t, k.replace(/_/g, " "), use(k));
      }
    }
    row(t, "Negative prompt", use("negative_prompt") || "");
    row(t, "Seed", use("seed"));
    row(t, "Steps", use("steps"));
    row(t, "CFG scale", use("guidance_scale"));
    row(t, "Size", rec.width + "×" + rec.height); SHOWN.add("width"); SHOWN.add("height");
    row(t, "Sampler", (use("sampler") || "") + (rec.schedule_type ? " / " + rec.schedule_type : "") +
      (rec.scheduler ? "  (scheduler=" + rec.scheduler + (rec.schedule ? ", schedule=" + rec.schedule : "") + ")"
        : "  (the model's own)") + (rec.scheduler_class ? ", " + rec.scheduler_class : ""));
    for (const k of ["scheduler", "scheduler_class", "schedule", "schedule_type"]) SHOWN.add(k);
    row(t, "Clip skip", use("clip_skip") || 1);
    const loras = use("loras") || [];
    row(t, "LoRAs", loras.length ? small(["name", "scale", "sha256", "source"], loras.map((lo) => [
      lo.name, lo.scale, {text: (lo.sha256 || "").slice(0, 12), title: lo.sha256 || ""},
      {text: lo.source + (lo.weight_name ? " (" + lo.weight_name + ")" : ""), title: lo.file || ""}])) :
      "none (the no-LoRA baseline)", "section");
    row(t, "LoRA set / scale", (rec.lora_set === undefined ? "—" : rec.lora_set) + " / " + (rec.lora_scale === null || rec.lora_scale === undefined ? "—" : rec.lora_scale));
    SHOWN.add("lora_set"); SHOWN.add("lora_scale");
    const m = use("model") || {};
    row(t, "Model", m.name, "section");
    row(t, "Model id", m.id + (m.revision ? " @ " + m.revision : "") + (m.location && m.location !== m.id ? "  (" + m.location + ")" : ""));
    row(t, "Model sha256", m.hash);
    row(t, "Pipeline / dtype", (m.pipeline || "—") + " / " + (m.dtype || "—") + (m.variant ? " / " + m.variant : ""));
    row(t, "Device", use("device"));
    row(t, "Batch", "size " + use("batch_size") + (use("batch_invariant") ? ", batch-invariant" : ""));
    if (rec.perf) row(t, "Fast path", Object.entries(use("perf")).filter(([, v]) => v).map(([k]) => k).join(", ") || "off");
    use("generator");
    const v = use("versions") || {};
    row(t, "Versions", Object.entries(v).map(([k, x]) => k + " " + x).join(", "), "section");
    if (window.T2I_METRICS_VIEW) window.T2I_METRICS_VIEW.record(rec.file, (name, value) => row(t, name, value));
    row(t, "File", use("file"));
    row(t, "Key", use("key"));
    use("index"); use("record_version");
    const rest = Object.keys(rec).filter((k) => !SHOWN.has(k));
    for (const k of rest) { // fields this page does not know yet (other branches add some): shown as they are
      const x = rec[k];
      row(t, k, x !== null && typeof x === "object" ? JSON.stringify(x) : x);
    }
  }

  // ---- 8. reproduce commands (mirror of runner/reproduce/from_image.py: record_config) ----------------------

  function hq(s) { // a Hydra double-quoted string that reads back as `s` (quotes, backslashes, ${...} escaped)
    s = String(s).replace(/(\\*)\$\{/g, (m, b) => b + b + "\\${");
    s = s.replace(/(\\*)"/g, (m, b) => b + b + '\\"').replace(/(\\+)$/, (m, b) => b + b);
    return '"' + s + '"';
  }
  function hs(s) { // a Hydra string value: bare when that reads back the same, else quoted
    return /^[A-Za-z][\w./-]*$/.test(s) && !/^(null|true|false|nan|inf)$/i.test(s) ? s : hq(s);
  }
  function hv(v) { // a Hydra value (lists, dicts, numbers, booleans, null, strings)
    if (v === null || v === undefined) return "null";
    if (typeof v === "boolean") return v ? "true" : "false";
    if (typeof v === "number") return String(v);
    if (Array.isArray(v)) return "[" + v.map(hv).join(", ") + "]";
    if (typeof v === "object") return "{" + Object.entries(v).map(([k, x]) => k + ": " + hv(x)).join(", ") + "}";
    return hs(String(v));
  }
  function sh(arg) { return /^[\w@%+=:,./-]+$/.test(arg) ? arg : "'" + arg.replace(/'/g, "'\\''") + "'"; }

  function absPath(rel) {
    let base = D.dir;
    if (location.protocol === "file:") {
      base = decodeURIComponent(location.pathname).replace(/\/[^/]*$/, "");
      if (/^\/[A-Za-z]:/.test(base)) base = base.slice(1);
    }
    const out = [];
    for (const part of (base + "/" + rel).split("/")) {
      if (part === "..") out.pop(); else if (part !== "." && (part !== "" || !out.length)) out.push(part);
    }
    return out.join("/");
  }

  function fromImageCommand(file) {
    const p = absPath(file);
    return "t2i " + sh("from_image=" + (/^[\w/.:~+@%-]+$/.test(p) ? p : hq(p)));
  }

  const PIPELINES = {StableDiffusionPipeline: "sd", StableDiffusionXLPipeline: "sdxl"};
  const DTYPES = {float32: "fp32", float16: "fp16", bfloat16: "bf16"};

  function pyRound(x, n) { const f = Math.pow(10, n); return Math.round(x * f) / f; }
  function unscale(weights, mult) {
    if (mult !== 0) {
      for (const scales of [weights.map((w) => pyRound(w / mult, 6)), weights.map((w) => w / mult)]) {
        if (scales.every((s, k) => s * mult === weights[k] && Math.abs(s) <= 10)) return [scales, mult];
      }
      return [weights.slice(), 1.0];
    }
    return [weights.map(() => 1.0), 0.0];
  }

  function overrides(rec) { // [key, value] pairs: the settings that fix this image's pixels
    const out = [];
    const m = rec.model || {};
    let id = m.kind === "dir" || m.kind === "file" ? m.location : m.id;
    if (m.kind === "builtin") id = m.location || "builtin:tiny";  // builtin:tiny-<family>: the family's tiny model
    out.push(["model.id", id], ["model.revision", m.kind === "hub" ? m.revision : null],
      ["model.pipeline", PIPELINES[m.pipeline] || "auto"], ["model.dtype", DTYPES[m.dtype] || "auto"],
      ["model.variant", m.variant === undefined ? null : m.variant], ["model.config", m.config === undefined ? null : m.config],
      ["model.transformer", m.transformer === undefined ? null : m.transformer],
      ["model.family", null]);  // a default group's `settings` stay, but the record's own values below win
    out.push(["prompts", [rec.prompt || ""]], ["negative_prompt", rec.negative_prompt || ""]);
    if (rec.seed !== null && rec.seed !== undefined) out.push(["seeds", {raw: "[" + String(rec.seed) + "]"}]);
    for (const k of ["steps", "guidance_scale", "width", "height", "clip_skip", "true_cfg_scale", "max_sequence_length"]) {
      if (rec[k] !== null && rec[k] !== undefined) out.push([k, rec[k]]);
    }
    out.push(["scheduler", rec.scheduler === undefined ? null : rec.scheduler]);
    out.push(["schedule", rec.schedule === undefined ? null : rec.schedule]);
    if (rec.threads && String(rec.device).startsWith("cpu")) out.push(["threads", rec.threads]); // CPU rounding
    const loras = rec.loras || [];
    const [scales, mult] = unscale(loras.map((lo) => lo.scale), rec.lora_scale === null || rec.lora_scale === undefined ? 1.0 : rec.lora_scale);
    out.push(["lora_sets", [loras.map((lo, k) => ({source: lo.source, weight_name: lo.weight_name === undefined ? null : lo.weight_name, scale: scales[k], name: lo.name, ...(lo.blocks ? {blocks: lo.blocks} : {})}))]]);
    out.push(["lora_scales", [mult]]);
    out.push(["device", String(rec.device || "auto").split(":")[0]]);
    out.push(["batch_invariant", !!rec.batch_invariant]);
    if (rec.memory) for (const k of ["offload", "vae_tiling", "vae_slicing", "attention_slicing"]) {
      if (k in rec.memory) out.push(["memory." + k, rec.memory[k]]);  // they change pixels slightly: reuse them
    }
    out.push(["models", {raw: "[]"}]);  // the image's own model, not a model axis
    if (rec.perf) for (const k of ["channels_last", "fuse_qkv", "fuse_lora", "compile"]) out.push(["perf." + k, !!rec.perf[k]]);
    return out;
  }

  function overridesCommand(rec) {
    return "t2i " + overrides(rec).map(([k, v]) => sh(k + "=" + (v && v.raw ? v.raw : hv(v)))).join(" ");
  }

  async function copy(text) {
    try {
      await navigator.clipboard.writeText(text);
      return true;
    } catch (e) { // no clipboard permission (some file:// setups): select the text so Ctrl+C copies it
      const ta = document.createElement("textarea");
      ta.value = text; document.body.appendChild(ta); ta.select();
      let ok = false;
      try { ok = document.execCommand("copy"); } catch (e2) { ok = false; }
      ta.remove();
      return ok;
    }
  }
  document.querySelectorAll("[data-copy]").forEach((b) => b.addEventListener("click", async () => {
    const text = $(b.dataset.copy).textContent;
    const ok = await copy(text);
    $("copy-note").textContent = ok ? "Copied." : "Select the command and copy it (the browser refused).";
    if (!ok) { const r = document.createRange(); r.selectNodeContents($(b.dataset.copy)); getSelection().removeAllRanges(); getSelection().addRange(r); }
  }));

  // ---- 9. compare: side by side, A/B slider, difference to the baseline (or to B) ---------------------------

  function baselineOf(i) { // the no-LoRA image with every other setting equal, or -1
    const la = axes.findIndex((a) => a.baseline !== null);
    if (la < 0) return -1;
    const want = images[i].a.slice();
    if (want[la] === axes[la].baseline) return -1;
    want[la] = axes[la].baseline;
    axes.forEach((a, k) => { if (a.wildcard !== null) want[k] = a.wildcard; });
    if (!byAxes) { byAxes = new Map(); images.forEach((im, n) => { if (!byAxes.has(J(im.a))) byAxes.set(J(im.a), n); }); }
    const n = byAxes.get(J(want));
    return n === undefined ? -1 : n;
  }

  function setMode(mode) {
    S.mode = mode;
    $("compare").dataset.mode = mode;
    for (const b of $("modes").querySelectorAll("button")) b.setAttribute("aria-selected", String(b.dataset.mode === mode));
    drawCompare();
  }
  $("modes").addEventListener("click", (e) => { const b = e.target.closest("button"); if (b) setMode(b.dataset.mode); });
  $("compare-swap").addEventListener("click", () => { [S.A, S.B] = [S.B, S.A]; drawSlots(); remark(); drawCompare(); });
  $("diff-ref").addEventListener("change", (e) => { S.ref = e.target.value; drawCompare(); });
  $("diff-gain").addEventListener("input", (e) => { S.gain = +e.target.value; drawCompare(); });

  function openCompare(mode) {
    if (!S.A) { const i = focused(); if (i >= 0) S.A = images[i].f; }
    drawSlots();
    openOverlay("compare");
    setMode(mode);
  }

  function diffLabel(i, j) { // the axis labels in which image i differs from image j
    const a = images[i].a, b = j >= 0 ? images[j].a : a;
    const ks = axes.map((_, k) => k).filter((k) => a[k] !== b[k]);
    return ks.map((k) => axes[k].labels[a[k]]).join(", ") || images[i].f;
  }

  function stage(el, imgs) { // size a stage to hold the larger of its images, fit to the window
    const w = Math.max(...imgs.map((i) => record(i).width || 64)), h = Math.max(...imgs.map((i) => record(i).height || 64));
    const maxW = Math.max(64, $("compare-body").clientWidth - 24), maxH = Math.max(64, window.innerHeight - 230);
    const s = Math.min(maxW / w, maxH / h, Math.max(1, Math.floor(Math.min(maxW / w, maxH / h))));
    el.style.width = Math.round(w * s) + "px";
    el.style.height = Math.round(h * s) + "px";
    el.classList.toggle("pixelated", s > 1);
  }

  function sideBySide(pair) { // both at one scale: whole pixels when enlarged, side by side (stacked on a phone)
    const shown = pair.filter((i) => i >= 0);
    if (!shown.length) return;
    const narrow = window.innerWidth <= 640;
    const w = Math.max(...shown.map((i) => record(i).width || 64)), h = Math.max(...shown.map((i) => record(i).height || 64));
    const room = $("compare-body").clientWidth - 24;
    const maxW = Math.max(32, narrow ? room : room / 2 - 10), maxH = Math.max(32, (window.innerHeight - 230) / (narrow ? 2 : 1));
    const fit = Math.min(maxW / w, maxH / h), s = fit >= 2 ? Math.floor(fit) : Math.min(1, fit);
    pair.forEach((i, n) => {
      const img = $(n ? "side-b" : "side-a");
      const r = i >= 0 ? record(i) : {width: w, height: h};
      img.style.width = Math.round((r.width || w) * s) + "px";
      img.style.height = Math.round((r.height || h) * s) + "px";
    });
    $("side").classList.toggle("pixelated", s > 1);
  }

  function drawCompare() {
    const a = S.A ? byFile.get(S.A) : undefined, b = S.B ? byFile.get(S.B) : undefined;
    const ia = a === undefined ? -1 : a, ib = b === undefined ? -1 : b;
    const title = $("compare-title");
    title.textContent = "Compare";
    if (S.mode === "side" || S.mode === "slider") {
      if (ia < 0 || ib < 0) { title.textContent = "Set two images as A and B (keys a, b) to compare them"; }
      const fa = ia >= 0 ? url(images[ia].f) : "", fb = ib >= 0 ? url(images[ib].f) : "";
      $("side-a").src = fa; $("side-b").src = fb; $("slider-a").src = fa; $("slider-b").src = fb;
      $("cap-a").textContent = ia >= 0 ? "A: " + diffLabel(ia, ib) : "A: none";
      $("cap-b").textContent = ib >= 0 ? "B: " + diffLabel(ib, ia) : "B: none";
      $("slider-cap").textContent = $("cap-a").textContent + "  |  " + $("cap-b").textContent;
      if (S.mode === "slider" && ia >= 0 && ib >= 0) { stage($("slider-stage"), [ia, ib]); setPos(S.pos); }
      if (S.mode === "side") sideBySide([ia, ib]);
      return;
    }
    const ref = S.ref === "b" ? ib : (ia >= 0 ? baselineOf(ia) : -1);
    $("diff-ref").value = S.ref;
    $("diff-gain-out").textContent = S.gain + "×";
    $("diff-stats").textContent = "";
    if (ia < 0 || ref < 0) {
      $("diff-a").removeAttribute("src"); $("diff-ref-img").removeAttribute("src");
      $("diff-cap").textContent = ia < 0 ? "Set an image as A first (key a)." :
        S.ref === "b" ? "Set an image as B (key b)." : "This image has no no-LoRA baseline in this run.";
      return;
    }
    $("diff-a").src = url(images[ia].f);
    $("diff-ref-img").src = url(images[ref].f);
    stage($("diff-stage"), [ia, ref]);
    $("diff-stage").style.filter = S.gain > 1 ? "brightness(" + S.gain + ")" : "";
    $("diff-cap").textContent = "|A − " + (S.ref === "b" ? "B" : "baseline") + "| per pixel and channel (black = same)" +
      (S.gain > 1 ? ", ×" + S.gain : "") + ".  A: " + diffLabel(ia, ref) + "  ·  reference: " + diffLabel(ref, ia);
    stats(ia, ref);
  }

  function pixels(i) {
    return new Promise((resolve, reject) => {
      const img = new Image();
      img.onload = () => {
        const c = document.createElement("canvas");
        c.width = img.naturalWidth; c.height = img.naturalHeight;
        const ctx = c.getContext("2d", {willReadFrequently: true});
        ctx.drawImage(img, 0, 0);
        try { resolve(ctx.getImageData(0, 0, c.width, c.height)); } catch (e) { reject(e); }
      };
      img.onerror = reject;
      img.src = url(images[i].f);
    });
  }

  async function stats(i, j) { // numbers need pixel access: allowed over http, refused to file:// pages
    try {
      const [p, q] = await Promise.all([pixels(i), pixels(j)]);
      if (p.width !== q.width || p.height !== q.height) { $("diff-stats").textContent = "The images differ in size."; return; }
      let max = 0, sum = 0, changed = 0;
      for (let n = 0; n < p.data.length; n += 4) {
        let px = 0;
        for (let ch = 0; ch < 3; ch++) { const d = Math.abs(p.data[n + ch] - q.data[n + ch]); sum += d; if (d > px) px = d; }
        if (px > max) max = px;
        if (px) changed++;
      }
      const total = p.width * p.height;
      $("diff-stats").textContent = "max pixel diff " + max + ", mean " + (sum / (3 * total)).toFixed(2) + ", " +
        (100 * changed / total).toFixed(1) + "% of pixels changed";
      $("diff-stats").dataset.max = max;
    } catch (e) {
      $("diff-stats").textContent = "(Pixel statistics need the page served over http, e.g. t2i-serve's /runs; " +
        "the picture above is exact either way.)";
    }
  }

  function setPos(p) {
    S.pos = Math.max(0, Math.min(100, p));
    $("slider-pos").value = S.pos;
    $("slider-stage").style.setProperty("--pos", S.pos + "%");
  }
  $("slider-pos").addEventListener("input", (e) => setPos(+e.target.value));
  let dragging = false;
  const stageEl = $("slider-stage");
  const dragTo = (e) => { const r = stageEl.getBoundingClientRect(); setPos(((e.clientX - r.left) / r.width) * 100); };
  stageEl.addEventListener("pointerdown", (e) => { dragging = true; stageEl.setPointerCapture(e.pointerId); dragTo(e); });
  stageEl.addEventListener("pointermove", (e) => { if (dragging) dragTo(e); });
  stageEl.addEventListener("pointerup", () => { dragging = false; });

  // ---- 10. live: follow a running run (status polled as a script: works from file:// too) ------------------

  function ago(t) {
    const s = Math.max(0, Math.round(Date.now() / 1000 - t));
    return s < 90 ? s + " s ago" : Math.round(s / 60) + " min ago";
  }

  function showProgress(p) {
    p = p || {};
    const bar = $("progress"), text = $("progress-text");
    const jobs = p.jobs;
    let done = p.done || 0, total = p.planned || 0;
    const parts = [];
    if (jobs) { // a multirun sweep: jobs, plus the running jobs' own images
      const ri = p.running_images || {};
      total = jobs.total || 0;
      done = jobs.finished + (ri.planned ? (ri.done || 0) / ri.planned : 0) * (jobs.running || []).length;
      parts.push("jobs " + jobs.finished + (jobs.total ? " / " + jobs.total : "") + " finished" +
        (jobs.running && jobs.running.length ? ", " + jobs.running.length + " running" : "") +
        (jobs.failed ? ", " + jobs.failed + " failed" : ""));
      parts.push((p.images || 0) + " images");
    } else {
      parts.push(total ? done + " / " + total + " images" : (p.images || 0) + " images");
      if (p.images && p.images !== done && total) parts.push(p.images + " in this folder");
    }
    bar.max = Math.max(1, total || 1);
    bar.value = total ? Math.min(done, total) : (p.state === "running" ? 0 : 1);
    if (!total && p.state === "running") bar.removeAttribute("value");
    const state = p.state || "done";
    const stale = state === "running" && p.updated && Date.now() / 1000 - p.updated > STALE_S;
    text.textContent = state + ": " + parts.join(" · ") +
      (state === "running" && p.updated ? " · updated " + ago(p.updated) : "") +
      (stale ? " (no news: has the run stopped?)" : "") +
      (state === "interrupted" ? " (re-run the same command to finish)" : "");
    text.className = stale ? "stale" : state === "failed" ? "failed" : "";
    const failed = p.failed_jobs || [];
    $("failed-jobs").hidden = !failed.length;
    $("failed-summary").textContent = failed.length + " failed job" + (failed.length > 1 ? "s" : "");
    $("failed-list").replaceChildren(...failed.map((f) => {
      const li = document.createElement("li");
      li.textContent = "job " + f.job + " (" + (f.overrides || []).join(" ") + "): " + f.error;
      return li;
    }));
  }

  function inject(name, onload) {
    const s = document.createElement("script");
    s.src = name + "?t=" + Date.now();
    s.onload = () => { s.remove(); onload(); };
    s.onerror = () => { s.remove(); onload(); };
    document.head.appendChild(s);
  }

  function poll() {
    inject("viewer-status.js", () => {
      const st = window.T2I_VIEWER_STATUS;
      if (st && st.rev !== D.rev) {
        inject("viewer-data.js", () => {
          const nd = window.T2I_VIEWER_DATA;
          if (nd && nd.rev !== D.rev) refresh(nd);
          later();
        });
        return;
      }
      if (st) { D.progress = st.progress; showProgress(st.progress); }
      later();
    });
  }
  function later() { setTimeout(poll, D.progress && D.progress.state === "running" ? POLL_RUNNING : POLL_IDLE); }

  function refresh(nd) { // new data from a live run: keep the view (axes, filters, scroll, selection)
    const sl = scroller.scrollLeft, st = scroller.scrollTop;
    const wasDetail = S.detail === null ? null : images[S.detail].f;
    load(nd);
    settle();
    showProgress(D.progress);
    render();
    scroller.scrollLeft = sl; scroller.scrollTop = st;
    paint();
    if (wasDetail !== null && byFile.has(wasDetail)) { S.detail = byFile.get(wasDetail); drawDetail(); }
    document.dispatchEvent(new CustomEvent("t2i-refresh", {detail: {images: images.length}}));
  }

  // ---- 11. start -----------------------------------------------------------------------------------------

  const data = window.T2I_VIEWER_DATA;
  if (!data) {
    $("empty").hidden = false;
    $("empty").textContent = "viewer-data.js is missing or unreadable beside this page; re-run the command " +
      "(or t2i-merge) that wrote this folder to rebuild it.";
    $("progress-text").textContent = "no data";
    return;
  }
  load(data);
  document.title = "t2i: " + D.title;
  $("title").textContent = D.title;
  $("title").title = D.dir;
  readHash();
  settle();
  showProgress(D.progress);
  render();
  scroller.focus({preventScroll: true});
  setInterval(() => showProgress(D.progress), 5000);
  later();
  window.t2iViewer = { // for tests and benchmarks: the state and the layout
    state: S, layout: () => G, images: () => images, axes: () => axes, record, overrides, fromImageCommand,
    overridesCommand, baselineOf, ready: performance.now(),
    render, openFile: (f) => openDetail(byFile.get(f)), // for viewer_assets/metrics.js
  };
  document.dispatchEvent(new CustomEvent("t2i-ready"));
})();
