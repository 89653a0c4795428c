"""``trace-circuits``: the command line. Every subcommand has ``--help``; user mistakes print one ``error:`` line."""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path
from typing import Optional, Sequence

from trace_circuits.errors import TraceCircuitsError


def _add_model_args(p: argparse.ArgumentParser) -> None:
    from trace_circuits.models import DEFAULT_MODEL, available_models

    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"model name (offline: {', '.join(available_models())}; or a locally cached "
                        f"TransformerLens name). Default: {DEFAULT_MODEL}")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N. Default: auto")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="weights and activations dtype. Default: float32")


def _add_prompt_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--harmful", default=None,
                   help="harmful prompts (.txt one per line, .jsonl or .csv). Default: built-in harmful set")
    p.add_argument("--benign", default=None,
                   help="benign prompts (.txt, .jsonl or .csv). Default: built-in benign set")
    p.add_argument("--split", default="train", choices=["train", "test", "all"],
                   help="split of the built-in prompts used when a file is not given. Default: train")
    p.add_argument("--column", default=None, help="column holding the prompt in .jsonl/.csv files (auto-detected)")
    p.add_argument("--limit", type=int, default=None, help="use at most this many prompts of each set")
    p.add_argument("--no-chat", action="store_true", help="do not apply the chat template (base models)")


def _add_trace_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--n-prompts", type=int, default=48, help="harmful prompts the interventions run on. Default: 48")
    p.add_argument("--n-candidates", type=int, default=50,
                   help="downstream nodes (top by attribution) measured exactly for chain links. Default: 50")
    p.add_argument("--max-sources", type=int, default=16, help="at most this many source features. Default: 16")
    p.add_argument("--prune-cumulative", type=float, default=0.8,
                   help="keep the strongest links holding this fraction of total |weight|. Default: 0.8")
    p.add_argument("--prune-threshold", type=float, default=None,
                   help="keep links with |weight| >= this instead of --prune-cumulative")
    p.add_argument("--min-readout-effect", type=float, default=0.01,
                   help="suppress downstream nodes whose zero-out lowers the readout by more than this fraction of "
                        "the harmful-benign gap. Default: 0.01")
    p.add_argument("--suppress", default="feature,head",
                   help="kinds of downstream nodes the hook set cuts (feature, head, mlp). Default: feature,head")
    p.add_argument("--gate", default="prompt", choices=["prompt", "features"],
                   help="when the cuts act: 'prompt' = a harmful-vs-benign probe decides once at the end of the prompt "
                        "and the cuts act on the answer; 'features' = from the first position where the source "
                        "features fire. Default: prompt")
    p.add_argument("--gate-layer", type=int, default=None,
                   help="layer of the prompt gate's probe. Default: the onset layer")
    p.add_argument("--benign-gate-rate", type=float, default=0.02,
                   help="the gate may open on at most this fraction of the benign prompts and texts. Default: 0.02")
    p.add_argument("--gate-text-docs", type=int, default=200,
                   help="benign documents (SAE corpus train split, 128 tokens) added to the gate calibration; 0 for "
                        "prompts only. Default: 200")


