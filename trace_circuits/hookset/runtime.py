"""Running a hook set: the per-sequence gate state, each operation's arithmetic, and attaching to a HookedTransformer
(TransformerLens's own ``hooks()`` context) or a transformers model (plain PyTorch hooks on the twin modules).

Gating
------
The *prompt gate* (a ``prompt_probe`` operation) decides once per sequence, in the first forward pass (the prompt,
i.e. the prefill of a generation), at the end of the user's turn ``p_b``, from the residual there or the prompt's
mean residual up to there (its ``pool``, :func:`trace_circuits.activations.read_at`): gated operations after the
probe's layer act from ``p_b`` on, and every gated operation acts at every position of the later forward passes of
that sequence (the generated tokens, or a continuation fed with the KV cache)::

    gate[b, p] = s_b > gate_threshold   for p >= p_b (layers after the probe) and every later position

A probe with a *fluency reading* (``perplexity_window``, :mod:`trace_circuits.perplexity`) also reads the model's
surprisal of the user's message at the final norm of that first pass; where it passes ``perplexity_threshold`` the
gate is open for every later pass (``gate[b, p]`` for the generated tokens), not for the prompt's own positions.

The *feature gate* (a ``gate_source`` SAE operation) opens at the first position where the source features' score
passes its threshold, counting earlier decoding steps::

    gate[b, p] = fired_before[b]  OR  any_{p' <= p} ( sum_f a_f(x[b, p']) / s_f > gate_threshold )

Where the gate stays shut the model is exactly the plain model. The state is carried across the decoding steps of
one generation (KV cache) and reset on each new prompt (a forward pass with an empty cache); with ``fwd_hooks``
(no cache) every forward pass is a new sequence.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional, Sequence

import torch
from jaxtyping import Bool

from trace_circuits.activations import message_span_max, pooled_positions, read_at
from trace_circuits.hookset.operations import Operation


def last_match(ids: Optional[torch.Tensor], valid: torch.Tensor, pattern: list[int], before: torch.Tensor
               ) -> torch.Tensor:
    """Per row, the position of the last token of the last match of ``pattern`` among the valid token ids that ends
    before ``before[b]``; -1 where there is none (or no ids were seen). [batch]"""
    B, T = valid.shape
    n = len(pattern)
    none = torch.full((B,), -1, dtype=torch.long, device=valid.device)
    if not n or ids is None or T < n:
        return none
    pos = torch.arange(n - 1, T, device=valid.device)
    windows = ids.to(valid.device).unfold(1, n, 1)  # [B, T - n + 1, n]
    hit = (windows == torch.tensor(pattern, device=valid.device)).all(-1) & valid[:, n - 1:]
    hit &= pos[None, :] < before.to(valid.device)[:, None]
    return torch.where(hit, pos, torch.full_like(pos, -1)).max(1).values


def user_turn(ids: Optional[torch.Tensor], valid: torch.Tensor, anchor: Sequence[int], opener: Sequence[int]
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(end, start, message_last)`` [batch], the one rule for where the last user turn lies: ``end`` the last token
    of the last ``anchor`` match (else the last valid position: where the probe reads), ``message_last`` the token
    before that match (else the last valid position), ``start`` the last token of the last ``opener`` match ending
    before ``end`` (-1: none; :func:`~trace_circuits.turns.turn_start_positions` on a fit's prompts). The user's
    message is ``start < q <= message_last``."""
    T = valid.shape[1]
    pos = torch.arange(T, device=valid.device)
    real_last = torch.where(valid, pos, torch.full_like(pos, -1)).max(1).values.clamp(min=0)
    match = last_match(ids, valid, list(anchor), torch.full_like(real_last, T))
    end = torch.where(match >= 0, match, real_last)
    message_last = torch.where(match >= 0, match - len(anchor), real_last)
    return end, last_match(ids, valid, list(opener), end), message_last


