"""Sparse autoencoders for our models: training with SAE-Lens, evaluation, and loading from ``saes/``.

Training (``trace-circuits train-sae``) runs in two resumable phases:

1. **Activations**, collected once for all hooks in one pass over the corpus (the model forward is the cost):
   every corpus document is tokenized and cut into chunks of ``context_size`` tokens; the residual stream at each
   hook is kept for every position except position 0 (the attention sink). Shards are written as safetensors; a
   rerun skips finished shards. Tokens with *massive activations* (Sun et al. 2024: norm above
   ``massive_norm_factor`` (10) x the median norm at that hook, about 0.04% of tokens here, ~90x the median, all
   sink-like first tokens of a chunk) are left out of training and evaluation; the threshold is saved with the SAE
   and positions above it keep their true activation wherever the SAE is spliced in.
2. **SAE training** with SAE-Lens's own ``SAETrainer`` and ``TopKTrainingSAE`` (``L0 = k`` by construction),
   fed random mini-batches of the stored activations (several epochs). Checkpoints (SAE-Lens's checkpoint
   format) are written during training; a rerun resumes from the newest one.

Evaluation on the held-out corpus split, positions 1.. of each chunk without massive activations (the excluded
positions keep their true activation):

    explained variance  EV = 1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2
    L0                  = mean number of non-zero features per token
    CE-loss recovered   = (CE_zero - CE_sae) / (CE_zero - CE_clean)

where CE_sae splices the SAE reconstruction into the forward pass at the hook and CE_zero zero-ablates it.

Shipped SAEs live in ``saes/<model>/<hook>/`` in SAE-Lens's on-disk format (``cfg.json`` +
``sae_weights.safetensors``, float16) with our ``trace_circuits.json`` (metrics, provenance, format version).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch
from tqdm.auto import tqdm

from trace_circuits._io import atomic_path, write_json_atomic, write_text_atomic
from trace_circuits.errors import TraceCircuitsError

FORMAT_VERSION = 1
META_FILE = "trace_circuits.json"


def sae_root() -> Path:
    """Where shipped SAEs live: ``$TRACE_CIRCUITS_SAES`` or the repository's ``saes/`` folder."""
    env = os.environ.get("TRACE_CIRCUITS_SAES")
    return Path(env) if env else Path(__file__).resolve().parent.parent / "saes"


def hook_dirname(hook_name: str) -> str:
    return hook_name.replace("/", "_")


@dataclass
class SAETrainingConfig:
    """Everything that defines a training run; round-trips through ``train_config.json``."""

    model: str = "smollm2-135m-instruct"
    hooks: list[str] = field(default_factory=lambda: ["blocks.21.hook_resid_post"])
    corpus: str = "saes/corpus/smollm2-135m-instruct.jsonl.gz"
    d_sae: int = 2304
    k: int = 64
    context_size: int = 128
    max_corpus_tokens: int = 600_000
    training_samples: int = 2_500_000
    batch_size: int = 4096
    lr: float = 1e-3
    aux_loss_coefficient: float = 1.0 / 32
    massive_norm_factor: float = 10.0
    n_checkpoints: int = 8
    collect_batch_size: int = 16
    shard_tokens: int = 65_536
    seed: int = 0
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


def _pad_id(model) -> int:
    tok = getattr(model, "tokenizer", None)
    return int(tok.pad_token_id) if tok is not None and tok.pad_token_id is not None else 0


