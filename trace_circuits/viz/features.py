"""Stage 2 plots: the volcano plot and fire rates, token-level feature activations (circuitsvis)."""

from __future__ import annotations

import html
import math
from typing import Optional

import numpy as np
import torch

from trace_circuits.errors import TraceCircuitsError
from trace_circuits.feature_stats import (
    EFFECT_SIZE_CLIP,
    STATUS_BENIGN,
    STATUS_CONSTANT,
    STATUS_HARMFUL,
    STATUS_NO_DIFFERENCE,
    STATUS_NOT_SIGNIFICANT,
    STATUS_SMALL,
    STATUS_WEAKER,
    STATUSES,
)
from trace_circuits.viz.pages import figure_html
from trace_circuits.viz.views import PairView


def feature_token_view(model, sae, hook_name: str, prompts: list[str], features: list[int],
                       chat: Optional[bool] = None) -> PairView:
    """circuitsvis token-level activations of SAE ``features`` on each prompt (one colored-tokens view a prompt)."""
    import circuitsvis as cv

    from trace_circuits.prompts import encode_prompts

    if not features:
        raise TraceCircuitsError("no features to show; pass feature ids, e.g. result.harmful_features[:5]")
    enc = encode_prompts(model, prompts, chat=chat)
    device = next(model.parameters()).device
    parts = []
    for i, prompt in enumerate(prompts):
        tokens = torch.tensor([enc.input_ids[i]], device=device)
        with torch.inference_mode():
            _, cache = model.run_with_cache(tokens, names_filter=[hook_name])
            acts = sae.to(device).encode(cache[hook_name][0].float())[:, features].cpu()
        s = enc.content_spans[i][0]
        strs = [model.tokenizer.decode([t]) for t in enc.input_ids[i]][s:]
        view = cv.tokens.colored_tokens_multi(tokens=strs, values=acts[s:], labels=[f"F{f}" for f in features])
        parts.append((prompt, view))
    return PairView(parts)