class Runtime:
    """Per-forward state of an attached hook set: valid positions, the gate, and whether it opened earlier."""

    def __init__(self, hookset):
        self.hookset = hookset
        self.has_gate = any(op.gate_source for op in hookset.operations)
        self.fired_before: Optional[torch.Tensor] = None  # [batch] bool
        self.valid: Optional[torch.Tensor] = None  # [batch, pos] bool or None (all valid)
        self.gate: Optional[torch.Tensor] = None  # [batch, pos] bool
        self.stats = {"forwards": 0, "gate_open_positions": 0, "positions": 0, "gate_decisions": 0, "fluency_unread": 0}
        self.started_by_call = False
        self.new_sequence = True  # the current forward pass starts a sequence (the prompt gate decides in it)
        self.input_ids: Optional[torch.Tensor] = None  # [batch, pos] token ids of this forward, when seen
        self.prompt_scores: Optional[torch.Tensor] = None  # [batch] the prompt gate's scores of this sequence
        self.prompt_score_tensor: Optional[torch.Tensor] = None  # the same, on the model's device, with autograd
        self.message_scores: Optional[torch.Tensor] = None  # [batch] the probe's message reading (if any)
        self.message_score_tensor: Optional[torch.Tensor] = None
        self._device_ops: dict[int, Operation] = {}
        self._marks: dict[tuple, torch.Tensor] = {}  # (op id, device) -> its message_boundary ids there
        self.unembed: Optional[tuple] = None  # the model's (W_U, b_U, soft cap), for the fluency reading
        self.fluency_pending = True  # the fluency reading has not read this sequence's prompt yet
        self.perplexity_scores: Optional[torch.Tensor] = None  # [batch] u of the fluency reading (if any)

    def start(self, attention_mask: Optional[torch.Tensor], new_sequence: bool,
              input_ids: Optional[torch.Tensor] = None) -> None:
        self.stats["forwards"] += 1
        self.gate = None
        self.input_ids = input_ids if isinstance(input_ids, torch.Tensor) and input_ids.dim() == 2 else None
        self.valid = None if attention_mask is None else attention_mask.bool()
        self.new_sequence = new_sequence
        if new_sequence:
            self.fired_before = None
            self.fluency_pending = True
            self.perplexity_scores = None
            self.prompt_scores = None
            self.prompt_score_tensor = None
            self.message_scores = None
            self.message_score_tensor = None

    @property
    def gate_open(self) -> Optional[torch.Tensor]:
        """Per sequence of the current batch: has the gate opened so far (None before any forward)."""
        return self.fired_before

    def _on(self, op: Operation, device) -> Operation:
        """The operation with its tensors on ``device`` (moved once, then reused)."""
        cached = self._device_ops.get(id(op))
        if cached is None or next(iter(cached.tensors.values()), torch.empty(0, device=device)).device != device:
            cached = Operation(**{**vars(op), "tensors": {k: v.to(device) for k, v in op.tensors.items()}})
            self._device_ops[id(op)] = cached
        return cached

    def _boundary(self, op: Operation, ids: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """[batch, pos] bool: the tokens that end a sentence (``sentence`` reading; None without token ids: the
        message is then read whole)."""
        if op.message_reading != "sentence" or ids is None:
            return None
        key = (id(op), ids.device)
        marks = self._marks.get(key)
        if marks is None:
            marks = self._marks[key] = torch.tensor(op.message_boundary, dtype=torch.long, device=ids.device)
        return torch.isin(ids, marks)

    def _ids_for(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """The token ids of this forward pass where they were seen and match ``x``'s [batch, pos], else None."""
        ids = self.input_ids
        return ids if ids is not None and tuple(ids.shape) == tuple(x.shape[:2]) else None

    def _valid_for(self, x: torch.Tensor) -> torch.Tensor:
        B, T = x.shape[:2]
        if self.valid is not None and self.valid.shape[0] == B and self.valid.shape[1] >= T:
            return self.valid[:, -T:].to(x.device)
        return torch.ones(B, T, dtype=torch.bool, device=x.device)

    def _gate_for(self, x: torch.Tensor) -> torch.Tensor:
        B, T = x.shape[:2]
        if not self.has_gate:
            return torch.ones(B, T, dtype=torch.bool, device=x.device)
        if self.gate is None or self.gate.shape != (B, T):
            before = self.fired_before
            if before is None or before.shape[0] != B:
                before = torch.zeros(B, dtype=torch.bool, device=x.device)
            self.gate = before[:, None].expand(B, T).clone()
        return self.gate

    def _open_gate(self, fired: Bool[torch.Tensor, "batch pos"]) -> None:
        gate = self._gate_for(fired) | (fired.long().cumsum(1) > 0)
        self.gate = gate
        self.fired_before = gate[:, -1].clone()
        self.stats["gate_open_positions"] += int(gate.sum())
        self.stats["positions"] += int(gate.numel())

    def _where(self, op: Operation, act: torch.Tensor) -> torch.Tensor:
        """[batch, pos] where a gated operation acts: the open gate (else everywhere)."""
        if op.gated:
            return self._gate_for(act)
        return torch.ones(act.shape[:2], dtype=torch.bool, device=act.device)

    # -- the operations; each maps a hooked activation to its replacement ------------------------------------

    def sae_features(self, op: Operation, x: torch.Tensor) -> torch.Tensor:
        if op.gated and not op.gate_source and not self._gate_for(x).any():
            return x  # gate shut everywhere: nothing to do (and nothing to compute)
        op = self._on(op, x.device)
        enc = op.encoder
        xf = x.float()
        acts = enc.encode(xf)  # [B, T, n]
        ok = self._valid_for(x)
        if op.massive_norm_threshold is not None:
            ok = ok & (xf.norm(dim=-1) <= op.massive_norm_threshold)
        if op.gate_source:
            score = (acts / torch.tensor(op.gate_scales, device=x.device)).sum(-1)
            self._open_gate((score > op.gate_threshold) & ok)
        mask = (acts > torch.tensor(op.zero_thresholds, device=x.device)) & ok[..., None]
        if op.gated:
            mask = mask & self._gate_for(x)[..., None]
        removed = enc.contribution(xf, torch.where(mask, acts, torch.zeros_like(acts)))
        return torch.where(ok[..., None], xf - (1.0 - op.scale) * removed, xf).to(x.dtype)

    def heads(self, op: Operation, z: torch.Tensor) -> torch.Tensor:
        where = self._where(op, z)
        if not where.any():
            return z
        z = z.clone()
        h = list(op.heads)
        z[:, :, h] = torch.where(where[:, :, None, None], z[:, :, h] * op.scale, z[:, :, h])
        return z

    def mlp(self, op: Operation, m: torch.Tensor) -> torch.Tensor:
        where = self._where(op, m)
        if not where.any():
            return m
        return torch.where(where[..., None], m * op.scale, m)

    def direction(self, op: Operation, x: torch.Tensor) -> torch.Tensor:
        where = self._where(op, x)
        if not where.any():
            return x
        r = self._on(op, x.device).tensors["r"].float()
        xf = x.float()
        new = xf - (xf @ r)[..., None] * r if op.mode == "ablate" else xf + op.alpha * r
        return torch.where(where[..., None], new, xf).to(x.dtype)

    def prompt_probe(self, op: Operation, x: torch.Tensor) -> torch.Tensor:
        """Decide the gate once per sequence at the end of the user's turn; returns ``x`` unchanged."""
        if not self.new_sequence:
            return x  # later forward passes of the sequence keep the decision
        B, T = x.shape[:2]
        valid = self._valid_for(x)
        pos = torch.arange(T, device=x.device)
        ids = self._ids_for(x)
        last, start, message_last = user_turn(ids, valid, op.anchor, op.opener)
        start = start if op.pool == "turn" else None
        t = self._on(op, x.device).tensors
        h = read_at(x, valid, last, op.pool, op.massive_norm_threshold, start)
        score = ((h - t["mu"]) @ t["r"]) / op.gap
        self.prompt_score_tensor = score  # differentiable (the adaptive attack's gate term)
        fired = score > op.gate_threshold
        if op.message_threshold is not None:  # every span of the user's message (operations module docstring)
            q = pooled_positions(x, valid, message_last, op.massive_norm_threshold, start)
            m = message_span_max(x, q, t["r"][:, None], op.message_min_tokens, op.message_reading,
                                 self._boundary(op, ids))[:, 0]
            m = (m - t["mu"] @ t["r"]) / op.gap
            self.message_score_tensor, self.message_scores = m, m.detach().cpu()
            fired = fired | (m > op.message_threshold)
        self.gate = (pos[None, :] >= last[:, None]) & fired[:, None]
        self.fired_before = fired.clone()
        self.prompt_scores = score.detach().cpu()
        self.new_sequence = False
        self.stats["gate_decisions"] += 1
        self.stats["gate_open_positions"] += int(self.gate.sum())
        self.stats["positions"] += B * T
        return x

    def fluency(self, op: Operation, normed: torch.Tensor) -> None:
        """The probe's fluency reading (:mod:`trace_circuits.perplexity`), at the final norm of the prompt's pass:
        opens the gate for the sequence's later passes where ``u > perplexity_threshold``."""
        from trace_circuits.perplexity import message_bounds, window_surprisal

        if not self.fluency_pending or self.unembed is None:
            return
        self.fluency_pending = False
        ids = self._ids_for(normed)
        if ids is None:
            self.stats["fluency_unread"] += 1  # no token ids seen (a forward from embeddings): nothing to read
            return
        ids = ids.to(normed.device)
        start, last = message_bounds(ids, self._valid_for(normed), op.anchor, op.opener)
        with torch.no_grad():
            u = window_surprisal(normed.detach(), ids, start, last, self.unembed, op.perplexity_window,
                                 op.perplexity_tokens)
        fired = (u > op.perplexity_threshold).to(normed.device)
        self.perplexity_scores = u.float().cpu()
        before = self.fired_before if self.fired_before is not None and self.fired_before.shape == fired.shape \
            else torch.zeros_like(fired)
        self.fired_before = before.to(fired.device) | fired

    def apply(self, op: Operation, act: torch.Tensor) -> torch.Tensor:
        return getattr(self, op.kind)(op, act)


# ----------------------------------------------------------------------------------------------------------
# Attaching


def is_hooked_transformer(model) -> bool:
    return hasattr(model, "hook_dict") and hasattr(model, "cfg") and hasattr(model, "blocks")


def _tl_start(rt: Runtime):
    """Module pre-hook: sees the call's arguments (KV cache, attention mask) when the model is called."""

    def pre(module, args, kwargs):
        cache = kwargs.get("past_kv_cache")
        new = cache is None or cache.entries[0].past_keys.shape[1] == 0
        rt.start(kwargs.get("attention_mask"), new_sequence=new, input_ids=args[0] if args else kwargs.get("input"))
        rt.started_by_call = kwargs.get("start_at_layer") is None  # then the embedding runs (from token ids)
        return None

    return pre


def _tl_embed_start(rt: Runtime):
    """Pre-hook of the ``embed`` module, which sees the token ids in every TransformerLens path. ``generate`` (3.x)
    embeds the prompt itself and calls ``forward`` with the embeddings (no module pre-hook, no ``hook_embed``); then
    an embedding of more than one position (or of a new batch size) starts a new sequence and a single position
    continues the previous one (a KV-cache decoding step). After a call of the model itself (its pre-hook ran) only
    the token ids are kept."""

    def pre(module, args):
        tokens = args[0] if args and torch.is_tensor(args[0]) and args[0].dim() == 2 else None
        if rt.started_by_call:
            rt.started_by_call = False
            if rt.input_ids is None:
                rt.input_ids = tokens
            return None
        before = rt.fired_before
        rt.start(None, new_sequence=tokens is None or tokens.shape[1] > 1 or before is None
                 or before.shape[0] != tokens.shape[0], input_ids=tokens)
        return None

    return pre


def _hf_start(rt: Runtime):
    def pre(module, args, kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))  # transformers >= 5.2x passes `cache` in generate
        new = cache is None or cache.get_seq_length() == 0
        rt.start(kwargs.get("attention_mask"), new_sequence=new, input_ids=kwargs.get("input_ids",
                                                                                        args[0] if args else None))
        return None

    return pre


def _hf_hook(rt: Runtime, op: Operation, how: str, n_heads: int, d_head: int):
    """A PyTorch hook that applies ``op`` to the twin module's output (``forward``) or first input
    (``forward_pre``; attention z arrives flattened as [.., n_heads * d_head])."""
    if how == "forward":
        def post(module, args, output):
            if isinstance(output, tuple):
                return (rt.apply(op, output[0]),) + tuple(output[1:])
            return rt.apply(op, output)

        return post

    def pre(module, args):
        x = args[0]
        if op.kind == "heads":
            return (rt.apply(op, x.reshape(*x.shape[:-1], n_heads, d_head)).reshape(x.shape),) + tuple(args[1:])
        return (rt.apply(op, x),) + tuple(args[1:])

    return pre


@contextlib.contextmanager
def attached(hookset, model) -> Iterator[Runtime]:
    """Attach ``hookset`` to a HookedTransformer or a transformers causal LM for the ``with`` block; yields the
    runtime (``.gate_open``, ``.prompt_scores``, ``.stats``)."""
    from trace_circuits.architectures import architecture_of

    hookset.check_model(model)
    rt = Runtime(hookset)
    handles = []
    with contextlib.ExitStack() as stack:
        stack.callback(lambda: [h.remove() for h in handles])
        if is_hooked_transformer(model):
            # TransformerLens's own context manager adds the hooks and removes exactly these on exit.
            handles.append(model.register_forward_pre_hook(_tl_start(rt), with_kwargs=True))
            handles.append(model.embed.register_forward_pre_hook(_tl_embed_start(rt)))
            fwd: list[tuple[str, Callable]] = [(op.hook_name, lambda act, hook, op=op: rt.apply(op, act))
                                               for op in hookset.operations]
            stack.enter_context(model.hooks(fwd_hooks=fwd))
        else:
            arch = architecture_of(model)
            handles.append(model.register_forward_pre_hook(_hf_start(rt), with_kwargs=True))
            for op in hookset.operations:
                path, how = arch.twin(op.hook_name)
                module = model.get_submodule(path)
                fn = _hf_hook(rt, op, how, hookset.n_heads, hookset.d_head)
                handles.append(module.register_forward_hook(fn) if how == "forward"
                               else module.register_forward_pre_hook(fn))
        gate = hookset.gate_operation
        if gate is not None and gate.kind == "prompt_probe" and gate.perplexity_window:
            from trace_circuits.perplexity import final_norm, unembedding

            w_u, b_u, cap = unembedding(model)  # read in float32 whatever the model runs in (as calibrated)
            rt.unembed = (w_u.detach().float(), None if b_u is None else b_u.detach().float(), cap)
            handles.append(final_norm(model).register_forward_hook(
                lambda mod, args, out: rt.fluency(gate, out[0] if isinstance(out, tuple) else out)))
        yield rt


def fwd_hooks(hookset, model=None) -> list[tuple[str, Callable]]:
    """``[(hook_name, fn)]`` for ``HookedTransformer.run_with_hooks`` / ``model.hooks(fwd_hooks=...)``; each forward
    pass is a new sequence (use :func:`attached` for generation with a KV cache)."""
    if model is not None:
        hookset.check_model(model)
    rt = Runtime(hookset)

    def reset(act, hook):
        rt.start(None, new_sequence=True)
        return None

    return [("hook_embed", reset)] + [(op.hook_name, lambda act, hook, op=op: rt.apply(op, act))
                                      for op in hookset.operations]
