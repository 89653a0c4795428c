"""``report.html``: the whole TraceRouter run on one page (every stage's plot and table, example responses)."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Optional

from trace_circuits._io import write_text_atomic
from trace_circuits.viz.circuit import links_table
from trace_circuits.viz.features import features_table


def _fig(fig, first: bool) -> str:
    return fig.to_html(full_html=False, include_plotlyjs=True if first else False)


def _examples(evaluation, n_harmful: int = 6, n_benign: int = 3) -> str:
    rows = evaluation.responses
    by = {(r["defense"], r["kind"], r["template"], r["prompt"]): r for r in rows}
    harmful = [r for r in rows if r["defense"] == "tracerouter" and r["kind"] == "harmful" and r["template"] == "direct"]
    harmful.sort(key=lambda r: (not r.get("gate_opened"), r["prompt"]))
    benign = [r for r in rows if r["defense"] == "tracerouter" and r["kind"] == "benign"]
    out = []
    for r in harmful[:n_harmful] + benign[:n_benign]:
        before = by.get(("none", r["kind"], r["template"], r["prompt"]))
        judge = (f"{'defended' if r.get('defended') else 'not defended'}, " if r["kind"] == "harmful" else "") + \
            f"relevance {r['relevance']:.2f}, gate {'opened' if r.get('gate_opened') else 'shut'}"
        out.append(f"<tr><td>{r['kind']}</td><td>{html.escape(r['prompt'])}</td>"
                   f"<td>{html.escape(before['response'] if before else '')}</td>"
                   f"<td>{html.escape(r['response'])}</td><td>{html.escape(judge)}</td></tr>")
    return ("<table border='1' cellpadding='4' style='border-collapse:collapse;font-size:90%'><tr><th></th>"
            "<th>prompt</th><th>before (no defense)</th><th>after (TraceRouter hook set)</th><th>judges</th></tr>"
            + "".join(out) + "</table>")


def _gate(hookset) -> str:
    g = (hookset.provenance.get("gate_calibration") or {}) if hookset is not None else {}
    if not g:
        return ""
    where = f"prompt gate at layer {g.get('layer')}" if g.get("gate") == "prompt" else "feature gate"
    return (f"<p>Gate ({html.escape(where)}): opens on {g['gate_rate_harmful']:.0%} of harmful and "
            f"{g['gate_rate_benign']:.1%} of benign calibration sequences ({g['n_benign']} prompts + "
            f"{g['n_benign_text']} documents; {html.escape(g.get('rates_are', 'in-sample'))}), AUROC "
            f"{g['gate_score_auroc']:.3f}. {html.escape(g.get('rule', ''))}</p>")


def write_report(out_dir: str | Path, *, scan=None, features=None, circuit=None, hookset=None, evaluation=None,
                 timings: Optional[dict] = None, **more) -> Path:
    """One self-contained HTML page (plotly.js inlined once) with every stage that ran."""
    parts, first = [], True
    title = "TraceRouter report"
    if scan is not None:
        onset = scan.onset_layer
        parts.append(f"<h2>1. Attention divergence and the sensitive onset layer</h2><p>Onset layer: <b>{onset}</b>"
                     f" ({scan.n_harmful} harmful vs {scan.n_benign} benign prompts).</p>{_fig(scan.plot(), first)}")
        first = False
    if features is not None:
        parts.append(f"<h2>2. Harmful SAE features at {html.escape(features.hook_name)}</h2><p>"
                     f"{len(features.harmful_features)} harmful features. {html.escape(features.rule)}</p>"
                     f"{_fig(features.plot(), first)}{features_table(features, limit=15)}")
        first = False
    if circuit is not None:
        m = circuit.meta
        parts.append(f"<h2>3. The circuit and what the hook set severs</h2><p>{html.escape(repr(circuit))}. "
                     f"Attribution vs exact zero-out Spearman (top nodes): {m.get('attribution_spearman_top')}. "
                     f"{html.escape(hookset.summary()) if hookset is not None else ''}</p>{_gate(hookset)}"
                     f"{_fig(circuit.plot(), first)}{links_table(circuit, limit=20)}")
        first = False
    if evaluation is not None:
        p = evaluation.params
        parts.append(f"<h2>4. Defense evaluation (held-out test split)</h2><p>{p['n_harmful']} harmful prompts x "
                     f"{len(p['templates'])} templates ({', '.join(p['templates'])}), {p['n_benign']} benign prompts, "
                     f"{p['n_benign_text']} benign documents; greedy, {p['max_new_tokens']} new tokens. Defended = "
                     f"{html.escape(p['defended_rule'])} (relevance threshold "
                     f"{p['relevance_calibration']['threshold']:.3f}).</p>"
                     f"{evaluation.table.to_html(float_format=lambda v: f'{v:.3f}')}{_fig(evaluation.plot(), first)}"
                     f"<h3>Example responses</h3>{_examples(evaluation)}")
    if timings:
        parts.append("<h2>Timings</h2><ul>" + "".join(f"<li>{html.escape(k)}: {v:.0f} s</li>" for k, v in
                                                    timings.items()) + "</ul>")
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title></head><body>"
            f"<h1>{title}</h1>{''.join(parts)}</body></html>")
    return write_text_atomic(Path(out_dir) / "report.html", page)
