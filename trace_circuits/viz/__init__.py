"""Everything that draws: plotly figures (interactive in Jupyter), circuitsvis views, and the self-contained HTML
pages written next to each result (``<name>.html``) and the run's ``report.html``.

``plot(result)`` returns the figure of any result object (for a circuit, the interactive viewer, :mod:`viz.viewer`);
``pages.write_page(result, folder)`` writes its page.
Pages inline every script they need (plotly.js, the viewer's JS), so they open offline.
"""

from __future__ import annotations

from trace_circuits.viz.circuit import plot_circuit
from trace_circuits.viz.divergence import attention_pair_view, attention_pattern, plot_divergence
from trace_circuits.viz.evaluation import plot_evaluation
from trace_circuits.viz.features import feature_token_view, plot_features
from trace_circuits.viz.views import PairView

__all__ = ["PairView", "attention_pair_view", "attention_pattern", "feature_token_view", "plot", "plot_circuit",
           "plot_divergence", "plot_evaluation", "plot_features", "plot_hookset"]


def plot_hookset(hookset):
    """What a hook set does, per layer: the SAE features it zeroes, the heads and MLPs it scales, its directions, and
    where its gate reads."""
    import plotly.graph_objects as go

    kinds = {"sae_features": "SAE features", "heads": "heads", "mlp": "MLPs", "direction": "directions",
             "steer": "steering"}
    fig = go.Figure()
    for kind, label in kinds.items():
        ops = [op for op in hookset.operations if op.kind == kind]
        if not ops:
            continue
        count = [len(op.features) if kind == "sae_features" else len(op.heads) if kind == "heads" else 1
                 for op in ops]
        fig.add_trace(go.Bar(x=[op.layer for op in ops], y=count, name=label,
                             hovertext=[op.label for op in ops], hoverinfo="text"))
    gate = hookset.gate_operation
    if gate is not None:
        fig.add_vline(x=gate.layer, line=dict(color="crimson", dash="dash"),
                      annotation_text=f"gate reads layer {gate.layer}")
    fig.update_layout(barmode="stack", title=hookset.summary(), xaxis_title="layer",
                      yaxis_title="units cut or steered", xaxis=dict(range=[-0.5, hookset.n_layers - 0.5]),
                      height=420, width=950)
    return fig


def plot(result, **kwargs):
    """The figure of any trace-circuits result object (what ``result.plot()`` returns)."""
    kind = getattr(result, "KIND", "")
    if kind == "trace-circuits divergence":
        return plot_divergence(result, **kwargs)
    if kind == "trace-circuits features":
        return plot_features(result, **kwargs)
    if kind == "trace-circuits circuit":
        return plot_circuit(result, **kwargs)
    if kind == "trace-circuits hook set":
        return plot_hookset(result, **kwargs)
    if kind == "trace-circuits evaluation":
        return plot_evaluation(result, **kwargs)
    raise TypeError(f"no plot for {type(result).__name__}")
