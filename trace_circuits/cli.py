"""``trace-circuits``: the command line, a thin layer over :class:`trace_circuits.pipeline.Run`.

Options come from the config dataclasses (:mod:`trace_circuits.config`), so defaults are written once. Every
subcommand has ``--help``; user mistakes print one ``error:`` line and exit with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
import warnings
from pathlib import Path
from typing import Optional, Sequence

from trace_circuits.config import (
    EvaluationConfig,
    FeaturesConfig,
    GateConfig,
    HookSetConfig,
    RunConfig,
    ScanConfig,
    TraceConfig,
    add_options,
    from_options,
)
from trace_circuits.errors import FormWarning, TraceCircuitsError

BASE_SKIP = ("scan", "features", "trace", "gate", "hookset", "evaluation")


def _base(p: argparse.ArgumentParser, saes: bool = True, prompts: bool = True) -> None:
    skip = BASE_SKIP + (() if saes else ("saes",)) + (() if prompts else ("harmful", "benign", "split", "column",
                                                                         "limit"))
    add_options(p, RunConfig, skip=skip)


def _stage_options(p, cls, prefix: str) -> None:
    add_options(p, cls, prefix=prefix)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trace-circuits", description="TraceRouter as a toolkit: trace the harmful "
                                     "circuit inside a chat model and export the hook set that severs it.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="the main job: scan, SAE features, circuit and hook set, evaluation, report.html",
                         description="Every stage of TraceRouter (built-in prompts unless files are given); all "
                                     "artifacts, config.json and report.html go into OUT. --config config.json "
                                     "reproduces an earlier run (options given here override it). Rerun an interrupted "
                                     "run with the same settings and OUT: the stages it finished are reused.")
    _base(run)
    run.add_argument("--config", default=None, help="config.json of an earlier run to reproduce")
    run.add_argument("--out", default="runs/latest", help="output folder. Default: runs/latest")
    run.add_argument("--no-evaluate", action="store_true", help="stop after the hook set (skip stage 4)")
    for cls, prefix in ((ScanConfig, "scan-"), (FeaturesConfig, "features-"), (TraceConfig, "trace-"),
                        (GateConfig, "gate-"), (HookSetConfig, "hookset-"), (EvaluationConfig, "eval-")):
        _stage_options(run, cls, prefix)
    run.set_defaults(func=cmd_run)

    scan = sub.add_parser("scan", help="stage 1: attention divergence per layer/head and the sensitive onset layer",
                          description="Attention divergence between harmful and benign prompts per layer and head, "
                                      "with CIs and a permutation test, and the sensitive onset layer. Writes "
                                      "OUT/divergence.json and OUT/divergence.html.")
    _base(scan, saes=False)
    _stage_options(scan, ScanConfig, "")
    scan.add_argument("--out", default="runs/scan", help="output folder. Default: runs/scan")
    scan.add_argument("--no-attention-view", action="store_true", help="leave the circuitsvis view out of the HTML")
    scan.set_defaults(func=cmd_scan)

    fe = sub.add_parser("features", help="stage 2: SAE features that carry harmful semantics",
                        description="Differential activation analysis of an SAE's features on harmful vs benign "
                                    "prompts. Writes OUT/features.json and OUT/features.html.")
    _base(fe)
    _stage_options(fe, FeaturesConfig, "")
    fe.add_argument("--scan", dest="scan_file", default=None, help="divergence.json of a scan: use its onset layer")
    fe.add_argument("--out", default="runs/features", help="output folder. Default: runs/features")
    fe.set_defaults(func=cmd_features)

    tr = sub.add_parser("trace", help="stage 3: feature influence scores, the circuit, and the hook set that cuts it",
                        description="Zero out each malicious SAE feature at the onset layer (error term kept), measure "
                                    "the drop at downstream SAE features, heads, MLPs and a harmfulness readout, rank "
                                    "all nodes by attribution patching, prune, and export the hook set. Writes "
                                    "OUT/circuit.json, OUT/circuit.html, OUT/circuit_full.json and OUT/hookset/.")
    _base(tr)
    _stage_options(tr, TraceConfig, "")
    _stage_options(tr, GateConfig, "gate-")
    _stage_options(tr, HookSetConfig, "hookset-")
    tr.add_argument("--features", dest="features_file", default=None,
                    help="features.json of `trace-circuits features` (default: run stage 2)")
    tr.add_argument("--scan", dest="scan_file", default=None, help="divergence.json of a scan: use its onset layer")
    tr.add_argument("--out", default="runs/trace", help="output folder. Default: runs/trace")
    tr.set_defaults(func=cmd_trace)

    ev = sub.add_parser("evaluate", help="defense success and utility of a hook set against the baselines",
                        description="Answer held-out harmful prompts (direct and under attack templates), benign "
                                    "prompts and hard negatives with the hook set and each baseline; judge with refusal "
                                    "substrings, a MiniLM relevance judge (default and strict) and a refusal logit; "
                                    "measure over-refusal, KL and CE change. Writes OUT/evaluation.json/.html and "
                                    "OUT/responses.jsonl.")
    _base(ev, prompts=False)
    _stage_options(ev, EvaluationConfig, "")
    ev.add_argument("--hookset", required=True, help="hook set folder (from `trace-circuits trace`)")
    ev.add_argument("--out", default="runs/evaluate", help="output folder. Default: runs/evaluate")
    ev.set_defaults(func=cmd_evaluate)

    gen = sub.add_parser("generate", help="answer prompts with the transformers model, with or without a hook set",
                         description="Greedy generation (batched) on the transformers model with the hook set attached "
                                     "as plain PyTorch hooks. Writes one JSON object per prompt to OUT; resumes an "
                                     "interrupted run.")
    gen.add_argument("--model", default=None, help="model name. Default: the hook set's model")
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

    from trace_circuits.cli_saes import add_sae_commands

    add_sae_commands(sub)
    from trace_circuits.cli_attack import add_attack_command

    add_attack_command(sub)
    models = sub.add_parser("models", help="list the models that load offline", description="List offline models.")
    models.set_defaults(func=cmd_models)
    return parser


# ------------------------------------------------------------------------------------------------------------------
# Building the run from the options


def _config(args, base: Optional[RunConfig] = None, stages: Sequence[tuple] = ()) -> RunConfig:
    """The run config: ``base`` (a config file, else the defaults) with the options given laid over it."""
    cfg = from_options(RunConfig, args, base=base)
    for name, cls, prefix in stages:
        cfg = dataclasses.replace(cfg, **{name: from_options(cls, args, prefix, getattr(cfg, name))})
    return cfg


def _run(args, cfg: RunConfig, out_kind: str = "dir"):
    from trace_circuits._io import check_output
    from trace_circuits.pipeline import Run

    cfg.check()  # every setting, the output folder and the prompt files, before any model is loaded
    out = check_output(args.out, out_kind)
    run = Run(cfg, out=out)
    _check_prompts(run, args)
    return run


def _check_prompts(run, args) -> None:
    """Read the prompt sets (files: one error line each) and refuse identical harmful / benign sets, before any model
    is loaded."""
    from trace_circuits.prompts import check_distinct

    kinds = ("harmful_test", "benign_test") if args.command == "evaluate" else ("harmful", "benign")
    check_distinct(run.prompts(kinds[0]), run.prompts(kinds[1]))


def _load_result(cls, path: str, option: str):
    """A stage's earlier result given as ``--scan`` / ``--features``: one error line if it is not that kind."""
    if not Path(path).exists():
        raise TraceCircuitsError(f"{option} {path} does not exist; pass the file written by that stage")
    return cls.load(path)


