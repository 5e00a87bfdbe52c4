"""Gram estimators (method.md §3) against numpy references.

* activations: the streaming accumulator vs a numpy masked mean of x x^T; the generic linen capture
  on a tiny hand-written model and on a tiny random FlaxBertModel, whose module inputs are
  recomputed here in numpy (and checked against HF's own hidden states);
* data-free: T T^T / ||T||_F^2 in each module's [d_in, d_out] view (transposed, 1x1 conv), zero
  task vectors giving zero Grams;
* hybrid: the §3.3 formula.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

import bmm_jax
from bmm_jax import grams as G
from bmm_jax.grams._base import Grams
from bmm_jax.labels import build_labels, regressed


def _masked_gram(rows, mask):
    rows = np.asarray(rows, np.float64)[np.asarray(mask, bool)]
    return rows.T @ rows / rows.shape[0]


# ----------------------------------------------------------------------------- streaming
def test_streaming_accumulator_matches_masked_numpy_mean():
    rng = np.random.default_rng(0)
    dims = {"a": 3, "b": 5}
    batches = []
    for n in (4, 4, 4):      # one batch shape: one compilation of the jitted update
        xa = rng.standard_normal((n, 6, 3)).astype(np.float32)
        ma = rng.uniform(size=(n, 6)) < 0.7
        ma[0, 0] = True
        xb = rng.standard_normal((n * 2, 5)).astype(np.float32)
        batches.append((xa, ma, xb))
    ref_a = _masked_gram(np.concatenate([x.reshape(-1, 3) for x, _, _ in batches]),
                         np.concatenate([m.reshape(-1) for _, m, _ in batches]))
    xb_all = np.concatenate([xb for _, _, xb in batches])
    ref_b = xb_all.astype(np.float64).T @ xb_all / xb_all.shape[0]
    for upd in (G.update, jax.jit(G.update)):
        state = G.init(dims)
        for xa, ma, xb in batches:
            state = upd(state, {"a": (jnp.asarray(xa), jnp.asarray(ma)), "b": jnp.asarray(xb)})
        assert float(state.counts["a"]) == sum(int(m.sum()) for _, m, _ in batches)
        out = G.finalize(state)
        assert out["a"].dtype == jnp.float32 and out["a"].shape == (3, 3)
        np.testing.assert_allclose(out["a"], ref_a, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(out["b"], ref_b, rtol=1e-5, atol=1e-6)
    # one-shot helper
    xa, ma, _ = batches[0]
    np.testing.assert_allclose(G.gram_from_activations(jnp.asarray(xa), jnp.asarray(ma)),
                               _masked_gram(xa.reshape(-1, 3), ma.reshape(-1)), rtol=1e-5, atol=1e-6)
    # errors: a group that saw no real row, an unknown group, a wrong width
    state = G.update(G.init(dims), {"a": (jnp.asarray(xa), jnp.zeros(ma.shape, bool))})
    with pytest.raises(ValueError, match="input group 'a' saw no"):
        G.finalize(state)
    with pytest.raises(KeyError, match="input group 'c' not in the accumulator"):
        G.update(G.init(dims), {"c": jnp.ones((2, 3), jnp.float32)})
    with pytest.raises(ValueError, match="input group 'b': rows have d = 3, accumulator has 5"):
        G.update(G.init(dims), {"b": jnp.ones((2, 3), jnp.float32)})


# ----------------------------------------------------------------------------- linen capture
D_IN, D, H = 3, 4, 6


class _Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        q = nn.Dense(D, name="query")(x)
        k = nn.Dense(D, name="key")(x)
        v = nn.Dense(D, name="value")(x)
        a = q * k + v
        x = x + nn.Dense(D, name="out_proj")(a)
        m = jnp.tanh(nn.Dense(H, name="fc1")(x))
        return x + nn.Dense(D, name="fc2")(m)


class _Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Dense(D, name="stem")(x)
        for i in range(2):
            x = _Block(name=f"layers_{i}")(x)
        return nn.Dense(2, name="head")(x)


def _np_net_inputs(params, x):
    """Inputs of every regressed module of _Net, recomputed in numpy: {input group: [B, L, d]}."""
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
    dense = lambda z, m: z @ m["kernel"] + m["bias"]  # noqa: E731
    h = dense(np.asarray(x, np.float64), p["stem"])
    out = {}
    for i in range(2):
        b = p[f"layers_{i}"]
        out[f"layers_{i}:qkv-input"] = h
        a = dense(h, b["query"]) * dense(h, b["key"]) + dense(h, b["value"])
        out[f"layers_{i}/out_proj/kernel"] = a
        h = h + dense(a, b["out_proj"])
        out[f"layers_{i}/fc1/kernel"] = h
        m = np.tanh(dense(h, b["fc1"]))
        out[f"layers_{i}/fc2/kernel"] = m
        h = h + dense(m, b["fc2"])
    return out


def test_capture_on_tiny_linen_model():
    net = _Net()
    rng = np.random.default_rng(1)
    x0 = jnp.zeros((1, 5, D_IN), jnp.float32)
    shapes = jax.eval_shape(lambda: net.init(jax.random.PRNGKey(0), x0)["params"])   # no PRNG compile
    params = [jax.tree_util.tree_map(lambda s: jnp.asarray(0.5 * rng.standard_normal(s.shape), jnp.float32),
                                     shapes) for _ in range(2)]
    labels = build_labels(params[0])
    mods = {l.path: l for l in regressed(labels)}
    assert set(mods) == {f"layers_{i}/{n}/kernel" for i in range(2)
                         for n in ("query", "key", "value", "out_proj", "fc1", "fc2")}   # stem, head excluded
    assert len({mods[f"layers_0/{n}/kernel"].input_group for n in ("query", "key", "value")}) == 1

    batches = []
    for k in range(2):
        task = []
        for _ in range(2):
            x = rng.standard_normal((3, 5, D_IN)).astype(np.float32)
            mask = np.ones((3, 5), bool)
            mask[1, 3:] = False                  # padding
            mask[2, 1:] = False
            task.append({"x": jnp.asarray(x), "mask": jnp.asarray(mask)})
        batches.append(task)

    def apply_fn(p, batch):
        return net.apply({"params": p}, batch["x"])

    def mask_fn(batch, x_shape):
        return batch["mask"].reshape(-1)

    # capture_inputs: the raw rows of every input group (q/k/v captured once)
    cap = G.capture_inputs(apply_fn, params[0], batches[0][0], labels, mask_fn)
    ref = _np_net_inputs(params[0], batches[0][0]["x"])
    assert set(cap) == set(ref)
    for g, (rows, m) in cap.items():
        np.testing.assert_allclose(rows, ref[g].reshape(-1, ref[g].shape[-1]), rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(m, np.asarray(batches[0][0]["mask"]).reshape(-1))

    for jit in (True, False):
        grams = G.activations(apply_fn, params, batches, labels, mask_fn=mask_fn, progress=False, jit=jit)
        assert grams.kind == "activations" and grams.num_experts == 2
        assert set(grams) == set(mods) and len(set(grams.key_of.values())) == 8
        for path, lab in mods.items():
            want = []
            for k in range(2):
                rows = [_np_net_inputs(params[k], b["x"])[lab.input_group] for b in batches[k]]
                masks = [np.asarray(b["mask"]).reshape(-1) for b in batches[k]]
                want.append(_masked_gram(np.concatenate([r.reshape(-1, r.shape[-1]) for r in rows]),
                                         np.concatenate(masks)))
            got = np.asarray(grams[path])
            assert got.shape == (2, lab.d_in, lab.d_in) and got.dtype == np.float32
            np.testing.assert_allclose(got, np.stack(want), rtol=1e-4, atol=1e-5, err_msg=path)
        # q, k and v share one Gram
        np.testing.assert_array_equal(grams["layers_1/query/kernel"], grams["layers_1/value/kernel"])
        assert grams.key_of["layers_1/query/kernel"] == grams.key_of["layers_1/key/kernel"]
        assert grams.num_tokens == {0: 2 * (15 - 2 - 4), 1: 2 * (15 - 2 - 4)}


def _gelu(x):
    return 0.5 * x * (1.0 + erf(x / np.sqrt(2.0)))


def _layer_norm(x, p, eps=1e-12):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def _np_bert_layer(h, p, mask, heads):
    """One BERT layer in numpy: (inputs {qkv, attn-out, mlp-in, mlp-out}, output hidden states)."""
    dense = lambda z, m: z @ m["kernel"] + m["bias"]  # noqa: E731
    b, l, d = h.shape
    dh = d // heads
    att = p["attention"]["self"]
    q, k, v = (dense(h, att[n]).reshape(b, l, heads, dh) for n in ("query", "key", "value"))
    scores = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(dh)
    scores = np.where(mask[:, None, None, :] > 0, scores, -1e30)
    w = np.exp(scores - scores.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    ctx = np.einsum("bhqk,bkhd->bqhd", w, v).reshape(b, l, d)
    attn_out = _layer_norm(dense(ctx, p["attention"]["output"]["dense"]) + h, p["attention"]["output"]["LayerNorm"])
    inter = _gelu(dense(attn_out, p["intermediate"]["dense"]))
    out = _layer_norm(dense(inter, p["output"]["dense"]) + attn_out, p["output"]["LayerNorm"])
    return {"qkv": h, "attn-out": ctx, "mlp-in": attn_out, "mlp-out": inter}, out


def test_capture_on_tiny_hf_bert():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=30, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=16, max_position_embeddings=16)
    ids = jnp.asarray(np.random.default_rng(2).integers(0, 30, (2, 6)), jnp.int32)
    mask = jnp.asarray([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], jnp.int32)
    with jax.numpy_dtype_promotion("standard"):
        model = transformers.FlaxBertModel(cfg, _do_init=False)
        shapes = jax.eval_shape(lambda r: model.module.init(r, ids, mask)["params"], jax.random.PRNGKey(0))
    rng = np.random.default_rng(3)
    params = [jax.tree_util.tree_map(lambda s: jnp.asarray(0.4 * rng.standard_normal(s.shape), jnp.float32),
                                     shapes) for _ in range(2)]
    labels = build_labels(params[0])
    batch = {"input_ids": ids, "attention_mask": mask}

    def apply_fn(p, b):
        with jax.numpy_dtype_promotion("standard"):      # HF code is not strict-promotion safe
            return model.module.apply({"params": p}, b["input_ids"], b["attention_mask"])

    grams = G.activations(apply_fn, params, [[batch], [batch]], labels,
                          mask_fn=lambda b, shape: b["attention_mask"].reshape(-1), progress=False)
    real = np.asarray(mask).reshape(-1) > 0
    suffix = {"qkv": "attention/self/query/kernel", "attn-out": "attention/output/dense/kernel",
              "mlp-in": "intermediate/dense/kernel", "mlp-out": "output/dense/kernel"}
    for k, p in enumerate(params):
        p64 = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), p)
        emb = p64["embeddings"]
        h = _layer_norm(emb["word_embeddings"]["embedding"][np.asarray(ids)]
                        + emb["position_embeddings"]["embedding"][np.arange(6)][None]
                        + emb["token_type_embeddings"]["embedding"][0], emb["LayerNorm"])
        for i in range(2):
            inputs, h = _np_bert_layer(h, p64["encoder"]["layer"][str(i)], np.asarray(mask), 2)
            for name, x in inputs.items():
                path = f"encoder/layer/{i}/{suffix[name]}"
                ref = _masked_gram(x.reshape(-1, x.shape[-1]), real)
                np.testing.assert_allclose(grams[path][k], ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max(),
                                           err_msg=f"expert {k} {path}")
    for i in range(2):     # q/k/v: one Gram per layer
        keys = {grams.key_of[f"encoder/layer/{i}/attention/self/{n}/kernel"] for n in ("query", "key", "value")}
        assert keys == {f"encoder/layer/{i}/attention/self:qkv-input"}
    assert grams.num_tokens[0] == int(real.sum())


# ----------------------------------------------------------------------------- data-free
def _np_data_free(t):
    return np.stack([tk @ tk.T / np.sum(tk ** 2) if np.any(tk) else np.zeros((t.shape[1],) * 2) for tk in t])


def test_data_free_grams_in_matrix_view():
    rng = np.random.default_rng(4)
    shapes = {"h": {"0": {"attn": {"c_attn": {"kernel": (12, 4), "bias": (12,)}}}},        # GPT-2: [d_out, d_in]
              "blocks": {"0": {"expand_conv": {"kernel": (1, 1, 3, 5)}}},                  # 1x1 conv
              "encoder": {"layer": {"0": {"intermediate": {"dense": {"kernel": (4, 6)}}}}}}
    leaf = lambda s: jnp.asarray(rng.standard_normal(s), jnp.float32)  # noqa: E731
    is_shape = lambda x: isinstance(x, tuple)  # noqa: E731
    base = jax.tree_util.tree_map(leaf, shapes, is_leaf=is_shape)
    experts = [jax.tree_util.tree_map(lambda b: b + 0.1 * leaf(b.shape), base) for _ in range(3)]
    experts[1]["encoder"]["layer"]["0"]["intermediate"]["dense"]["kernel"] = \
        base["encoder"]["layer"]["0"]["intermediate"]["dense"]["kernel"]        # expert 1 left it unchanged
    grams = bmm_jax.grams.data_free(base, experts)
    assert grams.kind == "data_free" and grams.num_experts == 3
    views = {"h/0/attn/c_attn/kernel": lambda a: a.T,
             "blocks/0/expand_conv/kernel": lambda a: a.reshape(3, 5),
             "encoder/layer/0/intermediate/dense/kernel": lambda a: a}
    assert set(grams) == set(views)
    for path, view in views.items():
        keys = path.split("/")

        def get(tree):
            for key in keys:
                tree = tree[key]
            return np.asarray(tree, np.float64)
        t = np.stack([view(get(e) - get(base)) for e in experts])
        ref = _np_data_free(t)
        got = np.asarray(grams[path])
        assert got.shape == ref.shape
        assert np.all(np.isfinite(got))
        np.testing.assert_allclose(got, ref, atol=1e-5)
        f = np.asarray(grams.factor(path))
        np.testing.assert_allclose(np.einsum("kir,kjr->kij", f, f), ref, atol=1e-5)
    g = np.asarray(grams["encoder/layer/0/intermediate/dense/kernel"])
    assert np.all(g[1] == 0) and np.trace(g[0]) == pytest.approx(1.0, rel=1e-5)
    # the experts are validated and labels must match
    with pytest.raises(ValueError, match="need at least 2 experts"):
        bmm_jax.grams.data_free(base, experts[:1])


# ----------------------------------------------------------------------------- hybrid
def test_hybrid_matches_formula():
    rng = np.random.default_rng(5)
    d, k = 4, 3
    t = rng.standard_normal((k, d, 5))
    t[2] = 0.0                                            # expert 2: zero task vector here
    x = rng.standard_normal((k, 3, d))                    # few-shot: rank-3 data Grams
    gd = np.einsum("kni,knj->kij", x, x) / 3
    gf = _np_data_free(t)
    data = Grams({"m": jnp.asarray(gd, jnp.float32)}, {"mod/kernel": "m"})
    free = Grams({"m": jnp.asarray(gf, jnp.float32)}, {"mod/kernel": "m"}, kind="data_free")
    for beta in (0.0, 0.3, 0.5, 1.0):
        out = np.asarray(bmm_jax.grams.hybrid(data, free, beta)["mod/kernel"])
        for j in range(k):
            td = np.trace(gd[j])
            if np.trace(gf[j]) > 0:
                ref = td * (beta * gd[j] / td + (1 - beta) * gf[j] / np.trace(gf[j]))
            else:                                          # no data-free term: the data Gram alone
                ref = gd[j]
            np.testing.assert_allclose(out[j], ref, rtol=1e-5, atol=1e-6, err_msg=f"beta {beta} expert {j}")
            assert np.trace(out[j]) == pytest.approx(td, rel=1e-5)      # rescaled to tr(G_data)
    h = bmm_jax.grams.hybrid(data, free)
    assert h.kind == "hybrid"
    with pytest.raises(ValueError, match="beta must be in \\[0, 1\\]"):
        bmm_jax.grams.hybrid(data, free, 1.5)
    other = Grams({"m": jnp.asarray(gf, jnp.float32)}, {"other/kernel": "m"})
    with pytest.raises(ValueError, match="data Grams lack modules \\['mod/kernel'\\]"):
        bmm_jax.grams.hybrid(other, free)
    with pytest.raises(ValueError, match="Gram key 'zz' of module 'a/kernel' has no stored matrix"):
        Grams({}, {"a/kernel": "zz"})
