"""trace-circuits: TraceRouter (path-level intervention for robust safety) as a mechanistic-interpretability toolkit.

Data flows one way: prompts -> model -> scan (stage 1) -> features (stage 2) -> influence -> circuit -> hook set ->
evaluation -> report. :class:`Run` holds the model, the encoded prompts and the SAEs and has a method per stage; each
stage's result object has ``save(dir)`` / ``load(dir)``, ``to_json()`` / ``from_json()`` and ``plot()``.
"""

from trace_circuits.model_files import default_offline

default_offline()  # HF_HUB_OFFLINE=1 unless the user chose, before transformers / huggingface_hub are imported

from trace_circuits.attribution import attribution_scores  # noqa: E402
from trace_circuits.circuit import Circuit, Link, Node  # noqa: E402
from trace_circuits.config import (EvaluationConfig, FeaturesConfig, GateConfig, HookSetConfig, RunConfig, ScanConfig,
                                   TraceConfig)
from trace_circuits.divergence import DivergenceResult, divergence_from_profiles, scan_attention_divergence
from trace_circuits.errors import TraceCircuitsError
from trace_circuits.evaluate import EvaluationResult, RelevanceJudge, build_baselines, evaluate_defenses
from trace_circuits.feature_stats import differential_feature_stats
from trace_circuits.features import FeatureResult, find_harmful_features, heldout_auroc
from trace_circuits.feature_gate import calibrate_feature_gate
from trace_circuits.gate import fit_prompt_gate, gate_decisions
from trace_circuits.generation import generate_responses
from trace_circuits.hookset import HookSet, Operation, hookset_for, hookset_from_circuit, load_hookset, sae_operation
from trace_circuits.influence import TraceContext, fit_readout, measure_ablations
from trace_circuits.models import available_models, load_hf_model, load_model, model_fingerprint, model_info
from trace_circuits.names import hook_name, node_id, parse_hook, parse_node_id
from trace_circuits.datasets import builtin_categories, builtin_prompts
from trace_circuits.pipeline import Run
from trace_circuits.prompts import (
                                   PromptSet,
                                   encode_prompts,
                                   format_prompts,
                                   load_prompts,
)
from trace_circuits.saes import SAETrainingConfig, evaluate_sae, list_saes, load_sae, shipped_saes, train_saes
from trace_circuits.tracing import trace_circuit
from trace_circuits.viz import attention_pair_view, feature_token_view, plot_divergence

__version__ = "0.2.0"

__all__ = [
    "Circuit", "DivergenceResult", "EvaluationConfig", "EvaluationResult", "FeatureResult", "FeaturesConfig",
    "GateConfig", "HookSet", "HookSetConfig", "Link", "Node", "Operation", "PromptSet", "RelevanceJudge", "Run",
    "RunConfig", "SAETrainingConfig", "ScanConfig", "TraceCircuitsError", "TraceConfig", "TraceContext",
    "attention_pair_view", "attribution_scores", "available_models", "build_baselines", "builtin_categories",
    "builtin_prompts", "calibrate_feature_gate", "differential_feature_stats", "divergence_from_profiles",
    "encode_prompts", "evaluate_defenses", "evaluate_sae", "feature_token_view", "find_harmful_features",
    "fit_prompt_gate", "fit_readout", "format_prompts", "gate_decisions", "generate_responses", "heldout_auroc",
    "hook_name", "hookset_for", "hookset_from_circuit", "list_saes", "load_hf_model", "load_hookset", "load_model",
    "load_prompts", "load_sae", "measure_ablations", "model_fingerprint", "model_info", "node_id", "parse_hook",
    "parse_node_id", "plot_divergence", "sae_operation", "scan_attention_divergence", "shipped_saes", "trace_circuit",
    "train_saes",
]
