"""One config dataclass per pipeline stage, and the run's config that holds them all.

Every default is written once, here: the CLI's options are generated from these fields (:func:`add_options`,
:func:`from_options`), a run folder's ``config.json`` is :meth:`RunConfig.to_json`, and ``trace-circuits run
--config config.json`` reads it back (:meth:`RunConfig.from_json`), with options given on the command line on top.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

from trace_circuits.config_options import add_options, from_options  # noqa: F401  (the CLI reads them from here)
from trace_circuits.errors import TraceCircuitsError

FORMAT_VERSION = 1
ALL_BASELINES = "top_feature,onset_features,direction_ablation,direction_addition,layer_ablation"


def opt(default, help: str, flag: str = "", choices: Optional[tuple] = None, **kw):
    """A config field with its command-line help (and an explicit flag name when the derived one would clash)."""
    meta = {"help": help, "flag": flag, "choices": choices}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


@dataclass
class ScanConfig:
    """Stage 1: attention divergence and the sensitive onset layer."""

    batch_size: int = opt(16, "prompts per forward pass")
    n_content_bins: int = opt(8, "slices of the user's text", flag="content-bins")
    query_positions: int = opt(1, "average attention over this many final positions")
    n_bootstrap: int = opt(1000, "bootstrap resamples for the CIs", flag="bootstrap")
    n_permutations: int = opt(1000, "label permutations for the p-values", flag="permutations")
    alpha: float = opt(0.05, "significance level (BH over layers)")
    onset_fraction: float = opt(0.5, "the onset needs D[l] >= this fraction of the largest D")
    contrast: str = opt("form_controlled", choices=("form_controlled", "raw"), help="form_controlled: onset located on form-matched pairs and tested on your "
                                           "sets against a benign form control; raw: the raw rule on your two sets")
    paired: bool = opt(False, "your harmful and benign files are form twins (line i of one matches line i of the "
                              "other): use them as the reference pairs")
    transfer_fraction: float = opt(0.75, "the harm probe must separate your sets by this fraction of its separation "
                                        "of the reference pairs")
    form_control_prompts: int = opt(100, "everyday instructions (train split, at most 180) scanned as the benign form "
                                         "control")
    seed: int = opt(0, "random seed of the bootstrap and permutations")

    def check(self) -> None:
        _at_least(self, 1, "batch_size", "n_content_bins", "query_positions")
        _at_least(self, 0, "n_bootstrap", "n_permutations", "form_control_prompts")
        _between(self, "alpha", 0, 1, closed=False)
        _between(self, "onset_fraction", 0, 1)
        _between(self, "transfer_fraction", 0, 1)
        if self.contrast not in ("form_controlled", "raw"):
            raise TraceCircuitsError(f"scan contrast must be form_controlled or raw, not '{self.contrast}' (--contrast)")


@dataclass
class FeaturesConfig:
    """Stage 2: SAE features that carry harmful semantics at the onset layer."""

    layer: Optional[int] = opt(None, "layer of the SAE analysed (default: the onset layer, else the nearest SAE after)")
    alpha: float = opt(0.05, "false-discovery rate")
    min_effect_size: float = opt(0.5, "minimum Cohen's d")
    max_benign_fire_rate: float = opt(0.2, "reject features firing on more benign prompts than this")
    relative_fire_threshold: float = opt(0.2, "a feature fires on a prompt above this fraction of its largest "
                                              "activation")
    batch_size: int = opt(16, "prompts per forward pass")
    n_examples: int = opt(5, "top-activating prompts kept per feature")

    def check(self) -> None:
        _at_least(self, 1, "batch_size")
        _at_least(self, 0, "n_examples", "min_effect_size")
        _between(self, "alpha", 0, 1, closed=False)
        _between(self, "max_benign_fire_rate", 0, 1)
        _between(self, "relative_fire_threshold", 0, 1)


@dataclass
class TraceConfig:
    """Stage 3: feature influence scores, the circuit, pruning and the nodes to suppress."""

    n_prompts: int = opt(48, "harmful prompts the interventions run on")
    n_candidates: int = opt(50, "downstream nodes (top by attribution) measured exactly for chain links")
    max_sources: int = opt(16, "at most this many source features")
    batch_size: int = opt(8, "prompts per forward pass")
    copies_per_pass: int = opt(16, "ablations stacked along the batch in one forward pass")
    prune_cumulative: float = opt(0.8, "keep the most influential nodes holding this fraction of the influence")
    prune_threshold: Optional[float] = opt(None, "keep links with |weight| >= this instead of --prune-cumulative")
    min_readout_effect: float = opt(0.01, "suppress downstream nodes whose zero-out lowers the readout by more than "
                                          "this fraction of the harmful-benign gap")
    suppress: str = opt("feature,head", "kinds of downstream nodes the hook set cuts (feature, head, mlp)")

    def check(self) -> None:
        _at_least(self, 1, "n_prompts", "n_candidates", "max_sources", "batch_size", "copies_per_pass")
        _between(self, "prune_cumulative", 0, 1)
        if self.prune_threshold is not None and self.prune_threshold < 0:
            raise TraceCircuitsError(f"--prune-threshold must be >= 0, got {self.prune_threshold}")
        bad = [k for k in self.suppress.split(",") if k.strip() not in ("feature", "head", "mlp")]
        if bad:
            raise TraceCircuitsError(f"--suppress takes feature, head and/or mlp, not {', '.join(bad)}")


@dataclass
class GateConfig:
    """When the hook set's cuts act."""

    kind: str = opt("prompt", "'prompt': a probe decides once at the end of the user's turn; 'features': the source "
                              "features open it where they fire", choices=("prompt", "features"))
    layer: Optional[int] = opt(None, "layer the prompt gate reads (default: the best of the onset layer and the "
                                     "--gate-search layers before it)")
    search: int = opt(3, "with no --gate-layer, the prompt gate is fitted at the onset layer and this many layers "
                         "before it, and reads the one with the highest out-of-fold harmful coverage at the benign "
                         "rate (0: the onset layer)")
    benign_rate: float = opt(0.02, "the gate may open on at most this fraction of benign calibration sequences")
    text_docs: int = opt(200, "benign corpus documents added to the gate calibration (0: prompts only)")
    templates: str = opt("all", "attack templates the calibration requests are also asked under, so the gate learns "
                                "intent rather than framing (all, none, or comma-separated names)")
    passes: int = opt(2, "how many templated copies of each calibration request (round-robin over the templates)")
    hard_negatives: bool = opt(True, "add the built-in hard negatives (train split) to the benign calibration set")
    pool: str = opt("turn", "what the prompt gate reads: 'turn' (the mean residual over the last user turn up to "
                            "its end: the whole request, no system prompt or earlier turns), 'mean' (the same over "
                            "the whole prompt) or 'last' (the residual at the end of the turn only; see the README)",
                    choices=("last", "mean", "turn"))
    l2: float = opt(0.02, "L2 strength of the prompt gate's logistic probe (the dial between harmful coverage and "
                          "benign rate; see the README)")
    l2_search: str = opt("0.1", "more L2 strengths the probe may take (comma-separated, each > 0; '' none): the "
                                "calibration keeps the layer and strength, this or --gate-l2, with the highest "
                                "out-of-fold harmful coverage at the benign rate")
    message_rate: float = opt(0.005, "a 'turn' gate also reads every stretch of the user's message (a reading an "
                                     "adversarial suffix cannot lower) and opens on it at this benign rate, within "
                                     "--gate-benign-rate (0: off; other pools: off)")
    message_min_tokens: int = opt(8, "that reading's stretches hold at least this many message tokens")
    message_reading: str = opt("sentence", "'sentence': every whole sentence of the message, and runs of them (a "
                                           "request behind a preamble read on its own; hook set format 11); 'span': "
                                           "every stretch; 'prefix': its running means from the start only",
                               choices=("sentence", "span", "prefix"))
    message_search: str = opt("0.01,0.02", "more rates the message reading may take (comma-separated, each at most "
                                           "--gate-benign-rate; '' none): the calibration keeps the rate, this or "
                                           "--gate-message-rate, whose worst attack template has the highest "
                                           "out-of-fold harmful coverage")
    perplexity_window: int = opt(8, "a 'prompt' gate also opens, from the answer's second token on, where some run of "
                                    "this many message tokens is this surprising to the model (optimised attack "
                                    "strings; 0: off)")
    perplexity_rate: float = opt(0.0, "that reading's threshold: the highest surprisal of the benign calibration "
                                      "requests (0), or their 1 - rate quantile")
    perplexity_tokens: str = opt("novel", "the message tokens that reading scores: 'novel' (those that do not occur "
                                          "earlier in the message, so repeated filler cannot lower it) or 'all'",
                                 choices=("novel", "all"))

    def message_rates(self) -> list[float]:
        """The message reading's candidate rates: ``message_rate`` then ``message_search``'s, each in (0, benign_rate]
        (``message_rate`` 0: off, no search)."""
        more = _comma_floats(self.message_search, "--gate-message-search takes rates", "0.01,0.02")
        if not all(0 < r <= self.benign_rate for r in more):
            raise TraceCircuitsError(f"--gate-message-search rates must lie in (0, --gate-benign-rate "
                                     f"{self.benign_rate}], got {self.message_search!r}")
        return [self.message_rate] + ([r for r in more if r != self.message_rate] if self.message_rate > 0 else [])

    def l2_values(self) -> list[float]:
        """The probe's candidate L2 strengths: ``l2`` then ``l2_search``'s, each > 0."""
        more = _comma_floats(self.l2_search, "--gate-l2-search takes strengths", "0.1,0.2")
        if not all(r > 0 and math.isfinite(r) for r in more):
            raise TraceCircuitsError(f"--gate-l2-search strengths must be > 0, got {self.l2_search!r}")
        return [self.l2] + [r for r in dict.fromkeys(more) if r != self.l2]

    def check(self) -> None:
        from trace_circuits.evaluate.attacks import ATTACKS

        _between(self, "benign_rate", 0, 1, hi_open=True)
        _at_least(self, 1, "message_min_tokens")
        if not 0 <= self.message_rate <= self.benign_rate:
            raise TraceCircuitsError(f"--gate-message-rate must lie in [0, --gate-benign-rate {self.benign_rate}], got "
                                     f"{self.message_rate}")
        _at_least(self, 0, "text_docs", "passes", "search", "perplexity_window")
        _between(self, "perplexity_rate", 0, 1, hi_open=True)
        self.message_rates()
        if not self.l2 > 0:
            raise TraceCircuitsError(f"--gate-l2 must be > 0, got {self.l2}")
        self.l2_values()
        bad = [t for t in self.templates.split(",") if t.strip() not in ATTACKS] \
            if self.templates not in ("all", "none") else []
        if bad:
            raise TraceCircuitsError(f"--gate-templates takes all, none or {', '.join(ATTACKS)}, not {', '.join(bad)}")
        if self.layer is not None and self.layer < 0:
            raise TraceCircuitsError(f"--gate-layer must be >= 0, got {self.layer}")


