"""Tests of bmm_jax.experiment: tables, paired bootstrap intervals and temperature selection
against hand-computed numbers and brute force, config validation, and end-to-end runs on a tiny fake
benchmark (random 2-layer BERT, in-memory token-id data) -- the methods table with sampled BMM rows,
the ablations and the few-shot curve -- checked against independent recomputations with
bmm_jax.anchors / bmm_jax.merge / bmm_jax.evaluate / numpy."""
from __future__ import annotations

import dataclasses
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
    (dict(head="trained"), "head"),
    (dict(sample_draws=-1), "sample_draws"),
    (dict(sample_temperatures=(0.1, 0.01)), "ascending"),
    (dict(sample_temperatures=(0.0, 0.1)), "positive"),
    (dict(sample_rows=("tsv",)), "anchor/gram/hparams"),
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
    assert f.sample_draws == 0 and f.resolved_head == "frozen"
    p = X.preset("paper", benchmark="effnet4")
    assert p.name == "effnet4-paper" and p.module_trials == 50 and p.validation_examples == 128
    assert p.sample_draws == 8 and p.bmm_hparams == ("module",) and p.resolved_head == "frozen"
    assert p.samples("tsv", "activations", "module") and not f.samples("tsv", "activations", "module")
    assert p.samples("task_arithmetic", "activations", "module") and not p.samples("ties", "activations", "module")
    assert not p.samples("tsv", "data_free", "module")
    assert X.preset("paper", sample_rows=("*/activations/*",)).samples("ties", "activations", "module")
    assert not X.preset("paper", sample_rows=("*/activations/*",)).samples("ties", "data_free", "module")
    assert X.preset("full", head="lpft").protocol()["finetune"]["head"] == "lpft"


def test_calibration_table_hand_computed():
    k = X.MethodKey("bmm", "tsv", "data_free", "module")
    recs = [X.record(k, 0, "a", "test", {"accuracy": 0.5, "nll": 0.7, "brier": 0.6, "ece": 0.1}, "frozen"),
            X.record(k, 0, "b", "test", {"accuracy": 0.7, "nll": 0.5, "brier": 0.4, "ece": 0.3}, "frozen"),
            X.record(k, 1, "a", "test", {"accuracy": 0.6, "nll": 0.9, "brier": 0.5, "ece": 0.2}, "frozen"),
            X.record(k, 1, "b", "test", {"accuracy": 0.8, "nll": 0.7, "brier": 0.3, "ece": 0.2}, "frozen")]
    assert list(recs[0]) == list(X.RECORD_KEYS) and recs[0]["head"] == "frozen"
    table = X.format_calibration_table(recs)
    # per-seed task means: acc 0.6 / 0.7, nll 0.6 / 0.8, brier 0.5 / 0.4, ece 0.2 / 0.2
    row = [l for l in table.splitlines() if l.startswith("| BMM")][0]
    assert row == "| BMM (TSV-M, data-free, module) | 65.0 ± 7.1 | 0.700 ± 0.141 | 0.450 ± 0.071 | 20.0 ± 0.0 |"
    assert X.format_calibration_table(_recs()).count("\n") == 1          # no calibration metrics: header only


# ----------------------------------------------------------------------------- paired bootstrap
def test_paired_bootstrap_exact_cases():
    from bmm_jax.experiment import paired as P
    ones = {0: {"a": np.ones(30), "b": np.ones(10)}}
    overall, per_seed = P.paired_bootstrap(ones, num_resamples=200)
    assert overall == (1.0, 1.0, 1.0) and per_seed[0] == (1.0, 1.0, 1.0)
    # no within-seed noise: the two-level bootstrap resamples the seeds only; the mean of 3 draws
    # from {0.1, 0.2, 0.3} has an exactly known distribution (27 equally likely triples)
    const = {s: {"t": np.full(7, v)} for s, v in ((0, 0.1), (1, 0.2), (2, 0.3))}
    overall, per_seed = P.paired_bootstrap(const, num_resamples=20000, seed=1)
    assert overall.mean == pytest.approx(0.2) and per_seed[1] == pytest.approx((0.2, 0.2, 0.2))
    exact = np.sort([np.mean(t) for t in __import__("itertools").product((0.1, 0.2, 0.3), repeat=3)])
    lo, hi = exact[int(np.floor(0.025 * 26))], exact[int(np.ceil(0.975 * 26))]
    assert overall.low == pytest.approx(lo, abs=1e-9) and overall.high == pytest.approx(hi, abs=1e-9)


