"""Evaluation harness: per-task accuracy against numpy references (a tiny dense encoder whose
forward pass is re-implemented in numpy; a tiny random BERT against the HF wrapper's own forward,
which checks the length sorting / trimming / padding and the restored example order), normalised
accuracy by hand, and errors."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bmm_jax import evaluate as E
from bmm_jax.models.adapter import ModelAdapter

D_IN, D_FEAT = 5, 6
SIZES = {"p": 37, "q": 50}            # not multiples of the batch size: padded last batches
NUM_CLASSES = {"p": 3, "q": 2}


class TinyEncoder(nn.Module):
    @nn.compact
    def __call__(self, x):
        return jnp.tanh(nn.Dense(D_FEAT, name="dense")(x))


def dense_adapter() -> ModelAdapter:
    module = TinyEncoder()
    params = module.init(jax.random.PRNGKey(0), jnp.zeros((1, D_IN), jnp.float32))["params"]
    return ModelAdapter(
        name="tiny-dense", module=module, params=params, feature_dim=D_FEAT,
        call_args=lambda b: ((jnp.asarray(b["x"]),), {}), pool=lambda out, b: out,
        preprocess_fn=lambda inputs: {"x": np.asarray(inputs, np.float32)}, preprocess_key="tiny-dense")


def dense_load(task: str, split: str):
    rng = np.random.default_rng(sum(map(ord, task + split)))
    x = rng.standard_normal((SIZES[task], D_IN)).astype(np.float32)
    y = rng.integers(0, NUM_CLASSES[task], SIZES[task]).astype(np.int32)
    return x, y


def heads_for(seed=1):
    rng = np.random.default_rng(seed)
    return {t: {"kernel": rng.standard_normal((D_FEAT, c)).astype(np.float32),
                "bias": rng.standard_normal(c).astype(np.float32)} for t, c in NUM_CLASSES.items()}


def numpy_logits(params, head, x):
    k = np.asarray(params["dense"]["kernel"], np.float64)
    b = np.asarray(params["dense"]["bias"], np.float64)
    f = np.tanh(x.astype(np.float64) @ k + b)
    return f @ np.asarray(head["kernel"], np.float64) + np.asarray(head["bias"], np.float64)


def test_accuracy_matches_numpy_reference():
    ad = dense_adapter()
    heads = heads_for()
    for params in (ad.params, jax.tree_util.tree_map(lambda p: p * 1.7 - 0.1, ad.params)):
        for split in ("validation", "test"):
            got = E.evaluate(ad, params, heads, ["p", "q"], split, batch_size=16, load=dense_load)
            assert list(got) == ["p", "q"]
            for t in ("p", "q"):
                x, y = dense_load(t, split)
                ref = float(np.mean(np.argmax(numpy_logits(params, heads[t], x), 1) == y))
                assert got[t] == ref
            lg = E.task_logits(ad, params, heads, ["p"], split, batch_size=16, load=dense_load)["p"]
            x, y = dense_load("p", split)
            np.testing.assert_allclose(lg[0], numpy_logits(params, heads["p"], x), rtol=1e-4, atol=1e-4)
            np.testing.assert_array_equal(lg[1], y)


def _np_metrics(logits, y, bins=15):
    """float64 numpy reference of accuracy / NLL / Brier / ECE from logits."""
    lg = logits - logits.max(1, keepdims=True)
    p = np.exp(lg) / np.exp(lg).sum(1, keepdims=True)
    n = len(y)
    conf, pred = p.max(1), p.argmax(1)
    ece = 0.0
    for b in range(bins):
        m = (conf > b / bins) & (conf <= (b + 1) / bins)
        if m.any():
            ece += m.sum() / n * abs(np.mean(pred[m] == y[m]) - conf[m].mean())
    return {"accuracy": np.mean(pred == y), "nll": -np.mean(np.log(p[np.arange(n), y])),
            "brier": np.mean(((p - np.eye(p.shape[1])[y]) ** 2).sum(1)), "ece": ece}, p


def test_metrics_and_ensemble_match_numpy_reference():
    ad = dense_adapter()
    heads = heads_for()
    got = E.evaluate_metrics(ad, ad.params, heads, ["p", "q"], "test", batch_size=16, load=dense_load)
    for t in ("p", "q"):
        x, y = dense_load(t, "test")
        ref, _ = _np_metrics(numpy_logits(ad.params, heads[t], x), y)
        for k, v in ref.items():
            assert got[t][k] == pytest.approx(v, rel=1e-4, abs=1e-5), (t, k)
    # an ensemble of 3 perturbed members: log of the averaged probabilities, metrics of that
    members = [jax.tree_util.tree_map(lambda a: a * f + 0.05 * f, ad.params) for f in (0.5, 1.0, 1.7)]
    draws = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *members)
    assert E.ensemble_size(draws) == 3
    ens = E.ensemble_log_probs(ad, draws, heads, ["q"], "validation", batch_size=16, load=dense_load)
    x, y = dense_load("q", "validation")
    probs = [_np_metrics(numpy_logits(m, heads["q"], x), y)[1] for m in members]
    p_mean = np.mean(probs, axis=0)
    np.testing.assert_allclose(np.exp(ens["q"][0]), p_mean, rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(ens["q"][1], y)
    m = E.metrics_of(ens)["q"]
    assert m["nll"] == pytest.approx(-np.mean(np.log(p_mean[np.arange(len(y)), y])), rel=1e-4)
    assert m["accuracy"] == pytest.approx(np.mean(p_mean.argmax(1) == y))
    with pytest.raises(ValueError, match="leading"):
        E.ensemble_size({"a": jnp.zeros((3, 2)), "b": jnp.zeros((4,))})


def test_max_examples_and_cache():
    ad = dense_adapter()
    heads = heads_for()
    E.clear_cache()
    idx = E.subsample_indices(SIZES["q"], 20)
    assert len(idx) == 20 and np.all(np.diff(idx) > 0) and idx.max() < SIZES["q"]
    np.testing.assert_array_equal(E.subsample_indices(7, None), np.arange(7))
    np.testing.assert_array_equal(E.subsample_indices(7, 50), np.arange(7))
    with pytest.raises(ValueError, match="positive"):
        E.subsample_indices(7, 0)
    x, y = dense_load("q", "test")
    got = E.evaluate(ad, ad.params, heads, ["q"], "test", batch_size=8, max_examples=20, load=dense_load)
    ref = float(np.mean(np.argmax(numpy_logits(ad.params, heads["q"], x[idx]), 1) == y[idx]))
    assert got["q"] == ref
    a = E.prepare(ad, "q", "test", max_examples=20, load=dense_load)
    assert E.prepare(ad, "q", "test", max_examples=20, load=dense_load) is a     # cached
    E.clear_cache()
    assert E.prepare(ad, "q", "test", max_examples=20, load=dense_load) is not a


def test_text_model_sorted_trimmed_batches_keep_example_order():
    """Tiny random BERT: evaluation (length-sorted, bucket-trimmed, padded batches) equals the
    HF wrapper's forward pass with numpy mean pooling and head, example by example."""
    from bmm_jax.models.hf import hf_adapter, load_hf_model
    cfg = dict(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
               intermediate_size=24, max_position_embeddings=64)
    model, params = load_hf_model("bert", config=cfg, seed=3)
    ad = hf_adapter("bert", model=model, params=params, max_length=24)
    assert ad.length_buckets == (16, 24)
    rng = np.random.default_rng(0)
    n = 23
    lens = rng.integers(2, 25, size=n)
    ids = rng.integers(2, 50, size=(n, 24)).astype(np.int32)
    ids[np.arange(24)[None, :] >= lens[:, None]] = 0
    y = rng.integers(0, 3, n).astype(np.int32)
    head = {"kernel": rng.standard_normal((16, 3)).astype(np.float32),
            "bias": rng.standard_normal(3).astype(np.float32)}

    def load(task, split):
        return ids, y

    lg, lab = E.task_logits(ad, params, {"t": head}, ["t"], "test", batch_size=8, load=load)["t"]
    np.testing.assert_array_equal(lab, y)
    mask = (ids != 0).astype(np.int32)
    with jax.numpy_dtype_promotion("standard"):   # the HF wrapper's own __call__, jitted
        hidden = jax.jit(lambda i, m: model(i, attention_mask=m, params=params).last_hidden_state)(ids, mask)
    hidden = np.asarray(hidden, np.float64)
    feats = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
    ref = feats @ head["kernel"] + head["bias"]
    np.testing.assert_allclose(lg, ref, rtol=1e-4, atol=1e-4)
    acc = E.evaluate(ad, params, {"t": head}, ["t"], "test", batch_size=8, load=load)["t"]
    assert acc == float(np.mean(np.argmax(ref, 1) == y))


