"""A run's folder: which file holds which stage's result, reading them back, and resuming an interrupted run.

    OUT/config.json     the settings (written first, so a rerun of an interrupted run can tell it is the same run)
    OUT/run.json        timings and a summary, rewritten after every stage
    OUT/divergence.json, features.json, circuit.json (+ circuit_full.json), hookset/, evaluation.json
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

RUN_FILE = "run.json"
STAGE_RESULTS = ("scan", "features", "circuit", "hookset", "evaluation")
_FILES = {"scan": "divergence.json", "features": "features.json", "circuit": "circuit.json",
          "hookset": "hookset", "evaluation": "evaluation.json"}


def read_results(folder: Path) -> tuple[dict, dict]:
    """``(results, timings)``: every stage result found in ``folder`` (``circuit_full`` with the circuit)."""
    from trace_circuits.circuit import Circuit
    from trace_circuits.divergence import DivergenceResult
    from trace_circuits.evaluate import EvaluationResult
    from trace_circuits.features import FeatureResult
    from trace_circuits.hookset import load_hookset
    from trace_circuits.results import read_json

    loaders = {"scan": DivergenceResult.load, "features": FeatureResult.load, "circuit": Circuit.load,
               "evaluation": EvaluationResult.load}
    results = {name: load(folder) for name, load in loaders.items() if (folder / _FILES[name]).exists()}
    if (folder / "circuit_full.json").exists() and "circuit" in results:
        results["circuit_full"] = Circuit.from_json(read_json(folder / "circuit_full.json", "circuit",
                                                              "run `trace-circuits run`"))
    if (folder / "hookset" / "hookset.json").exists():
        results["hookset"] = load_hookset(folder / "hookset")
    timings = {}
    if (folder / RUN_FILE).exists():
        timings = dict(json.loads((folder / RUN_FILE).read_text()).get("timings", {}))
    return results, timings


TIMED_AS = {"stage 1: scan": "scan", "stage 2: SAE features": "features", "stage 3: FIS and circuit": "circuit",
            "hook set and gate": "hookset", "stage 4: evaluation": "evaluation"}  # Run._timed's names
# the config sections each stage reads besides the run's own settings (model, prompts, SAEs, dtype, ...)
STAGE_SETTINGS = {"scan": ("scan",), "features": ("features",), "circuit": ("trace",), "hookset": ("gate", "hookset"),
                  "evaluation": ("evaluation",)}


def stages_to_keep(old: dict, new: dict) -> list[str]:
    """The stages whose results written under config ``old`` still hold under ``new``: those before the first stage
    whose settings (its sections, or any of the run's own settings) differ; every stage where the two are equal."""
    sections = {s for secs in STAGE_SETTINGS.values() for s in secs}
    if {k: v for k, v in old.items() if k not in sections} != {k: v for k, v in new.items() if k not in sections}:
        return []
    keep = []
    for stage in STAGE_RESULTS:
        if any(old.get(s) != new.get(s) for s in STAGE_SETTINGS[stage]):
            break
        keep.append(stage)
    return keep


def resume_results(folder: Path, config: dict) -> tuple[dict, dict]:
    """What an earlier run in ``folder`` left that still holds under ``config``: every stage before the first whose
    settings differ (:func:`stages_to_keep`; an interrupted run with the same ``config.json`` keeps all it wrote); the
    results of that stage and the later ones are removed, so nothing computed under other settings is mixed in.
    ``config.json`` is written either way."""
    from trace_circuits._io import write_json_atomic

    try:
        old = json.loads((folder / "config.json").read_text())
        keep = stages_to_keep(old, config) if isinstance(old, dict) else []
    except (OSError, ValueError):
        keep = []
    for name in STAGE_RESULTS[len(keep):]:
        for file in (_FILES[name], *(("circuit_full.json",) if name == "circuit" else ())):
            path = folder / file
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    results, timings = read_results(folder)  # only the kept stages' files are left
    if not keep:
        (folder / RUN_FILE).unlink(missing_ok=True)
    timings = {k: v for k, v in timings.items() if TIMED_AS.get(k) in keep}
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(folder / "config.json", config)
    return results, timings
