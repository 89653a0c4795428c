"""An attacker who knows the defense: a GCG suffix attack (Zou et al. 2023) optimised against the hook set itself.

The attacked text is the chat template over one user turn, ``request + suffix`` (``n`` ordinary tokens, initially
" !" x n; ``position="prefix"``: ``suffix + " " + request``, a preamble the attacker writes before the request), then
the target ``y`` (default "Sure, here is") teacher-forced after the assistant header. Its token ids
are ``[prefix | suffix | post | y]``; ``post`` ends the user's turn (the prompt gate's anchor, read at its last token
``p``).

Loss. Against the undefended model::

    L = CE = -1/|y| sum_i log p(y_i | prefix, suffix, post, y_<i)

Against the defense (adaptive) the CE is taken with the hook set attached (its cuts and steering act on the target
tokens once the gate opens), plus a term that pushes the prompt gate shut::

    L = CE_hookset + lambda * softplus((s - theta) / tau),      s = <h - mu, r> / gap

``h`` is what the probe reads at layer ``l`` (``x_l[p]``, or the prompt's mean residual up to ``p`` for a ``mean``
probe, its last user turn's for a ``turn`` probe), ``theta`` the gate threshold: the term is ~0 once ``s`` is a few
``tau`` below ``theta`` and ~``lambda (s - theta) / tau`` above it. A probe with a ``message_threshold`` adds the
same term for its message reading ``m``, the best span of the message (``lambda softplus((m - theta_m) / tau)``),
which a suffix can raise but not lower (a preamble can lower it). ``s`` is the runtime's own score of the pass
(with autograd), so the attack optimises exactly what the deployed gate computes. A probe with a fluency reading
(``perplexity_window``, :mod:`trace_circuits.perplexity`) adds ``lambda softplus((u - theta_u) / tau)`` for the
message's surprisal ``u`` (over its novel tokens where the hook set says so): the attacker must also keep its tokens
unsurprising to the model.

Greedy coordinate gradient, per step: the gradient of L w.r.t. the one-hot suffix tokens (TransformerLens autograd,
hook set attached); per position the ``top_k`` ordinary tokens with the most negative gradient; ``candidates`` copies
of the suffix with one random position swapped for one of its top-k tokens, kept if the text re-tokenizes to the
same ids; L of every candidate computed exactly (forward with the hook set attached); the suffix moves to the best
candidate and the best suffix seen is kept. ``early_stop``: a prompt stops once every target token is the greedy one
(and, against the defense, the gate is shut). Deterministic for a seed (one generator per prompt).

Speed: the ``prefix`` is run once into a frozen KV cache when the hook set cannot touch it (every operation but the
probe is gated, so nothing acts before ``p``, and the probe reads only ``p``); otherwise every pass runs the whole
sequence. Tested equal.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from trace_circuits.activations import expand_cache, frozen_prefix_cache
from trace_circuits.config import _at_least, opt
from trace_circuits.errors import TraceCircuitsError

SUFFIXES = ("undefended", "adaptive")  # the objective a suffix was optimised against


@dataclass
class AttackConfig:
    """The adaptive attack's settings (``trace-circuits attack``)."""

    limit: int = opt(20, "harmful test prompts attacked")
    steps: int = opt(100, "GCG steps per prompt")
    suffix_length: int = opt(20, "adversarial suffix tokens", flag="suffix-tokens")
    position: str = opt("suffix", "where the adversarial tokens go in the user's message: 'suffix' (after the "
                                  "request) or 'prefix' (a preamble before it, which changes every residual of the "
                                  "request the gate reads)", choices=("suffix", "prefix"))
    top_k: int = opt(256, "candidate tokens per suffix position (most negative gradient)")
    candidates: int = opt(64, "single-token swaps evaluated exactly per step")
    target: str = opt("Sure, here is", "the answer start the attack optimises for")
    gate_weight: float = opt(1.0, "lambda, weight of the gate term softplus((s - threshold) / tau)")
    gate_temperature: float = opt(1.0, "tau of the gate term, in gate-score units")
    early_stop: bool = opt(True, "stop a prompt once every target token is greedy (and, against the defense, the gate "
                                 "is shut)")
    seed: int = opt(0, "random seed of the candidate sampling")
    max_new_tokens: int = opt(32, "tokens per judged answer")
    batch_size: int = opt(16, "prompts per generate call")
    judge_benign: int = opt(50, "benign test prompts whose undefended answers calibrate the relevance judge")
    harmful: Optional[str] = opt(None, "harmful prompts file; default: the built-in harmful test split")
    device: str = opt("auto", "auto (CUDA when present), cpu, cuda or cuda:N")

    def check(self) -> "AttackConfig":
        from trace_circuits.models import resolve_device

        _at_least(self, 1, "limit", "steps", "suffix_length", "top_k", "candidates", "max_new_tokens", "batch_size")
        _at_least(self, 4, "judge_benign")
        _at_least(self, 0, "gate_weight")
        if not self.gate_temperature > 0:
            raise TraceCircuitsError(f"--gate-temperature must be > 0, got {self.gate_temperature}")
        if self.position not in ("suffix", "prefix"):
            raise TraceCircuitsError(f"--position must be suffix or prefix, got {self.position!r}")
        if not self.target.strip():
            raise TraceCircuitsError("--target must be a non-empty string such as 'Sure, here is'")
        resolve_device(self.device)
        return self