def _right_padded(chunks: list[list[int]], idx: Sequence[int], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded tokens of ``chunks[idx]`` (positions stay the chunk's own) and the mask of positions 1.."""
    width = max(len(chunks[i]) for i in idx)
    tokens = torch.full((len(idx), width), pad, dtype=torch.long)
    mask = torch.zeros((len(idx), width), dtype=torch.bool)
    for r, i in enumerate(idx):
        tokens[r, : len(chunks[i])] = torch.tensor(chunks[i])
        mask[r, 1 : len(chunks[i])] = True
    return tokens, mask


from trace_circuits.names import layer_of as _layer_of  # noqa: E402


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
    stop = max(_layer_of(h) for h in hooks) + 1
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
    pad = _pad_id(model)
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
            tokens, mask = _right_padded(chunks, order[s : s + batch_size], pad)
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
            d_in=acts.shape[1], d_sae=cfg.d_sae, k=cfg.k, aux_loss_coefficient=cfg.aux_loss_coefficient,
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


# ----------------------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def evaluate_sae(model, sae, hook_name: str, chunks: list[list[int]], batch_size: int = 16,
                 progress: bool = False, norm_threshold: Optional[float] = None) -> dict:
    """EV, L0, dead fraction and CE-loss recovered (vs zero-ablation) on ``chunks`` (see module docstring)."""
    device = next(model.parameters()).device
    sae = sae.to(device)
    if norm_threshold is None:
        norm_threshold = (getattr(sae, "trace_circuits_meta", None) or {}).get("massive_norm_threshold")
    limit = float("inf") if norm_threshold is None else float(norm_threshold)
    sse = 0.0
    sum_x = None
    n_tok = 0
    l0_sum = 0.0
    n_excluded = 0
    fired = torch.zeros(sae.cfg.d_sae, dtype=torch.bool)
    ce = {"clean": 0.0, "sae": 0.0, "zero": 0.0}
    n_ce = 0
    sq_sum = 0.0
    pad = _pad_id(model)
    order = sorted(range(len(chunks)), key=lambda i: len(chunks[i]))
    for s in tqdm(range(0, len(order), batch_size), desc=f"evaluating {hook_name}", disable=not progress):
        tokens, valid = _right_padded(chunks, order[s : s + batch_size], pad)
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


# ----------------------------------------------------------------------------------------------------------
# Saving and loading


def save_sae(sae, out_dir: str | Path, meta: dict) -> Path:
    """Write an SAE in SAE-Lens format (float16 weights) plus ``trace_circuits.json``, atomically as a folder."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    # A training SAE is saved as the inference SAE of its architecture; then in float16 (loads as float32 on request).
    save = sae.save_inference_model if hasattr(sae, "save_inference_model") else sae.save_model
    save(str(tmp))
    _to_float16(tmp)
    write_json_atomic(tmp / META_FILE, {"format_version": FORMAT_VERSION, **meta})
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out_dir)
    return out_dir


def _to_float16(folder: Path) -> None:
    from safetensors.torch import load_file, save_file

    wpath = folder / "sae_weights.safetensors"
    weights = load_file(str(wpath))
    save_file({k: v.to(torch.float16).contiguous() for k, v in weights.items()}, str(wpath))
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg["dtype"] = "float16"
    (folder / "cfg.json").write_text(json.dumps(cfg))


def list_saes(model_name: Optional[str] = None, root: Optional[str | Path] = None) -> list[dict]:
    """Shipped SAEs: ``[{"model", "hook_name", "path", "d_sae", "metrics"...}]``."""
    root = Path(root) if root else sae_root()
    out = []
    for meta_path in sorted(root.glob(f"{model_name or '*'}/*/{META_FILE}")):
        try:
            meta = json.loads(meta_path.read_text())
            cfg = json.loads((meta_path.parent / "cfg.json").read_text())
        except (OSError, ValueError):
            continue
        out.append({"model": meta.get("model"), "hook_name": meta.get("hook_name"), "path": str(meta_path.parent),
                    "d_in": cfg.get("d_in"), "d_sae": cfg.get("d_sae"), "architecture": cfg.get("architecture"),
                    **{k: meta.get("metrics", {}).get(k) for k in ("explained_variance", "l0", "ce_loss_recovered")}})
    return out


def load_sae(model_name: str, hook_name: str, model=None, root: Optional[str | Path] = None, device: str = "cpu",
             dtype: str = "float32"):
    """Load the shipped SAE for ``model_name`` at ``hook_name`` (SAE-Lens ``SAE.load_from_disk``).

    With ``model`` given, also checks that the SAE fits it (d_in, hook point, model fingerprint).
    """
    from sae_lens import SAE

    from trace_circuits.models import canonical_name

    key = canonical_name(model_name)
    root = Path(root) if root else sae_root()
    path = root / key / hook_dirname(hook_name)
    if not (path / "cfg.json").exists():
        have = [f"{s['model']}:{s['hook_name']}" for s in list_saes(root=root)]
        raise TraceCircuitsError(
            f"no SAE for {key} at {hook_name} in {root}; available: {', '.join(have) or 'none'} "
            f"(train one with `trace-circuits train-sae --model {key} --hook {hook_name}`)")
    meta = json.loads((path / META_FILE).read_text()) if (path / META_FILE).exists() else {}
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise TraceCircuitsError(f"{path} was written by a newer trace-circuits; upgrade it")
    sae = SAE.load_from_disk(str(path), device=device, dtype=dtype)
    sae.trace_circuits_meta = meta
    if model is not None:
        check_sae_fits(sae, model, hook_name)
    return sae


def check_sae_fits(sae, model, hook_name: str) -> None:
    """Refuse an SAE made for another model, hook or width, with one line that says which."""
    from trace_circuits.models import model_fingerprint

    if hook_name not in model.hook_dict:
        raise TraceCircuitsError(f"model has no hook '{hook_name}'; pick a hook such as blocks.0.hook_resid_post")
    d_model = model.cfg.d_model
    if sae.cfg.d_in != d_model:
        raise TraceCircuitsError(f"SAE d_in {sae.cfg.d_in} does not fit this model's d_model {d_model} at {hook_name}; "
                                 "use an SAE trained for this model")
    sae_hook = getattr(sae.cfg.metadata, "hook_name", None)
    if sae_hook and sae_hook != hook_name:
        raise TraceCircuitsError(f"SAE was trained at {sae_hook}, not {hook_name}; load the SAE for {hook_name}")
    meta = getattr(sae, "trace_circuits_meta", {}) or {}
    fp = meta.get("model_fingerprint")
    if fp and fp != model_fingerprint(model):
        raise TraceCircuitsError(f"SAE was trained on model {fp}, not {model_fingerprint(model)}; "
                                 "use an SAE trained for this model")


# ----------------------------------------------------------------------------------------------------------
# The whole job: corpus -> activations -> SAEs -> evaluation -> saes/


def train_saes(model, cfg: SAETrainingConfig, run_dir: str | Path, out_root: Optional[str | Path] = None,
               eval_tokens: int = 16_384, progress: bool = True, command: str = "") -> list[dict]:
    """Train, evaluate and save one SAE per hook in ``cfg.hooks`` (resumable: rerun the same command)."""
    from trace_circuits.corpus import read_corpus
    from trace_circuits.model_files import file_sha256
    from trace_circuits.models import model_fingerprint

    check_hooks(model, cfg.hooks)
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
    # Activations are keyed by what determines them, so SAEs with other settings reuse them.
    acts_key = _key([model_fingerprint(model), corpus_sha, sorted(cfg.hooks), cfg.context_size, cfg.max_corpus_tokens,
                     cfg.shard_tokens])
    acts = collect_activations(model, chunks, cfg.hooks, run_dir / "acts" / acts_key, batch_size=cfg.collect_batch_size,
                               shard_tokens=cfg.shard_tokens, progress=progress)
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
            "model": cfg.model, "model_fingerprint": model_fingerprint(model), "hook_name": hook,
            "architecture": "topk", "d_in": int(acts[hook].shape[1]), "d_sae": cfg.d_sae, "k": cfg.k,
            "massive_norm_threshold": threshold, "training_samples": cfg.training_samples,
            "unique_training_tokens": int(keep.sum()),
            "epochs": round(cfg.training_samples / int(keep.sum()), 2), "train_seconds": round(t_train, 1),
            "activation_seconds_shared": round(t_acts, 1), "device": str(next(model.parameters()).device),
            "corpus": Path(cfg.corpus).name, "corpus_sha256": corpus_sha, "config": cfg.to_json(),
            "command": command,
        }
        out = save_sae(sae, out_root / cfg.model / hook_dirname(hook), meta)
        # Evaluate what ships: the saved float16 SAE, loaded back as float32.
        shipped = load_sae(cfg.model, hook, model=model, root=out_root)
        meta["metrics"] = metrics = evaluate_sae(model, shipped, hook, eval_chunks, progress=progress,
                                                 norm_threshold=threshold)
        write_json_atomic(out / META_FILE, {"format_version": FORMAT_VERSION, **meta})
        if progress:
            print(f"{hook}: EV {metrics['explained_variance']:.3f}  L0 {metrics['l0']:.1f}  "
                  f"CE recovered {metrics['ce_loss_recovered']:.3f}  ({t_train:.0f}s)  -> {out}")
        results.append(meta)
    write_sae_readme(out_root)
    return results


def _key(parts) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:12]


def write_sae_readme(root: Optional[str | Path] = None) -> Path:
    """Regenerate ``saes/README.md``'s table from every shipped SAE's ``trace_circuits.json``."""
    root = Path(root) if root else sae_root()
    rows = []
    for meta_path in sorted(root.glob(f"*/*/{META_FILE}"), key=lambda p: (p.parent.parent.name, _hook_sort(p))):
        m = json.loads(meta_path.read_text())
        mt = m.get("metrics", {})
        rows.append(
            f"| {m['model']} | `{m['hook_name']}` | {m.get('architecture')} (k={m.get('k')}) | {m.get('d_sae')} | "
            f"{m.get('training_samples'):,} ({m.get('unique_training_tokens'):,} unique, {m.get('epochs')} epochs) | "
            f"{mt.get('l0', float('nan')):.1f} | {mt.get('explained_variance', float('nan')):.3f} | "
            f"{100 * mt.get('ce_loss_recovered', float('nan')):.1f}% | {mt.get('dead_fraction', 0) * 100:.1f}% | "
            f"{m.get('train_seconds')} s + {m.get('activation_seconds_shared')} s shared activations "
            f"({m.get('device')}) | `{m.get('command') or 'python API'}` |")
    text = (
        "# saes/\n\n"
        "Sparse autoencoders trained for the offline models with SAE-Lens (`SAETrainer`, `TopKTrainingSAE`), in "
        "SAE-Lens's on-disk format (`cfg.json` + `sae_weights.safetensors`, float16) plus `trace_circuits.json` "
        "(metrics, provenance, format version). Load one with `trace_circuits.load_sae(model, hook)`.\n\n"
        "Metrics are measured on the held-out split of the corpus (positions 1.. of each 128-token chunk): explained "
        "variance `1 - SSE/SST`, mean L0, and CE-loss recovered `(CE_zero - CE_sae) / (CE_zero - CE_clean)` against "
        "zero-ablation of the hook, measured on the saved float16 SAE (the current shipped files: on the float32 SAE "
        "just before saving; reloaded float16 gives the same figures). The table is regenerated by every training "
        "run. 'shared activations' is the time that run spent collecting activations for all its hooks at once; a "
        "run that found them cached from an earlier attempt (same model, corpus and hooks) shows only seconds (the "
        "collection rate is in the README's benchmark table: 578 tok/s on 2 CPU cores, about 11 min here).\n\n"
        "| model | hook | architecture | d_sae | samples trained | L0 | EV | CE recovered | dead | training time | command |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n\n"
        "`corpus/` holds the training corpus (gzipped JSONL, provenance per document: see "
        "`trace_circuits/corpus.py`); rebuild it with `trace-circuits build-corpus`.\n")
    return write_text_atomic(root / "README.md", text)


def _hook_sort(meta_path: Path) -> int:
    try:
        return _layer_of(meta_path.parent.name)
    except TraceCircuitsError:
        return 0
