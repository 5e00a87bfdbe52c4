"""The low-rank (Woodbury) anchored solve against a dense numpy float64 reference.

Reference, written from method.md §2 only: ``S = sum_k w_k F_k F_k^T``, ``B = sum_k w_k S_k T_k``,
``lambda = rho tr(S)/d_in``, ``scale * solve(S + lambda I, B + lambda c T_a)`` in float64.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bmm_jax.solve_lowrank import (lowrank_factors, prefer_woodbury, resolve_lowrank, solve_costs,
                                   solve_data_free_woodbury, solve_factored_woodbury)


def _dense_reference(t, fs, ta, rho, scale=1.0, weights=None, anchor_scale=1.0):
    t = np.asarray(t, np.float64)
    ta = np.asarray(ta, np.float64)
    k, d_in, _ = t.shape
    w = np.ones(k) if weights is None else np.asarray(weights, np.float64)
    g = [np.asarray(f, np.float64) @ np.asarray(f, np.float64).T for f in fs]
    s = sum(w[i] * g[i] for i in range(k))
    b = sum(w[i] * g[i] @ t[i] for i in range(k))
    lam = rho * np.trace(s) / d_in
    return scale * np.linalg.solve(s + lam * np.eye(d_in), b + lam * anchor_scale * ta)


def _problem(seed, k, d_in, d_out, r=None, data_free=False):
    rng = np.random.default_rng(seed)
    t = rng.standard_normal((k, d_in, d_out)).astype(np.float32)
    ta = (0.3 * t.sum(0) + 0.1 * rng.standard_normal((d_in, d_out))).astype(np.float32)
    if data_free:
        f = t / np.linalg.norm(t.reshape(k, -1), axis=1)[:, None, None]
    else:
        f = rng.standard_normal((k, d_in, r)).astype(np.float32) * rng.uniform(0.2, 3.0, (k, 1, 1)).astype(np.float32)
    return t, f.astype(np.float32), ta


def _rel(a, b):
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


@pytest.mark.parametrize("k,d_in,d_out,r", [(3, 40, 6, 5), (2, 64, 8, 8), (4, 24, 3, 2), (1, 16, 16, 4)])
@pytest.mark.parametrize("rho", [1e-3, 0.3, 20.0])
def test_factored_matches_dense(k, d_in, d_out, r, rho):
    t, f, ta = _problem(k * 100 + d_in, k, d_in, d_out, r)
    w = np.linspace(0.5, 1.5, k)
    got = solve_factored_woodbury(t, f, ta, rho=rho, scale=1.1, weights=w)
    ref = _dense_reference(t, list(f), ta, rho, 1.1, w)
    assert got.shape == (d_in, d_out) and got.dtype == jnp.float32
    assert _rel(got, ref) < 2e-4


@pytest.mark.parametrize("name,k,d_in,d_out", [
    ("gqa k/v: hidden 32, 2 kv heads x 4", 2, 32, 8),
    ("down proj: 48 -> 12", 3, 48, 12),
    ("kv, K=3", 3, 64, 16),
])
def test_data_free_matches_dense(name, k, d_in, d_out):
    assert k * d_out < d_in
    t, f, ta = _problem(d_in + d_out, k, d_in, d_out, data_free=True)
    for rho in (1e-2, 1.0):
        got = solve_data_free_woodbury(t, ta, rho=rho)
        ref = _dense_reference(t, list(f), ta, rho)
        assert _rel(got, ref) < 2e-4, name


def test_ranks_differ_zero_task_and_zero_weight():
    rng = np.random.default_rng(3)
    d_in, d_out = 30, 4
    t = rng.standard_normal((3, d_in, d_out)).astype(np.float32)
    ta = rng.standard_normal((d_in, d_out)).astype(np.float32)
    fs = [rng.standard_normal((d_in, r)).astype(np.float32) for r in (2, 7, 4)]
    got = solve_factored_woodbury(t, fs, ta, rho=0.5)
    assert _rel(got, _dense_reference(t, fs, ta, 0.5)) < 2e-4
    # a zero weight drops a task; a zero task vector has a zero data-free factor (not 0/0)
    got = solve_factored_woodbury(t, fs, ta, rho=0.5, weights=np.array([1.0, 0.0, 2.0], np.float32))
    assert _rel(got, _dense_reference(t, fs, ta, 0.5, weights=[1.0, 0.0, 2.0])) < 2e-4
    t0 = t.copy()
    t0[1] = 0.0
    got = solve_data_free_woodbury(t0, ta, rho=0.2)
    f0 = [x / np.linalg.norm(x) if np.any(x) else np.zeros_like(x) for x in t0]
    assert np.all(np.isfinite(np.asarray(got)))
    assert _rel(got, _dense_reference(t0, f0, ta, 0.2)) < 2e-4


def test_limits_anchor_and_rank():
    t, f, ta = _problem(7, 2, 20, 3, 3)
    # rho -> infinity: the anchor
    np.testing.assert_allclose(solve_factored_woodbury(t, f, ta, rho=1e7), ta, rtol=0, atol=1e-4)
    # outside the span of F the result is exactly the anchor: (I - P_F)(Delta - T_a) = 0
    got = np.asarray(solve_factored_woodbury(t, f, ta, rho=0.1), np.float64)
    fcat = np.concatenate(list(f.astype(np.float64)), axis=1)
    proj = np.eye(20) - fcat @ np.linalg.pinv(fcat)
    np.testing.assert_allclose(proj @ (got - ta), 0.0, atol=1e-4)


def test_jit_vmap_and_grad_rho():
    t, f, ta = _problem(11, 3, 36, 4, 4)
    fn = jax.jit(lambda t, f, ta, rho: solve_factored_woodbury(t, f, ta, rho=rho, scale=0.9))
    got = fn(t, f, ta, 0.4)
    assert _rel(got, _dense_reference(t, list(f), ta, 0.4, 0.9)) < 2e-4
    # vmap over a stack of modules (same shapes) and over rho
    ts = np.stack([t, 2 * t])
    fs = np.stack([f, f[::-1]])
    tas = np.stack([ta, -ta])
    rhos = jnp.asarray([0.1, 3.0])
    got = jax.vmap(lambda a, b, c, r: solve_factored_woodbury(a, b, c, rho=r))(ts, fs, tas, rhos)
    for i in range(2):
        assert _rel(got[i], _dense_reference(ts[i], list(fs[i]), tas[i], float(rhos[i]))) < 2e-4

    # d/d rho of a scalar loss, against central finite differences of the float64 reference
    probe = np.random.default_rng(0).standard_normal((36, 4))

    def loss(rho):
        return jnp.sum(solve_factored_woodbury(t, f, ta, rho=rho) * jnp.asarray(probe, jnp.float32))
    for rho in (0.05, 0.7):
        g = float(jax.grad(loss)(jnp.float32(rho)))
        h = 1e-4 * rho
        fd = (np.sum(_dense_reference(t, list(f), ta, rho + h) * probe)
              - np.sum(_dense_reference(t, list(f), ta, rho - h) * probe)) / (2 * h)
        assert abs(g - fd) <= 2e-3 * abs(fd) + 1e-5, (rho, g, fd)


def test_fast_resolve_matches_dense():
    t, f, ta = _problem(5, 3, 50, 5, 5)
    w = np.array([1.0, 0.5, 2.0], np.float32)
    fac = lowrank_factors(t, f, ta, weights=w)
    assert fac.p.shape == (50, 15) and fac.e.shape == (15,)
    resolve = jax.jit(resolve_lowrank)
    for rho, s, c in ((0.01, 1.0, 1.0), (0.5, 1.3, 0.7), (10.0, 0.8, 1.2)):
        got = resolve(fac, rho, s, c)
        ref = _dense_reference(t, list(f), ta, rho, s, w, anchor_scale=c)
        assert _rel(got, ref) < 2e-4


def test_errors():
    t, f, ta = _problem(1, 2, 12, 3, 2)
    with pytest.raises(ValueError, match="rho must be finite and > 0"):
        solve_factored_woodbury(t, f, ta, rho=0.0)
    with pytest.raises(ValueError, match="rho must be finite and > 0"):
        solve_factored_woodbury(t, f, ta, rho=-1.0)
    with pytest.raises(ValueError, match="every factor is zero"):
        solve_factored_woodbury(t, np.zeros_like(f), ta, rho=1.0)
    # traced: no error, and a module no expert changed (F = 0) gives the anchor, finite
    got = jax.jit(lambda t, f, ta: solve_factored_woodbury(t, f, ta, rho=1.0, scale=0.5))(t, np.zeros_like(f), ta)
    np.testing.assert_array_equal(np.asarray(got), 0.5 * ta)
    got = jax.jit(lambda t, ta: solve_data_free_woodbury(t, ta, rho=1.0))(np.zeros_like(t), ta)
    np.testing.assert_array_equal(np.asarray(got), ta)
    with pytest.raises(ValueError, match=r"factors must be \[K, d_in, r\]"):
        solve_factored_woodbury(t, f[:, :5], ta, rho=1.0)
    with pytest.raises(ValueError, match="anchor_kernel must be"):
        solve_factored_woodbury(t, f, ta.T, rho=1.0)
    with pytest.raises(ValueError, match="weights must be finite and >= 0"):
        solve_factored_woodbury(t, f, ta, rho=1.0, weights=np.array([1.0, -1.0], np.float32))
    with pytest.raises(ValueError, match=r"factors\[1\] must be"):
        solve_factored_woodbury(t, [f[0], f[1][:4]], ta, rho=1.0)
    bad = t.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="task_kernels has non-finite"):
        solve_factored_woodbury(bad, f, ta, rho=1.0)


def test_prefer_woodbury_rule():
    # Llama-3.2-1B shapes: k/v 2048 -> 512, down 8192 -> 2048, q/o 2048 -> 2048
    assert prefer_woodbury(2048, 512, 3)            # R = 1536 < 2048
    assert not prefer_woodbury(2048, 512, 4)        # R = d_in: S can be full rank
    assert prefer_woodbury(8192, 2048, 2)
    assert not prefer_woodbury(2048, 2048, 2)
    assert prefer_woodbury(4096, 8, 4, r=16)        # generic factored Grams of rank 16
    c = solve_costs(8192, 2048, 2, 2048)
    assert c["woodbury"].flops < c["dense"].flops
    assert c["dense"].bytes == 4 * 2 * 8192 ** 2                          # S and its factor
    assert c["woodbury"].bytes == 4 * (2 * 4096 ** 2 + 2 * 4096 * 2048)   # M, its factor, C, Y
    with pytest.raises(ValueError, match="d_in must be a positive integer"):
        solve_costs(0, 3, 2, 3)
