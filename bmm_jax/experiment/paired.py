"""Paired comparisons of two methods on the same test examples, with bootstrap confidence intervals.

The compared statistic is the table's: the mean over tasks of the accuracy difference (method
minus reference), averaged over seeds. Differences are paired: both methods are scored on the same
examples, so the per-example difference ``d_i = correct_method,i - correct_reference,i`` in
``{-1, 0, 1}`` carries the comparison.

* **Within a seed**: resample the test examples of every task with replacement (paired: the same
  indices for both methods), recompute the task-mean difference; ``num_resamples`` times. For
  ``{-1, 0, 1}`` differences a resample's mean is ``(n_+ - n_-) / n`` with ``(n_+, n_-, n_0)``
  multinomial, drawn exactly that way (the same distribution as index resampling, in O(1) per
  resample).
* **Across seeds** (two-level bootstrap): per replicate, draw the seeds with replacement and, for
  each drawn seed, an independent within-seed resample; the replicate is the mean over the drawn
  seeds. The interval thus covers both the test-set sampling and the seed-to-seed variation.

Intervals are percentile intervals (``level`` = 0.95: the 2.5 and 97.5 percentiles).
"""
from __future__ import annotations

from typing import Mapping, NamedTuple, Sequence

import numpy as np

from bmm_jax.experiment.records import MethodKey


class Interval(NamedTuple):
    """A point estimate and its confidence interval ``[low, high]``."""
    mean: float
    low: float
    high: float

    @property
    def includes_zero(self) -> bool:
        return self.low <= 0.0 <= self.high


def _ternary(d: np.ndarray) -> bool:
    return bool(np.all((d == -1) | (d == 0) | (d == 1)))