def test_paired_bootstrap_matches_index_resampling():
    """The multinomial shortcut for {-1, 0, 1} differences against brute-force index resampling,
    and the float path against the normal approximation of the mean."""
    from bmm_jax.experiment import paired as P
    rng = np.random.default_rng(0)
    d = rng.choice([-1, 0, 1], p=[0.2, 0.5, 0.3], size=60).astype(np.int8)
    fast = P.task_resamples(d, 40000, np.random.default_rng(1))
    brute = d[np.random.default_rng(2).integers(0, d.size, size=(40000, d.size))].mean(1)
    for q in (0.025, 0.25, 0.5, 0.75, 0.975):
        assert np.quantile(fast, q) == pytest.approx(np.quantile(brute, q), abs=1.5 / d.size)
    assert fast.std() == pytest.approx(d.std() / np.sqrt(d.size), rel=0.03)
    x = rng.standard_normal(400)
    res = P.task_resamples(x, 4000, np.random.default_rng(3))
    assert res.mean() == pytest.approx(x.mean(), abs=0.01) and res.std() == pytest.approx(
        x.std() / np.sqrt(400), rel=0.06)
    # one seed: the overall interval is the within-seed one
    overall, per_seed = P.paired_bootstrap({5: {"t": d}}, num_resamples=4000, seed=4)
    assert overall.mean == pytest.approx(d.mean()) and per_seed[5].mean == pytest.approx(d.mean())
    assert overall.low == pytest.approx(per_seed[5].low, abs=2.5 / d.size)


def test_paired_table_says_where_zero_is_inside():
    from bmm_jax.experiment import paired as P
    a = X.MethodKey("task_arithmetic")
    k1, k2 = X.MethodKey("bmm", "task_arithmetic", "activations", "module"), X.MethodKey(
        "bmm", "task_arithmetic", "data_free", "module")
    good = P.compare({0: {"t": np.ones(50, bool)}}, {0: {"t": np.zeros(50, bool)}}, k1, a)
    rng = np.random.default_rng(0)
    y = rng.random(200) < 0.5
    same = P.compare({0: {"t": y}, 1: {"t": y}}, {0: {"t": y[::-1]}, 1: {"t": y[::-1]}}, k2, a)
    assert not good.overall.includes_zero and good.verdict == "better"
    assert same.overall.includes_zero and same.verdict.startswith("includes 0")
    table = P.format_paired_table([good, same])
    assert "| BMM (TA, act, module) | Task Arithmetic | +100.00 | [+100.00, +100.00] |" in table
    assert "**yes**" in table and "no (better)" in table
    assert "includes zero for 1** (no significant difference: BMM (TA, data-free, module) vs Task Arithmetic)" in table
    with pytest.raises(ValueError, match="not the same examples"):
        P.compare({0: {"t": np.ones(3, bool)}}, {0: {"t": np.ones(4, bool)}}, k1, a)


def test_select_temperature():
    from bmm_jax.experiment.sampling import select_temperature
    calls = []

    def f(t):
        calls.append(t)
        return (np.log10(t) + 2.0) ** 2, {"t": t}
    res = select_temperature(f, (1e-4, 1e-3, 1e-2, 1e-1, 1.0), point_value=10.0)
    assert res.best == pytest.approx(1e-2) and res.details[res.best] == {"t": res.best}
    # walked up to 1e-1 and 1 (two worse in a row, then stop), refined around 1e-2 by sqrt(10)
    assert calls == pytest.approx([1e-4, 1e-3, 1e-2, 1e-1, 1.0, 1e-2 / np.sqrt(10), 1e-2 * np.sqrt(10)])
    assert list(res.values) == sorted(res.values) and res.values[0.0] == 10.0
    calls.clear()
    worse = select_temperature(lambda t: (1.0 + t, None), (1e-3, 1e-2, 1e-1), point_value=0.5, refine=False)
    assert worse.best == 0.0 and calls == [] and list(worse.values) == [0.0, 1e-3, 1e-2]   # patience 2
    with pytest.raises(ValueError, match="ascending"):
        select_temperature(f, (1e-2, 1e-3), point_value=1.0)


def test_data_free_group_grams_against_numpy():
    from bmm_jax.experiment.ablations import data_free_group_grams
    ad = tiny_adapter()
    rng = np.random.default_rng(0)
    base = ad.params
    experts = [__import__("jax").tree_util.tree_map(
        lambda x: np.asarray(x) + 0.01 * rng.standard_normal(np.shape(x)).astype(np.float32), base) for _ in range(3)]
    g = data_free_group_grams(base, experts, ad.labels)
    att = "encoder/layer/0/attention/self"
    t = lambda e, m: np.asarray(e["encoder"]["layer"]["0"]["attention"]["self"][m]["kernel"], np.float64) - \
        np.asarray(base["encoder"]["layer"]["0"]["attention"]["self"][m]["kernel"], np.float64)   # noqa: E731
    for k, e in enumerate(experts):
        tk = np.concatenate([t(e, m) for m in ("query", "key", "value")], axis=1)
        ref = tk @ tk.T / np.sum(tk ** 2)
        for m in ("query", "key", "value"):
            np.testing.assert_allclose(np.asarray(g[f"{att}/{m}/kernel"][k]), ref, rtol=2e-4, atol=1e-6)
    out = "encoder/layer/0/attention/output/dense/kernel"     # a module alone in its input group: per module
    to = np.asarray(experts[1]["encoder"]["layer"]["0"]["attention"]["output"]["dense"]["kernel"], np.float64) - \
        np.asarray(base["encoder"]["layer"]["0"]["attention"]["output"]["dense"]["kernel"], np.float64)
    np.testing.assert_allclose(np.asarray(g[out][1]), to @ to.T / np.sum(to ** 2), rtol=2e-4, atol=1e-6)




