"""The circuit graph: plain data (nodes, weighted links), pruning as a separate step, JSON and an interactive plot.

Nodes are the malicious SAE features at the onset layer (``source``), downstream SAE features, attention heads
and MLP outputs (``feature`` / ``head`` / ``mlp``), and the final ``readout``. A link ``s -> t`` carries the
influence score measured by zeroing ``s`` (see :mod:`trace_circuits.influence`): the drop it causes at ``t``.

Pruning (:meth:`Circuit.prune`) never changes the measured weights; it keeps the links with ``|w| >= threshold``,
or the most influential nodes and links by cumulative influence on the readout (:meth:`Circuit.influence`),
then keeps only the nodes on a path from a source to the readout (and the links among them). :meth:`Circuit.sever` marks which
nodes a hook set suppresses; a link is ``severed`` when its source node is suppressed.

JSON (``circuit.json``) has ``nodes`` (id, kind, layer, index, label, depth, severed, scores, top_tokens) and
``links`` (source, target, weight, severed, kind), the shape circuit-tracer style frontends read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar, Iterable, Optional, Sequence

import numpy as np

from trace_circuits.errors import TraceCircuitsError
from trace_circuits.names import NODE_KINDS, READOUT_ID, node_depth, node_id  # noqa: F401 (re-exported)
from trace_circuits.results import Result

FORMAT_VERSION = 1


@dataclass
class Node:
    id: str
    kind: str
    layer: int
    index: int = 0
    label: str = ""
    severed: bool = False
    scores: dict = field(default_factory=dict)
    top_tokens: list = field(default_factory=list)  # [[token, activation], ...] for SAE features
    # top-activating prompts: [{"prompt": str, "tokens": [str, ...], "acts": [float, ...]}, ...], strongest first;
    # acts[i] is the node's activation at tokens[i] (the user's text and the generation prompt)
    examples: list = field(default_factory=list)

    def __post_init__(self):
        self.label = self.label or self.id

    @property
    def depth(self) -> float:
        return node_depth(self.kind, self.layer)

    def to_json(self) -> dict:
        return {"id": self.id, "kind": self.kind, "layer": self.layer, "index": self.index,
                "label": self.label, "depth": self.depth, "severed": self.severed,
                "scores": {k: _finite(v) for k, v in self.scores.items()},
                "top_tokens": [[str(t), float(a)] for t, a in self.top_tokens],
                "examples": [{"prompt": str(e["prompt"]), "tokens": [str(t) for t in e["tokens"]],
                              "acts": [float(a) for a in e["acts"]]} for e in self.examples]}

    @classmethod
    def from_json(cls, d: dict) -> "Node":
        return cls(id=d["id"], kind=d["kind"], layer=int(d["layer"]), index=int(d.get("index", 0)),
                   label=d.get("label", ""), severed=bool(d.get("severed", False)), scores=dict(d.get("scores", {})),
                   top_tokens=[list(x) for x in d.get("top_tokens", [])],
                   examples=[dict(e) for e in d.get("examples", [])])


@dataclass
class Link:
    source: str
    target: str
    weight: float
    kind: str = "fis"  # "fis" (from a source feature) or "chain" (from a downstream node)
    severed: bool = False

    def to_json(self) -> dict:
        return {"source": self.source, "target": self.target, "weight": _finite(self.weight), "kind": self.kind,
                "severed": self.severed}

    @classmethod
    def from_json(cls, d: dict) -> "Link":
        return cls(source=d["source"], target=d["target"], weight=float(d["weight"]), kind=d.get("kind", "fis"),
                   severed=bool(d.get("severed", False)))


def _finite(v):
    if isinstance(v, (float, np.floating)):
        v = float(v)
        return v if math.isfinite(v) else None
    if isinstance(v, np.integer):
        return int(v)
    return v


@dataclass
class Circuit(Result):
    """A traced circuit: nodes, weighted links and the measurement's metadata (``meta``)."""

    KIND: ClassVar[str] = "trace-circuits circuit"
    FORMAT_VERSION: ClassVar[int] = FORMAT_VERSION
    FILE: ClassVar[str] = "circuit.json"
    FIX: ClassVar[str] = "run `trace-circuits trace` to write a new one"

    nodes: list[Node]
    links: list[Link]
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        ids = [n.id for n in self.nodes]
        if len(set(ids)) != len(ids):
            raise TraceCircuitsError("circuit node ids must be unique")
        known = set(ids)
        for link in self.links:
            if link.source not in known or link.target not in known:
                raise TraceCircuitsError(f"link {link.source} -> {link.target} names a node that is not in the circuit")

    # -- access ------------------------------------------------------------------------------------------

    @property
    def node_map(self) -> dict[str, Node]:
        return {n.id: n for n in self.nodes}

    @property
    def sources(self) -> list[Node]:
        return [n for n in self.nodes if n.kind == "source"]

    @property
    def severed_nodes(self) -> list[Node]:
        return [n for n in self.nodes if n.severed]

    def weights(self) -> np.ndarray:
        return np.array([abs(link.weight) for link in self.links], dtype=np.float64)

    def __repr__(self) -> str:
        kinds = {k: sum(n.kind == k for n in self.nodes) for k in NODE_KINDS}
        n_sev = sum(link.severed for link in self.links)
        return (f"<Circuit {len(self.nodes)} nodes ({', '.join(f'{v} {k}' for k, v in kinds.items() if v)}), "
                f"{len(self.links)} links, {n_sev} severed>")

    # -- pruning (a separate step; weights never change) -------------------------------------------------

    def influence(self) -> tuple[dict[str, float], list[float]]:
        """Node and link influence on the readout (circuit-tracer style), from the normalised link weights:

            A_hat[t, s] = |w(s -> t)| / sum_s' |w(s' -> t)|     (each node's incoming weights sum to 1)
            I(readout) = 1,   I(s) = sum_t A_hat[t, s] I(t)       (all paths s -> ... -> readout)
            E(s -> t) = A_hat[t, s] I(t)

        Normalising per target puts links of different units (feature drops, head changes, readout drops) on one
        scale. Returns ``({node id: I}, [E per link])``.
        """
        incoming: dict[str, float] = {}
        for link in self.links:
            incoming[link.target] = incoming.get(link.target, 0.0) + abs(link.weight)
        a_hat = [abs(link.weight) / incoming[link.target] if incoming[link.target] > 0 else 0.0 for link in self.links]
        by_source: dict[str, list[int]] = {}
        for i, link in enumerate(self.links):
            by_source.setdefault(link.source, []).append(i)
        infl = {n.id: (1.0 if n.kind == "readout" else 0.0) for n in self.nodes}
        depth = {n.id: n.depth for n in self.nodes}
        for n in sorted(self.nodes, key=lambda n: -n.depth):  # targets are deeper than sources
            if n.kind == "readout":
                continue
            infl[n.id] = sum(a_hat[i] * infl[self.links[i].target] for i in by_source.get(n.id, [])
                             if depth[self.links[i].target] > n.depth)
        return infl, [a_hat[i] * infl[link.target] for i, link in enumerate(self.links)]

    def prune(self, threshold: Optional[float] = None, cumulative: Optional[float] = None,
              link_cumulative: float = 0.98, keep_sources: bool = True) -> "Circuit":
        """A new circuit restricted to nodes on a source -> readout path, by one of two rules:

        ``threshold``: keep links with raw ``|w| >= threshold``.
        ``cumulative``: keep the most influential nodes (:meth:`influence`) that together hold a ``cumulative``
        fraction of the total node influence (sources always kept), then among their links the most influential
        ones holding ``link_cumulative`` of the link influence.
        """
        if (threshold is None) == (cumulative is None):
            raise TraceCircuitsError("prune with exactly one of threshold=... or cumulative=...")
        if threshold is not None:
            if not (isinstance(threshold, (int, float)) and threshold >= 0):
                raise TraceCircuitsError(f"threshold must be a number >= 0, got {threshold!r}")
            links = [link for link in self.links if abs(link.weight) >= threshold]
            rule = {"threshold": float(threshold)}
        else:
            for name, v in (("cumulative", cumulative), ("link_cumulative", link_cumulative)):
                if not (isinstance(v, (int, float)) and 0 < v <= 1):
                    raise TraceCircuitsError(f"{name} must be in (0, 1], got {v!r}")
            infl, e = self.influence()
            inner = sorted((n for n in self.nodes if n.kind not in ("source", "readout")), key=lambda n: -infl[n.id])
            keep_nodes = {n.id for n in self.nodes if n.kind in ("source", "readout")}
            keep_nodes |= {n.id for n in _top_cumulative(inner, [infl[n.id] for n in inner], cumulative)}
            cand = [(link, ei) for link, ei in zip(self.links, e) if link.source in keep_nodes
                    and link.target in keep_nodes]
            links = _top_cumulative([c[0] for c in cand], [c[1] for c in cand], link_cumulative)
            rule = {"cumulative": float(cumulative), "link_cumulative": float(link_cumulative)}
        on_path = _on_paths(self.nodes, links)
        nodes = [n for n in self.nodes if n.id in on_path or (keep_sources and n.kind == "source")
                 or n.kind == "readout"]
        links = [link for link in links if link.source in on_path and link.target in on_path]
        meta = dict(self.meta)
        meta["pruning"] = {**rule, "links_before": len(self.links), "links_after": len(links),
                           "nodes_before": len(self.nodes), "nodes_after": len(nodes)}
        return Circuit([_copy_node(n) for n in nodes], [Link(**vars(link)) for link in links], meta)

    def harmful_path_nodes(self, min_readout_effect: float = 0.01,
                           kinds: Sequence[str] = ("source", "feature", "head")) -> list[str]:
        """The nodes to suppress: every source, plus each downstream node of ``kinds`` whose zero-out lowers the
        readout by more than ``min_readout_effect`` (a fraction of the harmful-benign gap).

        MLPs are left out by default: zeroing a whole MLP output removes everything the layer computes (the
        layer-ablation baseline), not one path; pass ``kinds=(..., "mlp")`` to cut them too."""
        out = []
        for n in self.nodes:
            if n.kind == "readout" or n.kind not in kinds:
                continue
            eff = n.scores.get("readout_effect")
            if n.kind == "source" or (eff is not None and eff > min_readout_effect):
                out.append(n.id)
        return out

    def sever(self, node_ids: Iterable[str]) -> "Circuit":
        """A new circuit with ``node_ids`` marked suppressed (and no others); a link is severed when its source node
        is. The circuit itself is not changed."""
        chosen = set(node_ids)
        unknown = chosen - set(self.node_map)
        if unknown:
            raise TraceCircuitsError(f"cannot sever unknown nodes {sorted(unknown)[:5]}")
        nodes = [_copy_node(n) for n in self.nodes]
        for n in nodes:
            n.severed = n.id in chosen
        links = [Link(**{**vars(link), "severed": link.source in chosen}) for link in self.links]
        return Circuit(nodes, links, dict(self.meta))

    # -- persistence -------------------------------------------------------------------------------------

    def _to_dict(self) -> dict:
        return {"meta": self.meta, "nodes": [n.to_json() for n in self.nodes],
                "links": [link.to_json() for link in self.links]}

    @classmethod
    def _from_dict(cls, data: dict) -> "Circuit":
        return cls([Node.from_json(d) for d in data["nodes"]], [Link.from_json(d) for d in data["links"]],
                   dict(data.get("meta", {})))

