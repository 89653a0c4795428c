/* trace-circuits circuit viewer, the graph part (no DOM): the data, pruning exactly as Circuit.prune,
   labels and the layered layout. viewer.js draws what this computes. */
function tcGraph(DATA) {
  "use strict";
  var V = DATA.view;
  var ROW = 22, PITCH = 29, COL_GAP = 58, GROUP_GAP = 8, SUB_GAP = 14, ICON = 20;

  var N = DATA.nodes.map(function (n, i) {
    return Object.assign({}, n, { i: i, infl: V.influence[n.id] || 0, ins: [], outs: [] });
  });
  var byId = {};
  N.forEach(function (n) { byId[n.id] = n; });
  var L = DATA.links.map(function (l, i) {
    var w = l.weight == null ? 0 : l.weight;
    var o = Object.assign({}, l, { i: i, w: w, aw: Math.abs(w), infl: V.link_influence[i] || 0,
      share: V.link_share[i] || 0 });
    byId[l.source].outs.push(o); byId[l.target].ins.push(o);
    return o;
  });
  var THR = Array.from(new Set(L.map(function (l) { return l.aw; }))).sort(function (a, b) { return a - b; });
  if (!THR.length) THR = [0];

  // ---- pruning: the same rules as Circuit.prune (cumulative, then threshold, then source -> readout paths) ----
  function topCumulative(items, scores, fraction) {
    var order = items.map(function (_, i) { return i; }).sort(function (a, b) { return scores[b] - scores[a]; });
    var total = order.reduce(function (s, i) { return s + Math.max(0, scores[i]); }, 0);
    if (total <= 0) return [];
    var out = [], acc = 0;
    for (var k = 0; k < order.length; k++) {
      var i = order[k];
      if (acc >= fraction * total - 1e-12 || scores[i] <= 0) break;
      out.push(items[i]); acc += scores[i];
    }
    return out;
  }
  function reach(starts, links, forward) {
    var adj = {};
    links.forEach(function (l) {
      var a = forward ? l.source : l.target, b = forward ? l.target : l.source;
      (adj[a] = adj[a] || []).push(b);
    });
    var seen = new Set(starts), stack = starts.slice();
    while (stack.length) {
      (adj[stack.pop()] || []).forEach(function (x) { if (!seen.has(x)) { seen.add(x); stack.push(x); } });
    }
    return seen;
  }
  function ofKind(k) { return N.filter(function (n) { return n.kind === k; }).map(function (n) { return n.id; }); }
  function visible(state) {  // what the sliders keep: {nodes, links}
    var links = L;
    if (state.cum < 1) {
      var inner = N.filter(function (n) { return n.kind !== "source" && n.kind !== "readout"; })
        .sort(function (a, b) { return b.infl - a.infl; });
      var keep = new Set(ofKind("source").concat(ofKind("readout")));
      topCumulative(inner, inner.map(function (n) { return n.infl; }), state.cum)
        .forEach(function (n) { keep.add(n.id); });
      var cand = L.filter(function (l) { return keep.has(l.source) && keep.has(l.target); });
      links = topCumulative(cand, cand.map(function (l) { return l.infl; }), V.link_cumulative);
      links.sort(function (a, b) { return a.i - b.i; });
    }
    var t = THR[state.thr];
    links = links.filter(function (l) { return l.aw >= t; });
    var fwd = reach(ofKind("source"), links, true), bwd = reach(ofKind("readout"), links, false);
    var on = new Set(Array.from(fwd).filter(function (x) { return bwd.has(x); }));
    return {
      nodes: N.filter(function (n) { return on.has(n.id) || n.kind === "source" || n.kind === "readout"; }),
      links: links.filter(function (l) { return on.has(l.source) && on.has(l.target); })
    };
  }
  function countPaths(nodes, links) {  // source -> readout paths in the DAG (targets are deeper than sources)
    var ways = {};
    nodes.slice().sort(function (a, b) { return b.depth - a.depth; }).forEach(function (n) {
      ways[n.id] = n.kind === "readout" ? 1 : 0;
    });
    var out = {};
    links.forEach(function (l) { (out[l.source] = out[l.source] || []).push(l.target); });
    nodes.slice().sort(function (a, b) { return b.depth - a.depth; }).forEach(function (n) {
      if (n.kind !== "readout") (out[n.id] || []).forEach(function (t) { ways[n.id] += ways[t] || 0; });
    });
    return nodes.reduce(function (s, n) { return s + (n.kind === "source" ? ways[n.id] : 0); }, 0);
  }

  // ---- labels and layout ----
  function showTok(t) { return String(t).replace(/\n/g, "\\n").replace(/\t/g, "\\t").replace(/\r/g, "\\r"); }
  function tokenText(t) {
    var s = showTok(t).trim();
    return s.length > 10 ? s.slice(0, 9) + "\u2026" : s;
  }
  function shortLabel(n) {
    if (n.kind === "readout") return "readout";
    if (n.kind === "head") return "H" + n.index;
    if (n.kind === "mlp") return "MLP";
    var tok = n.top_tokens && n.top_tokens.length ? " \u201c" + tokenText(n.top_tokens[0][0]) + "\u201d" : "";
    return "F" + n.index + tok;
  }
  function extraLabel(n) {  // a label that says more than the id ("L24 head 7" does not; "harmfulness readout" does)
    function norm(s) { return String(s || "").toLowerCase().replace(/head\s*/g, "h").replace(/[\s.]/g, ""); }
    return !!n.label && norm(n.label) !== norm(n.id);
  }
  function layerName(n) { return n.kind === "readout" ? "readout" : "L" + n.layer; }

  var KIND_RANK = { head: 0, mlp: 1, source: 2, feature: 2, readout: 3 };
  function layout(nodes, links, widths) {  // widths: node id -> box width (measured by the page)
    var cols = {}, keys = [];
    nodes.forEach(function (n) { var k = layerName(n); if (!cols[k]) { cols[k] = []; keys.push(k); } cols[k].push(n); });
    var lay = {}; nodes.forEach(function (n) { lay[n.id] = n.kind === "readout" ? Infinity : n.layer; });
    keys.sort(function (a, b) { return lay[cols[a][0].id] - lay[cols[b][0].id]; });
    var y = {};
    function place(k) { cols[k].forEach(function (n, j) { y[n.id] = j - (cols[k].length - 1) / 2; }); }
    keys.forEach(function (k) {
      cols[k].sort(function (a, b) { return KIND_RANK[a.kind] - KIND_RANK[b.kind] || b.infl - a.infl || a.index - b.index; });
      place(k);
    });
    var ins = {}, outs = {};
    links.forEach(function (l) { (ins[l.target] = ins[l.target] || []).push(l); (outs[l.source] = outs[l.source] || []).push(l); });
    function sweep(list, adj, end) {
      list.forEach(function (k) {
        var key = {};
        cols[k].forEach(function (n) {
          var s = 0, ws = 0;
          (adj[n.id] || []).forEach(function (l) { var ww = l.share + 1e-6; s += ww * y[l[end]]; ws += ww; });
          key[n.id] = ws > 0 ? s / ws : y[n.id];
        });
        cols[k].sort(function (a, b) { return KIND_RANK[a.kind] - KIND_RANK[b.kind] || key[a.id] - key[b.id] || b.infl - a.infl; });
        place(k);
      });
    }
    for (var it = 0; it < 4; it++) { sweep(keys.slice(1), ins, "source"); sweep(keys.slice(0, -1).reverse(), outs, "target"); }
    var pos = {}, x = 0, bands = [], maxRows = V.max_rows || 24;
    keys.forEach(function (k, ci) {
      var list = cols[k], nsub = Math.ceil(list.length / maxRows), rows = Math.ceil(list.length / nsub), left = x;
      if (ci > 0) { x += COL_GAP; left = x; }
      for (var s = 0; s < nsub; s++) {
        var part = list.slice(s * rows, (s + 1) * rows), w = 0, ys = [], yy = 0;
        part.forEach(function (n, r) {
          if (r > 0 && KIND_RANK[n.kind] !== KIND_RANK[part[r - 1].kind]) yy += GROUP_GAP;
          ys.push(yy); yy += PITCH; w = Math.max(w, widths[n.id]);
        });
        var mid = (yy - PITCH) / 2;
        part.forEach(function (n, r) { pos[n.id] = { x: x, y: ys[r] - mid, w: widths[n.id], right: 0 }; });
        x += w + (s < nsub - 1 ? SUB_GAP : 0);
      }
      list.forEach(function (n) { pos[n.id].right = x; });
      bands.push({ name: k, x0: left, x1: x });
    });
    return { pos: pos, bands: bands };
  }

  function linkPath(l, pos) {  // left to right; a link inside one layer column arcs out on its right side
    var a = pos[l.source], b = pos[l.target], x0 = a.x + a.w, x1 = b.x, m = (x0 + x1) / 2;
    if (x1 > x0 + 4) return "M" + x0 + "," + a.y + "C" + m + "," + a.y + " " + m + "," + b.y + " " + x1 + "," + b.y;
    var r = Math.max(a.right, b.right) + 10 + Math.min(28, Math.abs(b.y - a.y) / 6), xe = b.x + b.w;
    return "M" + x0 + "," + a.y + "C" + r + "," + a.y + " " + r + "," + b.y + " " + xe + "," + b.y;
  }
  function fmt(v, digits) {
    if (v == null || typeof v !== "number" || !isFinite(v)) return "\u2013";
    var a = Math.abs(v);
    if (a !== 0 && (a < 1e-3 || a >= 1e5)) return v.toExponential(2);
    return v.toFixed(digits == null ? 4 : digits);
  }
  return { V: V, N: N, L: L, byId: byId, THR: THR, ROW: ROW, ICON: ICON, visible: visible, reach: reach,
    countPaths: countPaths, showTok: showTok, tokenText: tokenText, shortLabel: shortLabel, extraLabel: extraLabel,
    layout: layout, linkPath: linkPath, fmt: fmt };
}
