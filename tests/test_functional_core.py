"""The functional core: every public maths function under jit, vmap, scan and grad, against
independent numpy references (float64); validation apart from the maths; host transfers counted;
shardings kept on 8 forced CPU devices."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bmm_jax
from bmm_jax import grams as acc

K = 3
PATHS = ("layer/0/query/kernel", "layer/0/intermediate/dense/kernel", "layer/1/output/dense/kernel")
SHAPES = {"layer/0/query/kernel": (6, 5), "layer/0/intermediate/dense/kernel": (6, 9),
          "layer/1/output/dense/kernel": (9, 6), "layer/0/query/bias": (5,), "layer/1/norm/scale": (6,)}


def _nest(flat):
    out = {}
    for p, v in flat.items():
        node = out
        *head, last = p.split("/")
        for h in head:
            node = node.setdefault(h, {})
        node[last] = v
    return out


def _flat(tree):
    return {"/".join(str(getattr(k, "key", k)) for k in path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.fixture(scope="module")
def model():
    rng = np.random.default_rng(0)
    base = {p: rng.standard_normal(s).astype(np.float32) for p, s in SHAPES.items()}
    experts = [{p: v + 0.2 * rng.standard_normal(v.shape).astype(np.float32) for p, v in base.items()}
               for _ in range(K)]
    return base, experts


def _trees(base, experts):
    return _nest({p: jnp.asarray(v) for p, v in base.items()}), [_nest({p: jnp.asarray(v) for p, v in e.items()})
                                                                  for e in experts]


# ----------------------------------------------------------------------------- numpy references
def np_solve(t, g, ta, rho, scale, w=None):
    t, g, ta = (np.asarray(x, np.float64) for x in (t, g, ta))
    w = np.ones(len(t)) if w is None else np.asarray(w, np.float64)
    s = np.einsum("k,kij->ij", w, g)
    b = np.einsum("k,kij,kjo->io", w, g, t)
    lam = rho * np.trace(s) / s.shape[0]
    return scale * np.linalg.solve(s + lam * np.eye(s.shape[0]), b + lam * ta)


def np_data_free(t):
    t = np.asarray(t, np.float64)
    return np.stack([x @ x.T / np.sum(x * x) for x in t])


def np_merge(base, experts, rho, scale=1.0, alpha=0.3, w=None, grams=None):
    """Data-free (or given Grams) BMM around task arithmetic(alpha); carried leaves from the anchor."""
    out = {}
    for p, b in base.items():
        b = np.asarray(b, np.float64)
        t = np.stack([np.asarray(e[p], np.float64) - b for e in experts])
        ta = alpha * t.sum(0)
        if p in PATHS:
            g = np_data_free(t) if grams is None else grams[p]
            out[p] = b + np_solve(t, g, ta, rho, scale, w)
        else:
            out[p] = b + ta
    return out


def _close(tree, ref, atol=2e-5):
    got = _flat(tree)
    assert set(got) == set(ref)
    for p, r in ref.items():
        np.testing.assert_allclose(np.asarray(got[p], np.float64), r, atol=atol * max(1.0, np.abs(r).max()),
                                   rtol=0, err_msg=p)


# ----------------------------------------------------------------------------- jit / vmap / scan / grad
def test_merge_eager_jit_and_traced_hparams_match_numpy(model):
    base, experts = model
    b, es = _trees(base, experts)
    ref = np_merge(base, experts, 0.3, 1.1)
    _close(bmm_jax.merge(b, es, "task_arithmetic", None, {"rho": 0.3, "scale": 1.1}).params, ref)
    f = jax.jit(lambda b, es, r, s: bmm_jax.merge(b, es, "task_arithmetic", None, {"rho": r, "scale": s}))
    res = f(b, es, 0.3, 1.1)
    _close(res.params, ref)
    # diagnostics are a pytree of arrays; lambda matches the formula
    m = res.diagnostics["modules"]["layer/0/query/kernel"]
    t = np.stack([e["layer/0/query/kernel"] - base["layer/0/query/kernel"] for e in experts]).astype(np.float64)
    assert float(m["lambda"]) == pytest.approx(0.3 * np.trace(np_data_free(t).sum(0)) / 6, rel=1e-5)
    assert res.diagnostics["carry"] == "anchor" and m["kind"] == "q"


def test_owned_anchor_is_written_into_but_user_arrays_never_are(model):
    """A named anchor is computed by merge and its buffers reused for the output (donated); the
    user's base / expert / anchor arrays stay alive and unchanged, and the result is the numpy one."""
    base, experts = model
    b, es = _trees(base, experts)
    before = [np.asarray(x).copy() for x in jax.tree_util.tree_leaves((b, es))]
    ref = np_merge(base, experts, 0.3, 0.9)
    _close(bmm_jax.merge(b, es, "task_arithmetic", None, {"rho": 0.3, "scale": 0.9}).params, ref)
    anchor = bmm_jax.anchors.task_arithmetic(b, es, anchor_scale=0.3)
    anchor_before = [np.asarray(x).copy() for x in jax.tree_util.tree_leaves(anchor)]
    _close(bmm_jax.merge(b, es, anchor, None, {"rho": 0.3, "scale": 0.9}).params, ref)
    for x, y in zip(jax.tree_util.tree_leaves((b, es)), before):
        assert not x.is_deleted()
        np.testing.assert_array_equal(np.asarray(x), y)
    for x, y in zip(jax.tree_util.tree_leaves(anchor), anchor_before):
        assert not x.is_deleted()
        np.testing.assert_array_equal(np.asarray(x), y)
    # an anchor whose leaves are the base's own arrays (anchor_scale 0): nothing of the user's donated
    out = bmm_jax.merge(b, es, "task_arithmetic", None, {"rho": 0.3, "scale": 0.9}, carry="base").params
    assert all(not x.is_deleted() for x in jax.tree_util.tree_leaves((b, es, out)))