def cmd_run(args) -> int:
    from trace_circuits.results import read_json

    base = None
    if args.config:
        base = RunConfig.from_json(read_json(Path(args.config), "run config", "write one with `trace-circuits run`"),
                                   args.config)
    cfg = _config(args, base, [("scan", ScanConfig, "scan-"), ("features", FeaturesConfig, "features-"),
                               ("trace", TraceConfig, "trace-"), ("gate", GateConfig, "gate-"),
                               ("hookset", HookSetConfig, "hookset-"), ("evaluation", EvaluationConfig, "eval-")])
    run = _run(args, cfg)
    t0 = time.time()
    done = run.resume()
    if done:
        print(f"resuming the run in {run.out}: reusing {', '.join(done)} (their settings are those of its "
              "config.json)")
    _print_scan(run.scan())
    _print_features(run.features())
    _print_trace(run)
    if not args.no_evaluate:
        _print_evaluation(run.evaluate())
    run.save(run.out)
    print(f"run finished in {time.time() - t0:.0f}s; wrote {run.out / 'report.html'} and {run.out / 'config.json'}")
    return 0


def cmd_scan(args) -> int:
    run = _run(args, _config(args, stages=[("scan", ScanConfig, "")]))
    result = run.scan()  # saved by the run with the circuitsvis view; rewritten without it on request
    if args.no_attention_view:
        result.save(run.out)
    _print_scan(result)
    print(f"wrote {run.out / 'divergence.json'} and {run.out / 'divergence.html'}")
    return 0


