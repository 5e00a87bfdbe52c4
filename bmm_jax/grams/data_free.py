"""Data-free Gram estimator (method.md §3.2).

For every regressed module and expert k, in the module's ``[d_in, d_out]`` view::

    G_k = T_k T_k^T / ||T_k||_F^2        [d_in, d_in], trace 1, rank <= min(d_in, d_out)

An expert that left the module unchanged (``T_k = 0``) contributes ``G_k = 0`` (not 0/0).
The Grams are stored as factors ``F_k = T_k / ||T_k||_F`` computed on demand from the experts,
so no ``[K, d, d]`` array and no copy of the task vectors is kept.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from bmm_jax._tree import PyTree, check_experts, leaves_with_paths
from bmm_jax.grams._base import Grams
from bmm_jax.labels import Label, build_labels, check_labels


@jax.jit
def normalized_factors(task_kernels):
    """``[K, d_in, d_out] -> F_k = T_k / ||T_k||_F`` (zero where ``T_k = 0``), float32."""
    t = task_kernels.astype(jnp.float32)
    sq = jnp.sum(t * t, axis=(-2, -1), keepdims=True)
    safe = jnp.where(sq > 0, sq, 1.0)
    return jnp.where(sq > 0, t / jnp.sqrt(safe), 0.0)


def normalized_weights(task_kernels, weights):
    """``w_k / ||T_k||_F^2`` (0 where ``T_k = 0``) for ``task_kernels [K, d_in, d_out]``, ``weights [K]``.

    With these weights the data-free Grams ``G_k = F_k F_k^T`` need no factor array: ``w_k F_k F_k^T
    = (w_k / ||T_k||^2) T_k T_k^T``, so a solver passes the task kernels themselves as factors
    (:func:`bmm_jax.solve.normal_equations_factored(t, t, normalized_weights(t, w))`).
    """
    if task_kernels.ndim != 3 or weights.shape != task_kernels.shape[:1]:
        raise ValueError(f"normalized_weights expects task_kernels [K, d_in, d_out] and weights [K], got "
                         f"{tuple(task_kernels.shape)} and {tuple(weights.shape)}")
    t = task_kernels.astype(jnp.float32)
    sq = jnp.sum(t * t, axis=(-2, -1))
    return jnp.where(sq > 0, weights.astype(jnp.float32) / jnp.where(sq > 0, sq, 1.0), 0.0)


def module_task_kernels(label: Label, base_leaf, expert_leaves) -> jax.Array:
    """``[K, d_in, d_out]`` task kernels of one module, float32, in the 2-D view."""
    b = jnp.asarray(base_leaf, jnp.float32)
    t = jnp.stack([jnp.asarray(e, jnp.float32) - b for e in expert_leaves])
    return label.to_matrix(t)


def data_free(base: PyTree, experts: Sequence[PyTree], labels: PyTree | None = None) -> Grams:
    """Data-free Grams ``G_k = T_k T_k^T / ||T_k||_F^2`` for every regressed module.

    Args:
      base: pretrained params theta_0.
      experts: K fine-tuned params pytrees.
      labels: label tree (default ``build_labels(base)``).

    Returns:
      :class:`Grams` keyed by module path; each entry ``[K, d_in, d_in]`` (built lazily from
      stored-by-reference experts).
    """
    experts = check_experts(base, experts)
    labels = build_labels(base) if labels is None else labels
    lab = check_labels(labels, base)
    base_leaves = leaves_with_paths(base)
    expert_leaves = [[leaf for _, leaf in leaves_with_paths(e)] for e in experts]
    key_of, sources, views = {}, {}, {}
    for i, (l, (path, b)) in enumerate(zip(lab, base_leaves)):
        if not l.regressed:
            continue
        key_of[path] = path
        sources[path] = (b, tuple(el[i] for el in expert_leaves))
        views[path] = (l.layout, l.d_in, l.d_out)
    if not key_of:
        raise ValueError("the label tree selects no regressed module: nothing to estimate")
    return Grams({}, key_of, kind="data_free", sources=sources, views=views)
