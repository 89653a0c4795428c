"""Stage 4 plot: the defense-utility trade-off, one point per defense."""

from __future__ import annotations

from trace_circuits.viz.pages import figure_html


def plot_evaluation(result):
    """Defense-utility trade-off: jailbreak and direct defense success against benign KL, one point per defense."""
    import plotly.graph_objects as go

    fig = go.Figure()
    names = list(result.defenses)
    for key, label, symbol in (("direct", "direct requests", "circle"), ("jailbreaks", "jailbreak templates",
                                                                         "diamond")):
        ys, lo, hi = [], [], []
        for n in names:
            d = result.defenses[n]["dsr"]["direct"] if key == "direct" else result.defenses[n]["dsr_jailbreaks"]
            ys.append(d["rate"])
            lo.append(d["rate"] - d["ci"][0])
            hi.append(d["ci"][1] - d["rate"])
        xs = [result.defenses[n]["utility"].get("kl_benign_text") or 0.0 for n in names]
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="markers+text", text=names, textposition="top center",
                                 name=label, marker=dict(size=12, symbol=symbol),
                                 error_y=dict(type="data", symmetric=False, array=hi, arrayminus=lo)))
    fig.update_layout(title=f"Defense vs utility: {result.model}", xaxis_title="benign text: next-token KL to the "
                      "undefended model (nats/token, lower is better)", yaxis_title="defense success rate",
                      yaxis=dict(range=[-0.05, 1.05]), height=550, width=950)
    return fig


def evaluation_body(result) -> str:
    return (f"{result.table.to_html(float_format=lambda v: f'{v:.3f}')}"
            f"{figure_html(result.plot())}")