def test_release_anchors_never_donates_a_shared_or_user_array(model):
    """The eager driver donates an anchor leaf only when nothing else holds it: an anchor array used
    by two modules, or one that is an input (base) array, survives; results match numpy."""
    from bmm_jax.engine import ModuleJob, solve_modules
    base, experts = model
    p = "layer/0/query/kernel"
    lab = {l.path: l for l in jax.tree_util.tree_leaves(
        bmm_jax.build_labels(_trees(base, experts)[0]), is_leaf=lambda x: isinstance(x, bmm_jax.labels.Label))}[p]
    b = jnp.asarray(base[p])
    es = tuple(jnp.asarray(e[p]) for e in experts)
    shared = jnp.asarray(base[p] + 0.3 * sum(e[p] - base[p] for e in experts))
    jobs = [ModuleJob(lab, "data_free", b, es, None, shared, 0.3, 1.0, False),
            ModuleJob(lab, "data_free", b, es, None, shared, 0.3, 1.0, False),
            ModuleJob(lab, "data_free", b, es, None, b, 0.3, 1.0, False)]
    leaves, _ = solve_modules(jobs, jnp.ones(K, jnp.float32), "isotropic", release_anchors=True)
    assert not shared.is_deleted() and not b.is_deleted() and all(not e.is_deleted() for e in es)
    assert all(j.anchor is None for j in jobs)
    t = np.stack([np.asarray(e[p], np.float64) - base[p] for e in experts])
    for leaf, ta in zip(leaves, (np.asarray(shared) - base[p],) * 2 + (np.zeros_like(base[p]),)):
        ref = base[p] + np_solve(t, np_data_free(t), ta, 0.3, 1.0)
        np.testing.assert_allclose(np.asarray(leaf, np.float64), ref, atol=2e-5 * max(1.0, np.abs(ref).max()))


def test_merge_with_grams_object_and_dense_dict_under_jit(model):
    base, experts = model
    b, es = _trees(base, experts)
    rng = np.random.default_rng(1)
    x = {p: rng.standard_normal((K, 20, SHAPES[p][0])) for p in PATHS}
    dense = {p: np.einsum("kni,knj->kij", x[p], x[p]) / 20 for p in PATHS}
    ref = np_merge(base, experts, 0.5, 1.0, grams=dense)
    grams_dict = {p: jnp.asarray(v, jnp.float32) for p, v in dense.items()}
    grams_obj = bmm_jax.grams.Grams(grams_dict, {p: p for p in PATHS})
    for grams in (grams_dict, grams_obj):
        out = jax.jit(lambda b, es, g: bmm_jax.merge(b, es, "task_arithmetic", g, {"rho": 0.5}).params)(b, es, grams)
        _close(out, ref)
    # data-free Grams (a pytree of the source leaves) through jit: the same as grams=None
    df = bmm_jax.grams.data_free(b, es)
    out = jax.jit(lambda b, es, g: bmm_jax.merge(b, es, "task_arithmetic", g, {"rho": 0.5}).params)(b, es, df)
    _close(out, np_merge(base, experts, 0.5))