RUN_BASELINES = "top_feature,onset_features,direction_ablation,direction_addition,layer_ablation"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trace-circuits",
        description="TraceRouter as a toolkit: find where harmful and benign prompts split inside a chat model.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    scan = sub.add_parser("scan", help="stage 1: attention divergence per layer/head and the sensitive onset layer",
                          description="Attention divergence between harmful and benign prompts (JSD of segment-"
                                      "attention profiles per layer and head), bootstrap CIs, permutation test, and "
                                      "the sensitive onset layer. Writes OUT/divergence.json and OUT/divergence.html.")
    _add_model_args(scan)
    _add_prompt_args(scan)
    scan.add_argument("--out", default="runs/scan", help="output folder. Default: runs/scan")
    scan.add_argument("--batch-size", type=int, default=16, help="prompts per forward pass. Default: 16")
    scan.add_argument("--query-positions", type=int, default=1,
                      help="average attention over this many final positions. Default: 1")
    scan.add_argument("--content-bins", type=int, default=8, help="slices of the user's text. Default: 8")
    scan.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for CIs. Default: 1000")
    scan.add_argument("--permutations", type=int, default=1000, help="label permutations for p-values. Default: 1000")
    scan.add_argument("--alpha", type=float, default=0.05, help="significance level (BH over layers). Default: 0.05")
    scan.add_argument("--onset-fraction", type=float, default=0.5,
                      help="onset needs D[l] >= this fraction of the largest D. Default: 0.5")
    scan.add_argument("--no-attention-view", action="store_true", help="leave the circuitsvis view out of the HTML")
    scan.set_defaults(func=cmd_scan)

    run = sub.add_parser("run", help="the main job: the whole pipeline on the default model (scan, SAE features, "
                                     "circuit and hook set, evaluation, report.html)",
                         description="Run every implemented stage of TraceRouter with built-in prompts and write all "
                                     "artifacts into OUT.")
    _add_model_args(run)
    _add_prompt_args(run)
    run.add_argument("--out", default="runs/latest", help="output folder. Default: runs/latest")
    run.add_argument("--batch-size", type=int, default=16, help="prompts per forward pass. Default: 16")
    _add_trace_args(run)
    run.add_argument("--no-evaluate", action="store_true", help="stop after the hook set (skip stage 4)")
    run.add_argument("--eval-max-new-tokens", type=int, default=24,
                     help="tokens per answer in the evaluation. Default: 24")
    run.add_argument("--eval-batch-size", type=int, default=50,
                     help="prompts per generate call in the evaluation. Default: 50")
    run.add_argument("--baselines", default=RUN_BASELINES,
                     help="baselines to evaluate against: all, none, or a comma-separated subset (see `evaluate`). "
                          f"Default: {RUN_BASELINES} (gated_onset_features is left out to stay under 20 minutes)")
    run.add_argument("--text-docs", type=int, default=48,
                     help="held-out benign corpus documents for the KL and CE measures. Default: 48")
    run.set_defaults(func=cmd_run)

    corpus = sub.add_parser("build-corpus", help="rebuild the SAE training corpus (chat answers + CPython docs)",
                            description="Build the SAE training corpus: the model's own greedy chat answers to the "
                                        "built-in train prompts and generated instructions, plus CPython's reference "
                                        "docs and stdlib docstrings. Deterministic.")
    corpus.add_argument("--model", default="smollm2-135m-instruct", help="model that answers the chat prompts")
    corpus.add_argument("--out", default=None, help="corpus file (.jsonl.gz). Default: saes/corpus/MODEL.jsonl.gz")
    corpus.add_argument("--n-generated", type=int, default=1200, help="generated instructions. Default: 1200")
    corpus.add_argument("--max-new-tokens", type=int, default=64, help="answer length. Default: 64")
    corpus.add_argument("--batch-size", type=int, default=32, help="prompts per generate call. Default: 32")
    corpus.set_defaults(func=cmd_build_corpus)

    tr = sub.add_parser("train-sae", help="stage 2: train SAEs (SAE-Lens) at residual hooks, resumable",
                        description="Collect activations once for all hooks, train one TopK SAE per hook with "
                                    "SAE-Lens, evaluate on held-out text (EV, L0, CE recovered) and save into "
                                    "saes/<model>/<hook>/. Interrupted runs resume when rerun with the same "
                                    "settings and --run-dir.")
    _add_model_args(tr)
    tr.add_argument("--hook", action="append", dest="hooks", default=None,
                    help="hook point, repeatable (e.g. blocks.21.hook_resid_post). Default: blocks.21.hook_resid_post")
    tr.add_argument("--layers", default=None, help="shorthand: comma-separated layers for hook_resid_post, e.g. 21,23,25,27")
    tr.add_argument("--corpus", default=None, help="corpus file. Default: saes/corpus/MODEL.jsonl.gz")
    tr.add_argument("--d-sae", type=int, default=2304, help="dictionary size. Default: 2304 (4 x d_model)")
    tr.add_argument("--k", type=int, default=64, help="active features per token (TopK). Default: 64")
    tr.add_argument("--max-corpus-tokens", type=int, default=600_000, help="unique tokens. Default: 600000")
    tr.add_argument("--training-samples", type=int, default=2_500_000, help="activations seen. Default: 2500000")
    tr.add_argument("--batch-size", type=int, default=4096, help="SAE batch (tokens). Default: 4096")
    tr.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate. Default: 1e-3")
    tr.add_argument("--run-dir", default="runs/train-sae", help="activations and checkpoints. Default: runs/train-sae")
    tr.add_argument("--out-root", default=None, help="where SAEs are saved. Default: the repository's saes/")
    tr.set_defaults(func=cmd_train_sae)

    fe = sub.add_parser("features", help="stage 2: SAE features that carry harmful semantics",
                        description="Differential activation analysis of a shipped SAE's features on harmful vs "
                                    "benign prompts (mean and firing-rate differences, Cohen's d, Mann-Whitney U with "
                                    "BH false-discovery control, benign-firing rejection). Writes OUT/features.json "
                                    "and OUT/features.html.")
    _add_model_args(fe)
    _add_prompt_args(fe)
    fe.add_argument("--hook", default=None, help="SAE hook point. Default: the onset layer of --scan, else the "
                                                 "first shipped SAE")
    fe.add_argument("--scan", default=None, help="divergence.json of a scan: use its onset layer")
    fe.add_argument("--out", default="runs/features", help="output folder. Default: runs/features")
    fe.add_argument("--batch-size", type=int, default=16, help="prompts per forward pass. Default: 16")
    fe.add_argument("--alpha", type=float, default=0.05, help="false-discovery rate. Default: 0.05")
    fe.add_argument("--min-effect-size", type=float, default=0.5, help="minimum Cohen's d. Default: 0.5")
    fe.add_argument("--max-benign-fire-rate", type=float, default=0.2,
                    help="reject features firing on more benign prompts than this. Default: 0.2")
    fe.add_argument("--relative-fire-threshold", type=float, default=0.2,
                    help="a feature fires on a prompt above this fraction of its largest activation. Default: 0.2")
    fe.set_defaults(func=cmd_features)

    tr3 = sub.add_parser("trace", help="stage 3: feature influence scores, the circuit, and the hook set that cuts it",
                         description="Zero out each malicious SAE feature at the onset layer (error term kept), "
                                     "measure the drop at downstream SAE features, heads, MLPs and a harmfulness "
                                     "readout (exact, batched), rank all nodes by attribution patching, measure chain "
                                     "links among the top nodes, prune, and export the hook set that severs the "
                                     "chains. Writes OUT/circuit.json, OUT/circuit.html, OUT/circuit_full.json and "
                                     "OUT/hookset/.")
    _add_model_args(tr3)
    _add_prompt_args(tr3)
    tr3.add_argument("--features", default=None, help="features.json from `trace-circuits features` (default: run "
                                                      "stage 2 with the SAE at the onset layer)")
    tr3.add_argument("--scan", default=None, help="divergence.json of a scan: use its onset layer")
    tr3.add_argument("--onset-layer", type=int, default=None,
                     help="onset layer (default: from --features or --scan, else the first shipped SAE layer)")
    tr3.add_argument("--out", default="runs/trace", help="output folder. Default: runs/trace")
    _add_trace_args(tr3)
    tr3.add_argument("--batch-size", type=int, default=8, help="prompts per forward pass. Default: 8")
    tr3.set_defaults(func=cmd_trace)

    gen = sub.add_parser("generate", help="answer prompts with the transformers model, with or without a hook set",
                         description="Greedy generation (batched) on the Hugging Face transformers model with the hook "
                                     "set attached as plain PyTorch forward hooks. Writes one JSON object per prompt "
                                     "(prompt, response, hookset, gate_opened) to OUT; resumes an interrupted run.")
    gen.add_argument("--model", default=None, help="model name. Default: the hook set's model, else "
                                                   "smollm2-135m-instruct")
    gen.add_argument("--hookset", default=None, help="hook set folder (from `trace-circuits trace`)")
    gen.add_argument("--no-hookset", action="store_true", help="generate without the hook set (the baseline)")
    gen.add_argument("--prompts", required=True, help="prompts file (.txt one per line, .jsonl or .csv)")
    gen.add_argument("--column", default=None, help="column holding the prompt in .jsonl/.csv files (auto-detected)")
    gen.add_argument("--limit", type=int, default=None, help="answer at most this many prompts")
    gen.add_argument("--out", required=True, help="output file (.jsonl)")
    gen.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate per prompt. Default: 128")
    gen.add_argument("--batch-size", type=int, default=16, help="prompts per generate call. Default: 16")
    gen.add_argument("--sample", action="store_true", help="sample (temperature 1) instead of greedy decoding")
    gen.add_argument("--no-chat", action="store_true", help="do not apply the chat template (base models)")
    gen.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N. Default: cpu")
    gen.set_defaults(func=cmd_generate)

    ev = sub.add_parser("evaluate", help="defense success and utility of a hook set against the baselines",
                        description="Answer held-out harmful prompts (direct and under jailbreak templates) and benign "
                                    "prompts with the hook set and with each baseline (none, top feature, onset "
                                    "features with and without the gate, direction ablation/addition, layer "
                                    "ablation); judge with refusal "
                                    "substrings, a MiniLM relevance judge and a refusal logit score; measure benign "
                                    "over-refusal, next-token KL and CE change. Writes OUT/evaluation.json, "
                                    "OUT/evaluation.html and OUT/responses.jsonl.")
    ev.add_argument("--model", default=None, help="model name. Default: the hook set's model")
    ev.add_argument("--hookset", required=True, help="hook set folder (from `trace-circuits trace`)")
    ev.add_argument("--harmful", default=None, help="harmful prompts file. Default: built-in harmful test split")
    ev.add_argument("--benign", default=None, help="benign prompts file. Default: built-in benign test split")
    ev.add_argument("--column", default=None, help="column holding the prompt in .jsonl/.csv files (auto-detected)")
    ev.add_argument("--limit", type=int, default=None, help="use at most this many prompts of each set")
    ev.add_argument("--templates", default=",".join(_jailbreak_names()),
                    help="jailbreak templates, comma-separated. Default: all")
    ev.add_argument("--baselines", default="all",
                    help="baselines to run: all, none, or a comma-separated subset of top_feature, onset_features, "
                         "gated_onset_features, direction_ablation, direction_addition, layer_ablation. Default: all")
    ev.add_argument("--max-new-tokens", type=int, default=48, help="tokens per answer. Default: 48")
    ev.add_argument("--batch-size", type=int, default=32, help="prompts per generate call. Default: 32")
    ev.add_argument("--text-docs", type=int, default=48,
                    help="held-out benign corpus documents (128 tokens each) for KL and CE. Default: 48")
    ev.add_argument("--out", default="runs/evaluate", help="output folder. Default: runs/evaluate")
    ev.set_defaults(func=cmd_evaluate)

    ls = sub.add_parser("saes", help="list the shipped SAEs", description="List SAEs in saes/ with their metrics.")
    ls.add_argument("--model", default=None, help="only this model")
    ls.set_defaults(func=cmd_saes)

    models = sub.add_parser("models", help="list the models that load offline", description="List offline models.")
    models.set_defaults(func=cmd_models)
    return parser