# ----------------------------------------------------------------------------- end to end
def _ta(base, experts, c):
    """Task Arithmetic with coefficient ``c`` (``anchor_scale=``, or ``scale=`` before the rename)."""
    import inspect
    from bmm_jax import anchors
    kw = "anchor_scale" if "anchor_scale" in inspect.signature(anchors.task_arithmetic).parameters else "scale"
    return anchors.task_arithmetic(base, experts, **{kw: c})


def _np_metrics(logits: np.ndarray, y: np.ndarray, bins: int = 15) -> dict:
    """float64 numpy accuracy / NLL / Brier / ECE of the mean softmax of ``logits [M, N, C]``."""
    lg = logits - logits.max(-1, keepdims=True)
    p = (np.exp(lg) / np.exp(lg).sum(-1, keepdims=True)).mean(0)
    n = len(y)
    conf, pred = p.max(1), p.argmax(1)
    ece = sum(((conf > b / bins) & (conf <= (b + 1) / bins)).sum() / n
              * abs(np.mean((pred == y)[(conf > b / bins) & (conf <= (b + 1) / bins)])
                    - conf[(conf > b / bins) & (conf <= (b + 1) / bins)].mean())
              for b in range(bins) if ((conf > b / bins) & (conf <= (b + 1) / bins)).any())
    return {"accuracy": np.mean(pred == y), "nll": -np.mean(np.log(p[np.arange(n), y])),
            "brier": np.mean(((p - np.eye(p.shape[1])[y]) ** 2).sum(1)), "ece": ece}