def _copy_node(n: Node) -> Node:
    return Node(n.id, n.kind, n.layer, n.index, n.label, n.severed, dict(n.scores), [list(t) for t in n.top_tokens],
                [dict(e) for e in n.examples])


def _top_cumulative(items: list, scores: list[float], fraction: float) -> list:
    """The highest-scoring items whose scores sum to at least ``fraction`` of the total (ties kept in order)."""
    order = sorted(range(len(items)), key=lambda i: -scores[i])
    total = sum(max(0.0, scores[i]) for i in order)
    if total <= 0:
        return []
    out, acc = [], 0.0
    for i in order:
        if acc >= fraction * total - 1e-12 or scores[i] <= 0:
            break
        out.append(items[i])
        acc += scores[i]
    return out


def _on_paths(nodes: Sequence[Node], links: Sequence[Link]) -> set[str]:
    """Ids of nodes that lie on a directed path from a source node to the readout."""
    fwd: dict[str, list[str]] = {}
    bwd: dict[str, list[str]] = {}
    for link in links:
        fwd.setdefault(link.source, []).append(link.target)
        bwd.setdefault(link.target, []).append(link.source)

    def reach(start: Iterable[str], adj: dict[str, list[str]]) -> set[str]:
        seen, stack = set(start), list(start)
        while stack:
            for nxt in adj.get(stack.pop(), []):
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append(nxt)
        return seen

    from_sources = reach([n.id for n in nodes if n.kind == "source"], fwd)
    to_readout = reach([n.id for n in nodes if n.kind == "readout"], bwd)
    return from_sources & to_readout