def test_merge_vmap_over_rho_and_over_expert_sets(model):
    base, experts = model
    b, es = _trees(base, experts)
    rhos = jnp.asarray([0.05, 0.5, 5.0])
    out = jax.vmap(lambda r: bmm_jax.merge(b, es, "task_arithmetic", None, {"rho": r}).params)(rhos)
    for i, r in enumerate([0.05, 0.5, 5.0]):
        _close(jax.tree_util.tree_map(lambda x: x[i], out), np_merge(base, experts, r))
    # vmap over two expert sets stacked on a leading axis
    rng = np.random.default_rng(2)
    sets = [[{p: v + 0.1 * rng.standard_normal(v.shape).astype(np.float32) for p, v in base.items()}
             for _ in range(K)] for _ in range(2)]
    stacked = [_nest({p: jnp.stack([jnp.asarray(sets[s][k][p]) for s in range(2)]) for p in base}) for k in range(K)]
    out = jax.vmap(lambda es: bmm_jax.merge(b, es, "task_arithmetic", None, {"rho": 0.4}).params)(stacked)
    for s in range(2):
        _close(jax.tree_util.tree_map(lambda x: x[s], out), np_merge(base, sets[s], 0.4))


def test_merge_inside_scan(model):
    base, experts = model
    b, es = _trees(base, experts)

    def step(carry, r):
        p = bmm_jax.merge(b, es, "task_arithmetic", None, {"rho": r}).params
        return carry + 1, p
    _, outs = jax.lax.scan(step, 0, jnp.asarray([0.2, 2.0]))
    for i, r in enumerate([0.2, 2.0]):
        _close(jax.tree_util.tree_map(lambda x: x[i], outs), np_merge(base, experts, r))


def test_grad_of_merge_wrt_rho_scale_weights_and_params(model):
    base, experts = model
    b, es = _trees(base, experts)
    p = "layer/0/intermediate/dense/kernel"
    c = np.random.default_rng(3).standard_normal(SHAPES[p])

    def loss(rho, scale, w, eb):
        es2 = [dict(e) for e in es]
        es2[0] = jax.tree_util.tree_map(lambda x: x, es[0])
        es2[0]["layer"]["0"]["intermediate"]["dense"]["kernel"] = eb
        out = bmm_jax.merge(b, es2, "task_arithmetic", None, {"rho": rho, "scale": scale}, weights=w).params
        return jnp.sum(_flat(out)[p] * c)

    w0 = jnp.asarray([1.0, 0.5, 2.0])
    e0 = jnp.asarray(experts[0][p])
    g_rho, g_s, g_w, g_e = jax.grad(loss, argnums=(0, 1, 2, 3))(0.3, 1.2, w0, e0)

    def np_loss(rho, scale, w, e0v):
        ex = [dict(e) for e in experts]
        ex[0] = dict(ex[0]); ex[0][p] = e0v
        return float(np.sum(np_merge(base, ex, rho, scale, w=w)[p] * c))
    h = 1e-5
    args = [0.3, 1.2, np.asarray(w0, np.float64), np.asarray(e0, np.float64)]
    fd_rho = (np_loss(0.3 + h, *args[1:]) - np_loss(0.3 - h, *args[1:])) / (2 * h)
    fd_s = (np_loss(0.3, 1.2 + h, *args[2:]) - np_loss(0.3, 1.2 - h, *args[2:])) / (2 * h)
    assert float(g_rho) == pytest.approx(fd_rho, rel=2e-3, abs=1e-4)
    assert float(g_s) == pytest.approx(fd_s, rel=2e-3, abs=1e-4)
    for j in range(K):
        wp, wm = args[2].copy(), args[2].copy()
        wp[j] += h; wm[j] -= h
        fd = (np_loss(0.3, 1.2, wp, args[3]) - np_loss(0.3, 1.2, wm, args[3])) / (2 * h)
        assert float(g_w[j]) == pytest.approx(fd, rel=5e-3, abs=1e-4)
    for ij in [(0, 0), (3, 7)]:
        ep, em = args[3].copy(), args[3].copy()
        ep[ij] += h; em[ij] -= h
        fd = (np_loss(0.3, 1.2, args[2], ep) - np_loss(0.3, 1.2, args[2], em)) / (2 * h)
        assert float(g_e[ij]) == pytest.approx(fd, rel=5e-3, abs=2e-4)


