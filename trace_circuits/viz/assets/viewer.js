/* trace-circuits circuit viewer, the page part (needs viewer-graph.js): reads the page's <script id="tc-data">
   (circuit.json + a "view" block), draws the layered graph with d3 (vendored, inlined), wires the controls. Offline. */
(function () {
  "use strict";
  var DATA = JSON.parse(document.getElementById("tc-data").textContent);
  var KIND = {
    source: { color: "#8250df", fill: "#f3e8ff", shape: "triangle", name: "source feature (onset layer)" },
    feature: { color: "#0969da", fill: "#ddf4ff", shape: "circle", name: "SAE feature" },
    head: { color: "#bc4c00", fill: "#fff1e5", shape: "square", name: "attention head" },
    mlp: { color: "#1a7f37", fill: "#dafbe1", shape: "diamond", name: "MLP output" },
    readout: { color: "#7d4e00", fill: "#fff8c5", shape: "star", name: "harmfulness readout" }
  };
  var SCORE_NAMES = {
    readout_effect: "FIS to the readout (drop in the harmfulness readout when zeroed)",
    attribution: "attribution (attribution-patching estimate of the same)",
    max_fis_from_sources: "max FIS from a source feature",
    mean_activation_harmful: "mean activation on harmful prompts",
    effect_size: "effect size d (harmful vs benign)",
    mean_harmful: "mean activation, harmful", mean_benign: "mean activation, benign",
    q_value: "q value (Benjamini-Hochberg)"
  };
  var G = tcGraph(DATA), V = G.V, N = G.N, L = G.L, byId = G.byId, THR = G.THR, ROW = G.ROW, ICON = G.ICON;
  var reach = G.reach, countPaths = G.countPaths, showTok = G.showTok, tokenText = G.tokenText, shortLabel = G.shortLabel;
  var extraLabel = G.extraLabel, linkPath = G.linkPath, fmt = G.fmt;

  var state = { cum: 1, thr: 0, cut: false, selected: null, pinned: [], query: "", userZoom: false };
  var current = { nodes: [], links: [], pos: {} };

  var svg = d3.select("#tc-svg"), root = svg.append("g").attr("class", "root");
  var widths = (function measure() {
    var g = root.append("g").attr("class", "node"), w = {};
    var t = g.append("text").attr("class", "lbl");
    N.forEach(function (n) { t.text(shortLabel(n)); w[n.id] = Math.ceil(t.node().getComputedTextLength()) + ICON + 22; });
    g.remove();
    return w;
  })();

  // One column per layer (readout last); inside it heads, then the MLP, then residual features (forward order),
  // each group ordered by weighted barycenter sweeps; a column taller than max_rows wraps into sub-columns.
  // ---- drawing ----
  function shape(g, kind, cx, cy) {
    var k = KIND[kind] || KIND.feature, r = 6;
    var el;
    if (k.shape === "circle") el = g.append("circle").attr("cx", cx).attr("cy", cy).attr("r", r);
    else if (k.shape === "square") el = g.append("rect").attr("x", cx - r).attr("y", cy - r).attr("width", 2 * r).attr("height", 2 * r);
    else if (k.shape === "diamond") el = g.append("path").attr("d", "M" + cx + "," + (cy - r - 1) + "L" + (cx + r + 1) + "," + cy + "L" + cx + "," + (cy + r + 1) + "L" + (cx - r - 1) + "," + cy + "Z");
    else if (k.shape === "triangle") el = g.append("path").attr("d", "M" + (cx - r) + "," + (cy - r) + "L" + (cx + r + 1) + "," + cy + "L" + (cx - r) + "," + (cy + r) + "Z");
    else {
      var p = [];
      for (var i = 0; i < 10; i++) { var a = Math.PI / 5 * i - Math.PI / 2, rr = i % 2 ? r * 0.45 : r + 1.5; p.push((cx + rr * Math.cos(a)).toFixed(2) + "," + (cy + rr * Math.sin(a)).toFixed(2)); }
      el = g.append("path").attr("d", "M" + p.join("L") + "Z");
    }
    el.attr("fill", k.color).attr("class", "icon");
  }
  function draw() {
    var vis = G.visible(state);
    var lay = G.layout(vis.nodes, vis.links, widths), pos = lay.pos;
    current = { nodes: vis.nodes, links: vis.links, pos: pos };
    var visIds = new Set(vis.nodes.map(function (n) { return n.id; }));
    var drawn = state.cut ? vis.links.filter(function (l) { return !l.severed; }) : vis.links;
    var alive = reach(vis.nodes.filter(function (n) { return n.kind === "source" && !n.severed; }).map(function (n) { return n.id; }), drawn, true);
    root.selectAll("*").remove();
    var ys = vis.nodes.map(function (n) { return pos[n.id].y; }), top = Math.min.apply(null, ys) - 34, bottom = Math.max.apply(null, ys) + 20;
    var gb = root.append("g").attr("class", "bands");
    lay.bands.forEach(function (b, i) {
      if (i % 2 === 0) gb.append("rect").attr("class", "band").attr("x", b.x0 - 8).attr("y", top).attr("width", b.x1 - b.x0 + 16).attr("height", bottom - top);
      gb.append("text").attr("class", "layer-h").attr("x", (b.x0 + b.x1) / 2).attr("y", top + 14).text(b.name);
    });
    var gl = root.append("g").attr("class", "links"), gh = root.append("g").attr("class", "hits");
    drawn.forEach(function (l) {
      var cls = "link " + (l.severed ? "severed" : l.w < 0 ? "neg" : "pos") + (state.cut && !alive.has(l.source) ? " dead" : "");
      gl.append("path").attr("class", cls).attr("data-i", l.i).attr("d", linkPath(l, pos))
        .attr("stroke-width", (0.8 + 5 * l.share).toFixed(2)).attr("opacity", (0.35 + 0.5 * l.share).toFixed(2));
      gh.append("path").attr("class", "hit").attr("data-i", l.i).attr("d", linkPath(l, pos))
        .on("mousemove", function (ev) { tip(ev, linkTip(l)); hoverLink(l.i, true); })
        .on("mouseleave", function () { untip(); hoverLink(l.i, false); });
    });
    var gn = root.append("g").attr("class", "nodes");
    vis.nodes.forEach(function (n) {
      var p = pos[n.id], k = KIND[n.kind] || KIND.feature;
      var cls = "node kind-" + n.kind + (n.severed ? " severed" : "");
      if (state.cut && n.severed) cls += " ghost";
      else if (state.cut && !alive.has(n.id)) cls += " dead";
      var g = gn.append("g").attr("class", cls).attr("data-id", n.id).attr("transform", "translate(" + p.x + "," + (p.y - ROW / 2) + ")");
      g.append("rect").attr("class", "box").attr("width", p.w).attr("height", ROW).attr("rx", 5).attr("fill", k.fill).attr("stroke", k.color);
      shape(g, n.kind, 11, ROW / 2);
      g.append("text").attr("class", "lbl").attr("x", ICON + 2).attr("y", ROW / 2).text(shortLabel(n));
      g.append("rect").attr("class", "bar").attr("x", 3).attr("y", ROW - 3).attr("height", 2).attr("width", Math.max(0, Math.min(1, n.infl)) * (p.w - 6));
      if (n.severed) g.append("text").attr("class", "sc").attr("x", p.w - 15).attr("y", ROW / 2).text("\u2702");
      g.on("click", function (ev) { ev.stopPropagation(); if (ev.shiftKey) togglePin(n.id); else select(n.id); })
        .on("mousemove", function (ev) { tip(ev, nodeTip(n)); })
        .on("mouseenter", function () { n.ins.concat(n.outs).forEach(function (l) { hoverLink(l.i, true); }); })
        .on("mouseleave", function () { untip(); n.ins.concat(n.outs).forEach(function (l) { hoverLink(l.i, false); }); });
    });
    decorate();
    var sev = vis.links.filter(function (l) { return l.severed; }).length;
    var msg = vis.nodes.length + " of " + N.length + " nodes, " + vis.links.length + " of " + L.length + " links; " +
      vis.nodes.filter(function (n) { return n.severed; }).length + " nodes suppressed, " + sev + " links severed";
    var banner = document.getElementById("tc-banner");
    banner.hidden = !state.cut;
    if (state.cut) {
      var before = countPaths(vis.nodes, vis.links), after = countPaths(vis.nodes, drawn);
      msg += " \u2014 cut applied: source\u2192readout paths " + before + " \u2192 " + after;
      banner.textContent = "Cut applied: " + sev + " severed links removed; source\u2192readout paths " + before + " \u2192 " + after +
        (after === 0 ? " (no traced path reaches the readout)" : "") + ". Faded: what no unsuppressed source reaches.";
    }
    d3.select("#tc-status").text("\u00b7 " + msg);
    if (!state.userZoom) fit();
    if (state.selected) select(state.selected);
  }
  function decorate() {  // classes for selection, pins, search matches, neighbourhood highlight
    var sel = state.selected, nb = new Set();
    if (sel) { nb.add(sel); byId[sel].ins.forEach(function (l) { nb.add(l.source); }); byId[sel].outs.forEach(function (l) { nb.add(l.target); }); }
    var q = state.query.trim().toLowerCase();
    root.selectAll("g.node").each(function () {
      var g = d3.select(this), id = g.attr("data-id");
      g.classed("selected", id === sel).classed("pinned", state.pinned.indexOf(id) >= 0 && id !== sel)
        .classed("match", !!q && matches(byId[id], q) && id !== sel)
        .classed("dim", !!sel && !nb.has(id) && state.pinned.indexOf(id) < 0);
    });
    root.selectAll("path.link").each(function () {
      var p = d3.select(this), l = L[+p.attr("data-i")];
      var on = sel && (l.source === sel || l.target === sel);
      p.classed("dim", !!sel && !on).classed("hl", !!on);
    });
  }
  function hoverLink(i, on) { root.selectAll("path.link[data-i='" + i + "']").classed("hl", on || !!(state.selected && (L[i].source === state.selected || L[i].target === state.selected))); }

  // ---- zoom, tooltip ----
  var zoom = d3.zoom().scaleExtent([0.1, 4]).on("zoom", function (ev) {
    root.attr("transform", ev.transform);
    if (ev.sourceEvent) state.userZoom = true;
  });
  svg.call(zoom).on("dblclick.zoom", null);
  svg.on("click", function () { select(null); if (!state.pinned.length) openPanel(false); });
  function fit() {
    var box = root.node().getBBox(), el = svg.node(), H = el.clientHeight;
    var W = el.clientWidth - (panel.classList.contains("closed") ? 0 : panel.offsetWidth);  // what the panel leaves
    if (!box.width || !W || !H) return;
    var k = Math.max(0.6, Math.min(1.5, (W - 30) / box.width, (H - 60) / box.height));
    var tx = box.width * k < W ? (W - box.width * k) / 2 - box.x * k : 15 - box.x * k;
    var ty = box.height * k < H - 40 ? (H - 40 - box.height * k) / 2 - box.y * k : 10 - box.y * k;
    svg.call(zoom.transform, d3.zoomIdentity.translate(tx, ty).scale(k));
  }
  var tipEl = document.getElementById("tc-tip");
  function tip(ev, content) {
    tipEl.replaceChildren(content); tipEl.hidden = false;
    var r = document.getElementById("tc-graph").getBoundingClientRect(), x = ev.clientX - r.left + 14, y = ev.clientY - r.top + 14;
    if (x + tipEl.offsetWidth > r.width) x = ev.clientX - r.left - tipEl.offsetWidth - 10;
    if (y + tipEl.offsetHeight > r.height) y = ev.clientY - r.top - tipEl.offsetHeight - 10;
    tipEl.style.left = x + "px"; tipEl.style.top = y + "px";
  }
  function untip() { tipEl.hidden = true; }
  function el(tag, attrs, kids) {
    var e = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) { if (k === "text") e.textContent = attrs[k]; else e.setAttribute(k, attrs[k]); });
    (kids || []).forEach(function (c) { if (c != null) e.append(c); });
    return e;
  }
  function linkTip(l) {
    return el("div", {}, [el("b", { text: l.source + " \u2192 " + l.target }), el("br"),
      "weight " + (l.w >= 0 ? "+" : "") + fmt(l.w) + " (" + (l.kind === "fis" ? "FIS from a source" : "chain link") + ")", el("br"),
      (l.share * 100).toFixed(1) + "% of " + l.target + "'s incoming |w|; link influence " + fmt(l.infl, 3),
      l.severed ? el("div", { style: "color:#cf222e", text: "\u2702 severed by the hook set" }) : null]);
  }
  function nodeTip(n) {
    var eff = (n.scores || {}).readout_effect;
    return el("div", {}, [el("b", { text: n.id }), " " + (KIND[n.kind] || {}).name, extraLabel(n) ? el("div", { text: n.label }) : null,
      el("div", { text: "FIS to readout " + fmt(eff) + " \u00b7 influence " + fmt(n.infl, 3) }),
      n.top_tokens && n.top_tokens.length ? el("div", { text: "top tokens: " + n.top_tokens.slice(0, 5).map(function (t) { return JSON.stringify(t[0]); }).join(", ") }) : null,
      n.severed ? el("div", { style: "color:#cf222e", text: "\u2702 suppressed by the hook set" }) : null]);
  }

  // ---- side panel ----
  function matches(n, q) {
    if (n.id.toLowerCase().indexOf(q) >= 0 || String(n.label || "").toLowerCase().indexOf(q) >= 0) return true;
    return (n.top_tokens || []).some(function (t) { return String(t[0]).toLowerCase().indexOf(q) >= 0; });
  }
  function nodeLink(id) {
    var a = el("a", { class: "tc-node-link", "data-goto": id, text: id });
    a.addEventListener("click", function (ev) { ev.preventDefault(); select(id, true); });
    return a;
  }
  function linksTable(list, end, id) {
    if (!list.length) return el("div", { class: "tc-muted", id: id, text: "none" });
    var vis = new Set(current.links.map(function (l) { return l.i; }));
    var rows = list.slice().sort(function (a, b) { return b.aw - a.aw; }).map(function (l) {
      return el("tr", { class: vis.has(l.i) ? "" : "hidden", title: vis.has(l.i) ? "" : "hidden by the current pruning" }, [
        el("td", {}, [nodeLink(l[end])]), el("td", { class: "v", text: (l.w >= 0 ? "+" : "") + fmt(l.w) }),
        el("td", { class: "v", text: (l.share * 100).toFixed(0) + "%" }), el("td", { text: l.severed ? "\u2702" : "" })]);
    });
    return el("table", { class: "tc-links", id: id }, [el("tr", {}, [el("th", { text: end === "source" ? "from" : "to" }),
      el("th", { text: "weight" }), el("th", { text: "share" }), el("th")])].concat(rows));
  }
  function example(ex, maxAct) {
    var toks = (ex.tokens || []).map(function (t, i) {
      var a = (ex.acts || [])[i] || 0, f = maxAct > 0 ? Math.max(0, a) / maxAct : 0;
      return el("span", { class: "tok", title: JSON.stringify(t) + ": " + fmt(a, 3), "data-act": a,
        style: "background: rgba(255, 115, 0, " + (0.85 * f).toFixed(3) + ")", text: t });
    });
    var peak = Math.max.apply(null, (ex.acts || [0]).concat([0]));
    return el("div", { class: "tc-ex" }, [el("span", { class: "max", text: "max " + fmt(peak, 3) + " \u00b7 " + ex.prompt })].concat(toks));
  }
  var panel = document.getElementById("tc-panel");
  function openPanel(open) {
    var was = !panel.classList.contains("closed");
    panel.classList.toggle("closed", !open);
    if (was !== open && !state.userZoom) fit();
  }
  function select(id, center) {
    state.selected = id;
    var d = document.getElementById("tc-detail");
    if (!id) { d.replaceChildren(help()); decorate(); return; }
    openPanel(true);
    var n = byId[id], k = KIND[n.kind] || KIND.feature, s = n.scores || {};
    var rows = Object.keys(s).map(function (key) {
      return el("tr", {}, [el("td", { text: SCORE_NAMES[key] || key }), el("td", { class: "v", text: fmt(s[key]) })]);
    });
    rows.push(el("tr", {}, [el("td", { text: "influence on the readout (normalised paths)" }), el("td", { class: "v", text: fmt(n.infl, 4) })]));
    var exs = n.examples || [], maxAct = 0;
    exs.forEach(function (e) { (e.acts || []).forEach(function (a) { maxAct = Math.max(maxAct, a); }); });
    var pinBtn = el("button", { type: "button", id: "tc-pin-btn", text: state.pinned.indexOf(id) >= 0 ? "unpin" : "pin to compare" });
    pinBtn.addEventListener("click", function () { togglePin(id); });
    d.replaceChildren(el("div", { id: "tc-node", "data-id": n.id }, [
      el("h2", {}, [el("span", { style: "color:" + k.color, text: n.id }), n.severed ? el("span", { class: "tc-badge cut", text: "\u2702 suppressed" }) : null,
        el("span", { class: "tc-hidden-note tc-muted" })]),
      el("div", { class: "tc-muted", text: k.name + " \u00b7 layer " + n.layer + (n.kind === "readout" ? "" : " \u00b7 index " + n.index) + " \u00b7 depth " + n.depth }),
      extraLabel(n) ? el("div", { text: n.label }) : null,
      el("div", { class: "tc-panel-buttons", style: "margin-top:6px" }, [pinBtn]),
      el("h3", { text: "Scores" }), el("table", { class: "tc-kv", id: "tc-scores" }, rows),
      n.top_tokens && n.top_tokens.length ? el("h3", { text: "Top tokens" }) : null,
      n.top_tokens && n.top_tokens.length ? el("div", {}, n.top_tokens.slice(0, 20).map(function (t) {
        return el("span", { class: "tc-chip", title: JSON.stringify(t[0]) + ": activation " + fmt(t[1], 3), text: showTok(t[0]) + " " + fmt(t[1], 2) }); })) : null,
      el("h3", { text: "Top-activating prompts" + (exs.length ? " (" + exs.length + ")" : "") }),
      exs.length ? el("div", { id: "tc-examples" }, exs.map(function (e) { return example(e, maxAct); }))
        : el("div", { class: "tc-muted", text: n.kind === "readout" ? "The readout is the harmfulness score the FIS is measured on." :
          "No top-activating prompts stored for this node (heads and MLPs have none; older circuit.json files predate them)." }),
      el("h3", { text: "Incoming links (" + n.ins.length + ")" }), linksTable(n.ins, "source", "tc-in"),
      el("h3", { text: "Outgoing links (" + n.outs.length + ")" }), linksTable(n.outs, "target", "tc-out")]));
    if (!current.pos[id]) d.querySelector(".tc-hidden-note").textContent = " (hidden by the current pruning)";
    decorate();
    if (current.pos[id]) reveal(current.pos[id], center);
  }
  function reveal(p, center) {  // pan so the node is in view and not under the panel
    var t = d3.zoomTransform(svg.node()), W = svg.node().clientWidth - panel.offsetWidth, H = svg.node().clientHeight;
    var sx = t.applyX(p.x), sx2 = t.applyX(p.x + p.w), sy = t.applyY(p.y);
    if (!center && sx >= 10 && sx2 <= W - 10 && sy >= 20 && sy <= H - 20) return;
    svg.call(zoom.translateTo, p.x + p.w / 2, p.y, [Math.max(60, W / 2), H / 2]);
    state.userZoom = true;
  }
  function help() {
    var m = DATA.meta || {}, facts = [["model", m.model], ["onset layer", m.onset_layer], ["readout", m.readout_definition],
      ["FIS", m.fis_definition], ["prompts for FIS", m.n_prompts], ["pruning", m.pruning ? JSON.stringify(m.pruning) : null]];
    return el("div", {}, [el("h2", { text: "Circuit" }),
      el("table", { class: "tc-kv" }, facts.filter(function (f) { return f[1] != null && f[1] !== ""; }).map(function (f) {
        return el("tr", {}, [el("td", { text: f[0] }), el("td", { text: String(f[1]) })]); })),
      el("ul", { class: "tc-help" }, ["Click a node for its scores, top-activating prompts and links; shift-click (or \u201cpin\u201d) to compare nodes.",
        "Hover a link for its weight. Link width: its share of the target's incoming |w|.",
        "Sliders prune as Circuit.prune does; \u201capply the cut\u201d removes the severed links.",
        "Scroll to zoom, drag to pan; \u201cfit\u201d resets the view."].map(function (t) { return el("li", { text: t }); }))]);
  }
  function togglePin(id) {
    var i = state.pinned.indexOf(id);
    if (i >= 0) state.pinned.splice(i, 1); else state.pinned.push(id);
    var b = document.getElementById("tc-pin-btn");
    if (b && state.selected === id) b.textContent = i >= 0 ? "pin to compare" : "unpin";
    renderPins(); decorate();
    if (state.pinned.length) openPanel(true);
  }
  function renderPins() {
    var box = document.getElementById("tc-pins");
    if (!state.pinned.length) { box.replaceChildren(); return; }
    var ns = state.pinned.map(function (id) { return byId[id]; }), keys = [];
    ns.forEach(function (n) { Object.keys(n.scores || {}).forEach(function (k) { if (keys.indexOf(k) < 0) keys.push(k); }); });
    var head = el("tr", {}, [el("th", { text: "pinned" })].concat(ns.map(function (n) {
      var x = el("a", { class: "tc-node-link", title: "unpin", text: " \u2715" });
      x.addEventListener("click", function () { togglePin(n.id); });
      return el("th", {}, [nodeLink(n.id), x]); })));
    function row(name, f) { return el("tr", {}, [el("td", { text: name })].concat(ns.map(function (n) { return el("td", { text: f(n) }); }))); }
    var rows = [row("kind", function (n) { return n.kind; }), row("suppressed", function (n) { return n.severed ? "\u2702 yes" : "no"; }),
      row("influence", function (n) { return fmt(n.infl, 3); })].concat(keys.map(function (k) {
      return row(k, function (n) { return fmt((n.scores || {})[k]); }); }));
    rows.push(row("top tokens", function (n) { return (n.top_tokens || []).slice(0, 3).map(function (t) { return tokenText(t[0]); }).join(", "); }));
    box.replaceChildren(el("h3", { text: "Compare pinned nodes" }), el("table", { id: "tc-compare" }, [head].concat(rows)));
  }

  // ---- export ----
  function svgString() {
    var clone = svg.node().cloneNode(true), box = root.node().getBBox(), pad = 16;
    clone.querySelector("g.root").removeAttribute("transform");
    clone.querySelectorAll(".hit").forEach(function (x) { x.remove(); });
    clone.setAttribute("viewBox", [box.x - pad, box.y - pad, box.width + 2 * pad, box.height + 2 * pad].join(" "));
    clone.setAttribute("width", Math.ceil(box.width + 2 * pad)); clone.setAttribute("height", Math.ceil(box.height + 2 * pad));
    clone.removeAttribute("style"); clone.removeAttribute("id");
    var st = document.createElementNS("http://www.w3.org/2000/svg", "style");
    st.textContent = document.getElementById("tc-svg-style").textContent;
    var bg = document.createElementNS("http://www.w3.org/2000/svg", "rect");
    ["x", "y", "width", "height"].forEach(function (a, i) { bg.setAttribute(a, [box.x - pad, box.y - pad, box.width + 2 * pad, box.height + 2 * pad][i]); });
    bg.setAttribute("fill", "#fff");
    clone.insertBefore(bg, clone.firstChild); clone.insertBefore(st, clone.firstChild);
    return new XMLSerializer().serializeToString(clone);
  }
  function download(name, url) {
    var a = el("a", { download: name, href: url }); document.body.append(a); a.click(); a.remove();
  }
  var fileBase = "circuit" + (DATA.meta && DATA.meta.model ? "-" + String(DATA.meta.model).replace(/[^A-Za-z0-9._-]+/g, "_") : "");
  function exportSvg() { download(fileBase + ".svg", "data:image/svg+xml;charset=utf-8," + encodeURIComponent(svgString())); }
  function exportPng() {
    var s = svgString(), img = new Image();
    img.onload = function () {
      var c = document.createElement("canvas"); c.width = img.width * 2; c.height = img.height * 2;
      var ctx = c.getContext("2d"); ctx.scale(2, 2); ctx.drawImage(img, 0, 0);
      download(fileBase + ".png", c.toDataURL("image/png"));
    };
    img.src = "data:image/svg+xml;charset=utf-8," + encodeURIComponent(s);
  }

  // ---- legend and controls ----
  (function legend() {
    var lg = d3.select("#tc-legend");
    Object.keys(KIND).forEach(function (k) {
      if (!N.some(function (n) { return n.kind === k; })) return;
      var s = lg.append("span"), g = s.append("svg").attr("width", 16).attr("height", 16).append("g");
      shape(g, k, 8, 8); s.append("span").text(" " + KIND[k].name);
    });
    [["pos", "excitatory link (w > 0)"], ["neg", "inhibitory link (w < 0)"], ["severed", "severed link"]].forEach(function (x) {
      var s = lg.append("span"); s.append("svg").attr("width", 24).attr("height", 10).append("path").attr("class", "link " + x[0])
        .attr("d", "M1,5L23,5").attr("stroke-width", 2).attr("stroke", x[0] === "pos" ? "#6e7781" : x[0] === "neg" ? "#0969da" : "#cf222e")
        .attr("stroke-dasharray", x[0] === "severed" ? "5 3" : null);
      s.append("span").text(" " + x[1]);
    });
    lg.append("span").text("\u2702 suppressed node \u00b7 grey bar: influence");
  })();
  var cum = document.getElementById("tc-cum"), thr = document.getElementById("tc-thr");
  thr.max = THR.length - 1;
  function showVals() {
    document.getElementById("tc-cum-val").textContent = state.cum >= 1 ? "1.00 (off)" : state.cum.toFixed(2);
    document.getElementById("tc-thr-val").textContent = fmt(THR[state.thr], 4);
  }
  cum.addEventListener("input", function () { state.cum = +cum.value; showVals(); draw(); });
  thr.addEventListener("input", function () { state.thr = +thr.value; showVals(); draw(); });
  document.getElementById("tc-cut").addEventListener("change", function (ev) { state.cut = ev.target.checked; draw(); });
  document.getElementById("tc-fit").addEventListener("click", function () { state.userZoom = false; fit(); });
  document.getElementById("tc-about").addEventListener("click", function () { select(null); openPanel(true); });
  document.getElementById("tc-close").addEventListener("click", function () { select(null); openPanel(false); });
  document.addEventListener("keydown", function (ev) { if (ev.key === "Escape") { select(null); openPanel(false); } });
  document.getElementById("tc-svg-btn").addEventListener("click", exportSvg);
  document.getElementById("tc-png-btn").addEventListener("click", exportPng);
  var search = document.getElementById("tc-search"), dl = document.getElementById("tc-ids");
  N.forEach(function (n) { dl.append(el("option", { value: n.id })); });
  function searchHits() {
    var q = state.query.trim().toLowerCase();
    return q ? N.filter(function (n) { return matches(n, q); }) : [];
  }
  search.addEventListener("input", function () {
    state.query = search.value; decorate();
    var hits = searchHits(), shown = hits.filter(function (n) { return current.pos[n.id]; }).length;
    document.getElementById("tc-search-n").textContent = state.query.trim() ? hits.length + " found" + (shown < hits.length ? ", " + (hits.length - shown) + " hidden by pruning" : "") : "";
  });
  search.addEventListener("keydown", function (ev) {
    if (ev.key !== "Enter") return;
    var q = search.value.trim().toLowerCase(), hits = searchHits();
    var exact = N.filter(function (n) { return n.id.toLowerCase() === q; });
    var hit = exact[0] || hits.filter(function (n) { return current.pos[n.id]; })[0] || hits[0];
    if (hit) select(hit.id, true);
  });
  window.addEventListener("resize", function () { if (!state.userZoom) fit(); });
  showVals();
  draw();
  select(null);
  // a small read-only handle for tests and notebooks
  window.tcViewer = {
    state: state, svgString: svgString, select: select,
    shown: function () { return { nodes: current.nodes.map(function (n) { return n.id; }), links: current.links.map(function (l) { return l.source + "->" + l.target; }) }; },
    thresholds: THR
  };
})();