def _load_sets(args):
    from trace_circuits.prompts import builtin_prompts, load_prompts

    def one(path: Optional[str], kind: str):
        ps = load_prompts(path, column=args.column) if path else builtin_prompts(kind, args.split)
        if args.limit is not None:
            if args.limit < 2:
                raise TraceCircuitsError("--limit must be at least 2")
            ps = ps[: args.limit]
        return ps

    return one(args.harmful, "harmful"), one(args.benign, "benign")


def _load_model(args):
    from trace_circuits.models import load_model

    t0 = time.time()
    model = load_model(args.model, device=args.device, dtype=args.dtype)
    print(f"loaded {args.model} ({model.cfg.n_layers} layers, {model.cfg.n_heads} heads) on "
          f"{next(model.parameters()).device} in {time.time() - t0:.1f}s", flush=True)
    return model


def cmd_scan(args) -> int:
    from trace_circuits.divergence import scan_attention_divergence

    harmful, benign = _load_sets(args)
    model = _load_model(args)
    result = scan_attention_divergence(
        model, harmful, benign, batch_size=args.batch_size, n_content_bins=args.content_bins,
        query_positions=args.query_positions, n_bootstrap=args.bootstrap, n_permutations=args.permutations,
        alpha=args.alpha, onset_fraction=args.onset_fraction, chat=False if args.no_chat else None,
        checkpoint_dir=Path(args.out) / ".checkpoints")
    paths = result.save(args.out, model=None if args.no_attention_view else model)
    _print_scan(result, paths)
    return 0