def plot_features(result):
    """Volcano plot (effect size vs -log10 q, coloured by status) and harmful vs benign fire rates of the top
    20 harmful features (or the top 20 by effect size when none is harmful)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    t = result.table
    alpha = float(result.params.get("alpha", 0.05))
    min_d = float(result.params.get("min_effect_size", 0.5))
    harmful_ids = result.harmful_features
    top = t[t["harmful"].to_numpy(dtype=bool)].head(20) if harmful_ids else t.head(20)
    bar_title = ("Fire rates of the top harmful features" if harmful_ids
                 else "Fire rates of the top features by effect size (none harmful)")
    fig = make_subplots(rows=1, cols=2, column_widths=[0.55, 0.45], horizontal_spacing=0.1,
                        subplot_titles=("Volcano: Cohen's d vs -log10 q (BH)", bar_title))
    d = t["effect_size"].to_numpy(dtype=float)
    finite = np.abs(d) < EFFECT_SIZE_CLIP
    cap = max(float(np.abs(d[finite]).max()) * 1.05 if finite.any() else 0.0, min_d * 1.5, 1.0)
    x_all = np.clip(d, -cap, cap)
    y_all = -np.log10(np.clip(t["q_value"].to_numpy(dtype=float), 1e-300, 1.0))
    colours = {STATUS_HARMFUL: "crimson", STATUS_BENIGN: "darkorange", STATUS_SMALL: "goldenrod",
               STATUS_NOT_SIGNIFICANT: "gray", STATUS_NO_DIFFERENCE: "silver", STATUS_WEAKER: "seagreen",
               STATUS_CONSTANT: "lightgray"}
    status = t["status"].to_numpy(dtype=str)
    for s in STATUSES:
        m = status == s
        if not m.any():
            continue
        sub = t[m]
        tokens = []
        for fid in sub["feature"]:
            ex = _example(result, int(fid)) or {}
            toks = ex.get("top_tokens") or []
            tokens.append(html.escape(", ".join(repr(str(tok)) for tok, _ in toks[:8])) or "-")
        custom = np.empty((int(m.sum()), 6), dtype=object)
        custom[:, 0] = sub["feature"].to_numpy()
        custom[:, 1] = sub["mean_diff"].to_numpy()
        custom[:, 2] = sub["fire_rate_harmful"].to_numpy()
        custom[:, 3] = sub["fire_rate_benign"].to_numpy()
        custom[:, 4] = sub["effect_size"].to_numpy()
        custom[:, 5] = tokens
        fig.add_trace(go.Scatter(
            x=x_all[m], y=y_all[m], mode="markers", name=s, customdata=custom,
            marker=dict(color=colours[s], size=8 if s == STATUS_HARMFUL else 5,
                        opacity=0.9 if s == STATUS_HARMFUL else 0.5),
            hovertemplate="feature %{customdata[0]}<br>d = %{customdata[4]:.3g}, q = 10^-%{y:.2f}"
                          "<br>mean diff = %{customdata[1]:.4g}<br>fire rate harmful %{customdata[2]:.2f}, "
                          "benign %{customdata[3]:.2f}<br>top tokens: %{customdata[5]}<extra></extra>"),
            row=1, col=1)
    fig.add_hline(y=-math.log10(alpha), line=dict(color="gray", dash="dot"), row=1, col=1)
    fig.add_vline(x=min_d, line=dict(color="gray", dash="dot"), row=1, col=1)
    labels = [f"f{int(f)}" for f in top["feature"]]
    fig.add_trace(go.Bar(x=labels, y=top["fire_rate_harmful"].to_numpy(dtype=float), name="fires on harmful",
                         marker_color="crimson"), row=1, col=2)
    fig.add_trace(go.Bar(x=labels, y=top["fire_rate_benign"].to_numpy(dtype=float), name="fires on benign",
                         marker_color="seagreen"), row=1, col=2)
    fig.add_hline(y=float(result.params.get("max_benign_fire_rate", 0.2)), line=dict(color="seagreen", dash="dot"),
                  row=1, col=2)
    fig.update_xaxes(title_text="effect size (Cohen's d)", row=1, col=1)
    fig.update_yaxes(title_text="-log10 q", row=1, col=1)
    fig.update_xaxes(title_text="feature", row=1, col=2)
    fig.update_yaxes(title_text="fraction of prompts firing", range=[0, 1.05], row=1, col=2)
    fig.update_layout(height=560, width=1200, barmode="group",
                      title=f"Differential SAE features, harmful ({result.n_harmful}) vs benign ({result.n_benign}): "
                            f"{result.model} {result.sae_id}".strip(),
                      legend=dict(orientation="h", y=-0.15))
    return fig


def features_table(result, limit: int = 50) -> str:
    t = result.table
    mask = t["harmful"].to_numpy(dtype=bool)
    rows = t[mask].head(limit) if mask.any() else t.head(min(limit, 20))
    head = ("<tr><th>feature</th><th>status</th><th>d</th><th>q</th><th>fire harmful</th><th>fire benign</th>"
            "<th>top tokens</th></tr>")
    body = []
    for _, r in rows.iterrows():
        ex = _example(result, int(r["feature"])) or {}
        toks = ", ".join(f"{str(tok)!r} ({float(a):.2f})" for tok, a in (ex.get("top_tokens") or [])[:10])
        body.append(f"<tr><td>{int(r['feature'])}</td><td>{html.escape(str(r['status']))}</td>"
                    f"<td>{float(r['effect_size']):.3g}</td><td>{float(r['q_value']):.3g}</td>"
                    f"<td>{float(r['fire_rate_harmful']):.2f}</td><td>{float(r['fire_rate_benign']):.2f}</td>"
                    f"<td>{html.escape(toks)}</td></tr>")
    return f"<table border='1' cellpadding='4' style='border-collapse:collapse'>{head}{''.join(body)}</table>"


def _example(result, fid: int):
    ex = result.examples.get(fid, result.examples.get(str(fid)))
    return ex or None


def features_body(result) -> str:
    n = len(result.harmful_features)
    return (f"<p><b>{n}</b> harmful feature{'' if n == 1 else 's'} out of "
            f"{result.params.get('n_features', len(result.table))}; {result.n_harmful} harmful vs {result.n_benign} "
            f"benign prompts.</p><p>{html.escape(result.rule)}</p>{figure_html(result.plot())}"
            f"<h2>{'Harmful features' if n else 'Top features by effect size'}</h2>{features_table(result)}")
