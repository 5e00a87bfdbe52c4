"""Decoder LLM families on tiny random configs (hidden 32, 2 layers, vocabulary 100; no downloads).

References: label expectations written from the configs by hand; features from the HF wrappers'
own ``__call__``; activation Grams from ``capture_intermediates`` (the outputs of the norms and of
gate/up, and the attention-out input recovered through an orthogonal o_proj), masked and averaged
in float64 numpy; PyTorch names and layouts checked by transformers' own PyTorch -> Flax loader;
a merged module against the numpy closed form.
"""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bmm_jax
from bmm_jax.labels import Label, check_labels, format_label_table, input_groups, regressed
from bmm_jax.models.hf import hf_adapter, load_hf_model
from bmm_jax.models.llm import (labels_from_safetensors, tie_word_embeddings, torch_group, torch_labels,
                                torch_name, torch_state_dict)

V, H, I, L = 100, 32, 48, 2
CFG = {
    # tied embeddings (FlaxLlama keeps an lm_head: it must equal the embedding's transpose)
    "llama": dict(vocab_size=V, hidden_size=H, intermediate_size=I, num_hidden_layers=L, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True, pad_token_id=0),
    # sliding_window=None: the loader's fix of FlaxMistral's diagonal-only mask
    "mistral": dict(vocab_size=V, hidden_size=H, intermediate_size=I, num_hidden_layers=L,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                    sliding_window=None, tie_word_embeddings=False, pad_token_id=0),
    "gemma": dict(vocab_size=V, hidden_size=H, intermediate_size=I, num_hidden_layers=L, num_attention_heads=4,
                  num_key_value_heads=1, head_dim=8, max_position_embeddings=64,
                  hidden_activation="gelu_pytorch_tanh", pad_token_id=0),
    "gpt2_lm": dict(vocab_size=V, n_embd=H, n_layer=L, n_head=4, n_positions=64, pad_token_id=0, eos_token_id=1,
                    bos_token_id=1),
}
KV = {"llama": 2 * 8, "mistral": 2 * 8, "gemma": 1 * 8}        # n_kv_heads * head_dim
PAD = 0


def _random_params(family, shapes, seed=3):
    """Random params for a shape tree (numpy: no init compilation): kernels and embeddings
    N(0, 0.1^2), biases N(0, 0.02^2), norm weights 1 + N(0, 0.1^2) (Gemma's RMSNorm scales by
    1 + weight: N(0, 0.1^2))."""
    rng = np.random.default_rng(seed)

    def leaf(path, sds):
        name = path[-1].key
        z = rng.standard_normal(sds.shape).astype(np.float32)
        if name in ("kernel", "embedding"):
            v = 0.1 * z
        elif name == "bias":
            v = 0.02 * z
        else:
            v = 0.1 * z + (0.0 if family == "gemma" else 1.0)
        return jnp.asarray(v, sds.dtype)
    params = jax.tree_util.tree_map_with_path(leaf, shapes)
    return tie_word_embeddings(params) if CFG[family].get("tie_word_embeddings") else params


@pytest.fixture(scope="module")
def models():
    out = {}
    for f, c in CFG.items():
        model, shapes = load_hf_model(f, config=c, init=False)
        assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree_util.tree_leaves(shapes))
        out[f] = (model, _random_params(f, shapes))
    return out


@pytest.fixture(scope="module")
def adapters(models):
    return {f: hf_adapter(f, model=m, params=p, max_length=12) for f, (m, p) in models.items()}


def _batch(seed=0):
    """3 sequences of 12 tokens: right-padded, full, left-padded."""
    rng = np.random.RandomState(seed)
    ids = rng.randint(2, V, size=(3, 12)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[0, 7:] = 0
    mask[2, :3] = 0
    ids[mask == 0] = PAD
    return {"input_ids": ids, "attention_mask": mask}


def _positions(mask):
    return np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)


