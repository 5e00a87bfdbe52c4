"""Running an experiment: every method for every seed, resumable, then the result files."""
from __future__ import annotations

import inspect
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from typing import Any, Mapping, Sequence

import numpy as np

from bmm_jax._tree import PyTree
from bmm_jax.experiment.config import GRAM_MODES, HEAD_LABELS, SCALED, ExperimentConfig
from bmm_jax.experiment.files import (atomic_write_json, atomic_write_npz, atomic_write_text, jsonable,
                                      read_npz)
from bmm_jax.experiment.inputs import batches_of, rescale, subset_indices
from bmm_jax.experiment.paired import Comparison, compare, format_paired_table
from bmm_jax.experiment.records import (ExperimentResult, MethodKey, format_calibration_table,
                                        format_table, method_order, record, records_csv, summary_csv)

EXAMPLE_FIELDS = ("correct", "nll", "confidence")


def _select(inputs, idx):
    if isinstance(inputs, np.ndarray):
        return inputs[idx]
    return [inputs[i] for i in idx]


def _bar(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, disable=not enabled, dynamic_ncols=True, leave=True)


def _log(msg: str, enabled: bool = True) -> None:
    if enabled:
        from tqdm.auto import tqdm
        tqdm.write(msg, file=sys.stderr)


def anchor_kwargs(fn, *, labels=None, scale: float | None = None) -> dict:
    """Keyword arguments for an anchor function: its label tree (if it takes one) and its own
    coefficient ``scale`` (``anchor_scale=``, or ``scale=`` for anchors written before the rename)."""
    params = inspect.signature(fn).parameters
    kw = {}
    if labels is not None and "labels" in params:
        kw["labels"] = labels
    if scale is not None:
        kw["anchor_scale" if "anchor_scale" in params else "scale"] = float(scale)
    return kw


def draw_samples(prep, key, num_samples: int, hparams, temperature: float):
    """``prep.sample(key, num_samples, hparams, temperature=temperature)``, jitted (compiled once
    per prepared model and ``num_samples``; hyper-parameters and temperature are traced)."""
    import jax
    import jax.numpy as jnp
    hp = jax.tree_util.tree_map(lambda v: jnp.asarray(v, jnp.float32), hparams)
    return _draw_jit(prep, key, int(num_samples), hp, jnp.asarray(temperature, jnp.float32))


def _draw(prep, key, num_samples, hparams, temperature):
    return prep.sample(key, num_samples, hparams, temperature=temperature)


_draw_jit = __import__("jax").jit(_draw, static_argnums=(2,))


def mean_of(per_task: Mapping[str, Mapping[str, float]], metric: str = "accuracy") -> float:
    return float(np.mean([m[metric] for m in per_task.values()]))


# ============================================================================ evaluation
class Evaluator:
    """Test / validation evaluation of one benchmark seed (validation subset fixed, seed 0)."""

    def __init__(self, bench, config: ExperimentConfig, load):
        self.bench, self.config, self.load = bench, config, load
        ad = bench.adapter
        self.batch_size = config.eval_batch_size or (32 if ad.length_buckets else 256)
        self.n_evals = {"test": 0, "validation": 0}
        self.seconds = {"test": 0.0, "validation": 0.0}

    def _kw(self, split):
        mx = self.config.validation_examples if split == "validation" else self.config.test_examples
        return dict(batch_size=self.batch_size, max_examples=mx, load=self.load)

    def log_probs(self, params, split: str, heads=None, tasks=None) -> dict:
        """``task -> (log_probs, labels)`` (:func:`bmm_jax.evaluate.task_log_probs`)."""
        from bmm_jax import evaluate as E
        t0 = time.perf_counter()
        out = E.task_log_probs(self.bench.adapter, params, heads if heads is not None else self.bench.heads,
                               list(tasks if tasks is not None else self.bench.tasks), split, **self._kw(split))
        self.n_evals[split] += 1
        self.seconds[split] += time.perf_counter() - t0
        return out

    def ensemble_log_probs(self, draws, split: str) -> dict:
        from bmm_jax import evaluate as E
        t0 = time.perf_counter()
        out = E.ensemble_log_probs(self.bench.adapter, draws, self.bench.heads, list(self.bench.tasks), split,
                                   **self._kw(split))
        self.n_evals[split] += 1
        self.seconds[split] += time.perf_counter() - t0
        return out

    @staticmethod
    def summarize(log_probs: Mapping) -> tuple[dict, dict]:
        """``(metrics {task: {accuracy, nll, brier, ece}}, examples {task: {correct, nll, confidence}})``."""
        from bmm_jax.calibration import example_statistics, metrics_dict
        return ({t: metrics_dict(lp, y) for t, (lp, y) in log_probs.items()},
                {t: example_statistics(lp, y) for t, (lp, y) in log_probs.items()})

    def metrics(self, params, split: str, heads=None, tasks=None) -> tuple[dict, dict]:
        return self.summarize(self.log_probs(params, split, heads, tasks))

    def __call__(self, params, split: str, heads=None, tasks=None) -> dict[str, float]:
        """``{task: accuracy}`` (the search objective)."""
        return {t: float(np.mean(np.argmax(lp, axis=1) == y))
                for t, (lp, y) in self.log_probs(params, split, heads, tasks).items()}


