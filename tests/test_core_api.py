"""Core pytree API: task vectors, input validation (errors name the leaf path and the problem), the
label tree (plain dicts and tiny random HF Flax models), hyper-parameter groups, anchor lookup."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bmm_jax
from bmm_jax.labels import Label, build_labels, format_label_table, hparam_groups, input_groups, regressed
from bmm_jax.merging import resolve_hparams


def _tree(rng, dtype=np.float32):
    return {"enc": {"w": jnp.asarray(rng.standard_normal((2, 3)), dtype),
                    "b": jnp.asarray(rng.standard_normal(3), dtype)},
            "step": jnp.asarray(7, jnp.int32)}


# ----------------------------------------------------------------------------- task vectors
def test_task_vectors_match_numpy():
    rng = np.random.default_rng(0)
    base = _tree(rng)
    experts = [_tree(rng) for _ in range(3)]
    tv = bmm_jax.task_vectors(base, experts)
    assert jax.tree_util.tree_structure(tv) == jax.tree_util.tree_structure(base)
    for path in (("enc", "w"), ("enc", "b")):
        get = lambda t: np.asarray(t[path[0]][path[1]], np.float64)  # noqa: E731
        ref = np.stack([get(e) - get(base) for e in experts])
        got = tv[path[0]][path[1]]
        assert got.shape == (3,) + get(base).shape and got.dtype == jnp.float32
        np.testing.assert_allclose(got, ref, atol=1e-6)
    assert tv["step"].shape == (3,) and np.all(np.asarray(tv["step"]) == 0)
    back = bmm_jax.add_task_vector(base, jax.tree_util.tree_map(lambda t: t[1], tv))
    np.testing.assert_allclose(back["enc"]["w"], experts[1]["enc"]["w"], atol=1e-6)
    assert back["enc"]["w"].dtype == jnp.float32
    assert back["step"].dtype == jnp.int32 and int(back["step"]) == 7       # integer leaves: from base
    # a bf16 base plus a float32 task vector (strict promotion): computed in float32, stored in bf16
    b16 = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16) if x.dtype == jnp.float32 else x, base)
    half = bmm_jax.add_task_vector(b16, jax.tree_util.tree_map(lambda t: t[0], tv), scale=0.5)
    assert half["enc"]["w"].dtype == jnp.bfloat16
    ref = np.asarray(b16["enc"]["w"], np.float64) + 0.5 * np.asarray(tv["enc"]["w"][0], np.float64)
    np.testing.assert_allclose(np.asarray(half["enc"]["w"], np.float64), ref, rtol=1e-2, atol=1e-2)


# ----------------------------------------------------------------------------- validation
def _entry_points():
    return {
        "task_vectors": lambda b, e: bmm_jax.task_vectors(b, e),
        "data_free": lambda b, e: bmm_jax.grams.data_free(b, e),
        "anchor": lambda b, e: bmm_jax.anchors.task_arithmetic(b, e),
        "merge": lambda b, e: bmm_jax.merge(b, e, "average", None, {"rho": 1.0}),
    }


def _model(rng):
    return {"layer": {"0": {"attention": {"self": {"query": {"kernel": jnp.asarray(rng.standard_normal((3, 3)),
                                                                                  jnp.float32),
                                                             "bias": jnp.asarray(rng.standard_normal(3),
                                                                                 jnp.float32)}}}}}}


@pytest.mark.parametrize("entry", list(_entry_points()))
def test_bad_experts_name_the_leaf_and_the_problem(entry):
    fn = _entry_points()[entry]
    rng = np.random.default_rng(1)
    base = _model(rng)
    ok = [jax.tree_util.tree_map(lambda x: x + 0.1, base) for _ in range(2)]
    q = "layer/0/attention/self/query"

    def edit(tree, leaf, value):
        t = jax.tree_util.tree_map(lambda x: x, tree)
        t["layer"]["0"]["attention"]["self"]["query"][leaf] = value
        return t

    # a different structure: a missing leaf / an extra leaf, named
    missing = jax.tree_util.tree_map(lambda x: x, ok[1])
    del missing["layer"]["0"]["attention"]["self"]["query"]["bias"]
    with pytest.raises(ValueError, match=rf"expert 1 has a different tree structure from base: missing leaves \['{q}/bias'\]"):
        fn(base, [ok[0], missing])
    extra = edit(ok[0], "scale", jnp.ones(3, jnp.float32))
    with pytest.raises(ValueError, match=rf"expert 0 has a different tree structure.*unexpected leaves \['{q}/scale'\]"):
        fn(base, [extra, ok[1]])
    # shape / dtype mismatch
    with pytest.raises(ValueError, match=rf"expert 1 leaf '{q}/kernel': shape \(3, 4\) != base shape \(3, 3\)"):
        fn(base, [ok[0], edit(ok[1], "kernel", jnp.zeros((3, 4), jnp.float32))])
    with pytest.raises(TypeError, match=rf"expert 0 leaf '{q}/bias': dtype float16 != base dtype float32"):
        fn(base, [edit(ok[0], "bias", jnp.zeros(3, jnp.float16)), ok[1]])
    # NaN / Inf, in an expert or in the base
    nan = ok[1]["layer"]["0"]["attention"]["self"]["query"]["kernel"].at[1, 2].set(jnp.nan)
    with pytest.raises(ValueError, match=rf"expert 1 leaf '{q}/kernel' has non-finite values \(1 NaN, 0 Inf\)"):
        fn(base, [ok[0], edit(ok[1], "kernel", nan)])
    inf = ok[0]["layer"]["0"]["attention"]["self"]["query"]["bias"].at[0].set(-jnp.inf)
    with pytest.raises(ValueError, match=rf"expert 0 leaf '{q}/bias' has non-finite values \(0 NaN, 1 Inf\)"):
        fn(base, [edit(ok[0], "bias", inf), ok[1]])
    with pytest.raises(ValueError, match=rf"base leaf '{q}/bias' has non-finite values"):
        fn(edit(base, "bias", inf), ok)
    # fewer than 2 experts; not a list
    with pytest.raises(ValueError, match="need at least 2 experts to merge, got 1"):
        fn(base, ok[:1])
    with pytest.raises(ValueError, match="need at least 2 experts to merge, got 0"):
        fn(base, [])
    with pytest.raises(TypeError, match="experts must be a list or tuple of parameter pytrees"):
        fn(base, {"a": ok[0], "b": ok[1]})


# ----------------------------------------------------------------------------- label tree
SHAPES = {
    "embeddings": {"word_embeddings": {"embedding": (10, 4)}},
    "encoder": {"layer": {"0": {
        "attention": {"self": {"query": {"kernel": (4, 4), "bias": (4,)}, "key": {"kernel": (4, 4)},
                               "value": {"kernel": (4, 4)}},
                      "output": {"dense": {"kernel": (4, 4)}, "LayerNorm": {"scale": (4,)}}},
        "intermediate": {"dense": {"kernel": (4, 8)}},
        "output": {"dense": {"kernel": (8, 4)}}}}},
    "blocks": {"1": {"expand_conv": {"kernel": (1, 1, 4, 8)}, "project_conv": {"kernel": (1, 1, 8, 4)},
                     "depthwise_conv": {"kernel": (3, 3, 1, 8)}}},
    "h": {"2": {"attn": {"c_attn": {"kernel": (12, 4)}}}},
    "classifier": {"kernel": (4, 3), "bias": (3,)},
    "pooler": {"dense": {"kernel": (4, 4)}},
    "misc": {"kernel": (4, 5)},
}
# path -> (kind, block, layout, d_in, d_out, input group), written by hand
EXPECTED = {
    "encoder/layer/0/attention/self/query/kernel": ("q", 0, "dense", 4, 4, "encoder/layer/0/attention/self:qkv-input"),
    "encoder/layer/0/attention/self/key/kernel": ("k", 0, "dense", 4, 4, "encoder/layer/0/attention/self:qkv-input"),
    "encoder/layer/0/attention/self/value/kernel": ("v", 0, "dense", 4, 4, "encoder/layer/0/attention/self:qkv-input"),
    "encoder/layer/0/attention/output/dense/kernel": ("attn-out", 0, "dense", 4, 4, None),
    "encoder/layer/0/intermediate/dense/kernel": ("mlp-in", 0, "dense", 4, 8, None),
    "encoder/layer/0/output/dense/kernel": ("mlp-out", 0, "dense", 8, 4, None),
    "blocks/1/expand_conv/kernel": ("mlp-in", 1, "conv1x1", 4, 8, None),
    "blocks/1/project_conv/kernel": ("mlp-out", 1, "conv1x1", 8, 4, None),
    "h/2/attn/c_attn/kernel": ("qkv", 2, "transposed", 4, 12, None),
    "misc/kernel": ("other", None, "dense", 4, 5, None),
}


def _shape_tree(shapes=SHAPES):
    return jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s, jnp.float32), shapes,
                                  is_leaf=lambda x: isinstance(x, tuple))


def _all_paths(tree):
    return ["/".join(str(getattr(k, "key", k)) for k in p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def test_label_tree_on_plain_dict():
    params = _shape_tree()
    labels = build_labels(params)
    assert jax.tree_util.tree_structure(labels, is_leaf=lambda x: isinstance(x, Label)) == \
        jax.tree_util.tree_structure(params)
    got = {l.path: l for l in regressed(labels)}
    assert set(got) == set(EXPECTED)
    for path, (kind, block, layout, d_in, d_out, group) in EXPECTED.items():
        l = got[path]
        assert (l.kind, l.block, l.layout, l.d_in, l.d_out) == (kind, block, layout, d_in, d_out), path
        assert l.input_group == (group or path)
    carried = [l for l in jax.tree_util.tree_leaves(labels, is_leaf=lambda x: isinstance(x, Label)) if not l.regressed]
    assert {l.path for l in carried} == set(_all_paths(params)) - set(EXPECTED)
    assert all(l.kind is None and l.layout is None for l in carried)
    assert input_groups(labels)["encoder/layer/0/attention/self:qkv-input"] == [
        got[f"encoder/layer/0/attention/self/{n}/kernel"] for n in ("key", "query", "value")]
    # hyper-parameter groups for every grouping
    assert list(hparam_groups(labels, "global")) == ["global"]
    assert sorted(hparam_groups(labels, "type")) == sorted({"q", "k", "v", "attn-out", "mlp-in", "mlp-out", "qkv", "other"})
    assert sorted(hparam_groups(labels, "block")) == ["block-", "block0", "block1", "block2"]
    assert sorted(hparam_groups(labels, "module")) == sorted(EXPECTED)
    with pytest.raises(ValueError, match="unknown grouping 'layer'"):
        hparam_groups(labels, "layer")
    table = format_label_table(labels)
    assert "10 regressed modules" in table and "h/2/attn/c_attn/kernel" in table


def test_cross_attention_input_groups():
    """In cross-attention q reads the decoder stream and k, v the encoder output: two groups."""
    shapes = {"decoder": {"layer": {"0": {
        "attention": {"self": {n: {"kernel": (4, 4)} for n in ("query", "key", "value")}},
        "crossattention": {"self": {n: {"kernel": (4, 4)} for n in ("query", "key", "value")}}}}},
        "t5": {"block": {"1": {"layer": {"1": {"EncDecAttention": {n: {"kernel": (4, 4)} for n in "qkvo"}}}}}}}
    got = {l.path: l.input_group for l in regressed(build_labels(_shape_tree(shapes)))}
    self_ = "decoder/layer/0/attention/self"
    cross = "decoder/layer/0/crossattention/self"
    t5 = "t5/block/1/layer/1/EncDecAttention"
    assert got == {f"{self_}/query/kernel": f"{self_}:qkv-input", f"{self_}/key/kernel": f"{self_}:qkv-input",
                   f"{self_}/value/kernel": f"{self_}:qkv-input",
                   f"{cross}/query/kernel": f"{cross}/query/kernel", f"{cross}/key/kernel": f"{cross}:kv-input",
                   f"{cross}/value/kernel": f"{cross}:kv-input",
                   f"{t5}/q/kernel": f"{t5}/q/kernel", f"{t5}/k/kernel": f"{t5}:kv-input",
                   f"{t5}/v/kernel": f"{t5}:kv-input", f"{t5}/o/kernel": f"{t5}/o/kernel"}


def test_label_matrix_views_round_trip():
    rng = np.random.default_rng(2)
    labels = {l.path: l for l in regressed(build_labels(_shape_tree()))}
    for path, leaf_shape, view in (("h/2/attn/c_attn/kernel", (12, 4), lambda a: np.swapaxes(a, -1, -2)),
                                   ("blocks/1/expand_conv/kernel", (1, 1, 4, 8), lambda a: a.reshape(a.shape[:-4] + (4, 8))),
                                   ("misc/kernel", (4, 5), lambda a: a)):
        l = labels[path]
        x = rng.standard_normal((3,) + leaf_shape).astype(np.float32)     # leading expert axis
        m = l.to_matrix(jnp.asarray(x))
        assert m.shape == (3, l.d_in, l.d_out)
        np.testing.assert_array_equal(m, view(x))
        np.testing.assert_array_equal(l.from_matrix(m), x)
    carried = Label(path="a/bias", regressed=False)
    with pytest.raises(ValueError, match="leaf 'a/bias' is carried"):
        carried.to_matrix(jnp.ones(3))


def test_label_patterns():
    params = _shape_tree()
    inc = {l.path for l in regressed(build_labels(params, include=[r"/query/", r"value/kernel$"]))}
    assert inc == {"encoder/layer/0/attention/self/query/kernel", "encoder/layer/0/attention/self/value/kernel"}
    exc = {l.path for l in regressed(build_labels(params, exclude=[r"intermediate", r"blocks"]))}
    # exclude replaces the default list: heads and pooler become regressed
    assert exc == (set(EXPECTED) - {"encoder/layer/0/intermediate/dense/kernel", "blocks/1/expand_conv/kernel",
                                    "blocks/1/project_conv/kernel"}) | {"classifier/kernel", "pooler/dense/kernel"}
    with pytest.raises(ValueError, match=r"include pattern 'nothing_here' matches no leaf of the params tree"):
        build_labels(params, include=[r"/query/", "nothing_here"])
    with pytest.raises(ValueError, match=r"exclude pattern 'zzz' matches no leaf"):
        build_labels(params, exclude=["zzz"])
    with pytest.raises(ValueError, match=r"include pattern '\(' is not a valid regular expression"):
        build_labels(params, include=["("])
    # a label tree built from other params is refused by merge, naming the problem
    rng = np.random.default_rng(3)
    small = {"layer": {"0": {"query": {"kernel": jnp.asarray(rng.standard_normal((3, 3)), jnp.float32)},
                             "key": {"kernel": jnp.asarray(rng.standard_normal((3, 3)), jnp.float32)}}}}
    experts = [jax.tree_util.tree_map(lambda x: x + 0.1 * (j + 1), small) for j in range(2)]
    with pytest.raises(ValueError, match="labels have .* leaves but base has"):
        bmm_jax.merge(small, experts, "average", None, {"rho": 1.0}, labels=build_labels(params))


# ----------------------------------------------------------------------------- HF label trees
def _hf_cases(tr):
    ids = jnp.ones((1, 4), jnp.int32)
    img = jnp.zeros((1, 8, 8, 3), jnp.float32)
    small = dict(hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=16)
    bert_like = {"attention/self/query": ("q", 8, 8), "attention/self/key": ("k", 8, 8),
                 "attention/self/value": ("v", 8, 8), "attention/output/dense": ("attn-out", 8, 8),
                 "intermediate/dense": ("mlp-in", 8, 16), "output/dense": ("mlp-out", 16, 8)}
    return {
        "bert": (tr.FlaxBertModel, tr.BertConfig(vocab_size=20, max_position_embeddings=8, **small), (ids, ids),
                 "encoder/layer/{i}/", bert_like, "encoder/layer/{i}/attention/self", "dense"),
        "roberta": (tr.FlaxRobertaModel, tr.RobertaConfig(vocab_size=20, max_position_embeddings=12, **small),
                    (ids, ids), "encoder/layer/{i}/", bert_like, "encoder/layer/{i}/attention/self", "dense"),
        "vit": (tr.FlaxViTModel, tr.ViTConfig(image_size=8, patch_size=4, **small), (img,), "encoder/layer/{i}/",
                {"attention/attention/query": ("q", 8, 8), "attention/attention/key": ("k", 8, 8),
                 "attention/attention/value": ("v", 8, 8), "attention/output/dense": ("attn-out", 8, 8),
                 "intermediate/dense": ("mlp-in", 8, 16), "output/dense": ("mlp-out", 16, 8)},
                "encoder/layer/{i}/attention/attention", "dense"),
        "clip": (tr.FlaxCLIPVisionModel, tr.CLIPVisionConfig(image_size=8, patch_size=4, **small), (img,),
                 "vision_model/encoder/layers/{i}/",
                 {"self_attn/q_proj": ("q", 8, 8), "self_attn/k_proj": ("k", 8, 8), "self_attn/v_proj": ("v", 8, 8),
                  "self_attn/out_proj": ("attn-out", 8, 8), "mlp/fc1": ("mlp-in", 8, 16), "mlp/fc2": ("mlp-out", 16, 8)},
                 "vision_model/encoder/layers/{i}/self_attn", "dense"),
        "gpt2": (tr.FlaxGPT2Model, tr.GPT2Config(n_embd=8, n_layer=2, n_head=2, vocab_size=20, n_positions=8),
                 (ids, ids, jnp.arange(4)[None]), "h/{i}/",
                 {"attn/c_attn": ("qkv", 8, 24), "attn/c_proj": ("attn-out", 8, 8), "mlp/c_fc": ("mlp-in", 8, 32),
                  "mlp/c_proj": ("mlp-out", 32, 8)}, None, "transposed"),
    }


@pytest.mark.parametrize("family", ["bert", "roberta", "vit", "clip", "gpt2"])
def test_label_tree_on_tiny_hf_models(family):
    tr = pytest.importorskip("transformers")
    cls, cfg, args, prefix, mods, qkv_parent, layout = _hf_cases(tr)[family]
    with jax.numpy_dtype_promotion("standard"):           # HF code is not strict-promotion safe
        model = cls(cfg, _do_init=False)
        params = jax.eval_shape(lambda r: model.module.init(r, *args)["params"], jax.random.PRNGKey(0))
    labels = build_labels(params)
    got = {l.path: l for l in regressed(labels)}
    expected = {}
    for i in range(2):
        for suffix, (kind, d_in, d_out) in mods.items():
            expected[prefix.format(i=i) + suffix + "/kernel"] = (kind, i, d_in, d_out)
    assert set(got) == set(expected)                     # embeddings, patch conv, pooler: carried
    shapes = {p: s.shape for p, s in zip(_all_paths(params), jax.tree_util.tree_leaves(params))}
    for path, (kind, block, d_in, d_out) in expected.items():
        l = got[path]
        assert (l.kind, l.block, l.d_in, l.d_out, l.layout) == (kind, block, d_in, d_out, layout), path
        assert shapes[path] == ((d_out, d_in) if layout == "transposed" else (d_in, d_out))
        if kind in ("q", "k", "v"):
            assert l.input_group == qkv_parent.format(i=block) + ":qkv-input"
        else:
            assert l.input_group == path
    # per block: the attention input (q/k/v, or GPT-2's fused c_attn), attn-out, mlp-in, mlp-out
    assert len(input_groups(labels)) == 2 * 4
    # carried: embeddings, norms, biases; the only carried matrix kernels are the pooler / patch conv
    carried = set(shapes) - set(got)
    assert any("embed" in p or p.startswith("wte") for p in carried)
    carried_kernels = {p for p in carried if p.endswith("kernel")}
    assert all("pooler" in p or "patch" in p for p in carried_kernels), carried_kernels


# ----------------------------------------------------------------------------- hparams / anchors
def test_resolve_hparams_groups_and_errors():
    labels = build_labels(_shape_tree())
    hp = resolve_hparams({"rho": 0.5}, labels)
    assert hp == {p: (0.5, 1.0) for p in EXPECTED}
    hp = resolve_hparams({"out": {"rho": 0.1, "scale": 0.9}, "mlp_in": {"rho": 0.2}, "fc2": {"rho": 0.3},
                          "block0": {"rho": 4.0}, "encoder/layer/0/attention/self/key": {"rho": 5.0},
                          "misc/kernel": {"rho": 6.0}, "default": {"rho": 7.0}}, labels)
    assert hp["encoder/layer/0/attention/self/key/kernel"] == (5.0, 1.0)     # module path beats block
    assert hp["encoder/layer/0/attention/self/query/kernel"] == (4.0, 1.0)   # block beats kind
    assert hp["encoder/layer/0/attention/output/dense/kernel"] == (4.0, 1.0)
    assert hp["blocks/1/expand_conv/kernel"] == (0.2, 1.0)                   # kind alias mlp_in
    assert hp["blocks/1/project_conv/kernel"] == (0.3, 1.0)                  # kind alias fc2
    assert hp["misc/kernel"] == (6.0, 1.0)
    assert hp["h/2/attn/c_attn/kernel"] == (7.0, 1.0)                        # "default" fallback
    assert resolve_hparams({"attn-out": {"rho": 0.1, "scale": 0.9}, "global": {"rho": 1.0}},
                           labels)["encoder/layer/0/attention/output/dense/kernel"] == (0.1, 0.9)
    with pytest.raises(ValueError, match=r"hparams keys \['mlp'\] name no regressed module"):
        resolve_hparams({"mlp": {"rho": 1.0}, "global": {"rho": 1.0}}, labels)
    with pytest.raises(ValueError, match=r"module 'blocks/1/expand_conv/kernel' \(kind mlp-in, block 1\) has no hparams"):
        resolve_hparams({"q": {"rho": 1.0}}, labels)
    with pytest.raises(TypeError, match=r"hparams\['q'\] must be a dict"):
        resolve_hparams({"q": 0.3, "global": {"rho": 1.0}}, labels)
    with pytest.raises(TypeError, match=r"hparams\[.rho.\] must be a number"):
        resolve_hparams({"rho": "big"}, labels)
    with pytest.raises(ValueError, match=r"rho must be >= 0 \(hparams\['k'\]\)"):
        resolve_hparams({"k": {"rho": -2.0}, "global": {"rho": 1.0}}, labels)
    with pytest.raises(ValueError, match=r"\['scale'\] must be finite"):
        resolve_hparams({"rho": 1.0, "scale": float("inf")}, labels)
    with pytest.raises(ValueError, match=r"hparams\['q'\] has no 'rho'"):
        resolve_hparams({"q": {"scale": 1.0}, "global": {"rho": 1.0}}, labels)
    with pytest.raises(ValueError, match="hparams is empty"):
        resolve_hparams({}, labels)


def test_anchor_lookup():
    for name in ("average", "task_arithmetic", "ties", "tsv", "iso_c", "iso_cts", "wudi", "regmean"):
        assert bmm_jax.anchors.get(name) is getattr(bmm_jax.anchors, name)
    with pytest.raises(ValueError, match="unknown anchor method 'nope'; known: average, task_arithmetic"):
        bmm_jax.anchors.get("nope")
