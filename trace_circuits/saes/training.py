"""SAE training with SAE-Lens, in two resumable phases (activations once for all hooks, then one SAE per hook).

1. **Activations**, collected once for all hooks in one pass over the corpus (the model forward is the cost):
   every corpus document is tokenized and cut into chunks of ``context_size`` tokens; the residual stream at each
   hook is kept for every position except position 0 (the attention sink). Shards are written as safetensors; a
   rerun skips finished shards. Tokens with *massive activations* (Sun et al. 2024: norm above
   ``massive_norm_factor`` (10) x the median norm at that hook, about 0.04% of tokens here, ~90x the median, all
   sink-like first tokens of a chunk) are left out of training and evaluation; the threshold is saved in the SAE's
   ``cfg.metadata.massive_norm_threshold`` and positions above it keep their true activation wherever the SAE is
   spliced in.
2. **SAE training** with SAE-Lens's own ``SAETrainer`` and ``TopKTrainingSAE`` (``L0 = k`` by construction),
   fed random mini-batches of the stored activations (several epochs). Checkpoints (SAE-Lens's checkpoint
   format) are written during training; a rerun resumes from the newest one.

Quality is measured on held-out corpus text (:mod:`trace_circuits.saes.quality`) on the saved float16 SAE.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch
from tqdm.auto import tqdm

from trace_circuits._io import atomic_path, write_json_atomic
from trace_circuits.config import opt
from trace_circuits.errors import TraceCircuitsError
from trace_circuits.names import layer_of
from trace_circuits.saes.quality import evaluate_sae, write_sae_readme
from trace_circuits.saes.sources import hook_dirname, load_sae, sae_root, save_sae, update_metadata

FORMAT_VERSION = 1


@dataclass
class SAETrainingConfig:
    """Everything that defines a training run; round-trips through ``train_config.json``."""

    model: str = "smollm2-135m-instruct"
    hooks: list[str] = field(default_factory=lambda: ["blocks.21.hook_resid_post"])
    corpus: str = "saes/corpus/smollm2-135m-instruct.jsonl.gz"
    d_sae: Optional[int] = opt(None, "dictionary size (default: 4 x d_model)")
    k: int = opt(64, "active features per token (TopK)")
    context_size: int = opt(128, "tokens per corpus chunk")
    max_corpus_tokens: int = opt(600_000, "unique corpus tokens collected")
    training_samples: int = opt(2_500_000, "activations seen in training")
    batch_size: int = opt(4096, "SAE batch (tokens)")
    lr: float = opt(1e-3, "Adam learning rate")
    aux_loss_coefficient: float = opt(1.0 / 32, "weight of the TopK auxiliary loss (dead features)")
    massive_norm_factor: float = opt(10.0, "positions with norm above this x the median are massive activations")
    n_checkpoints: int = opt(8, "checkpoints written during training (resume points)")
    collect_batch_size: int = opt(16, "chunks per forward pass when collecting activations")
    shard_tokens: int = opt(65_536, "tokens per activation shard (resume points)")
    seed: int = opt(0, "random seed")
    format_version: int = FORMAT_VERSION

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "SAETrainingConfig":
        if data.get("format_version", 0) > FORMAT_VERSION:
            raise TraceCircuitsError("this training config was written by a newer trace-circuits; upgrade it")
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


# ----------------------------------------------------------------------------------------------------------
# Activations


def corpus_chunks(model, docs: Sequence[dict], context_size: int, max_tokens: Optional[int] = None) -> list[list[int]]:
    """Token chunks of at most ``context_size`` tokens from each document (no BOS added; chat docs carry theirs)."""
    tok = model.tokenizer
    chunks: list[list[int]] = []
    total = 0
    for doc in docs:
        ids = tok(doc["text"], add_special_tokens=False)["input_ids"]
        for s in range(0, len(ids), context_size):
            piece = ids[s : s + context_size]
            if len(piece) < 8:
                continue
            chunks.append(piece)
            total += len(piece) - 1
            if max_tokens is not None and total >= max_tokens:
                return chunks
    return chunks


def chunk_batch(chunks: list[list[int]], idx: Sequence[int], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded tokens of ``chunks[idx]`` (positions stay the chunk's own) and the mask of positions 1.. (the
    attention sink at position 0 is never trained on or measured)."""
    from trace_circuits.prompts import pad_sequences

    tokens, mask = pad_sequences([chunks[i] for i in idx], pad, "right")
    mask = mask.bool()
    mask[:, 0] = False
    return tokens, mask


