"""Records and tables: one record per method x seed x task x split, aggregated over seeds into
markdown / CSV tables (accuracy and calibration)."""
from __future__ import annotations

import csv
import io
import math
from typing import Mapping, NamedTuple, Sequence

import numpy as np

from bmm_jax.experiment.config import BASELINES, BMM_ANCHORS, GRAM_MODES, SPLITS

SHORT = {"task_arithmetic": "TA", "ties": "TIES", "tsv": "TSV-M", "wudi": "WUDI", "average": "Average",
         "iso_c": "Iso-C", "iso_cts": "Iso-CTS", "regmean": "RegMean"}
LABELS = {"pretrained": "Pretrained (linear probe)", "expert": "Individual experts",
          "average": "Weight averaging", "task_arithmetic": "Task Arithmetic", "ties": "TIES",
          "tsv": "TSV-M", "iso_c": "Iso-C", "iso_cts": "Iso-CTS", "wudi": "WUDI", "regmean": "RegMean"}
GRAM_SHORT = {"activations": "act", "data_free": "data-free", "hybrid": "hybrid"}
BMM_METHODS = ("bmm", "bmm_sampled")
METRIC_KEYS = ("accuracy", "nll", "brier", "ece")
#: Keys of every record, in order. ``nll``, ``brier`` and ``ece`` (15 equal-width bins) are computed
#: from the predicted probabilities; ``head`` is the experts' head protocol (``"frozen"`` or ``"lpft"``).
RECORD_KEYS = ("method", "anchor", "gram", "hparams", "seed", "task", "split", "accuracy", "nll", "brier", "ece",
               "head")


class MethodKey(NamedTuple):
    """A row of the results table."""
    method: str
    anchor: str | None = None
    gram: str | None = None
    hparams: str | None = None

    @property
    def label(self) -> str:
        if self.method in BMM_METHODS:
            name = "BMM" if self.method == "bmm" else "BMM-sampled"
            return (f"{name} ({SHORT.get(self.anchor, self.anchor)}, {GRAM_SHORT.get(self.gram, self.gram)}, "
                    f"{self.hparams})")
        return LABELS.get(self.method, self.method)

    @property
    def slug(self) -> str:
        return "-".join(str(x) for x in self if x is not None)

    @property
    def is_bmm(self) -> bool:
        return self.method in BMM_METHODS


def record(key: MethodKey, seed: int, task: str, split: str, metrics, head: str | None = None) -> dict:
    """One record (keys :data:`RECORD_KEYS`). ``metrics``: the accuracy (float) or a mapping with
    ``accuracy`` and optionally ``nll``, ``brier``, ``ece`` (missing ones are ``None``)."""
    m = {"accuracy": metrics} if not isinstance(metrics, Mapping) else metrics
    out = {"method": key.method, "anchor": key.anchor, "gram": key.gram, "hparams": key.hparams,
           "seed": int(seed), "task": str(task), "split": split}
    for k in METRIC_KEYS:
        v = m.get(k)
        out[k] = None if v is None else float(v)
    out["head"] = head
    return out


def key_of(r: Mapping) -> MethodKey:
    return MethodKey(r["method"], r.get("anchor"), r.get("gram"), r.get("hparams"))


def method_order(keys) -> list[MethodKey]:
    """Rows in table order: pretrained, experts, baselines (BASELINES order), then BMM by anchor,
    Gram mode, hyper-parameter mode, each point estimate followed by its sampled counterpart."""
    def rank(k: MethodKey):
        if not k.is_bmm:
            return (0, BASELINES.index(k.method) if k.method in BASELINES else 99, k.method, "", "", 0)
        return (1, BMM_ANCHORS.index(k.anchor) if k.anchor in BMM_ANCHORS else 99, str(k.anchor),
                GRAM_MODES.index(k.gram) if k.gram in GRAM_MODES else 9, k.hparams or "",
                BMM_METHODS.index(k.method))
    return sorted(set(keys), key=rank)


class Summary(NamedTuple):
    """Aggregate of one method on one split and metric: per task and overall ``(mean, std)``."""
    key: MethodKey
    tasks: dict           # task -> (mean, std)
    mean: tuple           # (mean, std) of the per-seed mean over tasks
    normalized: tuple     # (mean, std) of the per-seed normalised mean (accuracy only; nan otherwise)
    seeds: tuple


def _mean_std(xs: Sequence[float]) -> tuple[float, float]:
    a = np.asarray(xs, np.float64)
    if a.size == 0:
        return (float("nan"), float("nan"))
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0


def summarize(records: Sequence[Mapping], split: str = "test", tasks: Sequence[str] | None = None,
              metric: str = "accuracy") -> list[Summary]:
    """Mean ± std over seeds per method (table order) on ``split`` of ``metric``.

    The per-seed mean is over ``tasks`` (default: every task in the records, in first-seen order);
    a method missing a task in some seed gets no mean for that seed. The normalised mean
    (accuracy only) divides each task's accuracy by the ``expert`` record of the same task, seed
    and split. Records whose ``metric`` is ``None`` are ignored.
    """
    if metric not in METRIC_KEYS:
        raise ValueError(f"unknown metric {metric!r}; expected one of {METRIC_KEYS}")
    recs = [r for r in records if r["split"] == split]
    if tasks is None:
        tasks = list(dict.fromkeys(r["task"] for r in recs))
    tasks = list(tasks)
    val: dict[MethodKey, dict[int, dict[str, float]]] = {}
    for r in recs:
        d = val.setdefault(key_of(r), {}).setdefault(int(r["seed"]), {})
        if r.get(metric) is not None:
            d[r["task"]] = float(r[metric])
    experts = val.get(MethodKey("expert"), {}) if metric == "accuracy" else {}
    out = []
    for key in method_order(val):
        per_seed = val[key]
        seeds = tuple(sorted(per_seed))
        per_task = {t: _mean_std([per_seed[s][t] for s in seeds if t in per_seed[s]]) for t in tasks}
        means, norms = [], []
        for s in seeds:
            if all(t in per_seed[s] for t in tasks):
                means.append(float(np.mean([per_seed[s][t] for t in tasks])))
                e = experts.get(s, {})
                if metric == "accuracy" and all(t in e and e[t] > 0 for t in tasks):
                    norms.append(float(np.mean([per_seed[s][t] / e[t] for t in tasks])))
        out.append(Summary(key, per_task, _mean_std(means), _mean_std(norms), seeds))
    return out


