"""TIES-Merging (Yadav et al. 2023): trim, elect sign, disjoint merge (method.md §6).

Default ``trim="model"``, the reference algorithm (Yadav et al.'s code, copied by FusionBench's
``ties_merging``), over every floating leaf of the params tree:

* **Trim** each task's *whole flattened model*: with ``n`` the number of floating entries, keep
  the entries of ``tau_k`` with ``|tau_k| >= t_k``, ``t_k`` the ``(floor(density * n) + 1)``-th
  largest ``|tau_k|`` (the reference's ``kthvalue(n - floor(density * n))`` of ``|tau_k|``
  followed by ``>=``; ties at the threshold are all kept).
* **Elect** ``sign(sum_k trimmed_k)`` per entry; where that sum is exactly 0 the model's
  majority sign ``sign(sum of all elected signs)`` is used (``resolve_zero_signs("majority")``).
* **Disjoint mean**: the mean of the trimmed entries whose sign agrees with the elected sign
  (zeros never count); 0 where none agrees. Output ``theta_0 + anchor_scale * merged``.

``trim="leaf"`` trims each leaf separately (per tensor, as mergekit does): keep
``max(1, floor(density * n_l))`` entries of every leaf and task (``density * n_l`` rounded up when
within 1e-9 of an integer), zero elected signs resolved by the leaf's majority sign. This is the
previous default of this function, unchanged.

Differences from the reference that remain: ``n`` counts the floating leaves of the params tree
(a PyTorch state dict also holds buffers, e.g. BatchNorm statistics, which Flax keeps in other
collections); ``density = 1`` keeps every entry (the reference's ``kthvalue(0)`` fails); the
majority sign is summed exactly in integers (the reference sums the signs in float32).

Computation. The threshold is found exactly by a radix select on the IEEE bit patterns of
``|tau|`` (non-negative floats are ordered like their integer bits): two histogram passes of 16
bits (four for float64) over the model, each pass recomputing ``tau`` from the K + 1 inputs leaf
by leaf (large leaves one at a time, small ones in groups; no ``[K, n]`` stack of the model,
memory stays at one leaf), then one pass for the majority sign and one for the merge. Everything is on device: the same code runs eagerly (one
small jitted kernel per leaf and pass) and inside ``jit`` / ``vmap`` / ``scan``.
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from bmm_jax._tree import PyTree
from bmm_jax.anchors._common import (anchor_function, assemble, check_hparam, check_static_fraction,
                                     compute_dtype, is_float_dtype, leaf_dtype, prepare)

TRIM_MODES = ("model", "leaf")


# ------------------------------------------------------------------------------ radix select
def _levels(dtype) -> tuple[tuple[int, int], ...]:
    """``(shift, width)`` digits of the non-negative bit patterns, most significant first."""
    if np.dtype(dtype) == np.float64:
        return ((48, 15), (32, 16), (16, 16), (0, 16))    # 63 bits
    return ((16, 15), (0, 16))                            # 31 bits


def _int_type(dtype):
    return jnp.int64 if np.dtype(dtype) == np.float64 else jnp.int32


def abs_bits(x):
    """Bit patterns of ``|x|`` as signed integers (same order as the values), ``x`` float32/64."""
    return lax.bitcast_convert_type(jnp.abs(x), _int_type(x.dtype))


def digit_histogram(bits, prefix, shift: int, width: int, count_dtype=jnp.int32):
    """``[R, 2**width]`` counts of digit ``(bits >> shift) & (2**width - 1)`` among the entries of
    row ``r`` of ``bits [R, ...]`` whose higher bits ``bits >> (shift + width)`` equal
    ``prefix[r]``."""
    rows = bits.shape[0]
    flat = bits.reshape(rows, -1)
    nbins = 1 << width
    digit = ((flat >> shift) & (nbins - 1)).astype(jnp.int32)
    index = digit + (jnp.arange(rows, dtype=jnp.int32) * nbins)[:, None]
    index = jnp.where((flat >> (shift + width)) == prefix[:, None], index, rows * nbins)
    hist = jnp.zeros((rows * nbins,), count_dtype).at[index.reshape(-1)].add(1, mode="drop")
    return hist.reshape(rows, nbins)


def select_digit(hist, rank):
    """Digit holding the ``rank``-th largest entry (1-based) of each row, and its rank among the
    entries with that digit: ``(digit [R], rank_within [R])``."""
    above_or_at = jnp.flip(jnp.cumsum(jnp.flip(hist, -1), axis=-1), -1)      # non-increasing
    digit = jnp.sum(above_or_at >= rank[:, None], axis=-1, dtype=jnp.int32) - 1
    padded = jnp.pad(above_or_at, ((0, 0), (0, 1)))
    above = jnp.take_along_axis(padded, (digit + 1)[:, None], axis=-1)[:, 0]
    return digit, rank - above


def kth_largest_abs(x, k):
    """Exact ``k``-th largest ``|x|`` along the last axis, ``x [..., n]`` -> ``[..., 1]``.

    ``k`` (1-based, ``1 <= k <= n``) is an int or an integer array broadcastable to ``x.shape[:-1]``.
    Radix select: two 16-bit histogram passes (four for float64); other floats are compared as
    float32. Exact with ties, zeros and extreme values.
    """
    if x.dtype != jnp.float64:
        x = x.astype(jnp.float32)
    lead = x.shape[:-1]
    bits = abs_bits(x).reshape((-1, x.shape[-1]))
    rows = bits.shape[0]
    rank = jnp.broadcast_to(jnp.asarray(k, jnp.int32), lead).reshape(rows)
    prefix = jnp.zeros((rows,), bits.dtype)
    for shift, width in _levels(x.dtype):
        digit, rank = select_digit(digit_histogram(bits, prefix, shift, width), rank)
        prefix = (prefix << width) | digit.astype(bits.dtype)
    return lax.bitcast_convert_type(prefix, x.dtype).reshape(lead + (1,))


# ------------------------------------------------------------------------------ group kernels
# The model-wide passes work on groups of leaves: every large leaf alone, the small ones (biases,
# norms) concatenated, so that a model compiles a few kernels and dispatches a few calls per pass.
SMALL_LEAF = 2 ** 16              # entries: leaves below this are grouped
GROUP_ENTRIES = 2 ** 22           # entries of one group of small leaves (bounds its [K, n] buffer)


def _group_taus(base_leaves, expert_leaves):
    """Per leaf of a group, the K flat task vectors ``[n_i]`` in the leaf's compute dtype (a list
    per task, never stacked: the passes below fuse into one loop over the K + 1 inputs)."""
    out = []
    for b, es in zip(base_leaves, expert_leaves):
        cd = compute_dtype(b.dtype)
        bb = b.astype(cd).reshape(-1)
        out.append([e.astype(cd).reshape(-1) - bb for e in es])
    return out


def _row_histogram(bits, prefix, shift: int, width: int, count_dtype, nbits: int):
    """``[2**width]`` counts of the digit ``(bits >> shift) & (2**width - 1)`` among the entries of
    the 1-D ``bits`` whose higher bits equal ``prefix`` (one scatter, non-matching dropped)."""
    nbins = 1 << width
    digit = ((bits >> shift) & (nbins - 1)).astype(jnp.int32)
    if shift + width < nbits:
        digit = jnp.where((bits >> (shift + width)) == prefix, digit, nbins)
    return jnp.zeros((nbins,), count_dtype).at[digit].add(1, mode="drop")


@functools.partial(jax.jit, static_argnames=("shift", "width", "sel_dtype", "count_dtype"))
def _group_histogram(base_leaves, expert_leaves, prefix, shift, width, sel_dtype, count_dtype):
    parts = _group_taus(base_leaves, expert_leaves)
    nbits = 63 if np.dtype(sel_dtype) == np.float64 else 31
    rows = []
    for k in range(len(expert_leaves[0])):
        bits = [abs_bits(leaf[k].astype(sel_dtype)) for leaf in parts]
        bits = bits[0] if len(bits) == 1 else jnp.concatenate(bits)
        rows.append(_row_histogram(bits, prefix[k], shift, width, count_dtype, nbits))
    return jnp.stack(rows)


def _trim_elect(taus, thresh, sel_dtype):
    """Trimmed task vectors (list over tasks) and the elected signs of one leaf."""
    trimmed = [jnp.where(jnp.abs(t).astype(sel_dtype) >= thresh[k], t, jnp.zeros_like(t))
               for k, t in enumerate(taus)]
    total = trimmed[0]
    for t in trimmed[1:]:
        total = total + t
    return trimmed, jnp.sign(total)


@functools.partial(jax.jit, static_argnames=("sel_dtype", "count_dtype"))
def _group_sign_sum(base_leaves, expert_leaves, thresh, sel_dtype, count_dtype):
    total = jnp.zeros((), count_dtype)
    for taus in _group_taus(base_leaves, expert_leaves):
        _, elected = _trim_elect(taus, thresh, sel_dtype)
        total = total + jnp.sum(elected.astype(count_dtype))
    return total


def _disjoint_mean(trimmed, elected):
    """Mean of the entries of ``trimmed`` (a list over tasks) agreeing with ``elected``."""
    total = jnp.zeros_like(elected)
    count = jnp.zeros(elected.shape, jnp.int32)
    for t in trimmed:
        agree = jnp.where(elected > 0, t > 0, t < 0)
        total = total + jnp.where(agree, t, jnp.zeros_like(t))
        count = count + agree.astype(jnp.int32)
    return total / jnp.maximum(count.astype(total.dtype), 1.0)


@functools.partial(jax.jit, static_argnames=("sel_dtype",))
def _group_merge(base_leaves, expert_leaves, thresh, majority, scale, sel_dtype):
    """``theta_0 + scale * merged`` of every leaf of a group (leaf dtypes and shapes) given the
    model-wide thresholds ``[K]`` and majority sign."""
    out = []
    for b, taus in zip(base_leaves, _group_taus(base_leaves, expert_leaves)):
        trimmed, elected = _trim_elect(taus, thresh, sel_dtype)
        elected = jnp.where(elected == 0, majority.astype(elected.dtype), elected)
        merged = _disjoint_mean(trimmed, elected).reshape(b.shape)
        cd = merged.dtype
        out.append((b.astype(cd) + jnp.asarray(scale).astype(cd) * merged).astype(b.dtype))
    return out


@jax.jit
def ties_merge_flat(taus, k):
    """TIES of one leaf, ``taus [K, n]`` keeping the top ``k`` magnitudes per task, zero elected
    signs resolved by this leaf's majority sign -> ``[n]`` (the ``trim="leaf"`` kernel)."""
    thresh = kth_largest_abs(taus, k)
    trimmed = jnp.where(jnp.abs(taus) >= thresh, taus, jnp.zeros_like(taus))
    elected = jnp.sign(jnp.sum(trimmed, axis=0))
    majority = jnp.sign(jnp.sum(elected))
    elected = jnp.where(elected == 0, majority, elected)
    return _disjoint_mean(list(trimmed), elected)