def check_hooks(model, hooks: Sequence[str]) -> None:
    names = set(model.hook_dict)
    bad = [h for h in hooks if h not in names]
    if bad:
        raise TraceCircuitsError(f"model has no hook '{bad[0]}'; use e.g. blocks.{model.cfg.n_layers // 2}.hook_resid_post")


def collect_activations(model, chunks: list[list[int]], hooks: Sequence[str], out_dir: str | Path,
                        batch_size: int = 16, shard_tokens: int = 65_536, progress: bool = True) -> dict[str, torch.Tensor]:
    """Residual activations at ``hooks`` for positions 1.. of every chunk, float16, in resumable shards."""
    from safetensors.torch import load_file, save_file

    check_hooks(model, hooks)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stop = max(layer_of(h) for h in hooks) + 1
    # Shards are fixed groups of chunks, so a rerun knows which are done.
    groups, cur, cur_tok = [], [], 0
    for i, c in enumerate(chunks):
        cur.append(i)
        cur_tok += len(c) - 1
        if cur_tok >= shard_tokens:
            groups.append(cur)
            cur, cur_tok = [], 0
    if cur:
        groups.append(cur)
    device = next(model.parameters()).device
    from trace_circuits.prompts import pad_id_of

    pad = pad_id_of(model.tokenizer)
    bar = tqdm(total=sum(len(c) - 1 for c in chunks), desc="collecting activations", unit="tok", disable=not progress)
    for g, idx in enumerate(groups):
        path = out_dir / f"shard_{g:05d}.safetensors"
        n_tok = sum(len(chunks[i]) - 1 for i in idx)
        if path.exists():
            bar.update(n_tok)
            continue
        parts: dict[str, list[torch.Tensor]] = {h: [] for h in hooks}
        order = sorted(idx, key=lambda i: len(chunks[i]))
        for s in range(0, len(order), batch_size):
            tokens, mask = chunk_batch(chunks, order[s : s + batch_size], pad)
            with torch.inference_mode():
                _, cache = model.run_with_cache(tokens.to(device), names_filter=list(hooks), stop_at_layer=stop)
            for h in hooks:
                parts[h].append(cache[h][mask.to(device)].to(torch.float16).cpu())
            bar.update(int(mask.sum()))
        with atomic_path(path) as tmp:
            save_file({h: torch.cat(parts[h]) for h in hooks}, str(tmp))
    bar.close()
    shards = [load_file(str(out_dir / f"shard_{g:05d}.safetensors")) for g in range(len(groups))]
    return {h: torch.cat([s[h] for s in shards]) for h in hooks}


class ActivationBatches:
    """Random mini-batches (float32) from a stored activation matrix, epoch after epoch; resumable by position."""

    def __init__(self, acts: torch.Tensor, batch_size: int, seed: int = 0, position: int = 0):
        self.acts, self.batch_size, self.seed, self.position = acts, batch_size, seed, position

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self

    def __next__(self) -> torch.Tensor:
        n = self.acts.shape[0]
        epoch, offset = divmod(self.position, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
        idx = perm[offset : offset + self.batch_size]
        if len(idx) < self.batch_size:  # wrap into the next epoch
            nxt = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch + 1))
            idx = torch.cat([idx, nxt[: self.batch_size - len(idx)]])
        self.position += self.batch_size
        return self.acts[idx].float()


# ----------------------------------------------------------------------------------------------------------
# Training


def _trainer_class():
    from sae_lens.training.sae_trainer import SAETrainer

    class ProgressTrainer(SAETrainer):
        """SAE-Lens's trainer, with loss and L0 in the progress bar."""

        @torch.no_grad()
        def _update_pbar(self, step_output, pbar, update_interval: int = 10):
            if self.n_training_steps % update_interval == 0:
                l0 = (step_output.feature_acts > 0).float().sum(-1).mean().item()
                mse = step_output.losses.get("mse_loss")
                mse = float(mse.item() if hasattr(mse, "item") else mse) if mse is not None else float("nan")
                pbar.set_description(f"training SAE | mse {mse:.4f} | L0 {l0:.1f}")
                pbar.update(update_interval * self.cfg.train_batch_size_samples)

    return ProgressTrainer


