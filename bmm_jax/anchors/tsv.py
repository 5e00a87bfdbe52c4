"""TSV-Merge (Gargiulo et al. 2025, "Task Singular Vectors"), method.md §6.

For every merged matrix (2-D view ``[d_in, d_out]``, ``r = min(d_in, d_out)``) with task
kernels ``T_1..T_K``:

1. ``T_k = U_k diag(s_k) V_k^T`` (thin SVD); keep the top ``r_k = floor(r / K)`` triplets of each
   task.
2. Concatenate ``U = [U_1[:, :r_k], ..., U_K[:, :r_k]]`` (``[d_in, K r_k]``), the singular
   values ``s`` and ``V^T`` likewise (``[K r_k, d_out]``).
3. Replace ``U`` and ``V^T`` by their nearest orthogonal matrices (polar factors ``P Q^T`` of their
   SVDs) and rebuild ``merged = U_perp diag(s) V_perp^T``.

Which leaves are matrices: by default (``modules="all_2d"``) every 2-D floating leaf, as the
reference code (``compute_and_sum_svd_mem_reduction``) merges every 2-D tensor, position
embeddings included, plus the label tree's regressed modules in their ``[d_in, d_out]`` view
(GPT-2's transposed kernels, 1x1 convolutions); ``modules="labels"`` restricts the method to the
regressed modules. Every other floating leaf gets the mean task vector. Output
``theta_0 + anchor_scale * merged`` (alpha default 1.0).

Differences from the reference that remain: ``r_k = max(1, r // K)`` (the reference computes
``int(r * (1 / K))``, which is ``r // K`` except for rounding cases such as ``r = K = 49`` where it
keeps none); 1x1 convolution kernels the label tree marks as modules are merged as matrices.

Computation (same maths as the SVDs, several times faster on CPU): the top triplets of each
``T_k`` come from ``eigh`` of its smaller Gram, and the polar factors from
:func:`~bmm_jax.anchors._common.polar_fast`; when a kept singular value is below 1% of the largest
(squaring the matrix would cost float32 accuracy) the SVD route is taken instead. The choice is a
``lax.cond`` on device: eagerly only the route taken runs.
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from bmm_jax._tree import PyTree
from bmm_jax.anchors._common import (HIGHEST, TOP_TRIPLETS_MIN_RATIO, anchor_function, check_hparam,
                                     check_modules, merge_modules, module_views, polar, polar_fast,
                                     prepare, top_triplets_gram)


def tsv_rank_per_task(d_in: int, d_out: int, num_experts: int) -> int:
    """Triplets kept per task: ``max(1, floor(min(d_in, d_out) / K))``."""
    return max(1, min(d_in, d_out) // num_experts)


@functools.partial(jax.jit, static_argnames=("rank",))
def tsv_merge_matrix(task_kernels, rank: int):
    """TSV-M of one module by SVDs: ``[K, d_in, d_out] -> [d_in, d_out]`` keeping ``rank`` per
    task."""
    k, d_in, d_out = task_kernels.shape
    u, s, vt = jnp.linalg.svd(task_kernels, full_matrices=False)
    u = jnp.moveaxis(u[:, :, :rank], 0, 1).reshape(d_in, k * rank)   # task-major columns
    s = s[:, :rank].reshape(k * rank)
    vt = vt[:, :rank, :].reshape(k * rank, d_out)
    return jnp.matmul(polar(u) * s, polar(vt), precision=HIGHEST)


@functools.partial(jax.jit, static_argnames=("rank",))
def tsv_module(task_kernels, rank: int):
    """TSV-M of one module, same result as :func:`tsv_merge_matrix` computed faster: the top
    triplets of each task from ``eigh`` of its smaller Gram, polar factors by :func:`polar_fast`;
    the SVD route when a kept singular value is below 1% of the largest (decided on device)."""
    k, d_in, d_out = task_kernels.shape
    u, s, vt, ratio = top_triplets_gram(task_kernels, rank)
    u = jnp.moveaxis(u, 0, 1).reshape(d_in, k * rank)
    s = s.reshape(k * rank)
    vt = vt.reshape(k * rank, d_out)

    def fast():
        return jnp.matmul(polar_fast(u) * s, polar_fast(vt), precision=HIGHEST)

    return lax.cond(jnp.min(ratio) < TOP_TRIPLETS_MIN_RATIO,
                    lambda: tsv_merge_matrix(task_kernels, rank), fast)


@anchor_function
def tsv(base: PyTree, experts: Sequence[PyTree], *, labels: PyTree | None = None,
        anchor_scale=1.0, modules: str = "all_2d") -> PyTree:
    """TSV-Merge (TSV-M): ``theta_0 + anchor_scale * merged`` (see the module docstring).

    Args:
      base: pretrained params ``theta_0``.
      experts: K >= 2 fine-tuned pytrees like ``base``.
      labels: label tree (default ``build_labels(base)``): the regressed modules and their
        ``[d_in, d_out]`` views.
      anchor_scale: alpha (default 1.0; Python number or JAX scalar).
      modules: ``"all_2d"`` (default, the reference: every 2-D floating leaf plus the regressed
        modules) or ``"labels"`` (the regressed modules only); static.

    Returns:
      Params with the structure and leaf dtypes of ``base``. Pure: runs under ``jit`` / ``vmap``
      / ``scan``.
    """
    scale = check_hparam(anchor_scale, "anchor_scale")
    check_modules(modules)
    ctx = prepare(base, experts, labels)

    def fn(t):
        return tsv_module(t, tsv_rank_per_task(t.shape[1], t.shape[2], t.shape[0]))

    return merge_modules(ctx, module_views(ctx, modules), fn, scale=scale, other="mean")
