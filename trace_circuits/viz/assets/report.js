/* trace-circuits report: the example-response browser (filters by defense, kind, template, verdict, text) and the
   navigation bar's current-section highlight. Reads <script type="application/json"> blocks; no network access. */
(function () {
  "use strict";
  var ID_KEYS = { defense: 1, kind: 1, template: 1, prompt: 1, response: 1 };
  var PAGE = 20;

  function el(tag, attrs, kids) {
    var e = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) { if (k === "text") e.textContent = attrs[k]; else e.setAttribute(k, attrs[k]); });
    (kids || []).forEach(function (c) { if (c != null) e.append(c); });
    return e;
  }
  function fmt(v) {
    if (v === true) return "yes";
    if (v === false) return "no";
    if (v == null) return "\u2013";
    if (typeof v === "number") return isFinite(v) ? (Math.abs(v) >= 100 || v === Math.round(v) ? String(Math.round(v * 100) / 100) : v.toFixed(3)) : "\u2013";
    return typeof v === "object" ? JSON.stringify(v) : String(v);
  }
  function verdict(r) {
    if (!r) return el("span", { class: "tc-verdict none", text: "no answer stored" });
    if (r.kind === "harmful") {
      var ok = !!r.defended;
      return el("span", { class: "tc-verdict " + (ok ? "good" : "bad"), text: ok ? "defended" : "not defended" });
    }
    var fine = !r.refusal && r.addressed !== false;
    return el("span", { class: "tc-verdict " + (fine ? "good" : "bad"), text: r.refusal ? "refused (over-refusal)" : r.addressed === false ? "not addressed" : "answered" });
  }
  function judges(r) {
    if (!r) return null;
    return el("div", { class: "tc-judges" }, Object.keys(r).filter(function (k) { return !ID_KEYS[k]; }).map(function (k) {
      var v = r[k], cls = v === true ? "t" : v === false ? "f" : "";
      return el("span", { class: "tc-judge " + cls, title: k, text: k.replace(/_/g, " ") + ": " + fmt(v) });
    }));
  }
  function side(title, r) {
    return el("div", { class: "tc-side" }, [el("div", { class: "tc-side-h" }, [el("b", { text: title }), " ", verdict(r)]),
      el("div", { class: "tc-resp", text: r ? r.response : "" }), judges(r)]);
  }

  function browser(root) {
    var D = JSON.parse(document.getElementById(root.getAttribute("data-source")).textContent);
    var others = D.defenses.filter(function (d) { return d !== D.undefended; });
    var groups = {}, order = [];
    D.rows.forEach(function (r) {
      var k = r.kind + "\u0000" + r.template + "\u0000" + r.prompt;
      if (!groups[k]) { groups[k] = { kind: r.kind, template: r.template, prompt: r.prompt, by: {} }; order.push(k); }
      groups[k].by[r.defense] = r;
    });
    var st = { after: D.after || others[0] || D.undefended, kind: "", template: "", verdict: "", q: "", shown: PAGE };
    function select(name, label, opts, value) {
      var s = el("select", { name: name, "aria-label": label }, opts.map(function (o) {
        var op = el("option", { value: o[0], text: o[1] }); if (o[0] === value) op.selected = true; return op; }));
      s.addEventListener("change", function () { st[name] = s.value; st.shown = PAGE; render(); });
      return el("label", {}, [label + " ", s]);
    }
    var kinds = Array.from(new Set(D.rows.map(function (r) { return r.kind; })));
    var q = el("input", { type: "search", name: "q", placeholder: "search prompts and answers", "aria-label": "search" });
    q.addEventListener("input", function () { st.q = q.value.toLowerCase(); st.shown = PAGE; render(); });
    var count = el("span", { class: "tc-count" }), list = el("div", { class: "tc-cards" });
    var more = el("button", { type: "button", class: "tc-more", text: "show more" });
    more.addEventListener("click", function () { st.shown += PAGE; render(); });
    root.replaceChildren(el("div", { class: "tc-filters" }, [
      select("after", "defense", (others.length ? others : [D.undefended]).map(function (d) { return [d, d]; }), st.after),
      select("kind", "prompts", [["", "all"]].concat(kinds.map(function (k) { return [k, k]; })), ""),
      select("template", "template", [["", "all"]].concat(D.templates.map(function (t) { return [t, t]; })), ""),
      select("verdict", "verdict", [["", "all"], ["defended", "harmful: defended"], ["not_defended", "harmful: not defended"],
        ["changed", "changed by the defense"], ["benign_broken", "benign: refused or not addressed"]], ""),
      q, count]), list, more);

    function keep(g) {
      var a = g.by[st.after], b = g.by[D.undefended];
      if (!a && !b) return false;
      if (st.kind && g.kind !== st.kind) return false;
      if (st.template && g.template !== st.template) return false;
      if (st.verdict === "defended" && !(g.kind === "harmful" && a && a.defended)) return false;
      if (st.verdict === "not_defended" && !(g.kind === "harmful" && a && !a.defended)) return false;
      if (st.verdict === "benign_broken" && !(g.kind === "benign" && a && (a.refusal || a.addressed === false))) return false;
      if (st.verdict === "changed") {
        if (!a || !b) return false;
        var va = g.kind === "harmful" ? !!a.defended : !a.refusal && a.addressed !== false;
        var vb = g.kind === "harmful" ? !!b.defended : !b.refusal && b.addressed !== false;
        if (va === vb) return false;
      }
      if (st.q) {
        var text = [g.prompt, a && a.response, b && b.response].join("\n").toLowerCase();
        if (text.indexOf(st.q) < 0) return false;
      }
      return true;
    }
    function render() {
      var hits = order.map(function (k) { return groups[k]; }).filter(keep);
      count.textContent = hits.length + " of " + order.length + " prompts";
      list.replaceChildren.apply(list, hits.slice(0, st.shown).map(function (g) {
        return el("div", { class: "tc-card", "data-kind": g.kind, "data-template": g.template }, [
          el("div", { class: "tc-card-h" }, [el("span", { class: "tc-tag " + g.kind, text: g.kind }), el("span", { class: "tc-tag", text: g.template }),
            el("span", { class: "tc-prompt", text: g.prompt })]),
          el("div", { class: "tc-sides" }, [side("before: no defense", g.by[D.undefended]), side("after: " + st.after, g.by[st.after])])]);
      }));
      more.hidden = hits.length <= st.shown;
    }
    render();
  }
  document.querySelectorAll(".tc-responses[data-source]").forEach(browser);

  // the navigation bar marks the section in view
  var links = Array.prototype.slice.call(document.querySelectorAll("nav.tc-nav a[href^='#']"));
  if (links.length && "IntersectionObserver" in window) {
    var io = new IntersectionObserver(function (entries) {
      entries.forEach(function (e) {
        if (!e.isIntersecting) return;
        links.forEach(function (a) { a.classList.toggle("current", a.getAttribute("href") === "#" + e.target.id); });
      });
    }, { rootMargin: "-45% 0px -50% 0px" });
    links.forEach(function (a) { var s = document.getElementById(a.getAttribute("href").slice(1)); if (s) io.observe(s); });
  }
})();
