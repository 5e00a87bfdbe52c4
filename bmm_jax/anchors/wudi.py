"""WUDI-Merging (Cheng et al. 2025, "Whoever Started the Interference Should End It"), §6.

Per regressed module, Flax view ``T_k [d_in, d_out]``, the merged task kernel minimises::

    L(T_m) = sum_k ||(T_m - T_k)^T T_k||_F^2 / ||T_k||_F^2
           = sum_k ||F_k^T (T_m - T_k)||_F^2,        F_k = T_k / ||T_k||_F
           = sum_k tr[(T_m - T_k)^T G_k (T_m - T_k)],   G_k = F_k F_k^T  [d_in, d_in]

(the authors' PyTorch loss ``||(T_m - T_k) T_k^T||^2 / ||T_k||^2`` on ``[d_out, d_in]`` weights).
With ``S = sum_k G_k`` and ``B = sum_k G_k T_k`` the gradient is ``2 (S T_m - B)``.

* Default (faithful): Adam (optax, lr 1e-5, PyTorch's defaults b1 0.9, b2 0.999, eps 1e-8),
  300 steps from ``T_m = sum_k T_k``, all steps in one jitted ``lax.scan`` on the precomputed
  ``S`` and ``B`` (``Precision.HIGHEST``; one ``[d_in, d_in] x [d_in, d_out]`` matmul per step);
  modules of the same shape are stacked and optimised together (Adam is element-wise, so stacking
  changes nothing).
* ``exact=True``: the minimiser, i.e. the least-squares solution of the stacked problem
  ``min ||A T_m - C||`` with ``A = [F_1 .. F_K]^T`` (``S = A^T A``; min-norm when it is rank
  deficient). This is BMM-data-free with rho -> 0 (method.md §2). Solved stably
  (:func:`wudi_exact_module`): the normal equations ``S T_m = B`` (``eigh`` of ``S``) only when
  ``cond(S) <= 1 / (1e4 eps)`` (840 in float32: error <~ 1e-4), else a QR factorisation of ``A``
  itself, whose condition number is ``sqrt(cond(S))`` (float32 then agrees with a float64
  ``lstsq`` to ~1e-5 at ``cond(S) ~ 1e7``, where the normal equations lose every digit). Singular
  values of ``A`` below ``rcond * max`` are dropped (min-norm). The choice is a ``lax.cond`` on
  device. ``return_diagnostics=True`` also returns ``cond(S)`` per module.

Note on the exact minimiser: when ``K * d_out`` is close to ``d_in`` the loss is nearly singular
and its exact minimiser is large (random task vectors: 25-140x ``sum_k T_k``); that is the true
optimum, not a numerical artefact (``cond(S)`` in the diagnostics shows it). Adam from
``sum_k T_k`` with the authors' small learning rate stays near its start.

An expert with ``T_k = 0`` at a module contributes ``G_k = 0`` (not 0/0). Leaves that are not
regressed modules keep ``theta_0`` (the authors' ViT code merges only the attention and MLP
kernels). Computations in float32 (float64 for float64 leaves). Output
``theta_0 + anchor_scale * T_m`` (``anchor_scale`` default 1, the authors' choice).
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import optax
from jax import lax
from jax.scipy.linalg import solve_triangular

from bmm_jax._tree import PyTree
from bmm_jax.anchors._common import (HIGHEST, anchor_function, assemble, check_hparam, compute_dtype,
                                     is_array, leaf_dtype, prepare)

# The normal equations are used when cond(S) <= 1 / (NORMAL_EQUATIONS_EPS * eps): float32 840.
NORMAL_EQUATIONS_EPS = 1e4
_POWER_STEPS = 16


@jax.jit
def wudi_normal_equations(task_kernels):
    """``[K, d_in, d_out] -> (S [d_in, d_in], B [d_in, d_out], sum_k T_k)`` of the WUDI loss."""
    t = task_kernels
    w = _inverse_square_norms(t)
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


def _inverse_square_norms(t):
    sq = jnp.sum(t * t, axis=(1, 2))
    return jnp.where(sq > 0, 1.0 / jnp.where(sq > 0, sq, 1.0), 0.0)


@functools.partial(jax.jit, static_argnames=("steps",))
def wudi_adam(s, b, init, lr, steps: int):
    """``steps`` Adam steps on ``L`` with gradient ``2 (S T - B)``; leading axes are batch axes.

    Args:
      s: ``[..., d_in, d_in]``; b, init: ``[..., d_in, d_out]``; lr: learning rate (scalar,
        may be traced).
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


