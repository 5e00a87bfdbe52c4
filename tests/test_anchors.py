"""Tests of bmm_jax.anchors against independent numpy references (tests/test_anchors_refs.py) and
hand-computed cases: eagerly, inside jax.jit, jax.vmap (over stacked expert sets and over
hyper-parameters) and lax.scan (over anchor scales)."""
from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bmm_jax.anchors as anchors
from bmm_jax.grams._base import Grams
from bmm_jax.labels import build_labels, regressed
from test_anchors_refs import (flat, reference, task_vectors, wudi_cond, wudi_exact_reference,
                               wudi_loss)

K = 3
D, H = 8, 12
KERNELS = {
    "attn_q": "encoder/layer/0/attention/self/query/kernel",
    "mlp_in": "encoder/layer/0/intermediate/dense/kernel",
    "mlp_out": "encoder/layer/0/output/dense/kernel",
}
EMBED = "embeddings/word_embeddings/embedding"


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


def _setup(seed=0, k=K, shapes=None):
    rng = np.random.default_rng(seed)
    base = _random_tree(rng, shapes=shapes)
    experts = [jax.tree_util.tree_map(lambda b, t: b + t, base, _random_tree(rng, 0.1, shapes))
               for _ in range(k)]
    return base, experts


def _module_paths(base):
    return [l.path for l in regressed(build_labels(base))]


def _random_grams(base, seed=0, n=20, k=K):
    rng = np.random.default_rng(seed)
    dense, key_of = {}, {}
    for l in regressed(build_labels(base)):
        x = rng.standard_normal((k, n, l.d_in)).astype(np.float32)
        dense[l.path] = jnp.asarray(np.einsum("kni,knj->kij", x, x) / n)
        key_of[l.path] = l.path
    return Grams(dense, key_of)


def _check_like(out, base):
    assert jax.tree_util.tree_structure(out) == jax.tree_util.tree_structure(base)
    for o, b in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(base)):
        assert o.shape == np.shape(b) and o.dtype == np.asarray(b).dtype
        assert np.all(np.isfinite(np.asarray(o, np.float32)))


def _assert_close(got: dict, ref: dict, atol, what=""):
    for p, r in ref.items():
        np.testing.assert_allclose(np.asarray(got[p], np.float64), r, atol=atol, rtol=0,
                                   err_msg=f"{what} {p}")


# (anchor, options, tolerance) of every anchor; the grams of RegMean are added per test.
CASES = {
    "average": ("average", {}, 1e-6),
    "task_arithmetic": ("task_arithmetic", {}, 1e-6),
    "ties": ("ties", {"density": 0.3}, 1e-6),
    "ties_leaf": ("ties", {"density": 0.3, "trim": "leaf"}, 1e-6),
    "tsv": ("tsv", {}, 2e-5),
    "tsv_labels": ("tsv", {"modules": "labels"}, 2e-5),
    "iso_c": ("iso_c", {}, 2e-5),
    "iso_cts": ("iso_cts", {}, 2e-5),
    "iso_cts_half": ("iso_cts", {"common_fraction": 0.5, "modules": "labels"}, 2e-5),
    "wudi": ("wudi", {"lr": 1e-3, "steps": 20}, 2e-6),
    "wudi_exact": ("wudi", {"exact": True}, 1e-4),
    "regmean": ("regmean", {"alpha": 0.9}, 2e-5),
}


def _case(case, base):
    name, opts, tol = CASES[case]
    opts = dict(opts)
    if name == "regmean":
        opts["grams"] = _random_grams(base)
    return name, anchors.get(name), opts, tol


def _ref(name, base, experts, **kw):
    return reference(name, base, experts, regressed=_module_paths(base), **kw)


def _stack(trees):
    return jax.tree_util.tree_map(lambda *x: jnp.stack(x), *trees)


def _unstack(tree, j):
    return jax.tree_util.tree_map(lambda x: x[j], tree)


# ---------------------------------------------------------------------------------------------
# every anchor against its reference: eager, jit, vmap over expert sets, scan over anchor scales

