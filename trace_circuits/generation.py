"""Generation with and without a hook set, on the Hugging Face transformers model (the hook set's plain-PyTorch
twin), batched and greedy by default; resumable (finished batches are kept in ``OUT.partial``)."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Optional, Sequence

import torch
from tqdm.auto import tqdm

from trace_circuits._io import write_text_atomic
from trace_circuits.errors import TraceCircuitsError
from trace_circuits.prompts import format_prompts


class _FirstStepLogits:
    """A logits processor that keeps the first generation step's logits (the prefill's last position) unchanged."""

    def __init__(self):
        self.logits: Optional[torch.Tensor] = None

    def __call__(self, input_ids, scores):
        if self.logits is None:
            self.logits = scores.detach().float().clone()
        return scores


def first_token_log_odds(logits: torch.Tensor, token_ids: Sequence[int]) -> torch.Tensor:
    """``log sum_{t in T} p(t) - log sum_{t not in T} p(t)`` of next-token logits [batch, vocab]."""
    lp = logits.float().log_softmax(-1)
    inside = lp[:, list(token_ids)].logsumexp(-1)
    return inside - torch.log1p(-inside.exp().clamp(max=1 - 1e-7))


@torch.inference_mode()
def generate_batch(model, tokenizer, texts: Sequence[str], max_new_tokens: int = 128, hookset=None,
                   do_sample: bool = False, temperature: float = 1.0, seed: int = 0,
                   min_new_tokens: Optional[int] = None, first_token_ids: Optional[Sequence[int]] = None):
    """Generate for one batch of already-templated texts; returns (responses, gate opened per prompt), plus the
    log-odds that the first new token is one of ``first_token_ids`` when those are given (read from the same
    generation's first step, so no extra forward pass). ``min_new_tokens`` forces a fixed length (for timing)."""
    device = next(model.parameters()).device
    enc = tokenizer(list(texts), return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    return generate_encoded(model, tokenizer, enc["input_ids"], enc["attention_mask"], max_new_tokens, hookset,
                            do_sample, temperature, seed, min_new_tokens, first_token_ids)


@torch.inference_mode()
def generate_encoded(model, tokenizer, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     max_new_tokens: int = 128, hookset=None, do_sample: bool = False, temperature: float = 1.0,
                     seed: int = 0, min_new_tokens: Optional[int] = None,
                     first_token_ids: Optional[Sequence[int]] = None, cache=None):
    """:func:`generate_batch` on left-padded token ids; ``cache``: a key/value cache already holding all but the
    last prompt positions (``generate`` then runs only the rest)."""
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, pad_token_id=tokenizer.pad_token_id,
                  eos_token_id=tokenizer.eos_token_id)
    if cache is not None:
        kwargs["cache"] = cache
    if min_new_tokens:
        kwargs["min_new_tokens"] = min_new_tokens
    if do_sample:
        torch.manual_seed(seed)
        kwargs["temperature"] = temperature
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    gate = [False] * len(input_ids)
    first = _FirstStepLogits()
    if first_token_ids:
        from transformers import LogitsProcessorList

        kwargs["logits_processor"] = LogitsProcessorList([first])
    if hookset is None:
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    else:
        with hookset.attach(model) as rt:
            out = model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        if rt.gate_open is not None:
            gate = [bool(g) for g in rt.gate_open.tolist()]
    new = out[:, input_ids.shape[1]:]
    responses = tokenizer.batch_decode(new, skip_special_tokens=True)
    if first_token_ids:
        return responses, gate, first_token_log_odds(first.logits, first_token_ids).tolist()
    return responses, gate


def context_length(model) -> Optional[int]:
    """The most positions a transformers model (``max_position_embeddings``) or HookedTransformer (``n_ctx``) takes."""
    n = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    n = n or getattr(getattr(model, "cfg", None), "n_ctx", None)
    return int(n) if isinstance(n, int) and n > 0 else None


def check_context(model, tokenizer, prompts: Sequence[str], texts: Sequence[str], max_new_tokens: int) -> None:
    """Refuse, before any generation, a prompt that with ``max_new_tokens`` new tokens does not fit the model's
    context (one error line naming the prompt), as the scan does for its prompts."""
    limit = context_length(model)
    if limit is None:
        return
    lengths = [len(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]
    for raw, n in zip(prompts, lengths):
        if n + max_new_tokens > limit:
            raise TraceCircuitsError(f"a prompt is {n} tokens, and {n} + {max_new_tokens} new tokens is over the model's "
                                     f"context of {limit}; shorten it, drop it or lower --max-new-tokens: {raw[:60]!r}")


def _fingerprint(model) -> str:
    from trace_circuits.models import model_fingerprint

    return model_fingerprint(model)


def _settings_key(**settings) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def generate_responses(model, tokenizer, prompts: Sequence[str], hookset=None, max_new_tokens: int = 128,
                       batch_size: int = 16, chat: bool = True, system: Optional[str] = None, do_sample: bool = False,
                       out: Optional[str | Path] = None, progress: bool = True, hookset_id: str = "",
                       desc: Optional[str] = None, first_token_ids: Optional[Sequence[int]] = None) -> list[dict]:
    """Responses for ``prompts`` (input order kept): ``[{"prompt", "response", "hookset", "gate_opened", ...}]``;
    with ``first_token_ids`` each row also has ``first_token_log_odds`` (see :func:`generate_batch`).

    With ``out``, rows are also written to ``out`` (JSON lines, atomically at the end); finished batches are kept
    in ``out.partial`` so an interrupted run resumes where it stopped when called again with the same settings.
    """
    if max_new_tokens < 1:
        raise TraceCircuitsError("max_new_tokens must be at least 1")
    if batch_size < 1:
        raise TraceCircuitsError("batch size must be at least 1")
    plist = list(prompts)
    if not plist:
        raise TraceCircuitsError("no prompts to answer; give a file with at least one prompt")
    if hookset is not None:
        hookset.check_model(model)
    texts = format_prompts(tokenizer, plist, chat=chat, system=system)
    check_context(model, tokenizer, plist, texts, max_new_tokens)
    key = _settings_key(texts=texts, hookset=hookset_id or (hookset.to_json() if hookset else None),
                        max_new_tokens=max_new_tokens, do_sample=do_sample, first_token_ids=first_token_ids,
                        model=_fingerprint(model))
    done: dict[int, dict] = {}
    partial = Path(str(out) + ".partial") if out else None
    if partial is not None and partial.exists():
        for line in partial.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue  # a torn last line from an interrupted write
            if row.get("_key") == key:
                done[int(row["index"])] = row
    order = sorted((i for i in range(len(plist)) if i not in done), key=lambda i: len(texts[i]))
    bar = tqdm(total=len(plist), initial=len(done), desc=desc or ("generating" + (" (hook set)" if hookset else "")),
               unit="prompt", disable=not progress)
    fh = open(partial, "a") if partial is not None else None
    try:
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            t0 = time.time()
            got = generate_batch(model, tokenizer, [texts[i] for i in idx], max_new_tokens, hookset, do_sample,
                                 first_token_ids=first_token_ids)
            dt = (time.time() - t0) / len(idx)
            odds = got[2] if first_token_ids else [None] * len(idx)
            for i, r, g, o in zip(idx, got[0], got[1], odds):
                row = {"index": i, "prompt": plist[i], "response": r, "hookset": bool(hookset is not None),
                       "gate_opened": g, "seconds": round(dt, 3), "_key": key}
                if first_token_ids:
                    row["first_token_log_odds"] = o
                done[i] = row
                if fh is not None:
                    fh.write(json.dumps(row) + "\n")
            if fh is not None:
                fh.flush()
            bar.update(len(idx))
    finally:
        bar.close()
        if fh is not None:
            fh.close()
    rows = [{k: v for k, v in done[i].items() if k != "_key"} for i in range(len(plist))]
    if out is not None:
        write_text_atomic(out, "".join(json.dumps(r) + "\n" for r in rows))
        partial.unlink(missing_ok=True)
    return rows


@torch.inference_mode()
def gate_opens(model, tokenizer, texts: Sequence[str], hookset, batch_size: int = 32) -> list[bool]:
    """Whether ``hookset``'s prompt gate opens on each already-templated text, from one prefill pass with the hook set
    attached (no generation), stopped after the last layer a gate reads. Where it stays shut the defended model is
    exactly the plain one."""
    from trace_circuits.architectures import decoder_layers
    from trace_circuits.prompts import encode_padded

    device = next(model.parameters()).device
    gate_layers = [op.layer for op in hookset.operations if op.gate_source]  # as HookSet.gate_operation reads them
    stop_after = max(gate_layers) if gate_layers else None
    out: list[bool] = []
    for s in range(0, len(texts), batch_size):
        ids, mask = encode_padded(tokenizer, texts[s:s + batch_size], "left", device)
        with hookset.attach(model) as rt:
            # registered after the hook set's hooks, so it runs after the gate decided at that layer
            stop = decoder_layers(model)[stop_after].register_forward_hook(_stop) if stop_after is not None else None
            try:
                model(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0), logits_to_keep=1)
            except _GateDecided:
                pass
            finally:
                if stop is not None:
                    stop.remove()
        out += [bool(g) for g in rt.gate_open.tolist()] if rt.gate_open is not None else [True] * len(ids)
    return out


class _GateDecided(Exception):
    """Raised after the gate's layer: the rest of the forward pass cannot change the gate's decision."""


def _stop(module, args, output):
    raise _GateDecided