# ----------------------------------------------------------------------------------------------------------------
# Tokens


@dataclass
class Layout:
    """One request's attacked text: ``before + suffix text + after``, tokenized as ``prefix + suffix + post``."""

    prompt: str
    before: str
    after: str
    prefix: list[int]
    post: list[int]
    target: list[int]

    def text(self, tokenizer, suffix: Sequence[int]) -> str:
        return self.before + decode(tokenizer, suffix) + self.after


def decode(tokenizer, ids: Sequence[int]) -> str:
    return tokenizer.decode([int(i) for i in ids], clean_up_tokenization_spaces=False)


def layout(tokenizer, prompt: str, target: str, position: str = "suffix") -> Layout:
    """The chat template around ``prompt + suffix`` (the user's message; ``position="prefix"``: ``suffix + " " +
    prompt``), as :func:`attack_texts` builds it."""
    if not getattr(tokenizer, "chat_template", None):
        raise TraceCircuitsError("the adaptive attack needs a chat model (the tokenizer has no chat template)")
    marker = "\x00SUFFIX\x00"
    content = prompt + marker if position == "suffix" else marker + " " + prompt
    text = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True)
    before, after = text.split(marker)
    enc = lambda s: list(tokenizer(s, add_special_tokens=False)["input_ids"])  # noqa: E731
    return Layout(prompt, before, after, enc(before), enc(after), enc(target))


def stable(tokenizer, lay: Layout, cands: torch.Tensor) -> torch.Tensor:
    """[B] bool: the candidate's text re-tokenizes to exactly ``prefix + candidate + post``."""
    rows = cands.tolist()
    got = tokenizer([lay.text(tokenizer, c) for c in rows], add_special_tokens=False)["input_ids"]
    return torch.tensor([list(g) == lay.prefix + c + lay.post for g, c in zip(got, rows)], dtype=torch.bool)


def ordinary_tokens(tokenizer, vocab_size: int) -> torch.Tensor:
    """[vocab] bool: tokens a suffix may use: not special or added, printable ASCII text, no chat markup, and the
    token's text tokenizes back to the token alone."""
    n = min(vocab_size, len(tokenizer))
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    texts = [decode(tokenizer, [t]) for t in range(n)]
    back = tokenizer(texts, add_special_tokens=False)["input_ids"]
    ok = torch.zeros(vocab_size, dtype=torch.bool)
    for t, (s, b) in enumerate(zip(texts, back)):
        ok[t] = (t not in special and bool(s) and s.isascii() and s.isprintable() and "<|" not in s
                 and list(b) == [t])
    return ok


# ----------------------------------------------------------------------------------------------------------------
# The objective


