"""BMM at pytree level (``bmm_jax.merge`` / ``bmm_jax.prepare``) against per-module numpy references.

The reference merge below is written from method.md §2 in float64 numpy (regressed modules listed
by hand, Grams computed here); it never calls the code under test.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize

import bmm_jax
from bmm_jax.labels import build_labels

K, D, H = 3, 4, 6
QKV = ("query", "key", "value")


def _block_shapes():
    return {"attention": {"self": {n: {"kernel": (D, D), "bias": (D,)} for n in QKV},
                          "output": {"dense": {"kernel": (D, D), "bias": (D,)}}},
            "intermediate": {"dense": {"kernel": (D, H), "bias": (H,)}},
            "output": {"dense": {"kernel": (H, D), "bias": (D,)}, "LayerNorm": {"scale": (D,)}}}


SHAPES = {"embeddings": {"word_embeddings": {"embedding": (10, D)}},
          "encoder": {"layer": {"0": _block_shapes(), "1": _block_shapes()}},
          "classifier": {"kernel": (D, 3), "bias": (3,)}}

# the regressed modules, by hand: kind and block of every 2-D kernel inside the blocks
MODULES = {}
for _b in ("0", "1"):
    for _n, _kind in zip(QKV, "qkv"):
        MODULES[f"encoder/layer/{_b}/attention/self/{_n}/kernel"] = (_kind, int(_b))
    MODULES[f"encoder/layer/{_b}/attention/output/dense/kernel"] = ("attn-out", int(_b))
    MODULES[f"encoder/layer/{_b}/intermediate/dense/kernel"] = ("mlp-in", int(_b))
    MODULES[f"encoder/layer/{_b}/output/dense/kernel"] = ("mlp-out", int(_b))


def _input_group(path):
    parts = path.split("/")
    return "/".join(parts[:-2]) if parts[-2] in QKV else path


def _paths(tree, prefix=""):
    out = []
    for k, v in tree.items():
        p = f"{prefix}{k}"
        out.extend(_paths(v, p + "/") if isinstance(v, dict) else [p])
    return out


PATHS = _paths(SHAPES)


def _get(tree, path):
    for key in path.split("/"):
        tree = tree[key]
    return tree


def _unflatten(flat):
    tree = {}
    for path, v in flat.items():
        node = tree
        keys = path.split("/")
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = v
    return tree


def _flat(tree):
    return {p: np.asarray(_get(tree, p), np.float64) for p in PATHS}


def _to_tree(flat64):
    return _unflatten({p: jnp.asarray(v, jnp.float32) for p, v in flat64.items()})


def _setup(seed=0, k=K, unchanged=(), zero=None):
    """Random base and K experts (float32 nested dicts). ``unchanged``: leaves no expert changes;
    ``zero = (expert, path)``: that expert leaves that leaf unchanged."""
    rng = np.random.default_rng(seed)
    base = {p: rng.standard_normal(_get(SHAPES, p)) for p in PATHS}
    experts = []
    for j in range(k):
        e = {}
        for p in PATHS:
            e[p] = base[p] + 0.1 * rng.standard_normal(base[p].shape)
            if p in unchanged or zero == (j, p):
                e[p] = base[p].copy()
        experts.append(e)
    return base, experts


def _task_kernels(base, experts, path):
    return np.stack([e[path] - base[path] for e in experts])


def _np_data_free(t):
    return np.stack([tk @ tk.T / np.sum(tk ** 2) if np.any(tk) else np.zeros((t.shape[1],) * 2) for tk in t])


def _np_solve(t, g, ta, rho, scale, w=None, prior="isotropic"):
    w = np.ones(len(t)) if w is None else np.asarray(w, np.float64)
    s = np.einsum("k,kij->ij", w, g)
    b = np.einsum("k,kij,kjo->io", w, g, t)
    lam = rho * np.trace(s) / s.shape[0]
    p = np.eye(s.shape[0]) if prior == "isotropic" else np.diag(np.diag(s) / np.mean(np.diag(s)))
    return scale * np.linalg.solve(s + lam * p, b + lam * p @ ta), lam


def _np_merge(base, experts, anchor, hp, grams=None, carry="anchor", prior="isotropic", w=None,
              modules=MODULES):
    """Reference merge on flat float64 dicts; ``hp(path) -> (rho, scale)``; ``grams`` {path: [K,d,d]}
    (default data-free); ``modules``: the regressed leaves."""
    out = {}
    for p in PATHS:
        t = _task_kernels(base, experts, p)
        if p in modules:
            if not np.any(t):
                out[p] = base[p]
                continue
            g = _np_data_free(t) if grams is None else grams[p]
            delta, _ = _np_solve(t, g, anchor[p] - base[p], *hp(p), w=w, prior=prior)
            out[p] = base[p] + delta
        elif carry == "anchor":
            out[p] = anchor[p]
        elif carry == "base":
            out[p] = base[p]
        else:
            out[p] = base[p] + t.mean(0)
    return out


def _np_task_arithmetic(base, experts, scale=0.3):
    return {p: base[p] + scale * sum(e[p] - base[p] for e in experts) for p in PATHS}


def _activation_grams(seed, n=12, k=K):
    """Random activation-like Grams, one per input group (q/k/v share), as {module path: [K,d,d]}."""
    rng = np.random.default_rng(seed)
    per_group = {}
    out = {}
    for p in MODULES:
        d_in = _get(SHAPES, p)[0]
        grp = _input_group(p)
        if grp not in per_group:
            xs = rng.standard_normal((k, n, d_in)) * rng.uniform(0.3, 3.0, d_in)
            per_group[grp] = np.einsum("kni,knj->kij", xs, xs) / n
        out[p] = per_group[grp]
    return out


def _jnp_grams(g):
    return {p: jnp.asarray(v, jnp.float32) for p, v in g.items()}


def _run(base, experts, anchor, grams=None, hparams=None, **kw):
    res = bmm_jax.merge(_to_tree(base), [_to_tree(e) for e in experts],
                        anchor if isinstance(anchor, str) else _to_tree(anchor),
                        None if grams is None else _jnp_grams(grams), hparams, **kw)
    return res


def _assert_params(params, ref, atol=2e-5):
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(_to_tree(ref))
    for p in PATHS:
        x = _get(params, p)
        assert x.dtype == jnp.float32 and x.shape == ref[p].shape, p
        x = np.asarray(x, np.float64)
        assert np.all(np.isfinite(x)), p
        np.testing.assert_allclose(x, ref[p], atol=atol * max(1.0, np.abs(ref[p]).max()), rtol=0, err_msg=p)


# ----------------------------------------------------------------------------- core identities
def test_merge_data_free_matches_reference_and_diagnostics():
    base, experts = _setup(0)
    anchor = _np_task_arithmetic(base, experts)
    res = _run(base, experts, anchor, None, {"rho": 0.3, "scale": 1.1})
    _assert_params(res.params, _np_merge(base, experts, anchor, lambda p: (0.3, 1.1)))
    diag = res.diagnostics
    assert diag["num_experts"] == K and diag["carry"] == "anchor" and diag["prior"] == "isotropic"
    assert set(diag["modules"]) == set(MODULES)
    for p, (kind, block) in MODULES.items():
        m = diag["modules"][p]
        t = _task_kernels(base, experts, p)
        lam = 0.3 * np.trace(_np_data_free(t).sum(0)) / t.shape[1]
        assert (m["kind"], m["block"], m["carried"]) == (kind, block, False)
        assert m["lambda"] == pytest.approx(lam, rel=1e-5)
        assert m["rho"] == 0.3 and m["scale"] == 1.1
    # the named anchor gives the same merge as the explicit task-arithmetic pytree
    by_name = _run(base, experts, "task_arithmetic", None, {"rho": 0.3, "scale": 1.1})
    _assert_params(by_name.params, _np_merge(base, experts, anchor, lambda p: (0.3, 1.1)))


def test_data_free_grams_of_other_experts_are_used_as_given():
    """merge derives data-free factors in its own kernel only for Grams built from the very leaves
    it merges: Grams of other experts (here: of a second draw) must enter as given."""
    base, experts = _setup(0)
    _, others = _setup(1)
    anchor = _np_task_arithmetic(base, experts)
    other_grams = {p: _np_data_free(_task_kernels(base, others, p)) for p in MODULES}
    tb, te, to = _to_tree(base), [_to_tree(e) for e in experts], [_to_tree(e) for e in others]
    for grams, ref_grams in ((bmm_jax.grams.data_free(tb, to), other_grams), (bmm_jax.grams.data_free(tb, te), None)):
        res = bmm_jax.merge(tb, te, _to_tree(anchor), grams, {"rho": 0.4, "scale": 1.0})
        _assert_params(res.params, _np_merge(base, experts, anchor, lambda p: (0.4, 1.0), ref_grams))


def test_merge_rho_zero_activation_grams_is_regmean():
    base, experts = _setup(1)
    grams = _activation_grams(2)
    anchor = _np_task_arithmetic(base, experts, 0.5)
    res = _run(base, experts, anchor, grams, {"rho": 0.0})
    ref = {}
    for p in PATHS:
        if p in MODULES:
            t, g = _task_kernels(base, experts, p), grams[p]
            ref[p] = base[p] + np.linalg.solve(g.sum(0), np.einsum("kij,kjo->io", g, t))
        else:
            ref[p] = anchor[p]
    _assert_params(res.params, ref, atol=5e-5)


def _wudi_minimise(t):
    shape = t.shape[1:]

    def fun(x):
        m = x.reshape(shape)
        return sum(np.sum(((m - tk).T @ tk) ** 2) / np.sum(tk ** 2) for tk in t)

    def jac(x):
        m = x.reshape(shape)
        return sum(2.0 * tk @ (tk.T @ (m - tk)) / np.sum(tk ** 2) for tk in t).ravel()

    x0 = t.sum(0).ravel()
    assert scipy.optimize.check_grad(fun, jac, x0) < 1e-5 * max(1.0, np.linalg.norm(jac(x0)))
    res = scipy.optimize.minimize(fun, x0, jac=jac, method="BFGS", options={"gtol": 1e-11, "maxiter": 5000})
    return res.x.reshape(shape)


def test_merge_rho_zero_data_free_is_wudi_minimiser():
    base, experts = _setup(3)
    anchor = _np_task_arithmetic(base, experts)
    res = _run(base, experts, anchor, None, {"rho": 0.0})
    for p in ("encoder/layer/0/attention/self/query/kernel", "encoder/layer/0/intermediate/dense/kernel",
              "encoder/layer/1/output/dense/kernel"):
        tm = _wudi_minimise(_task_kernels(base, experts, p))
        out = np.asarray(_get(res.params, p), np.float64) - base[p]
        np.testing.assert_allclose(out, tm, atol=5e-4 * np.abs(tm).max(), err_msg=p)


def _per_group_hparams():
    hp = {"q": {"rho": 0.2, "scale": 1.1},
          "block1": {"rho": 3.0},
          "encoder/layer/0/output/dense": {"rho": 0.05, "scale": 0.9},         # module path
          "encoder/layer/1/attention/self/value/kernel": {"rho": 0.7, "scale": 1.2},  # leaf path
          "mlp_in": {"rho": 0.4, "scale": 0.8},                                  # kind alias
          "global": {"rho": 1.5, "scale": 1.0}}

    def expected(p):            # most specific first: leaf, module, block, kind, global
        if p == "encoder/layer/1/attention/self/value/kernel":
            return 0.7, 1.2
        if p == "encoder/layer/0/output/dense/kernel":
            return 0.05, 0.9
        if "/layer/1/" in p:
            return 3.0, 1.0
        kind = MODULES[p][0]
        if kind == "q":
            return 0.2, 1.1
        if kind == "mlp-in":
            return 0.4, 0.8
        return 1.5, 1.0
    return hp, expected


def test_per_group_hparams():
    base, experts = _setup(4)
    anchor = _np_task_arithmetic(base, experts)
    hp, expected = _per_group_hparams()
    res = _run(base, experts, anchor, None, hp)
    _assert_params(res.params, _np_merge(base, experts, anchor, expected))
    for p in MODULES:
        m = res.diagnostics["modules"][p]
        assert (m["rho"], m["scale"]) == pytest.approx(expected(p)), p


def test_diagonal_prior_and_weights():
    base, experts = _setup(5)
    grams = _activation_grams(6)
    anchor = _np_task_arithmetic(base, experts)
    w = [0.5, 1.0, 2.0]
    res = _run(base, experts, anchor, grams, {"rho": 0.6, "scale": 0.9}, prior="diagonal",
               weights=jnp.asarray(w, jnp.float32))
    _assert_params(res.params, _np_merge(base, experts, anchor, lambda p: (0.6, 0.9), grams,
                                         prior="diagonal", w=w))


# ----------------------------------------------------------------------------- fast path
def test_prepare_fast_path_equals_merge():
    base, experts = _setup(7)
    anchor = _np_task_arithmetic(base, experts)
    grams = _activation_grams(8)
    args = (_to_tree(base), [_to_tree(e) for e in experts], _to_tree(anchor))
    for g in (None, grams):
        prep = bmm_jax.prepare(*args, None if g is None else _jnp_grams(g))
        assert set(prep.modules) == set(MODULES)
        hp_group, _ = _per_group_hparams()
        for hp in ({"rho": 0.01, "scale": 1.0}, {"rho": 0.5, "scale": 0.7}, {"rho": 30.0, "scale": 1.4},
                   hp_group, {"global": {"rho": 2.0, "scale": 1.2}},
                   {"block0": {"rho": 0.1}, "block1": {"rho": 10.0, "scale": 0.6}}):
            fast = prep.params(hp)
            slow = bmm_jax.merge(*args, None if g is None else _jnp_grams(g), hp).params
            _assert_params(fast, _flat(slow))
        # anchor_scale c: the merge around theta_0 + c (theta_a - theta_0), carried leaves included
        for c in (0.5, 1.7):
            scaled = {p: base[p] + c * (anchor[p] - base[p]) for p in PATHS}
            for hp in ({"rho": 0.4, "scale": 1.1}, hp_group):
                fast = prep.params(hp, anchor_scale=c)
                slow = bmm_jax.merge(*args[:2], _to_tree(scaled), None if g is None else _jnp_grams(g), hp).params
                _assert_params(fast, _flat(slow))
                _, expected = _per_group_hparams()
                ref = _np_merge(base, experts, scaled, (lambda p: (0.4, 1.1)) if "rho" in hp else expected,
                                g)
                _assert_params(fast, ref)
    # Prepared.merge: same params plus diagnostics; the diagonal prior's fast path too
    prep = bmm_jax.prepare(*args, _jnp_grams(grams), prior="diagonal")
    r = prep.merge({"rho": 0.3, "scale": 0.9})
    _assert_params(r.params, _np_merge(base, experts, anchor, lambda p: (0.3, 0.9), grams, prior="diagonal"))
    assert r.diagnostics["modules"][next(iter(MODULES))]["rho"] == 0.3


def test_prepare_bfloat16_factors_approximate_the_exact_merge():
    base, experts = _setup(11)
    anchor = _np_task_arithmetic(base, experts)
    grams = _activation_grams(12)
    args = (_to_tree(base), [_to_tree(e) for e in experts], _to_tree(anchor))
    prep = bmm_jax.prepare(*args, _jnp_grams(grams), factor_dtype="bfloat16")
    assert prep.factor_dtype == "bfloat16" and "bfloat16" in repr(prep)
    for st in prep._stacks:                           # Q, Q^T B, Q^T T_a stored at half the bytes
        assert st.factors.q.dtype == jnp.bfloat16 and st.factors.qtb.dtype == jnp.bfloat16
        assert st.factors.e.dtype == jnp.float32
    for hp, c in (({"rho": 0.2, "scale": 1.1}, 1.0), ({"rho": 3.0, "scale": 0.8}, 1.4)):
        scaled = {p: base[p] + c * (anchor[p] - base[p]) for p in PATHS}
        ref = _np_merge(base, experts, scaled, lambda p: (hp["rho"], hp["scale"]), grams)
        got = prep.params(hp, anchor_scale=c)
        worst = 0.0
        for p in MODULES:
            delta = np.asarray(_get(got, p), np.float64) - base[p]
            want = ref[p] - base[p]
            worst = max(worst, np.abs(delta - want).max() / np.abs(want).max())
        assert 0.0 < worst < 3e-2                      # bfloat16: 8-bit mantissa, not exact
        for p in set(PATHS) - set(MODULES):            # carried leaves are exact
            np.testing.assert_allclose(np.asarray(_get(got, p), np.float64), ref[p], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="unknown factor_dtype 'float16'"):
        bmm_jax.prepare(*args, _jnp_grams(grams), factor_dtype="float16")
    with pytest.raises(ValueError, match="needs prior='isotropic'"):
        bmm_jax.prepare(*args, _jnp_grams(grams), prior="diagonal", factor_dtype="bfloat16")


@pytest.mark.parametrize("carry", ["anchor", "mean"])
def test_prepared_keeps_no_reference_to_the_experts(carry):
    import gc
    import weakref
    base, experts = _setup(13)
    anchor = _np_task_arithmetic(base, experts)
    ref = _np_merge(base, experts, anchor, lambda p: (0.7, 1.0), carry=carry)
    te = [_to_tree(e) for e in experts]
    probes = [weakref.ref(_get(e, p)) for e in te for p in PATHS]
    prep = bmm_jax.prepare(_to_tree(base), te, _to_tree(anchor), carry=carry)
    del te
    gc.collect()
    assert all(r() is None for r in probes)           # the caller may free its experts after prepare
    _assert_params(prep.params({"rho": 0.7}), ref)
    assert prep.num_experts == K


def test_merge_jit_and_no_jit_paths_agree():
    base, experts = _setup(9)
    anchor = _np_task_arithmetic(base, experts)
    grams = _activation_grams(10)
    # two modules of one shape keep the op-by-op (no-jit) run short
    mods = ("encoder/layer/0/attention/self/query/kernel", "encoder/layer/1/attention/output/dense/kernel")
    labels = build_labels(_to_tree(base), include=[r"layer/0/attention/self/query/kernel",
                                                   r"layer/1/attention/output/dense/kernel"])
    ref = _np_merge(base, experts, anchor, lambda p: (0.5, 1.2), grams, modules=mods)
    hp = {"rho": 0.5, "scale": 1.2}
    _assert_params(_run(base, experts, anchor, grams, hp, labels=labels).params, ref)
    with jax.disable_jit():
        _assert_params(_run(base, experts, anchor, grams, hp, labels=labels).params, ref)
        prep = bmm_jax.prepare(_to_tree(base), [_to_tree(e) for e in experts], _to_tree(anchor),
                               _jnp_grams(grams), labels=labels)
        _assert_params(prep.params(hp), ref)


# ----------------------------------------------------------------------------- edge cases
def test_zero_task_vector_contributes_no_data_free_gram():
    mod = "encoder/layer/0/intermediate/dense/kernel"
    base, experts = _setup(11, zero=(1, mod))
    anchor = _np_task_arithmetic(base, experts)
    t = _task_kernels(base, experts, mod)
    assert not np.any(t[1])
    for rho in (0.0, 0.5):
        res = _run(base, experts, anchor, None, {"rho": rho, "scale": 1.0})
        out = np.asarray(_get(res.params, mod), np.float64)
        assert np.all(np.isfinite(out))
        # reference from the other experts' Grams only: G_1 = 0, and expert 1 adds nothing to B
        g = np.stack([t[j] @ t[j].T / np.sum(t[j] ** 2) for j in (0, 2)])
        delta, _ = _np_solve(t[[0, 2]], g, anchor[mod] - base[mod], rho, 1.0)
        np.testing.assert_allclose(out, base[mod] + delta, atol=5e-5 * np.abs(base[mod] + delta).max())
        _assert_params(res.params, _np_merge(base, experts, anchor, lambda p: (rho, 1.0)), atol=5e-5)


def test_module_no_expert_changed_is_carried_from_base():
    mod = "encoder/layer/1/attention/self/value/kernel"
    base, experts = _setup(12, unchanged=(mod, "classifier/bias"))
    anchor = _np_task_arithmetic(base, experts)
    anchor[mod] = anchor[mod] + 1.0           # even an anchor that moved it does not matter
    for rho in (0.0, 1.0):
        res = _run(base, experts, anchor, None, {"rho": rho})
        np.testing.assert_array_equal(np.asarray(_get(res.params, mod), np.float64),
                                      base[mod].astype(np.float32))
        assert res.diagnostics["modules"][mod]["carried"] is True
        _assert_params(res.params, _np_merge(base, experts, anchor, lambda p: (rho, 1.0)), atol=5e-5)
    prep = bmm_jax.prepare(_to_tree(base), [_to_tree(e) for e in experts], _to_tree(anchor))
    assert mod not in prep.modules and mod in prep.unchanged
    np.testing.assert_array_equal(np.asarray(_get(prep.params({"rho": 0.2}), mod), np.float64),
                                  base[mod].astype(np.float32))
    # only unchanged modules / no regressed module changed at all: everything carried, no NaN
    base2, experts2 = _setup(13, unchanged=tuple(MODULES))
    res = _run(base2, experts2, _np_task_arithmetic(base2, experts2), None, {"rho": 0.0})
    _assert_params(res.params, _np_merge(base2, experts2, _np_task_arithmetic(base2, experts2),
                                         lambda p: (0.0, 1.0)))


@pytest.mark.parametrize("carry", ["anchor", "base", "mean"])
def test_carry_modes(carry):
    base, experts = _setup(14)
    anchor = _np_task_arithmetic(base, experts, 0.7)
    res = _run(base, experts, anchor, None, {"rho": 0.8}, carry=carry)
    _assert_params(res.params, _np_merge(base, experts, anchor, lambda p: (0.8, 1.0), carry=carry))
    assert res.diagnostics["carry"] == carry


def test_transposed_and_conv1x1_layouts_merge_in_matrix_view():
    """GPT-2 Conv1D kernels are stored [d_out, d_in] and 1x1 convs [1, 1, d_in, d_out]: the merge
    regresses their [d_in, d_out] view and writes the result back in the stored layout."""
    rng = np.random.default_rng(15)
    shapes = {"h": {"0": {"attn": {"c_attn": {"kernel": (H, D), "bias": (H,)}},          # view [4, 6]
                          "mlp": {"c_proj": {"kernel": (D, H)}}}},                        # view [6, 4]
              "blocks": {"1": {"expand_conv": {"kernel": (1, 1, D, H)}}}}                 # view [4, 6]
    views = {"h/0/attn/c_attn/kernel": (lambda a: a.T, lambda m: m.T),
             "h/0/mlp/c_proj/kernel": (lambda a: a.T, lambda m: m.T),
             "blocks/1/expand_conv/kernel": (lambda a: a.reshape(D, H), lambda m: m.reshape(1, 1, D, H))}
    leaf = lambda s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    base = jax.tree_util.tree_map(leaf, shapes, is_leaf=lambda x: isinstance(x, tuple))
    experts = [jax.tree_util.tree_map(lambda b: b + 0.1 * leaf(b.shape), base) for _ in range(K)]
    res = bmm_jax.merge(jax.tree_util.tree_map(jnp.asarray, base),
                        [jax.tree_util.tree_map(jnp.asarray, e) for e in experts],
                        "task_arithmetic", None, {"rho": 0.25, "scale": 1.0})
    assert set(res.diagnostics["modules"]) == set(views)
    for p, (to_view, from_view) in views.items():
        b = np.asarray(_get(base, p), np.float64)
        t = np.stack([to_view(np.asarray(_get(e, p), np.float64) - b) for e in experts])
        delta, _ = _np_solve(t, _np_data_free(t), 0.3 * t.sum(0), 0.25, 1.0)
        out = np.asarray(_get(res.params, p), np.float64)
        assert out.shape == b.shape
        np.testing.assert_allclose(out, b + from_view(delta), atol=5e-5 * np.abs(b).max(), err_msg=p)
    np.testing.assert_allclose(_get(res.params, "h/0/attn/c_attn/bias"),
                               _get(base, "h/0/attn/c_attn/bias") + 0.3 * sum(
                                   _get(e, "h/0/attn/c_attn/bias") - _get(base, "h/0/attn/c_attn/bias")
                                   for e in experts), atol=1e-5)


# ----------------------------------------------------------------------------- bad input
def test_bad_inputs():
    base, experts = _setup(16)
    anchor = _np_task_arithmetic(base, experts)
    tb, te, ta = _to_tree(base), [_to_tree(e) for e in experts], _to_tree(anchor)
    with pytest.raises(ValueError, match="unknown anchor method 'nope'"):
        bmm_jax.merge(tb, te, anchor="nope", grams=None, hparams={"rho": 1.0})
    with pytest.raises(ValueError, match="unknown anchor method 'nope'"):
        bmm_jax.anchors.get("nope")
    with pytest.raises(ValueError, match=r"rho must be >= 0.*-1"):
        bmm_jax.merge(tb, te, ta, None, {"rho": -1.0})
    with pytest.raises(ValueError, match=r"rho must be >= 0 \(hparams\['q'\]\)"):
        bmm_jax.merge(tb, te, ta, None, {"q": {"rho": -0.1}, "global": {"rho": 1.0}})
    with pytest.raises(ValueError, match=r"hparams keys \['qq'\] name no regressed module"):
        bmm_jax.merge(tb, te, ta, None, {"qq": {"rho": 1.0}, "global": {"rho": 1.0}})
    with pytest.raises(ValueError, match=r"module 'encoder/layer/0/attention/output/dense/kernel' \(kind "
                                         r"attn-out, block 0\) has no hparams entry"):
        bmm_jax.merge(tb, te, ta, None, {"q": {"rho": 1.0}})
    with pytest.raises(ValueError, match="hparams has unknown keys \\['alpha'\\]"):
        bmm_jax.merge(tb, te, ta, None, {"rho": 1.0, "alpha": 2.0})
    with pytest.raises(ValueError, match="unknown carry mode 'zero'"):
        bmm_jax.merge(tb, te, ta, None, {"rho": 1.0}, carry="zero")
    with pytest.raises(ValueError, match="unknown prior 'laplace'"):
        bmm_jax.merge(tb, te, ta, None, {"rho": 1.0}, prior="laplace")
    with pytest.raises(ValueError, match="unknown carry mode 'zero'"):
        bmm_jax.prepare(tb, te, ta, carry="zero")
    with pytest.raises(ValueError, match="need at least 2 experts"):
        bmm_jax.merge(tb, te[:1], ta, None, {"rho": 1.0})
    # singular system at rho = 0: mlp-out of block 0 gets rank-1 Grams (rank S = 3 < d_in = 6)
    low = _activation_grams(17)
    low["encoder/layer/0/output/dense/kernel"] = _activation_grams(17, n=1)["encoder/layer/0/output/dense/kernel"]
    with pytest.raises(ValueError, match=r"singular system at module 'encoder/layer/0/output/dense/kernel'"):
        bmm_jax.merge(tb, te, ta, _jnp_grams(low), {"rho": 0.0})
    with pytest.raises(ValueError, match=r"singular system at module 'encoder/layer/0/output/dense/kernel'"):
        bmm_jax.prepare(tb, te, ta, _jnp_grams(low)).params({"rho": 0.0})
    with pytest.raises(ValueError, match=r"singular system at module 'encoder/layer/0/output/dense/kernel'"):
        bmm_jax.prepare(tb, te, ta, _jnp_grams(low), prior="diagonal").params({"rho": 0.0})
    ok = bmm_jax.merge(tb, te, ta, _jnp_grams(low), {"rho": 0.1}).params      # rho > 0 is fine
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree_util.tree_leaves(ok))
    # Grams missing a module / with the wrong shape
    g = _jnp_grams(_activation_grams(18))
    missing = dict(g)
    del missing["encoder/layer/1/intermediate/dense/kernel"]
    with pytest.raises(ValueError, match="no entry for regressed module 'encoder/layer/1/intermediate/dense/kernel'"):
        bmm_jax.merge(tb, te, ta, missing, {"rho": 1.0})
    wrong = dict(g)
    wrong["encoder/layer/1/intermediate/dense/kernel"] = jnp.zeros((K, D + 1, D + 1), jnp.float32)
    with pytest.raises(ValueError, match="Gram of 'encoder/layer/1/intermediate/dense/kernel' has shape"):
        bmm_jax.merge(tb, te, ta, wrong, {"rho": 1.0})
    # invalid experts and anchor are reported with the leaf path
    bad = dict(experts[2])
    bad["encoder/layer/0/attention/output/dense/bias"] = np.full(D, np.nan)
    with pytest.raises(ValueError, match="expert 2 leaf 'encoder/layer/0/attention/output/dense/bias' has non-finite"):
        bmm_jax.merge(tb, te[:2] + [_to_tree(bad)], ta, None, {"rho": 1.0})
    bad_anchor = dict(anchor)
    bad_anchor["classifier/kernel"] = np.zeros((D, 4))
    with pytest.raises(ValueError, match=r"anchor leaf 'classifier/kernel': shape \(4, 4\) != base shape \(4, 3\)"):
        bmm_jax.merge(tb, te, _to_tree(bad_anchor), None, {"rho": 1.0})


# ----------------------------------------------------------------------------- 8 devices
_CHILD = textwrap.dedent("""
    import os, sys, json
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax, jax.numpy as jnp, numpy as np
    jax.config.update("jax_numpy_dtype_promotion", "strict")
    import bmm_jax
    from bmm_jax.sharding import module_mesh, shard_stack

    src, dst = sys.argv[1], sys.argv[2]
    data = dict(np.load(src))

    def tree(prefix):
        out = {}
        for key, v in data.items():
            if key.startswith(prefix + ":"):
                node = out
                keys = key[len(prefix) + 1:].split("/")
                for k in keys[:-1]:
                    node = node.setdefault(k, {})
                node[keys[-1]] = jnp.asarray(v)
        return out

    def flat(t, prefix=""):
        res = {}
        for k, v in t.items():
            res.update(flat(v, prefix + k + "/") if isinstance(v, dict) else {prefix + k: np.asarray(v)})
        return res

    assert len(jax.devices()) == 8, jax.devices()
    base, anchor = tree("base"), tree("anchor")
    experts = [tree(f"expert{j}") for j in range(int(data["K"]))]
    grams = {k[len("gram:"):]: jnp.asarray(v) for k, v in data.items() if k.startswith("gram:")}
    hp = json.loads(str(data["hparams"]))
    labels = bmm_jax.build_labels(base, include=[str(p) for p in data["include"]])
    out = {}
    res = bmm_jax.merge(base, experts, anchor, None, hp, labels=labels)
    assert res.diagnostics["devices"] == 8
    out.update({"free:" + k: v for k, v in flat(res.params).items()})
    prep = bmm_jax.prepare(base, experts, anchor, grams, labels=labels)
    out.update({"fast:" + k: v for k, v in flat(prep.params(hp)).items()})
    # the stacks really live on 8 devices, one slice of the module axis each
    info = []
    for stack, paths in zip(prep._stacks, prep._stack_paths):
        q = stack.factors.q
        info.append([len(paths), q.shape[0], len(q.sharding.device_set),
                     len({s.device for s in q.addressable_shards}), q.addressable_shards[0].data.shape[0]])
    x = shard_stack([jnp.ones((3, 2), jnp.float32)] * 3, module_mesh())
    info.append([3, x.shape[0], len(x.sharding.device_set), len({s.device for s in x.addressable_shards}),
                 x.addressable_shards[0].data.shape[0]])
    out["info"] = np.asarray(info)
    np.savez(dst, **out)
