"""``trace-circuits build-corpus``, ``train-sae`` and ``saes``: the SAE side of the command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from trace_circuits.errors import TraceCircuitsError


def add_sae_commands(sub) -> None:
    corpus = sub.add_parser("build-corpus", help="rebuild a model's SAE training corpus (its chat answers + CPython "
                                                 "docs)",
                            description="Build the SAE training corpus: the model's own greedy chat answers to the "
                                        "built-in train prompts and generated instructions, plus CPython's reference "
                                        "docs and stdlib docstrings. Deterministic.")
    corpus.add_argument("--model", default="smollm2-135m-instruct", help="model that answers the chat prompts")
    corpus.add_argument("--out", default=None, help="corpus file (.jsonl.gz). Default: saes/corpus/MODEL.jsonl.gz")
    corpus.add_argument("--n-generated", type=int, default=1200, help="generated instructions. Default: 1200")
    corpus.add_argument("--max-new-tokens", type=int, default=64, help="answer length. Default: 64")
    corpus.add_argument("--batch-size", type=int, default=32, help="prompts per generate call. Default: 32")
    corpus.set_defaults(func=cmd_build_corpus)

    from trace_circuits.config import add_options
    from trace_circuits.saes.training import SAETrainingConfig

    tr = sub.add_parser("train-sae", help="train SAEs (SAE-Lens) at residual hooks, resumable",
                        description="Collect activations once for all hooks, train one TopK SAE per hook with SAE-Lens, "
                                    "evaluate on held-out text (EV, L0, CE recovered) and save into "
                                    "saes/<model>/<hook>/. An interrupted run resumes when rerun with the same settings "
                                    "and --run-dir.")
    tr.add_argument("--model", default="smollm2-135m-instruct", help="model name. Default: smollm2-135m-instruct")
    tr.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N. Default: auto")
    tr.add_argument("--hook", action="append", dest="hook_list", default=None,
                    help="hook point, repeatable (e.g. blocks.21.hook_resid_post)")
    tr.add_argument("--layers", default=None, help="comma-separated layers for hook_resid_post, e.g. 21,23,25,27")
    tr.add_argument("--run-dir", default="runs/train-sae", help="activations and checkpoints. Default: runs/train-sae")
    tr.add_argument("--out-root", default=None, help="where SAEs are saved. Default: the repository's saes/")
    add_options(tr, SAETrainingConfig, skip=("model", "hooks", "corpus", "format_version"))
    tr.add_argument("--corpus", dest="corpus_file", default=None, help="corpus file. Default: saes/corpus/MODEL.jsonl.gz")
    tr.set_defaults(func=cmd_train_sae)

    ls = sub.add_parser("saes", help="list the shipped SAEs (broken ones are listed as broken)",
                        description="List SAEs in saes/ with their metrics.")
    ls.add_argument("--model", default=None, help="only this model")
    ls.set_defaults(func=cmd_saes)


def cmd_build_corpus(args) -> int:
    from trace_circuits._io import check_output
    from trace_circuits.corpus import build_corpus, corpus_path
    from trace_circuits.models import canonical_name

    name = canonical_name(args.model)
    out = Path(args.out) if args.out else corpus_path(name)
    check_output(out, "file")
    build_corpus(out, model_name=name, n_generated=args.n_generated, max_new_tokens=args.max_new_tokens,
                 batch_size=args.batch_size)
    return 0


def cmd_train_sae(args) -> int:
    from trace_circuits._io import check_output
    from trace_circuits.config import from_options
    from trace_circuits.corpus import corpus_path
    from trace_circuits.models import canonical_name, load_model
    from trace_circuits.saes.training import SAETrainingConfig, train_saes

    hooks = list(args.hook_list or [])
    if args.layers:
        try:
            hooks += [f"blocks.{int(x)}.hook_resid_post" for x in args.layers.split(",") if x.strip()]
        except ValueError:
            raise TraceCircuitsError(f"--layers must be comma-separated integers, not '{args.layers}'") from None
    if not hooks:
        raise TraceCircuitsError("pass --layers L1,L2,... or --hook blocks.L.hook_resid_post")
    name = canonical_name(args.model)
    corpus = Path(args.corpus_file) if args.corpus_file else corpus_path(name)
    if not corpus.exists():
        raise TraceCircuitsError(f"corpus {corpus} does not exist; build it with `trace-circuits build-corpus --model "
                                 f"{name}`")
    check_output(args.run_dir, "dir")
    if args.out_root:
        check_output(args.out_root, "dir")
    cfg = from_options(SAETrainingConfig, args, base=SAETrainingConfig(model=name, hooks=hooks, corpus=str(corpus)))
    model = load_model(name, device=args.device)
    command = "trace-circuits " + " ".join(sys.argv[1:]) if sys.argv and "trace-circuits" in sys.argv[0] else ""
    train_saes(model, cfg, args.run_dir, out_root=args.out_root, command=command)
    return 0


def cmd_saes(args) -> int:
    from trace_circuits.saes import list_saes

    rows = list_saes(args.model)
    if not rows:
        print("no SAEs found; train one with `trace-circuits train-sae`")
    for r in rows:
        if r["broken"]:
            print(f"{r['model']:28s} {r['hook_name']:28s} BROKEN: {r['broken']}")
            continue
        print(f"{r['model']:28s} {r['hook_name']:28s} {r['architecture']:9s} d_sae {r['d_sae']:>6}  EV "
              f"{r['explained_variance'] or float('nan'):.3f}  L0 {r['l0'] or float('nan'):.1f}  CE recovered "
              f"{r['ce_loss_recovered'] or float('nan'):.3f}  {r['path']}")
    return 0


_ = argparse