class Objective:
    """``L(suffix)`` for one request (module docstring); ``hookset`` None = the undefended model (CE alone)."""

    def __init__(self, model, lay: Layout, hookset=None, gate_weight: float = 1.0, gate_temperature: float = 1.0,
                 use_cache: bool = True):
        self.model, self.lay, self.hookset = model, lay, hookset
        self.gate_weight, self.tau = float(gate_weight), float(gate_temperature)
        self.gate = None if hookset is None else hookset.gate_operation
        if hookset is not None and (self.gate is None or self.gate.kind != "prompt_probe"):
            raise TraceCircuitsError("the adaptive attack needs a hook set with a prompt gate (prompt_probe); export "
                                     "one with `trace-circuits trace --gate-kind prompt`")
        dev = next(model.parameters()).device
        self.prefix, self.post, self.target = (torch.tensor(v, device=dev) for v in (lay.prefix, lay.post,
                                                                                      lay.target))
        plain_prefix = hookset is None or (self.gate.pool == "last" and not self.gate.perplexity_window and all(
            op.gated for op in hookset.operations if op.kind != "prompt_probe"))  # a mean probe reads the prefix too
        self.cache = frozen_prefix_cache(model, self.prefix, model.cfg.n_layers)[0] if use_cache and plain_prefix \
            else None

    def _forward(self, suffix: torch.Tensor, one_hot: Optional[torch.Tensor] = None) -> dict:
        m = self.model
        B, n = suffix.shape
        tail = torch.cat([suffix, self.post.expand(B, -1), self.target.expand(B, -1)], 1)
        ids = tail if self.cache is not None else torch.cat([self.prefix.expand(B, -1), tail], 1)
        off = ids.shape[1] - tail.shape[1]  # where the suffix starts in ids
        with contextlib.ExitStack() as stack:
            if self.hookset is not None:
                rt = stack.enter_context(self.hookset.attach(m))
                if self.cache is not None:  # the cached prefix lies before the anchor: this pass starts the sequence
                    h = m.register_forward_pre_hook(
                        lambda mod, args, kw: rt.start(kw.get("attention_mask"), True, args[0] if args else None),
                        with_kwargs=True)
                    stack.callback(h.remove)
            if one_hot is not None:
                def embed(act, hook):
                    e = (one_hot @ m.W_E).to(act.dtype)
                    return torch.cat([act[:, :off], act[:, off:off + n] + (e - e.detach())[None], act[:, off + n:]], 1)

                stack.enter_context(m.hooks(fwd_hooks=[("hook_embed", embed)]))
            resid = m(ids, attention_mask=torch.ones_like(ids), stop_at_layer=m.cfg.n_layers,
                      past_kv_cache=expand_cache(self.cache, B) if self.cache is not None else None)
        where = off + n + len(self.post) + torch.arange(len(self.target), device=ids.device) - 1
        logits = m.unembed(m.ln_final(resid[:, where]) if m.cfg.normalization_type else resid[:, where]).float()
        if getattr(m.cfg, "output_logits_soft_cap", 0) and m.cfg.output_logits_soft_cap > 0:
            cap = m.cfg.output_logits_soft_cap
            logits = cap * torch.tanh(logits / cap)
        tgt = self.target.expand(B, -1)
        ce = F.cross_entropy(logits.transpose(1, 2), tgt, reduction="none").mean(1)
        out = {"ce": ce, "match": (logits.argmax(-1) == tgt).all(1)}
        if self.hookset is None:
            out["loss"] = ce
            return out
        g, s = self.gate, rt.prompt_score_tensor  # the runtime's own score, with autograd
        if s is None or s.shape != (B,):
            raise TraceCircuitsError("the hook set's prompt gate did not score this pass; the probe must read the "
                                     "attacked sequence")
        gate_term = self.gate_weight * F.softplus((s - g.gate_threshold) / self.tau)
        m = rt.message_score_tensor
        if m is not None:  # the message reading (a suffix can only raise it)
            gate_term = gate_term + self.gate_weight * F.softplus((m - g.message_threshold) / self.tau)
        opened = rt.gate_open.cpu()  # the runtime's decision
        if g.perplexity_window:  # the fluency reading (decided at the final norm, which this pass stops before)
            from trace_circuits.perplexity import message_bounds, unembedding, window_surprisal

            valid = torch.ones_like(ids, dtype=torch.bool)
            start, last = message_bounds(ids, valid, g.anchor, g.opener)
            u = window_surprisal(self.model.ln_final(resid), ids, start, last, unembedding(self.model),
                                 g.perplexity_window, g.perplexity_tokens)
            gate_term = gate_term + self.gate_weight * F.softplus((u - g.perplexity_threshold) / self.tau)
            opened = opened | (u > g.perplexity_threshold).cpu()
            out["surprisal"] = u
        out.update(score=s, gate_term=gate_term, open=opened, loss=ce + gate_term)
        return out

    @torch.no_grad()
    def evaluate(self, suffixes: torch.Tensor, chunk: int = 64) -> dict:
        """Exact loss parts of each suffix [B, n] (``loss``, ``ce``, ``match``; against the defense also ``score``,
        ``gate_term``, ``open``), detached, on the CPU."""
        parts = [self._forward(suffixes[i:i + chunk].to(self.prefix.device)) for i in range(0, len(suffixes), chunk)]
        return {k: torch.cat([p[k].detach().cpu() for p in parts]) for k in parts[0]}

    def gradient(self, suffix: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """``dL/d one_hot`` [n, vocab] at the suffix [n], and the loss parts."""
        one_hot = F.one_hot(suffix.to(self.prefix.device), self.model.cfg.d_vocab).to(self.model.W_E.dtype)
        one_hot.requires_grad_(True)
        parts = self._forward(suffix[None].to(self.prefix.device), one_hot)
        (grad,) = torch.autograd.grad(parts["loss"].sum(), one_hot)  # the weights' gradients are not computed
        return grad, {k: v.detach().cpu() for k, v in parts.items()}

    def reached(self, parts: dict, i: int = 0) -> bool:
        """The attack's objective: every target token greedy, and (against the defense) the gate shut."""
        return bool(parts["match"][i]) and (self.hookset is None or not bool(parts["open"][i]))


# ----------------------------------------------------------------------------------------------------------------
# GCG


def gcg(objective: Objective, init: torch.Tensor, allowed: torch.Tensor, *, steps: int, top_k: int, candidates: int,
        generator: torch.Generator, is_stable: Callable[[torch.Tensor], torch.Tensor], early_stop: bool = True,
        on_step: Optional[Callable[[dict], None]] = None) -> dict:
    """Greedy coordinate gradient from ``init`` [n] (module docstring). Returns the best ``suffix`` seen, its exact
    loss ``best_loss`` and step, the loss after each step (``history``; index 0 = ``init``), the steps run and
    whether the objective was ``reached``."""
    suffix = init.clone().cpu()
    cur = objective.evaluate(suffix[None])
    best = {"suffix": suffix.clone(), "loss": float(cur["loss"][0]), "step": 0}
    history, run, reached = [best["loss"]], 0, objective.reached(cur)
    k = min(top_k, int(allowed.sum()))
    for step in range(1, steps + 1):
        if early_stop and reached:
            break
        grad, _ = objective.gradient(suffix)
        grad = grad.cpu().float().masked_fill(~allowed[:grad.shape[1]], float("inf"))
        top = (-grad).topk(k, dim=1).indices  # [n, k]
        pos = torch.randint(len(suffix), (candidates,), generator=generator)
        pick = torch.randint(k, (candidates,), generator=generator)
        cands = suffix.repeat(candidates, 1)
        cands[torch.arange(candidates), pos] = top[pos, pick]
        cands = torch.unique(cands[(cands != suffix).any(1)], dim=0)
        cands = cands[is_stable(cands)] if len(cands) else cands
        run = step
        if len(cands):
            parts = objective.evaluate(cands)
            i = int(parts["loss"].argmin())
            suffix, cur = cands[i].clone(), {k_: v[i:i + 1] for k_, v in parts.items()}
            reached = objective.reached(cur)
            if float(cur["loss"][0]) < best["loss"]:
                best = {"suffix": suffix.clone(), "loss": float(cur["loss"][0]), "step": step}
        history.append(float(cur["loss"][0]))
        if on_step is not None:
            on_step({k_: float(v[0]) for k_, v in cur.items()})
    return {"suffix": best["suffix"], "best_loss": best["loss"], "best_step": best["step"], "history": history,
            "steps_run": run, "reached": reached}


# ----------------------------------------------------------------------------------------------------------------
# Many prompts, resumable


def _settings_key(model, hookset, cfg: AttackConfig, against: str) -> str:
    from trace_circuits.models import model_fingerprint

    keep = {k: v for k, v in asdict(cfg).items() if k in ("steps", "suffix_length", "top_k", "candidates", "target",
                                                          "gate_weight", "gate_temperature", "early_stop", "seed")}
    if cfg.position != "suffix":  # suffix runs keep the key they had before the option existed
        keep["position"] = cfg.position
    blob = json.dumps({"model": model_fingerprint(model), "hookset": hookset.behaviour_sha256(), "against": against,
                       **keep}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def read_finished(path: Path, key: str) -> dict[int, dict]:
    """Rows of ``path`` (JSON lines) written with ``key``, by prompt index; a torn last line is ignored."""
    done: dict[int, dict] = {}
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and row.get("_key") == key:
                done[int(row["index"])] = row
    return done


def _parts_json(parts: dict) -> dict:
    return {k: (bool(v[0]) if v.dtype == torch.bool else round(float(v[0]), 5)) for k, v in parts.items()}


def optimise(model, prompts: Sequence[str], hookset, cfg: AttackConfig, against: str, resume: Optional[Path] = None,
             progress: bool = True, use_cache: bool = True) -> list[dict]:
    """GCG for each prompt against ``against`` (``undefended``: CE alone; ``adaptive``: the hook set's loss). Each
    finished prompt is appended to ``resume`` (JSON lines, flushed) and skipped when called again with the same
    settings. Each row: the suffix (ids and text), the attacked ``text``, the loss ``history``, and the final suffix's
    loss parts under both objectives (``final``)."""
    if against not in SUFFIXES:
        raise TraceCircuitsError(f"against must be one of {', '.join(SUFFIXES)}, not {against!r}")
    tok = model.tokenizer
    key = _settings_key(model, hookset, cfg, against)
    done = read_finished(Path(resume), key) if resume is not None else {}
    done = {i: r for i, r in done.items() if i < len(prompts) and r.get("prompt") == prompts[i]}
    allowed = ordinary_tokens(tok, model.cfg.d_vocab)
    todo = [i for i in range(len(prompts)) if i not in done]
    bar = tqdm(total=len(prompts) * cfg.steps, initial=len(done) * cfg.steps, desc=f"GCG vs {against}",
               unit="step", disable=not progress)
    fh = None
    if resume is not None:
        Path(resume).parent.mkdir(parents=True, exist_ok=True)
        torn = Path(resume).exists() and not Path(resume).read_bytes().endswith(b"\n") and Path(resume).stat().st_size
        fh = open(resume, "a", encoding="utf-8")
        if torn:
            fh.write("\n")  # a torn last line (an interrupted write) stays alone on its line
    try:
        for i in todo:
            lay = layout(tok, prompts[i], cfg.target, cfg.position)
            objs = {"undefended": Objective(model, lay, None, use_cache=use_cache),
                    "adaptive": Objective(model, lay, hookset, cfg.gate_weight, cfg.gate_temperature, use_cache)}
            bang = tok(" !", add_special_tokens=False)["input_ids"]
            init = torch.tensor((bang * cfg.suffix_length)[:cfg.suffix_length])
            if not bool(stable(tok, lay, init[None])[0]) or not bool(allowed[init].all()):
                raise TraceCircuitsError("the initial suffix ' ! ! ...' does not re-tokenize stably with this "
                                         "tokenizer; the attack cannot start")
            gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + i)

            def step(parts):
                bar.update(1)
                bar.set_postfix({k: f"{v:.3g}" for k, v in parts.items() if k in ("loss", "ce", "score")})

            t0 = time.time()
            res = gcg(objs[against], init, allowed, steps=cfg.steps, top_k=cfg.top_k, candidates=cfg.candidates,
                      generator=gen, is_stable=lambda c: stable(tok, lay, c), early_stop=cfg.early_stop,
                      on_step=step)
            secs = time.time() - t0
            bar.update(cfg.steps - res["steps_run"])
            suffix = res["suffix"]
            row = {"index": i, "prompt": prompts[i], "against": against, "suffix_ids": suffix.tolist(),
                   "suffix": decode(tok, suffix), "text": lay.text(tok, suffix), "best_loss": res["best_loss"],
                   "best_step": res["best_step"], "steps_run": res["steps_run"], "reached": res["reached"],
                   "history": [round(v, 5) for v in res["history"]], "seconds": round(secs, 2),
                   "seconds_per_step": round(secs / max(1, res["steps_run"]), 3),
                   "final": {k: _parts_json(o.evaluate(suffix[None])) for k, o in objs.items()}, "_key": key}
            done[i] = row
            if fh is not None:
                fh.write(json.dumps(row) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
    finally:
        bar.close()
        if fh is not None:
            fh.close()
    return [{k: v for k, v in done[i].items() if k != "_key"} for i in range(len(prompts))]
