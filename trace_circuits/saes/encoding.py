"""SAE-Lens's ``encode`` for each architecture, reproduced from tensors alone (what a hook set stores), and the decoder
contribution a zero-out removes.

For an SAE with encoder ``W_enc, b_enc``, decoder ``W_dec, b_dec`` and input normalisation ``n(x)``:

    u = n(x) - b_dec * apply_b_dec_to_input              n: identity | x sqrt(d)/||x|| (constant_norm_rescale)
                                                            | (x - mean(x)) / (std(x) + 1e-5) (layer_norm)
    pre = u W_enc + b_enc
    standard (ReLU):  a = relu(pre)
    jumprelu:         a = relu(pre) * [pre > threshold]        (BatchTopK SAEs are saved for inference as JumpReLU)
    topk:             p = pre * ||W_dec||_row if rescale_acts_by_decoder_norm else pre;
                      a_f = relu(p_f) if p_f is among the k largest of p, else 0

Zeroing feature ``f`` while keeping the SAE's error term removes exactly its decoder contribution
``c_f(x) = a_f(x) D_f s(x)``, with ``D_f = W_dec[f] / ||W_dec[f]||`` when the TopK SAE rescales by the decoder norm
(else ``W_dec[f]``) and ``s(x)`` the factor SAE-Lens's decode applies to undo the input normalisation: 1 (none),
``||x|| / sqrt(d)`` (constant_norm_rescale) or ``std(x - mean(x))`` (layer_norm).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from jaxtyping import Float

from trace_circuits.errors import TraceCircuitsError

ARCHITECTURES = ("standard", "jumprelu", "topk")
NORMALIZATIONS = ("none", "constant_norm_rescale", "layer_norm")
_LN_EPS = 1e-5


def architecture(sae) -> str:
    """The inference architecture of an SAE-Lens SAE, or one error line for one we cannot reproduce."""
    arch = sae.cfg.architecture() if callable(getattr(sae.cfg, "architecture", None)) else sae.cfg.architecture
    if arch == "batchtopk" or type(sae).__name__.endswith("TrainingSAE"):
        raise TraceCircuitsError(f"this is a training SAE ({arch}); save it for inference with "
                                 "sae.save_inference_model(path) and load that folder (BatchTopK becomes JumpReLU)")
    if arch not in ARCHITECTURES:
        raise TraceCircuitsError(f"SAE architecture '{arch}' is not supported; use one of {', '.join(ARCHITECTURES)} "
                                 "(BatchTopK SAEs load as JumpReLU)")
    if getattr(sae.cfg, "reshape_activations", "none") != "none":
        raise TraceCircuitsError("SAEs on attention z (reshape_activations='hook_z') are not supported here; use an "
                                 "SAE on the residual stream (e.g. blocks.L.hook_resid_post)")
    return arch


def normalization(sae) -> str:
    """The input normalisation SAE-Lens applies at inference (others are folded into the weights or identity)."""
    norm = getattr(sae.cfg, "normalize_activations", "none")
    return norm if norm in NORMALIZATIONS else "none"


def decoder_directions(sae) -> Float[torch.Tensor, "d_sae d_in"]:
    """``D``: what one unit of each latent adds to the input space (before ``s(x)``), SAE-Lens's decode convention."""
    W = sae.W_dec.detach().float()
    if architecture(sae) == "topk" and getattr(sae.cfg, "rescale_acts_by_decoder_norm", False):
        W = W / W.norm(dim=-1, keepdim=True)
    return W


def out_scale(norm: str, x: Float[torch.Tensor, "... d_in"]) -> Float[torch.Tensor, "... 1"]:
    """``s(x)``: the factor SAE-Lens's decode multiplies the reconstruction by to undo the input normalisation."""
    x = x.float()
    if norm == "constant_norm_rescale":
        return x.norm(dim=-1, keepdim=True) / x.shape[-1] ** 0.5
    if norm == "layer_norm":
        return (x - x.mean(-1, keepdim=True)).std(-1, keepdim=True)
    return torch.ones(*x.shape[:-1], 1, device=x.device)


def massive_limit(sae) -> float:
    """Residual norm above which a position is an attention-sink 'massive activation' the SAE was not trained on
    (``cfg.metadata.massive_norm_threshold``); inf when the SAE records none."""
    t = sae.cfg.metadata.get("massive_norm_threshold") if hasattr(sae.cfg.metadata, "get") else None
    return float("inf") if t is None else float(t)


