"""The anchored solve of method.md §2 in the rank of the Grams (Woodbury).

When every per-task Gram is factored, ``G_k = F_k F_k^T`` with ``F_k [d_in, r_k]``, the weighted
Gram is ``S = sum_k w_k G_k = F F^T`` with the stacked factor ``F = [sqrt(w_k) F_k]_k`` of shape
``[d_in, R]``, ``R = sum_k r_k``, and ``B = sum_k w_k G_k T_k = F C`` with
``C = [sqrt(w_k) F_k^T T_k]_k`` (``[R, d_out]``). With ``lambda = rho * tr(S) / d_in`` and
``tr(S) = ||F||_F^2``, the push-through identity ``(F F^T + lambda I)^{-1} F = F M^{-1}`` with
``M = lambda I_R + F^T F`` (Woodbury) gives

    Delta = (S + lambda I)^{-1} (B + lambda T_a) = T_a + F M^{-1} (C - F^T T_a)

so only the ``R x R`` matrix ``M`` is factored (Cholesky) and no ``d_in x d_in`` matrix is formed:
``O(R^2 d_in + R d_in d_out + R^3)`` flops and ``O(R^2 + R d_out)`` extra memory instead of
``O(R d_in^2 + d_in^3)`` and ``O(d_in^2)``. This pays when ``R < d_in``: data-free Grams
(method.md §3.2, ``F_k = T_k / ||T_k||_F``, ``r_k = d_out``) of an LLM's down projection or of
grouped-query k/v projections with few experts (``K d_out < d_in``).

``lambda > 0`` is required (``rho > 0`` and ``S != 0``): ``S`` has rank ``<= R < d_in``, so the
system is singular at ``rho = 0``. Eager calls raise; traced calls return non-finite values.

For the outer loop (many ``(rho, scale)`` trials) :func:`lowrank_factors` diagonalises ``F^T F =
V diag(e) V^T`` once (``e`` are the non-zero eigenvalues of ``S``); then each trial is one
``[d_in, R] x [R, d_out]`` matmul (:func:`resolve_lowrank`):

    Delta = c T_a + (F V) diag(1 / (e + lambda)) (V^T C - c V^T F^T T_a)

(``c`` the anchor's own scale), the rank-``R`` analogue of :func:`bmm_jax.solve.resolve_factors`.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

HIGHEST = jax.lax.Precision.HIGHEST


# ----------------------------------------------------------------------------- validation
def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _as_factor(f, k: int, d_in: int):
    """``f`` as one ``[K, d_in, r]`` array, or a list of K ``[d_in, r_k]`` arrays concatenated
    along the factor axis (the stacked layout keeps per-task blocks; returns ``[K, d_in, r]`` when
    all ``r_k`` are equal, else ``None`` plus the concatenated ``[d_in, R]`` block)."""
    if isinstance(f, (list, tuple)):
        if len(f) != k:
            raise ValueError(f"factors: got {len(f)} factor blocks for K = {k} tasks")
        fs = [jnp.asarray(x) for x in f]
        for i, x in enumerate(fs):
            if x.ndim != 2 or x.shape[0] != d_in:
                raise ValueError(f"factors[{i}] must be [d_in, r_k] with d_in = {d_in}, got shape "
                                 f"{tuple(x.shape)}")
        return fs
    f = jnp.asarray(f)
    if f.ndim != 3 or f.shape[:2] != (k, d_in):
        raise ValueError(f"factors must be [K, d_in, r] = ({k}, {d_in}, r), got shape {tuple(f.shape)}")
    return [f[i] for i in range(k)]


def _check_inputs(t, f, ta, weights, rho, scale):
    t = jnp.asarray(t)
    ta = jnp.asarray(ta)
    if t.ndim != 3:
        raise ValueError(f"task_kernels must be [K, d_in, d_out], got shape {tuple(t.shape)}")
    k, d_in, d_out = t.shape
    if ta.shape != (d_in, d_out):
        raise ValueError(f"anchor_kernel must be [d_in, d_out] = {(d_in, d_out)}, got shape {tuple(ta.shape)}")
    fs = _as_factor(f, k, d_in)
    for name, x in (("task_kernels", t), ("anchor_kernel", ta), ("factors", fs[0])):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"{name} must be a floating array, got dtype {x.dtype}")
    dtype = jnp.promote_types(jnp.float32, jnp.result_type(t.dtype, ta.dtype, *[x.dtype for x in fs]))
    if weights is None:
        w = jnp.ones((k,), dtype)
    else:
        w = jnp.asarray(weights)
        if w.shape != (k,):
            raise ValueError(f"weights must have shape ({k},), got {tuple(w.shape)}")
        w = w.astype(dtype)
    if jnp.ndim(rho) != 0:
        raise ValueError(f"rho must be a scalar, got shape {jnp.shape(rho)}")
    if jnp.ndim(scale) != 0:
        raise ValueError(f"scale must be a scalar, got shape {jnp.shape(scale)}")
    return t, fs, ta, w, dtype


def _check_values(t, fs, ta, w, rho) -> None:
    """Value checks, eager inputs only (skipped for traced ones)."""
    if _is_concrete(rho):
        r = float(rho)
        if not np.isfinite(r) or r <= 0:
            raise ValueError(f"rho must be finite and > 0 for the low-rank (Woodbury) solve, got {rho}: "
                             "S = F F^T has rank < d_in, so rho = 0 leaves the system singular; use the "
                             "dense solve (bmm_jax.solve.solve_anchored) for rho = 0 with full-rank Grams")
    if _is_concrete(w) and (bool(jnp.any(w < 0)) or not bool(jnp.all(jnp.isfinite(w)))):
        raise ValueError(f"weights must be finite and >= 0, got {np.asarray(w)}")
    arrays = [("task_kernels", t), ("anchor_kernel", ta)] + [(f"factors[{i}]", x) for i, x in enumerate(fs)]
    if all(_is_concrete(x) for _, x in arrays):
        for name, x in arrays:
            if not bool(jnp.all(jnp.isfinite(x))):
                raise ValueError(f"{name} has non-finite values")
        if _is_concrete(w) and sum(float(wi) * float(jnp.sum(jnp.square(x.astype(jnp.float32))))
                                   for wi, x in zip(w, fs)) == 0.0:
            raise ValueError("singular system: every factor is zero (or has zero weight), so S = 0 and "
                             "lambda = rho tr(S)/d_in = 0")


# ----------------------------------------------------------------------------- core
def _gram_blocks(fs, alpha):
    """``M0 = F^T F`` (``[R, R]``) of ``F = [alpha_k F_k]_k`` from the blocks ``alpha_i alpha_j
    F_i^T F_j`` (no ``[d_in, R]`` concatenated or weighted copy of the factors)."""
    k = len(fs)
    rows = []
    for i in range(k):
        row = []
        for j in range(k):
            if j < i:
                row.append(rows[j][i].T)
            else:
                row.append((alpha[i] * alpha[j]) * jnp.matmul(fs[i].T, fs[j], precision=HIGHEST))
        rows.append(row)
    return jnp.block(rows), rows


def _stacked_terms(t, fs, ta, alpha, self_factor: bool):
    """``(F^T F, C, F^T T_a)`` of ``F = [alpha_k F_k]_k``; ``C_k = alpha_k F_k^T T_k`` (taken from
    the diagonal blocks of ``F^T F`` when the factors are the task kernels themselves)."""
    m0, blocks = _gram_blocks(fs, alpha)
    if self_factor:                               # F_k = T_k: C_k = alpha_k T_k^T T_k
        c = jnp.concatenate([blocks[i][i] / jnp.where(alpha[i] != 0, alpha[i], 1.0)
                             for i in range(len(fs))], axis=0)
    else:
        c = jnp.concatenate([alpha[i] * jnp.matmul(fs[i].T, t[i], precision=HIGHEST)
                             for i in range(len(fs))], axis=0)
    fta = jnp.concatenate([alpha[i] * jnp.matmul(fs[i].T, ta, precision=HIGHEST)
                           for i in range(len(fs))], axis=0)
    return m0, c, fta


def _apply_factor(fs, alpha, y):
    """``F y = sum_k alpha_k F_k y_k`` for ``y [R, d_out]`` split by the factor blocks."""
    out, start = None, 0
    for i, f in enumerate(fs):
        r = f.shape[1]
        term = alpha[i] * jnp.matmul(f, y[start:start + r], precision=HIGHEST)
        out = term if out is None else out + term
        start += r
    return out


def _woodbury(t, fs, ta, alpha, rho, scale, self_factor: bool):
    m0, c, fta = _stacked_terms(t, fs, ta, alpha, self_factor)
    d_in = ta.shape[0]
    tr = jnp.trace(m0)                                             # tr(S) = tr(F^T F)
    lam = rho * tr / d_in
    # all factors zero (no expert changed the module): F = 0, so the result is s T_a whatever M
    # is; M = I keeps the solve finite instead of factoring 0
    m = m0 + (lam + jnp.where(tr > 0, 0.0, 1.0).astype(m0.dtype)) * jnp.eye(m0.shape[0], dtype=m0.dtype)
    y = jax.scipy.linalg.cho_solve(jax.scipy.linalg.cho_factor(m, lower=True), c - fta)
    return scale * (ta + _apply_factor(fs, alpha, y))


_woodbury_jit = jax.jit(_woodbury, static_argnums=(6,))


def _data_free_alpha(t, w):
    """``sqrt(w_k) / ||T_k||_F`` (0 where ``T_k = 0``): ``F_k = alpha_k T_k``."""
    sq = jnp.sum(t * t, axis=(-2, -1))
    return jnp.where(sq > 0, jnp.sqrt(w) / jnp.sqrt(jnp.where(sq > 0, sq, jnp.ones_like(sq))), jnp.zeros_like(sq))


def solve_factored_woodbury(task_kernels, factors, anchor_kernel, *, rho, scale=1.0, weights=None):
    """Anchored regression of one module with factored Grams, in the rank of the Grams.

    Solves ``Delta = (S + lambda I)^{-1} (B + lambda T_a)`` (method.md §2, isotropic prior) with
    ``S = sum_k w_k F_k F_k^T``, ``B = sum_k w_k F_k F_k^T T_k``, ``lambda = rho tr(S) / d_in``,
    through the ``R x R`` system ``lambda I + F^T F`` (``R = sum_k r_k``); no ``d_in x d_in``
    matrix is formed. Pure; works under ``jit``, ``vmap`` and ``grad`` (w.r.t. ``rho``,
    ``scale``, the kernels and the factors).

    Args:
      task_kernels: ``[K, d_in, d_out]`` task vectors ``T_k = W_k - W_0`` (Flax ``[d_in, d_out]`` view).
      factors: ``[K, d_in, r]`` Gram factors ``G_k = F_k F_k^T``, or a list of K ``[d_in, r_k]``
        factors of different ranks. Data-free Grams: ``F_k = T_k / ||T_k||_F``
        (:func:`bmm_jax.grams.data_free.normalized_factors`, or :func:`solve_data_free_woodbury`).
      anchor_kernel: ``[d_in, d_out]`` anchor task vector ``T_a = W_a - W_0``.
      rho: relative prior strength, ``> 0`` (scalar; may be traced).
      scale: assembly scale ``s``.
      weights: ``[K]`` non-negative task weights (default 1).

    Returns:
      ``scale * Delta``, ``[d_in, d_out]``, float32 (or float64 for float64 inputs), in task-vector
      space (``W = W_0 + result``): equal to :func:`bmm_jax.solve.solve_anchored` with the dense
      Grams ``F_k F_k^T``.

    Raises:
      ValueError / TypeError: bad shapes or dtypes (at trace time); eagerly also ``rho <= 0``,
      negative weights, non-finite inputs or all-zero factors (``S = 0``).
    """
    t, fs, ta, w, dtype = _check_inputs(task_kernels, factors, anchor_kernel, weights, rho, scale)
    _check_values(t, fs, ta, w, rho)
    return _woodbury_jit(t.astype(dtype), [x.astype(dtype) for x in fs], ta.astype(dtype), jnp.sqrt(w),
                         jnp.asarray(rho, dtype), jnp.asarray(scale, dtype), False)


def solve_data_free_woodbury(task_kernels, anchor_kernel, *, rho, scale=1.0, weights=None):
    """:func:`solve_factored_woodbury` with the data-free Grams of method.md §3.2,
    ``F_k = T_k / ||T_k||_F`` (``F_k = 0`` where ``T_k = 0``), ``R = K d_out``.

    The task kernels serve as their own factors with per-task weights ``w_k / ||T_k||_F^2``: no
    normalised copy of them is made. Args and returns as :func:`solve_factored_woodbury`.
    """
    t = jnp.asarray(task_kernels)
    if t.ndim != 3:
        raise ValueError(f"task_kernels must be [K, d_in, d_out], got shape {tuple(t.shape)}")
    t, fs, ta, w, dtype = _check_inputs(t, t, anchor_kernel, weights, rho, scale)
    _check_values(t, fs, ta, w, rho)
    t = t.astype(dtype)
    return _woodbury_jit(t, [t[i] for i in range(t.shape[0])], ta.astype(dtype), _data_free_alpha(t, w),
                         jnp.asarray(rho, dtype), jnp.asarray(scale, dtype), True)


# ----------------------------------------------------------------------------- fast re-solves
class LowRankFactors(NamedTuple):
    """Per-module factors for repeated low-rank solves (a pytree of arrays).

    ``p [d_in, R] = F V``, ``e [R]`` eigenvalues of ``F^T F`` (the non-zero spectrum of ``S``,
    clipped at 0), ``zb [R, d_out] = V^T C``, ``za [R, d_out] = V^T F^T T_a``, ``ta [d_in, d_out]``
    the anchor task vector, ``mean_e [] = tr(S) / d_in``.
    """
    p: jax.Array
    e: jax.Array
    zb: jax.Array
    za: jax.Array
    ta: jax.Array
    mean_e: jax.Array


def _lowrank_factors(t, fs, ta, alpha, self_factor: bool):
    m0, c, fta = _stacked_terms(t, fs, ta, alpha, self_factor)
    e, v = jnp.linalg.eigh(m0)
    e = jnp.maximum(e, 0.0)
    return LowRankFactors(p=_apply_factor(fs, alpha, v), e=e, zb=jnp.matmul(v.T, c, precision=HIGHEST),
                          za=jnp.matmul(v.T, fta, precision=HIGHEST), ta=ta,
                          mean_e=jnp.trace(m0) / ta.shape[0])


_lowrank_factors_jit = jax.jit(_lowrank_factors, static_argnums=(4,))


def lowrank_factors(task_kernels, factors, anchor_kernel, *, weights=None) -> LowRankFactors:
    """Factor one module once for many ``(rho, scale)`` trials (:func:`resolve_lowrank`).

    Costs one ``R x R`` eigendecomposition (``R = sum_k r_k``) and ``O(R^2 d_in + R d_in d_out)``
    products; stores ``O(R (d_in + 2 d_out) + d_in d_out)`` numbers (the dense
    :class:`bmm_jax.solve.EigenFactors` store ``d_in^2 + 2 d_in d_out``). Arguments as
    :func:`solve_factored_woodbury`; ``factors=None`` means the data-free Grams
    (``F_k = T_k / ||T_k||_F``, as :func:`solve_data_free_woodbury`).
    """
    data_free = factors is None
    t, fs, ta, w, dtype = _check_inputs(task_kernels, task_kernels if data_free else factors,
                                        anchor_kernel, weights, 1.0, 1.0)
    _check_values(t, fs, ta, w, 1.0)
    t = t.astype(dtype)
    if data_free:
        return _lowrank_factors_jit(t, [t[i] for i in range(t.shape[0])], ta.astype(dtype),
                                    _data_free_alpha(t, w), True)
    return _lowrank_factors_jit(t, [x.astype(dtype) for x in fs], ta.astype(dtype), jnp.sqrt(w), False)


def resolve_lowrank(fac: LowRankFactors, rho, scale=1.0, anchor_scale=1.0):
    """``scale * Delta(rho)`` from :class:`LowRankFactors`, the anchor task vector scaled by
    ``anchor_scale`` (``c``): ``c T_a + P diag(1/(e + lambda)) (Z_b - c Z_a)`` with ``lambda = rho
    tr(S)/d_in``; one ``[d_in, R] x [R, d_out]`` matmul. Pure and jittable; ``rho > 0`` (not
    checked here: at ``rho = 0`` a zero eigenvalue divides by zero)."""
    lam = rho * fac.mean_e
    den = (fac.e + lam)[:, None]
    # a direction with e + lambda = 0 is outside the span of F (F v = 0): its numerator is 0 too
    inner = jnp.where(den > 0, (fac.zb - anchor_scale * fac.za) / jnp.where(den > 0, den, 1.0), 0.0)
    return scale * (anchor_scale * fac.ta + jnp.matmul(fac.p, inner, precision=HIGHEST))


# ----------------------------------------------------------------------------- cost model
class SolveCost(NamedTuple):
    """Multiply-adds and extra float32 working memory (bytes) of one module's solve."""
    flops: float
    bytes: float


