"""The outer level of BMM (method.md §4): module-wise Bayesian optimisation with Google Vizier.

``bmm_jax.search.search(prep, objective, config, run_dir=...)`` searches per-group hyper-parameters
``(log10 rho_g, s_g)`` (plus optional extras) of the merge fast path ``prep.params(hparams)`` to
maximise a validation objective, with a Vizier GP designer held in RAM and every trial persisted in
an SQLite Vizier study inside ``run_dir`` (a killed search resumes with no trial lost or repeated).

This subpackage is itself callable: ``bmm_jax.search(...)`` is ``bmm_jax.search.search(...)``
(the module's class is swapped for a callable ``ModuleType`` subclass), so
``bmm_jax.search.SearchConfig`` and friends stay reachable under the same name.

Flow of :func:`search`:

1. resolve the groups from the label tree, print them and write ``groups.json`` / ``groups.txt``;
2. open (or resume) the study ``<run_dir>/vizier.db``;
3. trial 0: evaluate the exact anchor (once; its score is stored in the study metadata);
4. evaluate any trial a killed run left ``ACTIVE`` (same id and point, once);
5. seeded trials (default: the anchor-equivalent point ``rho = 10**2, s = 1`` and the shared
   default ``rho = 1, s = 1`` for every group), then designer suggestions, until ``num_trials``
   trials have finished; ``SearchConfig.batch_size`` trials per step (:mod:`bmm_jax.search.batch`:
   one ``suggest(count)``, one vmapped ``Prepared.params``, one call of a batched objective);
6. return the best trial's merged params, or the exact anchor if no trial beats it, and write the
   reports (:mod:`bmm_jax.search.reports`).
"""
from __future__ import annotations

import contextlib
import inspect
import json
import math
import os
import sys
import time
import types
import warnings
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import numpy as np

from bmm_jax._tree import PyTree
from bmm_jax.search.batch import BatchRunner, make_batched_objective, resolve_objectives, result_to_value
from bmm_jax.search.designer import SafeDesigner, fixed_trial_padding, make_designer
from bmm_jax.search.hybrid import HybridPrepared
from bmm_jax.search.reports import (best_so_far, plot_convergence, plot_hparams_by_depth, write_best,
                                    write_groups, write_trials)
from bmm_jax.search.space import (BUILTIN_EXTRAS, DESIGNERS, OBJECTIVES, Extra, SearchConfig, SearchSpace,
                                  build_space, extras_of, fingerprint, group_hparams,
                                  problem_statement, seed_point)
from bmm_jax.search.study import RunDirInUse, SQLiteStudy, StudyError, TrialRecord

__all__ = ["search", "SearchConfig", "SearchResult", "Extra", "SearchSpace", "TrialRecord", "build_space",
           "make_designer", "SafeDesigner", "SQLiteStudy", "BUILTIN_EXTRAS", "DESIGNERS", "OBJECTIVES",
           "make_objective", "make_batched_objective", "fixed_trial_padding", "HybridPrepared", "StudyError", "RunDirInUse"]


class SearchResult(NamedTuple):
    """What :func:`search` returns.

    Attributes:
      params: the merged params of the best trial, or the exact anchor when no trial beats it.
      hparams: ``{group: {"rho": rho, "scale": s}}`` of the best trial; ``None`` when the exact
        anchor is returned.
      best_value: the best validation objective (the anchor's when the anchor is returned).
      trials: every trial, as :class:`~bmm_jax.search.study.TrialRecord`: the exact anchor first
        (id 0, source ``"anchor"``) when evaluated, then the Vizier trials by id.
      history: ``[len(trials)]`` float64, best value so far after each entry of ``trials``
        (NaN before the first value).
      extras: ``{name: value}`` of the best trial's extra parameters (``{}`` for the anchor).
      best_trial: id of the returned trial (0 = the exact anchor).
      anchor_value: the exact anchor's validation objective (``None`` if not evaluated).
      run_dir: the run directory; the Vizier study is ``<run_dir>/vizier.db``.
    """
    params: PyTree
    hparams: dict | None
    best_value: float
    trials: tuple
    history: np.ndarray
    extras: dict
    best_trial: int
    anchor_value: float | None
    run_dir: str

    @property
    def study(self) -> str:
        """The Vizier study: its SQLite datastore ``<run_dir>/vizier.db`` (every trial, with its
        parameters, measurement and ``bmm_jax`` metadata; ``trials`` holds the same as records).
        Rerunning :func:`search` with ``run_dir`` reopens it."""
        return os.path.join(self.run_dir, "vizier.db")


