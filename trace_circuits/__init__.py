"""trace-circuits: TraceRouter (path-level intervention for robust safety) as a mechanistic-interpretability toolkit.

Data flows one way: prompts -> model -> scan (stage 1) -> features (stage 2) -> influence -> circuit ->
hook set -> evaluation. Each stage returns a small result object with ``.to_json()`` and ``.plot()``.
"""

from trace_circuits.circuit import Circuit
from trace_circuits.divergence import DivergenceResult, divergence_from_profiles, scan_attention_divergence
from trace_circuits.errors import TraceCircuitsError
from trace_circuits.evaluate import EvaluationResult, build_baselines, evaluate_defenses
from trace_circuits.features import FeatureResult, differential_feature_stats, find_harmful_features
from trace_circuits.generation import generate_responses
from trace_circuits.gate import fit_prompt_gate, gate_decisions
from trace_circuits.hooks import HookSet, Operation, hookset_from_circuit, load_hookset
from trace_circuits.influence import attribution_scores, fit_readout, load_downstream_saes, trace_circuit
from trace_circuits.models import available_models, load_hf_model, load_model, model_fingerprint
from trace_circuits.prompts import (
    PromptSet,
    builtin_categories,
    builtin_prompts,
    encode_prompts,
    format_prompts,
    load_prompts,
)
from trace_circuits.saes import SAETrainingConfig, evaluate_sae, list_saes, load_sae, train_saes
from trace_circuits.viz import attention_pair_view, feature_token_view, plot_divergence

__version__ = "0.1.0"

__all__ = [
    "Circuit",
    "EvaluationResult",
    "build_baselines",
    "evaluate_defenses",
    "HookSet",
    "Operation",
    "attribution_scores",
    "fit_readout",
    "generate_responses",
    "hookset_from_circuit",
    "fit_prompt_gate",
    "gate_decisions",
    "load_downstream_saes",
    "load_hookset",
    "trace_circuit",
    "DivergenceResult",
    "FeatureResult",
    "SAETrainingConfig",
    "differential_feature_stats",
    "evaluate_sae",
    "feature_token_view",
    "find_harmful_features",
    "list_saes",
    "load_sae",
    "train_saes",
    "PromptSet",
    "TraceCircuitsError",
    "attention_pair_view",
    "available_models",
    "builtin_categories",
    "builtin_prompts",
    "divergence_from_profiles",
    "encode_prompts",
    "format_prompts",
    "load_hf_model",
    "load_model",
    "load_prompts",
    "model_fingerprint",
    "plot_divergence",
    "scan_attention_divergence",
]