def cmd_features(args) -> int:
    from trace_circuits.divergence import DivergenceResult

    run = _run(args, _config(args, stages=[("features", FeaturesConfig, "")]))
    if args.scan_file:
        run.results["scan"] = _load_result(DivergenceResult, args.scan_file, "--scan")
    _print_features(run.features())
    print(f"wrote {run.out / 'features.json'} and {run.out / 'features.html'}")
    return 0


def cmd_trace(args) -> int:
    from trace_circuits.divergence import DivergenceResult
    from trace_circuits.features import FeatureResult
    from trace_circuits.models import canonical_name

    cfg = _config(args, stages=[("trace", TraceConfig, ""), ("gate", GateConfig, "gate-"),
                                ("hookset", HookSetConfig, "hookset-")])
    run = _run(args, cfg)
    if args.scan_file:
        run.results["scan"] = _load_result(DivergenceResult, args.scan_file, "--scan")
    if args.features_file:
        feats = _load_result(FeatureResult, args.features_file, "--features")
        if feats.model and feats.model != canonical_name(cfg.model):
            raise TraceCircuitsError(f"--features was made for {feats.model}, not {cfg.model}; use --model "
                                     f"{feats.model} or rerun `trace-circuits features`")
        run.results["features"] = feats
    _print_trace(run)
    return 0


def cmd_evaluate(args) -> int:
    from trace_circuits.hookset import load_hookset
    from trace_circuits.models import canonical_name

    cfg = _config(args, stages=[("evaluation", EvaluationConfig, "")]).check()
    hookset = load_hookset(args.hookset)
    if not hasattr(args, "model"):
        cfg = dataclasses.replace(cfg, model=canonical_name(hookset.model))
    run = _run(args, cfg)
    run.results["hookset"] = hookset
    hookset.check_model(run.model)
    _print_evaluation(run.evaluate())
    return 0


def cmd_generate(args) -> int:
    import json

    from trace_circuits._io import check_output
    from trace_circuits.generation import generate_responses
    from trace_circuits.hookset import load_hookset
    from trace_circuits.models import DEFAULT_MODEL, canonical_name, load_hf_model
    from trace_circuits.prompts import load_prompts

    if not args.hookset and not args.no_hookset:
        raise TraceCircuitsError("pass --hookset DIR (from `trace-circuits trace`) or --no-hookset for the baseline")
    if args.max_new_tokens < 1 or args.batch_size < 1:
        raise TraceCircuitsError("--max-new-tokens and --batch-size must be at least 1")
    hookset = load_hookset(args.hookset) if args.hookset and not args.no_hookset else None
    name = canonical_name(args.model or (hookset.model if hookset else DEFAULT_MODEL))
    prompts = list(load_prompts(args.prompts, column=args.column))
    if args.limit is not None:
        prompts = prompts[: max(1, args.limit)]
    check_output(args.out, "file")
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


def cmd_models(args) -> int:
    from trace_circuits.models import MODELS, is_installed

    for name, spec in MODELS.items():
        status = "installed" if is_installed(name) else f"not installed ({spec.file.install})"
        print(f"{name:30s} {spec.hf_name:40s} {status}")
    return 0


# ------------------------------------------------------------------------------------------------------------------
# What each stage prints


