"""SAE quality on held-out corpus text, and ``saes/README.md``'s table.

    explained variance  EV = 1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2
    L0                  = mean number of non-zero features per token
    CE-loss recovered   = (CE_zero - CE_sae) / (CE_zero - CE_clean)

where CE_sae splices the SAE reconstruction into the forward pass at the hook and CE_zero zero-ablates it; positions
1.. of each chunk, without massive activations (those keep their true activation).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from tqdm.auto import tqdm

from trace_circuits._io import write_text_atomic
from trace_circuits.saes.encoding import massive_limit
from trace_circuits.saes.sources import list_saes, sae_root


@torch.no_grad()
def evaluate_sae(model, sae, hook_name: str, chunks: list[list[int]], batch_size: int = 16,
                 progress: bool = False, norm_threshold: Optional[float] = None) -> dict:
    """EV, L0, dead fraction and CE-loss recovered (vs zero-ablation) on ``chunks`` (see module docstring)."""
    device = next(model.parameters()).device
    sae = sae.to(device)
    limit = massive_limit(sae) if norm_threshold is None else float(norm_threshold)
    sse = 0.0
    sum_x = None
    n_tok = 0
    l0_sum = 0.0
    n_excluded = 0
    fired = torch.zeros(sae.cfg.d_sae, dtype=torch.bool)
    ce = {"clean": 0.0, "sae": 0.0, "zero": 0.0}
    n_ce = 0
    sq_sum = 0.0
    from trace_circuits.prompts import pad_id_of
    from trace_circuits.saes.training import chunk_batch

    pad = pad_id_of(model.tokenizer)
    order = sorted(range(len(chunks)), key=lambda i: len(chunks[i]))
    for s in tqdm(range(0, len(order), batch_size), desc=f"evaluating {hook_name}", disable=not progress):
        tokens, valid = chunk_batch(chunks, order[s : s + batch_size], pad)
        tokens, valid = tokens.to(device), valid.to(device)
        store = {}

        def grab(act, hook):
            store["x"] = act.detach().clone()
            store["keep"] = valid & (act.float().norm(dim=-1) <= limit)
            return None

        def splice(act, hook):
            out = sae.decode(sae.encode(act.float())).to(act.dtype)
            return torch.where(store["keep"][..., None], out, act)

        def zero(act, hook):
            return torch.where(store["keep"][..., None], torch.zeros_like(act), act)

        logits_clean = model.run_with_hooks(tokens, fwd_hooks=[(hook_name, grab)])
        x = store["x"][store["keep"]].float()
        feats = sae.encode(x)
        x_hat = sae.decode(feats)
        sse += ((x - x_hat) ** 2).sum().item()
        sq_sum += (x ** 2).sum().item()
        sum_x = x.sum(0) if sum_x is None else sum_x + x.sum(0)
        n_tok += x.shape[0]
        n_excluded += int((valid & ~store["keep"]).sum())
        l0_sum += (feats > 0).float().sum().item()
        fired |= (feats > 0).any(0).cpu()
        logits_sae = model.run_with_hooks(tokens, fwd_hooks=[(hook_name, splice)])
        logits_zero = model.run_with_hooks(tokens, fwd_hooks=[(hook_name, zero)])
        # next-token CE at positions 1..n-2 predicting 2..n-1 (targets inside the chunk, not padding)
        tgt_mask = valid[:, 1:] & valid[:, :-1]
        targets = tokens[:, 1:]
        for name, lg in (("clean", logits_clean), ("sae", logits_sae), ("zero", logits_zero)):
            lp = torch.log_softmax(lg[:, :-1].float(), -1).gather(-1, targets[..., None])[..., 0]
            ce[name] += (-lp[tgt_mask]).sum().item()
        n_ce += int(tgt_mask.sum())
    mean_sq = (sum_x / n_tok) ** 2
    sst = sq_sum - n_tok * mean_sq.sum().item()
    ce = {k: v / n_ce for k, v in ce.items()}
    return {
        "explained_variance": 1.0 - sse / sst,
        "l0": l0_sum / n_tok,
        "dead_fraction": 1.0 - fired.float().mean().item(),
        "ce_clean": ce["clean"],
        "ce_sae": ce["sae"],
        "ce_zero_ablation": ce["zero"],
        "ce_loss_recovered": (ce["zero"] - ce["sae"]) / (ce["zero"] - ce["clean"]),
        "eval_tokens": n_tok,
        "excluded_massive_tokens": n_excluded,
    }


def write_sae_readme(root: Optional[str | Path] = None) -> Path:
    """Regenerate ``saes/README.md``'s table from every shipped SAE's ``cfg.json`` metadata."""
    from trace_circuits.saes.sources import _read_folder_meta

    root = Path(root) if root else sae_root()
    rows = []
    for s in list_saes(root=root):
        if s["broken"]:
            rows.append(f"| {s['model']} | `{s['hook_name']}` | broken: {s['broken']} |||||||||")
            continue
        cfg, m = _read_folder_meta(Path(s["path"]))
        mt, pv = m.get("metrics") or {}, m.get("provenance") or {}
        rows.append(
            f"| {s['model']} | `{s['hook_name']}` | {cfg.get('architecture')} (k={cfg.get('k')}) | {cfg['d_sae']} | "
            f"{pv.get('training_samples', 0):,} ({pv.get('unique_training_tokens', 0):,} unique, {pv.get('epochs')} "
            f"epochs) | {mt.get('l0', float('nan')):.1f} | {mt.get('explained_variance', float('nan')):.3f} | "
            f"{100 * mt.get('ce_loss_recovered', float('nan')):.1f}% | {mt.get('dead_fraction', 0) * 100:.1f}% | "
            f"{pv.get('train_seconds')} s + {pv.get('activation_seconds_shared')} s shared activations "
            f"({pv.get('device')}) | `{pv.get('command') or 'python API'}` |")
    text = (
        "# saes/\n\n"
        "Sparse autoencoders trained for the offline models with SAE-Lens (`SAETrainer`, `TopKTrainingSAE`), in "
        "SAE-Lens's on-disk format (`cfg.json` + `sae_weights.safetensors`, float16). What trace-circuits records "
        "about each (held-out metrics, the massive-activation threshold, the model fingerprint, provenance) is in "
        "SAE-Lens's own `cfg.json` `metadata`. Load one with `trace_circuits.load_sae(hook, model=model)` (or any "
        "SAE-Lens folder / `RELEASE:SAE_ID`).\n\n"
        "Metrics are measured on the held-out split of the corpus (positions 1.. of each 128-token chunk): explained "
        "variance `1 - SSE/SST`, mean L0, and CE-loss recovered `(CE_zero - CE_sae) / (CE_zero - CE_clean)` against "
        "zero-ablation of the hook, measured on the saved float16 SAE (the first SmolLM2 SAEs: on the float32 SAE "
        "just before saving; reloaded float16 gives the same figures). The table is regenerated by every training "
        "run. 'shared activations' is the time that run spent collecting activations for all its hooks at once; a "
        "run that found them cached from an earlier attempt (same model and corpus, these hooks or more) shows only "
        "seconds, and a training resumed from its checkpoints shows only the time since it resumed. "
        "Qwen2.5-Coder-0.5B-Instruct: collecting its four hooks (15, 17, 19, 21; 354,841 tokens) took 2563 s; layer "
        "15 was resumed near its end (about 7 min of training in all); with 1792 latents (2 x d_model) layer 19 "
        "reached EV 0.792 only, so layers 19 and 21 were trained again with the default 3584 (4 x d_model, as for "
        "SmolLM2) on the same activations; layer 21 reached EV 0.795 (CE recovered 99.2%), below the bar, and is not "
        "shipped. Layer 16 was then trained alone (its own run: collecting one hook up to layer 16 took 2020 s, "
        "slowed by other work on the machine) and reached EV 0.839.\n\n"
        "| model | hook | architecture | d_sae | samples trained | L0 | EV | CE recovered | dead | training time | "
        "command |\n|---|---|---|---|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n\n"
        "`corpus/` holds the training corpora, one per model (gzipped JSONL, provenance per document: see "
        "`trace_circuits/corpus.py`); rebuild one with `trace-circuits build-corpus --model MODEL`.\n")
    return write_text_atomic(root / "README.md", text)