# ----------------------------------------------------------------------------------- objective
def make_objective(objective: Callable | None = None, *, kind: str = "accuracy", adapter=None, heads=None,
                   tasks: Sequence[str] | None = None, expert_accuracy: Mapping[str, float] | None = None,
                   evaluate_fn: Callable | None = None, validation_examples: int | None = 128):
    """A function ``params -> (value, metrics)`` for the search.

    Either ``objective(params)`` returning a float or a mapping ``task -> accuracy``, or the pieces
    ``adapter, heads, tasks`` for ``evaluate_fn(adapter, params, heads, tasks, split="validation",
    max_examples=validation_examples) -> {task: acc}`` (default :func:`bmm_jax.evaluate.evaluate`;
    never the test split).

    ``kind="accuracy"``: the value is the float, or the mean of the mapping. ``kind="normalized"``:
    the mean of ``acc[t] / expert_accuracy[t]`` (needs a mapping and ``expert_accuracy``).
    ``metrics`` holds ``acc/<task>`` (and ``norm/<task>``) for mappings. The batched version
    (several trials' params at once) is :func:`make_batched_objective`.
    """
    if kind not in OBJECTIVES:
        raise ValueError(f"unknown objective kind {kind!r}; expected one of {OBJECTIVES}")
    if objective is None:
        missing = [n for n, v in (("adapter", adapter), ("heads", heads), ("tasks", tasks)) if v is None]
        if missing:
            raise ValueError("search needs an objective: pass objective(params) -> float | {task: acc}, "
                             f"or adapter, heads and tasks to evaluate on the validation split (missing: {missing})")
        if isinstance(tasks, str) or not len(tasks):
            raise ValueError(f"tasks must be a non-empty sequence of task names, got {tasks!r}")
        if evaluate_fn is None:
            from bmm_jax.evaluate import evaluate as evaluate_fn
        tasks = list(tasks)

        def objective(params):
            return evaluate_fn(adapter, params, heads, tasks, split="validation", max_examples=validation_examples)
    elif not callable(objective):
        raise TypeError(f"objective must be callable (params -> float or {{task: acc}}), got {type(objective).__name__}")
    if kind == "normalized":
        if expert_accuracy is None:
            raise ValueError("objective='normalized' needs expert_accuracy={task: the expert's validation accuracy}")
        for t, a in expert_accuracy.items():
            if not (float(a) > 0):
                raise ValueError(f"expert_accuracy[{t!r}] = {a}; cannot normalise by it")

    def evaluate(params) -> tuple[float, dict]:
        return result_to_value(objective(params), kind, expert_accuracy)

    return evaluate


# ----------------------------------------------------------------------------------- helpers
@contextlib.contextmanager
def _jax_cache(d: str | None):
    """The persistent JAX compilation cache at ``d`` for the duration of the block only.

    ``None`` does nothing; ``"auto"`` is ``<bmm_jax cache>/jax``. A cache the user configured
    (``jax_compilation_cache_dir`` already set) is left alone. On exit the setting is restored and
    JAX's cache handle is reset, so compilations after the block neither read nor write ``d``.
    """
    import jax
    if d is None or jax.config.jax_compilation_cache_dir:
        yield
        return
    if d == "auto":
        root = os.environ.get("BMM_JAX_CACHE") or os.path.join("~", ".cache", "bmm_jax")
        d = os.path.join(os.path.expanduser(root), "jax")
    try:
        os.makedirs(d, exist_ok=True)
    except OSError as e:  # pragma: no cover - read-only home etc.
        warnings.warn(f"could not enable the JAX compilation cache at {d!r}: {e}")
        yield
        return
    from jax.experimental.compilation_cache import compilation_cache
    previous = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", d)
    try:
        yield
    finally:
        jax.config.update("jax_compilation_cache_dir", previous)
        compilation_cache.reset_cache()


