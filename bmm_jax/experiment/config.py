"""Configuration of an experiment: what runs (methods, seeds), how it is selected (validation
protocol, search budgets), and the presets."""
from __future__ import annotations

import dataclasses
import fnmatch
import json
import math
import os
from typing import Any

import numpy as np

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
# The scale is the anchor's own coefficient on sum (TA) or merged (others) task vectors.
DEFAULT_SCALE_GRIDS = (
    ("task_arithmetic", (0.03, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 1.5)),
    ("ties", (0.02, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0)),
    ("tsv", (0.02, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0)),
    ("iso_c", (0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0)),
    ("iso_cts", (0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0)),
)
#: Posterior temperatures (sigma of method.md §5) tried on validation NLL for the sampled BMM rows,
#: ascending; the point estimate (sigma = 0) is always a candidate, and the best grid value is
#: refined by a factor sqrt(10) on each side.
DEFAULT_SAMPLE_TEMPERATURES = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
#: How a sampled row's temperature is chosen on the validation subset (ties: the smaller temperature,
#: so the point estimate unless a temperature strictly improves): ``"nll"`` the lowest mean NLL
#: (the paper's choice; may trade accuracy for calibration), ``"accuracy"`` the highest mean
#: accuracy, ``"nll_keep_accuracy"`` the lowest mean NLL among temperatures whose mean accuracy is at
#: least the point estimate's.
SAMPLE_SELECTIONS = ("nll", "accuracy", "nll_keep_accuracy")
HEAD_LABELS = {"frozen": "frozen linear-probe head (the task-arithmetic protocol: each expert's encoder is "
                         "fine-tuned against its task's pretrained head, which stays fixed)",
               "lpft": "LP-FT (each expert's head, initialised from the linear probe, is fine-tuned with the "
                       "encoder)"}


def _tuple(x) -> tuple:
    return (x,) if isinstance(x, (str, int, float)) else tuple(x)


def _check_subset(name: str, values: tuple, allowed: tuple) -> None:
    bad = [v for v in values if v not in allowed]
    if bad:
        raise ValueError(f"ExperimentConfig.{name}: unknown {bad}; expected some of {allowed}")
    if len(set(values)) != len(values):
        raise ValueError(f"ExperimentConfig.{name}: duplicates in {values}")


