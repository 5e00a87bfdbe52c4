"""The shared model-adapter interface: one object tells the rest of the library how to run an
encoder, which of its parameters get merged, and how to capture regressed-module inputs.

Conventions
-----------
* ``params``: the encoder's Flax ``"params"`` collection, a nested dict. This is the pytree that
  is merged (θ0, θk, θa all share its structure). Non-parameter collections the encoder needs
  (e.g. frozen BatchNorm ``"batch_stats"``) live in ``extra_variables`` and are never merged.
* ``batch``: a dict of arrays with a leading example axis ``B``, produced by
  :meth:`ModelAdapter.preprocess` from raw inputs (a list of strings or a ``uint8`` image array).
  Text batches hold ``input_ids`` / ``attention_mask`` ``[B, T]`` int32; image batches
  ``pixel_values`` ``[B, H, W, C]`` float32 (NHWC, the Flax convention).
* ``apply(params, batch) -> features [B, feature_dim]`` float32, pure and jittable.
* Heads are plain linear maps ``{"kernel": [feature_dim, C], "bias": [C]}`` (:func:`head_logits`).
* ``capture(params, batch)`` returns, per *input group* of the label tree (q/k/v share one), the
  inputs of the regressed modules flattened to rows ``[N, d_in]`` plus a row mask ``[N]``
  (``False`` for padding tokens and padded examples). It uses ``flax.linen.intercept_methods`` on
  every submodule ``__call__`` whose ``kernel`` is a regressed leaf; the same mechanism is open to
  external accumulators through :attr:`ModelAdapter.module`, :meth:`ModelAdapter.variables`,
  :attr:`ModelAdapter.call_args` and :meth:`ModelAdapter.row_mask`.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bmm_jax._tree import PyTree
from bmm_jax.labels import Label, build_labels, regressed

Batch = dict


class Captured(NamedTuple):
    """Inputs of one input group: ``x [N, d_in]`` float32 rows and ``mask [N]`` bool."""
    x: jax.Array
    mask: jax.Array


@dataclasses.dataclass(frozen=True, eq=False)
class ModelAdapter:
    """How to run one encoder (see the module docstring for conventions).

    Attributes:
      name: short model name (``"minilm"``, ``"effnet-lite0"``, ``"bert"``...).
      module: the underlying ``flax.linen`` module; ``module.apply(self.variables(params),
        *args, **kwargs)`` with ``args, kwargs = call_args(batch)`` runs the encoder.
      params: the encoder params pytree (θ0 for a pretrained adapter).
      feature_dim: size of the pooled features.
      call_args: ``batch -> (args, kwargs)`` for ``module.apply`` (jittable).
      pool: ``(module output, batch) -> features [B, feature_dim]`` (jittable).
      preprocess_fn: raw inputs -> batch dict of numpy arrays.
      labels: label tree of ``params`` (:func:`bmm_jax.labels.build_labels`); override with
        :meth:`with_labels`.
      token_mask_fn: ``batch -> [B, T]`` mask of real (non-padding) tokens, or ``None`` when every
        position is real (images).
      extra_variables: non-param variable collections (never merged), e.g. ``{"batch_stats": ...}``.
      preprocess_key: string identifying the preprocessing (tokeniser + length, image size...);
        caches of preprocessed data are keyed by it.
      length_buckets: for text, sequence lengths a batch may be trimmed to (see
        :func:`trim_batch`); empty for images.
      info: free-form description (checkpoint source, config) for reports.
      dtype_promotion: if set (``"standard"``), ``module.apply`` runs under
        ``jax.numpy_dtype_promotion(dtype_promotion)``: third-party modules (HF Flax) written for
        standard promotion then also work when the process uses ``strict`` promotion.
    """
    name: str
    module: nn.Module
    params: PyTree
    feature_dim: int
    call_args: Callable[[Batch], tuple[tuple, dict]]
    pool: Callable[[Any, Batch], jax.Array]
    preprocess_fn: Callable[[Any], Batch]
    labels: PyTree = None
    token_mask_fn: Callable[[Batch], jax.Array] | None = None
    extra_variables: dict = dataclasses.field(default_factory=dict)
    preprocess_key: str = ""
    length_buckets: tuple[int, ...] = ()
    info: dict = dataclasses.field(default_factory=dict)
    dtype_promotion: str | None = None

    def __post_init__(self):
        if self.labels is None:
            object.__setattr__(self, "labels", build_labels(self.params))

    # ------------------------------------------------------------------ running
    def variables(self, params: PyTree) -> dict:
        """The variable dict for ``module.apply``: ``{"params": params, **extra_variables}``."""
        return {"params": params, **self.extra_variables}

    def run_module(self, params: PyTree, batch: Batch, **kwargs):
        """``module.apply(variables(params), *args, **kwargs)`` with ``args, kwargs`` from
        :attr:`call_args` (extra ``kwargs`` override), under the adapter's dtype-promotion mode.
        Returns the module's raw output. Wrap it in ``flax.linen.intercept_methods`` to capture
        submodule inputs."""
        args, kw = self.call_args(batch)
        kw = {**kw, **kwargs}
        if self.dtype_promotion is None:
            return self.module.apply(self.variables(params), *args, **kw)
        with jax.numpy_dtype_promotion(self.dtype_promotion):
            return self.module.apply(self.variables(params), *args, **kw)

    def apply(self, params: PyTree, batch: Batch) -> jax.Array:
        """Pooled features ``[B, feature_dim]`` (float32). Pure; jit it or use :attr:`jit_apply`."""
        out = self.run_module(params, batch)
        if self.dtype_promotion is None:
            return self.pool(out, batch).astype(jnp.float32)
        with jax.numpy_dtype_promotion(self.dtype_promotion):
            return self.pool(out, batch).astype(jnp.float32)

    @functools.cached_property
    def jit_apply(self) -> Callable[[PyTree, Batch], jax.Array]:
        """``jax.jit(self.apply)``, built once per adapter (compiles once per batch shape)."""
        return jax.jit(self.apply)

    def preprocess(self, inputs) -> Batch:
        """Raw inputs (list of strings / uint8 images ``[N, H, W(, C)]``) -> batch dict (numpy)."""
        return self.preprocess_fn(inputs)

    def token_mask(self, batch: Batch):
        """``[B, T]`` bool mask of real tokens, or ``None`` if every position is real."""
        return None if self.token_mask_fn is None else self.token_mask_fn(batch)

    def with_labels(self, labels: PyTree | None = None, **build_kwargs) -> "ModelAdapter":
        """A copy with another label tree: pass one, or ``build_labels`` keyword arguments
        (``include=``, ``exclude=``, ``transposed=``)."""
        if labels is None:
            labels = build_labels(self.params, **build_kwargs)
        elif build_kwargs:
            raise TypeError("pass either a label tree or build_labels keyword arguments, not both")
        return dataclasses.replace(self, labels=labels)

    def replace(self, **changes) -> "ModelAdapter":
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ capture
    def row_mask(self, x_shape: tuple, batch: Batch, example_mask=None) -> jax.Array:
        """Row mask ``[N]`` for an activation of shape ``x_shape = [B, *positions, d_in]``.

        Sequence activations ``[B, T, d]`` with ``T`` equal to the batch's token axis use the
        token mask; other positions (image pixels, patches) count as real. ``example_mask [B]``
        marks real examples (``False`` for batch padding).
        """
        b = x_shape[0]
        positions = tuple(x_shape[1:-1])
        n_pos = int(np.prod(positions)) if positions else 1
        ex = jnp.ones((b,), bool) if example_mask is None else jnp.asarray(example_mask, bool)
        tok = self.token_mask(batch)
        if tok is not None and len(positions) == 1 and positions[0] == tok.shape[1]:
            m = jnp.asarray(tok, bool) & ex[:, None]
        else:
            m = jnp.broadcast_to(ex[:, None], (b, n_pos))
        return m.reshape(-1)

    def capture(self, params: PyTree, batch: Batch, example_mask=None,
                labels: PyTree | None = None) -> dict[str, Captured]:
        """Inputs of every regressed module, per input group (jittable).

        Args:
          params: encoder params (θ0 or an expert).
          batch: a preprocessed batch.
          example_mask: optional ``[B]`` bool, ``False`` for padded examples.
          labels: label tree to use (default :attr:`labels`).

        Returns:
          ``{input_group: Captured(x [N, d_in] float32, mask [N] bool)}`` with ``N`` = batch size
          times positions. A module called several times contributes all its calls (rows
          concatenated).

        Raises:
          ValueError: a regressed module whose input was never seen (its path does not match a
          submodule called during ``apply``).
        """
        labels = self.labels if labels is None else labels
        by_module: dict[str, Label] = {}
        for l in regressed(labels):
            if not l.path.endswith("/kernel"):
                raise ValueError(f"cannot capture the input of regressed leaf '{l.path}': "
                                 "only '.../kernel' leaves of linear submodules are supported")
            by_module[l.path[: -len("/kernel")]] = l
        seen: dict[str, list] = {}
        masks: dict[str, list] = {}

        def interceptor(next_fun, args, kwargs, context):
            if context.method_name == "__call__" and args:
                mpath = "/".join(str(p) for p in context.module.scope.path) if context.module.scope else ""
                lab = by_module.get(mpath)
                if lab is not None:
                    x = jnp.asarray(args[0])
                    if x.shape[-1] != lab.d_in:
                        raise ValueError(f"module '{mpath}': input last dim {x.shape[-1]} != d_in "
                                         f"{lab.d_in} of its label")
                    g = lab.input_group
                    if g not in seen or lab.kind not in ("q", "k", "v"):
                        seen.setdefault(g, []).append(x.reshape(-1, x.shape[-1]).astype(jnp.float32))
                        masks.setdefault(g, []).append(self.row_mask(x.shape, batch, example_mask))
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(interceptor):
            self.run_module(params, batch)
        groups = {l.input_group for l in by_module.values()}
        missing = sorted(groups - set(seen))
        if missing:
            raise ValueError(f"capture saw no input for input groups {missing[:5]}: their modules were "
                             "not called through a linen __call__ with that scope path")
        return {g: Captured(jnp.concatenate(seen[g]) if len(seen[g]) > 1 else seen[g][0],
                            jnp.concatenate(masks[g]) if len(masks[g]) > 1 else masks[g][0])
                for g in seen}


# ---------------------------------------------------------------------- heads
def init_head(key: jax.Array, feature_dim: int, num_classes: int, scale: float = 0.0) -> dict:
    """Linear head ``{"kernel": [feature_dim, C], "bias": [C]}`` (float32). ``scale = 0`` gives
    zeros (a head trained from scratch by a convex loss does not need random init)."""
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    k = scale * jax.random.normal(key, (feature_dim, num_classes), jnp.float32) / np.sqrt(feature_dim)
    return {"kernel": k, "bias": jnp.zeros((num_classes,), jnp.float32)}


def head_logits(head: dict, features: jax.Array) -> jax.Array:
    """``features [B, d] @ kernel [d, C] + bias [C]`` -> logits ``[B, C]``."""
    return jnp.matmul(features, head["kernel"], precision=jax.lax.Precision.HIGHEST) + head["bias"]


# ---------------------------------------------------------------------- batches
def batch_size_of(batch: Batch) -> int:
    sizes = {int(np.shape(v)[0]) for v in batch.values()}
    if len(sizes) != 1:
        raise ValueError(f"batch arrays disagree on the example axis: sizes {sorted(sizes)}")
    return sizes.pop()


def take(batch: Batch, idx) -> Batch:
    """Rows ``idx`` of every array of the batch."""
    return {k: v[idx] for k, v in batch.items()}


def pad_batch(batch: Batch, size: int) -> tuple[Batch, np.ndarray]:
    """Pad the example axis to ``size`` by repeating row 0; returns ``(batch, example_mask [size])``."""
    b = batch_size_of(batch)
    if b > size:
        raise ValueError(f"batch of {b} examples does not fit in size {size}")
    mask = np.zeros((size,), bool)
    mask[:b] = True
    if b == size:
        return batch, mask
    out = {}
    for k, v in batch.items():
        v = np.asarray(v)
        out[k] = np.concatenate([v, np.repeat(v[:1], size - b, axis=0)])
    return out, mask


def trim_batch(batch: Batch, buckets: tuple[int, ...], mask_key: str = "attention_mask") -> Batch:
    """Trim the token axis of a text batch to the smallest bucket holding every real token.

    Every ``[B, T]`` array is cut to ``[B, L]``; with ``L`` from ``buckets`` (ascending; the last
    bucket should be the padded length). Trailing columns removed are padding in every row, so
    features with masked pooling are unchanged; a few distinct ``L`` keep jit compilations few.
    """
    if not buckets or mask_key not in batch:
        return batch
    m = np.asarray(batch[mask_key])
    t = m.shape[1]
    used = int(np.max(np.nonzero(m.any(axis=0))[0], initial=0)) + 1
    length = next((b for b in sorted(buckets) if b >= used), t)
    length = min(length, t)
    if length == t:
        return batch
    return {k: (np.asarray(v)[:, :length] if np.ndim(v) == 2 and np.shape(v)[1] == t else v)
            for k, v in batch.items()}


# ---------------------------------------------------------------------- images
def to_image_array(images, size: int, channels: int = 3, chunk: int = 2048) -> np.ndarray:
    """uint8 (or float) images ``[N, H, W]`` / ``[N, H, W, C]`` -> float32 ``[N, size, size,
    channels]`` in the original value range (0..255), resized with antialiased bilinear
    interpolation; grayscale is repeated to ``channels``."""
    x = np.asarray(images)
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4:
        raise ValueError(f"images must be [N, H, W] or [N, H, W, C], got shape {x.shape}")
    if x.shape[-1] not in (1, channels):
        raise ValueError(f"images have {x.shape[-1]} channels; expected 1 or {channels}")
    n, h, w, c = x.shape
    out = np.empty((n, size, size, channels), np.float32)
    resize = _resize_fn(size)
    for i in range(0, n, chunk):
        xi = x[i:i + chunk].astype(np.float32)
        if (h, w) != (size, size):
            xi = np.asarray(resize(jnp.asarray(xi)))
        out[i:i + chunk] = np.broadcast_to(xi, xi.shape[:3] + (channels,)) if c == 1 else xi
    return out


@functools.lru_cache(maxsize=None)
def _resize_fn(size: int):
    @jax.jit
    def resize(x):
        return jax.image.resize(x, (x.shape[0], size, size, x.shape[3]), method="linear", antialias=True)
    return resize


def masked_mean(hidden: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of ``hidden [B, T, d]`` over real tokens ``mask [B, T]`` (sentence-transformers pooling)."""
    m = mask.astype(hidden.dtype)[..., None]
    return jnp.sum(hidden * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1e-9)


__all__ = ["ModelAdapter", "Captured", "init_head", "head_logits", "pad_batch", "trim_batch", "take",
           "batch_size_of", "to_image_array", "masked_mean"]