def test_solve_anchored_jit_vmap_grad(model):
    rng = np.random.default_rng(4)
    t = rng.standard_normal((K, 5, 4))
    x = rng.standard_normal((K, 12, 5))
    g = np.einsum("kni,knj->kij", x, x) / 12
    ta = 0.3 * t.sum(0)
    args = [jnp.asarray(a, jnp.float32) for a in (t, g, ta)]
    ref = np_solve(t, g, ta, 0.7, 1.3)
    np.testing.assert_allclose(bmm_jax.solve_anchored(*args, rho=0.7, scale=1.3), ref, atol=2e-5)
    f = jax.jit(lambda t, g, ta, r: bmm_jax.solve_anchored(t, g, ta, rho=r, scale=1.3))
    np.testing.assert_allclose(f(*args, 0.7), ref, atol=2e-5)
    outs = jax.vmap(lambda r: bmm_jax.solve_anchored(*args, rho=r))(jnp.asarray([0.1, 1.0]))
    for i, r in enumerate([0.1, 1.0]):
        np.testing.assert_allclose(outs[i], np_solve(t, g, ta, r, 1.0), atol=2e-5)
    grad = jax.grad(lambda r: jnp.sum(bmm_jax.solve_anchored(*args, rho=r)))(0.7)
    h = 1e-6
    fd = (np_solve(t, g, ta, 0.7 + h, 1.0).sum() - np_solve(t, g, ta, 0.7 - h, 1.0).sum()) / (2 * h)
    assert float(grad) == pytest.approx(fd, rel=1e-3, abs=1e-5)
    _, outs = jax.lax.scan(lambda c, r: (c, bmm_jax.solve_anchored(*args, rho=r)), 0, jnp.asarray([0.2, 3.0]))
    np.testing.assert_allclose(outs[1], np_solve(t, g, ta, 3.0, 1.0), atol=2e-5)


def test_prepare_params_jit_vmap_batched_trials_and_grad(model):
    base, experts = model
    b, es = _trees(base, experts)
    prep = bmm_jax.prepare(b, es, "task_arithmetic")
    _close(prep.params({"rho": 0.3, "scale": 0.9}), np_merge(base, experts, 0.3, 0.9))
    # Prepared is a pytree: a jit argument
    out = jax.jit(lambda pr, r: pr.params({"rho": r}))(prep, 0.3)
    _close(out, np_merge(base, experts, 0.3))
    # a batch of per-group settings at once (the batched trials of a search)
    rho_q = jnp.asarray([0.1, 1.0, 4.0])
    rho_g = jnp.asarray([0.5, 0.5, 0.02])
    batch = jax.vmap(lambda a, g: prep.params({"q": {"rho": a}, "global": {"rho": g}}))(rho_q, rho_g)
    for i in range(3):
        got = _flat(jax.tree_util.tree_map(lambda x: x[i], batch))
        for p in PATHS:
            rho = float(rho_q[i]) if "query" in p else float(rho_g[i])
            ref = np_merge(base, experts, rho)[p]
            np.testing.assert_allclose(np.asarray(got[p], np.float64), ref, atol=5e-5 * max(1, np.abs(ref).max()))
    # grad of a trial loss w.r.t. rho against finite differences of the numpy solve
    p = PATHS[1]
    c = np.random.default_rng(5).standard_normal(SHAPES[p])
    g = jax.grad(lambda r: jnp.sum(_flat(prep.params({"rho": r}))[p] * c))(0.3)
    h = 1e-5
    fd = (np.sum(np_merge(base, experts, 0.3 + h)[p] * c) - np.sum(np_merge(base, experts, 0.3 - h)[p] * c)) / (2 * h)
    assert float(g) == pytest.approx(fd, rel=3e-3, abs=1e-4)
    # prepare itself traced: the whole fast path inside one jit
    out = jax.jit(lambda b, es: bmm_jax.prepare(b, es, "task_arithmetic").params({"rho": 0.3}))(b, es)
    _close(out, np_merge(base, experts, 0.3), atol=5e-5)
    # deltas and merge share the merge's schema
    res = prep.merge({"rho": 0.3})
    assert set(res.diagnostics["modules"]) == set(PATHS)
    d = prep.deltas({"rho": 0.3})
    np.testing.assert_allclose(np.asarray(d[PATHS[0]]), np_merge(base, experts, 0.3)[PATHS[0]] - base[PATHS[0]],
                               atol=5e-5)


