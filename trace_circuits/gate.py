"""Gates: when a hook set's cuts act.

The **prompt gate** (default) is a linear probe on the residual stream ``blocks.{l}.hook_resid_post``, read once per
prompt at the end of the user's turn ``p`` (the chat template's assistant header, so a prefilled answer does not move
it); ``x`` is the mean residual of the last user turn up to ``p`` (``pool="turn"``, the default: after the
header that opens the turn, attention-sink positions left out, :func:`~trace_circuits.activations.read_at`), the
same over the whole prompt (``pool="mean"``, the first token left out) or the residual at ``p`` only
(``pool="last"``):

    s(x) = <(x - m) / sd, w> + b        (an L2-regularised, class-balanced logistic regression, scikit-learn)

trained on harmful requests (label 1) against benign requests and benign documents (label 0), at the candidate
layer (the onset layer or one of the few before it) and L2 strength whose out-of-fold harmful coverage is highest. The
threshold is set on *out-of-fold* scores (k-fold cross-fitting; every framing of one request, and its benign twin, in
the same fold) so the gate opens on at most ``benign_gate_rate`` of benign sequences of requests it was not trained
on; the probe used at inference is then refitted on all of them. The calibration data may hold each request under
several framings (the attack templates) so that the probe learns intent, not framing. In a hook set it is a
``prompt_probe`` operation with ``r = unit(w / sd)``, ``gap = 1 / |w / sd|``, ``mu = m - b r gap``, so
``s = <x - mu, r> / gap``.

The **feature gate**, kept as an option, is in :mod:`trace_circuits.feature_gate`.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from trace_circuits.config import GateConfig
from trace_circuits.errors import TraceCircuitsError
from trace_circuits.hookset.operations import Operation
from trace_circuits.prompts import EncodedPrompts, iter_batches
from trace_circuits.activations import MESSAGE_READINGS, message_span_max, pooled_positions, sentence_boundary_ids
from trace_circuits.stats import auroc
from trace_circuits.turns import (  # noqa: F401  (user_turn_start, turn_start_positions: imported from here too)
    anchor_positions,
    last_match_end,
    turn_start_positions,
    user_turn_end,
    user_turn_start,
)


def fit_logistic(X: torch.Tensor, y: torch.Tensor, l2: float) -> tuple[torch.Tensor, float, torch.Tensor,
                                                                            torch.Tensor]:
    """Class-balanced L2 logistic regression on standardised features (scikit-learn, lbfgs): minimises
    ``sum_i c_i BCE(<z_i, w> + b, y_i) / n + l2 / 2 |w|^2`` with ``z = (x - m) / sd``. Returns ``(w, b, m, sd)``."""
    from sklearn.linear_model import LogisticRegression

    Xd = X.double()
    m, sd = Xd.mean(0), Xd.std(0).clamp_min(1e-6)
    Z = ((Xd - m) / sd).numpy()
    clf = LogisticRegression(C=1.0 / (l2 * len(Z)), class_weight="balanced", max_iter=2000)
    clf.fit(Z, y.numpy().astype(int))
    return torch.from_numpy(clf.coef_[0]).double(), float(clf.intercept_[0]), m, sd


def _score(X: torch.Tensor, w, b, m, sd) -> torch.Tensor:
    return (((X.double() - m) / sd) @ w + b).float()


def out_of_fold_scores(X: torch.Tensor, y: torch.Tensor, l2: float, folds: int = 5,
                       groups: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Each row's score from a probe (:func:`fit_logistic`) not trained on it; interleaved folds (row ``i`` in fold
    ``i mod folds``, or ``groups[i] mod folds``: rows of one group, e.g. one request under several framings, share a
    fold, so no request is scored by a probe that saw it) keep each class's share in every fold."""
    return scores_of_fits(X, out_of_fold_fits(X, y, l2, folds, groups))


def scores_of_fits(X: torch.Tensor, fold_fits: list[tuple[torch.Tensor, tuple]]) -> torch.Tensor:
    """Each row's score from its own fold's probe (the :func:`out_of_fold_fits` list)."""
    oof = torch.zeros(len(X))
    for test, fit in fold_fits:
        oof[test] = _score(X[test], *fit)
    return oof


