"""The inner level of BMM (method.md §2): the anchored closed-form regression for one module.

Conventions (Flax ``Dense``): kernels are ``[d_in, d_out]``; task kernels ``T_k = W_k - W_0``;
Grams ``G_k = X_k^T X_k / n_k`` are ``[d_in, d_in]``; the anchor enters as its task vector
``T_a = W_a - W_0``. With task weights ``w_k``::

    S = sum_k w_k G_k                         [d_in, d_in]
    B = sum_k w_k G_k T_k                     [d_in, d_out]
    lambda = rho * tr(S) / d_in               (relative prior strength rho >= 0)
    Delta = (S + lambda P)^{-1} (B + lambda P T_a)
    result = scale * Delta                    (W_merged = W_0 + result)

with ``P = I`` (``prior="isotropic"``) or ``P = diag(S) / mean(diag S)`` (``prior="diagonal"``).
Grams are accumulated with ``Precision.HIGHEST``; the system is solved by Cholesky (never an
explicit inverse). The eigen fast path factors ``S = Q diag(e) Q^T`` once, after which each new
``(rho, scale)`` costs one matmul: ``Delta = Q diag(1/(e + lambda)) (Q^T B + lambda Q^T T_a)``.
"""
from __future__ import annotations

import contextlib
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

PRIORS = ("isotropic", "diagonal")
HIGHEST = jax.lax.Precision.HIGHEST


@contextlib.contextmanager
def lapack_single_thread():
    """Run jax's CPU LAPACK/BLAS custom calls (``eigh``, ``svd``, ``qr``, Cholesky, triangular
    solves: they go through scipy's OpenBLAS) single-threaded inside the block.

    XLA's own kernels (matmuls, fusions) keep their thread pool. Multi-threaded OpenBLAS spins
    while waiting for its threads: on a busy machine (every core shared) that made a 768 x 768 SVD
    or a 3072 x 3072 ``eigh`` 4-20x slower than one thread, and gains little on an idle 2-core one.
    Work started inside the block must also finish inside it (block on the results), since jax
    dispatches asynchronously. A no-op without ``threadpoolctl``.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:                                  # pragma: no cover
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


def single_thread_lapack(fn):
    """Decorator: run ``fn`` under :func:`lapack_single_thread` and block on its result."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with lapack_single_thread():
            return jax.block_until_ready(fn(*args, **kwargs))
    return wrapper


from bmm_jax.hparams import check_rho  # noqa: E402  (one definition, re-exported)


def check_prior(prior: str) -> None:
    if prior not in PRIORS:
        raise ValueError(f"unknown prior {prior!r}; expected one of {PRIORS}")


# Row-block height of :func:`symmetric_gram`. 512 measured best on the 2-core CPU for ViT-B/32
# shapes (d = 3072: 0.39 s vs 0.58-0.75 s for the full product per K = 8 accumulation; d = 768:
# 0.032 vs 0.044 s): big enough for an efficient matmul, small enough to skip most of the upper half.
GRAM_BLOCK = 512


