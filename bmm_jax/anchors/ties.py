"""TIES-Merging (Yadav et al. 2023): trim, elect sign, disjoint merge (method.md §6).

Conventions (documented choices):

* **Trimming is per leaf and per task**: for task k and leaf l, keep the entries of ``tau_k[l]``
  whose magnitude is among the top ``max(1, floor(density * n_l))`` of that leaf (``n_l`` = leaf
  size; ties at the threshold are all kept). The original code trims over the whole flattened
  model; per-leaf trimming keeps memory at one leaf ``[K, n_l]`` at a time and gives every layer
  the same sparsity.
* The k-th largest magnitude is found exactly by bisection on the IEEE bit pattern (non-negative
  floats are ordered like their integer bits): 31 counting passes over the leaf instead of a sort
  (about 15x faster than ``lax.top_k`` on CPU for a 768x3072 kernel), no ``[K, n]`` sort buffer.
* Sign election: ``sign(sum_k trimmed_k)`` per entry; where that sum is exactly 0 the leaf's
  majority sign ``sign(sum of the elected signs)`` is used (as in the reference code).
* Disjoint merge: the mean of the trimmed entries whose sign agrees with the elected sign
  (zeros never count); 0 where none agrees.
* Output: ``theta_0 + scale * merged`` on every floating leaf.
* Leaves are zero-padded to a few bucket lengths before the jitted kernel, so a model with many
  distinct leaf sizes compiles it only a few times (padding changes nothing: zeros are never
  above the threshold's rank and never agree with a sign).
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from bmm_jax._tree import PyTree
from bmm_jax.anchors._common import assemble, check_fraction, check_scale, prepare


def kth_largest_abs(x, k: int):
    """Exact k-th largest ``|x|`` along the last axis, ``x [..., n]`` -> ``[..., 1]``.

    Bisection over the bit patterns of ``|x|`` (float32: 31 passes, float64: 63 passes).
    """
    if x.dtype == jnp.float64:
        itype, nbits, hi0 = jnp.int64, 63, 0x7FF0000000000001
    else:
        x = x.astype(jnp.float32)
        itype, nbits, hi0 = jnp.int32, 31, 0x7F800001
    bits = lax.bitcast_convert_type(jnp.abs(x), itype)
    lo = jnp.zeros(x.shape[:-1] + (1,), itype)
    hi = jnp.full_like(lo, hi0)

    def body(_, carry):
        lo, hi = carry
        mid = lo + (hi - lo) // 2
        ok = jnp.sum(bits >= mid, axis=-1, keepdims=True, dtype=jnp.int32) >= k
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    lo, _ = lax.fori_loop(0, nbits, body, (lo, hi))
    return lax.bitcast_convert_type(lo, x.dtype)


@jax.jit
def ties_merge_flat(taus, k):
    """TIES merged vector of ``taus [K, n]`` keeping the top ``k`` magnitudes per task -> ``[n]``."""
    thresh = kth_largest_abs(taus, k)
    trimmed = jnp.where(jnp.abs(taus) >= thresh, taus, jnp.zeros_like(taus))
    elected = jnp.sign(jnp.sum(trimmed, axis=0))
    majority = jnp.sign(jnp.sum(elected))
    elected = jnp.where(elected == 0, majority, elected)
    agree = jnp.where(elected > 0, trimmed > 0, trimmed < 0)
    total = jnp.sum(jnp.where(agree, trimmed, jnp.zeros_like(trimmed)), axis=0)
    count = jnp.sum(agree, axis=0).astype(taus.dtype)
    return total / jnp.maximum(count, 1.0)


def _bucket(n: int) -> int:
    """Padded length: next power of two up to 2**16, then a multiple of 2**16 (fewer compiles)."""
    if n <= 2 ** 16:
        return 1 << max(0, (n - 1).bit_length())
    return -(-n // 2 ** 16) * 2 ** 16


def ties(base: PyTree, experts: Sequence[PyTree], scale: float = 1.0,
         density: float = 0.2) -> PyTree:
    """TIES-Merging: ``theta_0 + scale * disjoint_mean(elect(trim(tau)))``, leaf by leaf.

    Args:
      base: pretrained params ``theta_0``.
      experts: K >= 2 fine-tuned pytrees like ``base``.
      scale: alpha applied to the merged task vector (default 1.0).
      density: fraction of entries kept per task and per leaf, in (0, 1] (default 0.2).

    Returns:
      Params with the structure and leaf dtypes of ``base``. See the module docstring for the
      trimming, tie and zero-sign conventions.
    """
    scale = check_scale(scale)
    density = check_fraction(density, "density", low_open=True)
    ctx = prepare(base, experts, need_labels=False)

    def delta(i):
        taus = ctx.taus(i)
        shape = taus.shape[1:]
        n = int(np.prod(shape))
        k = max(1, int(density * n + 1e-9))  # guard against 0.29 * 100 = 28.999...
        flat = taus.reshape(taus.shape[0], n)
        padded = _bucket(n)
        if padded > n:  # zero padding changes neither the k-th largest (k <= n) nor the merge
            flat = jnp.pad(flat, ((0, 0), (0, padded - n)))
        return ties_merge_flat(flat, jnp.int32(k))[:n].reshape(shape)

    return assemble(ctx, delta, scale)