def test_normalized_and_mean_accuracy():
    merged = {"a": 0.45, "b": 0.9}
    expert = {"a": 0.9, "b": 0.75}
    got = E.normalized_accuracy(merged, expert)
    assert got == pytest.approx({"a": 0.5, "b": 1.2})
    assert E.mean_accuracy(got) == pytest.approx(0.85)
    assert E.mean_accuracy(merged) == pytest.approx(0.675)
    with pytest.raises(ValueError, match="different tasks"):
        E.normalized_accuracy({"a": 0.5}, {"b": 0.5})
    with pytest.raises(ValueError, match="cannot normalise"):
        E.normalized_accuracy({"a": 0.5}, {"a": 0.0})
    with pytest.raises(ValueError, match="no task accuracies"):
        E.mean_accuracy({})
    assert E.accuracy(np.array([[0.1, 0.9], [2.0, -1.0], [0.0, 1.0]]), np.array([1, 0, 0])) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match=r"logits must be \[N, C\]"):
        E.accuracy(np.zeros(3), np.zeros(3))


def test_errors():
    ad = dense_adapter()
    heads = heads_for()
    with pytest.raises(ValueError, match=r"no head for tasks \['r'\]"):
        E.evaluate(ad, ad.params, heads, ["p", "r"], load=dense_load)
    with pytest.raises(TypeError, match="sequence of task names"):
        E.evaluate(ad, ad.params, heads, "p", load=dense_load)

    def empty(task, split):
        return np.zeros((0, D_IN), np.float32), np.zeros(0, np.int32)

    with pytest.raises(ValueError, match="is empty"):
        E.evaluate(ad, ad.params, heads, ["p"], load=empty)

    def ragged(task, split):
        return np.zeros((4, D_IN), np.float32), np.zeros(3, np.int32)

    with pytest.raises(ValueError, match="4 inputs but 3 labels"):
        E.evaluate(ad, ad.params, heads, ["q"], load=ragged)