def _print_scan(result, paths) -> None:
    if result.onset_layer is None:
        print("no layer's attention divergence is both significant and large: no onset layer "
              "(try more prompts or a lower --onset-fraction)")
    else:
        l = result.onset_layer
        lo, hi = result.per_layer_ci[l]
        print(f"sensitive onset layer: {l}  (D = {result.per_layer[l]:.4f} bits, 95% CI [{lo:.4f}, {hi:.4f}], "
              f"q = {result.q_values[l]:.3g})")
    top = ", ".join(f"L{l}H{h} {d:.4f}" for l, h, d in result.top_heads[:5])
    print(f"most divergent heads: {top}")
    for kind, p in paths.items():
        print(f"wrote {p}")


def cmd_run(args) -> int:
    from trace_circuits.divergence import scan_attention_divergence
    from trace_circuits.features import find_harmful_features
    from trace_circuits.models import canonical_name
    from trace_circuits.viz.report import write_report
    from trace_circuits.saes import list_saes, load_sae

    _suppress_kinds(args)
    baselines = _baseline_names(args.baselines)
    if args.eval_max_new_tokens < 1 or args.eval_batch_size < 1 or args.text_docs < 1:
        raise TraceCircuitsError("--eval-max-new-tokens, --eval-batch-size and --text-docs must be at least 1")
    t_all = time.time()
    harmful, benign = _load_sets(args)
    model = _load_model(args)
    _check_gate_layer(args, model)
    out = Path(args.out)
    name = canonical_name(args.model)
    stages = (3 if args.no_evaluate else 4) if list_saes(name) else 1
    timings: dict[str, float] = {}
    parts: dict = {}

    def report():
        timings["total"] = time.time() - t_all
        print(f"wrote {write_report(out, timings=timings, **parts)}")

    t0 = time.time()
    print(f"[1/{stages}] attention-divergence scan: {len(harmful)} harmful vs {len(benign)} benign prompts", flush=True)
    result = scan_attention_divergence(model, harmful, benign, batch_size=args.batch_size,
                                       chat=False if args.no_chat else None, checkpoint_dir=out / ".checkpoints")
    _print_scan(result, result.save(out, model=model))
    parts["scan"], timings["stage 1: scan"] = result, time.time() - t0
    if stages == 1:
        print(f"no SAEs shipped for {name}: stage 2 skipped (train them with `trace-circuits train-sae`)")
        report()
        return 0
    t0 = time.time()
    hook = _sae_hook_for(name, result.onset_layer)
    print(f"[2/{stages}] SAE features at {hook} (SAE at or after the onset layer)", flush=True)
    sae = load_sae(name, hook, model=model)
    feats = find_harmful_features(model, sae, harmful, benign, hook, batch_size=args.batch_size,
                                  chat=False if args.no_chat else None)
    _print_features(feats, feats.save(out))
    if not (args.harmful or args.benign) and args.split == "train" and feats.harmful_features and not args.no_chat:
        from trace_circuits.features import heldout_auroc
        from trace_circuits.prompts import builtin_prompts

        top = feats.harmful_features[:10]
        auc = heldout_auroc(model, sae, hook, top, builtin_prompts("harmful", "test"), builtin_prompts("benign", "test"),
                            batch_size=args.batch_size)
        print(f"held-out check: the top {len(top)} harmful features separate the built-in test split "
              f"(50 harmful vs 50 benign) with AUROC {auc:.3f}")
    parts["features"], timings["stage 2: SAE features"] = feats, time.time() - t0
    if not feats.harmful_features:
        print("stage 2 selected no harmful features: stage 3 skipped")
        report()
        return 0
    t0 = time.time()
    print(f"[3/{stages}] feature influence scores, circuit and hook set", flush=True)
    circuit, hookset = _trace_and_export(model, feats, harmful, benign, out, args, batch_size=8)
    parts.update(circuit=circuit, hookset=hookset)
    timings["stage 3: FIS, circuit, hook set"] = time.time() - t0
    if stages == 4:
        t0 = time.time()
        print(f"[4/{stages}] defense evaluation on the built-in test split against the baselines", flush=True)
        from trace_circuits.prompts import builtin_prompts

        test_h, test_b = list(builtin_prompts("harmful", "test")), list(builtin_prompts("benign", "test"))
        if args.limit:
            test_h, test_b = test_h[: args.limit], test_b[: args.limit]
        parts["evaluation"] = _evaluate(hookset, name, test_h, test_b, out, baselines=baselines,
                                        max_new_tokens=args.eval_max_new_tokens, batch_size=args.eval_batch_size,
                                        text_docs=args.text_docs, model=model)
        timings["stage 4: evaluation"] = time.time() - t0
    report()
    return 0


