"""The pipeline as one object: ``Run`` holds the model, the prompt sets encoded once, and the SAEs loaded once, with a
method per stage, each returning that stage's result object.

    run = tc.Run(tc.RunConfig(model="smollm2-135m-instruct"))
    scan = run.scan()            # DivergenceResult: the sensitive onset layer
    feats = run.features()       # FeatureResult: harmful SAE features at the onset layer
    circuit = run.trace()        # Circuit (pruned, with the nodes the hook set suppresses marked)
    hookset = run.export()       # HookSet: loads in TransformerLens or plain PyTorch / transformers
    ev = run.evaluate()          # EvaluationResult: defense success and utility against the baselines
    run.save("runs/mine")        # every result, config.json and report.html; tc.Run.load("runs/mine") reads it back

Data flows one way: prompts -> model -> scan -> features -> influence -> circuit -> hook set -> evaluation -> report.
Each stage runs the stages it needs first (once); ``trace-circuits run`` and every stage command call these methods.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from pathlib import Path
from typing import Optional

from trace_circuits.config import RunConfig
from trace_circuits.errors import TraceCircuitsError
from trace_circuits.run_folder import RUN_FILE, STAGE_RESULTS


class Run:
    """One TraceRouter run (module docstring). Pass ``model`` / ``hf`` / ``saes`` to use objects already loaded."""

    def __init__(self, config: Optional[RunConfig] = None, *, model=None, hf=None, saes: Optional[dict] = None,
                 out: Optional[str | Path] = None, progress: bool = True, **overrides):
        self.config = dataclasses.replace(config or RunConfig(), **overrides).check()
        self.out = Path(out) if out is not None else None
        self.progress = progress
        self._model, self._hf, self._saes = model, hf, saes
        self._prompts: dict = {}
        self._encoded: dict = {}
        self.results: dict = {}
        self.timings: dict[str, float] = {}

    # -- resources, each loaded or computed once ------------------------------------------------------------------

    @property
    def model(self):
        """The HookedTransformer (loaded on first use)."""
        if self._model is None:
            from trace_circuits.models import load_model

            t0 = time.time()
            self._model = load_model(self.config.model, device=self.config.device, dtype=self.config.dtype,
                                     progress=self.progress)
            self._log(f"loaded {self.config.model} ({self._model.cfg.n_layers} layers) in {time.time() - t0:.1f}s")
        return self._model

    @property
    def hf(self):
        """``(transformers model, tokenizer)``: the hook set's plain-PyTorch twin, used for generation."""
        if self._hf is None:
            from trace_circuits.models import load_hf_model, model_info

            self._hf = load_hf_model(model_info(self.model).name, dtype=self.config.dtype,
                                     device=str(next(self.model.parameters()).device))
        return self._hf

    @property
    def saes(self) -> dict:
        """``{layer: SAE}``: the SAEs given (``config.saes``: shipped hooks, SAE-Lens folders or releases), else the
        model's shipped SAEs; loaded once."""
        if self._saes is None:
            from trace_circuits.saes import by_layer, load_sae, shipped_saes

            if self.config.saes:
                self._saes = by_layer([load_sae(s, model=self.model) for s in self.config.saes])
            else:
                self._saes = shipped_saes(self.model)
        return self._saes

    def prompts(self, kind: str):
        """A prompt set: ``harmful`` / ``benign`` (the analysed sets: files, else the built-in split),
        ``harmful_test`` / ``benign_test`` (held out for the evaluation), ``hard_negative_train`` / ``_test``."""
        if kind not in self._prompts:
            from trace_circuits.datasets import builtin_prompts
            from trace_circuits.prompts import load_prompts

            c, ev = self.config, self.config.evaluation
            path, builtin, split, limit = {
                "harmful": (c.harmful, "harmful", c.split, c.limit), "benign": (c.benign, "benign", c.split, c.limit),
                "harmful_test": (ev.harmful, "harmful", "test", ev.limit),
                "benign_test": (ev.benign, "benign", "test", ev.limit),
                "hard_negative_train": (None, "hard_negative", "train", None),
                "hard_negative_test": (None, "hard_negative", "test", ev.limit)}[kind]
            ps = load_prompts(path, column=c.column) if path else builtin_prompts(builtin, split)
            if limit is not None:
                if limit < 2:
                    raise TraceCircuitsError("--limit must be at least 2")
                ps = ps[:limit]
            self._prompts[kind] = ps
            pair = {"harmful": "benign", "benign": "harmful", "harmful_test": "benign_test",
                    "benign_test": "harmful_test"}.get(kind)
            if pair in self._prompts:
                from trace_circuits.prompts import check_distinct

                h, b = (ps, self._prompts[pair]) if kind.startswith("harmful") else (self._prompts[pair], ps)
                check_distinct(h, b)
        return self._prompts[kind]

    def encoded(self, kind: str):
        """A prompt set templated and tokenized once (``kind`` as in :meth:`prompts`; ``gate_text``: benign corpus
        documents for the gate calibration, encoded without the chat template)."""
        if kind not in self._encoded:
            from trace_circuits.prompts import encode_prompts

            if kind == "gate_text":
                from trace_circuits.corpus import benign_documents
                from trace_circuits.models import model_info

                docs = benign_documents(self.model.tokenizer, model_info(self.model).name,
                                        max_docs=self.config.gate.text_docs, split="train")
                self._encoded[kind] = encode_prompts(self.model, docs, chat=False)
            else:
                prompts = self.prompts(kind)  # a bad prompt file is one line before the model loads
                self._encoded[kind] = encode_prompts(self.model, prompts, chat=self.config.chat)
        return self._encoded[kind]

    # -- stages -----------------------------------------------------------------------------------------------------

    def scan(self):
        """Stage 1: attention divergence per layer and head, and the sensitive onset layer."""
        if "scan" not in self.results:
            from trace_circuits.divergence import scan_attention_divergence

            with self._timed("stage 1: scan"):
                h, b = self.encoded("harmful"), self.encoded("benign")
                self._log(f"[1] attention-divergence scan: {len(h)} harmful vs {len(b)} benign prompts")
                ck = self.out / ".checkpoints" if self.out else None
                self.results["scan"] = scan_attention_divergence(self.model, h, b, progress=self.progress,
                                                                 checkpoint_dir=ck,
                                                                 **dataclasses.asdict(self.config.scan))
            self._save("scan", model=self.model)
        return self.results["scan"]

    @property
    def onset_layer(self) -> int:
        """The layer stage 2 analyses: ``features.layer`` if set, else the scan's onset (the SAE there, or the nearest
        SAE after it)."""
        layer = self.config.features.layer
        if layer is None:
            scan = self.scan()
            layer = scan.onset_layer if scan.onset_layer is not None else int(scan.per_layer.argmax())
        later = sorted(l for l in self.saes if l >= layer)
        if not later and self.config.saes:
            raise TraceCircuitsError(f"the SAEs given are at layer(s) {sorted(self.saes)}, all before layer {layer}; "
                                     f"pass one at or after it (--sae) or choose the layer to analyse "
                                     f"(--features-layer {max(self.saes)}; `--layer` on `trace-circuits features`)")
        if not later:
            raise TraceCircuitsError(f"no SAE at or after layer {layer} for {self.config.model}; train one with "
                                     f"`trace-circuits train-sae --model {self.config.model} --layers {layer}` or pass "
                                     "--sae")
        return later[0]

    def features(self):
        """Stage 2: differential activation analysis of the onset layer's SAE features."""
        if "features" not in self.results:
            from trace_circuits.features import find_harmful_features

            layer = self.onset_layer
            with self._timed("stage 2: SAE features"):
                self._log(f"[2] SAE features at layer {layer}")
                fc = self.config.features
                self.results["features"] = find_harmful_features(
                    self.model, self.saes[layer], self.encoded("harmful"), self.encoded("benign"),
                    batch_size=fc.batch_size, progress=self.progress, n_examples=fc.n_examples, alpha=fc.alpha,
                    min_effect_size=fc.min_effect_size, max_benign_fire_rate=fc.max_benign_fire_rate,
                    relative_fire_threshold=fc.relative_fire_threshold)
            self._save("features")
        return self.results["features"]

    def trace(self):
        """Stage 3: FIS from the harmful features, the circuit, pruned, with the nodes to suppress marked."""
        if "circuit" not in self.results:
            from trace_circuits.tracing import trace_circuit

            feats = self.features()
            if not feats.harmful_features:
                raise TraceCircuitsError(f"stage 2 selected no harmful features ({feats.n_harmful} harmful vs "
                                         f"{feats.n_benign} benign prompts), so there is no circuit to trace; use "
                                         "more prompts, or lower --features-min-effect-size or raise --features-alpha")
            tc = self.config.trace
            kinds = [k.strip() for k in tc.suppress.split(",") if k.strip()]
            bad = [k for k in kinds if k not in ("feature", "head", "mlp")]
            if bad:
                raise TraceCircuitsError(f"--suppress takes feature, head and/or mlp, not {', '.join(bad)}")
            with self._timed("stage 3: FIS and circuit"):
                self._log(f"[3] feature influence scores from {min(len(feats.harmful_features), tc.max_sources)} "
                          f"source features")
                full = trace_circuit(self.model, feats, self.encoded("harmful"), self.encoded("benign"),
                                     saes=self.saes, max_sources=tc.max_sources, n_prompts=tc.n_prompts,
                                     n_candidates=tc.n_candidates, batch_size=tc.batch_size,
                                     copies_per_pass=tc.copies_per_pass, progress=self.progress)
                pruned = (full.prune(threshold=tc.prune_threshold) if tc.prune_threshold is not None
                          else full.prune(cumulative=tc.prune_cumulative))
                self.results["circuit_full"] = full
                self.results["circuit"] = pruned.sever(pruned.harmful_path_nodes(tc.min_readout_effect,
                                                                                 kinds=["source", *kinds]))
            if self.out is not None:  # before circuit.json, which marks the stage done for a resumed run
                from trace_circuits._io import write_json_atomic

                write_json_atomic(self.out / "circuit_full.json", full.to_json())
            self._save("circuit")
        return self.results["circuit"]

    def export(self):
        """The hook set that severs the circuit, with its gate calibrated (and, for ``reroute`` and ``steer``, the
        steering)."""
        if "hookset" not in self.results:
            from trace_circuits.hookset import hookset_from_circuit
            from trace_circuits.run_gate import fit_run_gate

            circuit = self.trace()
            hc = self.config.hookset
            with self._timed("hook set and gate"):
                gate, calib = fit_run_gate(self, circuit)
                steering, steer = [], None
                if hc.action in ("reroute", "steer"):
                    from trace_circuits.refusal import steering_operations

                    steering, steer = steering_operations(self, circuit)
                self.results["hookset"] = hookset_from_circuit(
                    circuit, self.model, self.saes, gate=gate, gated_sources=hc.gated_sources, steering=steering,
                    action=hc.action, provenance={"gate_calibration": calib, "steering": steer,
                                                  "config": self.config.to_json()})
            self._save("hookset")
        return self.results["hookset"]

    def gate_calibration_sets(self):
        """The prompt gate's calibration requests, encoded (:func:`trace_circuits.run_gate.calibration_sets`)."""
        from trace_circuits.run_gate import calibration_sets

        return calibration_sets(self)

    def evaluate(self):
        """Stage 4: the hook set and the baselines on held-out prompts, judged the same way."""
        if "evaluation" not in self.results:
            from trace_circuits.corpus import benign_documents
            from trace_circuits.evaluate import (
                ATTACKS,
                BASELINE_NAMES,
                RelevanceJudge,
                build_baselines,
                check_baseline_names,
                evaluate_defenses,
            )
            from trace_circuits.models import model_info

            ec = self.config.evaluation
            names = check_baseline_names(list(BASELINE_NAMES) if ec.baselines == "all" else [] if ec.baselines ==
                                         "none" else [b.strip() for b in ec.baselines.split(",") if b.strip()])
            templates = list(ATTACKS) if ec.templates == "all" else [t.strip() for t in ec.templates.split(",")]
            hookset = self.export()
            with self._timed("stage 4: evaluation"):
                self._log(f"[4] defense evaluation: {', '.join(['tracerouter'] + names)}")
                defenses = {"tracerouter": hookset, **build_baselines(self.model, hookset, self.encoded("harmful"),
                                                                      self.encoded("benign"), self.saes, names)}
                from trace_circuits.models import hf_in_dtype, resolve_eval_dtype

                hf, tok = self.hf
                hf = hf_in_dtype(hf, resolve_eval_dtype(ec.generation_dtype, next(hf.parameters()).device))
                self.results["evaluation"] = evaluate_defenses(
                    hf, tok, defenses, list(self.prompts("harmful_test")), list(self.prompts("benign_test")),
                    hard_negatives=list(self.prompts("hard_negative_test")) if ec.hard_negatives else [],
                    templates=templates, max_new_tokens=ec.max_new_tokens, batch_size=ec.batch_size,
                    judge=RelevanceJudge(), chat=self.config.chat, progress=self.progress,
                    text=benign_documents(tok, model_info(self.model).name, max_docs=ec.text_docs) if ec.text_docs
                    else [],
                    sources={k.removesuffix("_test"): self.prompts(k).source for k in
                             ("harmful_test", "benign_test", "hard_negative_test")
                             if k != "hard_negative_test" or ec.hard_negatives})
            self._save("evaluation")
        return self.results["evaluation"]

    def run(self, stages: tuple = ("scan", "features", "trace", "export", "evaluate")):
        """Every stage in order (each runs what it needs first); writes the report when an output folder is set."""
        for stage in stages:
            getattr(self, stage)()
        if self.out is not None:
            self.save(self.out)
        return self

    def report(self, out_dir: Optional[str | Path] = None) -> Path:
        """``report.html``: every stage that ran, in one self-contained page."""
        from trace_circuits.viz.report import write_report

        r = self.results
        folder = Path(out_dir) if out_dir is not None else self.out
        if folder is None:
            raise TraceCircuitsError("pass a folder: run.report('runs/mine')")
        return write_report(folder, scan=r.get("scan"), features=r.get("features"), circuit=r.get("circuit"),
                            hookset=r.get("hookset"), evaluation=r.get("evaluation"), timings=dict(self.timings),
                            config=self.config.to_json())

    # -- persistence ------------------------------------------------------------------------------------------------

    def to_json(self) -> dict:
        r = self.results
        summary = {"onset_layer": getattr(r.get("scan"), "onset_layer", None),
                   "harmful_features": getattr(r.get("features"), "harmful_features", None),
                   "circuit": repr(r["circuit"]) if "circuit" in r else None,
                   "hookset": r["hookset"].summary() if "hookset" in r else None,
                   "stages": sorted(r)}
        return {"kind": "trace-circuits run", "format_version": 1, "config": self.config.to_json(),
                "timings": self.timings, "summary": summary}

    def save(self, out_dir: str | Path) -> Path:
        """Write every result, ``config.json``, ``run.json`` and ``report.html`` into ``out_dir``."""
        from trace_circuits._io import write_json_atomic

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        previous, self.out = self.out, out
        for name in STAGE_RESULTS:
            if name in self.results and previous != out:
                self._save(name)
        write_json_atomic(out / "config.json", self.config.to_json())
        write_json_atomic(out / RUN_FILE, self.to_json())
        self.report(out)
        return out

    @classmethod
    def load(cls, out_dir: str | Path, **kwargs) -> "Run":
        """A run read back from its folder: the config and every result found (the model loads when first used)."""
        from trace_circuits.results import read_json
        from trace_circuits.run_folder import read_results

        folder = Path(out_dir)
        config = RunConfig.from_json(read_json(folder / "config.json", "run config", "run `trace-circuits run`"),
                                     str(folder / "config.json"))
        run = cls(config, out=folder, **kwargs)
        run.results, run.timings = read_results(folder)
        return run

    def resume(self) -> list[str]:
        """Reuse what an earlier run wrote to ``self.out`` that still holds under our config: every stage before the
        first whose settings differ (an interrupted run with this very config: all it wrote;
        :func:`run_folder.stages_to_keep`); the rest is removed so none of it is mixed in. Writes our
        ``config.json`` first, so a rerun of an interrupted run finds it. Returns the stages reused."""
        from trace_circuits.run_folder import resume_results

        if self.out is None:
            return []
        results, timings = resume_results(self.out, self.config.to_json())
        self.results.update(results)
        self.timings.update(timings)
        return [s for s in STAGE_RESULTS if s in results]

    def plot(self):
        """The run at a glance: each stage's figure that exists (a dict of plotly figures)."""
        return {name: self.results[name].plot() for name in STAGE_RESULTS if name in self.results}

    # -- helpers ----------------------------------------------------------------------------------------------------

    def _save(self, name: str, **html_kwargs) -> None:
        if self.out is None:
            return
        from trace_circuits._io import write_json_atomic

        obj = self.results[name]
        if name == "hookset":
            obj.save(self.out / "hookset")
        else:
            obj.save(self.out, **html_kwargs)
        write_json_atomic(self.out / RUN_FILE, self.to_json())  # the timings so far, for a resumed run

    def _log(self, text: str) -> None:
        if self.progress:
            print(text, flush=True)

    @contextlib.contextmanager
    def _timed(self, name: str):
        t0 = time.time()
        try:
            yield
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.time() - t0
