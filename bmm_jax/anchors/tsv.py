"""TSV-Merge (Gargiulo et al. 2025, "Task Singular Vectors"), method.md §6.

For every regressed module (2-D view ``[d_in, d_out]``, ``r = min(d_in, d_out)``) with task
kernels ``T_1..T_K``:

1. ``T_k = U_k diag(s_k) V_k^T`` (thin SVD); keep the top ``r_k = floor(r / K)`` triplets of each
   task (``r_k = 1`` when ``r < K``, where the reference code would silently keep none).
2. Concatenate ``U = [U_1[:, :r_k], ..., U_K[:, :r_k]]`` (``[d_in, K r_k]``), the singular
   values ``s`` and ``V^T`` likewise (``[K r_k, d_out]``).
3. Replace ``U`` and ``V^T`` by their nearest orthogonal matrices (polar factors ``P Q^T`` of their
   SVDs) and rebuild ``merged = U_perp diag(s) V_perp^T``.

Computation (same maths as the SVDs, several times faster on CPU): the top triplets of each
``T_k`` come from ``eigh`` of its smaller Gram (SVDs instead when a kept singular value is below 1%
of the largest: squaring the matrix would cost float32 accuracy), the polar factors from
:func:`~bmm_jax.anchors._common.polar_fast`.

Leaves that are not regressed modules get the mean task vector. Output
``theta_0 + scale * merged`` (alpha default 1.0).
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp

from bmm_jax._tree import PyTree
from bmm_jax.anchors._common import (HIGHEST, TOP_TRIPLETS_MIN_RATIO, check_scale, merge_modules, polar,
                                     polar_fast, top_triplets_gram)


def tsv_rank_per_task(d_in: int, d_out: int, num_experts: int) -> int:
    """Triplets kept per task: ``max(1, floor(min(d_in, d_out) / K))``."""
    return max(1, min(d_in, d_out) // num_experts)


@functools.partial(jax.jit, static_argnames=("rank",))
def tsv_merge_matrix(task_kernels, rank: int):
    """TSV-M of one module: ``[K, d_in, d_out] -> [d_in, d_out]`` keeping ``rank`` per task."""
    k, d_in, d_out = task_kernels.shape
    u, s, vt = jnp.linalg.svd(task_kernels, full_matrices=False)
    u = jnp.moveaxis(u[:, :, :rank], 0, 1).reshape(d_in, k * rank)   # task-major columns
    s = s[:, :rank].reshape(k * rank)
    vt = vt[:, :rank, :].reshape(k * rank, d_out)
    return jnp.matmul(polar(u) * s, polar(vt), precision=HIGHEST)


@functools.partial(jax.jit, static_argnames=("rank",))
def _top_triplets_stacked(task_kernels, rank: int):
    k, d_in, d_out = task_kernels.shape
    u, s, vt, ratio = top_triplets_gram(task_kernels, rank)
    return (jnp.moveaxis(u, 0, 1).reshape(d_in, k * rank), s.reshape(k * rank),
            vt.reshape(k * rank, d_out), jnp.min(ratio))


@jax.jit
def _rebuild(pu, s, pv):
    return jnp.matmul(pu * s, pv, precision=HIGHEST)


def tsv_module(task_kernels, rank: int):
    """TSV-M of one module, same result as :func:`tsv_merge_matrix` computed faster: the top
    triplets of each task from ``eigh`` of its smaller Gram (SVDs instead if a kept singular value
    is below 1% of the largest), polar factors by :func:`polar_fast`."""
    u, s, vt, ratio = _top_triplets_stacked(task_kernels, rank)
    if float(ratio) < TOP_TRIPLETS_MIN_RATIO:
        return tsv_merge_matrix(task_kernels, rank)
    return _rebuild(polar_fast(u), s, polar_fast(vt))


def tsv(base: PyTree, experts: Sequence[PyTree], scale: float = 1.0,
        labels: PyTree | None = None) -> PyTree:
    """TSV-Merge (TSV-M): ``theta_0 + scale * merged`` (see the module docstring).

    Args:
      base: pretrained params ``theta_0``.
      experts: K >= 2 fine-tuned pytrees like ``base``.
      scale: alpha (default 1.0).
      labels: label tree selecting the modules (default ``build_labels(base)``: every 2-D kernel
        inside the transformer blocks; GPT-2's transposed kernels are handled by the labels).
    """
    scale = check_scale(scale)

    def fn(t):
        return tsv_module(t, tsv_rank_per_task(t.shape[1], t.shape[2], t.shape[0]))

    return merge_modules(base, experts, fn, labels=labels, scale=scale, other="mean")