# ------------------------------------------------------------------------------ exact solve
def default_rcond(num_experts: int, d_in: int, d_out: int, dtype) -> float:
    """``max(K min(d_in, d_out), d_in) * eps``: ``numpy.linalg.lstsq``'s default for ``A``."""
    return max(num_experts * min(d_in, d_out), d_in) * float(jnp.finfo(dtype).eps)


def stacked_factor(task_kernels):
    """``(A [m, d_in], C [m, d_out])`` with ``L(T_m) = ||A T_m - C||_F^2``.

    Rows of task ``k``: ``F_k^T`` and ``F_k^T T_k`` when ``d_out <= d_in`` (``m = K d_out``); else
    the triangular factor ``R_k`` of ``F_k^T = Q_k R_k`` and ``R_k T_k`` (``m = K d_in``, same loss
    since ``Q_k`` has orthonormal columns).
    """
    t = task_kernels
    k, d_in, d_out = t.shape
    f = t * jnp.sqrt(_inverse_square_norms(t))[:, None, None]
    if d_out <= d_in:
        a = jnp.swapaxes(f, 1, 2)                                        # [K, d_out, d_in]
        c = jnp.einsum("kio,kip->kop", f, t, precision=HIGHEST)          # [K, d_out, d_out]
        return a.reshape(k * d_out, d_in), c.reshape(k * d_out, d_out)
    r = jnp.linalg.qr(jnp.swapaxes(f, 1, 2), mode="r")                   # [K, d_in, d_in]
    c = jnp.matmul(r, t, precision=HIGHEST)                              # [K, d_in, d_out]
    return r.reshape(k * d_in, d_in), c.reshape(k * d_in, d_out)


def _sigma_extremes(r):
    """``(sigma_max, sigma_min)`` estimates of a square upper-triangular ``r`` by power and inverse
    iteration (``_POWER_STEPS`` each, triangular solves only). Both are attained lower / upper
    bounds: ``sigma_max`` never exceeds and ``sigma_min`` never falls below the true value; an
    exactly singular ``r`` gives ``sigma_min = 0`` (or NaN)."""
    n = r.shape[0]
    v0 = 1.0 + 0.5 * jnp.sin(jnp.arange(n, dtype=r.dtype) * 1.618)
    v0 = v0 / jnp.linalg.norm(v0)

    def up(_, v):
        w = jnp.matmul(r.T, jnp.matmul(r, v, precision=HIGHEST), precision=HIGHEST)
        return w / jnp.maximum(jnp.linalg.norm(w), jnp.finfo(r.dtype).tiny)

    def down(_, v):
        w = solve_triangular(r, solve_triangular(r, v, lower=False, trans=1), lower=False)
        return w / jnp.linalg.norm(w)

    vmax = lax.fori_loop(0, _POWER_STEPS, up, v0)
    vmin = lax.fori_loop(0, _POWER_STEPS, down, v0)
    smax = jnp.linalg.norm(jnp.matmul(r, vmax, precision=HIGHEST))
    smin = 1.0 / jnp.linalg.norm(solve_triangular(r, vmin, lower=False, trans=1))
    return smax, smin


def _pinv_apply(m, rhs, rcond):
    """``pinv(m) rhs`` with singular values ``<= rcond * max`` dropped (``m`` square)."""
    u, sig, vt = jnp.linalg.svd(m, full_matrices=False)
    keep = sig > rcond * sig[0]
    inv = jnp.where(keep, 1.0 / jnp.where(keep, sig, 1.0), 0.0)
    return jnp.matmul(vt.T, inv[:, None] * jnp.matmul(u.T, rhs, precision=HIGHEST), precision=HIGHEST)


