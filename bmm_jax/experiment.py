"""End-to-end merging experiments on a benchmark: every method, evaluated, tabulated, plotted.

``run_experiment(config)`` runs one :class:`ExperimentConfig` on a benchmark of
:mod:`bmm_jax.experts` (``"minilm5"``, ``"effnet4"`` or any :class:`~bmm_jax.experts.BenchmarkSpec`):

1. per seed, build (or reuse from the cache) the linear probes and fine-tuned experts
   (:func:`bmm_jax.experts.build_experts`, ``seed`` = the experts' fine-tuning seed);
2. evaluate every requested method on the test split and on the validation subset used for
   selection (``validation_examples`` per task, a fixed seed-0 subset of the validation split):

   * ``pretrained``: θ0 with each task's linear-probe head; ``expert``: expert k on task k;
   * baselines ``average``, ``task_arithmetic``, ``ties``, ``tsv``, ``iso_c``, ``iso_cts``,
     ``wudi``, ``regmean`` (activation Grams); the anchors' own scales (TA, TIES, TSV-M, Iso-C,
     Iso-CTS) are chosen on the validation subset over :attr:`ExperimentConfig.scale_grids`,
     never on test;
   * ``bmm`` for every (anchor, Gram, hyper-parameter mode): the anchor at its selected scale,
     Grams ``activations`` (``calibration_examples`` unlabeled train inputs per task, expert k
     on task k), ``data_free`` or ``hybrid`` (``hybrid_calibration_examples`` inputs,
     ``beta = hybrid_beta``), hyper-parameters ``shared`` (grouping ``global``,
     ``shared_trials`` trials) or ``module`` (grouping ``module_grouping``, ``module_trials``
     trials) searched by :func:`bmm_jax.search.search` on the validation subset;
3. write, atomically (temp file + rename), into the run directory::

       records.json   list of {"method", "anchor", "gram", "hparams", "seed", "task",
                      "split", "accuracy"} (one per method x seed x task x split)
       records.csv    the same records as CSV
       summary.csv    one row per method: mean and std over seeds of each task, mean, normalised
       table.md       markdown table (test split): mean ± std over seeds, in %
       details.json   chosen scales, searches (best hyper-parameters, values), timings
       accuracy_by_task.png, normalized_by_method.png
       seed<s>/progress.json   per-seed records so far (a rerun resumes from it)
       seed<s>/search/<anchor>-<gram>-<hparams>/   the Vizier studies (resumable)

Normalised accuracy of a method on a task is its accuracy divided by the task expert's accuracy
on the same split and seed. ``std`` is the sample standard deviation over seeds (0 for 1 seed).
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import math
import os
import sys
import tempfile
import time
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import numpy as np

from bmm_jax._tree import PyTree

BASELINES = ("pretrained", "expert", "average", "task_arithmetic", "ties", "tsv", "iso_c", "iso_cts",
             "wudi", "regmean")
BMM_ANCHORS = ("task_arithmetic", "ties", "tsv", "wudi")
GRAM_MODES = ("activations", "data_free", "hybrid")
HPARAM_MODES = ("shared", "module")
SPLITS = ("test", "validation")
# Anchors whose output is theta_0 + scale * merged: their scale is chosen on validation.
SCALED = ("task_arithmetic", "ties", "tsv", "iso_c", "iso_cts")
# Wide enough that the chosen scale is interior on both benchmarks (EffNet-4 wants small scales,
# MiniLM-5 large ones); a choice on the edge of its grid is flagged (``grid_edge`` in details.json).
DEFAULT_SCALE_GRIDS = (
    ("task_arithmetic", (0.03, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 1.5)),
    ("ties", (0.02, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0)),
    ("tsv", (0.02, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0)),
    ("iso_c", (0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0)),
    ("iso_cts", (0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0)),
)
SHORT = {"task_arithmetic": "TA", "ties": "TIES", "tsv": "TSV-M", "wudi": "WUDI", "average": "Average",
         "iso_c": "Iso-C", "iso_cts": "Iso-CTS", "regmean": "RegMean"}
LABELS = {"pretrained": "Pretrained (linear probe)", "expert": "Individual experts",
          "average": "Weight averaging", "task_arithmetic": "Task Arithmetic", "ties": "TIES",
          "tsv": "TSV-M", "iso_c": "Iso-C", "iso_cts": "Iso-CTS", "wudi": "WUDI", "regmean": "RegMean"}
GRAM_SHORT = {"activations": "act", "data_free": "data-free", "hybrid": "hybrid"}
RECORD_KEYS = ("method", "anchor", "gram", "hparams", "seed", "task", "split", "accuracy")


# ============================================================================ config
def _tuple(x) -> tuple:
    return (x,) if isinstance(x, (str, int)) else tuple(x)


def _check_subset(name: str, values: tuple, allowed: tuple) -> None:
    bad = [v for v in values if v not in allowed]
    if bad:
        raise ValueError(f"ExperimentConfig.{name}: unknown {bad}; expected some of {allowed}")
    if len(set(values)) != len(values):
        raise ValueError(f"ExperimentConfig.{name}: duplicates in {values}")


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """One experiment: a benchmark, seeds, the methods to run and the selection protocol.

    Attributes:
      benchmark: ``"minilm5"``, ``"effnet4"`` or a :class:`bmm_jax.experts.BenchmarkSpec`.
      seeds: expert fine-tuning seeds (one full run of every method per seed).
      baselines: subset of :data:`BASELINES` (``pretrained`` and ``expert`` included).
      bmm_anchors: anchors refined by BMM (subset of :data:`bmm_jax.anchors.ANCHORS`).
      bmm_grams: Gram modes of BMM (subset of :data:`GRAM_MODES`).
      bmm_hparams: ``"shared"`` (one ``(rho, s)``: grouping ``global``) and/or ``"module"``
        (grouping ``module_grouping``).
      module_grouping: ``"type"`` (default), ``"block"`` or ``"module"``.
      shared_trials, module_trials: Vizier trials of the two searches (seeded trials included).
      designer: Vizier designer of :class:`bmm_jax.search.SearchConfig`.
      validation_examples: examples per task of the validation subset used for every selection
        (anchor scales, searches) and reported as the ``validation`` split (``None``: all).
      test_examples: examples per task of the test split (``None``: all, the default).
      calibration_examples: unlabeled train inputs per task for activation Grams.
      hybrid_calibration_examples, hybrid_beta: the few-shot Grams of ``hybrid`` (method.md §3.3).
      scale_grids: ``((anchor, (scale, ...)), ...)`` validation grids of the anchors' own scale;
        anchors not listed use their default scale.
      wudi_steps: Adam steps of WUDI-Merging (default 300, the method's).
      eval_batch_size: evaluation batch size (``None``: 32 for text, 256 for images).
      calibration_batch_size: batch size of the activation capture.
      finetune: :class:`bmm_jax.experts.FinetuneConfig` overriding the benchmark's.
      cache_dir: expert cache root (default :func:`bmm_jax.data.paths.cache_dir`).
      run_dir: output directory (default ``runs/<name>``).
      name: experiment name (titles, default run directory).
      plots: write the PNG plots.
      progress: progress bars.
    """
    benchmark: Any = "minilm5"
    seeds: tuple = (0,)
    baselines: tuple = BASELINES
    bmm_anchors: tuple = BMM_ANCHORS
    bmm_grams: tuple = ("activations", "data_free")
    bmm_hparams: tuple = HPARAM_MODES
    module_grouping: str = "type"
    shared_trials: int = 12
    module_trials: int = 24
    designer: str = "gp_bandit"
    validation_examples: int | None = 128
    test_examples: int | None = None
    calibration_examples: int = 256
    hybrid_calibration_examples: int = 32
    hybrid_beta: float = 0.5
    scale_grids: tuple = DEFAULT_SCALE_GRIDS
    wudi_steps: int = 300
    eval_batch_size: int | None = None
    calibration_batch_size: int = 32
    finetune: Any = None
    cache_dir: str | None = None
    run_dir: str | None = None
    name: str = "experiment"
    plots: bool = True
    progress: bool = True

    def __post_init__(self):
        from bmm_jax.anchors import ANCHORS
        from bmm_jax.experts import BenchmarkSpec, FinetuneConfig, get_benchmark
        from bmm_jax.labels import GROUPINGS
        if not isinstance(self.benchmark, BenchmarkSpec):
            get_benchmark(self.benchmark)  # raises for an unknown name
        seeds = _tuple(self.seeds)
        if not seeds or any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 0 for s in seeds):
            raise ValueError(f"ExperimentConfig.seeds must be non-negative ints, got {self.seeds!r}")
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"ExperimentConfig.seeds has duplicates: {seeds}")
        object.__setattr__(self, "seeds", tuple(int(s) for s in seeds))
        for name, allowed in (("baselines", BASELINES), ("bmm_anchors", tuple(ANCHORS)),
                              ("bmm_grams", GRAM_MODES), ("bmm_hparams", HPARAM_MODES)):
            vals = _tuple(getattr(self, name))
            _check_subset(name, vals, allowed)
            object.__setattr__(self, name, vals)
        if "regmean" in self.bmm_anchors:
            raise ValueError("ExperimentConfig.bmm_anchors: 'regmean' as a BMM anchor is not supported "
                             "here (it needs activation Grams of its own); use it as a baseline")
        if bool(self.bmm_anchors) != bool(self.bmm_grams and self.bmm_hparams):
            if self.bmm_anchors:
                raise ValueError("ExperimentConfig: bmm_anchors given but bmm_grams or bmm_hparams is empty")
        if self.module_grouping not in GROUPINGS or self.module_grouping == "global":
            raise ValueError(f"ExperimentConfig.module_grouping must be one of {GROUPINGS[1:]}, "
                             f"got {self.module_grouping!r}")
        for f in ("shared_trials", "module_trials", "calibration_examples", "hybrid_calibration_examples",
                  "wudi_steps", "calibration_batch_size"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
                raise ValueError(f"ExperimentConfig.{f} must be a positive int, got {v!r}")
        for f in ("validation_examples", "test_examples", "eval_batch_size"):
            v = getattr(self, f)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0):
                raise ValueError(f"ExperimentConfig.{f} must be a positive int or None, got {v!r}")
        if not 0.0 <= float(self.hybrid_beta) <= 1.0:
            raise ValueError(f"ExperimentConfig.hybrid_beta must be in [0, 1], got {self.hybrid_beta}")
        grids = dict(self.scale_grids)
        out = []
        for k, g in grids.items():
            if k not in SCALED:
                raise ValueError(f"ExperimentConfig.scale_grids: {k!r} has no scale; scaled anchors are {SCALED}")
            g = tuple(float(x) for x in _tuple(g))
            if not g or any(not (math.isfinite(x) and x > 0) for x in g):
                raise ValueError(f"ExperimentConfig.scale_grids[{k!r}] must be positive finite scales, got {g}")
            out.append((k, g))
        object.__setattr__(self, "scale_grids", tuple(out))
        if self.finetune is not None and not isinstance(self.finetune, FinetuneConfig):
            raise TypeError(f"ExperimentConfig.finetune must be a FinetuneConfig, got {type(self.finetune).__name__}")
        if not isinstance(self.name, str) or not self.name or os.sep in self.name:
            raise ValueError(f"ExperimentConfig.name must be a non-empty name without '{os.sep}', got {self.name!r}")

    # -------------------------------------------------------------------- helpers
    @property
    def benchmark_name(self) -> str:
        return self.benchmark if isinstance(self.benchmark, str) else self.benchmark.name

    @property
    def resolved_run_dir(self) -> str:
        return os.path.abspath(self.run_dir or os.path.join("runs", self.name))

    def grid(self, anchor: str) -> tuple[float, ...] | None:
        return dict(self.scale_grids).get(anchor)

    def protocol(self) -> dict:
        """The fields that change results (a rerun in the same run directory must match them)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
             if f.name not in ("seeds", "baselines", "bmm_anchors", "bmm_grams", "bmm_hparams", "cache_dir",
                               "run_dir", "name", "plots", "progress", "eval_batch_size", "calibration_batch_size")}
        d["benchmark"] = self.benchmark_name
        d["finetune"] = None if self.finetune is None else self.finetune.to_dict()
        d["scale_grids"] = {k: list(v) for k, v in self.scale_grids}
        return json.loads(json.dumps(d, default=str))

    def to_dict(self) -> dict:
        d = self.protocol()
        d.update(seeds=list(self.seeds), baselines=list(self.baselines), bmm_anchors=list(self.bmm_anchors),
                 bmm_grams=list(self.bmm_grams), bmm_hparams=list(self.bmm_hparams), name=self.name,
                 run_dir=self.resolved_run_dir, eval_batch_size=self.eval_batch_size,
                 calibration_batch_size=self.calibration_batch_size)
        return d

    def replace(self, **changes) -> "ExperimentConfig":
        return dataclasses.replace(self, **changes)