@dataclass
class HookSetConfig:
    """What the exported hook set does once its gate opens."""

    action: str = opt("steer", "'zero': sever the traced chains (the paper's operation); 'reroute': also steer "
                               "toward the model's own refusal; 'steer' (default): only steer, no cut (on SmolLM2 "
                               "the same DSR as reroute with real refusals instead of broken text; README)",
                      choices=("zero", "reroute", "steer"))
    gated_sources: bool = opt(True, "cut the source features only behind the gate")
    steer_strength: float = opt(0.4, "reroute/steer: steer by this multiple of the refusal-compliance gap at each "
                                     "layer")

    def check(self) -> None:
        if not 0 <= self.steer_strength <= 10:
            raise TraceCircuitsError(f"--hookset-steer-strength must be in [0, 10], got {self.steer_strength}")


@dataclass
class EvaluationConfig:
    """Stage 4: defense success and utility on held-out prompts, against the baselines."""

    templates: str = opt("all", "attack templates, comma-separated (direct, prefix_injection, role_play, "
                                "refusal_suppression, hypothetical, prefill, multi_turn) or all")
    baselines: str = opt(ALL_BASELINES, "baselines: all, none, or comma-separated names")
    max_new_tokens: int = opt(24, "tokens per answer")
    batch_size: int = opt(50, "prompts per generate call")
    text_docs: int = opt(48, "held-out benign corpus documents for the KL on text")
    limit: Optional[int] = opt(None, "use at most this many test prompts of each set")
    harmful: Optional[str] = opt(None, "held-out harmful prompts file, or a built-in set such as "
                                       "builtin:harmbench:test; default: the built-in harmful test split")
    benign: Optional[str] = opt(None, "held-out benign prompts file; default: the built-in benign test split")
    hard_negatives: bool = opt(True, "also measure over-refusal on the built-in hard negatives (test split)")
    generation_dtype: str = opt("auto", "the transformers model's dtype while the evaluation generates and measures: "
                                        "auto = bfloat16 where the device computes it natively (a CPU with AVX-512 "
                                        "BF16 or AMX, a bf16 GPU; 2.3x faster on SmolLM2), else float32",
                                choices=("auto", "float32", "bfloat16", "float16"))

    def check(self) -> None:
        from trace_circuits.evaluate.attacks import ATTACKS
        from trace_circuits.evaluate.baselines import BASELINE_NAMES

        _at_least(self, 1, "max_new_tokens", "batch_size")
        _at_least(self, 0, "text_docs")
        if self.limit is not None and self.limit < 2:
            raise TraceCircuitsError("--limit must be at least 2")
        names = [t.strip() for t in self.templates.split(",") if t.strip()]
        bad = [t for t in names if t not in ATTACKS] if self.templates != "all" else []
        if bad or not names:
            raise TraceCircuitsError(f"--templates takes all or {', '.join(ATTACKS)}, not {', '.join(bad) or 'nothing'}")
        names = [b.strip() for b in self.baselines.split(",") if b.strip()]
        bad = [b for b in names if b not in BASELINE_NAMES] if self.baselines not in ("all", "none") else []
        if bad:
            raise TraceCircuitsError(f"--baselines takes all, none or {', '.join(BASELINE_NAMES)}, not {', '.join(bad)}")


