"""Model adapters: tiny random HF Flax families (no downloads), features vs the HF wrappers' own
outputs, label trees, activation capture vs HF hidden states, preprocessing helpers."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bmm_jax.labels import Label, input_groups, regressed
from bmm_jax.models.adapter import (head_logits, init_head, pad_batch, to_image_array, trim_batch)
from bmm_jax.models.hf import hf_adapter

TEXT_CFG = {
    "bert": dict(vocab_size=60, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                 intermediate_size=24, max_position_embeddings=32),
    "roberta": dict(vocab_size=60, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=24, max_position_embeddings=40, pad_token_id=1),
    "gpt2": dict(vocab_size=60, n_embd=16, n_layer=2, n_head=2, n_positions=32, eos_token_id=0,
                 bos_token_id=0),
}
VISION_CFG = {
    "clip_vision": dict(hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                        image_size=16, patch_size=8),
    "vit": dict(hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                image_size=16, patch_size=8),
}
PAD = {"bert": 0, "roberta": 1, "gpt2": 0}
# regressed kernels per layer: q, k, v, out, mlp-in, mlp-out (GPT-2: fused c_attn, c_proj, c_fc, c_proj)
N_REGRESSED = {"bert": 12, "roberta": 12, "gpt2": 8, "clip_vision": 12, "vit": 12}


def _ids(family, seed=0):
    rng = np.random.RandomState(seed)
    ids = rng.randint(2, 60, size=(3, 12)).astype(np.int32)
    ids[0, 7:] = PAD[family]
    ids[2, 10:] = PAD[family]
    return ids


def _images(seed=0):
    return np.random.RandomState(seed).randint(0, 256, size=(3, 28, 28)).astype(np.uint8)


@pytest.fixture(scope="module")
def loaded():
    from bmm_jax.models.hf import load_hf_model
    return {f: load_hf_model(f, config=c, seed=1) for f, c in {**TEXT_CFG, **VISION_CFG}.items()}


@pytest.fixture(scope="module")
def adapters(loaded):
    return {f: hf_adapter(f, model=m, params=p, **({"max_length": 12} if f in TEXT_CFG else {}))
            for f, (m, p) in loaded.items()}


@pytest.fixture(scope="module")
def hf_call(loaded):
    """The HF wrappers' own ``__call__`` (they build position ids, masks, NCHW->NHWC themselves),
    run under standard dtype promotion (HF code assumes it)."""
    def call(family, *args, **kwargs):
        m, p = loaded[family]
        with jax.numpy_dtype_promotion("standard"):
            return m(*args, params=p, **kwargs)
    return call


@pytest.mark.parametrize("family", list(TEXT_CFG))
def test_text_features_match_hf_wrapper(adapters, hf_call, family):
    a = adapters[family]
    ids = _ids(family)
    batch = a.preprocess(ids)
    mask = (ids != PAD[family]).astype(np.int32)
    np.testing.assert_array_equal(batch["attention_mask"], mask)
    feats = np.asarray(a.jit_apply(a.params, batch))
    assert feats.shape == (3, 16) and a.feature_dim == 16
    # reference: the HF wrapper computes position ids itself; pooling redone in numpy
    out = hf_call(family, ids, attention_mask=mask)
    h = np.asarray(out.last_hidden_state, np.float64)
    if family == "gpt2":
        last = mask.sum(1) - 1
        ref = h[np.arange(3), last]
    else:
        ref = (h * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
    np.testing.assert_allclose(feats, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", list(VISION_CFG))
def test_vision_features_match_hf_wrapper(adapters, hf_call, family):
    a = adapters[family]
    imgs = _images()
    batch = a.preprocess(imgs)
    assert batch["pixel_values"].shape == (3, 16, 16, 3)
    feats = np.asarray(a.jit_apply(a.params, batch))
    assert feats.shape == (3, 16)
    nchw = np.transpose(batch["pixel_values"], (0, 3, 1, 2))   # the wrapper takes NCHW
    out = hf_call(family, nchw)
    ref = out.pooler_output if family == "clip_vision" else out.last_hidden_state[:, 0]
    np.testing.assert_allclose(feats, np.asarray(ref), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", list(N_REGRESSED))
def test_label_tree(adapters, family):
    a = adapters[family]
    assert jax.tree_util.tree_structure(a.labels, is_leaf=lambda x: isinstance(x, Label)) == \
        jax.tree_util.tree_structure(jax.tree_util.tree_map(lambda x: 0, a.params))
    reg = regressed(a.labels)
    assert len(reg) == N_REGRESSED[family]
    kinds = sorted({l.kind for l in reg})
    if family == "gpt2":
        assert kinds == ["attn-out", "mlp-in", "mlp-out", "qkv"]
        assert all(l.layout == "transposed" for l in reg)
    else:
        assert kinds == ["attn-out", "k", "mlp-in", "mlp-out", "q", "v"]
    assert {l.block for l in reg} == {0, 1}
    assert not any("embed" in l.path for l in reg)


@pytest.mark.parametrize("family", ["bert", "gpt2", "vit"])
def test_capture_matches_hidden_states(adapters, hf_call, family):
    """The captured input of each layer's first module is that layer's input hidden state."""
    a = adapters[family]
    if family == "vit":
        batch = a.preprocess(_images())
        mask = np.ones((3, 5), bool)          # 4 patches + CLS
        out = hf_call(family, np.transpose(batch["pixel_values"], (0, 3, 1, 2)), output_hidden_states=True)
    else:
        ids = _ids(family)
        batch = a.preprocess(ids)
        mask = ids != PAD[family]
        out = hf_call(family, ids, attention_mask=mask.astype(np.int32), output_hidden_states=True)
    ex_mask = np.array([True, True, False])
    cap = jax.jit(a.capture)(a.params, batch, ex_mask)
    groups = input_groups(a.labels)
    assert set(cap) == set(groups)
    for layer in (0, 1):
        if family == "gpt2":
            key = f"h/{layer}/attn/c_attn/kernel"
            # GPT-2 applies ln_1 before c_attn: compare against LayerNorm(hidden_states) by numpy
            p = a.params["h"][str(layer)]["ln_1"]
            h = np.asarray(out.hidden_states[layer], np.float64)
            mu = h.mean(-1, keepdims=True)
            var = h.var(-1, keepdims=True)
            ref = (h - mu) / np.sqrt(var + 1e-5) * np.asarray(p["scale"]) + np.asarray(p["bias"])
        else:
            key = next(k for k in groups if k.endswith(":qkv-input") and f"/{layer}/" in k)
            if family == "vit":   # pre-LN: layernorm_before feeds q/k/v
                p = a.params["encoder"]["layer"][str(layer)]["layernorm_before"]
                h = np.asarray(out.hidden_states[layer], np.float64)
                mu = h.mean(-1, keepdims=True)
                var = h.var(-1, keepdims=True)
                ref = (h - mu) / np.sqrt(var + 1e-12) * np.asarray(p["scale"]) + np.asarray(p["bias"])
            else:
                ref = np.asarray(out.hidden_states[layer])
        x, m = cap[key]
        assert x.shape == (ref.shape[0] * ref.shape[1], 16)
        np.testing.assert_allclose(np.asarray(x), ref.reshape(-1, 16), rtol=1e-4, atol=1e-4)
        np.testing.assert_array_equal(np.asarray(m), (mask & ex_mask[:, None]).reshape(-1))
    # mlp-out input has the intermediate width
    mlp_out = [l for l in regressed(a.labels) if l.kind == "mlp-out"][0]
    assert cap[mlp_out.input_group].x.shape[1] == mlp_out.d_in


def test_tokenizer_and_buckets(loaded, tmp_path):
    from transformers import BertTokenizerFast
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "bad", "movie", "very", "a"]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt"))
    m, p = loaded["bert"]
    a = hf_adapter("bert", model=m, params=p, tokenizer=tok, max_length=32)
    b = a.preprocess(["a very good movie", "bad"])
    assert b["input_ids"].shape == (2, 32)
    np.testing.assert_array_equal(b["input_ids"][0, :6], [2, 9, 8, 5, 7, 3])
    np.testing.assert_array_equal(b["attention_mask"].sum(1), [6, 3])
    t = trim_batch(b, a.length_buckets)
    assert t["input_ids"].shape == (2, 16)        # buckets (16, 32): 6 real tokens fit in 16
    f_full = np.asarray(a.jit_apply(a.params, b))
    f_trim = np.asarray(a.jit_apply(a.params, t))
    np.testing.assert_allclose(f_trim, f_full, rtol=1e-5, atol=1e-6)
    with pytest.raises(TypeError):
        a.preprocess("a single string")


def test_with_labels_override(adapters):
    a = adapters["bert"]
    b = a.with_labels(include=[r"attention/self/(query|key)/kernel"])
    assert sorted({l.kind for l in regressed(b.labels)}) == ["k", "q"]
    assert len(regressed(a.labels)) == 12          # original untouched
    with pytest.raises(ValueError, match="matches no leaf"):
        a.with_labels(include=[r"nonexistent"])


def test_image_helpers():
    x = np.zeros((2, 8, 8), np.uint8)
    x[:, :4] = 200
    y = to_image_array(x, 32)
    assert y.shape == (2, 32, 32, 3) and y.dtype == np.float32
    np.testing.assert_array_equal(y[..., 0], y[..., 2])           # gray repeated
    np.testing.assert_allclose(y[0, 2, 5], 200.0, atol=1e-3)      # far from the edge: unchanged value
    np.testing.assert_allclose(y[0, 29, 5], 0.0, atol=1e-3)
    same = to_image_array(np.full((1, 32, 32, 3), 7, np.uint8), 32)
    np.testing.assert_array_equal(same, 7.0)
    with pytest.raises(ValueError):
        to_image_array(np.zeros((2, 8, 8, 2), np.uint8), 32)


def test_pad_batch_and_head():
    b = {"x": np.arange(6).reshape(3, 2)}
    p, m = pad_batch(b, 5)
    assert p["x"].shape == (5, 2)
    np.testing.assert_array_equal(m, [1, 1, 1, 0, 0])
    np.testing.assert_array_equal(p["x"][3:], [[0, 1], [0, 1]])
    h = init_head(jax.random.PRNGKey(0), 4, 3)
    assert h["kernel"].shape == (4, 3) and float(jnp.abs(h["kernel"]).sum()) == 0.0
    h = {"kernel": np.arange(12, dtype=np.float32).reshape(4, 3), "bias": np.array([1, 2, 3], np.float32)}
    f = np.ones((2, 4), np.float32)
    np.testing.assert_allclose(head_logits(h, f), f @ h["kernel"] + h["bias"])
    with pytest.raises(ValueError):
        init_head(jax.random.PRNGKey(0), 4, 1)