def _check_extras_accepted(params_fn: Callable, space: SearchSpace) -> None:
    if not space.extras:
        return
    try:
        sig = inspect.signature(params_fn)
    except (TypeError, ValueError):
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values()):
        return
    missing = [e.name for e in space.extras if e.name not in sig.parameters]
    if missing:
        hint = ("; to search the hybrid-Gram beta, pass prep=bmm_jax.search.HybridPrepared(base, experts, "
                "anchor, data_grams) (it re-factors the modules per beta)" if "beta" in missing else "")
        raise ValueError(f"the search has extra parameters {missing}, but the params function "
                         f"{getattr(params_fn, '__qualname__', params_fn)!r} accepts no keyword argument "
                         f"of that name (signature {sig}); pass params_fn=... that does{hint}")


def _resolve(prep, params_fn, labels):
    if prep is not None:
        if params_fn is None:
            params_fn = getattr(prep, "params", None)
        if labels is None:
            labels = getattr(prep, "labels", None)
    if params_fn is None or not callable(params_fn):
        raise ValueError("search needs the merge fast path: prep=bmm_jax.prepare(...) "
                         "(or params_fn=hparams -> params and labels=...)")
    if labels is None:
        raise ValueError("search needs the label tree: prep.labels or labels=...")
    return params_fn, labels


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