@pytest.mark.parametrize("case", list(CASES))
def test_anchor_vs_reference_eager(case):
    base, experts = _setup(1)
    name, fn, opts, tol = _case(case, base)
    out = fn(base, experts, anchor_scale=0.7, **opts)
    _check_like(out, base)
    ref = _ref(name, base, experts, anchor_scale=0.7, **opts)
    _assert_close(flat(out), ref, tol)


@pytest.mark.parametrize("case", [c for c in CASES if c not in ("ties_leaf", "tsv_labels", "iso_cts_half")])
def test_anchor_under_jit_vmap_scan(case):
    base, experts = _setup(2)
    base2, experts2 = _setup(3)
    name, fn, opts, tol = _case(case, base)
    ref1 = _ref(name, base, experts, **opts)
    ref2 = _ref(name, base2, experts2, **opts)
    # jit, the anchor scale traced
    out = jax.jit(lambda b, e, s: fn(b, e, anchor_scale=s, **opts))(base, experts, 0.6)
    _check_like(out, base)
    _assert_close(flat(out), _ref(name, base, experts, anchor_scale=0.6, **opts), tol, "jit")
    # vmap over two stacked expert sets (RegMean: the same Grams for both)
    out = jax.vmap(lambda b, e: fn(b, e, **opts))(_stack([base, base2]),
                                                 [_stack([a, b]) for a, b in zip(experts, experts2)])
    _assert_close(flat(_unstack(out, 0)), ref1, tol, "vmap 0")
    _assert_close(flat(_unstack(out, 1)), ref2, tol, "vmap 1")
    # scan over anchor scales
    scales = jnp.asarray([0.5, 1.25], jnp.float32)
    _, outs = jax.lax.scan(lambda c, s: (c, fn(base, experts, anchor_scale=s, **opts)), None, scales)
    for j, s in enumerate((0.5, 1.25)):
        _assert_close(flat(_unstack(outs, j)), _ref(name, base, experts, anchor_scale=s, **opts),
                      tol * 2, f"scan {s}")


def test_vmap_over_anchor_scale_and_hyperparameters():
    base, experts = _setup(4)
    mods = _module_paths(base)
    scales = jnp.asarray([0.2, 0.9], jnp.float32)
    out = jax.vmap(lambda s: anchors.task_arithmetic(base, experts, anchor_scale=s))(scales)
    for j, s in enumerate((0.2, 0.9)):
        _assert_close(flat(_unstack(out, j)), _ref("task_arithmetic", base, experts, anchor_scale=s), 1e-6)
    # WUDI learning rate traced (vmap), RegMean alpha traced (jit)
    lrs = jnp.asarray([1e-3, 3e-3], jnp.float32)
    out = jax.vmap(lambda lr: anchors.wudi(base, experts, lr=lr, steps=10))(lrs)
    for j, lr in enumerate((1e-3, 3e-3)):
        ref = _ref("wudi", base, experts, lr=lr, steps=10)
        _assert_close(flat(_unstack(out, j)), {p: ref[p] for p in mods}, 2e-6, f"lr {lr}")
    grams = _random_grams(base)
    out = jax.jit(lambda a: anchors.regmean(base, experts, grams=grams, alpha=a))(jnp.float32(0.5))
    _assert_close(flat(out), _ref("regmean", base, experts, grams=grams, alpha=0.5), 2e-5)


# ---------------------------------------------------------------------------------------------
# calling convention

def test_registry_and_defaults():
    assert set(anchors.ANCHORS) == {"average", "task_arithmetic", "ties", "tsv", "iso_c",
                                    "iso_cts", "wudi", "regmean"}
    assert anchors.get("tsv") is anchors.tsv
    with pytest.raises(ValueError, match=r"unknown anchor method 'foo'; known: average, "):
        anchors.get("foo")
    assert anchors.default_anchor_scale("task_arithmetic") == 0.3
    assert all(anchors.default_anchor_scale(n) == 1.0 for n in anchors.ANCHORS if n != "task_arithmetic")


