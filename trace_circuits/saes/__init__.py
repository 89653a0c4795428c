"""Sparse autoencoders: loading any SAE-Lens dictionary (shipped, a folder, a pretrained release), reproducing its
``encode`` for a hook set, training our own with SAE-Lens, and measuring their quality."""

from trace_circuits.saes.encoding import (
                                          ARCHITECTURES,
                                          FeatureEncoder,
                                          architecture,
                                          decoder_directions,
                                          massive_limit,
                                          out_scale,
)
from trace_circuits.saes.quality import evaluate_sae, write_sae_readme
from trace_circuits.saes.sources import (
                                          by_layer,
                                          check_sae_fits,
                                          hook_dirname,
                                          list_saes,
                                          load_sae,
                                          sae_hook,
                                          sae_root,
                                          save_sae,
                                          shipped_saes,
                                          update_metadata,
)
from trace_circuits.saes.training import (
                                          ActivationBatches,
                                          SAETrainingConfig,
                                          check_hooks,
                                          chunk_batch,
                                          collect_activations,
                                          corpus_chunks,
                                          train_sae,
                                          train_saes,
)

__all__ = ["ARCHITECTURES", "ActivationBatches", "FeatureEncoder", "SAETrainingConfig", "architecture", "by_layer",
           "check_hooks", "check_sae_fits", "chunk_batch", "collect_activations", "corpus_chunks",
           "decoder_directions", "evaluate_sae", "hook_dirname", "list_saes", "load_sae", "massive_limit", "out_scale",
           "sae_hook", "sae_root", "save_sae", "shipped_saes", "train_sae", "train_saes", "update_metadata", "write_sae_readme"]