def _evaluate(hookset, name: str, harmful, benign, out: Path, *, baselines, templates=None, max_new_tokens: int,
              batch_size: int, text_docs: int, model=None):
    """Stage 4 for `run` and `evaluate`: the hook set and ``baselines`` on the same prompts, judges and settings.

    ``model`` (the HookedTransformer the baselines are built from) is loaded only when baselines are asked for and
    none is given."""
    from trace_circuits.evaluate import JAILBREAKS, RelevanceJudge, benign_text, build_baselines, evaluate_defenses
    from trace_circuits.models import load_hf_model, load_model
    from trace_circuits.prompts import builtin_prompts

    judge = RelevanceJudge()
    hf, tok = load_hf_model(name)
    hookset.check_model(hf)
    defenses = {"tracerouter": hookset}
    if baselines:
        if model is None:
            model = load_model(name, device="cpu", progress=False)
            hookset.check_model(model)
        print(f"building baselines: {', '.join(baselines)}", flush=True)
        defenses.update(build_baselines(model, hookset, builtin_prompts("harmful", "train"),
                                        builtin_prompts("benign", "train"), names=baselines))
    result = evaluate_defenses(hf, tok, defenses, harmful, benign, templates=templates or list(JAILBREAKS),
                               max_new_tokens=max_new_tokens, batch_size=batch_size, judge=judge,
                               text=benign_text(tok, max_docs=text_docs))
    _print_evaluation(result, result.save(out))
    return result


def _print_evaluation(result, paths) -> None:
    import pandas as pd

    with pd.option_context("display.width", 220, "display.max_columns", 20):
        print(result.table.round(3).to_string())
    for kind, p in paths.items():
        print(f"wrote {p}")


def cmd_build_corpus(args) -> int:
    from trace_circuits.corpus import build_corpus
    from trace_circuits.models import canonical_name
    from trace_circuits.saes import sae_root

    name = canonical_name(args.model)
    out = args.out or sae_root() / "corpus" / f"{name}.jsonl.gz"
    build_corpus(out, model_name=name, n_generated=args.n_generated, max_new_tokens=args.max_new_tokens,
                 batch_size=args.batch_size)
    return 0


