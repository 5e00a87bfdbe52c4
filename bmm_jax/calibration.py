"""Classification metrics from predicted probabilities: accuracy, NLL, Brier score, ECE, and
reliability diagrams.

Every metric takes ``log_probs [N, C]`` (natural-log class probabilities, rows summing to 1 in
probability space; e.g. ``jax.nn.log_softmax(logits)``, or the log of an ensemble's averaged
probabilities) and integer ``labels [N]`` in ``[0, C)``, and returns a float32 scalar. Working in
log space keeps the NLL of confident mistakes exact (``-log p`` of a probability that underflows
float32). Conventions:

* ``accuracy``: mean of ``argmax_c p_c == y`` (ties: the lowest class index).
* ``nll``: mean of ``-log p_y``.
* ``brier``: mean over examples of ``sum_c (p_c - 1[c = y])^2`` (Brier's multi-class score, in
  ``[0, 2]``; some papers divide by ``C``).
* ``ece``: expected calibration error with ``num_bins`` equal-width confidence bins (default 15):
  confidence ``conf = max_c p_c``; bin ``b`` holds ``(b / B, (b + 1) / B]`` (the first bin also
  holds 0); ``ECE = sum_b (n_b / N) |acc_b - conf_b|`` with ``acc_b`` / ``conf_b`` the bin's mean
  correctness / confidence (Guo et al., 2017).

All functions are pure, jittable and vmappable (``num_bins`` is static); shapes and dtypes are
checked at trace time. :func:`plot_reliability` draws reliability diagrams (matplotlib, Agg).
"""
from __future__ import annotations

import functools
import os
import tempfile
from typing import Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

NUM_BINS = 15
METRICS = ("accuracy", "nll", "brier", "ece")


def _check(log_probs, labels, what: str = "log_probs"):
    lp = jnp.asarray(log_probs)
    y = jnp.asarray(labels)
    if lp.ndim != 2:
        raise ValueError(f"{what} must be [N, C], got shape {tuple(lp.shape)}")
    if not jnp.issubdtype(lp.dtype, jnp.floating):
        raise TypeError(f"{what} must be floating, got {lp.dtype}")
    if y.shape != lp.shape[:1]:
        raise ValueError(f"labels must be [N] = [{lp.shape[0]}], got shape {tuple(y.shape)}")
    if not jnp.issubdtype(y.dtype, jnp.integer):
        raise TypeError(f"labels must be integers, got {y.dtype}")
    if lp.shape[0] == 0:
        raise ValueError(f"{what} has no examples")
    return lp.astype(jnp.float32), y.astype(jnp.int32)


def _check_bins(num_bins) -> int:
    if isinstance(num_bins, bool) or not isinstance(num_bins, (int, np.integer)) or num_bins < 1:
        raise ValueError(f"num_bins must be a positive int, got {num_bins!r}")
    return int(num_bins)


def log_probabilities(logits) -> jax.Array:
    """``log_softmax(logits)`` over the last axis, float32."""
    return jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1)


def ensemble_log_probabilities(member_log_probs) -> jax.Array:
    """Log of the averaged probabilities of an ensemble: ``[M, N, C] -> [N, C]``,
    ``log(mean_m p_m) = logsumexp_m(log p_m) - log M``."""
    lp = jnp.asarray(member_log_probs, jnp.float32)
    if lp.ndim != 3:
        raise ValueError(f"member_log_probs must be [M, N, C], got shape {tuple(lp.shape)}")
    return jax.nn.logsumexp(lp, axis=0) - jnp.log(jnp.float32(lp.shape[0]))


@jax.jit
def accuracy(log_probs, labels) -> jax.Array:
    """Top-1 accuracy (see the module docstring)."""
    lp, y = _check(log_probs, labels)
    return jnp.mean((jnp.argmax(lp, axis=-1) == y).astype(jnp.float32))


@jax.jit
def nll(log_probs, labels) -> jax.Array:
    """Mean negative log-likelihood of the labels."""
    lp, y = _check(log_probs, labels)
    return -jnp.mean(jnp.take_along_axis(lp, y[:, None], axis=-1)[:, 0])