# ----------------------------------------------------------------------------------- search
def search(prep=None, objective: Callable | None = None, config: SearchConfig | None = None, *,
           run_dir: str, anchor: PyTree | None = None, labels: PyTree | None = None,
           params_fn: Callable | None = None, adapter=None, heads=None, tasks: Sequence[str] | None = None,
           expert_accuracy: Mapping[str, float] | None = None, evaluate_fn: Callable | None = None,
           designer_factory: Callable | None = None, batched_objective: Callable | None = None,
           progress: bool = True, verbose: bool = True) -> SearchResult:
    """Module-wise Bayesian optimisation of BMM's ``(rho, s)`` per group (method.md §4).

    Args:
      prep: the merge fast path (``bmm_jax.prepare(...)``): ``prep.labels`` (label tree) and
        ``prep.params(hparams, **extras) -> merged params``. The search passes per-module
        ``hparams = {module path: {"rho": rho, "scale": s}}`` and the extras (``anchor_scale``,
        ``beta``, ...) as keyword arguments.
      objective: ``params -> float`` or ``params -> {task: validation accuracy}`` (higher is
        better). Or leave it ``None`` and pass ``adapter, heads, tasks`` (evaluated with
        ``bmm_jax.evaluate.evaluate(..., split="validation")``). See :func:`make_objective`.
      config: :class:`SearchConfig` (default ``SearchConfig()``).
      run_dir: run directory: Vizier study ``vizier.db`` and reports. Rerunning with the same
        directory resumes the study (same search space and objective required).
      anchor: the exact anchor params, evaluated as trial 0 and returned if no trial beats it
        (recommended; without it the guarantee rests on the anchor-equivalent seed, rho = 100,
        which equals the anchor only up to ~1e-2 relative).
      labels, params_fn: instead of ``prep``.
      adapter, heads, tasks, evaluate_fn: pieces of the default objective.
      expert_accuracy: ``{task: expert validation accuracy}`` for ``objective="normalized"``.
      designer_factory: ``(problem, *, seed) -> vizier Designer`` overriding ``config.designer``
        (dependency injection, e.g. for tests).
      batched_objective: ``params_batch -> k results`` evaluating the ``k <= config.batch_size``
        trials of a step at once (params leaves with a leading ``[k]`` axis; an objective with the
        attribute ``batched = True`` is taken as one). Without it, the library's validation
        objective is batched automatically (vmapped forward) and any other objective is called once
        per trial. See :mod:`bmm_jax.search.batch`.
      progress: show a tqdm bar with the best value so far.
      verbose: print the group table and a summary.

    Returns:
      :class:`SearchResult`.

    Raises:
      ValueError / TypeError: bad configuration (empty search space, unknown grouping, inverted
        ranges, non-positive trials), missing pieces.
      bmm_jax.search.study.StudyError (a ``ValueError``): ``run_dir`` holds another search's study,
        a damaged ``vizier.db``, or the reports of an earlier search without its ``vizier.db``; the
        message names the file and what to do. Nothing in ``run_dir`` is written before these checks.
      bmm_jax.search.study.RunDirInUse (a ``RuntimeError``): another live process uses ``run_dir``.
      Exceptions of the objective propagate; the trial stays ``ACTIVE`` and is evaluated again
      when the search is rerun. A non-finite objective value marks the trial infeasible.
    """
    config = SearchConfig() if config is None else config
    if not isinstance(config, SearchConfig):
        raise TypeError(f"config must be a SearchConfig, got {type(config).__name__}")
    if not isinstance(run_dir, (str, os.PathLike)) or not str(run_dir):
        raise TypeError(f"run_dir must be a path, got {run_dir!r}")
    run_dir = os.fspath(run_dir)
    params_fn, labels = _resolve(prep, params_fn, labels)
    space = build_space(labels, config)
    _check_extras_accepted(params_fn, space)
    evaluate, batched_evaluate = resolve_objectives(
        objective, batched_objective, make_objective=make_objective, kind=config.objective,
        batch_size=config.batch_size, adapter=adapter, heads=heads, tasks=tasks, expert_accuracy=expert_accuracy,
        evaluate_fn=evaluate_fn, validation_examples=config.validation_examples)
    runner = BatchRunner(space, params_fn, evaluate, batched_evaluate, config.batch_size)
    problem = problem_statement(space)
    if os.path.lexists(run_dir) and not os.path.isdir(run_dir):
        raise ValueError(f"run_dir {run_dir!r} exists and is not a directory")
    os.makedirs(run_dir, exist_ok=True)

    merged = runner.merged

    # the study is opened (and checked: damaged, missing, another search) before anything is written
    with SQLiteStudy(run_dir, problem, study_id=config.study_id, fingerprint=fingerprint(space, config)) as study:
        table = write_groups(run_dir, space)
        if verbose:
            print(table, flush=True)
        # Trial 0: the exact anchor, evaluated once per study.
        anchor_rec = None
        if config.anchor_trial and anchor is not None:
            stored = study.get_meta("anchor")
            if stored is None:
                t0 = time.perf_counter()
                value, metrics = evaluate(anchor)
                stored = json.dumps({"value": value, "metrics": metrics, "seconds": time.perf_counter() - t0})
                study.set_meta("anchor", stored)
            a = json.loads(stored)
            anchor_rec = TrialRecord(0, "COMPLETED" if math.isfinite(a["value"]) else "INFEASIBLE", {},
                                     a["value"] if math.isfinite(a["value"]) else None, a["metrics"],
                                     a["seconds"], "anchor")
        elif config.anchor_trial:
            warnings.warn("search: no anchor params given, so the exact anchor is not evaluated as trial 0; "
                          "the result is only as good as the anchor-equivalent seed (rho = 100)")
        anchor_value = None if anchor_rec is None else anchor_rec.value

        vz_trials = study.vz_trials()
        records = [r for r in study.records()]
        finished = [t for t, r in zip(vz_trials, records) if r.state in ("COMPLETED", "INFEASIBLE")]
        pending = [r for r in records if r.state in ("ACTIVE", "REQUESTED")]
        if designer_factory is not None:
            base = designer_factory(problem, seed=config.seed)
        else:
            base = make_designer(config.designer, problem, seed=config.seed,
                                 acquisition_evaluations=config.acquisition_evaluations,
                                 ard_restarts=config.ard_restarts, trial_padding=config.trial_padding,
                                 ard_max_iterations=config.ard_max_iterations,
                                 resume_offset=len(records), batch_size=config.batch_size)
        gp = designer_factory is None and config.designer.startswith("gp")
        designer = SafeDesigner(base, space, problem, seed=config.seed, skip=len(records),
                                min_request=config.batch_size if gp else 1)
        designer.update(finished)  # re-feed the in-RAM designer from the datastore

        values = [r.value for r in records if r.value is not None]
        best = max(values) if values else None
        n_done = len(finished)

        from tqdm.auto import tqdm
        bar = tqdm(total=config.num_trials, initial=min(n_done, config.num_trials), desc="BMM search",
                   disable=not progress, dynamic_ncols=True)

        def postfix():
            bar.set_postfix_str(f"best={_fmt(best)} anchor={_fmt(anchor_value)}")

        postfix()

        def run_batch(tids: list[int], points: list[Mapping[str, float]]):
            # every trial of the batch is ACTIVE in the datastore; each is completed as its result is known
            nonlocal best, n_done
            for i, value, metrics, secs in runner.run(points):
                if math.isfinite(value):
                    trial = study.complete(tids[i], value, metrics, secs)
                    best = value if best is None else max(best, value)
                else:
                    trial = study.infeasible(tids[i], f"non-finite objective value {value}")
                designer.update([trial])
                n_done += 1
                bar.update(1)
                postfix()

        try:
            have = {r.source for r in records}
            seeds = [s for s in config.seed_points if f"seed:{s}" not in have]
            while pending or n_done < config.num_trials:
                # left ACTIVE by a killed run: evaluated once, same id and point, first
                batch = [(r.id, r.point) for r in pending[:config.batch_size]]
                pending = pending[config.batch_size:]
                for tid, _ in batch:
                    study.activate(tid)
                room = min(config.batch_size - len(batch), config.num_trials - n_done - len(batch) - len(pending))
                new = []
                while seeds and len(new) < room:
                    name = seeds.pop(0)
                    new.append((seed_point(space, name), f"seed:{name}", None))
                if len(new) < room:
                    t0 = time.perf_counter()
                    with _jax_cache(config.jax_cache_dir):   # the designer's compilations only
                        sugg = designer.suggest_many(room - len(new))
                    secs = (time.perf_counter() - t0) / len(sugg)   # one suggest call, shared
                    new += [(point, source, secs) for point, source in sugg]
                batch += [(study.add(point, source, secs), point) for point, source, secs in new]
                run_batch([tid for tid, _ in batch], [point for _, point in batch])
        finally:
            bar.close()

        records = study.records()

    # --------------------------------------------------------------------- result and reports
    done = [r for r in records if r.state == "COMPLETED"]
    best_rec = max(done, key=lambda r: (r.value, -r.id)) if done else None
    all_trials = ([anchor_rec] if anchor_rec is not None else []) + list(records)
    if best_rec is None and anchor_value is None:
        raise RuntimeError("search: no trial finished with a finite objective value and no anchor was "
                           "evaluated; see trials.json")
    use_anchor = anchor_value is not None and (best_rec is None or anchor_value >= best_rec.value)
    if use_anchor:
        params, hparams, extras, best_value, best_id = anchor, None, {}, anchor_value, 0
    else:
        hparams = group_hparams(space, best_rec.point)
        extras = extras_of(space, best_rec.point)
        params = merged(best_rec.point)
        best_value, best_id = best_rec.value, best_rec.id
    hist = np.array([np.nan if b is None else b for b in best_so_far([r.value for r in all_trials])], np.float64)

    write_trials(run_dir, all_trials, space)
    write_best(run_dir, {
        "value": best_value, "trial": best_id, "is_anchor": use_anchor, "hparams": hparams, "extras": extras,
        "point": None if use_anchor else best_rec.point, "anchor_value": anchor_value,
        "best_trial_value": None if best_rec is None else best_rec.value,
        "best_trial_point": None if best_rec is None else best_rec.point,
        "grouping": space.grouping, "num_trials": len(records), "designer": config.designer,
        "fallbacks_this_run": designer.num_fallbacks,
        "suggest_seconds_this_run": designer.latencies,
    })
    title = (f"{space.grouping} grouping, {config.designer}: best {best_value:.4f}"
             + (f" vs anchor {anchor_value:.4f}" if anchor_value is not None else ""))
    try:
        plot_convergence(os.path.join(run_dir, "convergence.png"), all_trials, anchor_value, title)
        plot_hparams_by_depth(os.path.join(run_dir, "hparams_by_depth.png"), space,
                              None if best_rec is None else best_rec.point,
                              f"best trial {None if best_rec is None else best_rec.id}"
                              + (" (the exact anchor is kept)" if use_anchor else ""))
    except Exception as e:  # plotting must never lose a finished search
        warnings.warn(f"search: plotting failed: {type(e).__name__}: {e}")
    if verbose:
        print(f"search done: {len(records)} trials, best {best_value:.4f} (trial {best_id}"
              + (", the exact anchor" if use_anchor else "") + ")"
              + (f", anchor {anchor_value:.4f}" if anchor_value is not None else "")
              + f"; reports in {run_dir}", flush=True)
    return SearchResult(params, hparams, float(best_value), tuple(all_trials), hist, extras, int(best_id),
                        anchor_value, run_dir)


class _CallableModule(types.ModuleType):
    """Makes ``bmm_jax.search(...)`` call :func:`search` while the subpackage stays a module."""

    def __call__(self, *args, **kwargs) -> SearchResult:
        return search(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
