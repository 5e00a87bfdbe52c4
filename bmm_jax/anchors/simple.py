"""Weight averaging and Task Arithmetic (method.md §6)."""
from __future__ import annotations

import functools
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from bmm_jax._tree import PyTree
from bmm_jax.anchors._common import (anchor_function, check_hparam, compute_dtype, is_float_dtype,
                                     leaf_dtype, prepare)


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
    return (b + jnp.asarray(scale).astype(dtype) * total).astype(base_leaf.dtype)


def _sum_merge(base: PyTree, experts: Sequence[PyTree], scale, mean: bool, labels) -> PyTree:
    ctx = prepare(base, experts, labels, need_labels=False)
    out = []
    for i, b in enumerate(ctx.base_leaves):
        dt = leaf_dtype(b)
        if not is_float_dtype(dt):
            out.append(jnp.asarray(b))
            continue
        out.append(_sum_merge_leaf(jnp.asarray(b), ctx.leaf_experts(i), scale, compute_dtype(dt), mean))
    return jax.tree_util.tree_unflatten(ctx.treedef, out)


@anchor_function
def average(base: PyTree, experts: Sequence[PyTree], *, labels: PyTree | None = None,
            anchor_scale=1.0) -> PyTree:
    """Weight averaging: ``theta_0 + anchor_scale * mean_k tau_k`` on every floating leaf
    (``anchor_scale = 1``: the mean of the experts).

    Args:
      base: pretrained params ``theta_0`` (any pytree of arrays).
      experts: K >= 2 fine-tuned pytrees with the structure, shapes and dtypes of ``base``.
      labels: accepted (and validated) for a uniform call signature; averaging acts on every leaf.
      anchor_scale: coefficient of the mean task vector (Python number or JAX scalar, default 1).

    Returns:
      Params with the structure and leaf dtypes of ``base`` (computed in float32, float64 leaves
      in float64). Pure: runs under ``jit`` / ``vmap`` / ``scan``.
    """
    return _sum_merge(base, experts, check_hparam(anchor_scale, "anchor_scale"), True, labels)


@anchor_function
def task_arithmetic(base: PyTree, experts: Sequence[PyTree], *, labels: PyTree | None = None,
                    anchor_scale=0.3) -> PyTree:
    """Task Arithmetic (Ilharco et al. 2023): ``theta_0 + anchor_scale * sum_k tau_k``, every
    floating leaf.

    Args:
      base, experts, labels: as in :func:`average`.
      anchor_scale: the scaling coefficient alpha (default 0.3, the usual 8-task ViT choice;
        Python number or JAX scalar).
    """
    return _sum_merge(base, experts, check_hparam(anchor_scale, "anchor_scale"), False, labels)


@functools.partial(jax.jit, static_argnames=("dtype",))
def _combination_leaf(base_leaf, expert_leaves, coefficients, dtype):
    b = base_leaf.astype(dtype)
    c = jnp.asarray(coefficients).astype(dtype)
    total = sum(c[k] * (e.astype(dtype) - b) for k, e in enumerate(expert_leaves))
    return (b + total).astype(base_leaf.dtype)


class LinearAnchor(NamedTuple):
    """An anchor linear in the task vectors, given by its coefficients: ``theta_0 + sum_k c_k tau_k``
    with ``coefficients [K]`` (Task Arithmetic: every ``c_k = anchor_scale``; averaging:
    ``anchor_scale / K``; may be traced).

    Passed as ``anchor=`` to :func:`bmm_jax.merge` (which also uses it for the names
    ``"task_arithmetic"`` and ``"average"``), the regressed modules never read an anchor array: each
    solve forms ``T_a = sum_k c_k T_k`` from the task vectors in float32 (no rounding to the
    model's dtype) and, for data-free Grams where ``K d_out <= d_in``, solves in their span
    (:mod:`bmm_jax.solve_data_free`). :meth:`materialize` gives the params.
    """
    coefficients: Any

    @classmethod
    def of(cls, name: str, k: int, anchor_scale=None) -> "LinearAnchor":
        """The linear anchor named ``"task_arithmetic"`` or ``"average"`` for ``k`` experts
        (``anchor_scale``: default that of the anchor function)."""
        if name not in LINEAR:
            raise ValueError(f"anchor {name!r} is not linear in the task vectors; linear anchors: {LINEAR}")
        if anchor_scale is None:
            anchor_scale = 0.3 if name == "task_arithmetic" else 1.0
        c = check_hparam(anchor_scale, "anchor_scale")
        per = c if name == "task_arithmetic" else c / k
        return cls(jnp.full((k,), per, jnp.float32))

    def check(self, k: int) -> jax.Array:
        """The coefficients as a float32 ``[K]`` array; a ``ValueError`` if they are not K numbers."""
        host = not isinstance(self.coefficients, (jax.Array, jax.core.Tracer))
        c = np.asarray(self.coefficients) if host else self.coefficients
        if c.shape != (k,) or not (np.issubdtype(c.dtype, np.floating) or np.issubdtype(c.dtype, np.integer)):
            raise ValueError(f"LinearAnchor.coefficients must be {k} real numbers (one per expert), got shape "
                             f"{tuple(c.shape)} and dtype {c.dtype}")
        if host and not np.all(np.isfinite(c)):         # free on the host; device arrays are not read back
            raise ValueError(f"LinearAnchor.coefficients must be finite, got {c.tolist()}")
        return jnp.asarray(c, jnp.float32)

    def materialize(self, base: PyTree, experts: Sequence[PyTree], *, skip: Sequence[bool] | None = None) -> PyTree:
        """The anchor params: ``theta_0 + sum_k c_k tau_k`` on every floating leaf (float32 compute,
        the leaf's dtype), other leaves as the base's. ``skip``: per leaf (flattening order), True
        to leave that leaf as the base's instead (leaves a caller never reads, such as the regressed
        modules of a merge that takes the coefficients)."""
        ctx = prepare(base, experts, None, need_labels=False)
        c = self.check(len(ctx.expert_leaves))
        out = []
        for i, b in enumerate(ctx.base_leaves):
            dt = leaf_dtype(b)
            if not is_float_dtype(dt) or (skip is not None and skip[i]):
                out.append(jnp.asarray(b))
                continue
            out.append(_combination_leaf(jnp.asarray(b), ctx.leaf_experts(i), c, compute_dtype(dt)))
        return jax.tree_util.tree_unflatten(ctx.treedef, out)


LINEAR = ("task_arithmetic", "average")
