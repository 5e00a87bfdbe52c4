"""Encoders as :class:`ModelAdapter` s: HF Flax families (:mod:`bmm_jax.models.hf`), all-MiniLM-L6-v2
(:mod:`bmm_jax.models.minilm`) and EfficientNet-Lite0 (:mod:`bmm_jax.models.effnet_adapter`).

Submodules are imported lazily (transformers is slow to import)."""
from bmm_jax.models.adapter import (Captured, ModelAdapter, head_logits, init_head, pad_batch,
                                    to_image_array, trim_batch)


def __getattr__(name):
    if name in ("hf_adapter", "load_hf_model"):
        from bmm_jax.models import hf
        return getattr(hf, name)
    if name == "minilm_adapter":
        from bmm_jax.models.minilm import minilm_adapter
        return minilm_adapter
    if name == "effnet_adapter":
        from bmm_jax.models.effnet_adapter import effnet_adapter
        return effnet_adapter
    raise AttributeError(f"module 'bmm_jax.models' has no attribute {name!r}")


__all__ = ["ModelAdapter", "Captured", "head_logits", "init_head", "pad_batch", "trim_batch",
           "to_image_array", "hf_adapter", "load_hf_model", "minilm_adapter", "effnet_adapter"]
