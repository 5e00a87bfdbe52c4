"""Weight averaging and Task Arithmetic (method.md §6)."""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp

from bmm_jax._tree import PyTree
from bmm_jax.anchors._common import check_scale, compute_dtype, is_float_dtype, leaf_dtype, prepare


@functools.partial(jax.jit, static_argnames=("dtype", "mean"))
def _sum_merge_leaf(base_leaf, expert_leaves, scale, dtype, mean: bool):
    """``theta_0 + scale * sum_k (theta_k - theta_0)`` (or the mean) of one leaf, fused: no
    ``[K, *shape]`` buffer, one pass over the K + 1 inputs."""
    b = base_leaf.astype(dtype)
    total = (expert_leaves[0].astype(dtype) - b)
    for e in expert_leaves[1:]:
        total = total + (e.astype(dtype) - b)
    if mean:
        total = total / len(expert_leaves)
    return (b + scale * total).astype(base_leaf.dtype)


def _sum_merge(base: PyTree, experts: Sequence[PyTree], scale: float, mean: bool) -> PyTree:
    ctx = prepare(base, experts, need_labels=False)
    out = []
    for i, b in enumerate(ctx.base_leaves):
        dt = leaf_dtype(b)
        if not is_float_dtype(dt):
            out.append(jnp.asarray(b))
            continue
        cd = compute_dtype(dt)
        out.append(_sum_merge_leaf(jnp.asarray(b), [jnp.asarray(e[i]) for e in ctx.expert_leaves],
                                   jnp.asarray(scale, cd), cd, mean))
    return jax.tree_util.tree_unflatten(ctx.treedef, out)


def average(base: PyTree, experts: Sequence[PyTree]) -> PyTree:
    """Weight averaging: ``theta_0 + mean_k tau_k`` (= the mean of the experts), every leaf.

    Args:
      base: pretrained params ``theta_0`` (any pytree of arrays).
      experts: K >= 2 fine-tuned pytrees with the structure, shapes and dtypes of ``base``.

    Returns:
      Params with the structure and leaf dtypes of ``base`` (computed in float32, float64 leaves
      in float64).
    """
    return _sum_merge(base, experts, 1.0, True)


def task_arithmetic(base: PyTree, experts: Sequence[PyTree], scale: float = 0.3) -> PyTree:
    """Task Arithmetic (Ilharco et al. 2023): ``theta_0 + scale * sum_k tau_k``, every leaf.

    Args:
      base, experts: as in :func:`average`.
      scale: the scaling coefficient alpha (default 0.3, the usual 8-task ViT choice).
    """
    scale = check_scale(scale)
    return _sum_merge(base, experts, scale, False)
