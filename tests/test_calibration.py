"""Calibration metrics against hand-computed cases and a numpy brute force; ensemble averaging;
reliability diagrams written as PNG."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bmm_jax import calibration as C


def _brute(p: np.ndarray, y: np.ndarray, bins: int = 15) -> dict:
    """Loops, float64, explicit bin intervals (lo, hi] (the first bin closed at 0)."""
    n, c = p.shape
    acc = np.mean([int(np.argmax(p[i]) == y[i]) for i in range(n)])
    nll = np.mean([-np.log(p[i, y[i]]) for i in range(n)])
    brier = np.mean([sum((p[i, j] - (1.0 if j == y[i] else 0.0)) ** 2 for j in range(c)) for i in range(n)])
    ece = 0.0
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        members = [i for i in range(n) if (lo < p[i].max() <= hi) or (b == 0 and p[i].max() == 0.0)]
        if members:
            a = np.mean([int(np.argmax(p[i]) == y[i]) for i in members])
            cf = np.mean([p[i].max() for i in members])
            ece += len(members) / n * abs(a - cf)
    return {"accuracy": acc, "nll": nll, "brier": brier, "ece": ece}


def test_hand_computed_case():
    # 4 examples, 2 classes: confidences 0.9 (right), 0.6 (wrong), 0.8 (right), 0.55 (right)
    p = np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.45, 0.55]])
    y = np.array([0, 1, 1, 1])
    m = C.metrics_dict(np.log(p), y)
    assert m["accuracy"] == pytest.approx(0.75)
    assert m["nll"] == pytest.approx(-(np.log(0.9) + np.log(0.4) + np.log(0.8) + np.log(0.55)) / 4, rel=1e-6)
    assert m["brier"] == pytest.approx((2 * 0.1 ** 2 + 2 * 0.6 ** 2 + 2 * 0.2 ** 2 + 2 * 0.45 ** 2) / 4, rel=1e-6)
    # 15 bins of width 1/15: 0.9 -> bin 13 (0.8667, 0.9333]; 0.6 -> bin 8 (0.5333, 0.6]; 0.8 -> bin 11
    # (0.7333, 0.8]; 0.55 -> bin 8. Bin 8: acc 1/2, conf 0.575; others single examples.
    ece = (abs(1 - 0.9) + 2 * abs(0.5 - 0.575) + abs(1 - 0.8)) / 4
    assert m["ece"] == pytest.approx(ece, rel=1e-5)
    rel = C.reliability(np.log(p), y)
    assert np.asarray(rel.counts).tolist() == [0] * 8 + [2, 0, 0, 1, 0, 1, 0]
    assert float(rel.confidence[8]) == pytest.approx(0.575) and float(rel.accuracy[8]) == pytest.approx(0.5)
    assert C.ece_of(rel) == pytest.approx(ece, rel=1e-5)


@pytest.mark.parametrize("seed, c, bins", [(0, 3, 15), (1, 10, 15), (2, 2, 7)])
def test_against_numpy_brute_force(seed, c, bins):
    rng = np.random.default_rng(seed)
    n = 200
    logits = rng.standard_normal((n, c)) * rng.uniform(0.5, 4.0)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    y = rng.integers(0, c, n)
    got = jax.device_get(C.metrics(C.log_probabilities(logits.astype(np.float32)), y.astype(np.int32),
                                   num_bins=bins))
    ref = _brute(p, y, bins)
    for k in C.METRICS:
        assert float(got[k]) == pytest.approx(ref[k], rel=2e-5, abs=2e-6), k
    # pooled per-example statistics give the same diagram
    ex = C.example_statistics(np.log(p).astype(np.float32), y.astype(np.int32))
    assert C.ece_of(C.reliability_from_examples(ex["confidence"], ex["correct"], bins)) == pytest.approx(
        ref["ece"], rel=2e-5, abs=2e-6)
    np.testing.assert_allclose(ex["nll"], -np.log(p[np.arange(n), y]), rtol=2e-5, atol=2e-6)


def test_perfect_and_uniform_predictions():
    y = jnp.asarray([0, 1, 2, 1], jnp.int32)
    exact = jnp.log(jax.nn.one_hot(y, 3) * (1 - 2e-7) + 1e-7)
    m = C.metrics_dict(exact, y)
    assert m["accuracy"] == 1.0 and m["nll"] < 1e-5 and m["brier"] < 1e-10 and m["ece"] < 1e-5
    uniform = jnp.full((4, 3), -jnp.log(3.0))
    m = C.metrics_dict(uniform, y)
    assert m["nll"] == pytest.approx(np.log(3)) and m["brier"] == pytest.approx(2 / 3, rel=1e-6)
    # argmax ties -> class 0: one of four correct; confidence 1/3
    assert m["accuracy"] == 0.25 and m["ece"] == pytest.approx(abs(0.25 - 1 / 3), rel=1e-5)


def test_ensemble_average_and_jit_vmap():
    rng = np.random.default_rng(3)
    members = rng.standard_normal((5, 20, 4)).astype(np.float32)
    lp = jax.nn.log_softmax(members, axis=-1)
    ens = C.ensemble_log_probabilities(lp)
    ref = np.log(np.mean(np.exp(np.asarray(lp, np.float64)), axis=0))
    np.testing.assert_allclose(np.asarray(ens), ref, rtol=1e-5, atol=1e-6)
    y = jnp.asarray(rng.integers(0, 4, 20), jnp.int32)
    per_member = jax.vmap(lambda a: C.nll(a, y))(lp)
    for m in range(5):
        assert float(per_member[m]) == pytest.approx(float(C.nll(lp[m], y)), rel=1e-6)
    # the ensemble NLL is at most the mean member NLL (Jensen)
    assert float(C.nll(ens, y)) <= float(jnp.mean(per_member)) + 1e-6


def test_errors():
    with pytest.raises(ValueError, match=r"\[N, C\]"):
        C.nll(jnp.zeros((3,)), jnp.zeros((3,), jnp.int32))
    with pytest.raises(ValueError, match="labels must be"):
        C.nll(jnp.zeros((3, 2)), jnp.zeros((4,), jnp.int32))
    with pytest.raises(TypeError, match="integers"):
        C.nll(jnp.zeros((3, 2)), jnp.zeros((3,), jnp.float32))
    with pytest.raises(ValueError, match="num_bins"):
        C.ece(jnp.zeros((3, 2)), jnp.zeros((3,), jnp.int32), num_bins=0)


def test_plot_reliability(tmp_path):
    rng = np.random.default_rng(0)
    lp = jax.nn.log_softmax(jnp.asarray(rng.standard_normal((50, 3)) * 3, jnp.float32))
    y = jnp.asarray(rng.integers(0, 3, 50), jnp.int32)
    path = C.plot_reliability({"a": C.reliability(lp, y), "b": C.reliability(lp * 0.5, y)}, str(tmp_path / "r.png"),
                              title="test")
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["r.png"]