STAGE_CONFIGS = {"scan": ScanConfig, "features": FeaturesConfig, "trace": TraceConfig, "gate": GateConfig,
                 "hookset": HookSetConfig, "evaluation": EvaluationConfig}


@dataclass
class RunConfig:
    """Everything that defines a run: the model, the prompts, the SAEs, and each stage's settings."""

    model: str = opt("smollm2-135m-instruct", "model name (offline: smollm2-135m-instruct, qwen2.5-coder-0.5b-instruct,"
                                              " gemma-3-270m; or a locally cached TransformerLens name)")
    device: str = opt("auto", "auto (CUDA when present), cpu, cuda or cuda:N")
    dtype: str = opt("float32", "weights and activations dtype", choices=("float32", "float16", "bfloat16"))
    harmful: Optional[str] = opt(None, "harmful prompts (.txt, .jsonl or .csv); default: the built-in harmful set")
    benign: Optional[str] = opt(None, "benign prompts (.txt, .jsonl or .csv); default: the built-in benign set")
    split: str = opt("train", "split of the built-in prompts used when no file is given",
                     choices=("train", "test", "all"))
    column: Optional[str] = opt(None, "column holding the prompt in .jsonl/.csv files (auto-detected)")
    limit: Optional[int] = opt(None, "use at most this many prompts of each set")
    chat: bool = opt(True, "apply the chat template (--no-chat for base models)")
    saes: list = opt([], "an SAE: a hook point of a shipped SAE, an SAE-Lens folder, or RELEASE:SAE_ID; repeatable "
                         "(default: the shipped SAEs of the model)", flag="sae")
    scan: ScanConfig = field(default_factory=ScanConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    trace: TraceConfig = field(default_factory=TraceConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    hookset: HookSetConfig = field(default_factory=HookSetConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)

    def check(self) -> "RunConfig":
        """Every setting in range (one error line naming the option), before any model is loaded."""
        from trace_circuits.models import resolve_device, resolve_dtype

        resolve_device(self.device)
        resolve_dtype(self.dtype)
        if self.limit is not None and self.limit < 2:
            raise TraceCircuitsError("--limit must be at least 2")
        for name in STAGE_CONFIGS:
            getattr(self, name).check()
        return self

    def to_json(self) -> dict:
        return {"kind": "trace-circuits run config", "format_version": FORMAT_VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_json(cls, data: dict, where: str = "config.json") -> "RunConfig":
        from trace_circuits.results import check_format

        check_format(data, "trace-circuits run config", FORMAT_VERSION, where, "write one with `trace-circuits run`")
        body = {k: v for k, v in data.items() if k not in ("kind", "format_version")}
        if isinstance(body.get("evaluation"), dict) and "generation_dtype" not in body["evaluation"]:
            # written before the field existed: those evaluations generated in float32
            body["evaluation"] = {**body["evaluation"], "generation_dtype": "float32"}
        g = body.get("gate")
        if isinstance(g, dict) and "message_rate" not in g:  # written before the span reading: what those runs did
            rest = {k: v for k, v in g.items() if k not in ("prefix_rate", "prefix_min_tokens")}
            body["gate"] = g = {**rest, "message_rate": g.get("prefix_rate", 0.0), "message_reading": "prefix",
                                "message_min_tokens": g.get("prefix_min_tokens", 8)}
        if isinstance(g, dict) and "message_search" not in g:  # written before the rate search: one rate
            body["gate"] = {**g, "message_search": ""}
        if isinstance(body.get("gate"), dict) and "l2_search" not in body["gate"]:  # before the search: one strength
            body["gate"] = {**body["gate"], "l2_search": ""}
        if isinstance(g, dict) and "perplexity_window" not in g:  # written before the fluency reading
            body["gate"] = {**body["gate"], "perplexity_window": 0}
        if isinstance(body.get("gate"), dict) and "perplexity_tokens" not in body["gate"]:  # written before the field
            body["gate"] = {**body["gate"], "perplexity_tokens": "all"}
        try:
            return _build(cls, body, where)
        except TypeError as err:
            raise TraceCircuitsError(f"{where}: {err}; fix the field or write a new config with `trace-circuits run`") \
                from None


def _option(cfg, name: str) -> str:
    """The option that sets ``name``: e.g. ``--batch-size (--eval-batch-size in run)``."""
    f = next(f for f in dataclasses.fields(cfg) if f.name == name)
    flag = (f.metadata.get("flag") or name).replace("_", "-")
    always = {"GateConfig": "gate-", "HookSetConfig": "hookset-"}.get(type(cfg).__name__)
    if always:
        return f"--{always}{flag}"
    in_run = {"ScanConfig": "scan-", "FeaturesConfig": "features-", "TraceConfig": "trace-",
              "EvaluationConfig": "eval-"}.get(type(cfg).__name__)
    return f"--{flag} (--{in_run}{flag} in run)" if in_run else f"--{flag}"


def _comma_floats(text: str, what: str, example: str) -> list[float]:
    """The numbers of a comma-separated option (blanks skipped); not a number: one line, ``{what} separated by
    commas, e.g. {example}``."""
    try:
        return [float(r) for r in text.split(",") if r.strip()]
    except ValueError:
        raise TraceCircuitsError(f"{what} separated by commas, e.g. {example}, not {text!r}") from None


def _at_least(cfg, low, *names) -> None:
    for n in names:
        v = getattr(cfg, n)
        if v < low:
            raise TraceCircuitsError(f"{_option(cfg, n)} must be at least {low}, got {v}")


def _between(cfg, name, lo, hi, closed: bool = True, hi_open: bool = False) -> None:
    v = getattr(cfg, name)
    ok = (lo < v < hi) if not closed else (lo <= v < hi) if hi_open else (lo <= v <= hi)
    if not ok:
        shape = f"({lo}, {hi})" if not closed else f"[{lo}, {hi})" if hi_open else f"[{lo}, {hi}]"
        raise TraceCircuitsError(f"{_option(cfg, name)} must be in {shape}, got {v}")


def _build(cls, data: dict, where: str):
    """A config dataclass from a dict, nested configs included; unknown keys are refused by name."""
    if not isinstance(data, dict):
        raise TraceCircuitsError(f"{where}: expected a JSON object for {cls.__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise TraceCircuitsError(f"{where}: unknown field(s) {unknown} in {cls.__name__} (misspelt?); known: "
                                 f"{', '.join(sorted(names))}")
    kw = {}
    for k, v in data.items():
        t = hints[k]
        kw[k] = _build(t, v, f"{where}.{k}") if dataclasses.is_dataclass(t) else _check_type(v, t, f"{where}.{k}")
    return cls(**kw)


def _check_type(v: Any, t, where: str):
    base = [a for a in typing.get_args(t) if a is not type(None)] or [t]
    kind = base[0]
    if v is None and type(None) in typing.get_args(t):
        return None
    ok = {int: lambda x: isinstance(x, int) and not isinstance(x, bool),
          float: lambda x: isinstance(x, (int, float)) and not isinstance(x, bool),
          bool: lambda x: isinstance(x, bool), str: lambda x: isinstance(x, str),
          list: lambda x: isinstance(x, list)}.get(kind, lambda x: True)
    if not ok(v):
        raise TraceCircuitsError(f"{where} must be {getattr(kind, '__name__', kind)}, got {v!r}")
    return float(v) if kind is float else v