def test_run_experiment_tiny(tmp_path, tmp_path_factory):
    import jax

    import bmm_jax
    from bmm_jax import grams
    from bmm_jax.evaluate import evaluate, task_logits
    from bmm_jax.experiment.running import draw_samples
    from bmm_jax.experiment.sampling import sample_key
    from bmm_jax.experts import build_experts

    sampled_row = "task_arithmetic/data_free/shared"
    cfg = X.ExperimentConfig(
        benchmark=TINY_SPEC, seeds=(0,), baselines=("pretrained", "expert", "task_arithmetic", "regmean"),
        bmm_anchors=("task_arithmetic",), bmm_grams=("data_free", "activations"), bmm_hparams=("shared",),
        scale_grids={"task_arithmetic": (0.2, 0.6, 1.0)}, cache_dir=tiny_cache(tmp_path_factory),
        sample_draws=2, sample_rows=(sampled_row,), sample_temperatures=(1e-3, 1e-1), bootstrap_resamples=300,
        run_dir=str(tmp_path / "run"), name="tiny", **FAST)
    res = X.run_experiment(cfg)

    # --- files and record schema: every record has the calibration metrics and the head protocol
    for kind in ("records", "records_csv", "summary_csv", "table", "details", "plot_tasks", "plot_normalized",
                 "calibration", "paired", "paired_json", "plot_reliability"):
        assert os.path.getsize(res.files[kind]) > 0, kind
    recs = json.load(open(res.files["records"]))
    assert recs == res.records
    assert all(list(r) == list(X.RECORD_KEYS) for r in recs)
    assert all(r["head"] == "frozen" and all(isinstance(r[m], float) for m in ("accuracy", "nll", "brier", "ece"))
               for r in recs)
    keys = {(r["method"], r["anchor"], r["gram"], r["hparams"]) for r in recs}
    assert keys == {("pretrained", None, None, None), ("expert", None, None, None),
                    ("task_arithmetic", None, None, None), ("regmean", None, "activations", None),
                    ("bmm_sampled", "task_arithmetic", "data_free", "shared")} | {
        ("bmm", "task_arithmetic", g, "shared") for g in ("data_free", "activations")}
    assert len(recs) == len(keys) * 2 * 2          # x tasks x splits
    assert {r["split"] for r in recs} == {"test", "validation"} and {r["seed"] for r in recs} == {0}
    assert all(0.0 <= r["accuracy"] <= 1.0 and r["nll"] > 0 and 0 <= r["ece"] <= 1 for r in recs)
    table = open(res.files["table"]).read()
    for phrase in ("| BMM (TA, act, shared) |", "| Individual experts |", "| BMM-sampled (TA, data-free, shared) |",
                   "frozen linear-probe head", "Calibration on test", "interval includes 0?"):
        assert phrase in table, phrase
    assert not [f for f in os.listdir(res.run_dir) if f.endswith(".tmp")]

    # --- independent recomputation: experts (reused from the cache), anchor scale chosen on validation
    bench = build_experts(TINY_SPEC, cache_dir=cfg.cache_dir, seed=0, progress=False)
    ev = lambda p, split: evaluate(bench.adapter, p, bench.heads, ["a", "b"], split=split, batch_size=24,  # noqa: E731
                                   max_examples=16 if split == "validation" else None, load=tiny_load)
    rec = {(r["method"], r["anchor"], r["gram"], r["hparams"], r["task"], r["split"]): r for r in recs}
    acc = {k: r["accuracy"] for k, r in rec.items()}
    val = {c: np.mean(list(ev(_ta(bench.base_params, bench.expert_params, c), "validation").values()))
           for c in (0.2, 0.6, 1.0)}
    best_c = max(val, key=lambda c: (val[c], -c))   # first maximum in grid order
    info = res.details["seeds"]["0"]["methods"]
    assert info["task_arithmetic"]["scale"] == best_c
    assert info["task_arithmetic"]["grid_edge"] == (best_c in (0.2, 1.0))
    ta = _ta(bench.base_params, bench.expert_params, best_c)
    for t, (lg, y) in task_logits(bench.adapter, ta, bench.heads, ["a", "b"], "test", load=tiny_load).items():
        ref = _np_metrics(np.asarray(lg, np.float64)[None], y)
        for m, v in ref.items():
            assert rec[("task_arithmetic", None, None, None, t, "test")][m] == pytest.approx(v, rel=1e-4, abs=1e-6), m
    e0 = evaluate(bench.adapter, bench.expert_params[1], bench.heads, ["b"], split="test", load=tiny_load)["b"]
    assert acc[("expert", None, None, None, "b", "test")] == pytest.approx(e0)
    probe = evaluate(bench.adapter, bench.base_params, bench.probe_heads, ["a"], split="test", load=tiny_load)["a"]
    assert acc[("pretrained", None, None, None, "a", "test")] == pytest.approx(probe)

    # --- BMM: never below its anchor on validation; test accuracy = bmm_jax.merge with the found hparams
    gr = grams.data_free(bench.base_params, bench.expert_params, bench.adapter.labels)
    for g in ("data_free", "activations"):
        for h in ("shared",):
            m = info[f"bmm-task_arithmetic-{g}-{h}"]
            bval = np.mean([acc[("bmm", "task_arithmetic", g, h, t, "validation")] for t in "ab"])
            aval = np.mean([acc[("task_arithmetic", None, None, None, t, "validation")] for t in "ab"])
            assert bval >= aval - 1e-12 and m["anchor_scale"] == best_c
            assert m["grouping"] == "global"
            if g == "data_free" and not m["kept_anchor"]:
                merged, _ = bmm_jax.merge(bench.base_params, bench.expert_params, ta, gr, m["hparams"],
                                          labels=bench.adapter.labels)
                for t, a in ev(merged, "test").items():
                    assert acc[("bmm", "task_arithmetic", g, h, t, "test")] == pytest.approx(a, abs=1e-9)

    # --- the sampled row: temperature = argmin of validation NLL (0 = the point estimate); test
    # metrics = those of the mean softmax of the draws, each member evaluated separately
    s = info["bmm_sampled-task_arithmetic-data_free-shared"]
    nlls = {float(t): v for t, v in s["validation_nll"].items()}
    assert set(nlls) >= {0.0, 1e-3} and s["temperature"] == min(nlls, key=lambda t: (nlls[t], t))
    point_val_nll = np.mean([rec[("bmm", "task_arithmetic", "data_free", "shared", t, "validation")]["nll"]
                             for t in "ab"])
    assert nlls[0.0] == pytest.approx(point_val_nll)
    prep = bmm_jax.prepare(bench.base_params, bench.expert_params, ta, gr, labels=bench.adapter.labels)
    temp = s["temperature"]
    draws = (draw_samples(prep, sample_key(0, 0, "bmm_sampled-task_arithmetic-data_free-shared"), 2,
                          s["point_hparams"], temp) if temp > 0 else None)
    members = ([prep.params(s["point_hparams"])] if draws is None else
               [jax.tree_util.tree_map(lambda x, i=i: x[i], draws) for i in range(2)])
    for t in "ab":
        lg = [task_logits(bench.adapter, p, bench.heads, [t], "test", load=tiny_load)[t] for p in members]
        ref = _np_metrics(np.stack([np.asarray(l, np.float64) for l, _ in lg]), lg[0][1])
        for m, v in ref.items():
            got = rec[("bmm_sampled", "task_arithmetic", "data_free", "shared", t, "test")][m]
            assert got == pytest.approx(v, rel=1e-4, abs=1e-6), (t, m)

    # --- paired comparisons: the point estimate of BMM vs its anchor is the mean of per-task differences
    comps = {(c.key.slug, c.reference.slug): c for c in res.paired}
    assert set(comps) == {(f"bmm-task_arithmetic-{g}-shared", "task_arithmetic") for g in ("data_free", "activations")} | {
        ("bmm_sampled-task_arithmetic-data_free-shared", "task_arithmetic"),
        ("bmm_sampled-task_arithmetic-data_free-shared", "bmm-task_arithmetic-data_free-shared")}
    c = comps[("bmm-task_arithmetic-activations-shared", "task_arithmetic")]
    diff = np.mean([acc[("bmm", "task_arithmetic", "activations", "shared", t, "test")]
                    - acc[("task_arithmetic", None, None, None, t, "test")] for t in "ab"])
    assert c.overall.mean == pytest.approx(diff) and c.overall.low <= diff <= c.overall.high
    assert c.num_examples == {0: 2 * SIZES["test"]}
    assert json.load(open(res.files["paired_json"]))[0]["includes_zero"] in (True, False)

    # --- rerun in the same directory: resumes, nothing recomputed; another protocol is refused
    import bmm_jax.evaluate as E
    calls = []
    orig = E.task_log_probs
    E.task_log_probs = lambda *a, **k: calls.append(1) or orig(*a, **k)
    try:
        res2 = X.run_experiment(cfg)
    finally:
        E.task_log_probs = orig
    assert calls == [] and res2.records == res.records
    # other draw settings recompute the sampled row only
    E.task_log_probs = lambda *a, **k: calls.append(1) or orig(*a, **k)
    try:
        res3 = X.run_experiment(cfg.replace(sample_temperatures=(1e-2,)))
    finally:
        E.task_log_probs = orig
    assert calls and [r for r in res3.records if r["method"] != "bmm_sampled"] == [
        r for r in res.records if r["method"] != "bmm_sampled"]
    # the temperature chosen on accuracy, or on NLL among temperatures that keep the point estimate's
    # validation accuracy (ties: the smaller temperature); only the sampled row is recomputed
    point_acc = np.mean([acc[("bmm", "task_arithmetic", "data_free", "shared", t, "validation")] for t in "ab"])
    for crit in ("accuracy", "nll_keep_accuracy"):
        r = X.run_experiment(cfg.replace(sample_selection=crit, sample_temperatures=(1e-3, 1e-1, 1.0)))
        assert [x for x in r.records if x["method"] != "bmm_sampled"] == [
            x for x in res.records if x["method"] != "bmm_sampled"]
        si = r.details["seeds"]["0"]["methods"]["bmm_sampled-task_arithmetic-data_free-shared"]
        assert si["selection"] == crit
        assert ("temperature chosen on validation accuracy among" in open(r.files["table"]).read()) == (
            crit == "accuracy")
        accs = {float(t): v for t, v in si["validation_accuracy"].items()}
        nll = {float(t): v for t, v in si["validation_nll"].items()}
        assert accs[0.0] == pytest.approx(point_acc) and set(accs) == set(nll) and len(accs) >= 2
        if crit == "accuracy":
            want = min(accs, key=lambda t: (-accs[t], t))
        else:
            ok = [t for t in accs if accs[t] >= point_acc - 1e-12]
            want = min(ok, key=lambda t: (nll[t], t))
        assert si["temperature"] == want, (crit, accs, nll)
        val = {x["task"]: x for x in r.records if x["method"] == "bmm_sampled" and x["split"] == "validation"}
        assert np.mean([val[t]["accuracy"] for t in "ab"]) == pytest.approx(accs[want])
    with pytest.raises(ValueError, match="sample_selection must be one of"):
        cfg.replace(sample_selection="ece")
    with pytest.raises(ValueError, match="another experiment protocol"):
        X.run_experiment(cfg.replace(module_trials=3))


