"""Plots of an experiment (matplotlib Agg canvases, written atomically as PNG): accuracy by task,
normalised accuracy, pooled reliability diagrams, ablation bars and curves, the few-shot curve."""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

from bmm_jax.experiment.files import atomic_savefig as _atomic_savefig
from bmm_jax.experiment.files import figure as _figure
from bmm_jax.experiment.records import MethodKey, summarize


def _color(key: MethodKey) -> str:
    if key.method in ("pretrained", "expert"):
        return "0.55"
    if not key.is_bmm:
        return "tab:blue"
    c = {"task_arithmetic": "tab:orange", "ties": "tab:green", "tsv": "tab:red", "wudi": "tab:purple"}.get(
        key.anchor, "tab:brown")
    if key.method == "bmm_sampled":
        from matplotlib.colors import to_rgb
        r, g, b = to_rgb(c)
        return (0.5 + 0.5 * r, 0.5 + 0.5 * g, 0.5 + 0.5 * b)
    return c


def plot_accuracy_by_task(records: Sequence[Mapping], path: str, title: str = "", split: str = "test") -> None:
    """Per-task accuracy bars (one panel per task plus the mean), methods on the y axis, error
    bars = std over seeds."""
    summ = summarize(records, split)
    if not summ:
        return
    tasks = list(summ[0].tasks)
    panels = tasks + ["mean"]
    n = len(summ)
    fig = _figure((3.2 * len(panels), 0.9 + 0.28 * n))
    y = np.arange(n)[::-1]
    for i, t in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        vals = [(s.mean if t == "mean" else s.tasks[t]) for s in summ]
        m = np.array([100 * v[0] for v in vals])
        e = np.array([100 * v[1] for v in vals])
        ax.barh(y, np.nan_to_num(m), xerr=np.nan_to_num(e), color=[_color(s.key) for s in summ],
                error_kw={"elinewidth": 0.8, "capsize": 1.5})
        finite = m[np.isfinite(m)]
        lo = max(0.0, float(finite.min()) - 5) if finite.size else 0.0
        ax.set_xlim(lo, 100)
        ax.set_title(t, fontsize=9)
        ax.tick_params(labelsize=7)
        ax.set_yticks(y)
        ax.set_yticklabels([s.key.label for s in summ] if i == 0 else [""] * n)
        ax.grid(axis="x", alpha=0.3)
        ax.set_xlabel(f"{split} accuracy (%)", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    _atomic_savefig(fig, path)


def plot_normalized(records: Sequence[Mapping], path: str, title: str = "", split: str = "test") -> None:
    """Normalised mean accuracy (merged / expert) by method, error bars = std over seeds."""
    summ = [s for s in summarize(records, split) if s.key.method != "expert"]
    if not summ:
        return
    n = len(summ)
    fig = _figure((7.5, 0.9 + 0.3 * n))
    ax = fig.add_subplot(1, 1, 1)
    y = np.arange(n)[::-1]
    m = np.array([100 * s.normalized[0] for s in summ])
    e = np.array([100 * s.normalized[1] for s in summ])
    ax.barh(y, np.nan_to_num(m), xerr=np.nan_to_num(e), color=[_color(s.key) for s in summ],
            error_kw={"elinewidth": 0.8, "capsize": 2})
    for yi, mi in zip(y, m):
        if math.isfinite(mi):
            ax.text(mi + 0.3, yi, f"{mi:.1f}", va="center", fontsize=7)
    finite = m[np.isfinite(m)]
    ax.set_xlim(max(0.0, float(finite.min()) - 5) if finite.size else 0.0, 105)
    ax.axvline(100, color="0.3", lw=0.8, ls="--")
    ax.set_yticks(y)
    ax.set_yticklabels([s.key.label for s in summ], fontsize=7)
    ax.set_xlabel(f"normalised {split} accuracy (% of the experts)", fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    ax.set_title(title or "normalised accuracy by method", fontsize=10)
    _atomic_savefig(fig, path)


def plot_reliability_pooled(diagrams: Mapping[MethodKey, object], path: str, title: str = "") -> None:
    """Reliability diagrams (:func:`bmm_jax.calibration.plot_reliability`), one panel per method,
    each pooled over tasks and seeds (``{MethodKey: Reliability}``, table order)."""
    from bmm_jax.calibration import plot_reliability
    if not diagrams:
        return
    plot_reliability({k.label: v for k, v in diagrams.items()}, path, title=title, columns=5)


def _ms(xs):
    a = np.asarray([x for x in xs if x is not None and math.isfinite(x)], np.float64)
    if a.size == 0:
        return float("nan"), float("nan")
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0


def aggregate(records: Sequence[Mapping], ablation: str, split: str) -> dict:
    """``{(setting, x): (mean, std, n_seeds)}`` of the ``accuracy`` of ablation records."""
    groups: dict = {}
    for r in records:
        if r["ablation"] == ablation and r["split"] == split:
            groups.setdefault((r["setting"], r.get("x")), []).append(r["accuracy"])
    return {k: (*_ms(v), len(v)) for k, v in groups.items()}


def plot_ablation_bars(records: Sequence[Mapping], ablation: str, path: str, title: str = "") -> None:
    """Validation and test accuracy (mean over tasks; mean ± std over seeds) per setting."""
    settings = list(dict.fromkeys(r["setting"] for r in records if r["ablation"] == ablation and r.get("x") is None))
    if not settings:
        return
    fig = _figure((1.2 + 1.1 * len(settings), 3.4))
    ax = fig.add_subplot(1, 1, 1)
    x = np.arange(len(settings))
    lo = 100.0
    for off, split, color in ((-0.2, "validation", "0.6"), (0.2, "test", "tab:blue")):
        agg = aggregate(records, ablation, split)
        m = np.array([100 * agg.get((s, None), (np.nan,))[0] for s in settings])
        e = np.array([100 * agg.get((s, None), (np.nan, 0.0))[1] for s in settings])
        ax.bar(x + off, np.nan_to_num(m), width=0.38, yerr=np.nan_to_num(e), color=color, label=split,
               error_kw={"elinewidth": 0.8, "capsize": 2})
        if np.isfinite(m).any():
            lo = min(lo, float(np.nanmin(m)))
    ax.set_ylim(max(0.0, lo - 5), 100)
    ax.set_xticks(x)
    ax.set_xticklabels(settings, fontsize=7, rotation=15)
    ax.set_ylabel("accuracy (%, mean over tasks)", fontsize=8)
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(title or ablation, fontsize=9)
    _atomic_savefig(fig, path)


def plot_curve(records: Sequence[Mapping], ablation: str, path: str, *, xlabel: str, title: str = "",
               logx: bool = False, base: float = 10.0, references: Mapping[str, tuple] | None = None,
               settings: Sequence[str] | None = None) -> None:
    """Accuracy against ``x`` for the records of ``ablation`` with an ``x`` value: one line per
    (setting, split), mean ± std over seeds as a band; ``references`` adds horizontal lines
    ``{label: (mean, std)}`` (fractions)."""
    recs = [r for r in records if r["ablation"] == ablation and r.get("x") is not None]
    if not recs:
        return
    settings = list(settings or dict.fromkeys(r["setting"] for r in recs))
    fig = _figure((6.0, 3.8))
    ax = fig.add_subplot(1, 1, 1)
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple"]
    for i, setting in enumerate(settings):
        for split, ls in (("test", "-"), ("validation", "--")):
            agg = aggregate(recs, ablation, split)
            xs = sorted(x for (s, x) in agg if s == setting)
            if not xs:
                continue
            m = np.array([100 * agg[(setting, x)][0] for x in xs])
            e = np.array([100 * agg[(setting, x)][1] for x in xs])
            c = colors[i % len(colors)]
            ax.plot(xs, m, ls=ls, marker="o", ms=3, color=c, label=f"{setting} ({split})")
            ax.fill_between(xs, m - e, m + e, color=c, alpha=0.15, lw=0)
    for j, (label, (mean, std)) in enumerate((references or {}).items()):
        c = ["0.3", "tab:brown", "tab:pink", "tab:olive"][j % 4]
        ax.axhline(100 * mean, color=c, lw=1, ls=":", label=label)
        if std and math.isfinite(std):
            ax.axhspan(100 * (mean - std), 100 * (mean + std), color=c, alpha=0.08, lw=0)
    if logx:
        ax.set_xscale("log", base=base)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel("accuracy (%, mean over tasks)", fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, loc="best")
    ax.set_title(title or ablation, fontsize=9)
    _atomic_savefig(fig, path)
