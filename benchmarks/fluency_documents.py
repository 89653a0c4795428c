"""How often does the fluency reading open on a benign document pasted into the user's message? The reading
(:mod:`trace_circuits.perplexity`) is calibrated on short requests; a deployer's users also paste text and code.
This scores CPython's own documentation chunks (``corpus.prose_documents``: the reference manual and the standard
library's docstrings, code examples, signatures and identifiers included), each cut to ``L`` tokens and sent as
"<instruction>\\n\\n<document>" under the chat template, with both readings side by side (every message token,
``u``, and first occurrences only, ``u_novel``; README, "A third reading") and the share above the hook set's
threshold on the reading it records, and the documents it opens on. One batched pass per length and reading (about
28 min on 2 cores beside an attack run, most of it the 1024-token pass).

    python benchmarks/fluency_documents.py --hookset runs/novel/hookset
"""

from __future__ import annotations

import itertools

import torch


def main() -> None:
    from fluency_reading import setup

    from trace_circuits import encode_prompts
    from trace_circuits.corpus import prose_documents
    from trace_circuits.evaluate.attacks import attack_texts
    from trace_circuits.perplexity import surprisal_scores

    args, hs, g, model = setup(__doc__)
    tok, theta, own = model.tokenizer, g.perplexity_threshold, g.perplexity_tokens
    docs = list(prose_documents(min_chars=1500, max_chars=6000))
    docs = docs[::max(1, len(docs) // 64)][:64]  # evenly over the manual's topics and the modules
    asks = ("Summarise the following text:", "Explain this to me in plain words:", "Proofread this:")
    print(f"{hs.model}: window {g.perplexity_window}, threshold {theta:.2f} on the reading over {own} tokens; "
          f"{len(docs)} documents")
    print(f"| tokens | n | u median / max | u_novel median / max | above the threshold ({own}) |\n"
          "|---|---|---|---|---|")
    opened: set[str] = set()
    for length in (64, 256, 1024):
        cut = [tok.decode(tok(d["text"], add_special_tokens=False)["input_ids"][:length]) for d in docs]
        texts = attack_texts(tok, [f"{a}\n\n{d}" for a, d in zip(itertools.cycle(asks), cut)], "direct")
        enc = encode_prompts(model, texts, chat=False)
        u, v = (surprisal_scores(model, enc, g.perplexity_window, g.anchor, g.opener, batch_size=8, progress=True,
                                 desc=f"{length} tokens, {t}", tokens=t) for t in ("all", "novel"))
        own_u = v if own == "novel" else u
        print(f"| {length} | {len(texts)} | {float(u.median()):.2f} / {float(u.max()):.2f} | {float(v.median()):.2f} / "
              f"{float(v.max()):.2f} | {int((own_u > theta).sum())} ({float((own_u > theta).float().mean()):.0%}) |")
        opened.update(docs[i]["source"] for i in (own_u > theta).nonzero().flatten().tolist())
    print("opened on:", ", ".join(sorted(opened)) or "none")


if __name__ == "__main__":
    main()