def cmd_train_sae(args) -> int:
    from trace_circuits.saes import SAETrainingConfig, train_saes

    hooks = list(args.hooks or [])
    if args.layers:
        try:
            hooks += [f"blocks.{int(l)}.hook_resid_post" for l in args.layers.split(",") if l.strip()]
        except ValueError:
            raise TraceCircuitsError(f"--layers must be comma-separated integers, not '{args.layers}'") from None
    hooks = hooks or ["blocks.21.hook_resid_post"]
    from trace_circuits.models import canonical_name
    from trace_circuits.saes import sae_root

    name = canonical_name(args.model)
    corpus = Path(args.corpus) if args.corpus else sae_root() / "corpus" / f"{name}.jsonl.gz"
    if not corpus.exists():
        raise TraceCircuitsError(f"corpus {corpus} does not exist; build it with "
                                 f"`trace-circuits build-corpus --model {name} --out {corpus}`")
    model = _load_model(args)
    from trace_circuits.models import model_info

    cfg = SAETrainingConfig(model=model_info(model).name, hooks=hooks, corpus=str(corpus),
                            d_sae=args.d_sae, k=args.k, max_corpus_tokens=args.max_corpus_tokens,
                            training_samples=args.training_samples, batch_size=args.batch_size, lr=args.lr)
    command = "trace-circuits " + " ".join(sys.argv[1:]) if sys.argv and "trace-circuits" in sys.argv[0] else ""
    train_saes(model, cfg, args.run_dir, out_root=args.out_root, command=command)
    return 0


def _sae_hook_for(model_name: str, onset: Optional[int]) -> str:
    """The shipped SAE at the onset layer, else the nearest shipped layer at or after it, else the first."""
    from trace_circuits.names import layer_of as _layer_of
    from trace_circuits.saes import list_saes

    have = sorted({_layer_of(s["hook_name"]): s["hook_name"] for s in list_saes(model_name)}.items())
    if not have:
        raise TraceCircuitsError(f"no SAEs are shipped for {model_name}; train one with `trace-circuits train-sae`")
    if onset is not None:
        later = [h for l, h in have if l >= onset]
        if later:
            return later[0]
    return have[0][1]


def cmd_features(args) -> int:
    import json

    from trace_circuits.features import find_harmful_features
    from trace_circuits.models import canonical_name
    from trace_circuits.saes import load_sae

    harmful, benign = _load_sets(args)
    name = canonical_name(args.model)
    hook = args.hook
    if hook is None:
        onset = None
        if args.scan:
            try:
                onset = json.loads(Path(args.scan).read_text())["onset_layer"]
            except (OSError, ValueError, KeyError):
                raise TraceCircuitsError(f"--scan {args.scan} is not a divergence.json; run `trace-circuits scan` "
                                         "first") from None
        hook = _sae_hook_for(name, onset)
    sae = load_sae(name, hook)
    model = _load_model(args)
    result = find_harmful_features(model, sae, harmful, benign, hook, batch_size=args.batch_size,
                                   chat=False if args.no_chat else None, alpha=args.alpha,
                                   min_effect_size=args.min_effect_size, max_benign_fire_rate=args.max_benign_fire_rate,
                                   relative_fire_threshold=args.relative_fire_threshold)
    paths = result.save(args.out)
    _print_features(result, paths)
    return 0


def _print_features(result, paths) -> None:
    feats = result.harmful_features
    print(f"{len(feats)} harmful features at {result.hook_name} (of {len(result.table)}): {result.rule}")
    for f in feats[:10]:
        row = result.table.loc[f]
        toks = ", ".join(repr(t) for t, _ in (result.examples.get(f, {}).get("top_tokens") or [])[:3])
        print(f"  F{f:<5d} d={row['effect_size']:.2f}  fires harmful {row['fire_rate_harmful']:.0%} / benign "
              f"{row['fire_rate_benign']:.0%}  top tokens: {toks}")
    for kind, p in paths.items():
        print(f"wrote {p}")


def _onset_from(args, name: str) -> Optional[int]:
    import json

    if getattr(args, "onset_layer", None) is not None:
        return args.onset_layer
    if args.scan:
        try:
            return json.loads(Path(args.scan).read_text())["onset_layer"]
        except (OSError, ValueError, KeyError):
            raise TraceCircuitsError(f"--scan {args.scan} is not a divergence.json; run `trace-circuits scan` "
                                     "first") from None
    return None


def _suppress_kinds(args) -> list[str]:
    """Check the stage-3 options before any model is loaded."""
    kinds = [k.strip() for k in args.suppress.split(",") if k.strip()]
    bad = [k for k in kinds if k not in ("feature", "head", "mlp")]
    if bad:
        raise TraceCircuitsError(f"--suppress takes feature, head and/or mlp, not {', '.join(bad)}")
    if args.n_prompts < 1 or args.n_candidates < 1 or args.max_sources < 1:
        raise TraceCircuitsError("--n-prompts, --n-candidates and --max-sources must be at least 1")
    if not 0 <= args.benign_gate_rate < 1:
        raise TraceCircuitsError(f"--benign-gate-rate must be in [0, 1), got {args.benign_gate_rate}")
    if args.gate_text_docs < 0:
        raise TraceCircuitsError("--gate-text-docs must be 0 or more")
    if args.prune_threshold is None and not 0 < args.prune_cumulative <= 1:
        raise TraceCircuitsError(f"--prune-cumulative must be in (0, 1], got {args.prune_cumulative}")
    return kinds


