"""``report.html``: the whole TraceRouter run on one self-contained page.

A navigation bar by stage; a one-screen summary (onset layer, features, circuit size, hook set and gate, headline
defense success and utility with 95% intervals, time); then each stage that ran: its plot (plotly.js inlined once),
narrow or collapsible tables, the circuit viewer (an iframe holding the same page as ``circuit.html``), the
evaluation's split tables and a browser of the example responses (filter by defense, template, verdict, text).
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Optional

from trace_circuits._io import write_text_atomic
from trace_circuits.viz.circuit import links_table
from trace_circuits.viz.evaluation import UNDEFENDED, evaluation_sections, fmt, headline_defense, headline_table
from trace_circuits.viz.features import features_table
from trace_circuits.viz.viewer import asset, inline_script, viewer_page

_PLOTLY_MARK = "plotly.js v"  # the banner at the top of the inlined plotly.js bundle


class _Figures:
    """Inline plotly.js with the first figure only (or not at all when a section's body already carries it)."""

    def __init__(self):
        self.have = False

    def note(self, body: str) -> str:
        self.have = self.have or _PLOTLY_MARK in body
        return body

    def __call__(self, fig) -> str:
        out = fig.to_html(full_html=False, include_plotlyjs=not self.have)
        self.have = True
        return f"<div class='tc-scroll'>{out}</div>"


def _fact(key: str, value: str, sub: str = "") -> str:
    return (f"<div class='tc-fact'><div class='k'>{html.escape(key)}</div><div class='v'>{value}</div>"
            + (f"<div class='s'>{sub}</div>" if sub else "") + "</div>")


def _ci(d) -> str:
    if isinstance(d, dict) and isinstance(d.get("ci"), (list, tuple)) and len(d["ci"]) == 2:
        return f"95% CI [{fmt(d['ci'][0], 2)}, {fmt(d['ci'][1], 2)}]" + (f", {d['k']}/{d['n']}" if "k" in d and "n"
                                                                           in d else "")
    return ""


def _model(*objs) -> str:
    for o in objs:
        name = getattr(o, "model", None) or (getattr(o, "meta", None) or {}).get("model")
        if isinstance(name, str) and name:
            return name
    return ""


def _seconds(s: float) -> str:
    s = float(s)
    return f"{s:.0f} s" if s < 120 else f"{int(s // 60)} min {s % 60:.0f} s"


def summary(scan=None, features=None, circuit=None, hookset=None, evaluation=None, timings=None,
            headline: Optional[str] = None) -> str:
    """The one-screen summary: a grid of facts, then every defense at a glance."""
    facts = []
    onset = scan.onset_layer if scan is not None else (circuit.meta.get("onset_layer") if circuit is not None else None)
    if onset is not None:
        sub = ""
        if scan is not None:
            d, lo, hi, _ = scan.onset_divergence()
            sub = (f"D = {d:.4f} bits [{lo:.4f}, {hi:.4f}]; {scan.n_harmful} harmful vs {scan.n_benign} benign "
                   f"prompts; {getattr(scan, 'contrast', 'raw').replace('_', '-')} onset")
        facts.append(_fact("onset layer", str(onset), sub))
    elif scan is not None:
        traced = circuit.meta.get("onset_layer") if circuit is not None else None
        facts.append(_fact("onset layer", "none found" if traced is None else f"{traced} (given)", html.escape(
            f"the scan found none ({getattr(scan, 'onset_rule', '')})" + (
                f"; the circuit was traced from layer {traced}" if traced is not None else ""))))
    if features is not None:
        facts.append(_fact("harmful SAE features", str(len(features.harmful_features)),
                           html.escape(f"at {features.hook_name}")))
    if circuit is not None:
        kinds = {}
        for n in circuit.nodes:
            kinds[n.kind] = kinds.get(n.kind, 0) + 1
        facts.append(_fact("circuit", f"{len(circuit.nodes)} nodes, {len(circuit.links)} links",
                           html.escape(", ".join(f"{v} {k}" for k, v in kinds.items())) + "; "
                           f"{len(circuit.severed_nodes)} nodes marked for the cut, "
                           f"{sum(link.severed for link in circuit.links)} links it severs" + (
                               " (this hook set's action 'steer' leaves them in place)"
                               if getattr(hookset, "action", None) == "steer" else "")))
    if hookset is not None:
        from trace_circuits.hookset.format import message_coverage

        g = hookset.provenance.get("gate_calibration") or {}
        gate = (f"gate opens on {fmt(g.get('gate_rate_harmful'), 2)} of harmful, {fmt(g.get('gate_rate_benign'), 3)}"
                f" of benign calibration sequences" + (
                    f" ({message_coverage(g)})" if message_coverage(g) else "") if g else "")
        facts.append(_fact("hook set", f"{len(hookset.operations)} operations",
                           html.escape(hookset.summary()) + (f"<br>{gate}" if gate else "")))
    if evaluation is not None:
        name = headline_defense(evaluation, headline)
        if name is not None:
            m, base = evaluation.defenses[name], evaluation.defenses.get(UNDEFENDED, {})
            for label, get in (("defense success, direct", lambda d: (d.get("dsr") or {}).get("direct")),
                               ("defense success, jailbreaks", lambda d: d.get("dsr_jailbreaks"))):
                d = get(m)
                if isinstance(d, dict) and "rate" in d:
                    b = get(base) if base else None
                    was = f"; undefended {fmt(b['rate'], 2)}" if isinstance(b, dict) and "rate" in b else ""
                    facts.append(_fact(f"{label} ({name})", fmt(d["rate"], 2), _ci(d) + was))
            u = m.get("utility") or {}
            if "over_refusal" in u:
                ci = u.get("over_refusal_ci")
                facts.append(_fact(f"benign over-refusal ({name})", fmt(u["over_refusal"], 2),
                                   _ci({"ci": ci}) if ci else ""))
            if u.get("kl_benign_text") is not None:
                facts.append(_fact(f"utility: KL on benign text ({name})", fmt(u["kl_benign_text"], 4),
                                   "nats/token to the undefended model"))
    if timings:
        total = timings.get("total", sum(v for v in timings.values() if isinstance(v, (int, float))))
        facts.append(_fact("time", _seconds(total), html.escape(", ".join(f"{k}: {_seconds(v)}" for k, v in
                                                                             timings.items() if k != "total"))))
    out = f"<div class='tc-cards-grid'>{''.join(facts)}</div>"
    if evaluation is not None:
        out += f"<h3>Every defense at a glance</h3>{headline_table(evaluation)}"
    return out


def _gate(hookset) -> str:
    g = (hookset.provenance.get("gate_calibration") or {}) if hookset is not None else {}
    if not g:
        return ""
    where = f"prompt gate at layer {g.get('layer')}" if g.get("gate") == "prompt" else "feature gate"
    rows = "".join(f"<tr><td>{html.escape(k.replace('_', ' '))}</td><td class='num'>{fmt(v)}</td></tr>"
                   for k, v in g.items() if k not in ("rule", "rates_are", "gate") and not isinstance(v, (dict, list)))
    return (f"<p>Gate ({html.escape(where)}): rates are {html.escape(str(g.get('rates_are', 'in-sample')))}. "
            f"{html.escape(str(g.get('rule', '')))}</p><details><summary>gate calibration</summary>"
            f"<table class='tc-table'><tbody>{rows}</tbody></table></details>")


def _kv_table(d: dict) -> str:
    rows = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(v if isinstance(v, str) else json.dumps(v))}"
                   f"</td></tr>" for k, v in d.items())
    return f"<table class='tc-table'><tbody>{rows}</tbody></table>"


