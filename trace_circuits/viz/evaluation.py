"""Stage 4 views: the defense-utility trade-off plot, narrow tables, and a browser of the example responses.

Everything renders the result's dicts generically: every template in ``dsr``, every key of ``judges`` and
``utility`` (a ``<key>_ci`` pair joins its ``<key>``; nested dicts become ``parent / key`` rows), every defense.
Only ``"none"`` has a meaning (the undefended model, the "before" column of the response browser).
"""

from __future__ import annotations

import html
import math
from typing import Callable, Optional

from trace_circuits.viz.pages import figure_html
from trace_circuits.viz.viewer import asset, inline_script, script_json

UNDEFENDED = "none"


def plot_evaluation(result):
    """Defense-utility trade-off: jailbreak and direct defense success against benign KL, one point per defense."""
    import plotly.graph_objects as go

    fig = go.Figure()
    names = list(result.defenses)
    for key, label, symbol in (("direct", "direct requests", "circle"), ("jailbreaks", "jailbreak templates",
                                                                         "diamond")):
        pts = [(n, _rate_of(result.defenses[n], key)) for n in names]
        pts = [(n, d) for n, d in pts if d is not None and _num(d.get("rate")) is not None]
        if not pts:
            continue
        ys = [d["rate"] for _, d in pts]
        ci = [d.get("ci") or [d["rate"], d["rate"]] for _, d in pts]
        xs = [_num(result.defenses[n].get("utility", {}).get("kl_benign_text")) or 0.0 for n, _ in pts]
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="markers+text", text=[n for n, _ in pts], textposition="top center",
                                 name=label, marker=dict(size=12, symbol=symbol),
                                 error_y=dict(type="data", symmetric=False, array=[c[1] - y for c, y in zip(ci, ys)],
                                              arrayminus=[y - c[0] for c, y in zip(ci, ys)])))
    fig.update_layout(title=f"Defense vs utility: {result.model}", xaxis_title="benign text: next-token KL to the "
                      "undefended model (nats/token, lower is better)", yaxis_title="defense success rate",
                      yaxis=dict(range=[-0.05, 1.05]), height=520, width=900)
    return fig


def _rate_of(m: dict, key: str) -> Optional[dict]:
    if key == "jailbreaks":
        return m.get("dsr_jailbreaks")
    return (m.get("dsr") or {}).get(key)


def _num(v) -> Optional[float]:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(v) else None


def fmt(v, digits: int = 3) -> str:
    """A number as a short string (``–`` for missing or non-finite)."""
    x = _num(v)
    if x is None:
        return "–" if v is None or isinstance(v, float) else html.escape(str(v))
    if x != 0 and (abs(x) < 1e-3 or abs(x) >= 1e5):
        return f"{x:.2e}"
    return str(int(x)) if isinstance(v, int) else f"{x:.{digits}f}"


def rate_html(d) -> str:
    """``{"rate","ci","k","n"}`` as ``0.83`` with its interval and counts underneath; a plain number as itself."""
    if isinstance(d, dict) and "rate" in d:
        ci = d.get("ci")
        sub = f"[{fmt(ci[0], 2)}, {fmt(ci[1], 2)}]" if isinstance(ci, (list, tuple)) and len(ci) == 2 else ""
        if "k" in d and "n" in d:
            sub += f" {d['k']}/{d['n']}"
        return f"<b>{fmt(d['rate'])}</b>" + (f"<br><small>{html.escape(sub.strip())}</small>" if sub else "")
    return fmt(d)


def _flatten(d: dict, prefix: str = "") -> dict:
    """``{key: value}`` with ``<key>_ci`` folded into ``{"rate": value, "ci": ...}`` and nested dicts flattened."""
    out = {}
    for k, v in d.items():
        if k.endswith("_ci") and k[:-3] in d:
            continue
        name = f"{prefix}{k}"
        if isinstance(v, dict) and "rate" not in v:
            out.update(_flatten(v, f"{name} / "))
        elif f"{k}_ci" in d and _num(v) is not None:
            out[name] = {"rate": v, "ci": d[f"{k}_ci"]}
        else:
            out[name] = v
    return out


def _table(head: list[str], rows: list[list[str]], cls: str = "") -> str:
    th = "".join(f"<th>{h}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" if i == 0 else f"<td class='num'>{c}</td>"
                                    for i, c in enumerate(r)) + "</tr>" for r in rows)
    return f"<table class='tc-table {cls}'><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def templates_of(result) -> list[str]:
    """Every template present: the run's order (``params["templates"]``) first, then any other found."""
    seen = list(result.params.get("templates") or [])
    for m in result.defenses.values():
        seen += [t for t in (m.get("dsr") or {}) if t not in seen]
    for r in result.responses:
        if r.get("template") and r["template"] not in seen:
            seen.append(r["template"])
    return seen


def dsr_table(result) -> str:
    """Defense success rate per template (rows) and defense (columns), with 95% intervals."""
    names = list(result.defenses)
    rows = [[html.escape(t)] + [rate_html((result.defenses[n].get("dsr") or {}).get(t)) for n in names]
            for t in templates_of(result)]
    rows.append(["<b>all jailbreak templates</b>"] + [rate_html(result.defenses[n].get("dsr_jailbreaks"))
                                                      for n in names])
    return _table(["template"] + [html.escape(n) for n in names], rows, "dsr")