def _check_gate_layer(args, model) -> None:
    if args.gate_layer is not None and not 0 <= args.gate_layer < model.cfg.n_layers:
        raise TraceCircuitsError(f"gate layer {args.gate_layer} is outside the model (0..{model.cfg.n_layers - 1}); "
                                 "pass --gate-layer within it or leave it out")


def _trace_and_export(model, features, harmful, benign, out: Path, args, batch_size: int) -> tuple:
    """Stage 3 as the CLI runs it: trace, prune, choose the nodes to suppress, export the hook set."""
    from trace_circuits.hooks import hookset_from_circuit
    from trace_circuits.influence import load_downstream_saes, trace_circuit
    from trace_circuits.names import layer_of as _layer_of

    onset = _layer_of(features.hook_name)
    saes = load_downstream_saes(model, onset)
    chat = False if args.no_chat else None
    full = trace_circuit(model, features, harmful, benign, saes=saes, n_prompts=args.n_prompts,
                         n_candidates=args.n_candidates, max_sources=args.max_sources, batch_size=batch_size, chat=chat)
    if args.prune_threshold is not None:
        circuit = full.prune(threshold=args.prune_threshold)
    else:
        circuit = full.prune(cumulative=args.prune_cumulative)
    circuit = circuit.sever(circuit.harmful_path_nodes(args.min_readout_effect, kinds=["source", *_suppress_kinds(args)]))
    command = "trace-circuits " + " ".join(sys.argv[1:]) if sys.argv and "trace-circuits" in sys.argv[0] else ""
    from trace_circuits.evaluate import benign_text

    text = benign_text(model.tokenizer, max_docs=args.gate_text_docs, split="train") if args.gate_text_docs else None
    hookset = hookset_from_circuit(circuit, model, saes, harmful, benign, benign_gate_rate=args.benign_gate_rate,
                                   chat=chat, progress=True, provenance={"command": command}, benign_text=text,
                                   gate=args.gate, gate_layer=args.gate_layer)
    paths = circuit.save(out)
    from trace_circuits._io import write_json_atomic

    paths["full"] = write_json_atomic(out / "circuit_full.json", full.to_json())
    paths["hookset"] = hookset.save(out / "hookset")
    m = full.meta
    print(f"FIS from {len(m['sources'])} source features at layer {onset} on {m['n_prompts']} harmful prompts; "
          f"{m['n_candidates']} downstream nodes measured exactly ({m['seconds']['total']:.0f}s)")
    rho = m.get("attribution_spearman_top")
    print(f"attribution patching vs exact zero-out, top {m['attribution_spearman_top_n']} nodes: Spearman "
          f"{rho:.3f}" if rho is not None else "attribution vs exact: too few nodes for a rank correlation")
    print(f"pruned circuit: {len(circuit.nodes)} nodes, {len(circuit.links)} links; suppressing "
          f"{len(circuit.severed_nodes)} nodes severs {sum(l.severed for l in circuit.links)} links")
    g = hookset.provenance["gate_calibration"]
    where = f"prompt gate at layer {g['layer']}" if g.get("gate") == "prompt" else "feature gate"
    print(f"{hookset.summary()}; {where} opens on {g['gate_rate_harmful']:.0%} of harmful prompts and "
          f"{g['gate_rate_benign']:.0%} of benign calibration sequences ({g['n_benign']} prompts + "
          f"{g['n_benign_text']} documents), AUROC {g['gate_score_auroc']:.3f}")
    for kind, p in paths.items():
        print(f"wrote {p}")
    return circuit, hookset


def cmd_trace(args) -> int:
    import json

    from trace_circuits.features import FeatureResult, find_harmful_features
    from trace_circuits.models import canonical_name
    from trace_circuits.saes import load_sae

    _suppress_kinds(args)
    harmful, benign = _load_sets(args)
    name = canonical_name(args.model)
    features = None
    if args.features:
        try:
            features = FeatureResult.from_json(json.loads(Path(args.features).read_text()))
        except (OSError, ValueError, KeyError) as err:
            raise TraceCircuitsError(f"--features {args.features} is not a features.json ({err}); run "
                                     "`trace-circuits features` first") from None
        if features.model and features.model != name:
            raise TraceCircuitsError(f"--features was made for {features.model}, not {name}; use --model "
                                     f"{features.model} or rerun `trace-circuits features`")
    model = _load_model(args)
    _check_gate_layer(args, model)
    if features is None:
        hook = _sae_hook_for(name, _onset_from(args, name))
        print(f"stage 2 first: harmful SAE features at {hook}", flush=True)
        features = find_harmful_features(model, load_sae(name, hook, model=model), harmful, benign, hook,
                                         chat=False if args.no_chat else None)
        _print_features(features, features.save(args.out))
    _trace_and_export(model, features, harmful, benign, Path(args.out), args, args.batch_size)
    return 0