def _section(sid: str, title: str, body: str) -> str:
    return f"<section id='{sid}'><h2>{html.escape(title)}</h2>{body}</section>"


def write_report(out_dir: str | Path, *, scan=None, features=None, circuit=None, hookset=None, evaluation=None,
                 timings: Optional[dict] = None, config: Optional[dict] = None, title: Optional[str] = None,
                 headline: Optional[str] = None, **more) -> Path:
    """Write ``out_dir/report.html`` with every stage that ran; returns its path.

    ``headline``: the defense the summary leads with (default: the first that is not ``none``). ``config``: the
    run's settings (shown as a table). ``more``: other results (name -> object with ``plot()``, or a dict)."""
    out_dir = Path(out_dir)
    model = _model(scan, features, circuit, evaluation, hookset)
    title = title or f"TraceRouter report{': ' + model if model else ''}"
    figs, nav, parts = _Figures(), [("summary", "Summary")], []
    if scan is not None:
        from trace_circuits.viz.divergence import divergence_body

        nav.append(("divergence", "1 Divergence"))
        parts.append(_section("divergence", "1. Attention divergence and the onset layer",
                              figs.note(divergence_body(scan))))
    if features is not None:
        nav.append(("features", "2 Features"))
        parts.append(_section("features", f"2. Harmful SAE features at {features.hook_name}", (
            f"<p><b>{len(features.harmful_features)}</b> harmful features. {html.escape(features.rule)}</p>"
            f"{figs(features.plot())}<details><summary><h3>Feature table</h3></summary><div class='tc-scroll'>"
            f"{features_table(features, limit=30)}</div></details>")))
    if circuit is not None:
        m = circuit.meta
        nav.append(("circuit", "3 Circuit"))
        open_full = (" Open <a href='circuit.html'>circuit.html</a> for the viewer full-window."
                     if (out_dir / "circuit.html").exists() else "")
        frame = html.escape(viewer_page(circuit), quote=True)
        parts.append(_section("circuit", "3. The circuit and what the hook set severs", (
            f"<p>{html.escape(repr(circuit))}. Attribution vs exact zero-out Spearman (top nodes): "
            f"{fmt(m.get('attribution_spearman_top'))}.{open_full}</p>"
            f"<iframe class='tc-frame' title='circuit viewer' srcdoc=\"{frame}\"></iframe>"
            f"<details><summary><h3>Strongest links</h3></summary>{links_table(circuit, limit=25)}</details>")))
    if hookset is not None:
        from trace_circuits.viz import plot_hookset

        nav.append(("hookset", "Hook set"))
        parts.append(_section("hookset", "The hook set", f"<p>{html.escape(hookset.summary())}</p>{_gate(hookset)}"
                              + (figs(plot_hookset(hookset)) if hookset.operations else "")))
    if evaluation is not None:
        nav += [("evaluation", "4 Evaluation"), ("responses", "Responses")]
        body = evaluation_sections(evaluation, after=headline, figure=figs, glance=False)
        parts.append(_section("evaluation", "4. Defense evaluation (held-out test split)", body))
    for name, obj in more.items():
        if obj is None:
            continue
        nav.append((f"more-{name}", name))
        body = figs(obj.plot()) if hasattr(obj, "plot") else _kv_table(obj) if isinstance(obj, dict) else \
            f"<p>{html.escape(repr(obj))}</p>"
        parts.append(_section(f"more-{name}", name, body))
    if config:
        nav.append(("config", "Config"))
        parts.append(_section("config", "Run configuration", f"<details open><summary>settings</summary>"
                                                             f"{_kv_table(config)}</details>"))
    if timings:
        nav.append(("timings", "Time"))
        parts.append(_section("timings", "Time", _kv_table({k: _seconds(v) for k, v in timings.items()})))
    links = "".join(f"<a href='#{sid}'>{html.escape(label)}</a>" for sid, label in nav)
    page = (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><meta name='viewport' "
            f"content='width=device-width, initial-scale=1'><title>{html.escape(title)}</title>"
            f"<style>{asset('report.css')}</style></head><body class='tc-report'>"
            f"<nav class='tc-nav'><b>{html.escape(title)}</b>{links}</nav><div class='tc-report-body'>"
            f"<section id='summary'><h1>{html.escape(title)}</h1>"
            f"{summary(scan, features, circuit, hookset, evaluation, timings, headline)}</section>"
            f"{''.join(parts)}</div>{inline_script(asset('report.js'))}</body></html>")
    return write_text_atomic(out_dir / "report.html", page)

