"""Benchmark the relevance judge as the evaluation calls it: the calibration and one judgement per defense over a
run's ``responses.jsonl``, each distinct text embedded once per judge (ours) vs every call encoding its own lists
(the naive way). One run; both verdicts are compared.

    python benchmarks/bench_judge.py runs/latest
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="a run folder holding responses.jsonl (trace-circuits run / evaluate)")
    args = ap.parse_args()
    path = Path(args.run) / "responses.jsonl"
    if not path.is_file():
        sys.exit(f"error: {path} not found; pass a folder written by `trace-circuits run` or `evaluate`")

    from trace_circuits.evaluate import RelevanceJudge

    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    by_defense: dict[str, list[dict]] = {}
    for r in rows:
        by_defense.setdefault(r["defense"], []).append(r)
    plain = [r for r in by_defense["none"] if r["kind"] == "benign"]
    b_prompts, b_answers = [r["prompt"] for r in plain], [r["response"] for r in plain]

    def run(similarity):
        t0 = time.perf_counter()
        pos = similarity(b_prompts, b_answers)
        neg = similarity(b_prompts, b_answers[1:] + b_answers[:1])
        sims = [similarity([r["prompt"] for r in rs], [r["response"] for r in rs]) for rs in by_defense.values()]
        return time.perf_counter() - t0, np.concatenate([pos, neg, *sims])

    naive_judge = RelevanceJudge()

    def naive(prompts, responses):
        enc = naive_judge.model.encode
        return (enc(list(prompts), normalize_embeddings=True, batch_size=64)
                * enc(list(responses), normalize_embeddings=True, batch_size=64)).sum(1)

    judge = RelevanceJudge()
    for j in (naive_judge, judge):  # warm-up, outside the timings
        j.model.encode(b_prompts[:8], normalize_embeddings=True, batch_size=64)
    t_naive, s_naive = run(naive)
    t_ours, s_ours = run(judge.similarity)
    n_texts = 2 * sum(len(rs) for rs in by_defense.values()) + 4 * len(plain)
    print(f"{len(by_defense)} defenses, {len(rows)} answers; {n_texts} texts embedded the naive way, "
          f"{len(judge._seen)} distinct")
    print(f"ours (each distinct text once): {t_ours:.1f} s; naive (every call encodes): {t_naive:.1f} s; "
          f"ratio {t_naive / t_ours:.2f}x; largest similarity difference {np.abs(s_ours - s_naive).max():.1e}")


if __name__ == "__main__":
    main()