def cmd_generate(args) -> int:
    import json

    from trace_circuits.generation import generate_responses
    from trace_circuits.hooks import load_hookset
    from trace_circuits.models import DEFAULT_MODEL, canonical_name, load_hf_model
    from trace_circuits.prompts import load_prompts

    if not args.hookset and not args.no_hookset:
        raise TraceCircuitsError("pass --hookset DIR (from `trace-circuits trace`) or --no-hookset for the baseline")
    hookset = load_hookset(args.hookset) if args.hookset and not args.no_hookset else None
    name = canonical_name(args.model or (hookset.model if hookset else DEFAULT_MODEL))
    prompts = list(load_prompts(args.prompts, column=args.column))
    if args.limit is not None:
        prompts = prompts[: max(1, args.limit)]
    t0 = time.time()
    model, tokenizer = load_hf_model(name, device=args.device)
    print(f"loaded {name} (transformers) in {time.time() - t0:.1f}s", flush=True)
    if hookset is not None:
        hookset.check_model(model)
        print(hookset.summary(), flush=True)
    t0 = time.time()
    rows = generate_responses(model, tokenizer, prompts, hookset, max_new_tokens=args.max_new_tokens,
                              batch_size=args.batch_size, chat=not args.no_chat, do_sample=args.sample, out=args.out)
    n_gate = sum(r["gate_opened"] for r in rows)
    print(f"{len(rows)} responses in {time.time() - t0:.1f}s" + (f"; the gate opened on {n_gate}" if hookset else ""))
    for r in rows[:3]:
        print(json.dumps({"prompt": r["prompt"][:80], "response": r["response"][:160]}))
    print(f"wrote {args.out}")
    return 0


def _jailbreak_names() -> list[str]:
    from trace_circuits.evaluate import JAILBREAKS

    return list(JAILBREAKS)


def _baseline_names(spec: str) -> list[str]:
    from trace_circuits.evaluate import BASELINE_NAMES as BASELINES

    wanted = list(BASELINES) if spec == "all" else [] if spec == "none" else \
        [b.strip() for b in spec.split(",") if b.strip()]
    bad = [b for b in wanted if b not in BASELINES]
    if bad:
        raise TraceCircuitsError(f"--baselines takes all, none or {', '.join(BASELINES)}, not {', '.join(bad)}")
    return wanted


def cmd_evaluate(args) -> int:
    from trace_circuits.evaluate import JAILBREAKS
    from trace_circuits.hooks import load_hookset
    from trace_circuits.models import canonical_name
    from trace_circuits.prompts import builtin_prompts, load_prompts

    templates = [t.strip() for t in args.templates.split(",") if t.strip()]
    bad = [t for t in templates if t not in JAILBREAKS]
    if bad or not templates:
        raise TraceCircuitsError(f"--templates takes {', '.join(JAILBREAKS)}, not {', '.join(bad) or 'nothing'}")
    wanted = _baseline_names(args.baselines)
    if args.max_new_tokens < 1 or args.batch_size < 1:
        raise TraceCircuitsError("--max-new-tokens and --batch-size must be at least 1")
    hookset = load_hookset(args.hookset)
    name = canonical_name(args.model or hookset.model)

    def one(path, kind):
        ps = list(load_prompts(path, column=args.column)) if path else list(builtin_prompts(kind, "test"))
        return ps[: args.limit] if args.limit else ps

    harmful, benign = one(args.harmful, "harmful"), one(args.benign, "benign")
    if args.text_docs < 1:
        raise TraceCircuitsError("--text-docs must be at least 1")
    _evaluate(hookset, name, harmful, benign, Path(args.out), baselines=wanted, templates=templates,
              max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, text_docs=args.text_docs)
    return 0


def cmd_saes(args) -> int:
    from trace_circuits.saes import list_saes

    rows = list_saes(args.model)
    if not rows:
        print("no SAEs found; train one with `trace-circuits train-sae`")
    for r in rows:
        print(f"{r['model']:24s} {r['hook_name']:28s} d_sae {r['d_sae']:>6}  EV {r['explained_variance']:.3f}  "
              f"L0 {r['l0']:.1f}  CE recovered {r['ce_loss_recovered']:.3f}  {r['path']}")
    return 0


def cmd_models(args) -> int:
    from trace_circuits.models import MODELS, is_installed

    for name, spec in MODELS.items():
        status = "installed" if is_installed(name) else f"not installed ({spec.file.install})"
        print(f"{name:24s} {spec.hf_name:40s} {status}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    warnings.simplefilter("ignore", category=FutureWarning)
    try:
        return args.func(args)
    except TraceCircuitsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
