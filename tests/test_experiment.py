"""Tests of bmm_jax.experiment: tables against hand-computed numbers, config validation, and an
end-to-end run on a tiny fake benchmark (random 2-layer BERT, in-memory token-id data), checked
against independent recomputations with bmm_jax.anchors / bmm_jax.merge / bmm_jax.evaluate."""
from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

from bmm_jax import experiment as X
from bmm_jax.experts import BenchmarkSpec, FinetuneConfig

# ----------------------------------------------------------------------------- tiny benchmark
TINY_BERT = dict(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                 intermediate_size=32, max_position_embeddings=16, pad_token_id=0)
SEQ = 10
SIZES = {"train": 48, "validation": 24, "test": 24}


def tiny_adapter(cfg=None):
    from bmm_jax.models.hf import hf_adapter
    return hf_adapter("bert", config=TINY_BERT, seed=0, max_length=SEQ)


def tiny_load(task: str, split: str):
    """Token ids ``[N, SEQ]`` (0 = padding) and labels: task "a": does token 5 occur (2 classes);
    task "b": first token mod 3 (3 classes)."""
    rng = np.random.default_rng({"a": 10, "b": 20}[task] + {"train": 0, "validation": 1, "test": 2}[split])
    n = SIZES[split]
    lens = rng.integers(3, SEQ + 1, size=n)
    ids = rng.integers(1, TINY_BERT["vocab_size"], size=(n, SEQ)).astype(np.int32)
    ids[np.arange(SEQ)[None, :] >= lens[:, None]] = 0
    y = (ids == 5).any(1) if task == "a" else ids[:, 0] % 3
    return ids, y.astype(np.int32)


TINY_SPEC = BenchmarkSpec(
    "tiny", ("a", "b"), tiny_adapter,
    FinetuneConfig(max_train=32, epochs=1, batch_size=16, learning_rate=1e-3, head_learning_rate=1e-2,
                   probe_max_train=48, probe_steps=5, max_length=SEQ, feature_batch_size=24),
    load=tiny_load)

FAST = dict(wudi_steps=3, shared_trials=2, module_trials=2, designer="quasi_random", validation_examples=16,
            calibration_examples=12, hybrid_calibration_examples=6, calibration_batch_size=8, eval_batch_size=24,
            progress=False, plots=True)


def tiny_cache(tmp_path_factory, seeds=(0,)) -> str:
    """One expert cache per pytest session (shared by test_experiment.py and test_cli.py), built
    here so that the runs under test reuse it. Fine-tuning itself (bmm_jax.experts, tested there)
    runs under standard dtype promotion (optax's Adam bias correction mixes float and int32)."""
    import jax
    from bmm_jax.experts import build_experts
    d = tmp_path_factory.getbasetemp() / "bmm_tiny_experts"
    d.mkdir(exist_ok=True)
    with jax.numpy_dtype_promotion("standard"):
        for s in seeds:
            build_experts(TINY_SPEC, cache_dir=str(d), seed=s, progress=False)
    return str(d)


# ----------------------------------------------------------------------------- tables
def _recs():
    rows = []
    acc = {  # (method key) -> seed -> task -> accuracy
        ("expert",): {0: {"a": 0.8, "b": 0.5}, 1: {"a": 1.0, "b": 0.5}},
        ("bmm", "tsv", "data_free", "module"): {0: {"a": 0.4, "b": 0.5}, 1: {"a": 0.6, "b": 0.25}},
        ("task_arithmetic",): {0: {"a": 0.6, "b": 0.3}},
    }
    for key, per_seed in acc.items():
        k = X.MethodKey(*key)
        for s, d in per_seed.items():
            for t, v in d.items():
                rows.append(X.record(k, s, t, "test", v))
    return rows


