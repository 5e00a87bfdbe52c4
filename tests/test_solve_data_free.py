"""The row-oriented data-free solves (bmm_jax.solve_data_free) and linear anchors: against an
independent float64 numpy solve of method.md §2 with data-free Grams (§3.2)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bmm_jax
from bmm_jax import engine
from bmm_jax.anchors import LinearAnchor


def _np_module(w0, ws, wa, layout, rho, scale, w):
    view = (lambda x: x.T) if layout == "transposed" else (lambda x: x)
    t = [view(np.asarray(x, np.float64) - np.asarray(w0, np.float64)) for x in ws]
    ta = view(np.asarray(wa, np.float64) - np.asarray(w0, np.float64))
    g = [wi * x @ x.T / np.sum(x * x) if np.sum(x * x) > 0 else np.zeros((x.shape[0],) * 2)
         for wi, x in zip(w, t)]
    s, b = sum(g), sum(gi @ ti for gi, ti in zip(g, t))
    lam = rho * np.trace(s) / s.shape[0]
    return np.asarray(w0, np.float64) + scale * view(np.linalg.solve(s + lam * np.eye(s.shape[0]), b + lam * ta))


CASES = [  # layout, d_in, d_out, K, one expert unchanged
    ("transposed", 24, 16, 3, False),     # wide: K d_out > d_in
    ("dense", 24, 16, 3, False),
    ("transposed", 48, 16, 3, False),     # K d_out = d_in: linear anchor in the K d_out space
    ("dense", 48, 12, 4, False),
    ("transposed", 40, 8, 3, True),       # K d_out < d_in, one expert unchanged
]


@pytest.mark.parametrize("layout,d_in,d_out,k,zero", CASES)
@pytest.mark.parametrize("linear", [False, True])
def test_row_solves_match_numpy(layout, d_in, d_out, k, zero, linear):
    rng = np.random.default_rng(d_in + d_out + k)
    shp = (d_out, d_in) if layout == "transposed" else (d_in, d_out)
    base = rng.standard_normal(shp).astype(np.float32)
    ex = [base + 0.1 * rng.standard_normal(shp).astype(np.float32) for _ in range(k)]
    if zero:
        ex[1] = base.copy()
    c = rng.uniform(0.1, 0.5, k).astype(np.float32)
    anchor = base + sum(ci * (e - base) for ci, e in zip(c, ex))
    w = rng.uniform(0.5, 1.5, k).astype(np.float32)
    want = _np_module(base, ex, anchor, layout, 0.2, 0.9, w)
    fn = jax.jit(lambda b, es, a, cc: engine.solve_module((layout, d_in, d_out), "data_free", "isotropic", b, es, None,
                                                           a, jnp.asarray(w), 0.2, 0.9, check_singular=True,
                                                           anchor_coefficients=cc))
    out, st = fn(base, ex, None if linear else anchor, c if linear else None)
    err = np.max(np.abs(np.asarray(out, np.float64) - want)) / np.max(np.abs(want - base))
    assert err < 1e-5, err
    # the singular flag: S has rank <= K d_out - (unchanged experts) and is singular below d_in
    rank = (k - int(zero)) * d_out
    if rank < d_in:
        assert float(st.singular) == 1.0
    np.testing.assert_allclose(float(st.lam), 0.2 * float(np.sum(w * (np.arange(k) != 1 if zero else 1))) / d_in,
                               rtol=1e-5)


def test_row_solves_vmap_grad_and_unchanged_module():
    rng = np.random.default_rng(0)
    base = rng.standard_normal((8, 32)).astype(np.float32)
    out, st = engine.solve_module(("transposed", 32, 8), "data_free", "isotropic", base, [base] * 3, None, None,
                                  jnp.ones(3), 0.2, 1.0, anchor_coefficients=jnp.full(3, 0.3))
    assert np.array_equal(np.asarray(out), base) and float(st.changed) == 0.0
    bases = rng.standard_normal((3, 8, 32)).astype(np.float32)
    exs = [bases + 0.1 * rng.standard_normal(bases.shape).astype(np.float32) for _ in range(4)]
    c = jnp.full((3, 4), 0.3)
    stacked, _ = engine.solve_stack(("transposed", 32, 8), "data_free", "isotropic", bases, exs, None, None,
                                    jnp.ones(4), jnp.full(3, 0.2), jnp.ones(3), anchor_coefficients=c)
    for m in range(3):
        want = _np_module(bases[m], [e[m] for e in exs], bases[m] + 0.3 * sum(e[m] - bases[m] for e in exs),
                          "transposed", 0.2, 1.0, np.ones(4))
        np.testing.assert_allclose(np.asarray(stacked[m]), want, rtol=1e-4, atol=1e-5)

    def loss(rho, cc):
        return jnp.sum(engine.solve_module(("transposed", 32, 8), "data_free", "isotropic", bases[0],
                                           [e[0] for e in exs], None, None, jnp.ones(4), rho, 1.0,
                                           anchor_coefficients=cc)[0] ** 2)
    g_rho, g_c = jax.grad(loss, argnums=(0, 1))(0.3, jnp.full(4, 0.3))
    def ref_loss(rho):                                  # float64 numpy, central differences
        e0 = [e[0] for e in exs]
        return np.sum(_np_module(bases[0], e0, bases[0] + 0.3 * sum(x - bases[0] for x in e0), "transposed", rho,
                                 1.0, np.ones(4)) ** 2)
    eps = 1e-5
    np.testing.assert_allclose(float(g_rho), (ref_loss(0.3 + eps) - ref_loss(0.3 - eps)) / (2 * eps), rtol=1e-3)
    assert g_c.shape == (4,) and np.all(np.isfinite(np.asarray(g_c)))


def test_merge_with_linear_anchor_equals_materialised_anchor():
    rng = np.random.default_rng(1)
    base = {"a": {"kernel": rng.standard_normal((48, 12)).astype(np.float32), "bias": np.zeros(12, np.float32)},
            "b": {"kernel": rng.standard_normal((16, 24)).astype(np.float32)}}
    ex = [jax.tree_util.tree_map(lambda x: x + 0.1 * rng.standard_normal(x.shape).astype(np.float32), base)
          for _ in range(4)]
    hp = {"rho": 0.3, "scale": 1.0}
    c = np.array([0.1, 0.2, 0.3, 0.4], np.float32)
    tree = jax.tree_util.tree_map(lambda b, *es: b + sum(ci * (e - b) for ci, e in zip(c, es)), base, *ex)
    want = bmm_jax.merge(base, ex, tree, None, hp).params
    for anchor in (LinearAnchor(c), LinearAnchor(jnp.asarray(c))):
        got = bmm_jax.merge(base, ex, anchor, None, hp).params
        for p, q in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
            np.testing.assert_allclose(np.asarray(p), np.asarray(q), rtol=1e-5, atol=1e-6)
    got = jax.jit(lambda cc: bmm_jax.merge(base, ex, LinearAnchor(cc), None, hp).params)(jnp.asarray(c))
    np.testing.assert_allclose(np.asarray(got["a"]["kernel"]), np.asarray(want["a"]["kernel"]), rtol=1e-5, atol=1e-6)
    # carried leaves are the materialised anchor's; names resolve to the same coefficients
    np.testing.assert_allclose(np.asarray(got["a"]["bias"]), np.asarray(tree["a"]["bias"]), atol=1e-7)
    ta = LinearAnchor.of("task_arithmetic", 4).materialize(base, ex)
    np.testing.assert_allclose(np.asarray(ta["b"]["kernel"]),
                               np.asarray(bmm_jax.anchors.task_arithmetic(base, ex)["b"]["kernel"]), atol=1e-6)
    with pytest.raises(ValueError, match="4 real numbers"):
        bmm_jax.merge(base, ex, LinearAnchor(np.ones(3)), None, hp)
    with pytest.raises(ValueError, match="must be finite"):
        bmm_jax.merge(base, ex, LinearAnchor([0.3, float("nan"), 0.3, 0.3]), None, hp)
    with pytest.raises(ValueError, match="not linear"):
        LinearAnchor.of("ties", 4)