# Presets: "default" is the README main job (MiniLM-5, seed 0, a representative subset);
# "full" is the README tables (every method, 3 seeds).
PRESETS: dict[str, dict] = {
    "default": dict(name="minilm5-default", benchmark="minilm5", seeds=(0,),
                    baselines=("pretrained", "expert", "task_arithmetic", "tsv"),
                    bmm_anchors=("task_arithmetic", "tsv"), bmm_grams=("data_free", "activations"),
                    bmm_hparams=("module",), module_trials=16,
                    scale_grids=(("task_arithmetic", (0.1, 0.2, 0.3, 0.5, 0.7)),
                                 ("tsv", (0.5, 0.75, 1.0, 1.25, 1.5)))),
    "full": dict(name="full", seeds=(0, 1, 2)),
}


def preset(preset_name: str, /, **overrides) -> ExperimentConfig:
    """The :data:`PRESETS` configuration ``preset_name`` with ``overrides`` (fields of
    :class:`ExperimentConfig`; ``None`` values are ignored) applied."""
    if preset_name not in PRESETS:
        raise ValueError(f"unknown preset {preset_name!r}; expected one of {sorted(PRESETS)}")
    kw = dict(PRESETS[preset_name])
    kw.update({k: v for k, v in overrides.items() if v is not None})
    if preset_name == "full" and overrides.get("name") is None:
        b = kw.get("benchmark", "minilm5")
        kw["name"] = f"{b if isinstance(b, str) else b.name}-full"
    return ExperimentConfig(**kw)