def test_ablations_and_fewshot_tiny(tmp_path, tmp_path_factory):
    cfg = X.ExperimentConfig(benchmark=TINY_SPEC, seeds=(0,), scale_grids={"task_arithmetic": (0.5,)},
                             cache_dir=tiny_cache(tmp_path_factory), run_dir=str(tmp_path / "run"), name="tiny",
                             **{**FAST, "plots": True})
    res = X.run_ablations(cfg, gram="data_free", trials=2, budget_trials=3, rho_sweep=(1e-6, 1.0, 1e4))
    recs = json.load(open(res.files["json"]))["records"]
    assert recs == res.records
    got = {(r["ablation"], r["setting"], r["x"]) for r in recs}
    for a, setting in (("prior", "ρ → ∞ (anchor)"), ("prior", "searched"), ("grouping", "module"),
                       ("grouping", "block"), ("rho_only", "ρ only (s = 1)"), ("prior_kind", "diagonal"),
                       ("gram_grouping", "per input group (fused q/k/v)")):
        assert (a, setting, None) in got, (a, setting)
    assert {x for (a, _, x) in got if a == "budget"} == {0, 1, 2, 3}
    for ab in ("prior", "grouping", "budget", "rho_only", "prior_kind", "gram_grouping"):
        assert os.path.getsize(res.files[f"plot_{ab}"]) > 0 and "## " in res.table
    r = {(x["ablation"], x["setting"], x["x"], x["split"]): x for x in recs}
    # the anchor item is the anchor; rho = 1e4 (s = 1) is the anchor up to ~1e-4 relative: same accuracy
    assert r[("prior", "one shared ρ, s = 1", 1e4, "test")]["accuracy"] == pytest.approx(
        r[("prior", "ρ → ∞ (anchor)", None, "test")]["accuracy"])
    # the budget curve: best validation value is non-decreasing; n = 0 is the anchor
    curve = [r[("budget", "type grouping", n, "validation")]["accuracy"] for n in range(4)]
    assert curve == sorted(curve) and r[("budget", "type grouping", 0, "validation")]["incumbent"] == 0
    assert curve[0] == pytest.approx(r[("prior", "ρ → ∞ (anchor)", None, "validation")]["accuracy"])
    # ρ only: every searched scale is 1 (to the box width)
    item = json.load(open(os.path.join(cfg.resolved_run_dir, "seed0", "ablations", "items.json")))["items"]
    hp = item["search|task_arithmetic-data_free-isotropic-type-2-rho_only"]["info"]["hparams"]
    assert hp is None or all(abs(v["scale"] - 1.0) <= 1e-6 for v in hp.values())
    # a rerun reads the stored items
    again = X.run_ablations(cfg, gram="data_free", trials=2, budget_trials=3, rho_sweep=(1e-6, 1.0, 1e4))
    assert again.records == res.records

    fs = X.run_fewshot(cfg, shots=(1, 4), grouping="global", trials=2)
    recs = fs.records
    hyb = [x for x in recs if x["setting"] == "hybrid (β searched)"]
    assert {x["x"] for x in hyb} == {1, 4} and all(x["beta"] is None or 0 <= x["beta"] <= 1 for x in hyb)
    assert {x["setting"] for x in recs if x["x"] is None} == {"data-free Grams",
                                                             "activation Grams (12 inputs per task)"}
    assert os.path.getsize(fs.files["plot_fewshot"]) > 0 and "Few-shot hybrid Grams" in fs.table

    # the same search already run by another runner of this seed is continued from a copy, not redone:
    # the few-shot data-free reference (global, 2 trials) is the ablations' global search; the budget
    # search (3 trials) continued the 2-trial type search
    root = os.path.join(cfg.resolved_run_dir, "seed0")
    ref_dir = os.path.join(root, "fewshot", "search", "task_arithmetic-data_free-global-2")
    src = json.load(open(os.path.join(ref_dir, "started_from.json")))
    assert src == {"study": os.path.join(root, "ablations", "search", "task_arithmetic-data_free-isotropic-global-2"),
                   "trials": 2}
    bud = json.load(open(os.path.join(root, "ablations", "search", "task_arithmetic-data_free-isotropic-type-3-budget",
                                      "started_from.json")))
    assert bud["trials"] == 2 and bud["study"].endswith("task_arithmetic-data_free-isotropic-type-2")
    assert curve[2] == pytest.approx(r[("prior", "searched", None, "validation")]["accuracy"])
    # ... and gives what the search run afresh gives (another run directory, nothing to copy from)
    fresh = X.run_fewshot(cfg.replace(run_dir=str(tmp_path / "fresh")), shots=(1,), grouping="global", trials=2)
    assert not os.path.exists(os.path.join(tmp_path, "fresh", "seed0", "fewshot", "search",
                                           "task_arithmetic-data_free-global-2", "started_from.json"))
    pick = lambda rs: sorted((x["split"], x["accuracy"]) for x in rs if x["setting"] == "data-free Grams")
    assert pick(fresh.records) == pick(recs) and pick(recs)
    grp = {x["split"]: x["accuracy"] for x in res.records if x["ablation"] == "grouping" and x["setting"] == "global"}
    assert dict(pick(recs)) == grp