# ------------------------------------------------------------------------------ model-wide trim
def _count_dtype(n: int):
    if n < 2 ** 31:
        return jnp.int32
    if not jax.config.jax_enable_x64:
        raise ValueError(f"TIES over {n} entries needs 64-bit counts: enable jax_enable_x64 or use "
                         "trim='leaf'")
    return jnp.int64


def leaf_groups(ctx, indices: list[int]) -> list[list[int]]:
    """Leaves of the model-wide passes: each leaf of ``SMALL_LEAF`` entries or more alone, the
    smaller ones together (up to ``GROUP_ENTRIES`` entries per group), in tree order."""
    groups, small, size = [], [], 0
    for i in indices:
        n = int(np.prod(np.shape(ctx.base_leaves[i])))
        if n >= SMALL_LEAF:
            groups.append([i])
            continue
        if small and size + n > GROUP_ENTRIES:
            groups.append(small)
            small, size = [], 0
        small.append(i)
        size += n
    if small:
        groups.append(small)
    return groups


def _group_args(ctx, group):
    return ([jnp.asarray(ctx.base_leaves[i]) for i in group], [ctx.leaf_experts(i) for i in group])


def model_thresholds(ctx, groups: list[list[int]], keep: int, sel_dtype, count_dtype):
    """``[K]`` model-wide thresholds: the ``keep``-th largest ``|tau_k|`` over the leaves of
    ``groups`` (radix select, one histogram pass over the model per digit)."""
    k = ctx.num_experts
    prefix = jnp.zeros((k,), _int_type(sel_dtype))
    rank = jnp.full((k,), keep, count_dtype)
    for shift, width in _levels(sel_dtype):
        hist = None
        for g in groups:
            h = _group_histogram(*_group_args(ctx, g), prefix, shift, width, sel_dtype, count_dtype)
            hist = h if hist is None else hist + h
        prefix, rank = _select_step(hist, rank, prefix, width)
    return lax.bitcast_convert_type(prefix, sel_dtype)