def _pm(ms: tuple[float, float], n: int, factor: float = 100.0, digits: int = 1) -> str:
    m, s = ms
    if not math.isfinite(m):
        return "–"
    return f"{factor * m:.{digits}f}" if n <= 1 else f"{factor * m:.{digits}f} ± {factor * s:.{digits}f}"


def format_table(records: Sequence[Mapping], split: str = "test", tasks: Sequence[str] | None = None) -> str:
    """Markdown table: rows = methods, columns = each task's accuracy, mean, normalised mean (%),
    mean ± std over seeds (just the mean for one seed)."""
    summ = summarize(records, split, tasks)
    if tasks is None:
        tasks = list(dict.fromkeys(r["task"] for r in records if r["split"] == split))
    head = ["method"] + list(tasks) + ["mean", "normalised mean"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for s in summ:
        n = len(s.seeds)
        cells = [s.key.label] + [_pm(s.tasks[t], n) for t in tasks] + [_pm(s.mean, n), _pm(s.normalized, n)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_calibration_table(records: Sequence[Mapping], split: str = "test",
                             tasks: Sequence[str] | None = None) -> str:
    """Markdown table of the calibration metrics on ``split``: per method, the mean over tasks of
    accuracy (%), NLL, Brier score and ECE (%, 15 bins), mean ± std over seeds. Methods without
    calibration metrics (records from before they were recorded) are left out."""
    cols = (("accuracy", "accuracy (%)", 100.0, 1), ("nll", "NLL", 1.0, 3), ("brier", "Brier", 1.0, 3),
            ("ece", "ECE (%)", 100.0, 1))
    summs = {m: {s.key: s for s in summarize(records, split, tasks, metric=m)} for m, *_ in cols}
    lines = ["| method | " + " | ".join(c[1] for c in cols) + " |", "|---|" + "---:|" * len(cols)]
    for key in summs["accuracy"]:
        if not math.isfinite(summs["nll"][key].mean[0]):
            continue
        cells = [_pm(summs[m][key].mean, len(summs[m][key].seeds), f, d) for m, _, f, d in cols]
        lines.append(f"| {key.label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def records_csv(records: Sequence[Mapping]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(RECORD_KEYS), lineterminator="\n")
    w.writeheader()
    for r in records:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in RECORD_KEYS})
    return buf.getvalue()


def summary_csv(records: Sequence[Mapping], tasks: Sequence[str] | None = None) -> str:
    """One row per split and method: per-task accuracy mean/std, the mean, the normalised mean,
    and the task-mean NLL, Brier score and ECE (mean/std over seeds)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    header_done = False
    for split in SPLITS:
        summ = summarize(records, split, tasks)
        if not summ:
            continue
        cal = {m: {s.key: s for s in summarize(records, split, tasks, metric=m)} for m in ("nll", "brier", "ece")}
        tk = list(summ[0].tasks)
        if not header_done:
            w.writerow(["split", "method", "anchor", "gram", "hparams", "label", "num_seeds"]
                       + [f"{t}_{x}" for t in tk for x in ("mean", "std")]
                       + ["mean", "mean_std", "normalized", "normalized_std", "nll", "nll_std", "brier",
                          "brier_std", "ece", "ece_std"])
            header_done = True
        for s in summ:
            w.writerow([split, *[("" if v is None else v) for v in s.key], s.key.label, len(s.seeds)]
                       + [f"{v:.6f}" for t in tk for v in s.tasks[t]]
                       + [f"{v:.6f}" for v in (*s.mean, *s.normalized)]
                       + [f"{v:.6f}" for m in ("nll", "brier", "ece") for v in cal[m][s.key].mean])
    return buf.getvalue()


class ExperimentResult(NamedTuple):
    """What :func:`bmm_jax.experiment.run_experiment` returns.

    Attributes:
      records: list of record dicts (keys :data:`RECORD_KEYS`).
      table: the markdown report (``table.md``: accuracy, calibration and paired comparisons).
      run_dir: output directory.
      files: ``{kind: path}`` of the written files.
      details: the ``details.json`` content.
      seconds: wall time of the whole run.
      paired: the paired comparisons (:class:`bmm_jax.experiment.paired.Comparison` list).
    """
    records: list
    table: str
    run_dir: str
    files: dict
    details: dict
    seconds: float
    paired: list = []


__all__ = ["MethodKey", "record", "key_of", "method_order", "Summary", "summarize", "format_table",
           "format_calibration_table", "records_csv", "summary_csv", "ExperimentResult", "RECORD_KEYS",
           "METRIC_KEYS", "BMM_METHODS", "SHORT", "LABELS", "GRAM_SHORT"]