# ============================================================================ jobs
def jobs_of(config: ExperimentConfig) -> list[MethodKey]:
    """Rows in run order: baselines, then each BMM row followed by its sampled counterpart."""
    jobs = [MethodKey(m, gram="activations" if m == "regmean" else None) for m in config.baselines]
    for a in config.bmm_anchors:
        for g in config.bmm_grams:
            for h in config.bmm_hparams:
                jobs.append(MethodKey("bmm", a, g, h))
                if config.samples(a, g, h):
                    jobs.append(MethodKey("bmm_sampled", a, g, h))
    return jobs


def examples_path(run_dir: str, seed: int, slug: str) -> str:
    return os.path.join(run_dir, f"seed{seed}", "examples", f"{slug}.npz")


def save_examples(path: str, examples: Mapping[str, Mapping[str, np.ndarray]]) -> None:
    atomic_write_npz(path, {f"{f}:{t}": ex[f] for t, ex in examples.items() for f in EXAMPLE_FIELDS})


def load_examples(path: str) -> dict[str, dict[str, np.ndarray]] | None:
    """``{task: {field: [n]}}`` of a saved examples file (``None`` if missing)."""
    z = read_npz(path)
    if z is None:
        return None
    out: dict = {}
    for k, v in z.items():
        f, _, t = k.partition(":")
        out.setdefault(t, {})[f] = v
    return out


