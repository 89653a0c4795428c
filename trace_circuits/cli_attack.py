"""``trace-circuits attack``: the adaptive GCG suffix attack against a hook set, and against the undefended model
(:mod:`trace_circuits.evaluate.adaptive`, :mod:`trace_circuits.evaluate.adaptive_result`). Options come from
:class:`~trace_circuits.evaluate.adaptive.AttackConfig`."""

from __future__ import annotations

import time

from trace_circuits.config import add_options, from_options
from trace_circuits.errors import TraceCircuitsError
from trace_circuits.evaluate.adaptive import AttackConfig


def add_attack_command(sub) -> None:
    p = sub.add_parser("attack", help="adaptive GCG suffix attack against a hook set (and the undefended model)",
                       description="Optimise an adversarial suffix per harmful request with GCG, once against the "
                                   "undefended model and once against the hook set itself (target CE with the hook "
                                   "set attached + a term that pushes its prompt gate shut); answer (a) the first "
                                   "suffixes without and (b) with the defense, (c) the adaptive ones with it; judge as "
                                   "`evaluate` does. Writes OUT/attack.json and OUT/attack.html; an interrupted run "
                                   "resumes from OUT/gcg_*.jsonl.")
    p.add_argument("--hookset", required=True, help="hook set folder (from `trace-circuits trace`)")
    p.add_argument("--out", default="runs/attack", help="output folder. Default: runs/attack")
    add_options(p, AttackConfig)
    p.set_defaults(func=cmd_attack)


def cmd_attack(args) -> int:
    from pathlib import Path

    from trace_circuits._io import check_output
    from trace_circuits.evaluate.adaptive_result import run_adaptive_attack
    from trace_circuits.hookset import load_hookset
    from trace_circuits.models import canonical_name, load_hf_model, load_model
    from trace_circuits.datasets import builtin_prompts
    from trace_circuits.prompts import load_prompts

    cfg = from_options(AttackConfig, args).check()
    if not Path(args.hookset).exists():
        raise TraceCircuitsError(f"--hookset {args.hookset} does not exist; pass the hook set folder written by "
                                 "`trace-circuits trace` (OUT/hookset)")
    hookset = load_hookset(args.hookset)
    gate = hookset.gate_operation
    if gate is None or gate.kind != "prompt_probe":
        raise TraceCircuitsError(f"{args.hookset} has no prompt gate; the adaptive attack pushes a prompt gate shut, "
                                 "so export the hook set with `trace-circuits trace --gate-kind prompt`")
    harmful = list(load_prompts(cfg.harmful) if cfg.harmful else builtin_prompts("harmful", "test"))[:cfg.limit]
    benign = list(builtin_prompts("benign", "test"))[:cfg.judge_benign]
    out = check_output(args.out, "dir")
    name = canonical_name(hookset.model)
    t0 = time.time()
    model = load_model(name, device=cfg.device)
    hf, tok = load_hf_model(name, device=str(next(model.parameters()).device))
    print(f"loaded {name} in {time.time() - t0:.1f}s; {hookset.summary()}", flush=True)
    result = run_adaptive_attack(model, hf, tok, hookset, harmful, benign, cfg, out=out)
    result.save(out)
    _print(result)
    print(f"wrote {out / 'attack.json'} and {out / 'attack.html'}")
    return 0


def _print(result) -> None:
    where = result.params.get("config", {}).get("position", "suffix")
    if where != "suffix":
        print("the adversarial tokens are a preamble before the request (--position prefix); 'suffix' below means them")
    for name, m in result.settings.items():
        a = m["asr"]
        print(f"{m['label']:52s} ASR {a['rate']:.2f} [{a['ci'][0]:.2f}, {a['ci'][1]:.2f}]  DSR {m['dsr']['rate']:.2f}"
              f"  gate open {m['gate_open']['rate']:.2f}  (n={a['n']})")
    for k, o in result.optimisation.items():
        print(f"GCG vs {k}: {o['steps_run_total']} steps in {o['seconds_total']:.0f}s ({o['seconds_per_step']:.2f} "
              f"s/step), objective reached on {o['reached_rate']:.0%}, gate open on {o['gate_open_rate']:.0%}")