def _print_scan(result) -> None:
    if result.params.get("form_warning"):
        print(f"warning: {result.params['form_warning']}")
    ref = result.reference if result.contrast == "form_controlled" else None
    if result.onset_layer is None:
        why = ("no layer where the form-matched pairs split and your sets carry that split beyond the form control"
               if ref else "no layer's attention divergence is both significant and large")
        print(f"{why}: no onset layer")
    else:
        d, lo, hi, q = result.onset_divergence()
        print(f"sensitive onset layer: {result.onset_layer}  (D = {d:.4f} bits, 95% CI [{lo:.4f}, {hi:.4f}], "
              f"q = {q:.3g})")
    print(f"onset from: {result.onset_source}")
    if ref and result.raw_onset_layer != result.onset_layer:
        print(f"raw onset of your two sets (no form control, --contrast raw): {result.raw_onset_layer}")
    print("most divergent heads: " + ", ".join(f"L{l}H{h} {d:.4f}" for l, h, d in result.top_heads[:5]))


def _print_features(result) -> None:
    feats = result.harmful_features
    print(f"{len(feats)} harmful features at {result.hook_name} (of {result.params.get('n_features')}): {result.rule}")
    for f in feats[:10]:
        row = result.table.loc[f]
        toks = ", ".join(repr(t) for t, _ in (result.examples.get(f, {}).get("top_tokens") or [])[:3])
        print(f"  F{f:<5d} d={row['effect_size']:.2f}  fires harmful {row['fire_rate_harmful']:.0%} / benign "
              f"{row['fire_rate_benign']:.0%}  top tokens: {toks}")


def _print_trace(run) -> None:
    circuit = run.trace()
    full = run.results["circuit_full"]
    m = full.meta
    print(f"FIS from {len(m['sources'])} source features at layer {m['onset_layer']} on {m['n_prompts']} harmful "
          f"prompts; {m['n_candidates']} downstream nodes measured exactly ({m['seconds']['total']:.0f}s)")
    rho = m.get("attribution_spearman_top")
    if rho is not None:
        print(f"attribution patching vs exact zero-out, top {m['attribution_spearman_top_n']} nodes: Spearman {rho:.3f}")
    print(f"pruned circuit: {len(circuit.nodes)} nodes, {len(circuit.links)} links; suppressing "
          f"{len(circuit.severed_nodes)} nodes severs {sum(link.severed for link in circuit.links)} links")
    hookset = run.export()
    if hookset.action == "steer":
        print("the hook set's action 'steer' leaves those nodes in place (--hookset-action zero or reroute cuts them)")
    g = hookset.provenance["gate_calibration"]
    from trace_circuits.hookset.format import message_coverage

    pre = f" ({message_coverage(g)})" if message_coverage(g) else ""
    print(f"{hookset.summary()}.\nThe gate opens on {g['gate_rate_harmful']:.0%} of harmful and "
          f"{g['gate_rate_benign']:.0%} of benign calibration sequences out of fold{pre}, AUROC "
          f"{g['gate_score_auroc']:.3f}" + (f"; probe L2 {g['l2']:g}" if "l2" in g else "")
          + (f" (the best out of fold of {', '.join(g['l2_search'])})" if len(g.get("l2_search", ())) > 1 else ""))
    if run.out is not None:
        print(f"wrote {run.out / 'circuit.json'}, {run.out / 'circuit.html'} and {run.out / 'hookset'}")


def _print_evaluation(result) -> None:
    import pandas as pd

    cols = ["DSR direct", "DSR jailbreaks", "benign over-refusal change", "hard-negative over-refusal change",
            "KL benign prompts", "KL benign text"]
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(result.table[[c for c in cols if c in result.table]].round(3).to_string())
    if result.params.get("dtype"):
        print(f"(answers generated and log-probs measured in {result.params['dtype']}; "
              "--eval-generation-dtype to change)")
    if result.params.get("sources"):
        print("(prompts: " + ", ".join(f"{k} {v}" for k, v in result.params["sources"].items()) + ")")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    warnings.simplefilter("ignore", category=FutureWarning)
    warnings.simplefilter("ignore", category=FormWarning)  # printed by the scan summary as one line
    try:
        return args.func(args)
    except TraceCircuitsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except OSError as err:  # disk full, no permission, I/O error: one line, not a traceback
        where = f" ({err.filename})" if err.filename else ""
        print(f"error: {err.strerror or err}{where}; free space or fix permissions and run again", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
