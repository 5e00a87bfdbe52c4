"""RegMean (Jin et al. 2023, "Dataless Knowledge Fusion by Merging Weights of Language Models").

Per regressed module, Flax view ``T_k [d_in, d_out]`` and per-task Grams ``G_k [d_in, d_in]``::

    G~_k = alpha * G_k + (1 - alpha) * diag(G_k)          (off-diagonals scaled by alpha)
    Delta = (sum_k G~_k)^{-1} sum_k G~_k T_k               W_merged = W_0 + Delta

(identical to the paper's ``(sum G~_k)^{-1} sum G~_k W_k`` since ``sum G~_k W_0`` cancels). The
system is solved by Cholesky (``jax.scipy.linalg.cho_factor/cho_solve``), never an inverse; if
``sum_k G~_k`` is numerically singular (alpha = 1 with rank-deficient Grams) the Cholesky result is
not finite and the min-norm least-squares solve (``eigh``) is used instead, with a warning.
Modules of one input group (q/k/v) share one Gram array; its factorisation is reused.
Leaves that are not regressed modules get the mean task vector (plain weight averaging, as in the
paper). The Grams are cast to the compute dtype (float32, float64 for float64 leaves).
"""
from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Sequence

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl

from bmm_jax._tree import PyTree
from bmm_jax.solve import single_thread_lapack
from bmm_jax.anchors._common import (HIGHEST, assemble, check_fraction, mean_task_vector, prepare,
                                     psd_solve_min_norm)


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
def _cho_solve(c, b):
    return jsl.cho_solve((c, True), b)


@single_thread_lapack
def regmean(base: PyTree, experts: Sequence[PyTree], grams: Mapping, alpha: float = 0.95,
            labels: PyTree | None = None) -> PyTree:
    """RegMean merge: ``W_0 + (sum G~_k)^{-1} sum G~_k T_k`` per regressed module.

    Args:
      base: pretrained params ``theta_0``.
      experts: K >= 2 fine-tuned pytrees like ``base``.
      grams: a :class:`bmm_jax.grams.Grams` (or any mapping) ``module path -> [K, d_in, d_in]``
        in the module's ``[d_in, d_out]`` view; must hold every regressed module.
      alpha: off-diagonal scale in [0, 1] (default 0.95; 1 = plain Gram-weighted solve, 0 =
        diagonal Grams).
      labels: label tree selecting the modules (default ``build_labels(base)``).

    Returns:
      Params with the structure and leaf dtypes of ``base``.

    Raises:
      ValueError: a regressed module is missing from ``grams`` or its Gram has the wrong shape.
    """
    alpha = check_fraction(alpha, "alpha", low_open=False)
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
        g = jnp.asarray(grams[lab.path])
        if g.shape != (K, lab.d_in, lab.d_in):
            raise ValueError(f"Gram of module '{lab.path}' has shape {tuple(g.shape)}, expected "
                             f"{(K, lab.d_in, lab.d_in)} (K experts, d_in x d_in)")
        g = g.astype(t.dtype)
        s, b = regmean_normal_equations(g, t, jnp.asarray(alpha, t.dtype))
        key = (key_of[lab.path] if key_of is not None else lab.path, str(t.dtype))
        if key not in cache:
            cache.clear()  # only the current input group is ever reused
            cache[key] = _cho(s)
        out = _cho_solve(cache[key], b)
        if not bool(jnp.all(jnp.isfinite(out))):
            warnings.warn(f"RegMean: sum of Grams of module '{lab.path}' is singular; using the "
                          "min-norm least-squares solve", RuntimeWarning, stacklevel=3)
            out = psd_solve_min_norm(s, b)
        return lab.from_matrix(out)

    return assemble(ctx, delta)