def test_keyword_only_options_and_deprecated_scale():
    base, experts = _setup(5)
    grams = _random_grams(base)
    for name in anchors.ANCHORS:
        fn = anchors.get(name)
        with pytest.raises(TypeError, match=rf"{name}\(base, experts, \*, \.\.\.\) takes its options as "
                                            r"keywords only \((grams, )?labels, anchor_scale"):
            fn(base, experts, 0.5)
    with pytest.raises(TypeError, match=r"keywords only .*grams.*extra positional argument\(s\) \(Grams\)"):
        anchors.regmean(base, experts, grams)
    with pytest.raises(TypeError, match="unexpected keyword argument 'densiti'"):
        anchors.ties(base, experts, densiti=0.2)
    with pytest.warns(DeprecationWarning, match="anchor_scale"):
        old = anchors.task_arithmetic(base, experts, scale=0.5)
    new = anchors.task_arithmetic(base, experts, anchor_scale=0.5)
    for x, y in zip(jax.tree_util.tree_leaves(old), jax.tree_util.tree_leaves(new)):
        np.testing.assert_array_equal(x, y)
    with pytest.raises(TypeError, match="anchor_scale only"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            anchors.ties(base, experts, scale=0.5, anchor_scale=0.5)
    # labels= is accepted (and validated) by every anchor
    labels = build_labels(base)
    anchors.average(base, experts, labels=labels)
    other = build_labels(_random_tree(np.random.default_rng(0), shapes=_shapes(d=6)))
    for name in ("average", "ties", "iso_c"):
        with pytest.raises(ValueError, match="does not fit"):
            anchors.get(name)(base, experts, labels=other)


def test_validation_errors():
    base, experts = _setup(6)
    with pytest.raises(ValueError, match="at least 2"):
        anchors.average(base, experts[:1])
    bad = jax.tree_util.tree_map(lambda x: x, experts[1])
    bad["encoder"]["layer"]["0"]["output"]["dense"]["kernel"] = np.full((H, D), np.nan, np.float32)
    with pytest.raises(ValueError, match="output/dense/kernel"):
        anchors.tsv(base, [experts[0], bad])
    with pytest.raises(ValueError, match="density"):
        anchors.ties(base, experts, density=0.0)
    with pytest.raises(ValueError, match="trim"):
        anchors.ties(base, experts, trim="tensor")
    with pytest.raises(ValueError, match="modules"):
        anchors.tsv(base, experts, modules="kernels")
    with pytest.raises(ValueError, match="common_fraction"):
        anchors.iso_cts(base, experts, common_fraction=1.5)
    with pytest.raises(ValueError, match="anchor_scale must be finite"):
        anchors.tsv(base, experts, anchor_scale=float("nan"))
    with pytest.raises(ValueError, match="lr must be > 0"):
        anchors.wudi(base, experts, lr=0.0)
    with pytest.raises(ValueError, match="alpha must be <= 1"):
        anchors.regmean(base, experts, grams=_random_grams(base), alpha=1.5)
    with pytest.raises(ValueError, match="anchor_scale must be a scalar"):
        anchors.average(base, experts, anchor_scale=jnp.ones(2))
    # options that fix shapes or control flow cannot be traced
    with pytest.raises(TypeError, match="density fixes shapes"):
        jax.jit(lambda d: anchors.ties(base, experts, density=d))(0.2)
    # static checks also raise at trace time
    with pytest.raises(ValueError, match="shape"):
        jax.jit(lambda b, e: anchors.tsv(b, e))(base, [experts[0], _setup(0, shapes=_shapes(d=6))[0]])


# ---------------------------------------------------------------------------------------------
# TIES

def _hand_ties():
    z5, z4 = np.zeros(5, np.float32), np.zeros(4, np.float32)
    base = {"w": z5 + 1.0, "v": z4}
    t_w = [[3, -1, 0.5, 2, -4], [-2, 1, 1, -3, 1], [1.5, 0.2, -2, 1, -0.5]]
    t_v = [[1, 5, 0, 0], [-1, 0, 0, 6], [0, 0, 7, 0]]
    experts = [{"w": z5 + 1.0 + np.float32(w), "v": z4 + np.float32(v)} for w, v in zip(
        np.asarray(t_w, np.float32), np.asarray(t_v, np.float32))]
    return base, experts


def test_ties_whole_model_hand_example():
    base, experts = _hand_ties()
    out = anchors.ties(base, experts, density=0.4)
    # n = 9: keep floor(3.6) + 1 = 4 per task over the whole model (ties at the threshold kept):
    # task 1 >= 2: w [3,0,0,2,-4] v [0,5,0,0]; task 2 >= 1: w [-2,1,1,-3,1] v [-1,0,0,6];
    # task 3 >= 1: w [1.5,0,-2,1,0] v [0,0,7,0]. Sums w [2.5,1,-1,0,-3] v [-1,5,7,6]; the
    # model's signs sum to 2, so w[3] is elected + (mean of 2 and 1).
    np.testing.assert_allclose(out["w"], 1.0 + np.array([2.25, 1, -2, 1.5, -4]), atol=1e-6)
    np.testing.assert_allclose(out["v"], [-1, 5, 7, 6], atol=1e-6)
    # density 1 keeps everything: the disjoint mean of all task vectors
    # density 1 keeps everything: v sums to [0, 5, 7, 6]; the model's signs (w: + + - 0 -,
    # v: 0 + + +) sum to 3, so v[0] is elected + (only 1 agrees)
    out = anchors.ties(base, experts, density=1.0, anchor_scale=0.5)
    np.testing.assert_allclose(out["v"], 0.5 * np.array([1, 5, 7, 6]), atol=1e-6)


def test_ties_leaf_hand_example():
    base, experts = _hand_ties()
    out = anchors.ties(base, experts, anchor_scale=1.0, density=0.4, trim="leaf")
    # w: keep 2 per task -> [3,0,0,0,-4], [-2,0,0,-3,0], [1.5,0,-2,0,0]; signs + 0 - - -,
    # the zero sign is resolved by the leaf's majority (-) and has no agreeing entry.
    np.testing.assert_allclose(out["w"], 1.0 + np.array([2.25, 0, -2, -3, -4]), atol=1e-6)
    # v: keep 1 per task (int(0.4*4)=1) -> [0,5,0,0], [0,0,0,6], [0,0,7,0]
    np.testing.assert_allclose(out["v"], [0, 5, 7, 6], atol=1e-6)
    out = anchors.ties(base, experts, anchor_scale=0.5, density=0.5, trim="leaf")
    # v with 2 kept: [1,5,0,0], [-1,0,0,6], [0,0,7,0]; entry 0 sums to 0 -> majority sign +
    np.testing.assert_allclose(out["v"], 0.5 * np.array([1, 5, 7, 6]), atol=1e-6)


def test_ties_threshold_keeps_floor_plus_one_over_the_model():
    base, experts = _setup(7)
    taus = {p: t for p, t in task_vectors(flat(base), [flat(e) for e in experts]).items()}
    n = sum(t[0].size for t in taus.values())
    for density in (0.05, 0.2, 0.5):
        out = flat(anchors.ties(base, experts, density=density))
        ref = _ref("ties", base, experts, density=density)
        _assert_close(out, ref, 1e-6)
        # distinct random magnitudes: exactly floor(density n) + 1 entries survive per task
        kept = [sum(int(np.sum(np.abs(t[k]) >= np.sort(np.abs(np.concatenate(
            [x[k].ravel() for x in taus.values()])))[::-1][int(density * n)])) for t in taus.values())
            for k in range(K)]
        assert kept == [int(density * n) + 1] * K


def test_ties_kth_largest_exact_with_ties():
    from bmm_jax.anchors.ties import kth_largest_abs
    rng = np.random.default_rng(3)
    x = np.round(rng.standard_normal((4, 1000)), 1).astype(np.float32)  # many ties
    x[1] = 0.0
    x[2, :5] = [np.inf, -1e30, 1e-40, -0.0, 3.0]  # extreme values (validation forbids inf, but
    for k in (1, 7, 250, 1000):                     # the selection itself handles them)
        ref = -np.sort(-np.abs(x), axis=1)[:, k - 1]
        np.testing.assert_array_equal(np.asarray(kth_largest_abs(jnp.asarray(x), k))[:, 0], ref)
    ks = jnp.asarray([1, 10, 500, 999], jnp.int32)      # one rank per row, traced
    got = jax.jit(kth_largest_abs)(jnp.asarray(x), ks)
    ref = [-np.sort(-np.abs(x[i]))[int(k) - 1] for i, k in enumerate(ks)]
    np.testing.assert_array_equal(np.asarray(got)[:, 0], ref)


# ---------------------------------------------------------------------------------------------
# TSV-M, Iso-C, Iso-CTS: which leaves are matrices

def test_matrix_leaves_all_2d_by_default():
    base, experts = _setup(8)
    t_emb = task_vectors(flat(base), [flat(e) for e in experts])[EMBED]
    for name in ("tsv", "iso_c", "iso_cts"):
        fn = anchors.get(name)
        default = flat(fn(base, experts))[EMBED] - flat(base)[EMBED]
        only = flat(fn(base, experts, modules="labels"))[EMBED] - flat(base)[EMBED]
        np.testing.assert_allclose(only, t_emb.mean(0), atol=1e-6)     # mean task vector
        assert np.abs(default - t_emb.mean(0)).max() > 1e-2            # merged as a matrix
    sv = np.linalg.svd(flat(anchors.iso_c(base, experts))[EMBED] - flat(base)[EMBED], compute_uv=False)
    np.testing.assert_allclose(sv, sv[0], rtol=1e-4)                    # isotropic spectrum


def test_iso_cts_sizes_and_limits():
    from bmm_jax.anchors.iso import iso_cts_sizes
    # r = 16, K = 3: c0 = 12, round(4/3) = 1 -> c = 13, p = 1
    assert iso_cts_sizes(16, 64, 3, 0.8) == (13, 1)
    assert iso_cts_sizes(768, 768, 8, 0.8) == (616, 19)
    assert iso_cts_sizes(6, 6, 8, 0.8) == (6, 0)
    assert iso_cts_sizes(3, 3, 2, 0.0) == (1, 1)   # capped so that c >= 0
    for d_in, d_out, k, f in [(12, 8, 3, 0.8), (8, 12, 4, 0.3), (5, 9, 2, 0.0)]:
        c, p = iso_cts_sizes(d_in, d_out, k, f)
        assert c >= 0 and p >= 0 and c + k * p == min(d_in, d_out)
    base, experts = _setup(9)
    a = anchors.iso_cts(base, experts, common_fraction=1.0)   # no task-specific part: Iso-C
    b = anchors.iso_c(base, experts)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_allclose(x, y, atol=2e-5)


def test_svd_routes_when_gram_is_ill_conditioned():
    # task kernels whose spectra fall fast (1, then 1e-3): the Gram routes would lose float32
    # accuracy, so TSV-M, Iso-C and Iso-CTS take their SVD routes (on device); the results still
    # match the references.
    rng = np.random.default_rng(10)
    shapes = {"layer": {"0": {"mlp": {"fc1": {"kernel": (16, 6)}}}}}
    base = _random_tree(rng, shapes=shapes)
    spectrum = np.array([1.0, 3e-3, 2.5e-3, 2e-3, 1.5e-3, 1e-3])
    taus = []
    for _ in range(K):
        u = np.linalg.qr(rng.standard_normal((16, 6)))[0]
        v = np.linalg.qr(rng.standard_normal((6, 6)))[0]
        taus.append((u * spectrum) @ v.T)
    experts = [{"layer": {"0": {"mlp": {"fc1": {"kernel": (base["layer"]["0"]["mlp"]["fc1"]["kernel"]
                                                          + t).astype(np.float32)}}}}} for t in taus]
    t64 = np.stack(taus)
    assert (spectrum[1] / spectrum[0]) ** 2 < 1e-4                      # TSV-M: top-2 triplets
    sv = np.linalg.svd(t64.sum(0), compute_uv=False)
    assert (sv[-1] / sv[0]) ** 2 < 1e-2                                 # Iso-C: polar Gram
    for name in ("tsv", "iso_c", "iso_cts"):
        ref = _ref(name, base, experts)
        scale = max(np.abs(r - flat(base)[p]).max() for p, r in ref.items())
        for run in (lambda b, e: anchors.get(name)(b, e), jax.jit(lambda b, e: anchors.get(name)(b, e))):
            _assert_close(flat(run(base, experts)), ref, 2e-4 * scale, name)


# ---------------------------------------------------------------------------------------------
# WUDI

def _one_module(t, path="layer/0/mlp/fc2/kernel"):
    """Base zeros and experts ``T_k`` at one module ``path`` (a ``[K, d_in, d_out]`` array)."""
    keys = path.split("/")

    def tree(x):
        out = x
        for key in reversed(keys):
            out = {key: out}
        return out
    z = np.zeros(t.shape[1:], np.float32)
    return tree(z), [tree(z + tk.astype(np.float32)) for tk in t]


def test_wudi_exact_is_the_minimiser():
    base, experts = _setup(11)
    out, diag = anchors.wudi(base, experts, exact=True, return_diagnostics=True)
    _check_like(out, base)
    taus = task_vectors(flat(base), [flat(e) for e in experts])
    got = flat(out)
    assert list(diag) == _module_paths(base)
    for p in flat(base):
        delta = got[p] - flat(base)[p]
        if p not in diag:
            np.testing.assert_array_equal(delta, 0.0)   # carried from theta_0
            continue
        ref = wudi_exact_reference(taus[p])
        np.testing.assert_allclose(delta, ref, atol=1e-4 * np.abs(ref).max())
        assert wudi_loss(delta, taus[p]) < wudi_loss(taus[p].sum(0), taus[p])
        np.testing.assert_allclose(float(diag[p]), wudi_cond(taus[p]), rtol=1e-3)


@pytest.mark.parametrize("shape", [(4, 96, 24), (4, 64, 16)])
def test_wudi_exact_ill_conditioned_agrees_with_float64_lstsq(shape):
    # K d_out = d_in: cond(S) ~ 1e5-3e6; the normal equations in float32 lose every digit here
    # (the former solve was off by 100%), the QR route of the stacked factor keeps ~1e-5.
    k, d_in, d_out = shape
    rng = np.random.default_rng(12)
    t = 0.01 * rng.standard_normal(shape)
    base, experts = _one_module(t)
    t32 = np.stack([e["layer"]["0"]["mlp"]["fc2"]["kernel"] for e in experts]).astype(np.float64)
    ref = wudi_exact_reference(t32)
    cond = wudi_cond(t32)
    assert cond > 1e5
    assert np.abs(ref).max() > 10 * np.abs(t32.sum(0)).max()   # the true minimiser is large
    for run in (lambda b, e: anchors.wudi(b, e, exact=True, return_diagnostics=True),
                jax.jit(lambda b, e: anchors.wudi(b, e, exact=True, return_diagnostics=True))):
        out, diag = run(base, experts)
        got = np.asarray(out["layer"]["0"]["mlp"]["fc2"]["kernel"], np.float64)
        assert np.abs(got - ref).max() < 1e-3 * np.abs(ref).max()
        np.testing.assert_allclose(float(diag["layer/0/mlp/fc2/kernel"]), cond, rtol=0.2)


def test_wudi_exact_wide_low_rank_tasks_and_rank_deficiency():
    rng = np.random.default_rng(13)
    # d_out > d_in, task kernels with decaying spectra: the per-task triangular factors route
    u = rng.standard_normal((K, 10, 10))
    v = rng.standard_normal((K, 10, 30))
    t = np.einsum("kij,j,kjo->kio", u, np.logspace(0, -3, 10), v)
    base, experts = _one_module(t, "layer/0/mlp/fc1/kernel")
    t32 = np.stack([e["layer"]["0"]["mlp"]["fc1"]["kernel"] for e in experts]).astype(np.float64)
    ref = wudi_exact_reference(t32)
    out, diag = anchors.wudi(base, experts, exact=True, return_diagnostics=True)
    got = np.asarray(out["layer"]["0"]["mlp"]["fc1"]["kernel"], np.float64)
    assert np.abs(got - ref).max() < 1e-3 * np.abs(ref).max()
    np.testing.assert_allclose(float(diag["layer/0/mlp/fc1/kernel"]), wudi_cond(t32), rtol=0.2)
    # K d_out < d_in: S singular by construction, the min-norm solution (in the range of S)
    t = rng.standard_normal((K, 12, 2))
    base, experts = _one_module(t)
    t32 = np.stack([e["layer"]["0"]["mlp"]["fc2"]["kernel"] for e in experts]).astype(np.float64)
    out = jax.jit(lambda b, e: anchors.wudi(b, e, exact=True))(base, experts)
    np.testing.assert_allclose(out["layer"]["0"]["mlp"]["fc2"]["kernel"], wudi_exact_reference(t32), atol=1e-4)
    # two identical experts and a zero one: rank deficient, min-norm (the SVD of R)
    t = rng.standard_normal((1, 6, 4)).repeat(3, 0)
    t[2] = 0.0
    base, experts = _one_module(t)
    out, diag = anchors.wudi(base, experts, exact=True, return_diagnostics=True)
    t32 = t.astype(np.float32).astype(np.float64)
    np.testing.assert_allclose(out["layer"]["0"]["mlp"]["fc2"]["kernel"], wudi_exact_reference(t32), atol=1e-4)
    assert np.isinf(float(diag["layer/0/mlp/fc2/kernel"]))


def test_wudi_adam_matches_numpy_adam_and_converges():
    base, experts = _setup(14)
    mods = _module_paths(base)
    out = anchors.wudi(base, experts)                   # faithful default: lr 1e-5, 300 steps
    _check_like(out, base)
    ref = _ref("wudi", base, experts)
    _assert_close({p: flat(out)[p] for p in mods}, {p: ref[p] for p in mods}, 2e-6)
    taus = task_vectors(flat(base), [flat(e) for e in experts])
    far = flat(anchors.wudi(base, experts, lr=3e-3, steps=3000))
    for p in mods:
        t = taus[p]
        l_far = wudi_loss(far[p] - flat(base)[p], t)
        l_opt, l_init = wudi_loss(wudi_exact_reference(t), t), wudi_loss(t.sum(0), t)
        assert l_far - l_opt < 1e-3 * (l_init - l_opt)


def test_wudi_stacking_and_diagnostics():
    base, experts = _setup(15)
    a, diag = anchors.wudi(base, experts, lr=1e-3, steps=50, return_diagnostics=True)
    b = anchors.wudi(base, experts, lr=1e-3, steps=50, max_stack_elements=1)  # one per chunk
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_allclose(x, y, atol=1e-6)
    taus = task_vectors(flat(base), [flat(e) for e in experts])
    assert list(diag) == _module_paths(base)
    for p, c in diag.items():
        np.testing.assert_allclose(float(c), wudi_cond(taus[p]), rtol=1e-3)


# ---------------------------------------------------------------------------------------------
# RegMean

def test_regmean_vs_numpy_and_singular_fallback():
    base, experts = _setup(16)
    grams = _random_grams(base)
    for alpha in (0.95, 1.0, 0.0):
        out = anchors.regmean(base, experts, grams=grams, alpha=alpha)
        _check_like(out, base)
        _assert_close(flat(out), _ref("regmean", base, experts, grams=grams, alpha=alpha), 2e-5)
    # rank-deficient Grams with alpha = 1: Cholesky fails, the min-norm solve is taken (on device)
    rng = np.random.default_rng(17)
    sing = {}
    for l in regressed(build_labels(base)):
        x = rng.standard_normal((K, 2, l.d_in)).astype(np.float32)   # rank 2 per task
        sing[l.path] = jnp.asarray(np.einsum("kni,knj->kij", x, x))
    for run in (lambda: anchors.regmean(base, experts, grams=sing, alpha=1.0),
                lambda: jax.jit(lambda b, e: anchors.regmean(b, e, grams=sing, alpha=1.0))(base, experts)):
        out = flat(run())
        taus = task_vectors(flat(base), [flat(e) for e in experts])
        for l in regressed(build_labels(base)):
            g = np.asarray(sing[l.path], np.float64)
            # min-norm solution; the float32 Grams are singular only up to rounding, so the
            # reference drops the eigenvalues below d eps32 of the largest, as the library does
            ref = np.linalg.lstsq(g.sum(0), np.einsum("kij,kjo->io", g, taus[l.path]),
                                  rcond=l.d_in * np.finfo(np.float32).eps)[0]
            np.testing.assert_allclose(out[l.path] - flat(base)[l.path], ref, atol=1e-4 * np.abs(ref).max())


def test_regmean_missing_module_and_bad_shape():
    base, experts = _setup(18)
    grams = dict(_random_grams(base))
    missing = KERNELS["mlp_out"]
    del grams[missing]
    with pytest.raises(ValueError, match=missing):
        anchors.regmean(base, experts, grams=grams)
    grams[missing] = jnp.zeros((K, 5, 5), jnp.float32)
    with pytest.raises(ValueError, match="shape"):
        anchors.regmean(base, experts, grams=grams)
    with pytest.raises(TypeError, match="grams"):
        anchors.regmean(base, experts)


# ---------------------------------------------------------------------------------------------
# cross-cutting: zero task vectors, dtypes, GPT-2

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
        "regmean": anchors.regmean(base, experts, grams=grams),
    }