def metric_table(result, key: str) -> str:
    """One metric per row (every key of ``defenses[*][key]``, in order of appearance), one defense per column."""
    names = list(result.defenses)
    flat = {n: _flatten(result.defenses[n].get(key) or {}) for n in names}
    keys: list[str] = []
    for n in names:
        keys += [k for k in flat[n] if k not in keys]
    rows = [[html.escape(k.replace("_", " "))] + [rate_html(flat[n].get(k)) for n in names] for k in keys]
    return _table([key] + [html.escape(n) for n in names], rows, key)


def headline_defense(result, preferred: Optional[str] = None) -> Optional[str]:
    """The defense the summary leads with: ``preferred`` if present, else the first that is not ``none``."""
    if preferred in result.defenses:
        return preferred
    return next((n for n in result.defenses if n != UNDEFENDED), None)


def headline_table(result) -> str:
    """Every defense at a glance: direct and jailbreak defense success, benign over-refusal, benign-text KL."""
    cols = [("DSR direct", lambda m: (m.get("dsr") or {}).get("direct")),
            ("DSR jailbreaks", lambda m: m.get("dsr_jailbreaks")),
            ("benign over-refusal", lambda m: _flatten(m.get("utility") or {}).get("over_refusal")),
            ("KL benign text", lambda m: (m.get("utility") or {}).get("kl_benign_text"))]
    rows = [[html.escape(n) + (" <small>(undefended)</small>" if n == UNDEFENDED else "")]
            + [rate_html(f(m)) for _, f in cols] for n, m in result.defenses.items()]
    return _table(["defense"] + [c for c, _ in cols], rows, "headline")


def params_line(result) -> str:
    p = result.params
    bits = []
    src = p.get("sources") or {}

    def of(kind):
        return f" ({html.escape(str(src[kind]))})" if src.get(kind) else ""

    if "n_harmful" in p:
        bits.append(f"{p['n_harmful']} harmful prompts{of('harmful')} x {len(templates_of(result))} templates")
    if "n_benign" in p:
        bits.append(f"{p['n_benign']} benign prompts{of('benign')}")
    if p.get("n_hard_negative"):
        bits.append(f"{p['n_hard_negative']} hard negatives{of('hard_negative')}")
    if "n_benign_text" in p:
        bits.append(f"{p['n_benign_text']} benign documents")
    if "max_new_tokens" in p:
        bits.append(f"greedy, {p['max_new_tokens']} new tokens" + (f", in {p['dtype']}" if p.get("dtype") else ""))
    line = "; ".join(bits)
    if p.get("defended_rule"):
        thr = (p.get("relevance_calibration") or {}).get("threshold")
        line += (f". Defended = {html.escape(str(p['defended_rule']))}"
                 + (f" (relevance threshold {fmt(thr)})" if thr is not None else ""))
    return f"<p>{line}.</p>" if line else ""


def responses_browser(result, after: Optional[str] = None, element_id: str = "tc-responses") -> str:
    """Example responses, browsable: filter by template, kind, verdict and text; the undefended answer beside the
    chosen defense's, with every judge's score."""
    rows = [{k: v for k, v in r.items()} for r in result.responses]
    if not rows:
        return "<p class='muted'>No responses stored with this evaluation (responses.jsonl is missing).</p>"
    data = {"rows": rows, "defenses": list(result.defenses), "templates": templates_of(result),
            "undefended": UNDEFENDED, "after": headline_defense(result, after)}
    return (f"<div class='tc-responses' id='{element_id}' data-source='{element_id}-data'></div>"
            f"<script type='application/json' id='{element_id}-data'>{script_json(_clean(data))}</script>")


def _clean(obj):
    """JSON-safe: non-finite floats become null."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def evaluation_sections(result, after: Optional[str] = None, figure: Optional[Callable] = None,
                        glance: bool = True) -> str:
    """The evaluation's tables (split: defense success, judges, utility), plot and response browser.

    ``figure``: how to render a plotly figure (default: inline with plotly.js); ``glance``: include the
    every-defense summary table."""
    figure = figure or figure_html
    return (f"{params_line(result)}" + (f"<h3>At a glance</h3>{headline_table(result)}" if glance else "") +
            f"<h3>Defense success by template</h3>{dsr_table(result)}"
            f"<details open><summary><h3>Judges</h3></summary>{metric_table(result, 'judges')}</details>"
            f"<details open><summary><h3>Utility</h3></summary>{metric_table(result, 'utility')}</details>"
            f"<h3>Trade-off</h3>{figure(result.plot())}"
            f"<h3 id='responses'>Example responses</h3>{responses_browser(result, after)}")


def evaluation_body(result) -> str:
    """The body of ``evaluation.html`` (styles and scripts inlined)."""
    return (f"<style>{asset('report.css')}</style><div class='tc-report-body'>{evaluation_sections(result)}</div>"
            f"{inline_script(asset('report.js'))}")