def test_summarize_and_table_hand_computed():
    summ = {s.key: s for s in X.summarize(_recs(), "test")}
    b = summ[X.MethodKey("bmm", "tsv", "data_free", "module")]
    assert b.tasks["a"] == pytest.approx((0.5, math.sqrt(0.02)))          # mean(0.4, 0.6), sample std
    assert b.mean == pytest.approx(((0.45 + 0.425) / 2, math.sqrt(((0.45 - 0.4375) ** 2 + (0.425 - 0.4375) ** 2))))
    # normalised per seed: (0.4/0.8 + 0.5/0.5)/2 = 0.75 ; (0.6/1.0 + 0.25/0.5)/2 = 0.55
    assert b.normalized == pytest.approx((0.65, math.sqrt(0.02)))
    ta = summ[X.MethodKey("task_arithmetic")]
    assert ta.normalized == pytest.approx(((0.6 / 0.8 + 0.3 / 0.5) / 2, 0.0)) and ta.seeds == (0,)
    assert summ[X.MethodKey("expert")].normalized == pytest.approx((1.0, 0.0))
    table = X.format_table(_recs(), "test")
    lines = table.splitlines()
    assert lines[0] == "| method | a | b | mean | normalised mean |"
    assert [l.split(" | ")[0] for l in lines[2:]] == ["| Individual experts", "| Task Arithmetic",
                                                      "| BMM (TSV-M, data-free, module)"]
    assert "| 50.0 ± 14.1 | 37.5 ± 17.7 | 43.8 ± 1.8 | 65.0 ± 14.1 |" in lines[-1]
    assert "| 60.0 | 30.0 | 45.0 | 67.5 |" in lines[3]   # one seed: no ± part
    csv_rows = X.records_csv(_recs()).splitlines()
    assert csv_rows[0] == ",".join(X.RECORD_KEYS) and len(csv_rows) == 1 + len(_recs())


