"""Task vectors tau_k = theta_k - theta_0, stacked on a leading expert axis."""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from bmm_jax._tree import PyTree, check_experts


def task_vectors(base: PyTree, experts: Sequence[PyTree]) -> PyTree:
    """Stacked task vectors.

    Args:
      base: pretrained parameters theta_0 (any pytree of arrays).
      experts: K >= 2 pytrees with the same structure, shapes and dtypes as ``base``.

    Returns:
      A pytree like ``base`` whose every leaf has shape ``[K, *leaf.shape]``:
      ``out[k] = experts[k] - base``. Validation errors name the offending leaf path.
    """
    experts = check_experts(base, experts)

    def stack(b, *es):
        return jnp.stack([jnp.asarray(e) - jnp.asarray(b) for e in es])

    return jax.tree_util.tree_map(stack, base, *experts)


def add_task_vector(base: PyTree, tau: PyTree, scale=1.0) -> PyTree:
    """theta_0 + scale * tau, keeping each leaf's dtype.

    Floating leaves are computed in (at least) float32, so a bf16 base and a float32 tau mix under
    strict dtype promotion; non-floating leaves (integer buffers, counters) are carried from ``base``.
    """
    def add(b, t):
        b = jnp.asarray(b)
        if not jnp.issubdtype(b.dtype, jnp.floating):
            return b
        cd = jnp.float64 if b.dtype == jnp.float64 else jnp.float32
        return (b.astype(cd) + scale * jnp.asarray(t).astype(cd)).astype(b.dtype)

    return jax.tree_util.tree_map(add, base, tau)