# ----------------------------------------------------------------------------- labels
@pytest.mark.parametrize("family", list(CFG))
def test_label_tree(adapters, family):
    a = adapters[family]
    labels = a.labels
    check_labels(labels, a.params)
    reg = regressed(labels)
    if family == "gpt2_lm":
        want = {"attn/c_attn": ("qkv", H, 3 * H, "transposed"), "attn/c_proj": ("attn-out", H, H, "transposed"),
                "mlp/c_fc": ("mlp-in", H, 4 * H, "transposed"), "mlp/c_proj": ("mlp-out", 4 * H, H, "transposed")}
        prefix = "transformer/h/{b}/"
    else:
        kv = KV[family]
        want = {"self_attn/q_proj": ("q", H, H, "dense"), "self_attn/k_proj": ("k", H, kv, "dense"),
                "self_attn/v_proj": ("v", H, kv, "dense"), "self_attn/o_proj": ("attn-out", H, H, "dense"),
                "mlp/gate_proj": ("mlp-in", H, I, "dense"), "mlp/up_proj": ("mlp-in", H, I, "dense"),
                "mlp/down_proj": ("mlp-out", I, H, "dense")}
        prefix = "model/layers/{b}/"
    expected = {prefix.format(b=b) + m + "/kernel": (b,) + v for b in range(L) for m, v in want.items()}
    got = {l.path: (l.block, l.kind, l.d_in, l.d_out, l.layout) for l in reg}
    assert got == expected
    # carried: embeddings, norms, biases, the LM head
    carried = [l.path for l in jax.tree_util.tree_leaves(labels, is_leaf=lambda x: isinstance(x, Label))
               if not l.regressed]
    assert any("embed" in p or "wte" in p for p in carried)
    assert ("lm_head/kernel" in carried) == (family in ("llama", "mistral"))
    assert all(("norm" in p or "ln_" in p or "embed" in p or "wte" in p or "wpe" in p or "lm_head" in p
                or p.endswith("bias")) for p in carried)
    # input groups: q/k/v share one input, gate/up share one, o and down read their own
    groups = {g: sorted(l.path.split("/")[-2] for l in ls) for g, ls in input_groups(labels).items()}
    if family == "gpt2_lm":
        assert sorted(map(tuple, groups.values())) == sorted([("c_attn",), ("c_proj",), ("c_fc",), ("c_proj",)] * L)
    else:
        assert sorted(map(tuple, groups.values())) == sorted(
            [("k_proj", "q_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",)] * L)
    table = format_label_table(labels)
    assert f"{len(reg)} regressed modules" in table
    if family != "gpt2_lm":
        assert "model/layers/1/self_attn:qkv-input" in table and "model/layers/0/mlp:mlp-input" in table
        assert f"{H} x {KV[family]}" in table


@pytest.mark.parametrize("family", list(CFG))
def test_torch_labels_match_flax_labels(adapters, family):
    a = adapters[family]
    state = torch_state_dict(a.params)
    tl = torch_labels({k: v.shape for k, v in state.items()})
    check_labels(tl, state)
    flax_reg = regressed(a.labels)
    assert len(regressed(tl)) == len(flax_reg)
    for l in flax_reg:
        t = tl[torch_name(l.path)]
        assert (t.kind, t.block, t.d_in, t.d_out) == (l.kind, l.block, l.d_in, l.d_out)
        assert t.input_group == torch_group(l.input_group)
        # the 2-D view of the PyTorch tensor is the Flax kernel's
        np.testing.assert_array_equal(np.asarray(t.to_matrix(state[t.path])),
                                      np.asarray(l.to_matrix(_leaf(a.params, l.path))))
    # tied heads are omitted as in PyTorch checkpoints
    assert ("lm_head.weight" in state) == (family == "mistral")


def _leaf(tree, path):
    for k in path.split("/"):
        tree = tree[k]
    return tree