def task_resamples(d: np.ndarray, num_resamples: int, rng: np.random.Generator) -> np.ndarray:
    """``[num_resamples]`` bootstrap means of the paired differences ``d [n]`` of one task."""
    d = np.asarray(d, np.float64).reshape(-1)
    n = d.size
    if n == 0:
        raise ValueError("no paired differences to resample")
    if _ternary(d):
        p = np.array([np.sum(d == 1), np.sum(d == -1), np.sum(d == 0)], np.float64) / n
        counts = rng.multinomial(n, p, size=num_resamples)
        return (counts[:, 0] - counts[:, 1]) / n
    out = np.empty(num_resamples, np.float64)
    step = max(1, (1 << 22) // n)
    for a in range(0, num_resamples, step):
        b = min(num_resamples, a + step)
        out[a:b] = d[rng.integers(0, n, size=(b - a, n))].mean(axis=1)
    return out


def seed_resamples(diffs: Mapping[str, np.ndarray], num_resamples: int, rng: np.random.Generator) -> np.ndarray:
    """``[num_resamples]`` bootstrap values of the task-mean difference of one seed."""
    if not diffs:
        raise ValueError("no tasks to compare")
    return np.mean([task_resamples(d, num_resamples, rng) for d in diffs.values()], axis=0)


def _interval(point: float, samples: np.ndarray, level: float) -> Interval:
    a = (1.0 - level) / 2.0
    lo, hi = np.quantile(samples, [a, 1.0 - a])
    return Interval(float(point), float(lo), float(hi))


def paired_bootstrap(diffs: Mapping[int, Mapping[str, np.ndarray]], *, num_resamples: int = 2000,
                     level: float = 0.95, seed: int = 0) -> tuple[Interval, dict[int, Interval]]:
    """Confidence intervals of the seed-mean of the task-mean paired difference.

    Args:
      diffs: ``{seed: {task: d [n_task]}}`` per-example paired differences (method - reference).
      num_resamples: bootstrap replicates.
      level: confidence level of the percentile intervals.
      seed: seed of the resampling RNG (the intervals are reproducible).

    Returns:
      ``(overall, per_seed)``: the two-level (seeds and examples) interval of the mean over seeds,
      and per seed the within-seed (examples) interval.
    """
    if not diffs:
        raise ValueError("paired_bootstrap needs at least one seed")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if int(num_resamples) < 1:
        raise ValueError(f"num_resamples must be positive, got {num_resamples}")
    rng = np.random.default_rng(seed)
    seeds = sorted(diffs)
    points = {s: float(np.mean([np.mean(np.asarray(d, np.float64)) for d in diffs[s].values()])) for s in seeds}
    per_seed = {s: _interval(points[s], seed_resamples(diffs[s], num_resamples, rng), level) for s in seeds}
    k = len(seeds)
    pool = {s: seed_resamples(diffs[s], num_resamples * k, rng).reshape(num_resamples, k) for s in seeds}
    pick = rng.integers(0, k, size=(num_resamples, k))
    stacked = np.stack([pool[s] for s in seeds])                  # [k seeds, R, k slots]
    reps = stacked[pick, np.arange(num_resamples)[:, None], np.arange(k)[None, :]].mean(axis=1)
    overall = _interval(float(np.mean(list(points.values()))), reps, level)
    return overall, per_seed


class Comparison(NamedTuple):
    """A paired comparison of a method with a reference (accuracy, test split).

    Attributes:
      key: the compared row (a BMM row); reference: the row it is compared with (its anchor, or
        the BMM point estimate for a sampled row).
      overall: :class:`Interval` over seeds and examples (two-level bootstrap).
      per_seed: ``{seed: Interval}`` (examples bootstrap within the seed).
      num_examples: ``{seed: test examples over all tasks}``.
      level: the confidence level.
    """
    key: MethodKey
    reference: MethodKey
    overall: Interval
    per_seed: dict
    num_examples: dict
    level: float = 0.95

    @property
    def verdict(self) -> str:
        if self.overall.includes_zero:
            return "includes 0: no significant difference"
        return "better" if self.overall.mean > 0 else "worse"

    def to_dict(self) -> dict:
        return {"method": self.key._asdict(), "reference": self.reference._asdict(), "label": self.key.label,
                "reference_label": self.reference.label, "level": self.level,
                "mean_diff": self.overall.mean, "low": self.overall.low, "high": self.overall.high,
                "includes_zero": self.overall.includes_zero, "verdict": self.verdict,
                "per_seed": {str(s): iv._asdict() for s, iv in self.per_seed.items()},
                "num_examples": {str(s): n for s, n in self.num_examples.items()}}


def compare(correct: Mapping[int, Mapping[str, np.ndarray]], reference: Mapping[int, Mapping[str, np.ndarray]],
            key: MethodKey, ref_key: MethodKey, *, num_resamples: int = 2000, level: float = 0.95,
            seed: int = 0) -> Comparison | None:
    """:class:`Comparison` from per-example correctness ``{seed: {task: [n] bool}}`` of both rows
    (seeds and tasks present in both; ``None`` if none). Arrays of one seed and task must be the
    same examples in the same order."""
    diffs = {}
    for s in sorted(set(correct) & set(reference)):
        tasks = [t for t in correct[s] if t in reference[s]]
        if not tasks:
            continue
        per = {}
        for t in tasks:
            a, b = np.asarray(correct[s][t]), np.asarray(reference[s][t])
            if a.shape != b.shape:
                raise ValueError(f"seed {s} task {t!r}: {key.label} has {a.shape[0]} examples, "
                                 f"{ref_key.label} {b.shape[0]}: not the same examples")
            per[t] = a.astype(np.int8) - b.astype(np.int8)
        diffs[s] = per
    if not diffs:
        return None
    overall, per_seed = paired_bootstrap(diffs, num_resamples=num_resamples, level=level, seed=seed)
    return Comparison(key, ref_key, overall, per_seed, {s: int(sum(d.size for d in diffs[s].values()))
                                                        for s in diffs}, level)


def _pp(x: float) -> str:
    return f"{100 * x:+.2f}"


def format_paired_table(comparisons: Sequence[Comparison]) -> str:
    """Markdown: one row per comparison: the mean difference in accuracy points (method minus
    reference), its interval over seeds and examples, each seed's interval, and whether the
    interval includes zero; then a plain-language summary."""
    if not comparisons:
        return "(no paired comparisons: no BMM row with a recorded reference)"
    seeds = sorted({s for c in comparisons for s in c.per_seed})
    lvl = int(round(100 * comparisons[0].level))
    head = (["method", "compared with", "Δ accuracy (pp)", f"{lvl}% CI (seeds × examples)"]
            + [f"seed {s}: Δ [{lvl}% CI]" for s in seeds] + ["interval includes 0?"])
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 3) + "---|"]
    for c in comparisons:
        cells = [c.key.label, c.reference.label, _pp(c.overall.mean), f"[{_pp(c.overall.low)}, {_pp(c.overall.high)}]"]
        for s in seeds:
            iv = c.per_seed.get(s)
            cells.append("–" if iv is None else f"{_pp(iv.mean)} [{_pp(iv.low)}, {_pp(iv.high)}]")
        cells.append("**yes**" if c.overall.includes_zero else ("no (better)" if c.overall.mean > 0 else "no (worse)"))
        lines.append("| " + " | ".join(cells) + " |")
    zero = [c for c in comparisons if c.overall.includes_zero]
    better = [c for c in comparisons if not c.overall.includes_zero and c.overall.mean > 0]
    worse = [c for c in comparisons if not c.overall.includes_zero and c.overall.mean < 0]
    lines += ["", f"Of {len(comparisons)} paired comparisons, the {lvl}% interval over seeds and test examples "
              f"excludes zero in favour of the method for {len(better)}, against it for {len(worse)}, and "
              f"**includes zero for {len(zero)}** (no significant difference"
              + (": " + "; ".join(f"{c.key.label} vs {c.reference.label}" for c in zero) if zero else "") + ")."]
    return "\n".join(lines)


__all__ = ["Interval", "Comparison", "paired_bootstrap", "seed_resamples", "task_resamples", "compare",
           "format_paired_table"]
