"""RegMean (Jin et al. 2023, "Dataless Knowledge Fusion by Merging Weights of Language Models").

Per regressed module, Flax view ``T_k [d_in, d_out]`` and per-task Grams ``G_k [d_in, d_in]``::

    G~_k = alpha * G_k + (1 - alpha) * diag(G_k)          (off-diagonals scaled by alpha)
    Delta = (sum_k G~_k)^{-1} sum_k G~_k T_k               W_merged = W_0 + Delta

(identical to the paper's ``(sum G~_k)^{-1} sum G~_k W_k`` since ``sum G~_k W_0`` cancels). The
system is solved by Cholesky (``jax.scipy.linalg.cho_factor/cho_solve``), never an inverse; if
``sum_k G~_k`` is numerically singular (alpha = 1 with rank-deficient Grams: the Cholesky result is
not finite or a pivot is below ``sqrt(eps)`` of the largest) the min-norm least-squares solve
(``eigh``) is used instead (a ``lax.cond`` on device, so the function stays pure and traceable;
no warning is emitted).
Modules of one input group (q/k/v) share one Gram array; its factorisation is reused.
Leaves that are not regressed modules get the mean task vector (plain weight averaging, as in the
paper). The Grams are cast to the compute dtype (float32, float64 for float64 leaves). Output
``theta_0 + anchor_scale * Delta`` (``anchor_scale`` default 1, the method as published).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Sequence

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
from jax import lax

from bmm_jax._tree import PyTree
from bmm_jax.anchors._common import (HIGHEST, _psd_solve, anchor_function, assemble, check_hparam,
                                     default_rcond, mean_task_vector, prepare)


@jax.jit
def shrink_off_diagonal(grams, alpha):
    """``[..., d, d]``: off-diagonal entries times ``alpha``, diagonal unchanged."""
    d = grams.shape[-1]
    eye = jnp.eye(d, dtype=bool)
    return jnp.where(eye, grams, alpha * grams)


@jax.jit
def regmean_normal_equations(grams, task_kernels, alpha):
    """``(sum_k G~_k [d_in, d_in], sum_k G~_k T_k [d_in, d_out])``, one expert at a time (no
    shrunk or transposed ``[K, d, d]`` copy of the Grams; one plain matmul per expert)."""
    d = grams.shape[-1]

    def body(k, acc):
        s, b = acc
        g = shrink_off_diagonal(grams[k], alpha)
        return s + g, b + jnp.matmul(g, task_kernels[k], precision=HIGHEST)
    dt = jnp.result_type(grams.dtype, task_kernels.dtype)
    zero = (jnp.zeros((d, d), dt), jnp.zeros(task_kernels.shape[1:], dt))
    return jax.lax.fori_loop(0, grams.shape[0], body, zero)


@jax.jit
def _cho(s):
    return jsl.cho_factor(s, lower=True)[0]


@jax.jit
def regmean_solve(chol, s, b):
    """``S^{-1} B`` from the Cholesky factor ``L`` of ``S``; the min-norm least-squares solve
    (``eigh``, eigenvalues below ``d eps`` of the largest dropped) when ``S`` may be numerically
    singular: the factorisation failed (not finite) or a pivot ``L_ii^2`` is below ``sqrt(eps)`` of
    the largest (``L_ii^2 >= lambda_min(S)``; the rounding noise left in the pivots of a singular
    ``S`` is far below that, and on a regular but ill-conditioned ``S`` both routes agree).
    Decided on device."""
    out = jsl.cho_solve((chol, True), b)
    rcond = default_rcond(s.dtype, s.shape[-1])
    piv = jnp.diagonal(chol) ** 2
    floor = float(jnp.finfo(s.dtype).eps) ** 0.5
    ok = jnp.all(jnp.isfinite(out)) & (jnp.min(piv) > floor * jnp.max(piv))
    return lax.cond(ok, lambda: out, lambda: _psd_solve(s, b, rcond))


@anchor_function
def regmean(base: PyTree, experts: Sequence[PyTree], *, grams: Mapping, labels: PyTree | None = None,
            anchor_scale=1.0, alpha=0.95) -> PyTree:
    """RegMean merge: ``W_0 + anchor_scale * (sum G~_k)^{-1} sum G~_k T_k`` per regressed module.

    Args:
      base: pretrained params ``theta_0``.
      experts: K >= 2 fine-tuned pytrees like ``base``.
      grams: a :class:`bmm_jax.grams.Grams` (or any mapping) ``module path -> [K, d_in, d_in]``
        in the module's ``[d_in, d_out]`` view; must hold every regressed module (keyword-only).
      labels: label tree selecting the modules (default ``build_labels(base)``).
      anchor_scale: coefficient of the merged task vector (default 1.0; Python number or JAX
        scalar).
      alpha: off-diagonal scale in [0, 1] (default 0.95; 1 = plain Gram-weighted solve, 0 =
        diagonal Grams; Python number or JAX scalar).

    Returns:
      Params with the structure and leaf dtypes of ``base``. Pure: runs under ``jit`` / ``vmap``
      / ``scan``.

    Raises:
      ValueError: a regressed module is missing from ``grams`` or its Gram has the wrong shape.
    """
    scale = check_hparam(anchor_scale, "anchor_scale")
    alpha = check_hparam(alpha, "alpha", low=0.0, high=1.0)
    if not isinstance(grams, Mapping):
        raise TypeError(f"grams must be a Grams mapping (module path -> [K, d_in, d_in]), got "
                        f"{type(grams).__name__}")
    ctx = prepare(base, experts, labels)
    K = ctx.num_experts
    present = set(grams.keys())  # iterating keys never materialises lazily built Grams
    for i in ctx.regressed_indices():
        lab = ctx.labels[i]
        if lab.path not in present:
            raise ValueError(f"grams has no entry for regressed module '{lab.path}' "
                             f"(it holds {len(grams)} modules)")
    key_of = getattr(grams, "key_of", None)
    cache: dict = {}

    def delta(i):
        lab = ctx.labels[i]
        if not lab.regressed:
            return mean_task_vector(ctx.taus(i))
        t = ctx.matrices(i)
        g = grams[lab.path]
        if tuple(g.shape) != (K, lab.d_in, lab.d_in):
            raise ValueError(f"Gram of module '{lab.path}' has shape {tuple(g.shape)}, expected "
                             f"{(K, lab.d_in, lab.d_in)} (K experts, d_in x d_in)")
        g = jnp.asarray(g).astype(t.dtype)
        s, b = regmean_normal_equations(g, t, jnp.asarray(alpha).astype(t.dtype))
        key = (key_of[lab.path] if key_of is not None else lab.path, str(t.dtype))
        if key not in cache:
            cache.clear()  # only the current input group is ever reused
            cache[key] = _cho(s)
        return lab.from_matrix(regmean_solve(cache[key], s, b))

    return assemble(ctx, delta, scale)
