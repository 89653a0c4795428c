"""The gate of a run's hook set, fitted on the run's own prompts: the prompt probe (``GateConfig.kind`` "prompt":
:func:`trace_circuits.gate.fit_prompt_gate` at the onset layer or the best of the ``search`` layers before it, with its
message reading and, with ``perplexity_window``, its fluency reading :func:`trace_circuits.perplexity.calibrate_surprisal`)
or the circuit's source features' own gate (:func:`trace_circuits.feature_gate.calibrate_feature_gate`)."""

from __future__ import annotations


def fit_run_gate(run, circuit) -> tuple:
    """``(gate operation, calibration record)`` for ``run`` (a :class:`~trace_circuits.pipeline.Run`) and its circuit."""
    gc = run.config.gate
    onset = circuit.meta["onset_layer"]
    text = run.encoded("gate_text") if gc.text_docs else None
    if gc.kind != "prompt":
        from trace_circuits.feature_gate import calibrate_feature_gate
        from trace_circuits.hookset import sae_operation

        srcs = [n.index for n in circuit.sources]
        return calibrate_feature_gate(run.model, sae_operation(run.saes[onset], srcs), run.encoded("harmful"),
                                      run.encoded("benign"), gc.benign_rate, text, progress=run.progress)
    from trace_circuits.gate import fit_prompt_gate

    h, b, groups, requests = calibration_sets(run)
    layers = [gc.layer] if gc.layer is not None else list(range(max(0, onset - gc.search), onset + 1))
    gate, calib = fit_prompt_gate(run.model, h, b, layers, gc.benign_rate, groups=groups, requests=requests,
                                  **prompt_gate_options(run, layers))
    if gc.perplexity_window:
        from trace_circuits.perplexity import calibrate_surprisal

        calib["perplexity"] = calibrate_surprisal(run.model, gate, b, gc.perplexity_window, gc.perplexity_rate,
                                                  groups=groups, progress=run.progress, tokens=gc.perplexity_tokens)
    return gate, calib


def prompt_gate_options(run, layers) -> dict:
    """The keyword arguments of :func:`~trace_circuits.gate.fit_prompt_gate` that the run's gate config and SAEs fix
    (everything but the calibration sequences, their groups and request ids)."""
    from trace_circuits.saes.encoding import massive_limit

    gc = run.config.gate
    return dict(benign_text=run.encoded("gate_text") if gc.text_docs else None, progress=run.progress,
                l2=gc.l2_values(), pool=gc.pool,
                massive_norm_threshold={l: massive_limit(run.saes[l]) for l in layers if l in run.saes},
                message_min_tokens=gc.message_min_tokens,
                message_rate=gc.message_rates() if gc.pool == "turn" else 0.0, message_reading=gc.message_reading)


def calibration_sets(run):
    """The prompt gate's calibration requests, encoded: the harmful and benign training requests (and the hard
    negatives' training split) asked directly and under the attack templates (:func:`gate.calibration_sets`);
    returns ``(harmful, benign, (harmful templates, benign templates), (harmful request ids, benign request
    ids))``: each sequence's template and the index of the request it asks (harmful request i and benign request
    i share an id: the built-in sets are form-matched twins, held out together)."""
    from trace_circuits.gate import calibration_sets as sets

    gc = run.config.gate
    benign = list(run.prompts("benign")) + (list(run.prompts("hard_negative_train")) if gc.hard_negatives else [])
    return sets(run.model, list(run.prompts("harmful")), benign, gc.templates, gc.passes, run.config.chat)