class SeedRun:
    """Every method for one seed; per-method results are persisted in ``seed<s>/progress.json``
    and per-example test statistics in ``seed<s>/examples/<method>.npz``."""

    def __init__(self, config: ExperimentConfig, spec, seed: int, run_dir: str, jobs: Sequence[MethodKey] = (),
                 subdir: str = ""):
        self.config, self.spec, self.seed, self.run_dir = config, spec, seed, run_dir
        self.dir = os.path.join(run_dir, f"seed{seed}", subdir) if subdir else os.path.join(run_dir, f"seed{seed}")
        self.progress_file = os.path.join(self.dir, "progress.json")
        self.jobs = list(jobs)
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
        self._grams: dict[Any, Any] = {}
        self._prep_key = None
        self._prep = None
        self.timings: dict[str, float] = {}

    # ------------------------------------------------------------------ lazy pieces
    @property
    def bench(self):
        if self._bench is None:
            from bmm_jax.experts import build_experts
            t0 = time.perf_counter()
            self._bench = build_experts(self.spec, cache_dir=self.config.cache_dir, seed=self.seed,
                                        config=self.config.finetune_config(), progress=self.config.progress)
            self.timings["experts"] = time.perf_counter() - t0
            # the loader the experts were trained with (EffNet-4 rescales optdigits' pixels)
            self.load = getattr(self._bench, "load", None) or self.spec.load
            if self.load is None:
                from bmm_jax import data
                self.load = data.load
            self.eval = Evaluator(self._bench, self.config, self.load)
        return self._bench

    def activation_grams(self, n: int):
        """Activation Grams from ``n`` unlabeled train inputs per task (expert k on task k);
        subsets are nested in ``n`` (the first ``n`` of one seeded permutation)."""
        key = ("act", int(n))
        if key in self._grams:
            return self._grams[key]
        from bmm_jax import grams as G
        b = self.bench
        t0 = time.perf_counter()
        streams = []
        for task in b.tasks:
            inputs, _ = self.load(task, "train")
            idx = subset_indices(len(inputs), n, seed=10_000 + self.seed)
            streams.append(batches_of(b.adapter, _select(inputs, idx), self.config.calibration_batch_size))
        out = G.activations(b.adapter, b.expert_params, streams, labels=b.adapter.labels,
                            progress=self.config.progress)
        self.timings[f"grams/activations{n}"] = time.perf_counter() - t0
        self._grams[key] = out
        return out

    def grams(self, mode: str):
        if mode in self._grams:
            return self._grams[mode]
        from bmm_jax import grams as G
        b = self.bench
        t0 = time.perf_counter()
        if mode == "data_free":
            out = G.data_free(b.base_params, b.expert_params, b.adapter.labels)
        elif mode == "data_free_group":
            from bmm_jax.experiment.ablations import data_free_group_grams
            out = data_free_group_grams(b.base_params, b.expert_params, b.adapter.labels)
        elif mode == "activations":
            return self.activation_grams(self.config.calibration_examples)
        elif mode == "hybrid":
            out = G.hybrid(self.activation_grams(self.config.hybrid_calibration_examples), self.grams("data_free"),
                           beta=self.config.hybrid_beta)
        else:
            raise ValueError(f"unknown Gram mode {mode!r}; expected one of {GRAM_MODES}")
        self.timings[f"grams/{mode}"] = time.perf_counter() - t0
        self._grams[mode] = out
        return out

    def anchor(self, name: str) -> tuple[PyTree, float | None, dict | None, dict]:
        """``(params, chosen scale, validation accuracies, info)`` of an anchor; the scale (the
        anchor's own coefficient) is chosen on the validation subset over the config's grid."""
        if name in self._anchors:
            return self._anchors[name]
        from bmm_jax import anchors as A
        b = self.bench
        t0 = time.perf_counter()
        fn = A.get(name)
        grid = self.config.grid(name) if name in SCALED else None
        kw = anchor_kwargs(fn, labels=b.adapter.labels, scale=1.0 if grid else None)
        if name == "wudi":
            kw["steps"] = self.config.wudi_steps
        if name == "regmean":
            kw["grams"] = self.grams("activations")
        unit = fn(b.base_params, b.expert_params, **kw)
        unit = unit.params if hasattr(unit, "params") and not isinstance(unit, Mapping) else unit
        info: dict = {"seconds_compute": time.perf_counter() - t0}
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

    def anchor_val(self, name: str) -> dict:
        params, scale, val, info = self.anchor(name)
        if val is None:
            val = self.eval(params, "validation")
            self._anchors[name] = (params, scale, val, info)
        return val

    def prep(self, anchor: str, gram: str, prior: str = "isotropic"):
        """``bmm_jax.prepare`` of (anchor at its chosen scale, Grams, prior); one kept at a time."""
        import bmm_jax
        key = (anchor, gram, prior)
        if self._prep_key != key:
            self._prep = None  # free the previous factors first
            b = self.bench
            anchor_params = self.anchor(anchor)[0]
            grams = self.grams(gram)
            t0 = time.perf_counter()
            self._prep = bmm_jax.prepare(b.base_params, b.expert_params, anchor_params, grams,
                                         labels=b.adapter.labels, prior=prior)
            self._prep_key = key
            self.timings[f"prepare/{anchor}-{gram}-{prior}"] = time.perf_counter() - t0
        return self._prep

    def search(self, anchor: str, gram: str, grouping: str, trials: int, run_dir: str, *, prior: str = "isotropic",
               prep=None, **search_kw):
        """:func:`bmm_jax.search.search` of BMM's hyper-parameters on the validation subset,
        with the exact anchor as trial 0 (its validation accuracy already known)."""
        from bmm_jax.search import SearchConfig, search
        from bmm_jax.search.study import StudyError
        same_prep = prep is None
        prep = prep if prep is not None else self.prep(anchor, gram, prior)
        anchor_params = self.anchor(anchor)[0]
        anchor_val = self.anchor_val(anchor)

        def objective(params):
            if params is anchor_params:      # trial 0 of the search: already evaluated
                return dict(anchor_val)
            return self.eval(params, "validation")

        cfg = SearchConfig(grouping=grouping, num_trials=int(trials), designer=self.config.designer, seed=self.seed,
                           validation_examples=self.config.validation_examples, jax_cache_dir=None, **search_kw)
        copied = (self._start_from_same_search(run_dir, anchor, gram, grouping, int(trials), prior)
                  if same_prep and not search_kw else None)
        try:
            res = search(prep, objective, cfg, run_dir=run_dir, anchor=anchor_params, progress=self.config.progress,
                         verbose=False)
        except StudyError:
            if copied is None:
                raise
            # the copied study is not this search after all (its fingerprint differs): start afresh
            _log(f"[seed {self.seed}] {copied} holds another search; {os.path.basename(run_dir)} starts afresh",
                 self.config.progress)
            shutil.rmtree(run_dir)
            res = search(prep, objective, cfg, run_dir=run_dir, anchor=anchor_params, progress=self.config.progress,
                         verbose=False)
        return res, cfg

    def same_searches(self, anchor: str, gram: str, prior: str, grouping: str) -> list[tuple[str, int]]:
        """``(study directory, trials)`` of the searches of this seed, in any runner's directory
        (methods, ablations, few-shot), that search exactly what ``search(anchor, gram, grouping, n,
        prior=prior)`` would with the runner's own factors: same anchor, Grams, prior, grouping,
        designer, seed and validation subset (one protocol per run directory)."""
        c = self.config
        root = os.path.join(self.run_dir, f"seed{self.seed}")
        found: list[tuple[str, int]] = []
        if prior == "isotropic":
            for hp, g, n in (("module", c.module_grouping, c.module_trials), ("shared", "global", c.shared_trials)):
                if g == grouping:
                    found.append((os.path.join(root, "search", f"{anchor}-{gram}-{hp}"), int(n)))
        patterns = [("ablations", re.compile(rf"{re.escape(f'{anchor}-{gram}-{prior}-{grouping}-')}(\d+)(-budget)?"))]
        if prior == "isotropic":
            patterns.append(("fewshot", re.compile(rf"{re.escape(f'{anchor}-{gram}-{grouping}-')}(\d+)")))
        for sub, pat in patterns:
            d = os.path.join(root, sub, "search")
            for name in sorted(os.listdir(d)) if os.path.isdir(d) else ():
                m = pat.fullmatch(name)
                if m:
                    found.append((os.path.join(d, name), int(m.group(1))))
        return found

    def _start_from_same_search(self, run_dir: str, anchor: str, gram: str, grouping: str, trials: int,
                                prior: str) -> str | None:
        """Start a new study in ``run_dir`` from a copy of the same search already run for this seed
        (:meth:`same_searches`, the one with most trials up to ``trials``): the search then resumes
        it, so its result is the one an uninterrupted ``trials``-trial search gives, without
        re-evaluating the trials already done. The source is only read. Returns the source, or
        ``None`` when ``run_dir`` already holds a study or there is none to copy."""
        from bmm_jax.search.study import DB_NAME
        if os.path.lexists(run_dir) and (not os.path.isdir(run_dir) or os.listdir(run_dir)):
            return None
        target = os.path.abspath(run_dir)
        best = None
        for src, n in self.same_searches(anchor, gram, prior, grouping):
            if (os.path.abspath(src) != target and n <= trials and os.path.isfile(os.path.join(src, DB_NAME))
                    and (best is None or n > best[1])):
                best = (src, n)
        if best is None:
            return None
        src = best[0]
        parent = os.path.dirname(target)
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.copy-", dir=parent)
        try:
            for name in os.listdir(src):
                if not name.startswith(".") and os.path.isfile(os.path.join(src, name)):
                    shutil.copy2(os.path.join(src, name), os.path.join(tmp, name))
            atomic_write_json(os.path.join(tmp, "started_from.json"), {"study": os.path.abspath(src), "trials": best[1]})
            if os.path.isdir(target):
                os.rmdir(target)            # empty: checked above
            os.rename(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _log(f"[seed {self.seed}] {os.path.basename(target)}: continuing the same search from {src} "
             f"({best[1]} trials)", self.config.progress)
        return src

    # ------------------------------------------------------------------ methods
    def run_job(self, key: MethodKey) -> tuple[dict, dict, dict, dict]:
        """``(test metrics, validation metrics, info, test examples)`` of one method."""
        b = self.bench
        ev = self.eval
        if key.method == "pretrained":
            test, ex = ev.metrics(b.base_params, "test", heads=b.probe_heads)
            val, _ = ev.metrics(b.base_params, "validation", heads=b.probe_heads)
            return test, val, {}, ex
        if key.method == "expert":
            test, val, ex = {}, {}, {}
            for task, params in zip(b.tasks, b.expert_params):
                t, e = ev.metrics(params, "test", tasks=[task])
                test.update(t)
                ex.update(e)
                val.update(ev.metrics(params, "validation", tasks=[task])[0])
            return test, val, {}, ex
        if key.method == "bmm":
            return self._bmm(key)
        if key.method == "bmm_sampled":
            return self._sampled(key)
        params, scale, _, info = self.anchor(key.method)
        test, ex = ev.metrics(params, "test")
        val, _ = ev.metrics(params, "validation")
        return test, val, {"scale": scale, **{k: v for k, v in info.items() if k != "scale"}}, ex

    def ensure_anchor_examples(self, name: str) -> None:
        """Per-example test statistics of an anchor that is not a row of this run (for the paired
        comparisons of its BMM rows)."""
        slug = MethodKey(name).slug
        path = examples_path(self.run_dir, self.seed, slug)
        if any(k.slug == slug for k in self.jobs) or os.path.exists(path):
            return
        _, ex = self.eval.metrics(self.anchor(name)[0], "test")
        save_examples(path, ex)

    def _bmm(self, key: MethodKey):
        t0 = time.perf_counter()
        self.prep(key.anchor, key.gram)
        t_prep = time.perf_counter() - t0
        shared = key.hparams == "shared"
        grouping = "global" if shared else self.config.module_grouping
        trials = self.config.shared_trials if shared else self.config.module_trials
        run_dir = os.path.join(self.dir, "search", f"{key.anchor}-{key.gram}-{key.hparams}")
        res, cfg = self.search(key.anchor, key.gram, grouping, trials, run_dir)
        val, _ = self.eval.metrics(res.params, "validation")
        test, ex = self.eval.metrics(res.params, "test")
        self.ensure_anchor_examples(key.anchor)
        info = {"anchor_scale": self.anchor(key.anchor)[1], "best_value": res.best_value,
                "anchor_value": res.anchor_value, "best_trial": res.best_trial, "kept_anchor": res.best_trial == 0,
                "hparams": res.hparams, "num_trials": len(res.trials) - (1 if res.anchor_value is not None else 0),
                "grouping": cfg.grouping, "seconds_prepare": t_prep, "search_dir": run_dir}
        return test, val, info, ex

    def sample_key(self, slug: str):
        from bmm_jax.experiment.sampling import sample_key
        return sample_key(self.config.sample_seed, self.seed, slug)

    def _sampled(self, key: MethodKey):
        """The sampled counterpart of a BMM row: ``sample_draws`` posterior draws around the row's
        searched hyper-parameters, probabilities averaged, temperature chosen on the validation subset
        by ``config.sample_selection`` (:func:`validation_loss`)."""
        from bmm_jax.experiment.sampling import select_temperature
        point = MethodKey("bmm", key.anchor, key.gram, key.hparams)
        entry = self.done.get(point.slug)
        if entry is None:
            raise RuntimeError(f"{key.label} needs its point estimate {point.label} first")
        kept = entry["info"].get("hparams") is None
        hp = entry["info"]["hparams"] if not kept else {"global": {"rho": 100.0, "scale": 1.0}}
        prep = self.prep(key.anchor, key.gram)
        m = self.config.sample_draws
        rng_key = self.sample_key(key.slug)
        ev = self.eval

        def ensemble(t: float, split: str):
            draws = draw_samples(prep, rng_key, m, hp, float(t))
            return ev.summarize(ev.ensemble_log_probs(draws, split))

        point_val = entry["validation"]
        criterion = self.config.sample_selection
        point_acc = mean_of(point_val, "accuracy")

        def evaluate_at(t: float):
            val, _ = ensemble(t, "validation")
            return validation_loss(criterion, val, point_acc), val

        t0 = time.perf_counter()
        sel = select_temperature(evaluate_at, self.config.sample_temperatures,
                                 point_value=validation_loss(criterion, point_val, point_acc))
        t_sel = time.perf_counter() - t0
        if sel.best == 0.0:
            params = prep.params(hp)
            test, ex = ev.metrics(params, "test")
            val = point_val
        else:
            test, ex = ensemble(sel.best, "test")
            val = sel.details[sel.best]
        info = {"temperature": sel.best, "draws": m, "point_hparams": hp, "kept_anchor": kept,
                "selection": criterion,
                "validation_nll": {repr(t): mean_of(point_val if t == 0.0 else d, "nll")
                                   for t, d in sel.details.items()},
                "validation_accuracy": {repr(t): mean_of(point_val if t == 0.0 else d, "accuracy")
                                        for t, d in sel.details.items()},
                "seconds_select": t_sel}
        return test, val, info, ex

    def save(self) -> None:
        atomic_write_json(self.progress_file, {"protocol": self.config.protocol(), "seed": self.seed,
                                               "methods": self.done})


_SELECTION_TEXT = {"nll": "NLL", "accuracy": "accuracy",
                   "nll_keep_accuracy": "NLL (among temperatures that keep the point estimate's accuracy)"}


def validation_loss(criterion: str, val, point_accuracy: float) -> float:
    """The loss :func:`~bmm_jax.experiment.sampling.select_temperature` minimises for a sampled
    row's temperature, from ``val`` (``{task: metrics}`` on the validation subset) under
    ``criterion`` (:data:`~bmm_jax.experiment.config.SAMPLE_SELECTIONS`): mean NLL; 1 - mean
    accuracy; or mean NLL where the mean accuracy is at least ``point_accuracy`` (the point
    estimate's) and ``inf`` elsewhere."""
    if criterion == "nll":
        return mean_of(val, "nll")
    acc = mean_of(val, "accuracy")
    if criterion == "accuracy":
        return 1.0 - acc
    if criterion == "nll_keep_accuracy":
        return mean_of(val, "nll") if acc >= point_accuracy - 1e-12 else math.inf
    raise ValueError(f"unknown temperature selection {criterion!r}")


def _settings(config: ExperimentConfig, key: MethodKey) -> dict | None:
    """What a finished job must have been run with to be reused (the sampled rows' draw settings)."""
    return config.sampling() if key.method == "bmm_sampled" else None


def run_experiment(config: ExperimentConfig) -> ExperimentResult:
    """Run ``config`` end to end; resumable in its run directory.

    Per seed: build (or reuse) the experts, then every row of :func:`jobs_of` (baselines, BMM
    rows, sampled BMM rows): metrics on the test split and on the validation subset used for
    selection (accuracy, NLL, Brier score, ECE), per-example test statistics for the paired
    comparisons. Then the paired comparisons of every BMM row with its anchor (and of every
    sampled row with its point estimate), pooled reliability diagrams, and the result files
    (:func:`write_results`).

    Returns:
      :class:`~bmm_jax.experiment.records.ExperimentResult`.

    Raises:
      ValueError: the run directory holds another protocol; errors of the pieces propagate.
    """
    if not isinstance(config, ExperimentConfig):
        raise TypeError(f"config must be an ExperimentConfig, got {type(config).__name__}")
    t_start = time.perf_counter()
    spec = config.spec()
    run_dir = config.resolved_run_dir
    os.makedirs(run_dir, exist_ok=True)
    atomic_write_json(os.path.join(run_dir, "config.json"), config.to_dict())
    jobs = jobs_of(config)
    head = config.resolved_head
    records: list[dict] = []
    details: dict = {"config": config.to_dict(), "seeds": {}}
    show = config.progress
    for seed in config.seeds:
        t_seed = time.perf_counter()
        sr = SeedRun(config, spec, seed, run_dir, jobs)

        def is_done(k):
            e = sr.done.get(k.slug)
            return (e is not None and e.get("settings") == _settings(config, k)
                    and os.path.exists(examples_path(run_dir, seed, k.slug)))
        todo = [k for k in jobs if not is_done(k)]
        bar = _bar(len(jobs), f"{spec.name} seed {seed}", show)
        bar.update(len(jobs) - len(todo))
        try:
            for key in todo:
                bar.set_postfix_str(key.label)
                t0 = time.perf_counter()
                test, val, info, ex = sr.run_job(key)
                info = {**info, "seconds": time.perf_counter() - t0}
                save_examples(examples_path(run_dir, seed, key.slug), ex)
                sr.done[key.slug] = {"key": list(key), "test": test, "validation": val, "info": jsonable(info),
                                     "settings": _settings(config, key)}
                sr.save()
                bar.update(1)
                _log(f"[{spec.name} seed {seed}] {key.label}: test acc {100 * mean_of(test):.2f} "
                     f"nll {mean_of(test, 'nll'):.3f}  val acc {100 * mean_of(val):.2f}  ({info['seconds']:.0f} s)",
                     show)
        finally:
            bar.close()
        for key in jobs:
            entry = sr.done[key.slug]
            for split in ("test", "validation"):
                for task, m in entry[split].items():
                    records.append(record(key, seed, task, split, m, head))
        details["seeds"][str(seed)] = {
            "methods": {k.slug: sr.done[k.slug]["info"] for k in jobs},
            "timings": sr.timings,
            "evaluations": None if sr._bench is None else {"count": sr.eval.n_evals, "seconds": sr.eval.seconds},
            "experts": None if sr._bench is None else jsonable(sr.bench.stats),
            "seconds": time.perf_counter() - t_seed,
            "tasks": None if sr._bench is None else list(sr.bench.tasks),
        }
        sr = None          # free this seed's experts and factors before the next
    comparisons = paired_comparisons(config, jobs, run_dir)
    diagrams = pooled_reliability(config, jobs, run_dir)
    seconds = time.perf_counter() - t_start
    details["seconds"] = seconds
    files = write_results(records, run_dir, title=f"{config.name}: {spec.name}, seeds {list(config.seeds)}",
                          plots=config.plots, details=details, config=config, comparisons=comparisons,
                          diagrams=diagrams)
    with open(files["table"]) as f:
        table = f.read()
    return ExperimentResult(records, table, run_dir, files, details, seconds, comparisons)


def _correct(run_dir: str, seeds, slug: str) -> dict:
    out = {}
    for s in seeds:
        ex = load_examples(examples_path(run_dir, s, slug))
        if ex is not None:
            out[s] = {t: v["correct"] for t, v in ex.items()}
    return out


def paired_comparisons(config: ExperimentConfig, jobs: Sequence[MethodKey], run_dir: str) -> list[Comparison]:
    """Every BMM row vs its anchor, every sampled row vs its anchor and its point estimate (test
    accuracy, :func:`bmm_jax.experiment.paired.compare`)."""
    out = []
    for key in jobs:
        if not key.is_bmm:
            continue
        refs = [MethodKey(key.anchor)]
        if key.method == "bmm_sampled":
            refs.append(MethodKey("bmm", key.anchor, key.gram, key.hparams))
        mine = _correct(run_dir, config.seeds, key.slug)
        for ref in refs:
            c = compare(mine, _correct(run_dir, config.seeds, ref.slug), key, ref,
                        num_resamples=config.bootstrap_resamples, seed=0)
            if c is not None:
                out.append(c)
    return out


def pooled_reliability(config: ExperimentConfig, jobs: Sequence[MethodKey], run_dir: str) -> dict:
    """``{MethodKey: Reliability}`` pooled over tasks and seeds (test split), table order."""
    from bmm_jax.calibration import reliability_from_examples
    out = {}
    for key in method_order(jobs):
        conf, corr = [], []
        for s in config.seeds:
            ex = load_examples(examples_path(run_dir, s, key.slug))
            for v in (ex or {}).values():
                conf.append(v["confidence"])
                corr.append(v["correct"])
        if conf:
            out[key] = reliability_from_examples(np.concatenate(conf), np.concatenate(corr))
    return out


def write_results(records: Sequence[Mapping], run_dir: str, *, title: str = "", plots: bool = True,
                  details: Mapping | None = None, config: ExperimentConfig | None = None,
                  comparisons: Sequence[Comparison] | None = None, diagrams: Mapping | None = None) -> dict:
    """Write the result files atomically; returns ``{kind: path}``.

    records.json / records.csv (every record), summary.csv (per method: mean and std over seeds),
    table.md (:func:`markdown_report`), calibration.md, paired.md / paired.json (paired
    comparisons with confidence intervals), details.json, and the plots accuracy_by_task.png,
    normalized_by_method.png, reliability.png.
    """
    from bmm_jax.experiment.plots import plot_accuracy_by_task, plot_normalized, plot_reliability_pooled
    os.makedirs(run_dir, exist_ok=True)
    j = lambda n: os.path.join(run_dir, n)  # noqa: E731
    files = {"records": j("records.json"), "records_csv": j("records.csv"), "summary_csv": j("summary.csv"),
             "table": j("table.md"), "calibration": j("calibration.md")}
    atomic_write_json(files["records"], list(records))
    atomic_write_text(files["records_csv"], records_csv(records))
    atomic_write_text(files["summary_csv"], summary_csv(records))
    atomic_write_text(files["table"], markdown_report(records, title=title, config=config, comparisons=comparisons))
    atomic_write_text(files["calibration"], format_calibration_table(records, "test") + "\n")
    if comparisons is not None:
        files["paired"], files["paired_json"] = j("paired.md"), j("paired.json")
        atomic_write_text(files["paired"], format_paired_table(comparisons) + "\n")
        atomic_write_json(files["paired_json"], [c.to_dict() for c in comparisons])
    if details is not None:
        files["details"] = j("details.json")
        atomic_write_json(files["details"], jsonable(details))
    if plots and records:
        files["plot_tasks"] = j("accuracy_by_task.png")
        files["plot_normalized"] = j("normalized_by_method.png")
        plot_accuracy_by_task(records, files["plot_tasks"], title=title)
        plot_normalized(records, files["plot_normalized"], title=title)
        if diagrams:
            files["plot_reliability"] = j("reliability.png")
            plot_reliability_pooled(diagrams, files["plot_reliability"],
                                    title=(title + ": " if title else "") + "reliability (test, pooled over tasks "
                                    "and seeds, 15 bins)")
    return files


def markdown_report(records: Sequence[Mapping], *, title: str = "", config: ExperimentConfig | None = None,
                    comparisons: Sequence[Comparison] | None = None) -> str:
    """``table.md``: a title, the protocol in one paragraph, the test accuracy table, the
    calibration table, the paired comparisons, and the validation accuracy table."""
    seeds = sorted({int(r["seed"]) for r in records})
    heads = sorted({r.get("head") for r in records if r.get("head")})
    parts = [f"# {title}" if title else "# Results", ""]
    if config is not None:
        head = config.resolved_head
        parts += [
            f"Test accuracy (%), mean ± std over seeds {seeds} (expert fine-tuning seeds). "
            f"Experts: {HEAD_LABELS.get(head, head)}. Merged encoders use each task's expert head; "
            f"*pretrained* uses the linear-probe heads. "
            f"Normalised mean = mean over tasks of merged / expert accuracy. "
            f"Every hyper-parameter (anchor scales over a grid; BMM's ρ, s by Vizier: shared = one "
            f"global group, {config.shared_trials} trials; module = grouping `{config.module_grouping}`, "
            f"{config.module_trials} trials; the sampled rows' posterior temperature) is chosen on "
            f"{config.validation_examples or 'all'} validation examples per task, never on test. Activation "
            f"Grams: {config.calibration_examples} unlabeled train inputs per task."
            + (f" BMM-sampled: {config.sample_draws} posterior draws (method.md §5), predicted probabilities "
               f"averaged, temperature chosen on validation "
               f"{_SELECTION_TEXT[config.sample_selection]} among 0 (the point estimate) and "
               f"{list(config.sample_temperatures)} (refined by √10 around the best)." if config.sample_draws else ""),
            ""]
    elif heads:
        parts += [f"Expert heads: {', '.join(heads)}.", ""]
    parts += [format_table(records, "test"), "",
              "Calibration on test (mean over tasks; ECE with 15 equal-width bins):", "",
              format_calibration_table(records, "test"), ""]
    if comparisons is not None:
        lvl = int(round(100 * comparisons[0].level)) if comparisons else 95
        parts += [f"Paired comparisons on test accuracy (method minus reference, percentage points; "
                  f"{lvl}% percentile bootstrap intervals: per seed over the test examples, and over seeds and "
                  f"examples together):", "", format_paired_table(comparisons), ""]
    parts += ["Validation subset (the selection data):", "", format_table(records, "validation"), ""]
    return "\n".join(parts)


__all__ = ["run_experiment", "write_results", "markdown_report", "jobs_of", "Evaluator", "SeedRun",
           "paired_comparisons", "pooled_reliability", "load_examples", "examples_path", "anchor_kwargs"]
