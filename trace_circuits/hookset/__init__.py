"""The exported hook set: operations (what each intervention computes), runtime (attaching to TransformerLens or
transformers, gate state), format (save, load, validate) and build (from a traced circuit)."""

from trace_circuits.hookset.build import hookset_for, hookset_from_circuit, sae_operation
from trace_circuits.hookset.format import (
                                           ACTIONS,
                                           FORMAT_VERSION,
                                           HOOKSET_FILE,
                                           TENSORS_FILE,
                                           HookSet,
                                           load_hookset,
)
from trace_circuits.hookset.operations import OP_KINDS, Operation
from trace_circuits.hookset.runtime import Runtime

__all__ = ["ACTIONS", "FORMAT_VERSION", "HOOKSET_FILE", "HookSet", "OP_KINDS", "Operation", "Runtime", "TENSORS_FILE",
           "hookset_for", "hookset_from_circuit", "load_hookset", "sae_operation"]