def test_cli_ablations_tiny(tmp_path, tmp_path_factory, capsys, monkeypatch):
    from bmm_jax import experts
    from bmm_jax.cli import experiment as cli
    monkeypatch.setitem(experts.BENCHMARKS, "tiny", TINY_SPEC)
    help_text = cli.build_parser().format_help()
    for opt in ("--ablations", "--fewshot", "--head", "--sample-draws", "--clip-model", "--budget-trials", "--shots"):
        assert opt in help_text, opt
    prefix = tmp_path / "results" / "ablations_tiny"
    rc = cli.main(["--preset", "full", "--benchmark", "tiny", "--seeds", "0", "--ablations", "prior",
                   "--ablation-gram", "data_free", "--ablation-trials", "1", "--designer", "quasi_random",
                   "--validation-examples", "16", "--scale-grid", "task_arithmetic=0.5",
                   "--cache-dir", tiny_cache(tmp_path_factory), "--run-dir", str(tmp_path / "run"),
                   "--export", str(prefix), "--quiet"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert "## Prior strength" in cap.out and "ρ → ∞ (anchor)" in cap.out
    data = json.load(open(str(prefix) + ".json"))
    assert data["benchmark"] == "tiny" and {r["ablation"] for r in data["records"]} == {"prior"}
    assert os.path.getsize(str(prefix) + "_prior.png") > 0 and os.path.getsize(str(prefix) + ".md") > 0
    assert cli.main(["--ablations", "prior", "--fewshot", "--run-dir", str(tmp_path / "x"), "--quiet"]) == 2
    assert cli.main(["--clip-model", "x", "--run-dir", str(tmp_path / "x"), "--quiet"]) == 2


# ----------------------------------------------------------------------------- pooling runs of separate seeds
def _fake_ablation_run(cfg, seeds, out_dir, rng, *, settings=None, kind="prior"):
    """Write an ablation results file as ``run_ablations`` does, with random accuracies."""
    from bmm_jax.experiment.ablations import write_ablations
    recs = []
    for s in seeds:
        for split in ("validation", "test"):
            rows = ([("fewshot", "data-free Grams", None)] + [("fewshot", "hybrid (β searched)", n) for n in (1, 4)]
                    if kind == "fewshot" else
                    [("prior", "ρ → ∞ (anchor)", None), ("prior", "searched", None)]
                    + [("prior", "one shared ρ, s = 1", x) for x in (1e-3, 1.0)])
            for ab, setting, x in rows:
                recs.append({"ablation": ab, "setting": setting, "x": x, "seed": s, "split": split,
                             "accuracy": float(rng.uniform(0.5, 0.9)), "tasks": {"a": 0.5, "b": 0.5}})
    name = "fewshot" if kind == "fewshot" else "ablations"
    title = f"tiny: {'few-shot hybrid Grams' if kind == 'fewshot' else 'ablations of BMM'}, seeds {list(seeds)}"
    settings = settings or {"anchor": "task_arithmetic", "trials": 2}
    return write_ablations(recs, out_dir, title=title, details={"settings": settings, "seeds": {
        str(s): {"seconds": 10.0 * (s + 1)} for s in seeds}, "seconds": 10.0 * len(seeds)}, config=cfg,
        plots=False, name=name)["json"], recs


def _table_cells(table: str, setting: str, x: str | None = None) -> list[str]:
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0] == setting and (x is None or cells[1] == x):
            return cells
    raise AssertionError(f"no row {setting!r} {x!r} in\n{table}")


def test_combine_ablation_files_pools_seeds(tmp_path):
    rng = np.random.default_rng(0)
    cfg = X.ExperimentConfig(benchmark=TINY_SPEC, seeds=(0,), run_dir=str(tmp_path / "run"), name="tiny",
                             **{**FAST, "plots": True})
    f12, r12 = _fake_ablation_run(cfg, (1, 2), str(tmp_path / "b"), rng)
    f0, r0 = _fake_ablation_run(cfg, (0,), str(tmp_path / "a"), rng)
    before = {f: open(f, "rb").read() for f in (f0, f12)}
    res = X.combine_ablation_files([f12, f0], cfg)
    assert {f: open(f, "rb").read() for f in (f0, f12)} == before           # inputs only read
    assert res.records == r0 + r12                                          # ordered by smallest seed
    data = json.load(open(res.files["json"]))
    assert data["title"] == "tiny: ablations of BMM, seeds [0, 1, 2]" and data["records"] == res.records
    assert data["seconds"] == pytest.approx(30.0) and set(data["details"]["seeds"]) == {"0", "1", "2"}
    assert [c["seeds"] for c in data["details"]["combined_from"]] == [[0], [1, 2]]
    assert res.run_dir == os.path.join(cfg.resolved_run_dir, "ablations_combined")
    assert os.path.getsize(res.files["plot_prior"]) > 0
    # mean ± sample std over the three seeds, against numpy
    for setting, x in (("searched", None), ("one shared ρ, s = 1", 0.001)):
        for col, split in ((-2, "validation"), (-1, "test")):
            acc = np.array([r["accuracy"] for r in r0 + r12 if r["setting"] == setting and r["x"] == x
                            and r["split"] == split])
            assert acc.shape == (3,)
            cells = _table_cells(res.table, setting, None if x is None else f"{x:g}")
            assert cells[col] == f"{100 * acc.mean():.1f} ± {100 * acc.std(ddof=1):.1f}", (setting, split)
    assert "16 validation examples per task" in res.table


def test_combine_ablation_files_refuses_what_is_not_one_study(tmp_path):
    rng = np.random.default_rng(1)
    cfg = X.ExperimentConfig(benchmark=TINY_SPEC, seeds=(0,), run_dir=str(tmp_path / "run"), name="tiny", **FAST)
    f0, _ = _fake_ablation_run(cfg, (0,), str(tmp_path / "a"), rng)
    f01, _ = _fake_ablation_run(cfg, (0, 1), str(tmp_path / "b"), rng)
    f1_other, _ = _fake_ablation_run(cfg, (1,), str(tmp_path / "c"), rng, settings={"anchor": "ties", "trials": 2})
    f1_fs, _ = _fake_ablation_run(cfg, (1,), str(tmp_path / "d"), rng, kind="fewshot")
    f1_proto, _ = _fake_ablation_run(cfg.replace(validation_examples=32), (1,), str(tmp_path / "e"), rng)
    bad = tmp_path / "bad.json"
    bad.write_text("{truncated")
    norec = tmp_path / "norec.json"
    norec.write_text(json.dumps({"records": [{"ablation": "prior", "seed": 0}]}))
    cases = [([f0, f01], ValueError, "seed 0 is in both"),
             ([f0, f1_other], ValueError, "'settings' differ"),
             ([f0, f1_fs], ValueError, "holds fewshot records"),
             ([f0, f1_proto], ValueError, "another protocol than the configuration's (differs in ['validation_examples'])"),
             ([f0], ValueError, "two or more results files"),
             ([f0, f0], ValueError, "given twice"),
             ([f0, str(tmp_path / "missing.json")], FileNotFoundError, "missing.json"),
             ([f0, str(bad)], ValueError, "bad.json: not valid JSON"),
             ([f0, str(norec)], ValueError, "record 0 lacks ['setting', 'split', 'accuracy']")]
    for paths, exc, phrase in cases:
        with pytest.raises(exc) as e:
            X.combine_ablation_files(paths, cfg)
        assert phrase in str(e.value), (phrase, str(e.value))
    other_bench = dataclasses.replace(TINY_SPEC, name="tiny2")
    with pytest.raises(ValueError, match="is a 'tiny' run but the configuration's benchmark is 'tiny2'"):
        X.combine_ablation_files([f0, f1_proto], cfg.replace(benchmark=other_bench))
    assert not os.path.exists(cfg.resolved_run_dir)                         # nothing written


def test_cli_combine(tmp_path, capsys, monkeypatch):
    from bmm_jax import experts
    from bmm_jax.cli import experiment as cli
    monkeypatch.setitem(experts.BENCHMARKS, "tiny", TINY_SPEC)
    common = ["--preset", "full", "--benchmark", "tiny", "--validation-examples", "16",
              "--run-dir", str(tmp_path / "run"), "--quiet"]
    cfg = cli.config_from_args(cli.build_parser().parse_args(common))
    rng = np.random.default_rng(2)
    f0, r0 = _fake_ablation_run(cfg, (0,), str(tmp_path / "a"), rng, kind="fewshot")
    f1, r1 = _fake_ablation_run(cfg, (1,), str(tmp_path / "b"), rng, kind="fewshot")
    prefix = tmp_path / "results" / "fewshot_tiny"
    assert cli.main(common + ["--combine", f0, f1, "--export", str(prefix)]) == 0
    out = capsys.readouterr().out
    assert "## Few-shot hybrid Grams" in out and "pooled 2 files, seeds [0, 1]" in out
    assert json.load(open(str(prefix) + ".json"))["records"] == r0 + r1
    assert os.path.getsize(str(prefix) + "_fewshot.png") > 0 and os.path.getsize(str(prefix) + ".md") > 0
    assert cli.main(common + ["--combine", f0, f1, "--fewshot"]) == 2
    assert "runs nothing; drop --ablations / --fewshot" in capsys.readouterr().err
    assert cli.main(common + ["--preset", "paper", "--combine", f0, f1]) == 1     # another protocol
    assert "another protocol" in capsys.readouterr().err