# ============================================================================ results
class MethodKey(NamedTuple):
    """A row of the results table."""
    method: str
    anchor: str | None = None
    gram: str | None = None
    hparams: str | None = None

    @property
    def label(self) -> str:
        if self.method == "bmm":
            return f"BMM ({SHORT.get(self.anchor, self.anchor)}, {GRAM_SHORT.get(self.gram, self.gram)}, {self.hparams})"
        return LABELS.get(self.method, self.method)

    @property
    def slug(self) -> str:
        return "-".join(str(x) for x in self if x is not None)


class ExperimentResult(NamedTuple):
    """What :func:`run_experiment` returns.

    Attributes:
      records: list of record dicts (keys :data:`RECORD_KEYS`).
      table: the markdown table (test split).
      run_dir: output directory.
      files: ``{kind: path}`` of the written files.
      details: the ``details.json`` content.
      seconds: wall time of the whole run.
    """
    records: list
    table: str
    run_dir: str
    files: dict
    details: dict
    seconds: float


def record(key: MethodKey, seed: int, task: str, split: str, accuracy: float) -> dict:
    return {"method": key.method, "anchor": key.anchor, "gram": key.gram, "hparams": key.hparams,
            "seed": int(seed), "task": str(task), "split": split, "accuracy": float(accuracy)}