def test_sample_posterior_moments(model):
    """Posterior draws: mean -> the point estimate, covariance of a column -> sigma^2 (S + lambda I)^{-1}."""
    base, experts = model
    b, es = _trees(base, experts)
    prep = bmm_jax.prepare(b, es, "task_arithmetic")
    p = "layer/0/query/kernel"
    m = 2000
    draws = prep.sample(jax.random.key(0), m, {"rho": 0.5}, temperature=0.1)
    x = np.asarray(_flat(draws)[p], np.float64)                 # [M, 6, 5]
    point = np_merge(base, experts, 0.5)[p]
    assert x.shape == (m, 6, 5)
    np.testing.assert_allclose(x.mean(0), point, atol=4 * 0.1 / np.sqrt(m) * 10)
    t = np.stack([e[p] - base[p] for e in experts]).astype(np.float64)
    s = np_data_free(t).sum(0)
    cov_ref = 0.01 * np.linalg.inv(s + 0.5 * np.trace(s) / 6 * np.eye(6))
    dev = x - x.mean(0)
    cov = np.einsum("mio,mjo->ij", dev, dev) / (m * 5)          # columns are i.i.d.
    np.testing.assert_allclose(cov, cov_ref, atol=0.08 * np.abs(cov_ref).max())
    # carried leaves are broadcast; temperature 0 is the point estimate
    assert _flat(draws)["layer/0/query/bias"].shape == (m, 5)
    zero = prep.sample(jax.random.key(1), 2, {"rho": 0.5}, temperature=0.0)
    _close(jax.tree_util.tree_map(lambda a: a[1], zero), np_merge(base, experts, 0.5))
    with pytest.raises(ValueError, match="num_samples"):
        prep.sample(jax.random.key(0), 0, {"rho": 0.5})


def test_task_vectors_data_free_hybrid_under_jit_and_vmap(model):
    base, experts = model
    b, es = _trees(base, experts)
    tv = jax.jit(bmm_jax.task_vectors)(b, es)
    np.testing.assert_allclose(_flat(tv)[PATHS[0]], np.stack([e[PATHS[0]] - base[PATHS[0]] for e in experts]),
                               atol=1e-6)
    g = jax.jit(lambda b, es: {p: bmm_jax.grams.data_free(b, es)[p] for p in PATHS})(b, es)
    t = np.stack([e[PATHS[2]] - base[PATHS[2]] for e in experts])
    np.testing.assert_allclose(g[PATHS[2]], np_data_free(t), atol=1e-5)
    df = bmm_jax.grams.data_free(b, es)
    rng = np.random.default_rng(6)
    data = bmm_jax.grams.Grams({p: jnp.asarray(np.stack([np.eye(SHAPES[p][0]) * (1 + k) for k in range(K)]),
                                               jnp.float32) for p in PATHS}, {p: p for p in PATHS})
    hy = jax.jit(lambda d, f, beta: {p: bmm_jax.grams.hybrid(d, f, beta)[p] for p in PATHS})(data, df, 0.25)
    for p in PATHS:
        tt = np.stack([e[p] - base[p] for e in experts]).astype(np.float64)
        dd = np.stack([np.eye(SHAPES[p][0]) * (1 + k) for k in range(K)])
        trd = np.trace(dd, axis1=1, axis2=2)[:, None, None]
        ref = trd * (0.25 * dd / trd + 0.75 * np_data_free(tt))      # data-free traces are 1
        np.testing.assert_allclose(hy[p], ref, atol=1e-4)
    betas = jnp.asarray([0.0, 1.0])
    out = jax.vmap(lambda beta: bmm_jax.grams.hybrid(data, df, beta)[PATHS[0]])(betas)
    np.testing.assert_allclose(out[1], np.asarray(data[PATHS[0]]), atol=1e-5)
    del rng


