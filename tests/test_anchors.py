"""Tests of bmm_jax.anchors against independent numpy / scipy references and hand-computed cases."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bmm_jax.anchors as anchors
from bmm_jax.grams._base import Grams
from bmm_jax.labels import build_labels, regressed

K = 3
D, H = 8, 12
KERNELS = {
    "attn_q": "encoder/layer/0/attention/self/query/kernel",
    "mlp_in": "encoder/layer/0/intermediate/dense/kernel",
    "mlp_out": "encoder/layer/0/output/dense/kernel",
}


@pytest.fixture(autouse=True)
def _strict_promotion():
    with jax.numpy_dtype_promotion("strict"):
        yield


def _shapes(d=D, h=H):
    return {
        "embeddings": {"word_embeddings": {"embedding": (10, d)}},
        "encoder": {"layer": {"0": {
            "attention": {"self": {"query": {"kernel": (d, d), "bias": (d,)},
                                   "key": {"kernel": (d, d)},
                                   "value": {"kernel": (d, d)}},
                          "output": {"dense": {"kernel": (d, d)}}},
            "intermediate": {"dense": {"kernel": (d, h), "bias": (h,)}},
            "output": {"dense": {"kernel": (h, d)}, "LayerNorm": {"scale": (d,)}}}}},
    }


def _random_tree(rng, scale=1.0, shapes=None):
    return jax.tree_util.tree_map(lambda s: (scale * rng.standard_normal(s)).astype(np.float32),
                                  shapes or _shapes(), is_leaf=lambda x: isinstance(x, tuple))


def _setup(seed=0, k=K):
    rng = np.random.default_rng(seed)
    base = _random_tree(rng)
    experts = [jax.tree_util.tree_map(lambda b, t: b + t, base, _random_tree(rng, 0.1))
               for _ in range(k)]
    return base, experts


def _get(tree, path):
    for key in path.split("/"):
        tree = tree[key]
    return np.asarray(tree, np.float64)


def _taus(base, experts, path):
    b = _get(base, path)
    return np.stack([_get(e, path) - b for e in experts])


def _all_paths(tree):
    return [("/".join(str(getattr(k, "key", k)) for k in p))
            for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _check_like(out, base):
    assert jax.tree_util.tree_structure(out) == jax.tree_util.tree_structure(base)
    for o, b in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(base)):
        assert o.shape == np.shape(b) and o.dtype == np.asarray(b).dtype
        assert np.all(np.isfinite(np.asarray(o, np.float32)))


def _module_paths(base):
    return {l.path for l in regressed(build_labels(base))}


# ---------------------------------------------------------------------------------------------
# numpy references (float64)

def _np_polar(x):
    u, _, vt = np.linalg.svd(x, full_matrices=False)
    return u @ vt


def _np_tsv(t):
    k, m, n = t.shape
    rk = max(1, min(m, n) // k)
    us, ss, vs = [], [], []
    for tk in t:
        u, s, vt = np.linalg.svd(tk, full_matrices=False)
        us.append(u[:, :rk]), ss.append(s[:rk]), vs.append(vt[:rk])
    return _np_polar(np.concatenate(us, 1)) @ np.diag(np.concatenate(ss)) @ _np_polar(
        np.concatenate(vs, 0))


def _np_iso_cts(t, frac):
    x = np.swapaxes(t, 1, 2)  # the authors' [d_out, d_in] view
    k, m, n = x.shape
    r = min(m, n)
    c = int(r * frac)
    total = int(round((r - c) / k)) * k
    c = r - total
    p = total // k
    u, s, vt = np.linalg.svd(x.sum(0), full_matrices=False)
    uc = u[:, :c]
    us, ss, vs = [], [], []
    for xk in x:
        a, b, ct = np.linalg.svd(xk - uc @ uc.T @ xk, full_matrices=False)
        us.append(a[:, :p]), ss.append(b[:p]), vs.append(ct[:p])
    us.append(uc), ss.append(s[:c]), vs.append(vt[:c])
    sv = np.concatenate(ss)
    return (sv.mean() * _np_polar(np.concatenate(us, 1)) @ _np_polar(np.concatenate(vs, 0))).T


def _np_wudi_loss(tm, t):
    out = 0.0
    for tk in t:
        n2 = np.sum(tk * tk)
        if n2 > 0:
            out += np.sum(((tm - tk).T @ tk) ** 2) / n2
    return out


def _np_wudi_exact(t):
    """Min-norm least squares of the stacked problem min sum_k ||F_k^T (T_m - T_k)||^2."""
    rows, rhs = [], []
    for tk in t:
        n = np.linalg.norm(tk)
        if n > 0:
            f = tk / n
            rows.append(f.T), rhs.append(f.T @ tk)
    return np.linalg.lstsq(np.concatenate(rows), np.concatenate(rhs), rcond=None)[0]


def _np_adam(t, lr, steps, b1=0.9, b2=0.999, eps=1e-8):
    """PyTorch-style Adam on the WUDI loss, gradient from its definition."""
    tm = t.sum(0)
    m = np.zeros_like(tm)
    v = np.zeros_like(tm)
    for i in range(1, steps + 1):
        g = sum(2 * tk @ (tk.T @ (tm - tk)) / np.sum(tk * tk) for tk in t if np.any(tk))
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        tm = tm - lr * (m / (1 - b1 ** i)) / (np.sqrt(v / (1 - b2 ** i)) + eps)
    return tm


def _np_ties_leaf(t, density):
    k, n = t.shape[0], t[0].size
    flat = t.reshape(k, n)
    keep = max(1, int(density * n + 1e-9))
    trimmed = np.zeros_like(flat)
    for i in range(k):
        thr = np.sort(np.abs(flat[i]))[n - keep]
        trimmed[i] = np.where(np.abs(flat[i]) >= thr, flat[i], 0)
    sign = np.sign(trimmed.sum(0))
    sign[sign == 0] = np.sign(sign.sum())
    agree = np.where(sign > 0, trimmed > 0, trimmed < 0)
    merged = (trimmed * agree).sum(0) / np.maximum(agree.sum(0), 1)
    return merged.reshape(t.shape[1:])


# ---------------------------------------------------------------------------------------------
# simple merges

def test_average_and_task_arithmetic():
    base, experts = _setup()
    avg = anchors.average(base, experts)
    ta = anchors.task_arithmetic(base, experts, scale=0.3)
    _check_like(avg, base), _check_like(ta, base)
    for p in _all_paths(base):
        t = _taus(base, experts, p)
        np.testing.assert_allclose(_get(avg, p), np.mean([_get(e, p) for e in experts], 0),
                                   atol=1e-6)
        np.testing.assert_allclose(_get(ta, p), _get(base, p) + 0.3 * t.sum(0), atol=1e-6)


def test_unknown_name_and_registry():
    assert set(anchors.ANCHORS) == {"average", "task_arithmetic", "ties", "tsv", "iso_c",
                                    "iso_cts", "wudi", "regmean"}
    assert anchors.get("tsv") is anchors.tsv
    with pytest.raises(ValueError, match=r"unknown anchor method 'foo'; known: average, "):
        anchors.get("foo")


def test_validation_errors():
    base, experts = _setup()
    with pytest.raises(ValueError, match="at least 2"):
        anchors.average(base, experts[:1])
    bad = jax.tree_util.tree_map(lambda x: x, experts[1])
    bad["encoder"]["layer"]["0"]["output"]["dense"]["kernel"] = np.full((H, D), np.nan, np.float32)
    with pytest.raises(ValueError, match="output/dense/kernel"):
        anchors.tsv(base, [experts[0], bad])
    with pytest.raises(ValueError, match="density"):
        anchors.ties(base, experts, density=0.0)
    with pytest.raises(ValueError, match="common_fraction"):
        anchors.iso_cts(base, experts, common_fraction=1.5)
    other_labels = build_labels(_random_tree(np.random.default_rng(0), shapes=_shapes(d=6)))
    with pytest.raises(ValueError, match="does not fit"):
        anchors.iso_c(base, experts, labels=other_labels)


# ---------------------------------------------------------------------------------------------
# TIES

def test_ties_hand_example():
    z5, z4 = np.zeros(5, np.float32), np.zeros(4, np.float32)
    base = {"w": z5 + 1.0, "v": z4}
    t_w = [[3, -1, 0.5, 2, -4], [-2, 1, 1, -3, 1], [1.5, 0.2, -2, 1, -0.5]]
    t_v = [[1, 5, 0, 0], [-1, 0, 0, 6], [0, 0, 7, 0]]
    experts = [{"w": z5 + 1.0 + np.float32(w), "v": z4 + np.float32(v)} for w, v in zip(
        np.asarray(t_w, np.float32), np.asarray(t_v, np.float32))]
    out = anchors.ties(base, experts, scale=1.0, density=0.4)
    # w: keep 2 per task -> [3,0,0,0,-4], [-2,0,0,-3,0], [1.5,0,-2,0,0]; signs + 0 - - -,
    # the zero sign is resolved by the majority (-) and has no agreeing entry.
    np.testing.assert_allclose(out["w"], 1.0 + np.array([2.25, 0, -2, -3, -4]), atol=1e-6)
    # v: keep 1 per task (int(0.4*4)=1) -> [0,5,0,0], [0,0,0,6], [0,0,7,0]
    np.testing.assert_allclose(out["v"], [0, 5, 7, 6], atol=1e-6)
    out = anchors.ties(base, experts, scale=0.5, density=0.5)
    # v with 2 kept: [1,5,0,0], [-1,0,0,6], [0,0,7,0]; entry 0 sums to 0 -> majority sign +
    np.testing.assert_allclose(out["v"], 0.5 * np.array([1, 5, 7, 6]), atol=1e-6)


def test_ties_random_vs_numpy():
    base, experts = _setup(1)
    out = anchors.ties(base, experts, scale=0.7, density=0.3)
    _check_like(out, base)
    for p in _all_paths(base):
        ref = _get(base, p) + 0.7 * _np_ties_leaf(_taus(base, experts, p), 0.3)
        np.testing.assert_allclose(_get(out, p), ref, atol=1e-6)


def test_ties_kth_largest_exact_with_ties():
    from bmm_jax.anchors.ties import kth_largest_abs
    rng = np.random.default_rng(3)
    x = np.round(rng.standard_normal((4, 1000)), 1).astype(np.float32)  # many ties
    x[1] = 0.0
    x[2, :5] = [np.inf, -1e30, 1e-40, -0.0, 3.0]  # extreme values (validation forbids inf, but
    for k in (1, 7, 250, 1000):                     # the bisection itself handles them)
        ref = -np.sort(-np.abs(x), axis=1)[:, k - 1]
        np.testing.assert_array_equal(np.asarray(kth_largest_abs(jnp.asarray(x), k))[:, 0], ref)


# ---------------------------------------------------------------------------------------------
# TSV-M, Iso-C, Iso-CTS

def test_tsv_vs_numpy():
    base, experts = _setup(2)
    out = anchors.tsv(base, experts, scale=0.8)
    _check_like(out, base)
    mods = _module_paths(base)
    for p in _all_paths(base):
        t = _taus(base, experts, p)
        merged = _np_tsv(t) if p in mods else t.mean(0)
        np.testing.assert_allclose(_get(out, p), _get(base, p) + 0.8 * merged, atol=2e-5)


def test_iso_c_flat_spectrum_same_vectors():
    base, experts = _setup(3)
    out = anchors.iso_c(base, experts, scale=1.0)
    _check_like(out, base)
    mods = _module_paths(base)
    for p in _all_paths(base):
        t = _taus(base, experts, p)
        delta = _get(out, p) - _get(base, p)
        if p not in mods:
            np.testing.assert_allclose(delta, t.mean(0), atol=1e-6)
            continue
        u, s, vt = np.linalg.svd(t.sum(0), full_matrices=False)
        sv = np.linalg.svd(delta, compute_uv=False)
        np.testing.assert_allclose(sv, np.full_like(sv, s.mean()), rtol=1e-4)
        np.testing.assert_allclose(delta, s.mean() * u @ vt, atol=2e-5)


def test_iso_cts_vs_numpy():
    base, experts = _setup(4)
    for frac in (0.8, 0.5):
        out = anchors.iso_cts(base, experts, scale=0.9, common_fraction=frac)
        _check_like(out, base)
        mods = _module_paths(base)
        for p in _all_paths(base):
            t = _taus(base, experts, p)
            merged = _np_iso_cts(t, frac) if p in mods else t.mean(0)
            np.testing.assert_allclose(_get(out, p), _get(base, p) + 0.9 * merged, atol=2e-5)
            if p in mods:  # isotropic: all singular values equal
                sv = np.linalg.svd(merged, compute_uv=False)
                np.testing.assert_allclose(sv, sv[0], rtol=1e-4)
    # common_fraction = 1: no task-specific part, Iso-C
    a = anchors.iso_cts(base, experts, common_fraction=1.0)
    b = anchors.iso_c(base, experts)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_allclose(x, y, atol=2e-5)


def test_iso_cts_sizes():
    from bmm_jax.anchors.iso import iso_cts_sizes
    # r = 16, K = 3: c0 = 12, round(4/3) = 1 -> c = 13, p = 1
    assert iso_cts_sizes(16, 64, 3, 0.8) == (13, 1)
    assert iso_cts_sizes(768, 768, 8, 0.8) == (616, 19)
    assert iso_cts_sizes(6, 6, 8, 0.8) == (6, 0)
    assert iso_cts_sizes(3, 3, 2, 0.0) == (1, 1)   # capped so that c >= 0
    for d_in, d_out, k, f in [(12, 8, 3, 0.8), (8, 12, 4, 0.3), (5, 9, 2, 0.0)]:
        c, p = iso_cts_sizes(d_in, d_out, k, f)
        assert c >= 0 and p >= 0 and c + k * p == min(d_in, d_out)


# ---------------------------------------------------------------------------------------------
# WUDI

def test_wudi_exact_is_the_minimiser():
    base, experts = _setup(5)
    out = anchors.wudi(base, experts, exact=True)
    _check_like(out, base)
    mods = _module_paths(base)
    for p in _all_paths(base):
        t = _taus(base, experts, p)
        delta = _get(out, p) - _get(base, p)
        if p not in mods:
            np.testing.assert_array_equal(delta, 0.0)   # carried from theta_0
            continue
        ref = _np_wudi_exact(t)
        np.testing.assert_allclose(delta, ref, atol=1e-4 * np.abs(ref).max())
        assert _np_wudi_loss(delta, t) < _np_wudi_loss(t.sum(0), t)
        # autodiff gradient of the loss (defined independently) vanishes at the optimum
        tj = jnp.asarray(t, jnp.float32)
        loss = lambda tm: sum(jnp.sum(((tm - tk).T @ tk) ** 2) / jnp.sum(tk * tk) for tk in tj)
        g = jax.grad(loss)(jnp.asarray(delta, jnp.float32))
        g0 = jax.grad(loss)(jnp.sum(tj, 0))
        assert float(jnp.linalg.norm(g)) < 1e-3 * float(jnp.linalg.norm(g0))


def test_wudi_exact_singular_min_norm():
    # d_in = 12 > K * d_out = 6: S is rank 6, the min-norm solution lies in its range
    rng = np.random.default_rng(6)
    base = {"block": {"0": {"mlp": {"kernel": rng.standard_normal((12, 2)).astype(np.float32)}}}}
    experts = [{"block": {"0": {"mlp": {"kernel": base["block"]["0"]["mlp"]["kernel"]
                                        + rng.standard_normal((12, 2)).astype(np.float32)}}}}
               for _ in range(K)]
    out = anchors.wudi(base, experts, exact=True)
    p = "block/0/mlp/kernel"
    t = _taus(base, experts, p)
    delta = _get(out, p) - _get(base, p)
    np.testing.assert_allclose(delta, _np_wudi_exact(t), atol=1e-4)


def test_wudi_adam_matches_numpy_adam_and_converges():
    base, experts = _setup(7)
    mods = sorted(_module_paths(base))
    out = anchors.wudi(base, experts)                   # faithful default: lr 1e-5, 300 steps
    _check_like(out, base)
    for p in mods:
        t = _taus(base, experts, p)
        delta = _get(out, p) - _get(base, p)
        np.testing.assert_allclose(delta, _np_adam(t, 1e-5, 300), atol=2e-6)
        assert _np_wudi_loss(delta, t) < _np_wudi_loss(t.sum(0), t)
    far = anchors.wudi(base, experts, lr=3e-3, steps=3000)
    for p in mods:
        t = _taus(base, experts, p)
        exact = _np_wudi_exact(t)
        l_far = _np_wudi_loss(_get(far, p) - _get(base, p), t)
        l_opt, l_init = _np_wudi_loss(exact, t), _np_wudi_loss(t.sum(0), t)
        assert l_far - l_opt < 1e-3 * (l_init - l_opt)


def test_wudi_stacking_and_chunking_do_not_change_result():
    base, experts = _setup(8)
    a = anchors.wudi(base, experts, lr=1e-3, steps=50)
    b = anchors.wudi(base, experts, lr=1e-3, steps=50, max_stack_elements=1)  # one per chunk
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_allclose(x, y, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# RegMean

def _random_grams(base, seed=0, n=20):
    rng = np.random.default_rng(seed)
    dense, key_of = {}, {}
    for l in regressed(build_labels(base)):
        x = rng.standard_normal((K, n, l.d_in)).astype(np.float32)
        dense[l.path] = jnp.asarray(np.einsum("kni,knj->kij", x, x) / n)
        key_of[l.path] = l.path
    return Grams(dense, key_of)


def test_regmean_vs_numpy():
    base, experts = _setup(9)
    grams = _random_grams(base)
    mods = _module_paths(base)
    for alpha in (0.95, 1.0, 0.0):
        out = anchors.regmean(base, experts, grams, alpha=alpha)
        _check_like(out, base)
        for p in _all_paths(base):
            t = _taus(base, experts, p)
            if p not in mods:
                ref = t.mean(0)
            else:
                g = np.asarray(grams[p], np.float64)
                off = ~np.eye(g.shape[-1], dtype=bool)
                gt = np.where(off, alpha * g, g)
                if alpha == 1.0:
                    assert np.array_equal(gt, g)
                ref = np.linalg.solve(gt.sum(0), np.einsum("kij,kjo->io", gt, t))
            np.testing.assert_allclose(_get(out, p) - _get(base, p), ref, atol=2e-5)


def test_regmean_missing_module_and_bad_shape():
    base, experts = _setup(10)
    grams = dict(_random_grams(base))
    missing = KERNELS["mlp_out"]
    del grams[missing]
    with pytest.raises(ValueError, match=missing):
        anchors.regmean(base, experts, grams)
    grams[missing] = jnp.zeros((K, 5, 5), jnp.float32)
    with pytest.raises(ValueError, match="shape"):
        anchors.regmean(base, experts, grams)


# ---------------------------------------------------------------------------------------------
# cross-cutting: zero task vectors, dtypes, jit vs no-jit, GPT-2

def _all_anchor_calls(base, experts, grams, **wudi_kw):
    return {
        "average": anchors.average(base, experts),
        "task_arithmetic": anchors.task_arithmetic(base, experts),
        "ties": anchors.ties(base, experts),
        "tsv": anchors.tsv(base, experts),
        "iso_c": anchors.iso_c(base, experts),
        "iso_cts": anchors.iso_cts(base, experts),
        "wudi": anchors.wudi(base, experts, **wudi_kw),
        "wudi_exact": anchors.wudi(base, experts, exact=True),
        "regmean": anchors.regmean(base, experts, grams),
    }


def test_zero_task_vectors():
    base, experts = _setup(11)
    grams = _random_grams(base)
    # every expert equals the base: every anchor returns the base exactly, no NaN
    same = [jax.tree_util.tree_map(np.copy, base) for _ in range(K)]
    for name, out in _all_anchor_calls(base, same, grams, steps=5).items():
        for x, y in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(base)):
            np.testing.assert_array_equal(np.asarray(x), y, err_msg=name)
    # one expert left everything unchanged: it contributes nothing to WUDI (not 0/0)
    mixed = [experts[0], experts[1], jax.tree_util.tree_map(np.copy, base)]
    for name, out in _all_anchor_calls(base, mixed, grams, steps=5).items():
        _check_like(out, base)
    two = anchors.wudi(base, experts[:2], exact=True)
    three = anchors.wudi(base, mixed, exact=True)
    for p in _module_paths(base):
        np.testing.assert_allclose(_get(three, p), _get(two, p), atol=1e-5)


def test_dtypes_kept_bfloat16():
    base, experts = _setup(12)
    to_bf16 = lambda t: jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.bfloat16), t)
    bb, eb = to_bf16(base), [to_bf16(e) for e in experts]
    grams = _random_grams(base)
    for name, out in _all_anchor_calls(bb, eb, grams, steps=5).items():
        for o in jax.tree_util.tree_leaves(out):
            assert o.dtype == jnp.bfloat16, name
            assert np.all(np.isfinite(np.asarray(o, np.float32))), name
    ref = anchors.iso_c(base, experts)
    got = anchors.iso_c(bb, eb)
    p = KERNELS["mlp_in"]
    np.testing.assert_allclose(_get(got, p), _get(ref, p), atol=0.05)


def test_jit_vs_no_jit():
    rng = np.random.default_rng(13)
    shapes = {"h": {"0": {"mlp": {"kernel": (6, 4), "bias": (4,)}}}}
    base = _random_tree(rng, shapes=shapes)
    experts = [jax.tree_util.tree_map(lambda b, t: b + t, base, _random_tree(rng, 0.1, shapes))
               for _ in range(K)]
    fns = {"ties": lambda: anchors.ties(base, experts, density=0.3),
           "tsv": lambda: anchors.tsv(base, experts),
           "iso_cts": lambda: anchors.iso_cts(base, experts),
           "wudi": lambda: anchors.wudi(base, experts, lr=1e-3, steps=10)}
    for name, f in fns.items():
        a = f()
        with jax.disable_jit():
            b = f()
        for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
            np.testing.assert_allclose(x, y, atol=1e-5, err_msg=name)


def test_gpt2_tiny_every_anchor():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=50, n_positions=16)
    with jax.numpy_dtype_promotion("standard"):
        model = transformers.FlaxGPT2Model(cfg, _do_init=False)
    ids, mask, pos = jnp.arange(8)[None], jnp.ones((1, 8), jnp.int32), jnp.arange(8)[None]
    with jax.numpy_dtype_promotion("standard"):       # transformers' own code is not strict-safe
        shapes = jax.eval_shape(lambda r: model.module.init(r, ids, mask, pos)["params"],
                                jax.random.PRNGKey(0))
    rng = np.random.default_rng(14)
    base = jax.tree_util.tree_map(
        lambda s: jnp.asarray(0.2 * rng.standard_normal(s.shape), s.dtype), shapes)
    experts = [jax.tree_util.tree_map(
        lambda x: x + jnp.asarray(0.02 * rng.standard_normal(x.shape), x.dtype), base)
        for _ in range(K)]
    labels = build_labels(base)
    mods = regressed(labels)
    assert len(mods) == 8 and any(l.layout == "transposed" for l in mods)
    grams = {}
    for l in mods:
        x = rng.standard_normal((K, 32, l.d_in)).astype(np.float32)
        grams[l.path] = jnp.asarray(np.einsum("kni,knj->kij", x, x) / 32)
    outs = _all_anchor_calls(base, experts, grams, steps=20)
    for name, out in outs.items():
        _check_like(out, base)
    with jax.numpy_dtype_promotion("standard"):
        out = model.module.apply({"params": outs["tsv"]}, ids, mask, pos)[0]
        assert np.all(np.isfinite(np.asarray(out)))
    # the transposed Conv1D kernel [d_out, d_in] is merged in its [d_in, d_out] view
    p = "h/0/attn/c_attn/kernel"
    t = np.swapaxes(_taus(base, experts, p), 1, 2)            # [K, d_in=16, d_out=48]
    delta = _get(outs["wudi_exact"], p) - _get(base, p)
    ref = _np_wudi_exact(t)
    np.testing.assert_allclose(delta.T, ref, atol=1e-4 * np.abs(ref).max())
    delta = _get(outs["iso_cts"], p) - _get(base, p)
    np.testing.assert_allclose(delta.T, _np_iso_cts(t, 0.8), atol=2e-5)
    g = np.asarray(grams[p], np.float64)
    g = np.where(np.eye(16, dtype=bool), g, 0.95 * g)
    delta = _get(outs["regmean"], p) - _get(base, p)
    ref = np.linalg.solve(g.sum(0), np.einsum("kij,kjo->io", g, t))
    np.testing.assert_allclose(delta.T, ref, atol=2e-5)
