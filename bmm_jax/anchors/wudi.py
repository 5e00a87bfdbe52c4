"""WUDI-Merging (Cheng et al. 2025, "Whoever Started the Interference Should End It"), §6.

Per regressed module, Flax view ``T_k [d_in, d_out]``, the merged task kernel minimises::

    L(T_m) = sum_k ||(T_m - T_k)^T T_k||_F^2 / ||T_k||_F^2
           = sum_k tr[(T_m - T_k)^T G_k (T_m - T_k)],   G_k = T_k T_k^T / ||T_k||_F^2  [d_in, d_in]

(the authors' PyTorch loss ``||(T_m - T_k) T_k^T||^2 / ||T_k||^2`` on ``[d_out, d_in]`` weights).
With ``S = sum_k G_k`` and ``B = sum_k G_k T_k`` the gradient is ``2 (S T_m - B)``, so ``S`` and
``B`` are computed once per module (``Precision.HIGHEST``) and every optimisation step costs one
``[d_in, d_in] x [d_in, d_out]`` matmul.

* Default (faithful): Adam (optax, lr 1e-5, PyTorch's defaults b1 0.9, b2 0.999, eps 1e-8),
  300 steps from ``T_m = sum_k T_k``, all steps in one jitted ``lax.scan``; modules of the same
  shape are stacked and optimised together (Adam is element-wise, so stacking changes nothing).
* ``exact=True``: the minimiser, ``S T_m = B``, by the min-norm least-squares solve
  (``eigh`` of ``S``, eigenvalues below ``rcond * max`` dropped). This is BMM-data-free with
  rho -> 0 (method.md §2).

An expert with ``T_k = 0`` at a module contributes ``G_k = 0`` (not 0/0). Leaves that are not
regressed modules keep ``theta_0`` (as in the authors' code, which only merges the attention and
MLP kernels). Computations in float32 (float64 for float64 leaves).
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import optax
from jax import lax

from bmm_jax._tree import PyTree
from bmm_jax.memory import trim
from bmm_jax.solve import single_thread_lapack
from bmm_jax.anchors._common import (HIGHEST, assemble, check_scale, compute_dtype, leaf_dtype,
                                     prepare, psd_solve_min_norm)


@jax.jit
def wudi_normal_equations(task_kernels):
    """``[K, d_in, d_out] -> (S [d_in, d_in], B [d_in, d_out], sum_k T_k)`` of the WUDI loss."""
    t = task_kernels
    sq = jnp.sum(t * t, axis=(1, 2))
    w = jnp.where(sq > 0, 1.0 / jnp.where(sq > 0, sq, 1.0), 0.0)
    tw = t * w[:, None, None]
    s = jnp.einsum("kio,kjo->ij", tw, t, precision=HIGHEST)
    d_in, d_out = t.shape[1:]
    if d_out <= d_in:   # G_k T_k = T_k (T_k^T T_k) / ||T_k||^2, cheaper through [d_out, d_out]
        small = jnp.einsum("kio,kip->kop", t, t, precision=HIGHEST)
        b = jnp.einsum("kio,kop->ip", tw, small, precision=HIGHEST)
    else:
        b = jnp.einsum("kij,kjo->io", jnp.einsum("kio,kjo->kij", tw, t, precision=HIGHEST), t,
                       precision=HIGHEST)
    return s, b, jnp.sum(t, axis=0)


@functools.partial(jax.jit, static_argnames=("steps",))
def wudi_adam(s, b, init, lr, steps: int):
    """``steps`` Adam steps on ``L`` with gradient ``2 (S T - B)``; leading axes are batch axes.

    Args:
      s: ``[..., d_in, d_in]``; b, init: ``[..., d_in, d_out]``; lr: learning rate (scalar).
    Returns:
      The final ``T_m`` (same shape as ``init``).
    """
    opt = optax.adam(lr)

    def step(carry, _):
        tm, state = carry
        grad = 2.0 * (jnp.matmul(s, tm, precision=HIGHEST) - b)
        updates, state = opt.update(grad, state, tm)
        return (optax.apply_updates(tm, updates), state), None

    # optax's bias correction computes float ** int32 step count, which strict dtype promotion
    # rejects; trace the optimiser under standard promotion (all our arrays share one dtype).
    with jax.numpy_dtype_promotion("standard"):
        (tm, _), _ = lax.scan(step, (init, opt.init(init)), None, length=steps)
    return tm


def _chunks(indices, per_module: int, max_elements: int):
    n = max(1, max_elements // max(per_module, 1))
    for j in range(0, len(indices), n):
        yield indices[j:j + n]


@single_thread_lapack
def wudi(base: PyTree, experts: Sequence[PyTree], lr: float = 1e-5, steps: int = 300,
         exact: bool = False, labels: PyTree | None = None, *, rcond: float | None = None,
         max_stack_elements: int = 2 ** 24) -> PyTree:
    """WUDI-Merging: ``theta_0 + T_m`` on regressed modules, ``theta_0`` elsewhere.

    Args:
      base: pretrained params ``theta_0``.
      experts: K >= 2 fine-tuned pytrees like ``base``.
      lr: Adam learning rate (default 1e-5, the authors' value).
      steps: Adam steps (default 300); 0 returns task arithmetic with scale 1 on the modules.
      exact: solve for the minimiser instead of running Adam.
      labels: label tree selecting the modules (default ``build_labels(base)``).
      rcond: relative eigenvalue cutoff of the exact solve (default ``d_in * eps``).
      max_stack_elements: cap on the elements of one stacked group of same-shape modules
        (``M * (d_in^2 + 4 d_in d_out)``); bounds memory on large models.

    Returns:
      Params with the structure and leaf dtypes of ``base``.
    """
    lr = check_scale(lr, "lr")
    if lr <= 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
    if rcond is not None and not (0 <= check_scale(rcond, "rcond") < 1):
        raise ValueError(f"rcond must be in [0, 1), got {rcond}")
    ctx = prepare(base, experts, labels)

    groups: dict[tuple, list[int]] = {}
    for i in ctx.regressed_indices():
        lab = ctx.labels[i]
        cdt = jnp.dtype(compute_dtype(leaf_dtype(ctx.base_leaves[i])))
        groups.setdefault((lab.d_in, lab.d_out, cdt), []).append(i)

    deltas = {}
    for (d_in, d_out, _), members in groups.items():
        for chunk in _chunks(members, d_in * d_in + 4 * d_in * d_out, max_stack_elements):
            eqs = [wudi_normal_equations(ctx.matrices(i)) for i in chunk]
            s = jnp.stack([e[0] for e in eqs])
            b = jnp.stack([e[1] for e in eqs])
            init = jnp.stack([e[2] for e in eqs])
            del eqs
            if exact:
                tm = psd_solve_min_norm(s, b, rcond)
            elif steps == 0:
                tm = init
            else:
                tm = wudi_adam(s, b, init, jnp.asarray(lr, init.dtype), steps)
            for j, i in enumerate(chunk):
                deltas[i] = ctx.labels[i].from_matrix(tm[j])
            jax.block_until_ready([deltas[i] for i in chunk])
            del s, b, init, tm
            trim()                  # the chunk's S, B and Adam state leave the process now
    return assemble(ctx, deltas.get)
