"""Isotropic merging: Iso-C and Iso-CTS (Marczak et al. 2025, "No Task Left Behind"), §6.

Both work per merged matrix on its 2-D view (``r = min(d_in, d_out)``) and give every other
floating leaf the mean task vector (as the authors' code does for non-matrix parameters); the
output is ``theta_0 + anchor_scale * merged``. Which leaves are matrices: by default
(``modules="all_2d"``) every 2-D floating leaf, as the reference code merges every 2-D tensor
(position embeddings included), plus the label tree's regressed modules; ``modules="labels"``
restricts the method to the regressed modules (see :func:`bmm_jax.anchors._common.module_views`
for the orientation of unlabelled 2-D leaves).

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

Differences from the reference that remain: the cap ``p <= floor(r / K)`` (the reference's
rounding can ask for more task slots than exist when ``common_fraction`` is small, and fails); 1x1
convolution kernels the label tree marks as modules are merged as matrices.

Computation: the SVDs of rectangular matrices go through ``eigh`` of their smaller Grams when
these are well conditioned (several times faster on CPU), else through LAPACK's SVD; the choice is
a ``lax.cond`` on device (eagerly only the route taken runs).
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from bmm_jax._tree import PyTree
from bmm_jax.anchors._common import (HIGHEST, POLAR_MIN_RATIO, TOP_TRIPLETS_MIN_RATIO, anchor_function,
                                     assemble, check_hparam, check_modules, check_static_fraction,
                                     compute_dtype, leaf_dtype, merge_modules, module_views, polar,
                                     polar_fast, prepare, sum_task_vectors, top_triplets_gram)


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
def iso_c_module(task_kernels):
    """:func:`iso_c_matrix`, through ``eigh`` of the smaller Gram of ``sum_k T_k`` when the module
    is rectangular and that Gram is well conditioned (decided on device; ~5x faster on CPU), else
    the SVD."""
    d_in, d_out = task_kernels.shape[1:]
    if d_in == d_out:
        return iso_c_matrix(task_kernels)
    m = jnp.sum(task_kernels, axis=0)
    u, s, vt, ratio = top_triplets_gram(m, min(m.shape))
    merged = jnp.mean(s) * jnp.matmul(u, vt, precision=HIGHEST)
    return lax.cond(ratio >= POLAR_MIN_RATIO, lambda: merged, lambda: iso_c_matrix(task_kernels))


def iso_cts_sizes(d_in: int, d_out: int, num_experts: int, common_fraction: float) -> tuple[int, int]:
    """``(c, p)``: common-subspace size and per-task size with ``c + K p = min(d_in, d_out)``."""
    r = min(d_in, d_out)
    c0 = int(r * common_fraction)
    p = min(int(round((r - c0) / num_experts)), r // num_experts)
    return r - num_experts * p, p


def _iso_cts_stack(x, common: int, per_task: int, triplets):
    """Stacked ``(u [d_out, r], s [r], vt [r, d_in])`` of Iso-CTS (before the polar factors) and
    the smallest conditioning ratio met; ``triplets(a, rank) -> (u, s, vt, ratio)``."""
    k = x.shape[0]
    uc, sc, vtc, ratio = triplets(jnp.sum(x, axis=0), common)
    parts_u, parts_s, parts_vt = [], [], []
    if per_task > 0:
        proj = jnp.einsum("ic,kcj->kij", uc, jnp.einsum("ic,kij->kcj", uc, x, precision=HIGHEST),
                          precision=HIGHEST)
        ut, st, vtt, rt = triplets(x - proj, per_task)
        ratio = jnp.minimum(ratio, jnp.min(rt))
        parts_u.append(jnp.moveaxis(ut, 0, 1).reshape(x.shape[1], k * per_task))
        parts_s.append(st.reshape(k * per_task))
        parts_vt.append(vtt.reshape(k * per_task, x.shape[2]))
    parts_u.append(uc)
    parts_s.append(sc)
    parts_vt.append(vtc)
    return (jnp.concatenate(parts_u, axis=1), jnp.concatenate(parts_s), jnp.concatenate(parts_vt, axis=0),
            ratio)


def _svd_triplets(a, rank: int):
    u, s, vt = jnp.linalg.svd(a, full_matrices=False)
    return (u[..., :, :rank], s[..., :rank], vt[..., :rank, :],
            jnp.ones(a.shape[:-2], a.dtype))


@functools.partial(jax.jit, static_argnames=("common", "per_task"))
def iso_cts_matrix(task_kernels, common: int, per_task: int):
    """Iso-CTS of one module by SVDs: ``[K, d_in, d_out] -> [d_in, d_out]`` (module docstring)."""
    x = jnp.swapaxes(task_kernels, -1, -2)            # PyTorch view [K, d_out, d_in]
    u, s, vt, _ = _iso_cts_stack(x, common, per_task, _svd_triplets)
    return (jnp.mean(s) * jnp.matmul(polar(u), polar(vt), precision=HIGHEST)).T


@functools.partial(jax.jit, static_argnames=("common", "per_task"))
def iso_cts_module(task_kernels, common: int, per_task: int):
    """:func:`iso_cts_matrix`, with the truncated SVDs through ``eigh`` of the smaller Grams and
    the polar factors by :func:`~bmm_jax.anchors._common.polar_fast`; the SVD route when a kept
    singular value is below 1% of the largest (decided on device): same result, several times
    faster on CPU."""
    if common < 1:
        return iso_cts_matrix(task_kernels, common, per_task)
    x = jnp.swapaxes(task_kernels, -1, -2)
    u, s, vt, ratio = _iso_cts_stack(x, common, per_task, top_triplets_gram)

    def fast():
        return (jnp.mean(s) * jnp.matmul(polar_fast(u), polar_fast(vt), precision=HIGHEST)).T

    return lax.cond(ratio < TOP_TRIPLETS_MIN_RATIO,
                    lambda: iso_cts_matrix(task_kernels, common, per_task), fast)


@anchor_function
def iso_c(base: PyTree, experts: Sequence[PyTree], *, labels: PyTree | None = None,
          anchor_scale=1.0, modules: str = "all_2d") -> PyTree:
    """Iso-C: flatten the spectrum of ``sum_k T_k`` per merged matrix; mean task vector on the
    other floating leaves; ``theta_0 + anchor_scale * merged``.

    Args:
      base, experts: ``theta_0`` and K >= 2 fine-tuned pytrees like it.
      labels: label tree (default ``build_labels(base)``): the regressed modules and their views.
      anchor_scale: alpha (default 1.0; the authors tune it on validation data; Python number or
        JAX scalar).
      modules: ``"all_2d"`` (default, the reference: every 2-D floating leaf plus the regressed
        modules) or ``"labels"`` (the regressed modules only); static.
    """
    scale = check_hparam(anchor_scale, "anchor_scale")
    check_modules(modules)
    ctx = prepare(base, experts, labels)
    views = module_views(ctx, modules)
    k = ctx.num_experts

    def delta(i):                  # Iso-C needs only sum_k T_k: one fused kernel, no [K, ...] stack
        b = jnp.asarray(ctx.base_leaves[i])
        total = sum_task_vectors(b, ctx.leaf_experts(i), compute_dtype(leaf_dtype(b)))
        view = views[i]
        if view is not None:
            return view.from_matrix(iso_c_module(view.to_matrix(total)[None]))
        return total / k                                   # mean task vector
    return assemble(ctx, delta, scale)


@anchor_function
def iso_cts(base: PyTree, experts: Sequence[PyTree], *, labels: PyTree | None = None,
            anchor_scale=1.0, common_fraction: float = 0.8, modules: str = "all_2d") -> PyTree:
    """Iso-CTS: common + task-specific subspaces with an isotropic spectrum (module docstring).

    Args:
      base, experts: ``theta_0`` and K >= 2 fine-tuned pytrees like it.
      labels: label tree (default ``build_labels(base)``).
      anchor_scale: alpha (default 1.0; the authors tune it on validation data; Python number or
        JAX scalar).
      common_fraction: fraction of the rank given to the common subspace, in [0, 1] (default 0.8;
        static: it fixes the subspace sizes).
      modules: ``"all_2d"`` (default) or ``"labels"``, as in :func:`iso_c`; static.
    """
    scale = check_hparam(anchor_scale, "anchor_scale")
    frac = check_static_fraction(common_fraction, "common_fraction", low_open=False)
    check_modules(modules)
    ctx = prepare(base, experts, labels)

    def fn(t):
        c, p = iso_cts_sizes(t.shape[1], t.shape[2], t.shape[0], frac)
        return iso_cts_module(t, c, p)

    return merge_modules(ctx, module_views(ctx, modules), fn, scale=scale, other="mean")