@jax.jit
def brier(log_probs, labels) -> jax.Array:
    """Multi-class Brier score ``mean_n sum_c (p_nc - 1[c = y_n])^2``."""
    lp, y = _check(log_probs, labels)
    p = jnp.exp(lp)
    onehot = jax.nn.one_hot(y, lp.shape[-1], dtype=jnp.float32)
    return jnp.mean(jnp.sum(jnp.square(p - onehot), axis=-1))


class Reliability(NamedTuple):
    """Per-bin statistics of a reliability diagram (``B`` equal-width confidence bins).

    Attributes:
      counts: ``[B]`` examples per bin (float32).
      confidence: ``[B]`` mean confidence of the bin (0 for an empty bin).
      accuracy: ``[B]`` mean correctness of the bin (0 for an empty bin).
      edges: ``[B + 1]`` bin edges ``0, 1/B, ..., 1``.
    """
    counts: jax.Array
    confidence: jax.Array
    accuracy: jax.Array
    edges: jax.Array


def bin_index(confidence, num_bins: int = NUM_BINS) -> jax.Array:
    """Bin of each confidence: ``b`` with ``b / B < conf <= (b + 1) / B`` (0 for ``conf = 0``)."""
    b = jnp.ceil(jnp.asarray(confidence, jnp.float32) * num_bins).astype(jnp.int32) - 1
    return jnp.clip(b, 0, num_bins - 1)


def _bin_sums(log_probs, labels, num_bins: int):
    lp, y = _check(log_probs, labels)
    conf = jnp.exp(jnp.max(lp, axis=-1))
    correct = (jnp.argmax(lp, axis=-1) == y).astype(jnp.float32)
    b = bin_index(conf, num_bins)
    counts = jax.ops.segment_sum(jnp.ones_like(conf), b, num_segments=num_bins)
    sum_conf = jax.ops.segment_sum(conf, b, num_segments=num_bins)
    sum_acc = jax.ops.segment_sum(correct, b, num_segments=num_bins)
    return counts, sum_conf, sum_acc


@functools.partial(jax.jit, static_argnames=("num_bins",))
def reliability(log_probs, labels, num_bins: int = NUM_BINS) -> Reliability:
    """:class:`Reliability` statistics of ``num_bins`` equal-width confidence bins."""
    num_bins = _check_bins(num_bins)
    counts, sum_conf, sum_acc = _bin_sums(log_probs, labels, num_bins)
    safe = jnp.maximum(counts, 1.0)
    edges = jnp.linspace(0.0, 1.0, num_bins + 1, dtype=jnp.float32)
    return Reliability(counts, jnp.where(counts > 0, sum_conf / safe, 0.0),
                       jnp.where(counts > 0, sum_acc / safe, 0.0), edges)


@functools.partial(jax.jit, static_argnames=("num_bins",))
def ece(log_probs, labels, num_bins: int = NUM_BINS) -> jax.Array:
    """Expected calibration error with ``num_bins`` equal-width bins (see the module docstring)."""
    num_bins = _check_bins(num_bins)
    counts, sum_conf, sum_acc = _bin_sums(log_probs, labels, num_bins)
    return jnp.sum(jnp.abs(sum_acc - sum_conf)) / jnp.sum(counts)


@functools.partial(jax.jit, static_argnames=("num_bins",))
def metrics(log_probs, labels, num_bins: int = NUM_BINS) -> dict:
    """``{"accuracy", "nll", "brier", "ece"}`` (float32 scalars) of one prediction set."""
    return {"accuracy": accuracy(log_probs, labels), "nll": nll(log_probs, labels),
            "brier": brier(log_probs, labels), "ece": ece(log_probs, labels, num_bins=num_bins)}


def metrics_dict(log_probs, labels, num_bins: int = NUM_BINS) -> dict[str, float]:
    """:func:`metrics` as Python floats (one device-to-host transfer)."""
    return {k: float(v) for k, v in jax.device_get(metrics(log_probs, labels, num_bins=num_bins)).items()}


def example_statistics(log_probs, labels) -> dict[str, np.ndarray]:
    """Per-example ``{"correct": [N] bool, "nll": [N] float32, "confidence": [N] float32}`` (numpy),
    what paired comparisons and pooled reliability diagrams need."""
    lp, y = _check(log_probs, labels)
    out = {"correct": jnp.argmax(lp, axis=-1) == y,
           "nll": -jnp.take_along_axis(lp, y[:, None], axis=-1)[:, 0],
           "confidence": jnp.exp(jnp.max(lp, axis=-1))}
    return {k: np.asarray(v) for k, v in jax.device_get(out).items()}