def test_activation_accumulator_jit_and_scan():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((4, 10, 3)).astype(np.float32)        # 4 batches of 10 rows
    mask = (rng.random((4, 10)) > 0.3).astype(np.float32)
    state = acc.init({"g": 3})
    upd = jax.jit(acc.update)

    def body(st, xm):
        return acc.update(st, {"g": (xm[0], xm[1])}), None
    st_scan, _ = jax.lax.scan(body, state, (jnp.asarray(x), jnp.asarray(mask)))
    st_loop = state
    for i in range(4):
        st_loop = upd(st_loop, {"g": (jnp.asarray(x[i]), jnp.asarray(mask[i]))})
    xs, ms = x.reshape(-1, 3).astype(np.float64), mask.reshape(-1).astype(np.float64)
    ref = (xs * ms[:, None]).T @ xs / ms.sum()
    for st in (st_scan, st_loop):
        np.testing.assert_allclose(jax.jit(acc.finalize)(st)["g"], ref, atol=1e-5)
        np.testing.assert_allclose(acc.finalize(st)["g"], ref, atol=1e-5)
    with pytest.raises(ValueError, match="saw no"):
        acc.finalize(acc.init({"g": 3}))


# ----------------------------------------------------------------------------- validation and transfers
def test_static_checks_raise_at_trace_time_value_checks_only_eagerly(model):
    base, experts = model
    b, es = _trees(base, experts)
    bad = [dict(e) for e in es]
    bad[1] = jax.tree_util.tree_map(lambda x: x, es[1])
    bad[1]["layer"]["0"]["query"]["kernel"] = jnp.zeros((5, 6))
    with pytest.raises(ValueError, match=r"expert 1 leaf 'layer/0/query/kernel': shape \(5, 6\)"):
        jax.jit(lambda b, es: bmm_jax.merge(b, es, "average", None, {"rho": 1.0}).params)(b, bad)
    nan = jax.tree_util.tree_map(lambda x: x, es[2])
    nan["layer"]["1"]["norm"]["scale"] = jnp.full((6,), jnp.nan)
    es_nan = [es[0], es[1], nan]
    with pytest.raises(ValueError, match=r"expert 2 leaf 'layer/1/norm/scale' has non-finite values"):
        bmm_jax.merge(b, es_nan, "average", None, {"rho": 1.0})
    with pytest.raises(ValueError, match=r"expert 2 leaf 'layer/1/norm/scale'"):
        bmm_jax.validate(b, es_nan)
    anchor = bmm_jax.anchors.average(b, es)
    bmm_jax.merge(b, es_nan, anchor, None, {"rho": 1.0}, validate=False)     # skipped on request
    jax.jit(lambda b, es: bmm_jax.merge(b, es, anchor, None, {"rho": 1.0}).params)(b, es_nan)   # no host check
    with pytest.raises(TypeError, match="positional"):
        bmm_jax.merge(b, es, "average", None, {"rho": 1.0}, bmm_jax.build_labels(b))
    with pytest.raises(ValueError, match=r"unknown keys \['rh'\]"):
        bmm_jax.merge(b, es, "average", None, {"rh": 1.0, "rho": 1.0})
    with pytest.raises(TypeError, match=r"weights\[1\] must be a number"):
        bmm_jax.merge(b, es, "average", None, {"rho": 1.0}, weights=[1.0, "a", 1.0])
    with pytest.raises(ValueError, match=r"hparams\['scale'\] must be >= 0"):
        bmm_jax.merge(b, es, "average", None, {"rho": 1.0, "scale": -1.0})
    with pytest.warns(UserWarning, match="unusually large"):
        bmm_jax.merge(b, es, "average", None, {"rho": 1.0, "scale": 50.0})


def test_gram_value_checks_name_the_module(model):
    base, experts = model
    b, es = _trees(base, experts)
    good = {p: jnp.asarray(np.stack([np.eye(SHAPES[p][0])] * K), jnp.float32) for p in PATHS}
    asym = dict(good)
    a = np.stack([np.eye(6)] * K); a[1, 0, 3] = 0.5
    asym[PATHS[0]] = jnp.asarray(a, jnp.float32)
    with pytest.raises(ValueError, match=r"Gram of 'layer/0/query/kernel' is not symmetric"):
        bmm_jax.merge(b, es, "average", asym, {"rho": 1.0})
    indef = dict(good)
    a = np.stack([np.eye(6)] * K); a[2, 1, 2] = a[2, 2, 1] = 3.0
    indef[PATHS[0]] = jnp.asarray(a, jnp.float32)
    with pytest.raises(ValueError, match=r"Gram of 'layer/0/query/kernel' is not positive semi-definite"):
        bmm_jax.merge(b, es, "average", indef, {"rho": 1.0})


def test_overflow_is_named_as_overflow(model):
    base, experts = model
    big = [{p: (v * np.float32(1e17) if p == PATHS[0] else v) for p, v in e.items()} for e in experts]
    b, es = _trees(base, big)
    with pytest.raises(ValueError, match=r"module 'layer/0/query/kernel': the normal equations overflowed float32"):
        bmm_jax.merge(b, es, "average", None, {"rho": 1.0})