def test_qwen2_torch_labels():
    """transformers 4.57 has no Flax Qwen2: its PyTorch-named checkpoints get a flat label tree
    (GQA k/v, q/k/v biases carried, tied embeddings absent)."""
    assert not hasattr(__import__("transformers"), "FlaxQwen2ForCausalLM")
    with pytest.raises(ValueError, match="no Flax Qwen2"):
        load_hf_model("qwen2", config={})
    hid, inter, kv = 64, 96, 2 * 16             # 4 heads of 16, 2 key/value heads
    shapes = {"model.embed_tokens.weight": (V, hid), "model.norm.weight": (hid,)}
    for b in range(L):
        p = f"model.layers.{b}."
        shapes.update({p + "self_attn.q_proj.weight": (hid, hid), p + "self_attn.q_proj.bias": (hid,),
                       p + "self_attn.k_proj.weight": (kv, hid), p + "self_attn.k_proj.bias": (kv,),
                       p + "self_attn.v_proj.weight": (kv, hid), p + "self_attn.v_proj.bias": (kv,),
                       p + "self_attn.o_proj.weight": (hid, hid), p + "mlp.gate_proj.weight": (inter, hid),
                       p + "mlp.up_proj.weight": (inter, hid), p + "mlp.down_proj.weight": (hid, inter),
                       p + "input_layernorm.weight": (hid,), p + "post_attention_layernorm.weight": (hid,)})
    tl = torch_labels(shapes)
    reg = {l.path: l for l in regressed(tl)}
    assert len(reg) == 7 * L
    k = reg["model.layers.1.self_attn.k_proj.weight"]
    assert (k.kind, k.block, k.d_in, k.d_out, k.layout) == ("k", 1, hid, kv, "transposed")
    d = reg["model.layers.0.mlp.down_proj.weight"]
    assert (d.kind, d.d_in, d.d_out, d.input_group) == ("mlp-out", inter, hid, d.path)
    assert {reg[f"model.layers.0.self_attn.{m}_proj.weight"].input_group for m in "qkv"} == \
        {"model.layers.0.self_attn:qkv-input"}
    assert {reg[f"model.layers.0.mlp.{m}_proj.weight"].input_group for m in ("gate", "up")} == \
        {"model.layers.0.mlp:mlp-input"}
    assert not tl["model.layers.0.self_attn.q_proj.bias"].regressed
    assert not tl["model.embed_tokens.weight"].regressed
    # include / exclude on the tensor names
    only = torch_labels(shapes, include=[r"layers\.1\..*_proj"], exclude=["down"])
    assert sorted(l.path for l in regressed(only)) == sorted(
        p for p in reg if ".layers.1." in p and "down" not in p)
    with pytest.raises(ValueError, match="matches no tensor name"):
        torch_labels(shapes, include=["nothing_like_this"])