def reliability_from_examples(confidence, correct, num_bins: int = NUM_BINS) -> Reliability:
    """:class:`Reliability` from per-example confidences and correctness (e.g. pooled over tasks
    and seeds), in numpy."""
    num_bins = _check_bins(num_bins)
    conf = np.asarray(confidence, np.float64).reshape(-1)
    corr = np.asarray(correct, np.float64).reshape(-1)
    if conf.shape != corr.shape:
        raise ValueError(f"confidence and correct differ in size: {conf.shape} vs {corr.shape}")
    b = np.clip(np.ceil(conf * num_bins).astype(np.int64) - 1, 0, num_bins - 1)
    counts = np.bincount(b, minlength=num_bins).astype(np.float64)
    safe = np.maximum(counts, 1.0)
    return Reliability(counts, np.where(counts > 0, np.bincount(b, conf, num_bins) / safe, 0.0),
                       np.where(counts > 0, np.bincount(b, corr, num_bins) / safe, 0.0),
                       np.linspace(0.0, 1.0, num_bins + 1))


def ece_of(rel: Reliability) -> float:
    """ECE of a :class:`Reliability` (``sum_b n_b |acc_b - conf_b| / N``)."""
    counts = np.asarray(rel.counts, np.float64)
    gap = np.abs(np.asarray(rel.accuracy, np.float64) - np.asarray(rel.confidence, np.float64))
    return float(np.sum(counts * gap) / max(np.sum(counts), 1.0))


def plot_reliability(diagrams: Mapping[str, Reliability], path: str, *, title: str = "",
                     columns: int = 4) -> str:
    """Reliability diagrams, one panel per entry of ``diagrams`` (``{name: Reliability}``): bars
    of each bin's accuracy against the diagonal, the gap to the bin's mean confidence shaded, the
    ECE in the panel title, and the share of examples per bin as a thin line. Written atomically
    as a PNG (matplotlib Agg backend; no global matplotlib state is touched). Returns ``path``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    names = list(diagrams)
    if not names:
        raise ValueError("plot_reliability needs at least one diagram")
    cols = max(1, min(int(columns), len(names)))
    rows = -(-len(names) // cols)
    fig = Figure(figsize=(3.0 * cols, 3.0 * rows + (0.4 if title else 0.0)))
    FigureCanvasAgg(fig)
    for i, name in enumerate(names):
        rel = diagrams[name]
        edges = np.asarray(rel.edges, np.float64)
        width = np.diff(edges)
        centers = edges[:-1] + width / 2
        counts = np.asarray(rel.counts, np.float64)
        acc = np.asarray(rel.accuracy, np.float64)
        conf = np.asarray(rel.confidence, np.float64)
        ax = fig.add_subplot(rows, cols, i + 1)
        has = counts > 0
        ax.bar(edges[:-1][has], acc[has], width=width[has], align="edge", color="tab:blue", alpha=0.8,
               edgecolor="white", linewidth=0.5, label="accuracy")
        ax.bar(edges[:-1][has], conf[has] - acc[has], bottom=acc[has], width=width[has], align="edge",
               color="tab:red", alpha=0.25, edgecolor="none", label="gap to confidence")
        ax.plot([0, 1], [0, 1], color="0.3", lw=0.8, ls="--")
        total = max(counts.sum(), 1.0)
        ax.plot(centers, counts / total, color="0.4", lw=0.8, marker=".", ms=3, label="share of examples")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_title(f"{name}\nECE {100 * ece_of(rel):.2f}%", fontsize=8)
        ax.tick_params(labelsize=7)
        if i % cols == 0:
            ax.set_ylabel("accuracy", fontsize=7)
        if i >= len(names) - cols:
            ax.set_xlabel("confidence", fontsize=7)
        if i == 0:
            ax.legend(fontsize=6, loc="upper left")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".png", dir=d)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


__all__ = ["NUM_BINS", "METRICS", "Reliability", "log_probabilities", "ensemble_log_probabilities", "accuracy",
           "nll", "brier", "ece", "reliability", "bin_index", "metrics", "metrics_dict", "example_statistics",
           "reliability_from_examples", "ece_of", "plot_reliability"]