def test_host_transfers_are_few_and_explicit(model, monkeypatch):
    """No implicit device-to-host conversion on the merge path (the transfer guard would raise), and
    the explicit ones are counted: merge and prepare read a handful of scalars, a re-solve none."""
    base, experts = model
    b, es = _trees(base, experts)
    prep0 = bmm_jax.prepare(b, es, "task_arithmetic")        # compile outside the count
    bmm_jax.merge(b, es, "task_arithmetic", None, {"rho": 0.3})
    calls = []
    real = jax.device_get
    monkeypatch.setattr(jax, "device_get", lambda x: (calls.append(1), real(x))[1])
    b, es = _trees(base, experts)                            # fresh arrays: nothing remembered as finite
    with jax.transfer_guard_device_to_host("disallow"):
        calls.clear()
        bmm_jax.merge(b, es, "task_arithmetic", None, {"rho": 0.3})
        n_merge = len(calls)
        calls.clear()
        prep = bmm_jax.prepare(b, es, "task_arithmetic")
        n_prepare = len(calls)
        calls.clear()
        jax.block_until_ready(prep.params({"rho": 0.4, "scale": 1.1}))
        n_params = len(calls)
    assert n_merge <= 3, n_merge          # inputs finite (1) + statuses (1)
    assert n_prepare <= 3, n_prepare      # inputs finite (1) + unchanged masks (1)
    assert n_params == 0
    del prep0


_SHARDED_CHILD = textwrap.dedent("""
    import os, re, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    import bmm_jax
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("model",))
    rng = np.random.default_rng(0)
    K, DI, DO = 3, 16, 64
    base_np = {"layer": {"0": {"intermediate": {"dense": {"kernel": rng.standard_normal((DI, DO)).astype(np.float32)}},
                               "query": {"kernel": rng.standard_normal((DI, 32)).astype(np.float32)}}}}
    exp_np = [jax.tree_util.tree_map(lambda x: x + 0.1 * rng.standard_normal(x.shape).astype(np.float32), base_np)
              for _ in range(K)]
    ref = bmm_jax.merge(jax.tree_util.tree_map(jnp.asarray, base_np),
                        [jax.tree_util.tree_map(jnp.asarray, e) for e in exp_np], "task_arithmetic", None,
                        {"rho": 0.3}, mesh=None, devices=jax.devices()[:1]).params
    for spec in (P(None, "model"), P("model", None)):
        put = lambda t: jax.tree_util.tree_map(lambda x: jax.device_put(x, NamedSharding(mesh, spec)), t)
        base, experts = put(base_np), [put(e) for e in exp_np]
        for name, out in (("eager", bmm_jax.merge(base, experts, "task_arithmetic", None, {"rho": 0.3}).params),
                          ("jit", jax.jit(lambda b, e: bmm_jax.merge(b, e, "task_arithmetic", None,
                                                                      {"rho": 0.3}).params)(base, experts))):
            for a, b, r in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(base),
                               jax.tree_util.tree_leaves(ref)):
                assert a.sharding.is_equivalent_to(b.sharding, a.ndim), (spec, name, a.sharding, b.sharding)
                np.testing.assert_allclose(np.asarray(a), np.asarray(r), atol=2e-5)
        hlo = jax.jit(lambda b, e: bmm_jax.merge(b, e, "task_arithmetic", None, {"rho": 0.3}).params).lower(
            base, experts).compile().as_text()
        for m in re.finditer(r"= f32\\[([0-9,]*)\\][^=]*? all-gather\\(", hlo):
            n = int(np.prod([int(x) for x in m.group(1).split(",") if x]))
            assert n < K * DI * 32, ("an all-gather as large as the K experts' module", spec, m.group(0))
        print("ok", spec)
""")


