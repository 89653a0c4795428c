"""Where a user's turn starts and ends in a chat-formatted prompt, found from the chat template's own token ids (the
prompt gate reads there, at calibration and at inference alike)."""

from __future__ import annotations

from typing import Sequence

from trace_circuits.prompts import EncodedPrompts


def user_turn_end(model_or_tokenizer) -> list[int]:
    """Token ids that close a user turn in the chat template (what the template puts after the user's message, up to
    where the assistant's answer begins), or [] if the tokenizer has no chat template."""
    from trace_circuits.prompts import format_prompts, uses_chat_template

    tokenizer = getattr(model_or_tokenizer, "tokenizer", model_or_tokenizer)
    if tokenizer is None or not uses_chat_template(model_or_tokenizer):
        return []
    marker = "\x00TRACE\x00"
    text = format_prompts(tokenizer, [marker], chat=True)[0]
    tail = text[text.index(marker) + len(marker):]
    return list(tokenizer(tail, add_special_tokens=False)["input_ids"]) if tail else []


def user_turn_start(model_or_tokenizer) -> list[int]:
    """Token ids that open a user turn in the chat template (the header right before the user's message, as it
    stands both at the first turn and after an assistant's answer), or [] if the tokenizer has no chat template."""
    from trace_circuits.prompts import uses_chat_template

    tokenizer = getattr(model_or_tokenizer, "tokenizer", model_or_tokenizer)
    if tokenizer is None or not uses_chat_template(model_or_tokenizer):
        return []
    one, two, answer = "\x00ONE\x00", "\x00TWO\x00", "\x00ANS\x00"
    turns = [{"role": "user", "content": one}, {"role": "assistant", "content": answer},
             {"role": "user", "content": two}]
    first = tokenizer.apply_chat_template(turns[:1], tokenize=False, add_generation_prompt=True)
    later = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    between = later[later.index(answer) + len(answer):later.index(two)]
    a = list(tokenizer(first[:first.index(one)], add_special_tokens=False)["input_ids"])
    b = list(tokenizer(between, add_special_tokens=False)["input_ids"])
    n = 0
    while n < min(len(a), len(b)) and a[-1 - n] == b[-1 - n]:
        n += 1
    return a[len(a) - n:]


def last_match_end(ids: Sequence[int], pattern: Sequence[int], before: int) -> int:
    """The index of the last token of the last match of ``pattern`` in ``ids`` that ends before ``before``, else -1
    (:func:`trace_circuits.hookset.runtime.last_match` on padded tensors)."""
    n, pattern = len(pattern), list(pattern)
    for i in range(min(len(ids), before) - n, -1, -1) if n else ():
        if list(ids[i:i + n]) == pattern:
            return i + n - 1
    return -1


def turn_start_positions(encoded: EncodedPrompts, opener: Sequence[int], ends: Sequence[int]) -> list[int]:
    """Per prompt, the index of the last token of the last ``opener`` match that ends before ``ends[i]`` (the
    header of the last user turn), else -1: where a ``turn`` prompt gate starts reading, as the runtime finds it."""
    return [last_match_end(ids, opener, end) for ids, end in zip(encoded.input_ids, ends)]


def anchor_positions(encoded: EncodedPrompts, anchor: Sequence[int]) -> list[int]:
    """Per prompt, the index of the last token of the last ``anchor`` match (the end of the last user turn), else
    its last token: where the prompt gate reads, exactly as the runtime finds it."""
    out = []
    for ids in encoded.input_ids:
        end = last_match_end(ids, anchor, len(ids))
        out.append(end if end >= 0 else len(ids) - 1)
    return out