@pytest.mark.parametrize("kwargs, match", [
    (dict(seeds=()), "seeds"),
    (dict(seeds=(0, 0)), "duplicates"),
    (dict(baselines=("pretrained", "magic")), "unknown"),
    (dict(bmm_anchors=("nope",)), "unknown"),
    (dict(bmm_grams=("activation",)), "unknown"),
    (dict(bmm_hparams=("layer",)), "unknown"),
    (dict(module_grouping="global"), "module_grouping"),
    (dict(module_trials=0), "module_trials"),
    (dict(validation_examples=0), "validation_examples"),
    (dict(scale_grids={"wudi": (1.0,)}), "no scale"),
    (dict(scale_grids={"tsv": (0.0,)}), "positive"),
    (dict(benchmark="cifar10"), "unknown benchmark"),
])
def test_bad_configs(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        X.ExperimentConfig(**kwargs)
    with pytest.raises(ValueError, match="unknown preset"):
        X.preset("fastest")


def test_presets():
    d = X.preset("default")
    assert d.benchmark == "minilm5" and d.seeds == (0,) and d.bmm_hparams == ("module",)
    assert set(d.bmm_anchors) == {"task_arithmetic", "tsv"} and set(d.bmm_grams) == {"data_free", "activations"}
    f = X.preset("full", benchmark="effnet4")
    assert f.seeds == (0, 1, 2) and f.name == "effnet4-full" and f.baselines == X.BASELINES
    assert f.bmm_anchors == ("task_arithmetic", "ties", "tsv", "wudi") and f.bmm_hparams == ("shared", "module")


# ----------------------------------------------------------------------------- end to end
def test_run_experiment_tiny(tmp_path, tmp_path_factory):
    import bmm_jax
    from bmm_jax import anchors, grams
    from bmm_jax.evaluate import evaluate
    from bmm_jax.experts import build_experts

    cfg = X.ExperimentConfig(
        benchmark=TINY_SPEC, seeds=(0,), baselines=("pretrained", "expert", "task_arithmetic", "regmean"),
        bmm_anchors=("task_arithmetic",), bmm_grams=("data_free", "activations"), bmm_hparams=("shared", "module"),
        scale_grids={"task_arithmetic": (0.2, 0.6, 1.0)}, cache_dir=tiny_cache(tmp_path_factory),
        run_dir=str(tmp_path / "run"), name="tiny", **FAST)
    res = X.run_experiment(cfg)

    # --- files and record schema
    for kind in ("records", "records_csv", "summary_csv", "table", "details", "plot_tasks", "plot_normalized"):
        assert os.path.getsize(res.files[kind]) > 0, kind
    recs = json.load(open(res.files["records"]))
    assert recs == res.records
    assert all(list(r) == list(X.RECORD_KEYS) for r in recs)
    keys = {(r["method"], r["anchor"], r["gram"], r["hparams"]) for r in recs}
    assert keys == {("pretrained", None, None, None), ("expert", None, None, None),
                    ("task_arithmetic", None, None, None), ("regmean", None, "activations", None)} | {
        ("bmm", "task_arithmetic", g, h) for g in ("data_free", "activations") for h in ("shared", "module")}
    assert len(recs) == len(keys) * 2 * 2          # x tasks x splits
    assert {r["split"] for r in recs} == {"test", "validation"} and {r["seed"] for r in recs} == {0}
    assert all(0.0 <= r["accuracy"] <= 1.0 and isinstance(r["accuracy"], float) for r in recs)
    table = open(res.files["table"]).read()
    assert "| BMM (TA, act, module) |" in table and "| Individual experts |" in table
    assert not [f for f in os.listdir(res.run_dir) if f.endswith(".tmp")]

    # --- independent recomputation: experts (reused from the cache), anchor scale chosen on validation
    bench = build_experts(TINY_SPEC, cache_dir=cfg.cache_dir, seed=0, progress=False)
    ev = lambda p, split: evaluate(bench.adapter, p, bench.heads, ["a", "b"], split=split, batch_size=24,
                                   max_examples=16 if split == "validation" else None, load=tiny_load)
    acc = {(r["method"], r["anchor"], r["gram"], r["hparams"], r["task"], r["split"]): r["accuracy"] for r in recs}
    val = {c: np.mean(list(ev(anchors.task_arithmetic(bench.base_params, bench.expert_params, scale=c),
                              "validation").values())) for c in (0.2, 0.6, 1.0)}
    best_c = max(val, key=lambda c: (val[c], -c))   # first maximum in grid order
    info = res.details["seeds"]["0"]["methods"]
    assert info["task_arithmetic"]["scale"] == best_c
    assert info["task_arithmetic"]["grid_edge"] == (best_c in (0.2, 1.0))
    ta = anchors.task_arithmetic(bench.base_params, bench.expert_params, scale=best_c)
    for t, a in ev(ta, "test").items():
        assert acc[("task_arithmetic", None, None, None, t, "test")] == pytest.approx(a, abs=1e-9)
    e0 = evaluate(bench.adapter, bench.expert_params[1], bench.heads, ["b"], split="test", load=tiny_load)["b"]
    assert acc[("expert", None, None, None, "b", "test")] == pytest.approx(e0)
    probe = evaluate(bench.adapter, bench.base_params, bench.probe_heads, ["a"], split="test", load=tiny_load)["a"]
    assert acc[("pretrained", None, None, None, "a", "test")] == pytest.approx(probe)

    # --- BMM: never below its anchor on validation; test accuracy = bmm_jax.merge with the found hparams
    for g in ("data_free", "activations"):
        for h in ("shared", "module"):
            m = info[f"bmm-task_arithmetic-{g}-{h}"]
            bval = np.mean([acc[("bmm", "task_arithmetic", g, h, t, "validation")] for t in "ab"])
            aval = np.mean([acc[("task_arithmetic", None, None, None, t, "validation")] for t in "ab"])
            assert bval >= aval - 1e-12 and m["anchor_scale"] == best_c
            assert m["grouping"] == ("global" if h == "shared" else "type")
            if g == "data_free" and not m["kept_anchor"]:
                gr = grams.data_free(bench.base_params, bench.expert_params, bench.adapter.labels)
                merged, _ = bmm_jax.merge(bench.base_params, bench.expert_params, ta, gr, m["hparams"],
                                          bench.adapter.labels)
                for t, a in ev(merged, "test").items():
                    assert acc[("bmm", "task_arithmetic", g, h, t, "test")] == pytest.approx(a, abs=1e-9)

    # --- rerun in the same directory: resumes, nothing recomputed; another protocol is refused
    import bmm_jax.evaluate as E
    calls = []
    orig = E.evaluate
    E.evaluate = lambda *a, **k: calls.append(1) or orig(*a, **k)
    try:
        res2 = X.run_experiment(cfg)
    finally:
        E.evaluate = orig
    assert calls == [] and res2.records == res.records
    with pytest.raises(ValueError, match="another experiment protocol"):
        X.run_experiment(cfg.replace(module_trials=3))