def test_sharded_inputs_keep_their_sharding_and_experts_are_not_gathered(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in [env.get("PYTHONPATH")] if p])
    proc = subprocess.run([sys.executable, "-c", _SHARDED_CHILD], capture_output=True, text=True, env=env,
                          timeout=300, cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("ok") == 2


def test_merge_takes_the_woodbury_path_when_rank_is_low_and_matches_dense():
    """K d_out < d_in (a down projection with few experts): the merge solves in the rank of the
    data-free Grams; the result equals the dense numpy solve, and rho = 0 is refused eagerly."""
    from bmm_jax.solve_lowrank import prefer_woodbury
    rng = np.random.default_rng(11)
    shapes = {"layer/0/mlp/down_proj/kernel": (64, 4), "layer/0/mlp/down_proj/bias": (4,)}
    assert prefer_woodbury(64, 4, 3)
    base = {p: rng.standard_normal(s).astype(np.float32) for p, s in shapes.items()}
    experts = [{p: v + 0.3 * rng.standard_normal(v.shape).astype(np.float32) for p, v in base.items()}
               for _ in range(3)]
    b, es = _nest({p: jnp.asarray(v) for p, v in base.items()}), [_nest({p: jnp.asarray(v) for p, v in e.items()})
                                                                  for e in experts]
    p = "layer/0/mlp/down_proj/kernel"
    t = np.stack([e[p] - base[p] for e in experts]).astype(np.float64)
    ref = base[p] + np_solve(t, np_data_free(t), 0.3 * t.sum(0), 0.2, 1.1)
    for fn in (lambda b, es: bmm_jax.merge(b, es, "task_arithmetic", None, {"rho": 0.2, "scale": 1.1}).params,
               jax.jit(lambda b, es: bmm_jax.merge(b, es, "task_arithmetic", None, {"rho": 0.2, "scale": 1.1}).params)):
        np.testing.assert_allclose(np.asarray(_flat(fn(b, es))[p], np.float64), ref, atol=5e-5 * np.abs(ref).max())
    with pytest.raises(ValueError, match="rho = 0"):
        bmm_jax.merge(b, es, "task_arithmetic", None, {"rho": 0.0})


def test_first_merge_in_a_process_is_bitwise_equal_to_later_ones(tmp_path):
    child = textwrap.dedent("""
        import jax, jax.numpy as jnp, numpy as np, bmm_jax
        rng = np.random.default_rng(0)
        base = {"layer": {str(i): {"query": {"kernel": jnp.asarray(rng.standard_normal((64, 64)), jnp.float32)},
                                   "output": {"dense": {"kernel": jnp.asarray(rng.standard_normal((256, 64)),
                                                                              jnp.float32)}}} for i in range(2)}}
        experts = [jax.tree_util.tree_map(lambda x: x + 0.05 * jnp.asarray(rng.standard_normal(x.shape), jnp.float32),
                                          base) for _ in range(4)]
        outs = [bmm_jax.merge(base, experts, "task_arithmetic", None, {"rho": 0.3}).params for _ in range(3)]
        same = all(bool(jnp.array_equal(a, b)) for o in outs[1:]
                   for a, b in zip(jax.tree_util.tree_leaves(outs[0]), jax.tree_util.tree_leaves(o)))
        print("bitwise" if same else "differs")
    """)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    proc = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, env=env, timeout=300, cwd=root)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith("bitwise")


def test_integer_kernels_are_carried_and_refused_as_regressed(model):
    base, experts = model
    b, es = _trees(base, experts)
    q = {"w": {"kernel": jnp.asarray(np.arange(12).reshape(3, 4), jnp.int8)}}
    bq = dict(b, quant=q)
    eq = [dict(e, quant={"w": {"kernel": q["w"]["kernel"] + jnp.int8(k + 1)}}) for k, e in enumerate(es)]
    labels = bmm_jax.build_labels(bq)
    lab = {l.path: l for l in bmm_jax.labels.label_list(labels)}
    assert not lab["quant/w/kernel"].regressed                  # carried, never regressed
    res = bmm_jax.merge(bq, eq, "average", None, {"rho": 0.5})
    anchor = bmm_jax.anchors.average(bq, eq)
    np.testing.assert_array_equal(np.asarray(res.params["quant"]["w"]["kernel"]),
                                  np.asarray(anchor["quant"]["w"]["kernel"]))
    forced = jax.tree_util.tree_map(lambda l: l, labels, is_leaf=lambda x: isinstance(x, bmm_jax.labels.Label))
    import dataclasses
    forced["quant"]["w"]["kernel"] = dataclasses.replace(lab["quant/w/kernel"], regressed=True, kind="other",
                                                         layout="dense", d_in=3, d_out=4, input_group="x")
    with pytest.raises(ValueError, match=r"leaf 'quant/w/kernel' has dtype int8"):
        bmm_jax.merge(bq, eq, "average", None, {"rho": 0.5}, labels=forced)
