"""Inputs of the experiment runs: seeded subsets, calibration batches, anchor rescaling."""
from __future__ import annotations

import numpy as np

from bmm_jax._tree import PyTree


def _select(inputs, idx):
    if isinstance(inputs, np.ndarray):
        return inputs[idx]
    return [inputs[i] for i in idx]


def subset_indices(n: int, k: int | None, seed: int) -> np.ndarray:
    """Sorted indices of a seeded random subset of ``k`` out of ``n`` (all when ``k >= n``)."""
    if k is None or k >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).permutation(n)[:k])


def batches_of(adapter, inputs, batch_size: int):
    """Padded, length-sorted, trimmed batches of raw ``inputs`` for activation capture.

    Yields batch dicts of exactly ``batch_size`` rows with an ``"example_mask"`` ``[B]`` entry
    (``False`` for padding rows); text batches are sorted by length and trimmed to the adapter's
    length buckets (padding tokens are masked by the capture).
    """
    from bmm_jax.models.adapter import pad_batch, take, trim_batch
    batch = adapter.preprocess(inputs)
    n = len(next(iter(batch.values())))
    if adapter.length_buckets and "attention_mask" in batch:
        order = np.argsort(np.asarray(batch["attention_mask"]).sum(axis=1), kind="stable")
        batch = take(batch, order)
    for i in range(0, n, batch_size):
        chunk, ex = pad_batch(take(batch, slice(i, i + batch_size)), batch_size)
        chunk = trim_batch(chunk, adapter.length_buckets)
        yield {**chunk, "example_mask": ex}


def rescale(base: PyTree, anchor: PyTree, scale: float) -> PyTree:
    """``base + scale * (anchor - base)`` on floating leaves (exact for anchors of the form
    ``theta_0 + scale * merged``: TA, TIES, TSV-M, Iso-C, Iso-CTS); other leaves from ``anchor``."""
    import jax
    import jax.numpy as jnp

    def one(b, a):
        b = jnp.asarray(b)
        if not jnp.issubdtype(b.dtype, jnp.floating):
            return a
        return (b.astype(jnp.float32) + scale * (jnp.asarray(a, jnp.float32) - b.astype(jnp.float32))).astype(b.dtype)
    if scale == 1.0:
        return anchor
    return jax.tree_util.tree_map(one, base, anchor)


__all__ = ["subset_indices", "batches_of", "rescale"]
