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


def resume_results(folder: Path, config: dict) -> tuple[dict, dict]:
    """What an interrupted run with the same ``config`` (equal ``config.json``) left in ``folder``; with another
    config there, its results are removed (nothing of it is mixed in) and nothing is returned. ``config.json`` is
    written either way."""
    from trace_circuits._io import write_json_atomic

    try:
        same = json.loads((folder / "config.json").read_text()) == config
    except (OSError, ValueError):
        same = False
    results, timings = read_results(folder) if same else ({}, {})
    if not same:
        for name in (*_FILES.values(), "circuit_full.json", RUN_FILE):
            path = folder / name
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(folder / "config.json", config)
    return results, timings