def out_of_fold_fits(X: torch.Tensor, y: torch.Tensor, l2: float, folds: int = 5,
                     groups: Optional[Sequence[int]] = None) -> list[tuple[torch.Tensor, tuple]]:
    """``[(test rows, fit_logistic(the other rows))]`` per fold (:func:`out_of_fold_scores`'s folds)."""
    idx = torch.arange(len(X)) if groups is None else torch.as_tensor(list(groups))
    if len(idx) != len(X):
        raise TraceCircuitsError(f"{len(idx)} fold groups for {len(X)} rows; give one group id per row")
    return [(idx % folds == k, fit_logistic(X[idx % folds != k], y[idx % folds != k], l2)) for k in range(folds)]


def union_threshold(scores: torch.Tensor, also_open: torch.Tensor, rate: float) -> torch.Tensor:
    """The lowest threshold ``q`` among the scores (or their maximum) with ``mean(scores > q OR also_open) <= rate``:
    the benign rate of a gate that opens on either of two readings, the other's decisions ``also_open`` fixed."""
    best = scores.max()
    for q in torch.unique(scores).flip(0):
        if float(((scores > q) | also_open).float().mean()) > rate:
            break
        best = q
    return best


def message_thresholds(benign_scores: torch.Tensor, benign_message: torch.Tensor, message_rate: float,
                       benign_rate: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(message threshold, end-of-turn threshold)`` of a gate with both readings: the message reading opens on
    ``message_rate`` of the benign sequences, the end-of-turn reading then at the lowest threshold keeping the two
    together within ``benign_rate`` (:func:`benign_threshold`, :func:`union_threshold`)."""
    t_m = benign_threshold(benign_message, message_rate)
    return t_m, union_threshold(benign_scores, benign_message > t_m, benign_rate)


def request_fold_groups(harmful_ids: Sequence[int], benign_ids: Sequence[int], n_documents: int) -> list[int]:
    """Fold groups for :func:`out_of_fold_scores` over ``[harmful | benign | documents]`` rows: the request ids as
    given (one id space, so a harmful request and a benign twin given its id share a fold), then each document its
    own group after them."""
    top = max(list(harmful_ids) + list(benign_ids) + [-1]) + 1
    return list(harmful_ids) + list(benign_ids) + [top + i for i in range(n_documents)]


def benign_threshold(benign_scores: torch.Tensor, rate: float) -> torch.Tensor:
    """The gate threshold: the ``1 - rate`` quantile of the benign scores (their maximum for rate 0)."""
    if rate > 0:
        return torch.quantile(benign_scores, 1.0 - rate, interpolation="higher")
    return benign_scores.max()


def rates_by_group(scores: torch.Tensor, labels: Sequence[str], threshold) -> dict[str, float]:
    """The fraction of scores above ``threshold`` per label, in first-seen label order."""
    return {g: float((scores[[i for i, x in enumerate(labels) if x == g]] > threshold).float().mean())
            for g in dict.fromkeys(labels)}


def calibration_texts(tokenizer, harmful: Sequence[str], benign: Sequence[str], templates: Sequence[str],
                      passes: int = 2, chat: bool = True) -> tuple[list[str], list[str], list[str], list[str]]:
    """The gate's calibration requests as the model sees them: each request asked directly, then ``passes`` more
    times, each time under the next attack template in turn (round-robin, so every template gets its share). The
    prefill template is left out: the gate reads the end of the user's turn, before any prefilled answer.
    Returns ``(harmful texts, their templates, benign texts, their templates)``."""
    from trace_circuits.evaluate.attacks import attack_texts

    framings = [t for t in templates if t not in ("direct", "prefill")]

    def expand(prompts):
        texts, names = attack_texts(tokenizer, list(prompts), "direct", chat), ["direct"] * len(prompts)
        for k in range(passes if framings else 0):
            for i, p in enumerate(prompts):
                t = framings[(i + k * max(1, len(framings) // max(1, passes))) % len(framings)]
                texts += attack_texts(tokenizer, [p], t, chat)
                names.append(t)
        return texts, names

    h, hn = expand(harmful)
    b, bn = expand(benign)
    return h, hn, b, bn


def calibration_sets(model, harmful: Sequence[str], benign: Sequence[str], templates: str = GateConfig.templates,
                     passes: int = GateConfig.passes, chat: bool = True,
                     request_ids: Optional[tuple[Sequence[int], Sequence[int]]] = None):
    """:func:`calibration_texts` encoded, for ``templates`` as the config gives them (``all``, ``none`` or names
    separated by commas); returns ``(harmful, benign, (harmful templates, benign templates), (harmful request ids,
    benign request ids))``: each sequence's template and the id of the request it asks. ``request_ids`` gives each
    harmful and each benign prompt its id (one id space: a harmful request and its benign twin share one, so they share
    a fold); by default the prompt's index in its list, which pairs harmful i with benign i (the built-in twins)."""
    from trace_circuits.evaluate.attacks import ATTACKS
    from trace_circuits.prompts import encode_prompts

    names = [] if templates == "none" else list(ATTACKS) if templates == "all" else [
        t.strip() for t in templates.split(",")]
    ids_h, ids_b = request_ids if request_ids is not None else (range(len(harmful)), range(len(benign)))
    ids_h, ids_b = list(ids_h), list(ids_b)
    if (len(ids_h), len(ids_b)) != (len(harmful), len(benign)):
        raise TraceCircuitsError(f"request_ids holds {len(ids_h)} harmful and {len(ids_b)} benign ids for "
                                 f"{len(harmful)} harmful and {len(benign)} benign prompts; give one id per prompt")
    h, hn, b, bn = calibration_texts(model.tokenizer, harmful, benign, names, passes, chat=chat)
    # calibration_texts lists each prompt directly, then pass by pass in the same order: sequence j asks prompt j % n
    requests = ([ids_h[i % len(ids_h)] for i in range(len(h))], [ids_b[i % len(ids_b)] for i in range(len(b))])
    return encode_prompts(model, h, chat=False), encode_prompts(model, b, chat=False), (hn, bn), requests


def fit_prompt_gate(model, harmful: EncodedPrompts, benign: EncodedPrompts, layer: int | Sequence[int],
                    benign_gate_rate: float = 0.02, *, benign_text: Optional[EncodedPrompts] = None,
                    l2: float | Sequence[float] = GateConfig.l2,
                    folds: int = 5, batch_size: int = 16, progress: bool = False,
                    groups: Optional[tuple[Sequence[str], Sequence[str]]] = None, pool: str = GateConfig.pool,
                    massive_norm_threshold: Optional[float] | dict = None,
                    requests: Optional[tuple[Sequence[int], Sequence[int]]] = None,
                    message_rate: Optional[float | Sequence[float]] = None,
                    message_min_tokens: int = GateConfig.message_min_tokens,
                    message_reading: str = GateConfig.message_reading) -> tuple[Operation, dict]:
    """The ``prompt_probe`` operation at ``blocks.{layer}.hook_resid_post`` and its calibration record (module
    docstring). ``layer`` may be several candidate layers (read in one pass): the probe is fitted at each and the
    gate reads the one whose out-of-fold harmful coverage at the benign rate is highest (ties: the deeper layer);
    ``calib["layer_search"]`` holds every candidate's coverage (of the end-of-turn reading alone). ``l2`` may be
    several strengths: the gate keeps the (layer, strength) pair of highest coverage (ties: the deeper layer, then the
    strength listed first), ``calib["l2_search"]``: each strength's coverage at the kept layer. Requests are read
    where the runtime reads them (the end of the last user turn, found from the chat template's anchor tokens, else
    the last token); ``benign_text`` (documents, no chat template) is read at its last token and joins the benign
    class. ``groups`` (a label per harmful and per benign request, e.g. its attack template) breaks the out-of-fold
    gate rates down by group. ``pool``: what the probe reads (``last``: the residual at that position; ``mean``: the
    prompt's mean residual up to it, :func:`activations.read_at`, leaving out the first token and positions whose
    norm exceeds ``massive_norm_threshold``, one number or ``{layer: limit}``; None or inf: no limit; ``turn``: that
    mean over the last user turn, after its header). ``requests`` (an id per harmful and per benign sequence, one id
    space): the sequences of one id share a fold, so the out-of-fold rates are those of unseen requests; a harmful
    request and its benign twin (the built-in sets are form-matched pairs, index i to index i) given one id are held
    out together, as the test split holds them out. ``message_rate`` > 0 (``pool="turn"``): the probe also reads
    every span of the user's message (``message_threshold``, ``message_reading``,
    :mod:`trace_circuits.hookset.operations`), a reading a suffix cannot lower; its threshold lets it open on
    ``message_rate`` of benign sequences out of fold, and the end-of-turn threshold is then the lowest that keeps the
    two readings together at ``benign_gate_rate`` (None: the config's default for a ``turn`` gate, off for the
    others). Several rates: each is tried and the gate keeps the one whose worst ``groups`` label (attack template)
    has the highest out-of-fold harmful coverage (ties: overall coverage, then the lower rate),
    ``calib["message_rate_search"]``: a reading that catches a request under every framing beats one that catches
    more of them directly and few behind a preamble."""
    from trace_circuits.activations import residuals_at_layers
    from trace_circuits.hookset.operations import PROBE_POOLS

    if not 0 <= benign_gate_rate < 1:
        raise TraceCircuitsError(f"benign_gate_rate must be in [0, 1), got {benign_gate_rate!r}")
    layers = sorted({int(layer)} if isinstance(layer, (int, np.integer)) else {int(l) for l in layer})
    if not layers or not all(0 <= l < model.cfg.n_layers for l in layers):
        raise TraceCircuitsError(f"gate layer(s) {layer} outside the model (0..{model.cfg.n_layers - 1})")
    if folds < 2:
        raise TraceCircuitsError("the prompt gate needs at least 2 folds")
    l2s = [float(a) for a in (l2 if isinstance(l2, (list, tuple)) else [l2])]
    if not l2s or not all(a > 0 and math.isfinite(a) for a in l2s):
        raise TraceCircuitsError(f"the probe's L2 strength(s) must be > 0, got {l2!r}; set --gate-l2")
    if pool not in PROBE_POOLS:
        raise TraceCircuitsError(f"gate pool {pool!r} is not one of {', '.join(PROBE_POOLS)}")
    if message_rate is None:  # the default: on for a turn gate
        message_rate = min(GateConfig.message_rate, benign_gate_rate) if pool == "turn" else 0.0
    rates = [float(r) for r in (message_rate if isinstance(message_rate, (list, tuple)) else [message_rate])]
    reads_message = bool(rates) and max(rates) > 0
    if not rates or not all(0 <= r <= benign_gate_rate for r in rates) or (reads_message and pool != "turn"):
        raise TraceCircuitsError(f"the message reading's rate must lie in [0, benign rate {benign_gate_rate}] and "
                                 f"needs pool 'turn' (got {rates} with pool {pool!r}); set --gate-message-rate 0")
    if message_reading not in MESSAGE_READINGS:
        raise TraceCircuitsError(f"message reading {message_reading!r} is not one of {', '.join(MESSAGE_READINGS)}; "
                                 "set --gate-message-reading")
    limits = massive_norm_threshold if isinstance(massive_norm_threshold, dict) else {
        l: massive_norm_threshold for l in layers}
    limits = {l: None if limits.get(l) is None or not math.isfinite(limits[l]) else float(limits[l])
              for l in layers}  # None or inf: no limit, as massive_limit reports an SAE without one
    if groups is not None and (len(groups[0]) != len(harmful) or len(groups[1]) != len(benign)):
        raise TraceCircuitsError(f"groups: {len(groups[0])} / {len(groups[1])} labels for {len(harmful)} harmful / "
                                 f"{len(benign)} benign prompts; give one label per prompt")
    anchor = user_turn_end(model)

    opener = user_turn_start(model) if pool == "turn" else []

    def read(enc, desc, at_anchor=True, labels=None, at=None, reader=None):  # labels: groups sharing a prefix
        pos = anchor_positions(enc, anchor) if at_anchor else None
        starts = turn_start_positions(enc, opener, pos) if at_anchor and opener else None
        if at is not None:
            pos = at(enc, pos)
        return residuals_at_layers(model, enc, at is None and layers or [layer], pos, batch_size, progress, desc,
                                   pool, limits, starts, labels, reader=reader)

    Hs = read(harmful, "prompt gate (harmful)", labels=groups[0] if groups is not None else None)
    Bs = read(benign, "prompt gate (benign)", labels=groups[1] if groups is not None else None)
    Ts = read(benign_text, "prompt gate (benign text)", False) if benign_text is not None and len(benign_text) \
        else {l: Hs[l][:0] for l in layers}
    n_h, n_b, n_t = len(harmful), len(benign), len(Ts[layers[0]])
    if n_h < folds or n_b + n_t < folds:
        raise TraceCircuitsError(f"the prompt gate needs at least {folds} harmful and {folds} benign prompts")
    y = torch.cat([torch.ones(n_h), torch.zeros(n_b + n_t)])
    fold_groups = None
    if requests is not None:
        hr, br = (list(map(int, r)) for r in requests)
        if len(hr) != n_h or len(br) != n_b:
            raise TraceCircuitsError(f"requests: {len(hr)} / {len(br)} ids for {n_h} harmful / {n_b} benign "
                                     "sequences; give one id per sequence")
        fold_groups = request_fold_groups(hr, br, n_t)
    fits, coverage = {}, {}
    for l in layers:  # the gate's rule at each candidate layer and strength, out of fold
        X = torch.cat([Hs[l], Bs[l], Ts[l]])
        for a in l2s:
            fold_fits = out_of_fold_fits(X, y, a, folds, fold_groups)
            oof = scores_of_fits(X, fold_fits)
            q = benign_threshold(oof[n_h:], benign_gate_rate)
            fits[l, a], coverage[l, a] = (X, oof, q, fold_fits), float((oof[:n_h] > q).float().mean())
    layer, l2 = max(coverage, key=lambda k: (coverage[k], k[0], -l2s.index(k[1])))
    X, oof, q, folds_fit = fits[layer, l2]
    H, B, T = Hs[layer], Bs[layer], Ts[layer]
    msg_threshold = None
    if reads_message:  # the message's spans, scored by each fold's probe (a second pass at that layer)
        V = torch.stack([w_ / sd_ for _, (w_, _, _, sd_) in folds_fit], 1)
        c = torch.tensor([b_ - float((m_ / sd_) @ w_) for _, (w_, b_, m_, sd_) in folds_fit])

        def message_last(enc, pos):  # the last token before the anchor (documents: their last token)
            if pos is None:
                return None
            return [p - len(anchor) if last_match_end(ids, anchor, len(ids)) >= 0 else p
                    for ids, p in zip(enc.input_ids, pos)]

        marks = torch.tensor(sentence_boundary_ids(model.tokenizer) if message_reading == "sentence" else [],
                             dtype=torch.long)

        def reader(x, valid, last, start, l, ids):
            q_ = pooled_positions(x, valid, last, limits[l], start)
            bound = torch.isin(ids, marks.to(ids.device)) if message_reading == "sentence" else None
            return message_span_max(x, q_, V.to(x.device), message_min_tokens, message_reading, bound)

        what = {"span": "spans", "prefix": "prefixes", "sentence": "sentences"}[message_reading]
        M = [read(enc, f"prompt gate, message {what} ({desc})", enc is not benign_text, lab, message_last,
                  reader)[layer] for enc, desc, lab in ((harmful, "harmful", groups[0] if groups else None),
                                                          (benign, "benign", groups[1] if groups else None),
                                                          (benign_text, "text", None)) if enc is not None and len(enc)]
        M = torch.cat(M)
        msg = torch.full((len(X),), -math.inf)
        for k, (test, _) in enumerate(folds_fit):
            msg[test] = M[test, k] + c[k]
        search = {}  # rate -> (worst template's coverage, coverage, message threshold, end-of-turn threshold)
        for rate in [r for r in rates if r > 0]:
            t_m, t_s = message_thresholds(oof[n_h:], msg[n_h:], rate, benign_gate_rate)
            hit = ((oof[:n_h] > t_s) | (msg[:n_h] > t_m)).float()
            per = rates_by_group(hit, groups[0], 0.5) if groups is not None else {"all": float(hit.mean())}
            search[rate] = (min(per.values()), float(hit.mean()), t_m, t_s)
        message_rate = max(search, key=lambda r: (search[r][0], search[r][1], -r))  # ties: the lower rate
        _, _, msg_threshold, q = search[message_rate]
        opened = (oof > q) | (msg > msg_threshold)
    else:
        opened = oof > q
    massive_norm_threshold = limits[layer]
    neg = oof[len(H):]
    w, b, m, sd = fit_logistic(X, y, l2)
    v = w / sd
    gap = 1.0 / float(v.norm())
    r = v / v.norm()
    mu = m - b * r * gap
    op = Operation(kind="prompt_probe", layer=int(layer), gated=False, gate_source=True, gap=gap,
                   message_boundary=marks.tolist() if msg_threshold is not None and message_reading == "sentence"
                   else [],
                   gate_threshold=float(q), anchor=anchor, pool=pool, opener=opener,
                   massive_norm_threshold=massive_norm_threshold if pool != "last" else None,
                   message_threshold=None if msg_threshold is None else float(msg_threshold),
                   message_min_tokens=message_min_tokens, message_reading=message_reading,
                   tensors={"r": r.float().contiguous(), "mu": mu.float().contiguous()})
    h_oof, b_oof, t_oof = (opened[:len(H)].float(), opened[len(H):len(H) + len(B)].float(),
                           opened[len(H) + len(B):].float())  # the rates below: opened by either reading
    calib = {"gate": "prompt", "layer": int(layer), "probe": "logistic regression (scikit-learn)", "l2": l2,
             "folds": folds, "benign_gate_rate_target": benign_gate_rate, "gate_threshold": float(q),
             "gate_rate_harmful": float(h_oof.mean()), "gate_rate_benign": float(opened[len(H):].float().mean()),
             "gate_rate_benign_prompts": float(b_oof.mean()),
             "gate_rate_benign_text": float(t_oof.mean()) if len(t_oof) else None,
             "gate_score_auroc": auroc(oof[:len(H)].numpy(), neg.numpy()), "n_harmful": len(H), "n_benign": len(B),
             **({"message_threshold": float(msg_threshold), "message_rate_target": message_rate,
                 "message_min_tokens": message_min_tokens, "message_reading": message_reading,
                 **({"message_rate_search": {str(r): {"worst_template": v[0], "harmful": v[1]}
                                             for r, v in search.items()}} if len(search) > 1 else {}),
                 "message_rate_harmful": float((msg[:n_h] > msg_threshold).float().mean()),
                 "message_rate_benign": float((msg[n_h:] > msg_threshold).float().mean())}
                if msg_threshold is not None else {}),
             **({"layer_search": {str(l): max(coverage[l, a] for a in l2s) for l in layers}} if len(layers) > 1
                else {}),
             **({"l2_search": {str(a): coverage[layer, a] for a in l2s}} if len(l2s) > 1 else {}),
             "n_benign_text": len(T), "pool": pool, "rates_are": "out-of-fold (each sequence scored by a probe not "
             "trained on it" + (", nor on any framing of its request)" if requests is not None else ")"),
             "rule": "at the end of the user's turn, layer l, x = " + {
                 "last": "the residual there", "mean": "the mean residual of the prompt up to there",
                 "turn": "the mean residual of the last user turn (after its header) up to there"}[pool]
                     + ": s = <(x - m)/sd, w> + b, a class-balanced L2 logistic "
                     "regression (harmful requests vs benign requests and texts); the gate opens for the rest of the "
                     "sequence if s > gate_threshold, the (1 - rate) quantile of the benign out-of-fold scores" + (
                         "; or if the same score of the mean over " + {
                             "span": "any span", "prefix": "any running prefix",
                             "sentence": "any whole sentence or run of sentences"}[message_reading]
                         + " of the user's message (at least message_min_tokens of its tokens; a suffix cannot lower "
                         "it) passes message_threshold, the (1 - message rate) quantile, gate_threshold then the "
                         "lowest keeping both readings together at the benign rate"
                         if msg_threshold is not None else "")}
    if groups is not None:
        for name, scores, labels in (("harmful", h_oof, groups[0]), ("benign", b_oof, groups[1])):
            calib[f"gate_rate_{name}_by_group"] = rates_by_group(scores, labels, 0.5)
        if msg_threshold is not None:
            calib["message_rate_harmful_by_group"] = rates_by_group((msg[:n_h] > msg_threshold).float(), groups[0],
                                                                    0.5)
    return op, calib


@torch.inference_mode()
def gate_decisions(model, hookset, encoded: EncodedPrompts, batch_size: int = 16, progress: bool = False
                   ) -> tuple[np.ndarray, np.ndarray]:
    """What a hook set's prompt gate decides on each prompt, exactly as at inference (the anchor included): the
    HookedTransformer runs with the hook set attached up to the gate's layer. Returns ``(scores, opened)``: the
    end-of-turn score, and whether the gate opened (on that score or on the message reading)."""
    op = hookset.gate_operation
    if op is None or op.kind != "prompt_probe":
        raise TraceCircuitsError("this hook set has no prompt gate; export one with the prompt gate")
    device = next(model.parameters()).device
    scores, opened = torch.zeros(len(encoded)), torch.zeros(len(encoded), dtype=torch.bool)
    n_batches = (len(encoded) + batch_size - 1) // batch_size
    with hookset.attach(model) as rt:
        for b in tqdm(iter_batches(encoded, batch_size, device), total=n_batches, desc="gate", disable=not progress):
            model(b.tokens, attention_mask=b.attention_mask, stop_at_layer=op.layer + 1)
            scores[b.indices], opened[b.indices] = rt.prompt_scores, rt.gate_open.cpu()
    return scores.numpy(), opened.numpy()