def test_zero_task_vectors():
    base, experts = _setup(19)
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
    two = flat(anchors.wudi(base, experts[:2], exact=True))
    three = flat(anchors.wudi(base, mixed, exact=True))
    for p in _module_paths(base):
        np.testing.assert_allclose(three[p], two[p], atol=1e-5)


def test_dtypes_kept_bfloat16():
    base, experts = _setup(20)
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
    np.testing.assert_allclose(flat(got)[p].astype(np.float32), flat(ref)[p], atol=0.05)


def test_gpt2_tiny_every_anchor():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=50, n_positions=16)
    with jax.numpy_dtype_promotion("standard"):
        model = transformers.FlaxGPT2Model(cfg, _do_init=False)
    ids, mask, pos = jnp.arange(8)[None], jnp.ones((1, 8), jnp.int32), jnp.arange(8)[None]
    with jax.numpy_dtype_promotion("standard"):       # transformers' own code is not strict-safe
        shapes = jax.eval_shape(lambda r: model.module.init(r, ids, mask, pos)["params"],
                                jax.random.PRNGKey(0))
    rng = np.random.default_rng(21)
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
    # every leaf against the references, GPT-2's Conv1D kernels [d_out, d_in] in their view
    kw = dict(regressed=[l.path for l in mods],
              transposed=[l.path for l in mods if l.layout == "transposed"])
    for name, opts, tol in (("iso_cts", {}, 2e-5), ("tsv", {}, 2e-5), ("wudi", {"exact": True}, 1e-4),
                            ("regmean", {"grams": grams}, 2e-5), ("ties", {}, 1e-6)):
        ref = reference(name, base, experts, **kw, **opts)
        got = flat(outs["wudi_exact" if opts.get("exact") else name])
        for p, r in ref.items():
            np.testing.assert_allclose(np.asarray(got[p], np.float64), r,
                                       atol=tol * max(1.0, np.abs(r).max()), err_msg=f"{name} {p}")