""")


def test_eight_devices_match_one_device(tmp_path):
    base, experts = _setup(19)
    anchor = _np_task_arithmetic(base, experts)
    grams = _activation_grams(20)
    hp, expected = _per_group_hparams()
    # 8 attention modules [4, 4] (one per device) and 2 mlp-in modules [4, 6] (padded to 8)
    include = [r"attention/", r"intermediate/dense/kernel"]
    mods = [p for p in MODULES if "attention/" in p or "intermediate" in p]
    hp = {k: v for k, v in hp.items() if k != "encoder/layer/0/output/dense"}   # not regressed here
    data = {"K": np.asarray(K), "hparams": np.asarray(json.dumps(hp)), "include": np.asarray(include)}
    for name, tree in [("base", base), ("anchor", anchor)] + [(f"expert{j}", e) for j, e in enumerate(experts)]:
        data.update({f"{name}:{p}": v.astype(np.float32) for p, v in tree.items()})
    data.update({f"gram:{p}": v.astype(np.float32) for p, v in grams.items()})
    np.savez(tmp_path / "in.npz", **data)
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in [env.get("PYTHONPATH")] if p])
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path / "in.npz"), str(tmp_path / "out.npz")],
                          capture_output=True, text=True, env=env, timeout=240, cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = dict(np.load(tmp_path / "out.npz"))
    info = got.pop("info")
    for m, padded, n_dev, n_shard_dev, rows in info:
        assert n_dev == 8 and n_shard_dev == 8 and padded % 8 == 0 and padded >= m and rows == padded // 8

    one = jax.devices()[:1]
    args = (_to_tree(base), [_to_tree(e) for e in experts], _to_tree(anchor))
    labels = build_labels(args[0], include=include)
    res = bmm_jax.merge(*args, None, hp, labels=labels, devices=one)
    assert res.diagnostics["devices"] == 1
    single = {"free": _flat(res.params),
              "fast": _flat(bmm_jax.prepare(*args, _jnp_grams(grams), labels=labels, devices=one).params(hp))}
    np_ref = {"free": _np_merge(base, experts, anchor, expected, modules=mods),
              "fast": _np_merge(base, experts, anchor, expected, grams, modules=mods)}
    for kind in ("free", "fast"):
        for p in PATHS:
            eight = got[f"{kind}:{p}"]
            np.testing.assert_allclose(eight, single[kind][p], atol=1e-5, rtol=1e-5, err_msg=f"{kind} {p}")
        _assert_params(_to_tree({p: got[f"{kind}:{p}"].astype(np.float64) for p in PATHS}), np_ref[kind],
                       atol=5e-5)
