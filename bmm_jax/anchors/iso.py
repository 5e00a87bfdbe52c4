"""Isotropic merging: Iso-C and Iso-CTS (Marczak et al. 2025, "No Task Left Behind"), §6.

Both work per regressed module on the 2-D view (``r = min(d_in, d_out)``) and give every other
leaf the mean task vector (as the authors' code does for non-matrix parameters); the output is
``theta_0 + scale * merged``.

**Iso-C.** ``M = sum_k T_k = U diag(s) V^T``; ``merged = mean(s) * U V^T``: the singular vectors of
the task-arithmetic sum with a flat (isotropic) spectrum.

**Iso-CTS.** The authors work on PyTorch weights ``[d_out, d_in]`` and take the *common subspace*
as the top left singular vectors of that view, i.e. the output side. We follow them exactly by
running the algorithm on ``X_k = T_k^T`` and transposing back:

1. ``sum_k X_k = U diag(s) V^T``; common part: the top ``c`` triplets ``(U_c, s_c, V_c)``.
2. Sizes: ``c0 = floor(common_fraction * r)``; per-task size ``p = round((r - c0) / K)``
   (capped at ``floor(r / K)``), then ``c = r - K p`` so that the ``r`` slots are filled exactly
   (the reference code's adjustment; ``p`` equals ``floor((r - c0) / K)`` up to that rounding).
3. Per task: ``X_k - U_c U_c^T X_k`` (the part outside the common subspace), thin SVD, keep the top
   ``p`` triplets.
4. Stack ``[task_1 .. task_K, common]`` left vectors ``[d_out, r]``, right vectors ``[r, d_in]``
   and singular values ``[r]``; replace both stacks by their polar factors and use the isotropic
   spectrum ``mean`` of the ``r`` stacked singular values.
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp

from bmm_jax._tree import PyTree
from bmm_jax.anchors._common import (HIGHEST, POLAR_MIN_RATIO, TOP_TRIPLETS_MIN_RATIO, assemble,
                                     check_fraction, check_scale, compute_dtype, leaf_dtype, merge_modules,
                                     polar, polar_fast, prepare, top_triplets_gram)


@jax.jit
def iso_c_matrix(task_kernels):
    """Iso-C of one module: ``[K, d_in, d_out] -> mean(s) U V^T`` of ``sum_k T_k`` (SVD; a matrix
    at least twice as tall as wide, or wide, is first reduced by QR: same ``s``, ``U V^T``)."""
    m = jnp.sum(task_kernels, axis=0)
    d_in, d_out = m.shape
    if d_in >= 2 * d_out or d_out >= 2 * d_in:
        x = m if d_in >= d_out else m.T
        q, r = jnp.linalg.qr(x)
        u, s, vt = jnp.linalg.svd(r, full_matrices=False)
        p = jnp.matmul(q, jnp.matmul(u, vt, precision=HIGHEST), precision=HIGHEST)
        return jnp.mean(s) * (p if d_in >= d_out else p.T)
    u, s, vt = jnp.linalg.svd(m, full_matrices=False)
    return jnp.mean(s) * jnp.matmul(u, vt, precision=HIGHEST)


@jax.jit
def _iso_c_gram(task_kernels):
    m = jnp.sum(task_kernels, axis=0)
    u, s, vt, ratio = top_triplets_gram(m, min(m.shape))
    return jnp.mean(s) * jnp.matmul(u, vt, precision=HIGHEST), ratio


def iso_c_module(task_kernels):
    """:func:`iso_c_matrix`, through ``eigh`` of the smaller Gram of ``sum_k T_k`` when the module
    is rectangular and that Gram is well conditioned (checked; ~5x faster on CPU), else the SVD."""
    d_in, d_out = task_kernels.shape[1:]
    if d_in != d_out:
        merged, ratio = _iso_c_gram(task_kernels)
        if float(ratio) >= POLAR_MIN_RATIO:
            return merged
    return iso_c_matrix(task_kernels)


def iso_cts_sizes(d_in: int, d_out: int, num_experts: int, common_fraction: float) -> tuple[int, int]:
    """``(c, p)``: common-subspace size and per-task size with ``c + K p = min(d_in, d_out)``."""
    r = min(d_in, d_out)
    c0 = int(r * common_fraction)
    p = min(int(round((r - c0) / num_experts)), r // num_experts)
    return r - num_experts * p, p


@functools.partial(jax.jit, static_argnames=("common", "per_task"))
def iso_cts_matrix(task_kernels, common: int, per_task: int):
    """Iso-CTS of one module: ``[K, d_in, d_out] -> [d_in, d_out]`` (see the module docstring)."""
    x = jnp.swapaxes(task_kernels, -1, -2)            # PyTorch view [K, d_out, d_in]
    k = x.shape[0]
    u, s, vt = jnp.linalg.svd(jnp.sum(x, axis=0), full_matrices=False)
    uc, sc, vtc = u[:, :common], s[:common], vt[:common, :]
    parts_u, parts_s, parts_vt = [], [], []
    if per_task > 0:
        proj = jnp.einsum("ic,kcj->kij", uc, jnp.einsum("ic,kij->kcj", uc, x, precision=HIGHEST),
                          precision=HIGHEST)
        ut, st, vtt = jnp.linalg.svd(x - proj, full_matrices=False)
        parts_u.append(jnp.moveaxis(ut[:, :, :per_task], 0, 1).reshape(x.shape[1], k * per_task))
        parts_s.append(st[:, :per_task].reshape(k * per_task))
        parts_vt.append(vtt[:, :per_task, :].reshape(k * per_task, x.shape[2]))
    parts_u.append(uc)
    parts_s.append(sc)
    parts_vt.append(vtc)
    u_all = polar(jnp.concatenate(parts_u, axis=1))
    vt_all = polar(jnp.concatenate(parts_vt, axis=0))
    iso = jnp.mean(jnp.concatenate(parts_s))
    return (iso * jnp.matmul(u_all, vt_all, precision=HIGHEST)).T


@functools.partial(jax.jit, static_argnames=("common", "per_task"))
def _iso_cts_parts_gram(task_kernels, common: int, per_task: int):
    """Stacked ``(u [d_out, r], s [r], vt [r, d_in])`` of Iso-CTS (before the polar factors) from
    Gram eigendecompositions, and the smallest conditioning ratio met (``top_triplets_gram``)."""
    x = jnp.swapaxes(task_kernels, -1, -2)            # PyTorch view [K, d_out, d_in]
    k = x.shape[0]
    uc, sc, vtc, ratio = top_triplets_gram(jnp.sum(x, axis=0), common)
    parts_u, parts_s, parts_vt = [], [], []
    if per_task > 0:
        proj = jnp.einsum("ic,kcj->kij", uc, jnp.einsum("ic,kij->kcj", uc, x, precision=HIGHEST),
                          precision=HIGHEST)
        ut, st, vtt, rt = top_triplets_gram(x - proj, per_task)
        ratio = jnp.minimum(ratio, jnp.min(rt))
        parts_u.append(jnp.moveaxis(ut, 0, 1).reshape(x.shape[1], k * per_task))
        parts_s.append(st.reshape(k * per_task))
        parts_vt.append(vtt.reshape(k * per_task, x.shape[2]))
    parts_u.append(uc)
    parts_s.append(sc)
    parts_vt.append(vtc)
    return (jnp.concatenate(parts_u, axis=1), jnp.concatenate(parts_s), jnp.concatenate(parts_vt, axis=0),
            ratio)


@jax.jit
def _iso_rebuild(pu, s, pvt):
    return (jnp.mean(s) * jnp.matmul(pu, pvt, precision=HIGHEST)).T


def iso_cts_module(task_kernels, common: int, per_task: int):
    """:func:`iso_cts_matrix`, with the truncated SVDs through ``eigh`` of the smaller Grams (SVDs
    instead when a kept singular value is below 1% of the largest) and the polar factors by
    :func:`~bmm_jax.anchors._common.polar_fast`: same result, several times faster on CPU."""
    if common < 1:
        return iso_cts_matrix(task_kernels, common, per_task)
    u, s, vt, ratio = _iso_cts_parts_gram(task_kernels, common, per_task)
    if float(ratio) < TOP_TRIPLETS_MIN_RATIO:
        return iso_cts_matrix(task_kernels, common, per_task)
    return _iso_rebuild(polar_fast(u), s, polar_fast(vt))


def iso_c(base: PyTree, experts: Sequence[PyTree], scale: float = 1.0,
          labels: PyTree | None = None) -> PyTree:
    """Iso-C: flatten the spectrum of ``sum_k T_k`` per regressed module; mean task vector on
    other leaves; ``theta_0 + scale * merged``.

    Args:
      base, experts: ``theta_0`` and K >= 2 fine-tuned pytrees like it.
      scale: alpha (default 1.0; the authors tune it on validation data).
      labels: label tree selecting the modules (default ``build_labels(base)``).
    """
    scale = check_scale(scale)
    ctx = prepare(base, experts, labels)
    k = ctx.num_experts

    def delta(i):                  # Iso-C needs only sum_k T_k: one fused kernel, no [K, ...] stack
        b = ctx.base_leaves[i]
        total = sum_task_vectors(b, [e[i] for e in ctx.expert_leaves], compute_dtype(leaf_dtype(b)))
        lab = ctx.labels[i]
        if lab.regressed:
            return lab.from_matrix(iso_c_module(lab.to_matrix(total)[None]))
        return total / k                                   # mean task vector
    return assemble(ctx, delta, scale)


@functools.partial(jax.jit, static_argnames=("dtype",))
def sum_task_vectors(base_leaf, expert_leaves, dtype):
    """``sum_k (expert_leaves[k] - base_leaf)`` in ``dtype`` (the stack is never materialised)."""
    b = jnp.asarray(base_leaf).astype(dtype)
    total = jnp.zeros(b.shape, dtype)
    for e in expert_leaves:
        total = total + (jnp.asarray(e).astype(dtype) - b)
    return total


def iso_cts(base: PyTree, experts: Sequence[PyTree], scale: float = 1.0,
            common_fraction: float = 0.8, labels: PyTree | None = None) -> PyTree:
    """Iso-CTS: common + task-specific subspaces with an isotropic spectrum (module docstring).

    Args:
      base, experts: ``theta_0`` and K >= 2 fine-tuned pytrees like it.
      scale: alpha (default 1.0; the authors tune it on validation data).
      common_fraction: fraction of the rank given to the common subspace, in [0, 1] (default 0.8).
      labels: label tree selecting the modules (default ``build_labels(base)``).
    """
    scale = check_scale(scale)
    frac = check_fraction(common_fraction, "common_fraction", low_open=False)

    def fn(t):
        c, p = iso_cts_sizes(t.shape[1], t.shape[2], t.shape[0], frac)
        return iso_cts_module(t, c, p)

    return merge_modules(base, experts, fn, labels=labels, scale=scale, other="mean")