def test_labels_from_safetensors(tmp_path, adapters):
    from safetensors.numpy import save_file
    state = torch_state_dict(adapters["llama"].params)
    names = sorted(state)
    save_file({n: state[n] for n in names[: len(names) // 2]}, str(tmp_path / "a.safetensors"))
    save_file({n: state[n] for n in names[len(names) // 2:]}, str(tmp_path / "b.safetensors"))
    tl = labels_from_safetensors([tmp_path / "a.safetensors", tmp_path / "b.safetensors"])
    assert tl == torch_labels({k: v.shape for k, v in state.items()})


# ----------------------------------------------------------------------------- models
@pytest.mark.parametrize("family", ["llama", "gpt2_lm"])
def test_pytorch_checkpoint_loads_back(tmp_path, models, family):
    """torch_state_dict writes the names and layouts transformers' PyTorch -> Flax loader expects
    (the tied Llama head is omitted and restored from the embedding)."""
    from safetensors.numpy import save_file
    model, params = models[family]
    model.config.save_pretrained(str(tmp_path))
    save_file(torch_state_dict(params), str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    _, loaded = load_hf_model(family, path=str(tmp_path))
    assert jax.tree_util.tree_structure(loaded) == jax.tree_util.tree_structure(params)
    for (p, x), y in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree_util.tree_leaves(loaded)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(p))


def test_llama_tied_head_and_mistral_window(models):
    _, p = models["llama"]
    np.testing.assert_array_equal(np.asarray(p["lm_head"]["kernel"]),
                                  np.asarray(p["model"]["embed_tokens"]["embedding"]).T)
    # Mistral without a sliding window is Llama: same params, same logits (FlaxMistral with
    # sliding_window=None would attend to the diagonal only)
    mm, mp = models["mistral"]
    import transformers
    b = _batch(1)
    with jax.numpy_dtype_promotion("standard"):
        lm = transformers.FlaxLlamaForCausalLM(
            transformers.LlamaConfig(**{**CFG["llama"], "tie_word_embeddings": False}), _do_init=False)
        a = lm(b["input_ids"], attention_mask=b["attention_mask"], params=mp).logits
        m = mm(b["input_ids"], attention_mask=b["attention_mask"], params=mp).logits
    assert mm.config.sliding_window == 64
    np.testing.assert_allclose(np.asarray(m), np.asarray(a), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", list(CFG))
def test_features_match_hf_wrapper(adapters, models, family):
    a = adapters[family]
    model, params = models[family]
    b = _batch()
    feats = np.asarray(a.jit_apply(a.params, b))
    with jax.numpy_dtype_promotion("standard"):
        out = model(b["input_ids"], attention_mask=b["attention_mask"], position_ids=_positions(b["attention_mask"]),
                    params=params, output_hidden_states=True)
    h = np.asarray(out.hidden_states[-1])
    last = np.array([6, 11, 11])                  # last real token of each row
    np.testing.assert_allclose(feats, h[np.arange(3), last], rtol=1e-4, atol=1e-5)
    # token ids with the pad id are masked by preprocess
    pre = a.preprocess(b["input_ids"])
    np.testing.assert_array_equal(pre["attention_mask"], b["attention_mask"])


# ----------------------------------------------------------------------------- activation Grams
def _orthogonal_out(family, params, seed=0):
    """Params with orthogonal attention-out kernels (their inputs are recovered exactly)."""
    rng = np.random.default_rng(seed)
    params = jax.tree_util.tree_map(lambda x: x, params)
    for b in range(L):
        q, _ = np.linalg.qr(rng.standard_normal((H, H)))
        blk = params["transformer"]["h"][str(b)]["attn"]["c_proj"] if family == "gpt2_lm" else \
            params["model"]["layers"][str(b)]["self_attn"]["o_proj"]
        blk["kernel"] = jnp.asarray(0.5 * q, jnp.float32)
    return params


def _reference_grams(family, model, params, batches):
    """{input group: masked mean x x^T} from capture_intermediates, float64 numpy."""
    from transformers.modeling_flax_utils import ACT2FN
    body = "transformer" if family == "gpt2_lm" else "model"
    sums, counts = {}, {}
    for batch in batches:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        with jax.numpy_dtype_promotion("standard"):
            _, st = model.module.apply({"params": params}, ids, mask, _positions(mask), deterministic=True,
                                       capture_intermediates=True, mutable=["intermediates"],
                                       method=lambda m, *a, **k: getattr(m, body)(*a, **k))
        inter = st["intermediates"][body]
        rows = mask.reshape(-1) > 0

        def out(*keys):
            t = inter
            for k in keys:
                t = t[k]
            return np.asarray(t["__call__"][0], np.float64).reshape(-1, np.shape(t["__call__"][0])[-1])

        for b in range(L):
            if family == "gpt2_lm":
                base = f"transformer/h/{b}/"
                blk = ("h", str(b))
                c_proj = params["transformer"]["h"][str(b)]["attn"]["c_proj"]
                k_o = np.asarray(c_proj["kernel"], np.float64).T
                x = {base + "attn/c_attn/kernel": out(*blk, "ln_1"),
                     base + "attn/c_proj/kernel": (out(*blk, "attn", "c_proj") - np.asarray(c_proj["bias"]))
                     @ np.linalg.inv(k_o),
                     base + "mlp/c_fc/kernel": out(*blk, "ln_2"),
                     base + "mlp/c_proj/kernel": np.asarray(ACT2FN["gelu_new"](jnp.asarray(
                         out(*blk, "mlp", "c_fc"), jnp.float32)), np.float64)}
            else:
                base = f"model/layers/{b}/"
                blk = ("layers", str(b))
                k_o = np.asarray(params["model"]["layers"][str(b)]["self_attn"]["o_proj"]["kernel"], np.float64)
                act = ACT2FN[model.config.hidden_act if family != "gemma" else "gelu_pytorch_tanh"]
                gate = out(*blk, "mlp", "gate_proj")
                x = {base + "self_attn:qkv-input": out(*blk, "input_layernorm"),
                     base + "self_attn/o_proj/kernel": out(*blk, "self_attn", "o_proj") @ np.linalg.inv(k_o),
                     base + "mlp:mlp-input": out(*blk, "post_attention_layernorm"),
                     base + "mlp/down_proj/kernel": out(*blk, "mlp", "up_proj") * np.asarray(
                         act(jnp.asarray(gate, jnp.float32)), np.float64)}
            for g, v in x.items():
                v = v[rows]
                sums[g] = sums.get(g, 0.0) + v.T @ v
                counts[g] = counts.get(g, 0) + v.shape[0]
    return {g: sums[g] / counts[g] for g in sums}, counts


@pytest.mark.parametrize("family", list(CFG))
def test_activation_grams_match_reference(tmp_path, adapters, models, family):
    a = adapters[family]
    model, _ = models[family]
    params = _orthogonal_out(family, a.params)
    batches = [_batch(0), _batch(1)]
    ref, counts = _reference_grams(family, model, params, batches)
    assert set(counts.values()) == {2 * int(_batch(0)["attention_mask"].sum())}   # padding masked
    # the library's estimator through the adapter, and the streamed file writer
    g_mem = bmm_jax.grams.activations(a, [params], [batches], progress=False)
    from bmm_jax.grams.files import collect_grams_to_file, load_grams
    g_file = collect_grams_to_file(a, params, batches, tmp_path / "g.safetensors")
    g_load = load_grams(tmp_path / "g.safetensors", a.labels)
    for l in regressed(a.labels):
        want = ref[l.input_group]
        for g in (g_mem, g_file, g_load):
            np.testing.assert_allclose(np.asarray(g[l.path][0], np.float64), want, rtol=2e-4,
                                       atol=2e-4 * np.abs(want).max(), err_msg=l.path)
    assert g_file.num_tokens[0] == counts[next(iter(counts))]


# ----------------------------------------------------------------------------- merge
def _experts(params, k=3, eps=0.02):
    """Base + small random perturbations of every leaf (numpy: no per-shape compilations)."""
    leaves, tree = jax.tree_util.tree_flatten(params)
    out = []
    for i in range(k):
        rng = np.random.default_rng(100 + i)
        out.append(jax.tree_util.tree_unflatten(tree, [
            jnp.asarray(np.asarray(x) + eps * np.std(np.asarray(x)) * rng.standard_normal(x.shape).astype(np.float32))
            for x in leaves]))
    return out


@pytest.mark.parametrize("family", ["llama", "gpt2_lm"])
def test_merge_three_experts_and_reload(tmp_path, adapters, models, family):
    a = adapters[family]
    model, base = models[family]
    experts = _experts(base)
    if family == "llama":                                   # tied: keep each expert's head tied
        experts = [tie_word_embeddings(e) for e in experts]
    from bmm_jax.grams.files import collect_grams_to_file, load_grams
    files = [tmp_path / f"task{k}.safetensors" for k in range(3)]
    for k, e in enumerate(experts):
        collect_grams_to_file(a, e, [_batch(10 + k)], files[k], task_name=f"t{k}")
    grams = load_grams(files, a.labels)
    assert grams.num_experts == 3
    anchor = bmm_jax.anchors.task_arithmetic(base, experts, labels=a.labels)
    hp = {"rho": 0.3, "scale": 1.0}
    res = bmm_jax.merge(base, experts, anchor, grams, hp, labels=a.labels)
    merged = res[0]
    if family == "llama":
        merged = tie_word_embeddings(merged)
    # one module against the numpy closed form
    lab = next(l for l in regressed(a.labels) if l.kind in ("k", "qkv"))
    t = np.stack([np.asarray(lab.to_matrix(_leaf(e, lab.path)) - lab.to_matrix(_leaf(base, lab.path)), np.float64)
                  for e in experts])
    ta = np.asarray(lab.to_matrix(_leaf(anchor, lab.path)) - lab.to_matrix(_leaf(base, lab.path)), np.float64)
    g = np.asarray(grams[lab.path], np.float64)
    s = g.sum(0)
    lam = 0.3 * np.trace(s) / lab.d_in
    want = np.linalg.solve(s + lam * np.eye(lab.d_in), np.einsum("kij,kjo->io", g, t) + lam * ta)
    got = np.asarray(lab.to_matrix(_leaf(merged, lab.path)) - lab.to_matrix(_leaf(base, lab.path)), np.float64)
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3 * np.abs(want).max())
    # the merged tree is a valid params tree of the causal LM: forward, save, reload, same logits
    b = _batch(5)
    with jax.numpy_dtype_promotion("standard"):
        logits = model(b["input_ids"], attention_mask=b["attention_mask"], params=merged).logits
    assert logits.shape == (3, 12, V) and bool(jnp.all(jnp.isfinite(logits)))
    model.save_pretrained(str(tmp_path / "merged"), params=merged)
    m2, p2 = load_hf_model(family, path=str(tmp_path / "merged"))
    with jax.numpy_dtype_promotion("standard"):
        logits2 = m2(b["input_ids"], attention_mask=b["attention_mask"], params=p2).logits
    np.testing.assert_allclose(np.asarray(logits2), np.asarray(logits), rtol=1e-5, atol=1e-5)


def test_grams_from_calibration_text(tmp_path, models):
    """Calibration text through a tokenizer: right- and left-padded batches give the same Grams
    (padding masked, positions from the mask), equal to the Grams of the token ids themselves."""
    from tokenizers import Tokenizer, models as tok_models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from bmm_jax.grams.files import collect_grams_to_file
    words = "the cat sat on a mat and dog ran far away from home".split()
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tk = Tokenizer(tok_models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    texts = [["the cat sat on a mat", "a dog ran far away from home and the cat sat", "home"],
             ["the dog sat", "far away", "a cat ran on the mat and the dog ran home"]]
    model, params = models["llama"]
    out = {}
    for side in ("right", "left"):
        tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>",
                                      unk_token="<unk>", padding_side=side)
        a = hf_adapter("llama", model=model, params=params, tokenizer=tok, max_length=12)
        out[side] = collect_grams_to_file(a, params, texts, tmp_path / f"{side}.safetensors", task_name=side)
        ids = [tok(t, padding="max_length", max_length=12, return_tensors="np") for t in texts]
        out[side + "-ids"] = collect_grams_to_file(
            a, params, [{"input_ids": e["input_ids"], "attention_mask": e["attention_mask"]} for e in ids],
            tmp_path / f"{side}-ids.safetensors")
    n_tokens = sum(len(t.split()) for batch in texts for t in batch)
    for g in out.values():
        assert g.num_tokens == {0: float(n_tokens)}
    for p in out["right"].key_of:
        want = np.asarray(out["right-ids"][p])
        np.testing.assert_array_equal(np.asarray(out["right"][p]), want)
        np.testing.assert_allclose(np.asarray(out["left"][p]), want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