def _qr_solve(task_kernels, rcond):
    """Least squares of the stacked problem through QR of ``A`` (or of ``A^T`` when ``A`` is wide,
    min-norm); triangular solve, or an SVD of the triangular factor when it is numerically rank
    deficient (``sigma_min <= rcond sigma_max``). Returns ``(T_m, cond(S) estimate)``."""
    a, c = stacked_factor(task_kernels)
    m, d_in = a.shape
    if m >= d_in:
        q, r = jnp.linalg.qr(a)                                          # r [d_in, d_in]
        y = jnp.matmul(q.T, c, precision=HIGHEST)
        smax, smin = _sigma_extremes(r)
        solve = lambda: solve_triangular(r, y, lower=False)
        pinv = lambda: _pinv_apply(r, y, rcond)
    else:                                       # A = R^T Q^T: min-norm T_m = Q z, R^T z = C
        q, r = jnp.linalg.qr(a.T)                                        # r [m, m]
        smax, smin = _sigma_extremes(r)
        solve = lambda: jnp.matmul(q, solve_triangular(r, c, lower=False, trans=1), precision=HIGHEST)
        pinv = lambda: jnp.matmul(q, _pinv_apply(r.T, c, rcond), precision=HIGHEST)
    ok = smin > rcond * smax                                             # False for NaN too
    x = lax.cond(ok, solve, pinv)
    cond = jnp.where(ok, (smax / jnp.where(ok, smin, 1.0)) ** 2, jnp.inf)
    return x, cond.astype(x.dtype)


@jax.jit
def wudi_exact_module(task_kernels, rcond):
    """Exact WUDI minimiser of one module and ``cond(S)``: ``[K, d_in, d_out] -> ([d_in, d_out],
    scalar)``.

    ``rcond``: relative cutoff on the singular values of ``A`` (``sqrt`` of the eigenvalues of
    ``S``). Normal equations (``eigh`` of ``S``) when ``cond(S) <= 1 / (1e4 eps)``, else
    :func:`_qr_solve` (decided on device). ``cond(S)`` is ``lambda_max / lambda_min`` of ``S`` (on
    its range when ``K min(d_in, d_out) < d_in``, where ``S`` is singular by construction); from
    ``eigh`` on the first route, from power / inverse iteration on ``A``'s triangular factor on
    the second (within a few per cent); ``inf`` when numerically singular.
    """
    k, d_in, d_out = task_kernels.shape
    rcond = jnp.asarray(rcond).astype(task_kernels.dtype)
    if k * min(d_in, d_out) < d_in:             # S singular by construction: QR route
        return _qr_solve(task_kernels, rcond)
    s, b, _ = wudi_normal_equations(task_kernels)
    e, q = jnp.linalg.eigh(s)
    emin, emax = e[0], e[-1]
    eps = jnp.finfo(task_kernels.dtype).eps
    normal = (emin * (1.0 / (NORMAL_EQUATIONS_EPS * eps)) >= emax) | (emax <= 0)

    def by_eigh():
        keep = (e > rcond * rcond * emax) & (e > 0)
        inv = jnp.where(keep, 1.0 / jnp.where(keep, e, 1.0), 0.0)
        x = jnp.matmul(q, inv[:, None] * jnp.matmul(q.T, b, precision=HIGHEST), precision=HIGHEST)
        cond = jnp.where(emin > 0, emax / jnp.where(emin > 0, emin, 1.0), jnp.inf)
        return x, cond.astype(x.dtype)

    return lax.cond(normal, by_eigh, lambda: _qr_solve(task_kernels, rcond))


@jax.jit
def _cond_eigvalsh(s):
    e = jnp.linalg.eigvalsh(s)
    return jnp.where(e[0] > 0, e[-1] / jnp.where(e[0] > 0, e[0], 1.0), jnp.inf).astype(s.dtype)


