"""The evaluation's result object: per defense, defense success per attack and judge, and utility; every response."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from trace_circuits.results import Result


@dataclass
class EvaluationResult(Result):
    """``defenses[name]``: ``{"description", "dsr": {attack: rate}, "dsr_jailbreaks": rate, "dsr_strict": {...},
    "judges": {...}, "utility": {...}, "gate": {...}}`` (a rate is ``{"rate", "k", "n", "ci"}``); ``responses``: one
    row per answer with every judge's verdict."""

    KIND: ClassVar[str] = "trace-circuits evaluation"
    FORMAT_VERSION: ClassVar[int] = 2  # 2: strict judge, hard negatives, gate rates, disagreement
    FILE: ClassVar[str] = "evaluation.json"
    FIX: ClassVar[str] = "run `trace-circuits evaluate` to write a new one"

    model: str
    defenses: dict
    responses: list = field(default_factory=list)
    params: dict = field(default_factory=dict)

    @property
    def table(self):
        """One row per defense: defense success (direct, jailbreaks), judges, utility."""
        import pandas as pd

        rows = []
        for name, m in self.defenses.items():
            u, j = m["utility"], m["judges"]
            rows.append({"defense": name, "DSR direct": m["dsr"]["direct"]["rate"],
                         "DSR jailbreaks": m["dsr_jailbreaks"]["rate"],
                         "DSR direct (strict)": m.get("dsr_strict", {}).get("direct", {}).get("rate"),
                         "refusal (substring)": j.get("refusal_rate"),
                         "not addressed (relevance)": j.get("not_addressed_rate"),
                         "refusal logit > 0": j.get("refusal_logit_rate"),
                         "benign over-refusal": u["over_refusal"],
                         "benign over-refusal change": u.get("over_refusal_change"),
                         "hard-negative over-refusal": u.get("hard_negative_over_refusal"),
                         "hard-negative over-refusal change": u.get("hard_negative_over_refusal_change"),
                         "benign not addressed": u.get("benign_not_addressed"),
                         "KL benign prompts": u.get("kl_benign_prompts"), "KL benign text": u.get("kl_benign_text"),
                         "CE change benign text": u.get("ce_change_benign_text")})
        return pd.DataFrame(rows).set_index("defense")

    def template_table(self, key: str = "dsr"):
        """Defense success per attack template (rows) and defense (columns); ``key="dsr_strict"`` for the strict
        judge."""
        import pandas as pd

        return pd.DataFrame({name: {t: r["rate"] for t, r in m.get(key, {}).items()}
                             for name, m in self.defenses.items()})

    def _to_dict(self) -> dict:
        return {"model": self.model, "params": self.params, "defenses": self.defenses}

    @classmethod
    def _from_dict(cls, data: dict) -> "EvaluationResult":
        return cls(model=data.get("model", ""), defenses=data["defenses"], params=data.get("params", {}))

    def _save_extra(self, folder: Path) -> dict:
        from trace_circuits._io import write_text_atomic

        return {"responses": write_text_atomic(folder / "responses.jsonl",
                                               "".join(json.dumps(r) + "\n" for r in self.responses))}

    def _load_extra(self, folder: Path) -> None:
        resp = folder / "responses.jsonl"
        self.responses = [json.loads(line) for line in resp.read_text().splitlines() if line.strip()] \
            if resp.exists() else []