def _key_of(r: Mapping) -> MethodKey:
    return MethodKey(r["method"], r.get("anchor"), r.get("gram"), r.get("hparams"))


def method_order(keys) -> list[MethodKey]:
    """Rows in table order: pretrained, experts, baselines (BASELINES order), then BMM by anchor,
    Gram mode, hyper-parameter mode."""
    def rank(k: MethodKey):
        if k.method != "bmm":
            return (0, BASELINES.index(k.method) if k.method in BASELINES else 99, "", "", "")
        return (1, BMM_ANCHORS.index(k.anchor) if k.anchor in BMM_ANCHORS else 99, str(k.anchor),
                GRAM_MODES.index(k.gram) if k.gram in GRAM_MODES else 9, k.hparams or "")
    return sorted(set(keys), key=rank)


class Summary(NamedTuple):
    """Aggregate of one method on one split: per task and overall ``(mean, std, n_seeds)``."""
    key: MethodKey
    tasks: dict           # task -> (mean, std)
    mean: tuple           # (mean, std) of the per-seed mean over tasks
    normalized: tuple     # (mean, std) of the per-seed normalised mean (nan without experts)
    seeds: tuple


def _mean_std(xs: Sequence[float]) -> tuple[float, float]:
    a = np.asarray(xs, np.float64)
    if a.size == 0:
        return (float("nan"), float("nan"))
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0


def summarize(records: Sequence[Mapping], split: str = "test", tasks: Sequence[str] | None = None) -> list[Summary]:
    """Mean ± std over seeds per method (table order) on ``split``.

    The per-seed mean is over ``tasks`` (default: every task in the records, in first-seen order);
    a method missing a task in some seed gets no mean for that seed. The normalised mean divides
    each task's accuracy by the ``expert`` record of the same task, seed and split.
    """
    recs = [r for r in records if r["split"] == split]
    if tasks is None:
        tasks = list(dict.fromkeys(r["task"] for r in recs))
    tasks = list(tasks)
    acc: dict[MethodKey, dict[int, dict[str, float]]] = {}
    for r in recs:
        acc.setdefault(_key_of(r), {}).setdefault(int(r["seed"]), {})[r["task"]] = float(r["accuracy"])
    experts = acc.get(MethodKey("expert"), {})
    out = []
    for key in method_order(acc):
        per_seed = acc[key]
        seeds = tuple(sorted(per_seed))
        per_task = {t: _mean_std([per_seed[s][t] for s in seeds if t in per_seed[s]]) for t in tasks}
        means, norms = [], []
        for s in seeds:
            if all(t in per_seed[s] for t in tasks):
                means.append(float(np.mean([per_seed[s][t] for t in tasks])))
                e = experts.get(s, {})
                if all(t in e and e[t] > 0 for t in tasks):
                    norms.append(float(np.mean([per_seed[s][t] / e[t] for t in tasks])))
        out.append(Summary(key, per_task, _mean_std(means), _mean_std(norms), seeds))
    return out


def _pm(ms: tuple[float, float], n: int) -> str:
    m, s = ms
    if not math.isfinite(m):
        return "–"
    return f"{100 * m:.1f}" if n <= 1 else f"{100 * m:.1f} ± {100 * s:.1f}"


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


def records_csv(records: Sequence[Mapping]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(RECORD_KEYS), lineterminator="\n")
    w.writeheader()
    for r in records:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in RECORD_KEYS})
    return buf.getvalue()


