"""Stage 4: defense success against harmful and jailbreak prompts, utility kept on benign ones, against baselines."""

from trace_circuits.evaluate.attacks import ATTACKS, JAILBREAKS, Attack, attack, attack_texts
from trace_circuits.evaluate.baselines import BASELINE_NAMES, build_baselines, check_baseline_names
from trace_circuits.evaluate.judges import (
                                            REFUSAL_STARTS,
                                            REFUSAL_SUBSTRINGS,
                                            RelevanceJudge,
                                            is_refusal,
                                            refusal_token_ids,
)
from trace_circuits.evaluate.result import EvaluationResult
from trace_circuits.evaluate.run import evaluate_defenses
from trace_circuits.evaluate.utility import next_token_kl, plain_logprobs, split_text
from trace_circuits.stats import wilson

__all__ = ["ATTACKS", "Attack", "BASELINE_NAMES", "EvaluationResult", "JAILBREAKS", "REFUSAL_STARTS",
           "REFUSAL_SUBSTRINGS", "RelevanceJudge", "attack", "attack_texts", "build_baselines", "check_baseline_names",
           "evaluate_defenses", "is_refusal", "next_token_kl", "plain_logprobs", "refusal_token_ids", "split_text",
           "wilson"]