def _positive_int(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, np.integer)) and v > 0


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """One experiment: a benchmark, seeds, the methods to run and the selection protocol.

    Attributes:
      benchmark: ``"minilm5"``, ``"effnet4"`` or a :class:`bmm_jax.experts.BenchmarkSpec` (e.g.
        :func:`bmm_jax.presets.clip8.clip8_benchmark`).
      seeds: expert fine-tuning seeds (one full run of every method per seed).
      baselines: subset of :data:`BASELINES` (``pretrained`` and ``expert`` included).
      bmm_anchors: anchors refined by BMM (subset of :data:`bmm_jax.anchors.ANCHORS`).
      bmm_grams: Gram modes of BMM (subset of :data:`GRAM_MODES`).
      bmm_hparams: ``"shared"`` (one ``(rho, s)``: grouping ``global``) and/or ``"module"``
        (grouping ``module_grouping``).
      module_grouping: ``"type"`` (default), ``"block"`` or ``"module"``.
      shared_trials, module_trials: Vizier trials of the two searches (seeded trials included).
      designer: Vizier designer of :class:`bmm_jax.search.SearchConfig`.
      head: the experts' head protocol, ``"frozen"`` or ``"lpft"`` (``None``: the benchmark's
        :attr:`bmm_jax.experts.FinetuneConfig.head`, ``"frozen"`` for the built-in ones).
      validation_examples: examples per task of the validation subset used for every selection
        (anchor scales, searches, posterior temperatures) and reported as the ``validation``
        split (``None``: all).
      test_examples: examples per task of the test split (``None``: all, the default).
      calibration_examples: unlabeled train inputs per task for activation Grams.
      hybrid_calibration_examples, hybrid_beta: the few-shot Grams of ``hybrid`` (method.md §3.3).
      scale_grids: ``((anchor, (scale, ...)), ...)`` validation grids of the anchors' own scale;
        anchors not listed use their default scale.
      wudi_steps: Adam steps of WUDI-Merging (default 300, the method's).
      sample_draws: ``M`` posterior draws of the sampled BMM rows (``"method": "bmm_sampled"``,
        method.md §5); ``0`` (default) runs none.
      sample_rows: which BMM rows get a sampled counterpart: patterns ``"anchor/gram/hparams"``
        (``fnmatch`` wildcards, e.g. ``"*/activations/module"``); default every BMM row.
      sample_temperatures: posterior temperatures tried on validation (ascending, > 0); the
        point estimate (0) is always a candidate.
      sample_selection: the validation criterion of the temperature, one of
        :data:`SAMPLE_SELECTIONS` (default ``"nll"``).
      sample_seed: PRNG seed of the posterior draws.
      bootstrap_resamples: resamples of the paired bootstrap confidence intervals (tables only).
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
    head: str | None = None
    validation_examples: int | None = 128
    test_examples: int | None = None
    calibration_examples: int = 256
    hybrid_calibration_examples: int = 32
    hybrid_beta: float = 0.5
    scale_grids: tuple = DEFAULT_SCALE_GRIDS
    wudi_steps: int = 300
    sample_draws: int = 0
    sample_rows: tuple = ("*/*/*",)
    sample_temperatures: tuple = DEFAULT_SAMPLE_TEMPERATURES
    sample_seed: int = 0
    sample_selection: str = "nll"
    bootstrap_resamples: int = 2000
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
        from bmm_jax.experts import HEAD_MODES, BenchmarkSpec, FinetuneConfig, get_benchmark
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
        if self.bmm_anchors and not (self.bmm_grams and self.bmm_hparams):
            raise ValueError("ExperimentConfig: bmm_anchors given but bmm_grams or bmm_hparams is empty")
        if self.module_grouping not in GROUPINGS or self.module_grouping == "global":
            raise ValueError(f"ExperimentConfig.module_grouping must be one of {GROUPINGS[1:]}, "
                             f"got {self.module_grouping!r}")
        if self.head is not None and self.head not in HEAD_MODES:
            raise ValueError(f"ExperimentConfig.head must be one of {HEAD_MODES} or None, got {self.head!r}")
        for f in ("shared_trials", "module_trials", "calibration_examples", "hybrid_calibration_examples",
                  "wudi_steps", "calibration_batch_size", "bootstrap_resamples"):
            if not _positive_int(getattr(self, f)):
                raise ValueError(f"ExperimentConfig.{f} must be a positive int, got {getattr(self, f)!r}")
        for f in ("validation_examples", "test_examples", "eval_batch_size"):
            v = getattr(self, f)
            if v is not None and not _positive_int(v):
                raise ValueError(f"ExperimentConfig.{f} must be a positive int or None, got {v!r}")
        for f in ("sample_draws", "sample_seed"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
                raise ValueError(f"ExperimentConfig.{f} must be a non-negative int, got {v!r}")
        temps = tuple(float(t) for t in _tuple(self.sample_temperatures))
        if not temps or any(not (math.isfinite(t) and t > 0) for t in temps) or list(temps) != sorted(set(temps)):
            raise ValueError("ExperimentConfig.sample_temperatures must be distinct positive finite numbers in "
                             f"ascending order, got {self.sample_temperatures!r}")
        object.__setattr__(self, "sample_temperatures", temps)
        if self.sample_selection not in SAMPLE_SELECTIONS:
            raise ValueError(f"ExperimentConfig.sample_selection must be one of {SAMPLE_SELECTIONS}, got "
                             f"{self.sample_selection!r}")
        rows = _tuple(self.sample_rows)
        if not rows or any(not isinstance(r, str) or r.count("/") != 2 for r in rows):
            raise ValueError(f"ExperimentConfig.sample_rows must be patterns 'anchor/gram/hparams', got {rows!r}")
        object.__setattr__(self, "sample_rows", rows)
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

    def spec(self):
        """The :class:`bmm_jax.experts.BenchmarkSpec`."""
        from bmm_jax.experts import get_benchmark
        return get_benchmark(self.benchmark)

    def finetune_config(self):
        """The :class:`bmm_jax.experts.FinetuneConfig` the experts are built with (``finetune``
        or the benchmark's, with ``head`` applied)."""
        cfg = self.finetune or self.spec().config
        return cfg if self.head is None else cfg.replace(head=self.head)

    @property
    def resolved_head(self) -> str:
        return self.finetune_config().head

    def grid(self, anchor: str) -> tuple[float, ...] | None:
        return dict(self.scale_grids).get(anchor)

    def samples(self, anchor: str, gram: str, hparams: str) -> bool:
        """Whether the BMM row ``(anchor, gram, hparams)`` gets a sampled counterpart."""
        name = f"{anchor}/{gram}/{hparams}"
        return self.sample_draws > 0 and any(fnmatch.fnmatchcase(name, p) for p in self.sample_rows)

    def protocol(self) -> dict:
        """The fields that change results (a rerun in the same run directory must match them).
        Which methods run and how the sampled rows are drawn are not part of it (a resumed run may
        add methods; a sampled row is recomputed when its draw settings change)."""
        skip = ("seeds", "baselines", "bmm_anchors", "bmm_grams", "bmm_hparams", "cache_dir", "run_dir", "name",
                "plots", "progress", "eval_batch_size", "calibration_batch_size", "sample_draws", "sample_rows",
                "sample_temperatures", "sample_seed", "sample_selection", "bootstrap_resamples", "head")
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip}
        d["benchmark"] = self.benchmark_name
        spec = self.spec()
        if spec.protocol is not None:
            d["benchmark_protocol"] = spec.protocol
        d["finetune"] = self.finetune_config().to_dict()
        d["scale_grids"] = {k: list(v) for k, v in self.scale_grids}
        return json.loads(json.dumps(d, default=str))

    def sampling(self) -> dict:
        """The settings of the sampled rows (stored with each sampled result; ``selection`` only when
        it is not the default ``"nll"``, so rows stored before it existed stay valid)."""
        d = {"draws": int(self.sample_draws), "temperatures": list(self.sample_temperatures),
             "seed": int(self.sample_seed)}
        if self.sample_selection != "nll":
            d["selection"] = self.sample_selection
        return d

    def to_dict(self) -> dict:
        d = self.protocol()
        d.update(seeds=list(self.seeds), baselines=list(self.baselines), bmm_anchors=list(self.bmm_anchors),
                 bmm_grams=list(self.bmm_grams), bmm_hparams=list(self.bmm_hparams), name=self.name,
                 run_dir=self.resolved_run_dir, eval_batch_size=self.eval_batch_size,
                 calibration_batch_size=self.calibration_batch_size, head=self.resolved_head,
                 sample_rows=list(self.sample_rows), bootstrap_resamples=self.bootstrap_resamples,
                 **{f"sample_{k}": v for k, v in self.sampling().items()})
        d["sample_selection"] = self.sample_selection
        return d

    def replace(self, **changes) -> "ExperimentConfig":
        return dataclasses.replace(self, **changes)