@functools.partial(jax.jit, static_argnames=("width",))
def _select_step(hist, rank, prefix, width: int):
    digit, rank = select_digit(hist, rank)
    return (prefix << width) | digit.astype(prefix.dtype), rank


@anchor_function
def ties(base: PyTree, experts: Sequence[PyTree], *, labels: PyTree | None = None,
         anchor_scale=1.0, density: float = 0.2, trim: str = "model") -> PyTree:
    """TIES-Merging: ``theta_0 + anchor_scale * disjoint_mean(elect(trim(tau)))``.

    Args:
      base: pretrained params ``theta_0``.
      experts: K >= 2 fine-tuned pytrees like ``base``.
      labels: accepted (and validated) for a uniform call signature; TIES acts on every floating
        leaf, as the reference does.
      anchor_scale: lambda applied to the merged task vector (default 1.0; Python number or JAX
        scalar).
      density: fraction of entries kept per task, in (0, 1] (default 0.2; static).
      trim: ``"model"`` (default, the reference: one threshold per task over the whole model,
        ``floor(density * n) + 1`` entries kept) or ``"leaf"`` (per leaf, ``max(1,
        floor(density * n_l))`` entries, mergekit-style); static.

    Returns:
      Params with the structure and leaf dtypes of ``base``. See the module docstring for the
      conventions and the remaining differences from the reference.
    """
    scale = check_hparam(anchor_scale, "anchor_scale")
    density = check_static_fraction(density, "density", low_open=True)
    if trim not in TRIM_MODES:
        raise ValueError(f"trim must be one of {TRIM_MODES}, got {trim!r}")
    ctx = prepare(base, experts, labels, need_labels=False)
    indices = [i for i in range(len(ctx.base_leaves)) if ctx.is_float(i)]
    if not indices:
        return assemble(ctx, lambda i: None)

    if trim == "leaf":
        def leaf_delta(i):
            taus = ctx.taus(i)
            shape = taus.shape[1:]
            n = int(np.prod(shape))
            k = max(1, int(density * n + 1e-9))    # 0.29 * 100 = 28.999...: 29
            return ties_merge_flat(taus.reshape(taus.shape[0], n), k).reshape(shape)
        return assemble(ctx, leaf_delta, scale)

    dtypes = {np.dtype(compute_dtype(leaf_dtype(ctx.base_leaves[i]))) for i in indices}
    sel_dtype = jnp.float64 if np.dtype(np.float64) in dtypes else jnp.float32
    n = int(sum(int(np.prod(np.shape(ctx.base_leaves[i]))) for i in indices))
    count_dtype = _count_dtype(n)
    keep = min(n, int(density * n) + 1)
    groups = leaf_groups(ctx, indices)
    thresh = model_thresholds(ctx, groups, keep, sel_dtype, count_dtype)
    total = None
    for g in groups:
        s = _group_sign_sum(*_group_args(ctx, g), thresh, sel_dtype, count_dtype)
        total = s if total is None else total + s
    majority = jnp.sign(total)
    out = [jnp.asarray(b) for b in ctx.base_leaves]        # non-floating leaves: theta_0
    for g in groups:
        for i, leaf in zip(g, _group_merge(*_group_args(ctx, g), thresh, majority, scale, sel_dtype)):
            out[i] = leaf
    return jax.tree_util.tree_unflatten(ctx.treedef, out)
