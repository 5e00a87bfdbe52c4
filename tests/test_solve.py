"""The inner solve (method.md §2) against independent numpy / scipy references.

References are written here from the objective, never from bmm_jax:
* the dense least-squares solve of the stacked regression ``[sqrt(w_k / n_k) X_k ; sqrt(lambda) I]``
  (numpy ``lstsq``), whose normal equations are the closed form;
* the RegMean formula (rho -> 0 with activation Grams);
* the WUDI-Merging loss minimised by a float64 scipy optimiser (rho -> 0 with data-free Grams);
* the diagonal-prior formula and its own stacked least squares.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize
from hypothesis import given, settings, strategies as st

import bmm_jax
from bmm_jax import solve as solve_mod
from bmm_jax.grams.data_free import normalized_weights


# ----------------------------------------------------------------------------- references
def _problem(seed, k=3, d_in=5, d_out=4, extra_rows=3):
    """Inputs X_k [n_k, d_in], task kernels T_k, anchor task vector T_a (float64)."""
    rng = np.random.default_rng(seed)
    xs = [rng.standard_normal((d_in + extra_rows + j, d_in)) * rng.uniform(0.5, 2.0, d_in)
          for j in range(k)]
    t = rng.standard_normal((k, d_in, d_out))
    ta = rng.standard_normal((d_in, d_out))
    return xs, t, ta


def _grams(xs):
    return np.stack([x.T @ x / x.shape[0] for x in xs])


def _lstsq_reference(xs, t, ta, rho, scale=1.0, weights=None, prior="isotropic"):
    """argmin_W sum_k w_k / n_k ||X_k (W - T_k)||^2 + lambda ||P^(1/2) (W - T_a)||^2 by lstsq
    of the stacked design, lambda = rho * tr(sum_k w_k X_k^T X_k / n_k) / d_in."""
    k = len(xs)
    d_in = xs[0].shape[1]
    w = np.ones(k) if weights is None else np.asarray(weights, np.float64)
    col_sq = sum(w[j] * np.sum(xs[j] ** 2, axis=0) / xs[j].shape[0] for j in range(k))  # diag(S)
    lam = rho * col_sq.sum() / d_in
    p = np.ones(d_in) if prior == "isotropic" else col_sq / col_sq.mean()
    rows = [np.sqrt(w[j] / xs[j].shape[0]) * xs[j] for j in range(k)]
    targets = [r @ t[j] for j, r in enumerate(rows)]
    rows.append(np.diag(np.sqrt(lam * p)))
    targets.append(np.sqrt(lam * p)[:, None] * ta)
    sol, *_ = np.linalg.lstsq(np.concatenate(rows), np.concatenate(targets), rcond=None)
    return scale * sol


def _formula_reference(t, g, ta, rho, scale=1.0, weights=None, prior="isotropic"):
    """Dense numpy closed form: s (S + lambda P)^-1 (B + lambda P T_a)."""
    w = np.ones(len(t)) if weights is None else np.asarray(weights, np.float64)
    s = np.einsum("k,kij->ij", w, g)
    b = np.einsum("k,kij,kjo->io", w, g, t)
    lam = rho * np.trace(s) / s.shape[0]
    p = np.eye(s.shape[0]) if prior == "isotropic" else np.diag(np.diag(s) / np.mean(np.diag(s)))
    return scale * np.linalg.solve(s + lam * p, b + lam * p @ ta)


def _wudi_loss(tm, t):
    """sum_k ||(T_m - T_k)^T T_k||_F^2 / ||T_k||_F^2 (zero-norm experts skipped)."""
    out = 0.0
    for tk in t:
        n = np.sum(tk ** 2)
        if n > 0:
            out += np.sum(((tm - tk).T @ tk) ** 2) / n
    return out


def _wudi_grad(tm, t):
    g = np.zeros_like(tm)
    for tk in t:
        n = np.sum(tk ** 2)
        if n > 0:
            g += 2.0 * tk @ (tk.T @ (tm - tk)) / n
    return g


def _wudi_minimise(t):
    """Float64 BFGS minimiser of the WUDI loss, started at sum_k T_k (as WUDI does)."""
    shape = t.shape[1:]
    x0 = t.sum(0).ravel()
    fun = lambda x: _wudi_loss(x.reshape(shape), t)  # noqa: E731
    jac = lambda x: _wudi_grad(x.reshape(shape), t).ravel()  # noqa: E731
    # the hand gradient is the loss's gradient (finite differences), so the optimiser is honest
    assert scipy.optimize.check_grad(fun, jac, x0) < 1e-5 * max(1.0, np.linalg.norm(jac(x0)))
    res = scipy.optimize.minimize(fun, x0, jac=jac, method="BFGS", options={"gtol": 1e-11, "maxiter": 5000})
    return res.x.reshape(shape), res.fun


def _data_free_np(t):
    return np.stack([tk @ tk.T / np.sum(tk ** 2) if np.any(tk) else np.zeros((t.shape[1],) * 2)
                     for tk in t])


def _solve(t, g, ta, **kw):
    out = bmm_jax.solve_anchored(jnp.asarray(t, jnp.float32), jnp.asarray(g, jnp.float32),
                                 jnp.asarray(ta, jnp.float32), **kw)
    assert out.shape == ta.shape and out.dtype == jnp.float32
    out = np.asarray(out, np.float64)
    assert np.all(np.isfinite(out))
    return out


def _close(out, ref, rel=2e-4):
    np.testing.assert_allclose(out, ref, atol=rel * max(1.0, np.abs(ref).max()), rtol=0)


# ----------------------------------------------------------------------------- identities
@pytest.mark.parametrize("rho", [0.01, 0.3, 1.0, 10.0])
def test_equals_stacked_least_squares(rho):
    xs, t, ta = _problem(0)
    ref = _lstsq_reference(xs, t, ta, rho)
    _close(_solve(t, _grams(xs), ta, rho=rho), ref)
    # the two independent references agree with each other too
    np.testing.assert_allclose(_formula_reference(t, _grams(xs), ta, rho), ref, atol=1e-10)


def test_rho_to_infinity_returns_anchor():
    xs, t, ta = _problem(1)
    g = _grams(xs)
    _close(_solve(t, g, ta, rho=1e7, scale=1.0), ta, rel=1e-5)
    # and it approaches the anchor monotonically as rho grows
    dists = [np.linalg.norm(_solve(t, g, ta, rho=r) - ta) for r in (0.1, 1.0, 10.0, 100.0, 1e4)]
    assert all(a > b for a, b in zip(dists, dists[1:])), dists
    assert dists[-1] < 1e-3 * np.linalg.norm(ta)


def test_rho_zero_with_activation_grams_is_regmean_without_shrink():
    xs, t, ta = _problem(2)
    g = _grams(xs)
    regmean = np.linalg.solve(g.sum(0), np.einsum("kij,kjo->io", g, t))   # RegMean, alpha = 1
    _close(_solve(t, g, ta, rho=0.0), regmean)
    _close(_solve(t, g, ta, rho=1e-7), regmean)
    # the anchor no longer matters at rho = 0
    _close(_solve(t, g, np.zeros_like(ta), rho=0.0), regmean)


def test_rho_zero_with_data_free_grams_is_wudi_minimiser():
    rng = np.random.default_rng(3)
    t = rng.standard_normal((3, 5, 4))       # rank-3 S_k each, S full rank (5 <= 3 * 4)
    tm, _ = _wudi_minimise(t)
    g = _data_free_np(t)
    _close(_solve(t, g, rng.standard_normal((5, 4)), rho=0.0), tm, rel=5e-4)
    _close(_solve(t, g, np.zeros((5, 4)), rho=1e-7), tm, rel=5e-4)


def test_small_rho_with_rank_deficient_data_free_grams_attains_wudi_minimum():
    rng = np.random.default_rng(4)
    t = rng.standard_normal((2, 12, 3))      # S has rank 6 < d_in = 12: a whole set of minimisers
    _, fmin = _wudi_minimise(t)
    ta = rng.standard_normal((12, 3))
    out = _solve(t, _data_free_np(t), ta, rho=1e-5)
    assert _wudi_loss(out, t) == pytest.approx(fmin, rel=1e-4, abs=1e-6)
    # among the minimisers it keeps the anchor's component in the null space of S (any rho > 0;
    # a moderate rho keeps float32 round-off in B out of the null space)
    s = _data_free_np(t).sum(0)
    e, q = np.linalg.eigh(s)
    null = q[:, e < 1e-8 * e.max()]
    assert null.shape[1] == 6
    out = _solve(t, _data_free_np(t), ta, rho=0.05)
    np.testing.assert_allclose(null.T @ out, null.T @ ta, atol=1e-4)


def test_diagonal_prior_dense_formula_and_least_squares():
    xs, t, ta = _problem(5, d_in=6, d_out=3)
    g = _grams(xs)
    for rho in (0.05, 1.0, 20.0):
        ref = _formula_reference(t, g, ta, rho, prior="diagonal")
        np.testing.assert_allclose(_lstsq_reference(xs, t, ta, rho, prior="diagonal"), ref, atol=1e-9)
        _close(_solve(t, g, ta, rho=rho, prior="diagonal"), ref)
    # the diagonal prior differs from the isotropic one when diag(S) is not flat
    assert not np.allclose(_formula_reference(t, g, ta, 1.0, prior="diagonal"),
                           _formula_reference(t, g, ta, 1.0), atol=1e-3)


def test_weights():
    xs, t, ta = _problem(6, k=4)
    g = _grams(xs)
    w = np.array([0.5, 2.0, 1.0, 0.25])
    _close(_solve(t, g, ta, rho=0.3, weights=jnp.asarray(w, jnp.float32)),
           _lstsq_reference(xs, t, ta, 0.3, weights=w))
    # a zero weight drops the task entirely
    w0 = np.array([1.0, 0.0, 1.0, 1.0])
    keep = [0, 2, 3]
    _close(_solve(t, g, ta, rho=0.3, weights=jnp.asarray(w0, jnp.float32)),
           _lstsq_reference([xs[j] for j in keep], t[keep], ta, 0.3))
    # uniform weights c * 1 change nothing (lambda is relative to tr S)
    _close(_solve(t, g, ta, rho=0.3, weights=jnp.full((4,), 3.0, jnp.float32)),
           _lstsq_reference(xs, t, ta, 0.3))


@pytest.mark.parametrize("scale", [0.5, 1.0, 1.5, -0.25])
def test_scale(scale):
    xs, t, ta = _problem(7)
    _close(_solve(t, _grams(xs), ta, rho=0.7, scale=scale), _lstsq_reference(xs, t, ta, 0.7, scale=scale))


# a few shapes (each one compiles), many values
@settings(max_examples=10, deadline=None, derandomize=True, database=None)
@given(seed=st.integers(0, 2 ** 16), shape=st.sampled_from([(3, 5, 4), (2, 1, 3), (4, 3, 1), (2, 6, 2)]),
       log_rho=st.floats(-3.0, 3.0), scale=st.floats(0.5, 1.5),
       weighted=st.booleans(), diagonal=st.booleans())
def test_property_matches_least_squares(seed, shape, log_rho, scale, weighted, diagonal):
    k, d_in, d_out = shape
    xs, t, ta = _problem(seed, k=k, d_in=d_in, d_out=d_out)
    w = np.random.default_rng(seed + 1).uniform(0.1, 2.0, k) if weighted else None
    prior = "diagonal" if diagonal else "isotropic"
    rho = 10.0 ** log_rho
    ref = _lstsq_reference(xs, t, ta, rho, scale=scale, weights=w, prior=prior)
    out = _solve(t, _grams(xs), ta, rho=rho, scale=scale, prior=prior,
                 weights=None if w is None else jnp.asarray(w, jnp.float32))
    _close(out, ref, rel=1e-3)


def test_input_coordinate_no_task_excites():
    """diag(S)_ii = 0 (a dead input feature): row i of the result is the anchor's, both priors, and the
    other rows solve the decoupled reduced system (no NaN)."""
    xs, t, ta = _problem(13, d_in=5, d_out=3)
    for x in xs:
        x[:, 2] = 0.0
    g = _grams(xs)
    s, b = g.sum(0), np.einsum("kij,kjo->io", g, t)
    keep = [0, 1, 3, 4]
    for prior in ("isotropic", "diagonal"):
        for rho in (0.05, 2.0):
            out = _solve(t, g, ta, rho=rho, prior=prior, scale=1.3)
            lam = rho * np.trace(s) / 5
            p = np.ones(5) if prior == "isotropic" else np.diag(s) / np.mean(np.diag(s))
            sr = s[np.ix_(keep, keep)] + lam * np.diag(p[keep])
            ref_rows = np.linalg.solve(sr, b[keep] + lam * p[keep, None] * ta[keep])
            _close(out[keep], 1.3 * ref_rows)
            _close(out[2], 1.3 * ta[2])


# ----------------------------------------------------------------------------- fast path / jit
def test_eigen_fast_path_matches_reference():
    xs, t, ta = _problem(8, d_in=6, d_out=5)
    g = _grams(xs)
    s, b = solve_mod.normal_equations(jnp.asarray(t, jnp.float32), jnp.asarray(g, jnp.float32),
                                      jnp.ones((3,), jnp.float32))
    np.testing.assert_allclose(s, g.sum(0), rtol=1e-5)
    f = solve_mod.eigen_factors(s, b, jnp.asarray(ta, jnp.float32))
    for rho, scale in ((0.01, 1.0), (0.5, 0.8), (3.0, 1.3), (100.0, 1.0)):
        out = np.asarray(solve_mod.solve_from_factors(f, jnp.float32(rho), jnp.float32(scale)), np.float64)
        _close(out, _lstsq_reference(xs, t, ta, rho, scale=scale))


@pytest.mark.parametrize("d_in, r, d_out", [(5, 2, 4), (5, 7, 4), (1100, 37, 3), (700, 900, 2)])
def test_factored_normal_equations(d_in, r, d_out):
    """Both orders (r < d_in: S by row blocks; r >= d_in: G_k formed) against numpy, with several
    uneven row blocks of the symmetric Gram product for d_in > GRAM_BLOCK."""
    rng = np.random.default_rng(9)
    t = rng.standard_normal((3, d_in, d_out))
    f = rng.standard_normal((3, d_in, r))
    w = np.array([1.0, 0.5, 2.0])
    s, b = solve_mod.normal_equations_factored(jnp.asarray(t, jnp.float32), jnp.asarray(f, jnp.float32),
                                               jnp.asarray(w, jnp.float32))
    s_ref = sum(wk * fk @ fk.T for wk, fk in zip(w, f))
    b_ref = sum(wk * fk @ (fk.T @ tk) for wk, fk, tk in zip(w, f, t))
    s, b = np.asarray(s, np.float64), np.asarray(b, np.float64)
    np.testing.assert_allclose(s, s_ref, rtol=0, atol=1e-5 * np.abs(s_ref).max())
    np.testing.assert_allclose(b, b_ref, rtol=0, atol=1e-5 * np.abs(b_ref).max())
    assert np.array_equal(s, s.T)                      # exactly symmetric (mirrored, not recomputed)


def test_symmetric_gram_row_blocks():
    assert solve_mod._row_blocks(100) == [(0, 100)]
    blocks = solve_mod._row_blocks(1100)
    assert blocks[0][0] == 0 and blocks[-1][1] == 1100 and len(blocks) == 3
    assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:]))
    f = np.random.default_rng(3).standard_normal((1100, 20)).astype(np.float32)
    np.testing.assert_allclose(solve_mod.symmetric_gram(jnp.asarray(f)), f.astype(np.float64) @ f.T,
                               rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="2-D factor"):
        solve_mod.symmetric_gram(jnp.ones((2, 3, 4)))
    with pytest.raises(ValueError, match=r"weights \[K\]"):
        normalized_weights(jnp.ones((3, 4, 5)), jnp.ones((2,)))


def test_jit_and_no_jit_paths_agree():
    xs, t, ta = _problem(10)
    g = _grams(xs)
    ref = _lstsq_reference(xs, t, ta, 0.4, scale=1.2)
    jitted = _solve(t, g, ta, rho=0.4, scale=1.2)
    with jax.disable_jit():
        eager = _solve(t, g, ta, rho=0.4, scale=1.2)
    _close(jitted, ref)
    _close(eager, ref)

    # the whole internal pipeline under an outer jax.jit, with rho and scale traced
    @jax.jit
    def pipeline(t, g, ta, rho, scale):
        s, b = solve_mod.normal_equations(t, g, jnp.ones((t.shape[0],), t.dtype))
        direct = solve_mod._solve_isotropic(s, b, ta, rho, scale)
        fast = solve_mod.solve_from_factors(solve_mod.eigen_factors(s, b, ta), rho, scale)
        return direct, fast

    args = [jnp.asarray(a, jnp.float32) for a in (t, g, ta)]
    for rho, scale in ((0.4, 1.2), (2.0, 0.9)):
        direct, fast = pipeline(*args, jnp.float32(rho), jnp.float32(scale))
        ref = _lstsq_reference(xs, t, ta, rho, scale=scale)
        _close(np.asarray(direct, np.float64), ref)
        _close(np.asarray(fast, np.float64), ref)


def test_stacked_solvers_match_per_module_reference():
    probs = [_problem(20 + j, d_in=4, d_out=3) for j in range(3)]
    rhos, scales = [0.1, 1.0, 5.0], [1.0, 0.7, 1.2]
    ss, bs, tas, refs, refs_d = [], [], [], [], []
    for (xs, t, ta), r, c in zip(probs, rhos, scales):
        g = _grams(xs)
        ss.append(g.sum(0))
        bs.append(np.einsum("kij,kjo->io", g, t))
        tas.append(ta)
        refs.append(_lstsq_reference(xs, t, ta, r, scale=c))
        refs_d.append(_formula_reference(t, g, ta, r, scale=c, prior="diagonal"))
    args = [jnp.asarray(np.stack(a), jnp.float32) for a in (ss, bs, tas, rhos, scales)]
    iso = np.asarray(solve_mod.solve_stacked_isotropic(*args), np.float64)
    dia = np.asarray(solve_mod.solve_stacked_diagonal(*args), np.float64)
    fast = np.asarray(solve_mod.solve_from_factors_stacked(solve_mod.eigen_factors_stacked(*args[:3]),
                                                           args[3], args[4]), np.float64)
    for j in range(3):
        _close(iso[j], refs[j])
        _close(fast[j], refs[j])
        _close(dia[j], refs_d[j])


# ----------------------------------------------------------------------------- bad input
def test_singular_system_at_rho_zero_raises():
    rng = np.random.default_rng(11)
    x = [rng.standard_normal((2, 6)) for _ in range(2)]      # rank(S) <= 4 < 6
    t = rng.standard_normal((2, 6, 3))
    with pytest.raises(ValueError, match="singular system.*rho = 0"):
        _solve(t, _grams(x), np.zeros((6, 3)), rho=0.0)
    # rho > 0 regularises it: finite, and equal to the least-squares reference
    _close(_solve(t, _grams(x), np.zeros((6, 3)), rho=0.1), _lstsq_reference(x, t, np.zeros((6, 3)), 0.1))
    with pytest.raises(ValueError, match="singular system.*every Gram is zero"):
        _solve(t, np.zeros((2, 6, 6)), np.zeros((6, 3)), rho=1.0)


def test_bad_arguments():
    xs, t, ta = _problem(12)
    g = _grams(xs)
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    with pytest.raises(ValueError, match=r"rho must be >= 0.*-0\.5"):
        bmm_jax.solve_anchored(f32(t), f32(g), f32(ta), rho=-0.5)
    with pytest.raises(ValueError, match="rho must be finite"):
        bmm_jax.solve_anchored(f32(t), f32(g), f32(ta), rho=float("nan"))
    with pytest.raises(ValueError, match="unknown prior 'laplace'"):
        bmm_jax.solve_anchored(f32(t), f32(g), f32(ta), rho=1.0, prior="laplace")
    with pytest.raises(ValueError, match="task_kernels must be \\[K, d_in, d_out\\]"):
        bmm_jax.solve_anchored(f32(t[0]), f32(g), f32(ta), rho=1.0)
    with pytest.raises(ValueError, match="grams must be \\[K, d_in, d_in\\]"):
        bmm_jax.solve_anchored(f32(t), f32(g[:2]), f32(ta), rho=1.0)
    with pytest.raises(ValueError, match="anchor_kernel must be \\[d_in, d_out\\]"):
        bmm_jax.solve_anchored(f32(t), f32(g), f32(ta.T), rho=1.0)
    bad = t.copy()
    bad[1, 2, 3] = np.nan
    with pytest.raises(ValueError, match="task_kernels has non-finite values"):
        bmm_jax.solve_anchored(f32(bad), f32(g), f32(ta), rho=1.0)
    badg = g.copy()
    badg[0, 0, 0] = np.inf
    with pytest.raises(ValueError, match="grams has non-finite values"):
        bmm_jax.solve_anchored(f32(t), f32(badg), f32(ta), rho=1.0)
    with pytest.raises(TypeError, match="task_kernels must be a floating array"):
        bmm_jax.solve_anchored(jnp.asarray(t, jnp.int32), f32(g), f32(ta), rho=1.0)
    with pytest.raises(ValueError, match="weights must have shape \\(3,\\)"):
        bmm_jax.solve_anchored(f32(t), f32(g), f32(ta), rho=1.0, weights=jnp.ones((2,), jnp.float32))
    with pytest.raises(ValueError, match="weights must be finite and >= 0"):
        bmm_jax.solve_anchored(f32(t), f32(g), f32(ta), rho=1.0,
                               weights=jnp.asarray([1.0, -1.0, 1.0], jnp.float32))