# Presets: "default" is the README main job (MiniLM-5, seed 0, a representative subset);
# "full" is the README tables (every method, 3 seeds); "paper" the paper's protocol: frozen heads,
# the library's default search budget (50 trials), 128 validation examples per task, module-wise
# hyper-parameters, and sampled counterparts (8 posterior draws) of the TA and TSV-M rows with
# activation Grams. Only two rows are sampled: a sampled row costs about as much as a 50-trial search
# on the 2-core CPU (the temperature search evaluates 8 draws at ~6 temperatures); pass
# ``sample_rows=("*/*/*",)`` (``--sample-rows '*/*/*'``) to sample every BMM row.
PRESETS: dict[str, dict] = {
    "default": dict(name="minilm5-default", benchmark="minilm5", seeds=(0,),
                    baselines=("pretrained", "expert", "task_arithmetic", "tsv"),
                    bmm_anchors=("task_arithmetic", "tsv"), bmm_grams=("data_free", "activations"),
                    bmm_hparams=("module",), module_trials=16,
                    scale_grids=(("task_arithmetic", (0.1, 0.2, 0.3, 0.5, 0.7)),
                                 ("tsv", (0.5, 0.75, 1.0, 1.25, 1.5)))),
    "full": dict(name="full", seeds=(0, 1, 2)),
    "paper": dict(name="paper", seeds=(0, 1, 2), head="frozen", bmm_hparams=("module",), module_trials=50,
                  shared_trials=50, validation_examples=128, sample_draws=8,
                  sample_rows=("task_arithmetic/activations/module", "tsv/activations/module")),
}


def preset(preset_name: str, /, **overrides) -> ExperimentConfig:
    """The :data:`PRESETS` configuration ``preset_name`` with ``overrides`` (fields of
    :class:`ExperimentConfig`; ``None`` values are ignored) applied."""
    if preset_name not in PRESETS:
        raise ValueError(f"unknown preset {preset_name!r}; expected one of {sorted(PRESETS)}")
    kw = dict(PRESETS[preset_name])
    kw.update({k: v for k, v in overrides.items() if v is not None})
    if preset_name in ("full", "paper") and overrides.get("name") is None:
        b = kw.get("benchmark", "minilm5")
        kw["name"] = f"{b if isinstance(b, str) else b.name}-{preset_name}"
    return ExperimentConfig(**kw)


__all__ = ["ExperimentConfig", "PRESETS", "preset", "BASELINES", "BMM_ANCHORS", "GRAM_MODES", "HPARAM_MODES",
           "SPLITS", "SCALED", "DEFAULT_SCALE_GRIDS", "DEFAULT_SAMPLE_TEMPERATURES", "HEAD_LABELS",
           "SAMPLE_SELECTIONS"]
