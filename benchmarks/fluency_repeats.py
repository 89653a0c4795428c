"""What do repeated tokens buy an attacker against the fluency reading? The adaptive attacks against the reading
over every message token (hook set format 12, ``perplexity_tokens="all"``; README, "An attacker who knows the
defense") keep most of GCG's initial " !" tokens, which the model predicts easily after the first few. This prints,
on the built-in test split under every attack template and on the attack strings of ``trace-circuits attack``
folders, both readings side by side (:func:`trace_circuits.perplexity.worst_window`, as the runtime computes them):
``u`` over every message token and ``u_novel`` (``perplexity_tokens="novel"``, the default since format 13), the same
worst window of ``w`` tokens over the message positions whose token did not occur earlier in the message only::

    u_novel = max_a 1/w sum_{i = a+1}^{a+w} -log p(t_{q_i} | t_<q_i)     q_1 < q_2 < ... the novel positions of M

(the model still reads the whole message; only the scoring skips repeats), and how many pass the hook set's
threshold on the reading it records. One unpadded forward per text (7 min on 2 cores for the command below).

    python benchmarks/fluency_repeats.py --hookset runs/ppl/hookset runs/attack_ppl_pre
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tqdm import tqdm


def main() -> None:
    from fluency_reading import setup

    from trace_circuits import builtin_prompts
    from trace_circuits.evaluate.attacks import ATTACKS, attack_texts
    from trace_circuits.perplexity import message_bounds, novel_positions, worst_window

    args, hs, g, model = setup(__doc__)
    tok, w = model.tokenizer, g.perplexity_window

    def scores(texts, desc):
        plain, novel = [], []
        for text in tqdm(texts, desc=desc, leave=False):
            ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
            start, last = message_bounds(ids, torch.ones_like(ids, dtype=torch.bool), g.anchor, g.opener)
            a, z = int(start[0]), int(last[0])
            lp = model(ids)[0].float().log_softmax(-1)
            nll = -lp[torch.arange(a, z), ids[0, a + 1:z + 1]]
            first = novel_positions(ids[0, a + 1:z + 1])
            plain.append(float(worst_window(nll, w)))
            novel.append(float(worst_window(nll[first], w)))
        return torch.tensor(plain), torch.tensor(novel)

    rows, natural = [], {"u": [], "u_novel": []}
    for kind in ("harmful", "benign", "hard_negative"):
        raw = list(builtin_prompts(kind, "test"))
        for t in (a for a in ATTACKS if a != "prefill"):
            u, v = scores(attack_texts(tok, raw, t), f"{kind}, {t}")
            rows.append((f"{kind} test, {t}", u, v))
            if kind != "harmful":
                natural["u"].append(u)
                natural["u_novel"].append(v)
    top_u, top_v = float(torch.cat(natural["u"]).max()), float(torch.cat(natural["u_novel"]).max())
    for folder in args.attacks:
        for name in ("gcg_undefended", "gcg_adaptive"):
            path = Path(folder) / f"{name}.jsonl"
            if path.is_file():
                texts = [json.loads(line)["text"] for line in path.read_text().splitlines() if line.strip()]
                u, v = scores(texts, name)
                rows.append((f"{folder}: {name}", u, v))
    theta, own = g.perplexity_threshold, g.perplexity_tokens
    print(f"{hs.model}: window {w}; the hook set's threshold {theta:.2f} on its reading over {own} tokens; the highest "
          f"of the benign and hard-negative test sequences: u {top_u:.2f}, u_novel {top_v:.2f}")
    print("| text | n | u median / min / max | above the natural u max | u_novel median / min / max | above the "
          f"natural u_novel max | above the hook set's threshold ({own}) |\n|---|---|---|---|---|---|---|")
    for label, u, v in rows:
        print(f"| {label} | {len(u)} | {float(u.median()):.2f} / {float(u.min()):.2f} / {float(u.max()):.2f} | "
              f"{int((u > top_u).sum())} | {float(v.median()):.2f} / {float(v.min()):.2f} / {float(v.max()):.2f} | "
              f"{int((v > top_v).sum())} | {int(((v if own == 'novel' else u) > theta).sum())} |")


if __name__ == "__main__":
    main()