@dataclass
class FeatureEncoder:
    """``a_f(x)`` for chosen features of one SAE and their decoder rows: everything needed to reproduce
    ``sae.encode(x)[..., features]`` and remove their contribution, as plain tensors (see the module docstring).
    For TopK the whole encoder is kept (the k-th largest pre-activation decides); otherwise only the features'
    columns."""

    architecture: str
    features: list[int]
    tensors: dict[str, torch.Tensor]  # W_enc, b_enc, b_dec, D, and threshold (jumprelu) / dec_norm (topk)
    k: int = 0
    normalize: str = "none"

    @classmethod
    def from_sae(cls, sae, features: Sequence[int]) -> "FeatureEncoder":
        arch = architecture(sae)
        feats = [int(f) for f in features]
        d_sae = int(sae.cfg.d_sae)
        bad = [f for f in feats if not 0 <= f < d_sae]
        if bad or not feats:
            raise TraceCircuitsError(f"feature ids {bad or feats} are not in this SAE (0..{d_sae - 1}); pick at least "
                                     "one feature inside it")
        W_enc, b_enc = sae.W_enc.detach().float().cpu(), sae.b_enc.detach().float().cpu()
        b_dec = sae.b_dec.detach().float().cpu()
        t = {"b_dec": (b_dec if getattr(sae.cfg, "apply_b_dec_to_input", True) else torch.zeros_like(b_dec)).clone(),
             "D": decoder_directions(sae).cpu()[feats].contiguous()}
        if arch == "topk":
            norm = sae.W_dec.detach().float().cpu().norm(dim=-1)
            t.update(W_enc=W_enc.contiguous(), b_enc=b_enc.contiguous(),
                     dec_norm=(norm if getattr(sae.cfg, "rescale_acts_by_decoder_norm", False)
                               else torch.ones_like(norm)).contiguous())
        else:
            t.update(W_enc=W_enc[:, feats].contiguous(), b_enc=b_enc[feats].contiguous())
            if arch == "jumprelu":
                t["threshold"] = sae.threshold.detach().float().cpu()[feats].contiguous()
        return cls(arch, feats, t, k=int(getattr(sae.cfg, "k", 0) or 0), normalize=normalization(sae))

    def to(self, device) -> "FeatureEncoder":
        return FeatureEncoder(self.architecture, self.features, {k: v.to(device) for k, v in self.tensors.items()},
                              self.k, self.normalize)

    def _normalized(self, x: torch.Tensor) -> torch.Tensor:
        if self.normalize == "constant_norm_rescale":
            return x * (x.shape[-1] ** 0.5 / x.norm(dim=-1, keepdim=True).clamp_min(1e-12))
        if self.normalize == "layer_norm":
            c = x - x.mean(-1, keepdim=True)
            return c / (c.std(-1, keepdim=True) + _LN_EPS)
        return x

    def encode(self, x: Float[torch.Tensor, "... d_in"]) -> Float[torch.Tensor, "... n_features"]:
        t = self.tensors
        u = self._normalized(x.float()) - t["b_dec"]
        pre = u @ t["W_enc"] + t["b_enc"]
        if self.architecture == "topk":
            pre = pre * t["dec_norm"]
            kth = pre.topk(self.k, dim=-1).values[..., -1:]
            sel = pre[..., self.features]
            return torch.where(sel >= kth, sel.relu(), torch.zeros_like(sel))
        if self.architecture == "jumprelu":
            return pre.relu() * (pre > t["threshold"])
        return pre.relu()

    def contribution(self, x: Float[torch.Tensor, "... d_in"], acts: Float[torch.Tensor, "... n_features"]
                     ) -> Float[torch.Tensor, "... d_in"]:
        """``sum_f acts_f D_f s(x)``: what these activations add to the SAE's reconstruction of ``x``."""
        return (acts @ self.tensors["D"]) * out_scale(self.normalize, x)

    def check(self, d_model: int, where: str) -> None:
        """Shapes and values of the stored tensors (one error line naming the field)."""
        n = len(self.features)
        t = self.tensors
        d_sae = t["W_enc"].shape[-1] if "W_enc" in t else 0
        cols = d_sae if self.architecture == "topk" else n
        expect = {"W_enc": (d_model, cols), "b_enc": (cols,), "b_dec": (d_model,), "D": (n, d_model)}
        if self.architecture == "topk":
            expect["dec_norm"] = (cols,)
        if self.architecture == "jumprelu":
            expect["threshold"] = (n,)
        for name, shape in expect.items():
            if name not in t:
                raise TraceCircuitsError(f"{where}: tensor {name} is missing; re-export the hook set")
            if tuple(t[name].shape) != shape:
                raise TraceCircuitsError(f"{where}: tensor {name} has shape {tuple(t[name].shape)}, expected {shape}; "
                                         "the file is damaged or made for another model")
            if not torch.isfinite(t[name]).all():
                raise TraceCircuitsError(f"{where}: tensor {name} holds NaN or inf; re-export the hook set")
        if self.architecture == "topk":
            if not 0 < self.k <= cols:
                raise TraceCircuitsError(f"{where}: k={self.k} must be in 1..{cols}")
            if any(not 0 <= f < cols for f in self.features):
                raise TraceCircuitsError(f"{where}: feature ids must be in 0..{cols - 1}")
        if self.normalize not in NORMALIZATIONS:
            raise TraceCircuitsError(f"{where}: normalize must be one of {', '.join(NORMALIZATIONS)}")