def summary_csv(records: Sequence[Mapping], tasks: Sequence[str] | None = None) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    for split in SPLITS:
        summ = summarize(records, split, tasks)
        if not summ:
            continue
        tk = list(summ[0].tasks)
        if split == SPLITS[0] or buf.tell() == 0:
            w.writerow(["split", "method", "anchor", "gram", "hparams", "label", "num_seeds"]
                       + [f"{t}_{x}" for t in tk for x in ("mean", "std")]
                       + ["mean", "mean_std", "normalized", "normalized_std"])
        for s in summ:
            w.writerow([split, *[("" if v is None else v) for v in s.key], s.key.label, len(s.seeds)]
                       + [f"{v:.6f}" for t in tk for v in s.tasks[t]]
                       + [f"{v:.6f}" for v in (*s.mean, *s.normalized)])
    return buf.getvalue()


# ============================================================================ atomic files
def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file in the same directory and ``os.replace``."""
    path = os.path.abspath(path)
    d = os.path.dirname(path)
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=d)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, default=_json_default) + "\n")


def _json_default(x):
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)


def _atomic_savefig(fig, path: str) -> None:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".png", dir=d)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# ============================================================================ plots
def _figure(size):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=size)
    FigureCanvasAgg(fig)
    return fig


def _color(key: MethodKey) -> str:
    if key.method in ("pretrained", "expert"):
        return "0.55"
    if key.method != "bmm":
        return "tab:blue"
    return {"task_arithmetic": "tab:orange", "ties": "tab:green", "tsv": "tab:red", "wudi": "tab:purple"}.get(
        key.anchor, "tab:brown")


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


# ============================================================================ data helpers
def _select(inputs, idx):
    if isinstance(inputs, np.ndarray):
        return inputs[idx]
    return [inputs[i] for i in idx]


def subset_indices(n: int, k: int | None, seed: int) -> np.ndarray:
    """Sorted indices of a seeded random subset of ``k`` out of ``n`` (all when ``k >= n``)."""
    if k is None or k >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).permutation(n)[:k])


def batches_of(adapter, inputs, batch_size: int):
    """Padded, length-sorted, trimmed batches of raw ``inputs`` for activation capture.

    Yields batch dicts of exactly ``batch_size`` rows with an ``"example_mask"`` ``[B]`` entry
    (``False`` for padding rows); text batches are sorted by length and trimmed to the adapter's
    length buckets (padding tokens are masked by the capture).
    """
    from bmm_jax.models.adapter import pad_batch, take, trim_batch
    batch = adapter.preprocess(inputs)
    n = len(next(iter(batch.values())))
    if adapter.length_buckets and "attention_mask" in batch:
        order = np.argsort(np.asarray(batch["attention_mask"]).sum(axis=1), kind="stable")
        batch = take(batch, order)
    for i in range(0, n, batch_size):
        chunk, ex = pad_batch(take(batch, slice(i, i + batch_size)), batch_size)
        chunk = trim_batch(chunk, adapter.length_buckets)
        yield {**chunk, "example_mask": ex}


def rescale(base: PyTree, anchor: PyTree, scale: float) -> PyTree:
    """``base + scale * (anchor - base)`` on floating leaves (exact for anchors of the form
    ``theta_0 + scale * merged``: TA, TIES, TSV-M, Iso-C, Iso-CTS); other leaves from ``anchor``."""
    import jax
    import jax.numpy as jnp

    def one(b, a):
        b = jnp.asarray(b)
        if not jnp.issubdtype(b.dtype, jnp.floating):
            return a
        return (b.astype(jnp.float32) + scale * (jnp.asarray(a, jnp.float32) - b.astype(jnp.float32))).astype(b.dtype)
    if scale == 1.0:
        return anchor
    return jax.tree_util.tree_map(one, base, anchor)


# ============================================================================ the run
class _Evaluator:
    """Test / validation evaluation of one benchmark seed (validation subset fixed, seed 0)."""

    def __init__(self, bench, config: ExperimentConfig, load):
        self.bench, self.config, self.load = bench, config, load
        ad = bench.adapter
        self.batch_size = config.eval_batch_size or (32 if ad.length_buckets else 256)
        self.n_evals = {"test": 0, "validation": 0}
        self.seconds = {"test": 0.0, "validation": 0.0}

    def __call__(self, params, split: str, heads=None, tasks=None) -> dict[str, float]:
        from bmm_jax.evaluate import evaluate
        t0 = time.perf_counter()
        mx = self.config.validation_examples if split == "validation" else self.config.test_examples
        out = evaluate(self.bench.adapter, params, heads if heads is not None else self.bench.heads,
                       list(tasks if tasks is not None else self.bench.tasks), split=split,
                       batch_size=self.batch_size, max_examples=mx, load=self.load)
        self.n_evals[split] += 1
        self.seconds[split] += time.perf_counter() - t0
        return out


def _bar(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, disable=not enabled, dynamic_ncols=True, leave=True)


def _log(msg: str, enabled: bool = True) -> None:
    if enabled:
        from tqdm.auto import tqdm
        tqdm.write(msg, file=sys.stderr)


def _jobs(config: ExperimentConfig) -> list[MethodKey]:
    jobs = [MethodKey(m, gram="activations" if m == "regmean" else None) for m in config.baselines]
    for a in config.bmm_anchors:
        for g in config.bmm_grams:
            for h in config.bmm_hparams:
                jobs.append(MethodKey("bmm", a, g, h))
    return jobs


class _SeedRun:
    """Every method for one seed; per-method records are persisted in ``seed<s>/progress.json``."""

    def __init__(self, config: ExperimentConfig, spec, seed: int, run_dir: str):
        self.config, self.spec, self.seed = config, spec, seed
        self.dir = os.path.join(run_dir, f"seed{seed}")
        self.progress_file = os.path.join(self.dir, "progress.json")
        self.done: dict[str, dict] = {}
        if os.path.exists(self.progress_file):
            with open(self.progress_file) as f:
                saved = json.load(f)
            if saved.get("protocol") != config.protocol():
                raise ValueError(f"{self.progress_file} was written by another experiment protocol; "
                                 "use another run directory (--run-dir)")
            self.done = saved.get("methods", {})
        self._bench = None
        self._anchors: dict[str, tuple] = {}
        self._grams: dict[str, Any] = {}
        self.timings: dict[str, float] = {}

    # ------------------------------------------------------------------ lazy pieces
    @property
    def bench(self):
        if self._bench is None:
            from bmm_jax.experts import build_experts
            t0 = time.perf_counter()
            self._bench = build_experts(self.spec, cache_dir=self.config.cache_dir, seed=self.seed,
                                        config=self.config.finetune, progress=self.config.progress)
            self.timings["experts"] = time.perf_counter() - t0
            # the loader the experts were trained with (EffNet-4 rescales optdigits' pixels)
            self.load = getattr(self._bench, "load", None) or self.spec.load
            if self.load is None:
                from bmm_jax import data
                self.load = data.load
            self.eval = _Evaluator(self._bench, self.config, self.load)
        return self._bench

    def grams(self, mode: str):
        if mode in self._grams:
            return self._grams[mode]
        from bmm_jax import grams as G
        b = self.bench
        t0 = time.perf_counter()
        if mode == "data_free":
            out = G.data_free(b.base_params, b.expert_params, b.adapter.labels)
        elif mode in ("activations", "hybrid_data"):
            n = self.config.calibration_examples if mode == "activations" else self.config.hybrid_calibration_examples
            streams = []
            for k, task in enumerate(b.tasks):
                inputs, _ = self.load(task, "train")
                idx = subset_indices(len(inputs), n, seed=10_000 + self.seed)
                streams.append(batches_of(b.adapter, _select(inputs, idx), self.config.calibration_batch_size))
            out = G.activations(b.adapter, b.expert_params, streams, labels=b.adapter.labels,
                                progress=self.config.progress)
        elif mode == "hybrid":
            out = G.hybrid(self.grams("hybrid_data"), self.grams("data_free"), beta=self.config.hybrid_beta)
        else:
            raise ValueError(f"unknown Gram mode {mode!r}; expected one of {GRAM_MODES}")
        self.timings[f"grams/{mode}"] = time.perf_counter() - t0
        self._grams[mode] = out
        return out

    def anchor(self, name: str) -> tuple[PyTree, float | None, dict | None, dict]:
        """``(params, chosen scale, validation accuracies, info)`` of an anchor; the scale is
        chosen on the validation subset over the config's grid."""
        if name in self._anchors:
            return self._anchors[name]
        from bmm_jax import anchors as A
        b = self.bench
        t0 = time.perf_counter()
        fn = A.get(name)
        kw = {}
        if name in ("tsv", "iso_c", "iso_cts", "wudi", "regmean"):
            kw["labels"] = b.adapter.labels
        if name == "wudi":
            kw["steps"] = self.config.wudi_steps
        if name == "regmean":
            kw["grams"] = self.grams("activations")
        unit = fn(b.base_params, b.expert_params, **kw)
        unit = unit.params if hasattr(unit, "params") and not isinstance(unit, Mapping) else unit
        info: dict = {"seconds_compute": time.perf_counter() - t0}
        grid = self.config.grid(name) if name in SCALED else None
        if grid:
            best = None
            info["grid"] = {}
            for c in grid:
                params = rescale(b.base_params, unit, c)
                acc = self.eval(params, "validation")
                m = float(np.mean(list(acc.values())))
                info["grid"][str(c)] = m
                if best is None or m > best[0]:
                    best = (m, c, params, acc)
            _, scale, params, val = best
            edge = len(grid) > 1 and scale in (min(grid), max(grid))
            info["grid_edge"] = bool(edge)
            if edge:
                _log(f"[{self.spec.name} seed {self.seed}] warning: {name} scale {scale} is on the edge of its "
                     f"grid {list(grid)}; widen ExperimentConfig.scale_grids (--scale-grid)", self.config.progress)
        else:
            scale, params, val = None, unit, None
        info["scale"] = scale
        info["seconds"] = time.perf_counter() - t0
        self._anchors[name] = (params, scale, val, info)
        return self._anchors[name]

    # ------------------------------------------------------------------ methods
    def run_job(self, key: MethodKey) -> tuple[dict, dict, dict]:
        """``(test acc, validation acc, info)`` of one method."""
        b = self.bench
        ev = self.eval
        if key.method == "pretrained":
            return (ev(b.base_params, "test", heads=b.probe_heads), ev(b.base_params, "validation", heads=b.probe_heads),
                    {})
        if key.method == "expert":
            test, val = {}, {}
            for task, params in zip(b.tasks, b.expert_params):
                test.update(ev(params, "test", tasks=[task]))
                val.update(ev(params, "validation", tasks=[task]))
            return test, val, {}
        if key.method != "bmm":
            params, scale, val, info = self.anchor(key.method)
            if val is None:
                val = ev(params, "validation")
                self._anchors[key.method] = (params, scale, val, info)
            return ev(params, "test"), val, {"scale": scale, **{k: v for k, v in info.items() if k != "scale"}}
        return self._bmm(key)

    def _bmm(self, key: MethodKey):
        import bmm_jax
        from bmm_jax.search import SearchConfig, search
        b = self.bench
        anchor_params, anchor_scale, anchor_val, _ = self.anchor(key.anchor)
        grams = self.grams(key.gram)
        t0 = time.perf_counter()
        prep_key = (key.anchor, key.gram)
        if getattr(self, "_prep_key", None) != prep_key:
            self._prep = None  # free the previous factors first
            self._prep = bmm_jax.prepare(b.base_params, b.expert_params, anchor_params, grams, b.adapter.labels,
                                         progress=self.config.progress)
            self._prep_key = prep_key
        t_prep = time.perf_counter() - t0
        ev = self.eval
        if anchor_val is None:
            anchor_val = ev(anchor_params, "validation")
            self._anchors[key.anchor] = (anchor_params, anchor_scale, anchor_val, self._anchors[key.anchor][3])

        def objective(params):
            if params is anchor_params:      # trial 0 of the search: already evaluated
                return dict(anchor_val)
            return ev(params, "validation")

        shared = key.hparams == "shared"
        cfg = SearchConfig(grouping="global" if shared else self.config.module_grouping,
                           num_trials=self.config.shared_trials if shared else self.config.module_trials,
                           designer=self.config.designer, seed=self.seed,
                           validation_examples=self.config.validation_examples, jax_cache_dir=None)
        run_dir = os.path.join(self.dir, "search", f"{key.anchor}-{key.gram}-{key.hparams}")
        res = search(self._prep, objective, cfg, run_dir=run_dir, anchor=anchor_params,
                     progress=self.config.progress, verbose=False)
        best = next((t for t in res.trials if t.id == res.best_trial), None)
        if res.best_trial == 0 or best is None:
            val = dict(anchor_val)
        else:
            val = {k[len("acc/"):]: float(v) for k, v in best.metrics.items() if k.startswith("acc/")}
            if set(val) != set(b.tasks):
                val = ev(res.params, "validation")
        test = ev(res.params, "test")
        info = {"anchor_scale": anchor_scale, "best_value": res.best_value, "anchor_value": res.anchor_value,
                "best_trial": res.best_trial, "kept_anchor": res.best_trial == 0, "hparams": res.hparams,
                "num_trials": len(res.trials) - (1 if res.anchor_value is not None else 0),
                "grouping": cfg.grouping, "seconds_prepare": t_prep, "search_dir": run_dir}
        return test, val, info

    def save(self) -> None:
        atomic_write_json(self.progress_file, {"protocol": self.config.protocol(), "seed": self.seed,
                                               "methods": self.done})