def _row_blocks(d: int, block: int = GRAM_BLOCK) -> list[tuple[int, int]]:
    n = max(1, -(-d // block))
    edges = [round(i * d / n) for i in range(n + 1)]
    return list(zip(edges[:-1], edges[1:]))


def _lower_block_rows(f, rows):
    """``[F[a:b] F[:b]^T for each row block]``: the block lower triangle of ``F F^T`` (diagonal
    blocks in full)."""
    return tuple(jnp.matmul(f[a:b], f[:b].T, precision=HIGHEST) for a, b in rows)


def _assemble_symmetric(blocks, rows, d: int):
    """Full symmetric ``[d, d]`` from its block lower triangle (:func:`_lower_block_rows`)."""
    low = jnp.concatenate([jnp.pad(x, ((0, 0), (0, d - x.shape[1]))) for x in blocks])
    # low + low^T with the diagonal blocks put back; an iota mask (where(i >= j, low, low^T)) made
    # XLA's CPU compiler spend minutes constant-folding it for d in the thousands
    full = low + low.T
    for x, (a, b) in zip(blocks, rows):
        full = jax.lax.dynamic_update_slice(full, x[:, a:b], (a, a))
    return full


def symmetric_gram(f):
    """``F F^T`` for ``f [d, r]`` (``[d, d]``, exactly symmetric), computing only the block lower
    triangle: about ``(n + 1) / 2n`` of the flops of one full product for ``n`` row blocks."""
    if f.ndim != 2:
        raise ValueError(f"symmetric_gram expects a 2-D factor [d, r], got shape {tuple(f.shape)}")
    d = f.shape[0]
    rows = _row_blocks(d)
    return _assemble_symmetric(_lower_block_rows(f, rows), rows, d)


@jax.jit
def normal_equations(task_kernels, grams, weights):
    """``(S, B)`` from ``task_kernels [K,d_in,d_out]``, ``grams [K,d_in,d_in]``, ``weights [K]``.

    ``B = sum_k w_k G_k T_k`` is accumulated one expert at a time (one plain matmul each): a single
    einsum contracting ``k`` and ``j`` together made XLA transpose the ``[K, d, d]`` Grams first.
    """
    s = jnp.einsum("k,kij->ij", weights, grams, precision=HIGHEST)

    def body(k, b):
        return b + weights[k] * jnp.matmul(grams[k], task_kernels[k], precision=HIGHEST)
    dt = jnp.result_type(grams.dtype, task_kernels.dtype, weights.dtype)
    b = jax.lax.fori_loop(0, grams.shape[0], body, jnp.zeros(task_kernels.shape[1:], dt))
    return s, b


@functools.partial(jax.jit, static_argnames=("self_factored",))
def normal_equations_factored(task_kernels, factors, weights, *, self_factored: bool = False):
    """``(S, B)`` when ``G_k = F_k F_k^T`` with ``factors [K,d_in,r]``, one expert at a time (no
    ``[K, d, d]`` Grams, no weighted or transposed ``[K, ...]`` copies).

    ``F_k F_k^T`` is symmetric: only its block lower triangle is computed (:func:`symmetric_gram`).
    The cheaper order is picked from the (static) shapes: for ``r < d_in`` (tall modules, e.g.
    mlp-out with data-free factors) ``S`` is accumulated by row blocks and ``B = sum_k w_k F_k
    (F_k^T T_k)`` (``2 K d_in r d_out`` flops); otherwise ``G_k`` is formed once per expert and reused
    for ``S`` and ``B = sum_k w_k G_k T_k`` (``2 K d_in^2 d_out``).

    ``self_factored`` (static): the factors are the task kernels themselves (data-free Grams,
    ``factors is task_kernels``), so ``F_k^T T_k = T_k^T T_k`` is symmetric and only its block lower
    triangle is computed (tall modules: a quarter fewer flops for ``B``).
    """
    d_in, r = factors.shape[1:]
    d_out = task_kernels.shape[-1]
    dt = jnp.result_type(factors.dtype, task_kernels.dtype, weights.dtype)
    if r >= d_in:
        def body(k, acc):
            s, b = acc
            g = weights[k] * symmetric_gram(factors[k])
            return s + g, b + jnp.matmul(g, task_kernels[k], precision=HIGHEST)
        zero = (jnp.zeros((d_in, d_in), dt), jnp.zeros((d_in, d_out), dt))
        return jax.lax.fori_loop(0, factors.shape[0], body, zero)
    rows = _row_blocks(d_in)

    def body_tall(k, acc):
        blocks, b = acc
        f, w = factors[k], weights[k]
        blocks = tuple(x + w * y for x, y in zip(blocks, _lower_block_rows(f, rows)))
        inner = symmetric_gram(f.T) if self_factored else jnp.matmul(f.T, task_kernels[k], precision=HIGHEST)
        b = b + w * jnp.matmul(f, inner, precision=HIGHEST)
        return blocks, b
    zero = (tuple(jnp.zeros((hi - lo, hi), dt) for lo, hi in rows), jnp.zeros((d_in, d_out), dt))
    blocks, b = jax.lax.fori_loop(0, factors.shape[0], body_tall, zero)
    return _assemble_symmetric(blocks, rows, d_in), b


def prior_strength(s, rho):
    """``lambda = rho * tr(S) / d_in`` (works on stacked ``[..., d, d]``)."""
    d = s.shape[-1]
    return rho * jnp.trace(s, axis1=-2, axis2=-1) / d


def _solve_one(s, b, ta, rho, scale, diagonal: bool):
    d = s.shape[-1]
    lam = prior_strength(s, rho)
    if diagonal:
        ds = jnp.diagonal(s)
        # floor p at eps: an input coordinate no task ever excites (diag S_ii = 0) would make the
        # system singular; with any p_ii > 0 its row is exactly the anchor's (the p_ii -> 0 limit)
        p = jnp.maximum(ds / jnp.maximum(jnp.mean(ds), jnp.finfo(s.dtype).tiny), jnp.finfo(s.dtype).eps)
        a = s + jnp.diag(lam * p)
        rhs = b + (lam * p)[:, None] * ta
    else:
        a = s + lam * jnp.eye(d, dtype=s.dtype)
        rhs = b + lam * ta
    c, low = jax.scipy.linalg.cho_factor(a, lower=True)
    return scale * jax.scipy.linalg.cho_solve((c, low), rhs)


@jax.jit
def _solve_isotropic(s, b, ta, rho, scale):
    return _solve_one(s, b, ta, rho, scale, False)


@jax.jit
def _solve_diagonal(s, b, ta, rho, scale):
    return _solve_one(s, b, ta, rho, scale, True)


solve_stacked_isotropic = jax.jit(jax.vmap(lambda s, b, ta, r, c: _solve_one(s, b, ta, r, c, False)))
solve_stacked_diagonal = jax.jit(jax.vmap(lambda s, b, ta, r, c: _solve_one(s, b, ta, r, c, True)))


def is_singular(s) -> bool:
    """True if the PSD matrix ``s`` is numerically singular (smallest eigenvalue below
    ``d * eps * largest``)."""
    e = np.linalg.eigvalsh(np.asarray(s, dtype=np.float64))
    tol = s.shape[-1] * np.finfo(np.float32).eps * max(float(np.abs(e).max()), np.finfo(np.float32).tiny)
    return bool(e.min() <= tol)


def solve_anchored(task_kernels, grams, anchor_kernel, *, rho, scale=1.0, weights=None,
                   prior: str = "isotropic"):
    """Closed-form anchored regression of one module (method.md §2). Pure and traceable: ``rho``,
    ``scale``, ``weights`` and the arrays may be traced (``jit``, ``vmap``, ``scan``, ``grad``).

    Args:
      task_kernels: ``[K, d_in, d_out]`` task vectors ``T_k = W_k - W_0`` of the module.
      grams: ``[K, d_in, d_in]`` per-task Gram matrices ``G_k`` (PSD).
      anchor_kernel: ``[d_in, d_out]`` the anchor's task vector ``T_a = W_a - W_0``.
      rho: relative prior strength ``>= 0`` (``lambda = rho * tr(S) / d_in``).
      scale: assembly scale ``s``.
      weights: ``[K]`` non-negative task weights (default all 1).
      prior: ``"isotropic"`` or ``"diagonal"`` (static).

    Returns:
      ``scale * Delta``, ``[d_in, d_out]`` (float32, or float64 for float64 inputs), in task-vector
      space (``W = W_0 + result``).

    Raises:
      ValueError / TypeError: bad shapes or dtypes, an unknown prior (always); eagerly also
      ``rho < 0``, non-finite input, or a singular system (``rho = 0`` with a rank-deficient ``S``,
      or ``S = 0``). Under a transformation a singular system gives NaN/Inf.
    """
    from bmm_jax.hparams import check_number
    check_prior(prior)
    check_number(rho, "rho")
    check_number(scale, "scale")
    t = jnp.asarray(task_kernels)
    g = jnp.asarray(grams)
    ta = jnp.asarray(anchor_kernel)
    if t.ndim != 3:
        raise ValueError(f"task_kernels must be [K, d_in, d_out], got shape {t.shape}")
    k, d_in, d_out = t.shape
    if g.shape != (k, d_in, d_in):
        raise ValueError(f"grams must be [K, d_in, d_in] = {(k, d_in, d_in)}, got shape {g.shape}")
    if ta.shape != (d_in, d_out):
        raise ValueError(f"anchor_kernel must be [d_in, d_out] = {(d_in, d_out)}, got shape {ta.shape}")
    for name, x in (("task_kernels", t), ("grams", g), ("anchor_kernel", ta)):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"{name} must be a floating array, got dtype {x.dtype}")
    dtype = jnp.promote_types(jnp.float32, jnp.result_type(t.dtype, g.dtype, ta.dtype))
    if weights is None:
        w = jnp.ones((k,), dtype)
    else:
        if isinstance(weights, (str, bytes)):
            raise TypeError(f"weights must be {k} numbers, got a string")
        w = jnp.asarray(weights, dtype)
        if w.shape != (k,):
            raise ValueError(f"weights must have shape ({k},), got {w.shape}")
    concrete = not any(isinstance(x, jax.core.Tracer) for x in (t, g, ta, w, rho, scale))
    if concrete:
        check_rho(rho)
        ok = jax.device_get(jnp.stack([jnp.all(jnp.isfinite(t)), jnp.all(jnp.isfinite(g)), jnp.all(jnp.isfinite(ta)),
                                       jnp.all(jnp.isfinite(w)) & jnp.all(w >= 0)]))
        for name, good in zip(("task_kernels", "grams", "anchor_kernel"), ok[:3]):
            if not good:
                raise ValueError(f"{name} has non-finite values")
        if not ok[3]:
            raise ValueError("weights must be finite and >= 0")
    s, b = normal_equations(t.astype(dtype), g.astype(dtype), w)
    if concrete:
        if float(jax.device_get(jnp.trace(s))) == 0.0:
            raise ValueError("singular system: every Gram is zero, so S = 0 and lambda = rho tr(S)/d_in = 0")
        if float(rho) == 0.0 and is_singular(jax.device_get(s)):
            raise ValueError("singular system: rho = 0 and the weighted Gram S is rank-deficient "
                             f"(d_in = {d_in}); use rho > 0 (the anchor prior regularises it)")
    fn = _solve_diagonal if prior == "diagonal" else _solve_isotropic
    return fn(s, b, ta.astype(dtype), jnp.asarray(rho, dtype), jnp.asarray(scale, dtype))


class EigenFactors(NamedTuple):
    """Eigen factors for repeated solves of a (stack of) module(s); leading axes are batch axes.

    ``q [..., d, d]``, ``e [..., d]`` (eigenvalues of ``S``, clipped at 0), ``qtb [..., d, d_out]``,
    ``qtta [..., d, d_out]``, ``mean_e [...] = tr(S)/d``.
    """
    q: jax.Array
    e: jax.Array
    qtb: jax.Array
    qtta: jax.Array
    mean_e: jax.Array


def _factor_one(s, b, ta):
    e, q = jnp.linalg.eigh(s)
    e = jnp.maximum(e, 0.0)
    qt = q.T
    return EigenFactors(q, e, jnp.matmul(qt, b, precision=HIGHEST), jnp.matmul(qt, ta, precision=HIGHEST),
                        jnp.trace(s) / s.shape[-1])


eigen_factors = jax.jit(_factor_one)
eigen_factors.__doc__ = "EigenFactors of one module from ``S [d,d]``, ``B [d,do]``, ``T_a [d,do]``."
eigen_factors_stacked = jax.jit(jax.vmap(_factor_one))


def resolve_factors(f: EigenFactors, rho, scale, c=1.0):
    """``scale * Delta`` of one module from its factors, anchor task vector scaled by ``c``:
    ``Q diag(1/(e + lam)) (Q^T B + lam c Q^T T_a)``. bfloat16 factors: bf16 products, float32
    accumulation (AMX / avx512_bf16 on CPU, tensor cores on GPU); float32: HIGHEST precision."""
    lam = rho * f.mean_e
    inner = (f.qtb.astype(jnp.float32) + (lam * c) * f.qtta.astype(jnp.float32)) / (f.e + lam)[:, None]
    if f.q.dtype == jnp.bfloat16:
        out = jnp.matmul(f.q, inner.astype(jnp.bfloat16), preferred_element_type=jnp.float32)
    else:
        out = jnp.matmul(f.q, inner, precision=HIGHEST)
    return scale * out


def _resolve_one(f: EigenFactors, rho, scale):
    return resolve_factors(f, rho, scale)


solve_from_factors = jax.jit(_resolve_one)
solve_from_factors.__doc__ = ("Fast path: ``scale * Delta(rho)`` from :class:`EigenFactors` in one matmul "
                              "(isotropic prior).")
solve_from_factors_stacked = jax.jit(jax.vmap(_resolve_one))