def _latest_checkpoint(ckpt_dir: Path) -> Optional[Path]:
    if not ckpt_dir.is_dir():
        return None
    done = [p for p in ckpt_dir.iterdir() if p.is_dir() and p.name.isdigit() and (p / "cfg.json").exists()
            and (p / "trainer_state.pt").exists()]
    return max(done, key=lambda p: int(p.name)) if done else None


def train_sae(acts: torch.Tensor, hook_name: str, cfg: SAETrainingConfig, run_dir: str | Path, model_name: str,
              progress: bool = True):
    """Train one TopK SAE on ``acts`` [n, d_in] with SAE-Lens; checkpoints in ``run_dir``, resumes from them."""
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import LoggingConfig, SAETrainerConfig

    run_dir = Path(run_dir)
    ckpt_dir = run_dir / "checkpoints"
    trainer_cfg = SAETrainerConfig(
        total_training_samples=cfg.training_samples, train_batch_size_samples=cfg.batch_size, lr=cfg.lr,
        lr_scheduler_name="constant", lr_warm_up_steps=0, lr_decay_steps=max(1, cfg.training_samples // cfg.batch_size // 5),
        lr_end=cfg.lr / 10, device="cpu", dead_feature_window=200, feature_sampling_window=500,
        n_checkpoints=cfg.n_checkpoints, checkpoint_path=str(ckpt_dir), save_final_checkpoint=False,
        logger=LoggingConfig(log_to_wandb=False), n_batches_for_norm_estimate=50)
    latest = _latest_checkpoint(ckpt_dir)
    if latest is not None:
        sae = TopKTrainingSAE.load_from_disk(str(latest), device="cpu")
    else:
        torch.manual_seed(cfg.seed)
        sae_cfg = TopKTrainingSAEConfig(
            d_in=acts.shape[1], d_sae=cfg.d_sae or 4 * acts.shape[1], k=cfg.k, aux_loss_coefficient=cfg.aux_loss_coefficient,
            normalize_activations="expected_average_only_in", dtype="float32", device="cpu")
        sae = TopKTrainingSAE(sae_cfg)
    sae.cfg.metadata.model_name = model_name
    sae.cfg.metadata.hook_name = hook_name
    sae.cfg.metadata.context_size = cfg.context_size
    sae.cfg.metadata.prepend_bos = False
    data = ActivationBatches(acts, cfg.batch_size, seed=cfg.seed)
    trainer = _trainer_class()(cfg=trainer_cfg, sae=sae, data_provider=data)
    if latest is not None:
        trainer.load_trainer_state(latest)  # our own checkpoint; torch.load defaults to weights_only (no pickle code)
        data.position = trainer.n_training_samples
        trainer.checkpoint_thresholds = [t for t in trainer.checkpoint_thresholds if t >= trainer.n_training_samples]
        if progress:
            print(f"resuming {hook_name} from {latest} ({trainer.n_training_samples} samples done)")
    return trainer.fit()


def train_saes(model, cfg: SAETrainingConfig, run_dir: str | Path, out_root: Optional[str | Path] = None,
               eval_tokens: int = 16_384, progress: bool = True, command: str = "") -> list[dict]:
    """Train, evaluate and save one SAE per hook in ``cfg.hooks`` (resumable: rerun the same command)."""
    from trace_circuits.corpus import read_corpus
    from trace_circuits.model_files import file_sha256
    from trace_circuits.models import model_fingerprint

    check_hooks(model, cfg.hooks)
    if cfg.d_sae is None:
        import dataclasses

        cfg = dataclasses.replace(cfg, d_sae=4 * model.cfg.d_model)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(run_dir / "train_config.json", cfg.to_json())
    out_root = Path(out_root) if out_root else sae_root()
    train_docs = read_corpus(cfg.corpus, split="train")
    heldout_docs = read_corpus(cfg.corpus, split="heldout")
    chunks = corpus_chunks(model, train_docs, cfg.context_size, cfg.max_corpus_tokens)
    eval_chunks = corpus_chunks(model, heldout_docs, cfg.context_size, eval_tokens)
    if not chunks or not eval_chunks:
        raise TraceCircuitsError(f"corpus {cfg.corpus} has too little text; rebuild it with `trace-circuits build-corpus`")
    t0 = time.time()
    corpus_sha = file_sha256(Path(cfg.corpus))
    # Activations are keyed by what determines them, so SAEs with other settings reuse them, and so does a run at
    # some of the hooks an earlier run in this folder collected.
    fingerprint = model_fingerprint(model)

    def acts_key_for(hooks):
        return _key([fingerprint, corpus_sha, sorted(hooks), cfg.context_size, cfg.max_corpus_tokens, cfg.shard_tokens])

    acts_hooks = _cached_hooks(run_dir / "acts", cfg.hooks, acts_key_for) or list(cfg.hooks)
    acts = collect_activations(model, chunks, acts_hooks, run_dir / "acts" / acts_key_for(acts_hooks),
                               batch_size=cfg.collect_batch_size, shard_tokens=cfg.shard_tokens, progress=progress)
    acts_key = acts_key_for(cfg.hooks)
    t_acts = time.time() - t0
    n_tokens = next(iter(acts.values())).shape[0]
    if progress:
        print(f"activations: {n_tokens} tokens x {len(cfg.hooks)} hooks in {t_acts:.0f}s")
    results = []
    for hook in cfg.hooks:
        norms = acts[hook].float().norm(dim=-1)
        threshold = float(cfg.massive_norm_factor * norms.median())
        keep = norms <= threshold
        if progress:
            print(f"{hook}: {int((~keep).sum())} of {len(keep)} tokens above {threshold:.0f} (massive activations) "
                  "left out")
        t1 = time.time()
        sae_key = _key([acts_key, hook, cfg.d_sae, cfg.k, cfg.training_samples, cfg.batch_size, cfg.lr,
                        cfg.aux_loss_coefficient, cfg.seed, cfg.massive_norm_factor])
        sae = train_sae(acts[hook][keep], hook, cfg, run_dir / hook_dirname(hook) / sae_key, model_name=cfg.model,
                        progress=progress)
        t_train = time.time() - t1
        meta = {
            "model_name": cfg.model, "hook_name": hook, "model_fingerprint": fingerprint,
            "massive_norm_threshold": threshold, "trace_circuits_format_version": FORMAT_VERSION,
            "provenance": {
                "architecture": "topk", "k": cfg.k, "training_samples": cfg.training_samples,
                "unique_training_tokens": int(keep.sum()), "epochs": round(cfg.training_samples / int(keep.sum()), 2),
                "train_seconds": round(t_train, 1), "activation_seconds_shared": round(t_acts, 1),
                "device": str(next(model.parameters()).device), "corpus": Path(cfg.corpus).name,
                "corpus_sha256": corpus_sha, "config": cfg.to_json(), "command": command},
        }
        out = save_sae(sae, out_root / cfg.model / hook_dirname(hook), meta)
        # Evaluate what ships: the saved float16 SAE, loaded back as float32.
        shipped = load_sae(hook, model=model, model_name=cfg.model, root=out_root)
        meta["metrics"] = metrics = evaluate_sae(model, shipped, hook, eval_chunks, progress=progress)
        update_metadata(out, metrics=metrics)
        if progress:
            print(f"{hook}: EV {metrics['explained_variance']:.3f}  L0 {metrics['l0']:.1f}  "
                  f"CE recovered {metrics['ce_loss_recovered']:.3f}  ({t_train:.0f}s)  -> {out}")
        results.append(meta)
    write_sae_readme(out_root)
    return results


def _cached_hooks(acts_root: Path, hooks: Sequence[str], key_for) -> Optional[list[str]]:
    """The hooks of an activation cache in ``acts_root`` that holds every hook of ``hooks`` and was collected with the
    same model, corpus and chunking (its folder name is the key of those settings), else None. Reads only the
    safetensors header of its first shard."""
    from safetensors import safe_open

    for first in sorted(acts_root.glob("*/shard_00000.safetensors")):
        try:
            with safe_open(str(first), framework="pt") as f:
                held = sorted(f.keys())
        except Exception:  # an unreadable cache is simply not reused
            continue
        if set(hooks) <= set(held) and key_for(held) == first.parent.name:
            return held
    return None


def _key(parts) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:12]


