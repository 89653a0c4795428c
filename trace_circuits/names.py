"""The vocabulary, built and read in one place: hook point names and circuit node ids.

Hook points are TransformerLens's names, built with its own ``get_act_name`` and read back by :func:`parse_hook`:
``blocks.21.hook_resid_post`` -> ``("resid_post", 21)``, ``blocks.24.attn.hook_z`` -> ``("z", 24)``.

Node ids: ``L21.F602`` (an SAE feature; ``source`` features at the onset layer use the same form), ``L24.H6`` (an
attention head), ``L24.MLP`` (an MLP output), ``readout``. :func:`node_id` builds them, :func:`parse_node_id`
reads them back, and :func:`node_depth` orders them along the forward pass.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

from trace_circuits.errors import TraceCircuitsError

NODE_KINDS = ("source", "feature", "head", "mlp", "readout")
READOUT_ID = "readout"

_HOOK = re.compile(r"^blocks\.(\d+)\.(?:(attn|mlp|ln1|ln2)\.)?hook_([a-z_]+)$")
_NODE = re.compile(r"^L(\d+)\.(?:F(\d+)|H(\d+)|(MLP))$")


def hook_name(kind: str, layer: int) -> str:
    """``blocks.{layer}.hook_{kind}`` in TransformerLens's naming (``z``, ``pattern`` -> ``blocks.{l}.attn.hook_*``)."""
    from transformer_lens.utils import get_act_name

    return get_act_name(kind, int(layer))


def parse_hook(name: str) -> tuple[str, Optional[int]]:
    """``(kind, layer)`` of a hook point name: ``blocks.21.hook_resid_post`` -> ``("resid_post", 21)``; hooks outside
    the blocks (``hook_embed``, ``ln_final.hook_normalized``) -> ``(name, None)``."""
    m = _HOOK.match(str(name))
    if not m:
        return str(name), None
    return m.group(3), int(m.group(1))


def layer_of(name: str) -> int:
    """The layer of a per-layer hook point, or one error line."""
    kind, layer = parse_hook(name)
    if layer is None:
        raise TraceCircuitsError(f"hook '{name}' is not a per-layer hook like blocks.21.hook_resid_post")
    return layer


def node_id(kind: str, layer: int, index: int = 0) -> str:
    """``L21.F602`` (SAE feature), ``L24.H3`` (head), ``L24.MLP``, ``readout``."""
    if kind in ("source", "feature"):
        return f"L{layer}.F{index}"
    if kind == "head":
        return f"L{layer}.H{index}"
    if kind == "mlp":
        return f"L{layer}.MLP"
    if kind == "readout":
        return READOUT_ID
    raise TraceCircuitsError(f"unknown node kind {kind!r}; expected one of {', '.join(NODE_KINDS)}")


@dataclass(frozen=True)
class NodeRef:
    """A node to ablate or read: ``kind`` is "feature" (an SAE latent), "head", "mlp" or "readout"."""

    kind: str
    layer: int
    index: int = 0

    @property
    def id(self) -> str:
        return node_id(self.kind, self.layer, self.index)

    @property
    def depth(self) -> float:
        return node_depth(self.kind, self.layer)

    @property
    def hook_name(self) -> str:
        """Where the node lives: resid_post (features), attn.hook_z (heads), hook_mlp_out (MLPs)."""
        return hook_name({"feature": "resid_post", "source": "resid_post", "head": "z", "mlp": "mlp_out"}[self.kind],
                         self.layer)


def parse_node_id(nid: str) -> NodeRef:
    """The inverse of :func:`node_id` (features come back as kind ``feature``)."""
    if nid == READOUT_ID:
        return NodeRef("readout", -1)
    m = _NODE.match(str(nid))
    if not m:
        raise TraceCircuitsError(f"'{nid}' is not a node id; expected e.g. L21.F602, L24.H6, L24.MLP or readout")
    layer = int(m.group(1))
    if m.group(2) is not None:
        return NodeRef("feature", layer, int(m.group(2)))
    if m.group(3) is not None:
        return NodeRef("head", layer, int(m.group(3)))
    return NodeRef("mlp", layer)


def node_depth(kind: str, layer: int) -> float:
    """Position in the forward pass: a head in layer l runs before its MLP, which runs before resid_post l."""
    return {"head": layer + 0.25, "mlp": layer + 0.5, "source": layer + 0.75, "feature": layer + 0.75}.get(
        kind, float(layer) + 1.0)
