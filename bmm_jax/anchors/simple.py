"""Weight averaging and Task Arithmetic (method.md §6)."""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from bmm_jax._tree import PyTree
from bmm_jax.anchors._common import assemble, check_scale, mean_task_vector, prepare


def average(base: PyTree, experts: Sequence[PyTree]) -> PyTree:
    """Weight averaging: ``theta_0 + mean_k tau_k`` (= the mean of the experts), every leaf.

    Args:
      base: pretrained params ``theta_0`` (any pytree of arrays).
      experts: K >= 2 fine-tuned pytrees with the structure, shapes and dtypes of ``base``.

    Returns:
      Params with the structure and leaf dtypes of ``base`` (computed in float32, float64 leaves
      in float64).
    """
    ctx = prepare(base, experts, need_labels=False)
    return assemble(ctx, lambda i: mean_task_vector(ctx.taus(i)))


@jax.jit
def _sum_task_vector(taus):
    return jnp.sum(taus, axis=0)


def task_arithmetic(base: PyTree, experts: Sequence[PyTree], scale: float = 0.3) -> PyTree:
    """Task Arithmetic (Ilharco et al. 2023): ``theta_0 + scale * sum_k tau_k``, every leaf.

    Args:
      base, experts: as in :func:`average`.
      scale: the scaling coefficient alpha (default 0.3, the usual 8-task ViT choice).
    """
    scale = check_scale(scale)
    ctx = prepare(base, experts, need_labels=False)
    return assemble(ctx, lambda i: _sum_task_vector(ctx.taus(i)), scale)