def solve_costs(d_in: int, d_out: int, k: int, r: int) -> dict[str, SolveCost]:
    """Cost model of one solve with ``K`` factored Grams of rank ``r`` (``R = K r``).

    ``dense``: form ``S`` from the factors (``R d_in^2 / 2``, symmetric) and ``B`` (``2 R d_in
    d_out``), Cholesky (``d_in^3 / 3``), two triangular solves (``d_in^2 d_out``); memory ``S``
    and its factor (``2 d_in^2``). ``woodbury``: ``F^T F`` (``R^2 d_in / 2``), ``C`` and ``F^T T_a``
    (``2 R d_in d_out``), Cholesky (``R^3 / 3``), solves (``R^2 d_out``), ``F Y`` (``R d_in
    d_out``); memory ``M`` and its factor (``2 R^2``), ``C`` and ``Y`` (``2 R d_out``): the
    factors are used in place, by blocks.
    """
    for name, v in (("d_in", d_in), ("d_out", d_out), ("k", k), ("r", r)):
        if int(v) != v or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    rr = float(k) * float(r)
    di, do = float(d_in), float(d_out)
    dense = SolveCost(rr * di * di / 2 + 2 * rr * di * do + di ** 3 / 3 + di * di * do, 4.0 * 2 * di * di)
    wood = SolveCost(rr * rr * di / 2 + 3 * rr * di * do + rr ** 3 / 3 + rr * rr * do,
                     4.0 * (2 * rr * rr + 2 * rr * do))
    return {"dense": dense, "woodbury": wood}


def prefer_woodbury(d_in: int, d_out: int, k: int, r: int | None = None) -> bool:
    """True when the low-rank (Woodbury) solve is cheaper than the dense one in both flops and
    memory (:func:`solve_costs`); ``r`` defaults to ``d_out`` (data-free Grams, ``R = K d_out``).
    Requires ``K r < d_in``: otherwise ``S`` may be full rank and the dense path is never worse."""
    r = d_out if r is None else r
    if k * r >= d_in:
        return False
    c = solve_costs(d_in, d_out, k, r)
    return c["woodbury"].flops < c["dense"].flops and c["woodbury"].bytes < c["dense"].bytes


__all__ = ["solve_factored_woodbury", "solve_data_free_woodbury", "LowRankFactors",
           "lowrank_factors", "resolve_lowrank", "solve_costs", "prefer_woodbury", "SolveCost"]
