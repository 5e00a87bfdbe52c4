"""Data-free BMM of one module, fast: the isotropic solve with ``G_k = T_k T_k^T / ||T_k||^2`` written
for the cost that dominates a large merge (method.md §2, §3.2).

Everything works on the task vectors in *row orientation* ``U_k = T_k^T`` (``[d_out, d_in]``, the
PyTorch / safetensors layout of a linear weight, so a ``transposed`` leaf is read as stored and no
``[K, d_in, d_out]`` stack, transposed copy or weighted copy is materialised). With
``a_k = w_k / ||U_k||_F^2`` (zero for an unchanged expert)::

    S = sum_k a_k U_k^T U_k            B^T = sum_k a_k U_k G_k          lambda = rho tr(S) / d_in
    Delta^T = (B^T + lambda U_a) (S + lambda I)^{-1}

Two shapes of problem:

* **wide** (``K d_out > d_in``: q/o, gate/up projections): ``G_k = U_k^T U_k`` from its block lower
  triangle, one Cholesky factor of ``S + lambda I`` and two triangular solves against the
  ``[d_out, d_in]`` right-hand side, which LAPACK reads column-major, i.e. as stored: no transposed
  copy of the right-hand side or of the solution.
* **linear anchor, low rank** (``K d_out <= d_in``: down projections, grouped-query k/v, with an
  anchor ``T_a = sum_k c_k T_k`` such as Task Arithmetic or averaging). With ``F`` the ``R x d_in``
  stack of ``sqrt(a_k) U_k`` (``R = K d_out``), ``S = F^T F`` and both ``B`` and ``T_a`` lie in the
  row space of ``F``: ``B = F^T N`` with ``N_k = C_kk / sqrt(a_k)`` and ``T_a = F^T M`` with
  ``M_k = (c_k / sqrt(a_k)) I``, where ``C = F F^T``. By the push-through identity
  ``(F^T F + lambda I)^{-1} F^T = F^T (F F^T + lambda I)^{-1}``::

      Delta = F^T (C + lambda I)^{-1} (N + lambda M)

  so only the ``R x R`` matrix ``C`` (its block lower triangle, ``K (K + 1) / 2`` products of
  ``d_out x d_out`` blocks) is formed and factored, ``B`` and ``T_a`` are never formed, and the
  final product ``Delta^T = sum_k sqrt(a_k) Y_k^T U_k`` reads the task vectors as stored. Against
  the dense solve this saves the ``K`` products ``(U_k U_k^T) U_k`` (an LLM down projection with
  K = 4: 1.3 instead of 1.6 TFLOP).

Both are pure JAX (``jit``, ``vmap``, ``grad``) and return ``(result [d_out, d_in], stats)`` with
``result = scale * Delta^T``; :mod:`bmm_jax.engine` chooses between them and the general path.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from bmm_jax.solve import GRAM_BLOCK, HIGHEST, _row_blocks

_F32 = jnp.float32
_T_CONTRACT_ROWS = (((0,), (0,)), ((), ()))        # x^T y for x [m, a], y [m, b]


class RowSolve(NamedTuple):
    """What a data-free row-oriented solve returns besides the result (for the module status):
    ``trace_s`` (``tr S``), ``finite_s`` (``S`` and the right-hand side finite), ``changed``,
    ``max_abs`` (largest ``|T_k|``), ``ta_rows`` (the anchor's ``U_a``, ``[d_out, d_in]``),
    ``singular`` (1 if ``S`` is numerically singular; only computed when asked)."""
    trace_s: jax.Array
    finite_s: jax.Array
    changed: jax.Array
    max_abs: jax.Array
    ta_rows: jax.Array
    singular: jax.Array


def task_rows(to_rows, base_leaf, expert_leaves: Sequence) -> list:
    """``[U_k]``: float32 ``[d_out, d_in]`` task vectors of one module; ``to_rows`` maps a leaf-shaped
    array to its row view (a reshape or transpose that XLA folds into the subtraction)."""
    b = base_leaf.astype(_F32)
    return [to_rows(e.astype(_F32) - b) for e in expert_leaves]


def _weights(u: list, weights):
    """``(a [K], sq [K], changed, max_abs)``: normalised weights ``w_k / ||U_k||^2`` (0 for ``U_k = 0``)."""
    sq = jnp.stack([jnp.sum(x * x) for x in u])
    max_abs = jnp.max(jnp.stack([jnp.max(jnp.abs(x)) for x in u]))
    w = jnp.asarray(weights, _F32)
    a = jnp.where(sq > 0, w / jnp.where(sq > 0, sq, 1.0), 0.0)
    return a, sq, max_abs > 0, max_abs


def _lower_cols_gram(x):
    """Block lower triangle of ``x^T x`` (``x [m, d]``) as ``[d, d]``, upper blocks zero; about
    ``(n + 1) / 2n`` of the product's flops for ``n`` blocks of :data:`GRAM_BLOCK` columns."""
    d = x.shape[1]
    out = jnp.zeros((d, d), x.dtype)
    for lo, hi in _row_blocks(d, GRAM_BLOCK):
        out = lax.dynamic_update_slice(out, lax.dot_general(x[:, lo:hi], x[:, :hi], _T_CONTRACT_ROWS,
                                                            precision=HIGHEST), (lo, 0))
    return out


def _lower_rows_gram(x):
    """Block lower triangle of ``x x^T`` (``x [d, m]``) as ``[d, d]``, upper blocks zero."""
    d = x.shape[0]
    out = jnp.zeros((d, d), x.dtype)
    for lo, hi in _row_blocks(d, GRAM_BLOCK):
        out = lax.dynamic_update_slice(out, jnp.matmul(x[lo:hi], x[:hi].T, precision=HIGHEST), (lo, 0))
    return out


def _symmetric_from_blocks(low, block: int | None = None):
    """The full symmetric matrix from its block lower triangle (upper blocks zero, diagonal blocks
    full, of :data:`GRAM_BLOCK` rows or ``block``): ``low + low^T`` with the diagonal blocks put back.
    (No iota mask: XLA's CPU compiler spends minutes constant-folding one of a few thousand rows.)"""
    d = low.shape[-1]
    edges = _row_blocks(d, GRAM_BLOCK) if block is None else [(i, i + block) for i in range(0, d, block)]
    full = low + low.T
    for lo, hi in edges:
        full = lax.dynamic_update_slice(full, low[lo:hi, lo:hi], (lo, lo))
    return full


def _cholesky_lower(a_t):
    """Cholesky factor of the symmetric matrix whose *lower* triangle is the lower triangle of
    ``a_t.T``: pass the row-major matrix holding it in its upper triangle (or a full symmetric
    one); LAPACK reads it column-major, so the transpose costs no copy."""
    return lax.linalg.cholesky(a_t.T, symmetrize_input=False)


def _solve_rows(low, rhs_rows):
    """``rhs_rows (L L^T)^{-1}`` for ``rhs_rows [n, d]``: LAPACK's column-major ``[d, n]`` right-hand
    side is ``rhs_rows`` as stored, and so is the solution."""
    y = lax.linalg.triangular_solve(low, rhs_rows.T, left_side=True, lower=True)
    return lax.linalg.triangular_solve(low, y, left_side=True, lower=True, transpose_a=True).T


def _is_singular(s):
    """1.0 if the PSD ``s`` is numerically singular (smallest eigenvalue below ``d eps`` largest)."""
    e = jnp.linalg.eigvalsh(s)
    tol = s.shape[-1] * jnp.finfo(_F32).eps * jnp.maximum(jnp.max(jnp.abs(e)), jnp.finfo(_F32).tiny)
    return (jnp.min(e) <= tol).astype(_F32)


def solve_wide(u: list, ta_rows, weights, rho, scale, *, check_singular: bool = False):
    """Data-free isotropic solve in ``d_in`` space (``K d_out > d_in``). ``u``: K ``[d_out, d_in]``
    task vectors; ``ta_rows [d_out, d_in]``: the anchor's ``U_a``. Returns ``(scale * Delta^T, RowSolve)``."""
    a, sq, changed, max_abs = _weights(u, weights)
    d_in = u[0].shape[1]
    tr = jnp.sum(a * sq)
    lam = rho * tr / d_in
    s = jnp.zeros((d_in, d_in), _F32)
    bt = jnp.zeros(u[0].shape, _F32)
    for k, x in enumerate(u):
        g = _symmetric_from_blocks(_lower_cols_gram(x))
        s = s + a[k] * g
        bt = bt + a[k] * jnp.matmul(x, g, precision=HIGHEST)
    # an unchanged module has S = 0 and lambda = 0: factor I instead (the caller selects the base)
    s_safe = s + (lam + jnp.where(changed, 0.0, 1.0)) * jnp.eye(d_in, dtype=_F32)
    rhs = bt + lam * ta_rows
    out = scale * _solve_rows(_cholesky_lower(s_safe), rhs)
    singular = _is_singular(s + jnp.where(changed, 0.0, 1.0) * jnp.eye(d_in, dtype=_F32)) if check_singular \
        else jnp.zeros((), _F32)
    finite = (jnp.isfinite(tr) & jnp.all(jnp.isfinite(rhs))).astype(_F32)
    return out, RowSolve(tr, finite, changed, max_abs, ta_rows, singular)


def solve_linear_anchor(u: list, coefficients, weights, rho, scale, *, check_singular: bool = False):
    """Data-free isotropic solve in the ``R = K d_out`` space for the anchor ``T_a = sum_k c_k T_k``
    (module docstring; use when ``K d_out <= d_in``). ``coefficients [K]`` may be traced. Returns
    ``(scale * Delta^T, RowSolve)``; ``singular`` (when asked) is 1 whenever ``R < d_in`` (``S`` then
    has rank at most ``R``), else tested on ``C``, which has the eigenvalues of ``S``."""
    a, sq, changed, max_abs = _weights(u, weights)
    k = len(u)
    d_out, d_in = u[0].shape
    r = k * d_out
    c = jnp.asarray(coefficients, _F32)
    ra = jnp.sqrt(a)
    inv_ra = jnp.where(a > 0, 1.0 / jnp.where(a > 0, ra, 1.0), 0.0)
    tr = jnp.sum(a * sq)
    lam = rho * tr / d_in
    # C = F F^T with F = [sqrt(a_k) U_k]: block (i, j) = sqrt(a_i a_j) U_i U_j^T. Built row-major
    # with the blocks above the diagonal (i < j) so that LAPACK, reading column-major, sees C's
    # lower triangle (_cholesky_lower); diagonal blocks full (their lower triangle computed once).
    up = jnp.zeros((r, r), _F32)
    diag = []
    for i in range(k):
        cii = _symmetric_from_blocks(_lower_rows_gram(u[i]))          # U_i U_i^T
        diag.append(cii)
        up = lax.dynamic_update_slice(up, a[i] * cii, (i * d_out, i * d_out))
        for j in range(i + 1, k):
            cij = jnp.matmul(u[i], u[j].T, precision=HIGHEST)
            up = lax.dynamic_update_slice(up, (ra[i] * ra[j]) * cij, (i * d_out, j * d_out))
    eye = jnp.eye(d_out, dtype=_F32)
    # N_k + lambda M_k = sqrt(a_k) U_k U_k^T + lambda (c_k / sqrt(a_k)) I: the right-hand side as
    # [d_out, R] rows (symmetric blocks), column-major [R, d_out] for LAPACK
    rhs_rows = jnp.concatenate([ra[i] * diag[i] + (lam * c[i] * inv_ra[i]) * eye for i in range(k)], axis=1)
    reg = lam + jnp.where(changed, 0.0, 1.0)
    m = up + reg * jnp.eye(r, dtype=_F32)
    y_rows = _solve_rows(_cholesky_lower(m), rhs_rows)               # [d_out, R] = Y^T
    out = sum((ra[i] * scale) * jnp.matmul(y_rows[:, i * d_out:(i + 1) * d_out], u[i], precision=HIGHEST)
              for i in range(k))
    ta_rows = sum(c[i] * u[i] for i in range(k))
    if check_singular:
        singular = (jnp.ones((), _F32) if r < d_in else
                    _is_singular(_symmetric_from_blocks(up.T, d_out) + jnp.where(changed, 0.0, 1.0) * jnp.eye(r, dtype=_F32)))
    else:
        singular = jnp.zeros((), _F32)
    finite = (jnp.isfinite(tr) & jnp.all(jnp.isfinite(rhs_rows))).astype(_F32)
    return out, RowSolve(tr, finite, changed, max_abs, ta_rows, singular)


__all__ = ["solve_wide", "solve_linear_anchor", "task_rows", "RowSolve"]