def _fingerprint(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_experiment(config: ExperimentConfig) -> ExperimentResult:
    """Run ``config`` end to end (see the module docstring); resumable in its run directory.

    Returns:
      :class:`ExperimentResult`. The result files are written atomically into
      ``config.resolved_run_dir``.

    Raises:
      ValueError: the run directory holds another protocol; errors of the pieces propagate.
    """
    from bmm_jax.experts import get_benchmark
    if not isinstance(config, ExperimentConfig):
        raise TypeError(f"config must be an ExperimentConfig, got {type(config).__name__}")
    t_start = time.perf_counter()
    spec = get_benchmark(config.benchmark)
    run_dir = config.resolved_run_dir
    os.makedirs(run_dir, exist_ok=True)
    atomic_write_json(os.path.join(run_dir, "config.json"), config.to_dict())
    jobs = _jobs(config)
    records: list[dict] = []
    details: dict = {"config": config.to_dict(), "seeds": {}}
    show = config.progress
    for seed in config.seeds:
        t_seed = time.perf_counter()
        sr = _SeedRun(config, spec, seed, run_dir)
        todo = [k for k in jobs if k.slug not in sr.done]
        bar = _bar(len(jobs), f"{spec.name} seed {seed}", show)
        bar.update(len(jobs) - len(todo))
        try:
            for key in todo:
                bar.set_postfix_str(key.label)
                t0 = time.perf_counter()
                test, val, info = sr.run_job(key)
                info = {**info, "seconds": time.perf_counter() - t0}
                sr.done[key.slug] = {"key": list(key), "test": test, "validation": val, "info": info}
                sr.save()
                bar.update(1)
                _log(f"[{spec.name} seed {seed}] {key.label}: test mean {100 * np.mean(list(test.values())):.2f}"
                     f"  val mean {100 * np.mean(list(val.values())):.2f}  ({info['seconds']:.0f} s)", show)
        finally:
            bar.close()
        tasks = list(sr.bench.tasks) if sr._bench is not None else None
        for key in jobs:
            entry = sr.done[key.slug]
            for split, name in (("test", "test"), ("validation", "validation")):
                for task, acc in entry[name].items():
                    records.append(record(key, seed, task, split, acc))
        details["seeds"][str(seed)] = {
            "methods": {k.slug: sr.done[k.slug]["info"] for k in jobs},
            "timings": sr.timings,
            "evaluations": None if sr._bench is None else {"count": sr.eval.n_evals, "seconds": sr.eval.seconds},
            "experts": None if sr._bench is None else _jsonable(sr.bench.stats),
            "seconds": time.perf_counter() - t_seed,
            "tasks": tasks,
        }
        del sr
    seconds = time.perf_counter() - t_start
    details["seconds"] = seconds
    files = write_results(records, run_dir, title=f"{config.name}: {spec.name}, seeds {list(config.seeds)}",
                          plots=config.plots, details=details, config=config)
    table = open(files["table"]).read()
    return ExperimentResult(records, table, run_dir, files, details, seconds)


def _jsonable(x):
    return json.loads(json.dumps(x, default=_json_default))


def write_results(records: Sequence[Mapping], run_dir: str, *, title: str = "", plots: bool = True,
                  details: Mapping | None = None, config: ExperimentConfig | None = None) -> dict:
    """Write records.json, records.csv, summary.csv, table.md (+ details.json, plots) atomically.

    Returns ``{kind: path}``.
    """
    os.makedirs(run_dir, exist_ok=True)
    files = {"records": os.path.join(run_dir, "records.json"), "records_csv": os.path.join(run_dir, "records.csv"),
             "summary_csv": os.path.join(run_dir, "summary.csv"), "table": os.path.join(run_dir, "table.md")}
    atomic_write_json(files["records"], list(records))
    atomic_write_text(files["records_csv"], records_csv(records))
    atomic_write_text(files["summary_csv"], summary_csv(records))
    atomic_write_text(files["table"], markdown_report(records, title=title, config=config))
    if details is not None:
        files["details"] = os.path.join(run_dir, "details.json")
        atomic_write_json(files["details"], _jsonable(details))
    if plots and records:
        files["plot_tasks"] = os.path.join(run_dir, "accuracy_by_task.png")
        files["plot_normalized"] = os.path.join(run_dir, "normalized_by_method.png")
        plot_accuracy_by_task(records, files["plot_tasks"], title=title)
        plot_normalized(records, files["plot_normalized"], title=title)
    return files


def markdown_report(records: Sequence[Mapping], *, title: str = "", config: ExperimentConfig | None = None) -> str:
    """``table.md``: a title, the protocol in one paragraph, the test table and the validation table."""
    seeds = sorted({int(r["seed"]) for r in records})
    parts = [f"# {title}" if title else "# Results", ""]
    if config is not None:
        parts += [
            f"Test accuracy (%), mean ± std over seeds {seeds} (expert fine-tuning seeds). "
            f"Merged encoders use each task's expert head; *pretrained* uses the linear-probe heads. "
            f"Normalised mean = mean over tasks of merged / expert accuracy. "
            f"Every hyper-parameter (anchor scales over a grid; BMM's ρ, s by Vizier: shared = one "
            f"global group, {config.shared_trials} trials; module = grouping `{config.module_grouping}`, "
            f"{config.module_trials} trials) is chosen on {config.validation_examples or 'all'} "
            f"validation examples per task, never on test. Activation Grams: "
            f"{config.calibration_examples} unlabeled train inputs per task.", ""]
    parts += [format_table(records, "test"), "", "Validation subset (the selection data):", "",
              format_table(records, "validation"), ""]
    return "\n".join(parts)


__all__ = ["ExperimentConfig", "ExperimentResult", "MethodKey", "Summary", "PRESETS", "BASELINES",
           "BMM_ANCHORS", "GRAM_MODES", "HPARAM_MODES", "preset", "run_experiment", "summarize",
           "format_table", "write_results", "markdown_report", "plot_accuracy_by_task", "plot_normalized",
           "record", "rescale", "batches_of", "subset_indices", "atomic_write_text", "atomic_write_json",
           "records_csv", "summary_csv"]