def _chunks(indices, per_module: int, max_elements: int):
    n = max(1, max_elements // max(per_module, 1))
    for j in range(0, len(indices), n):
        yield indices[j:j + n]


@anchor_function
def wudi(base: PyTree, experts: Sequence[PyTree], *, labels: PyTree | None = None,
         anchor_scale=1.0, lr=1e-5, steps: int = 300, exact: bool = False, rcond=None,
         return_diagnostics: bool = False, max_stack_elements: int = 2 ** 24):
    """WUDI-Merging: ``theta_0 + anchor_scale * T_m`` on regressed modules, ``theta_0`` elsewhere.

    Args:
      base: pretrained params ``theta_0``.
      experts: K >= 2 fine-tuned pytrees like ``base``.
      labels: label tree selecting the modules (default ``build_labels(base)``).
      anchor_scale: coefficient of ``T_m`` (default 1.0, the authors' choice; Python number or
        JAX scalar).
      lr: Adam learning rate (default 1e-5, the authors' value; Python number or JAX scalar).
      steps: Adam steps (default 300; static); 0 returns ``sum_k T_k`` on the modules.
      exact: solve for the minimiser instead of running Adam (static).
      rcond: exact solve: relative cutoff on the singular values of the stacked factor ``A``
        (default ``max(K min(d_in, d_out), d_in) * eps``, as ``numpy.linalg.lstsq``); Python
        number or JAX scalar.
      return_diagnostics: also return ``{module path: cond(S)}`` (scalar arrays; with
        ``exact=False`` computed by an extra ``eigvalsh`` of ``S`` per module).
      max_stack_elements: Adam: cap on the elements of one stacked group of same-shape modules
        (``M * (d_in^2 + 4 d_in d_out)``); bounds memory on large models (static).

    Returns:
      Params with the structure and leaf dtypes of ``base``, or ``(params, diagnostics)`` with
      ``return_diagnostics``. Pure: runs under ``jit`` / ``vmap`` / ``scan``.
    """
    scale = check_hparam(anchor_scale, "anchor_scale")
    lr = check_hparam(lr, "lr", low=0.0, low_open=True)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an integer >= 0 (static), got {steps!r}")
    if not isinstance(exact, bool):
        raise TypeError(f"exact must be a bool (static), got {type(exact).__name__}")
    if rcond is not None:
        rcond = check_hparam(rcond, "rcond", low=0.0)
        if not is_array(rcond) and rcond >= 1:
            raise ValueError(f"rcond must be in [0, 1), got {rcond}")
    ctx = prepare(base, experts, labels)

    deltas, diagnostics = {}, {}
    if exact:
        for i in ctx.regressed_indices():
            lab = ctx.labels[i]
            t = ctx.matrices(i)
            rc = default_rcond(ctx.num_experts, lab.d_in, lab.d_out, t.dtype) if rcond is None else rcond
            tm, cond = wudi_exact_module(t, rc)
            deltas[i] = lab.from_matrix(tm)
            diagnostics[lab.path] = cond
    else:
        groups: dict[tuple, list[int]] = {}
        for i in ctx.regressed_indices():
            lab = ctx.labels[i]
            cdt = jnp.dtype(compute_dtype(leaf_dtype(ctx.base_leaves[i])))
            groups.setdefault((lab.d_in, lab.d_out, cdt), []).append(i)
        for (d_in, d_out, _), members in groups.items():
            for chunk in _chunks(members, d_in * d_in + 4 * d_in * d_out, max_stack_elements):
                eqs = [wudi_normal_equations(ctx.matrices(i)) for i in chunk]
                s = jnp.stack([e[0] for e in eqs])
                b = jnp.stack([e[1] for e in eqs])
                init = jnp.stack([e[2] for e in eqs])
                del eqs
                if steps == 0:
                    tm = init
                else:
                    tm = wudi_adam(s, b, init, jnp.asarray(lr).astype(init.dtype), steps)
                for j, i in enumerate(chunk):
                    deltas[i] = ctx.labels[i].from_matrix(tm[j])
                    if return_diagnostics:
                        diagnostics[ctx.labels[i].path] = _cond_eigvalsh(s[j])
                del s, b, init, tm
    params = assemble(ctx, deltas.get, scale)
    if return_diagnostics:
        paths = [ctx.labels[i].path for i in ctx.regressed_indices()]
        return params, {p: diagnostics[p] for p in paths}
    return params
