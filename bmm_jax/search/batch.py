"""Several trials per search step: a batch of points -> a batch of params -> a batched objective.

``SearchConfig(batch_size=B)``: each step of :func:`bmm_jax.search.search` evaluates ``B`` points.

Params. With the library's fast path (``prep = bmm_jax.prepare(...)``, whose ``params`` is pure JAX)
the ``B`` points become arrays (:func:`bmm_jax.search.space.point_arrays`: ``rho [B, G]``,
``scale [B, G]``, extras ``[B]``) and one jitted ``jax.vmap(prep.params)`` builds all ``B`` merged
models at once: every leaf of the result has a leading ``[B]`` axis (``B`` times the model in
memory). The batch is padded to ``B`` points (the last point repeated, its rows dropped) so the
vmapped function compiles once per search. Any other params function (a user's ``params_fn``,
:class:`~bmm_jax.search.HybridPrepared`, which re-factors per ``beta``) is called once per point.

Objective protocol. A *batched* objective takes params whose every leaf has a leading ``[k]`` axis
(``k <= B``; the last step of a study may be smaller) and returns the ``k`` results: a sequence of
``k`` floats or ``{task: accuracy}`` mappings, an array ``[k]``, or a mapping ``{task: [k]}``. It is
used when the search gets ``batched_objective=...`` or when the objective has the attribute
``batched = True``; otherwise the objective is called on each of the ``k`` params trees, sliced
from the batch. The library's own validation objective (``adapter, heads, tasks``) has a batched
version, :func:`make_batched_objective`, that vmaps the model's forward pass over the params batch
(:func:`bmm_jax.evaluate.evaluate_batch`).
"""
from __future__ import annotations

import time
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np

from bmm_jax._tree import PyTree
from bmm_jax.search.space import (SearchSpace, extras_of, group_hparams, module_hparams, module_hparams_of_row,
                                  point_arrays)


# ----------------------------------------------------------------------------- results
def result_to_value(raw, kind: str = "accuracy", expert_accuracy: Mapping[str, float] | None = None
                    ) -> tuple[float, dict]:
    """One objective result -> ``(value, metrics)``.

    ``raw`` is a float or ``{task: accuracy}``. ``kind="accuracy"``: the float, or the mean of the
    mapping; ``kind="normalized"``: the mean of ``acc[t] / expert_accuracy[t]`` (a mapping is
    required). ``metrics`` holds ``acc/<task>`` (and ``norm/<task>``) for mappings.
    """
    if isinstance(raw, Mapping):
        if not raw:
            raise ValueError("the objective returned an empty mapping of task accuracies")
        acc = {str(t): float(v) for t, v in raw.items()}
        metrics = {f"acc/{t}": v for t, v in acc.items()}
        if kind == "normalized":
            missing = sorted(set(acc) - set(map(str, expert_accuracy)))
            if missing:
                raise ValueError(f"expert_accuracy has no entry for tasks {missing}")
            norm = {t: v / float(expert_accuracy[t]) for t, v in acc.items()}
            metrics.update({f"norm/{t}": v for t, v in norm.items()})
            return float(np.mean(list(norm.values()))), metrics
        return float(np.mean(list(acc.values()))), metrics
    if kind == "normalized":
        raise TypeError("objective='normalized' needs the objective to return {task: accuracy}, "
                        f"got {type(raw).__name__}")
    try:
        return float(raw), {}
    except (TypeError, ValueError):
        raise TypeError(f"the objective must return a float or {{task: accuracy}}, got {type(raw).__name__}") from None


def split_results(raw, k: int) -> list:
    """The ``k`` per-trial results of a batched objective (see the module docstring)."""
    if isinstance(raw, Mapping):
        cols = {}
        for t, v in raw.items():
            v = np.asarray(v)
            if v.shape != (k,):
                raise ValueError(f"the batched objective returned {{task: values}} with task {t!r} of shape "
                                 f"{v.shape}; expected ({k},), one value per trial of the batch")
            cols[t] = v
        return [{t: float(v[i]) for t, v in cols.items()} for i in range(k)]
    if isinstance(raw, (list, tuple)):
        if len(raw) != k:
            raise ValueError(f"the batched objective returned {len(raw)} results for a batch of {k} trials")
        return list(raw)
    arr = np.asarray(raw)
    if arr.dtype == object or arr.shape != (k,):
        raise ValueError(f"the batched objective must return {k} results (a sequence, an array [{k}] or "
                         f"{{task: [{k}]}}), got {type(raw).__name__} of shape {getattr(arr, 'shape', None)}")
    return [float(x) for x in arr]


def is_batched(objective) -> bool:
    """Whether ``objective`` declares the batched protocol (attribute ``batched = True``)."""
    return getattr(objective, "batched", False) is True


# ----------------------------------------------------------------------------- params batches
def stack_params(trees: Sequence[PyTree]) -> PyTree:
    """Params trees -> one tree whose leaves have a leading ``[len(trees)]`` axis."""
    import jax
    import jax.numpy as jnp
    return jax.tree_util.tree_map(lambda *xs: jnp.stack([jnp.asarray(x) for x in xs]), *trees)


def member(batch: PyTree, i: int) -> PyTree:
    """Member ``i`` of a params tree with a leading batch axis."""
    import jax
    return jax.tree_util.tree_map(lambda x: x[i], batch)


def single_from_batched(batched: Callable) -> Callable:
    """``params -> result``: a batched objective called on a batch of one."""
    def objective(params):
        return split_results(batched(stack_params([params])), 1)[0]
    objective.batched = False
    return objective


def is_vmappable(params_fn) -> bool:
    """Whether ``params_fn`` is the library's pure ``Prepared.params`` (traceable, so vmapped)."""
    from bmm_jax.prepared import Prepared
    return isinstance(getattr(params_fn, "__self__", None), Prepared) and \
        getattr(params_fn, "__func__", None) is Prepared.params


# ----------------------------------------------------------------------------- objectives
def make_batched_objective(batched: Callable | None = None, *, kind: str = "accuracy", adapter=None, heads=None,
                           tasks: Sequence[str] | None = None, expert_accuracy: Mapping[str, float] | None = None,
                           validation_examples: int | None = 128, members_per_call: int | None = None,
                           load: Callable | None = None):
    """The batched version of :func:`bmm_jax.search.make_objective`: a function ``params_batch ->
    [(value, metrics)] * k`` (attribute ``batched = True``; :func:`bmm_jax.search.search` accepts
    it as ``batched_objective=``, e.g. to lower ``members_per_call``).

    Either ``batched(params_batch)`` returning the ``k`` results (module docstring), or the pieces
    ``adapter, heads, tasks``: mean validation accuracy of each model from
    :func:`bmm_jax.evaluate.evaluate_batch` (``split="validation"``, ``validation_examples`` per task;
    the forward pass ``jax.vmap``-ed over ``members_per_call`` models at a time, default all: the
    memory of that many models' activations for one example batch; lower it if that does not fit;
    ``load``: the ``(task, split) -> (inputs, labels)`` loader, default :func:`bmm_jax.data.load`).
    ``kind`` and ``expert_accuracy`` as in :func:`make_objective`.
    """
    if batched is None:
        missing = [n for n, v in (("adapter", adapter), ("heads", heads), ("tasks", tasks)) if v is None]
        if missing:
            raise ValueError("make_batched_objective needs batched(params_batch) or adapter, heads and tasks "
                             f"(missing: {missing})")
        if isinstance(tasks, str) or not len(tasks):
            raise ValueError(f"tasks must be a non-empty sequence of task names, got {tasks!r}")
        if members_per_call is not None and (isinstance(members_per_call, bool) or int(members_per_call) < 1):
            raise ValueError(f"members_per_call must be a positive int or None, got {members_per_call!r}")
        from bmm_jax.evaluate import evaluate_batch
        tasks = list(tasks)

        def batched(params_batch):
            return evaluate_batch(adapter, params_batch, heads, tasks, split="validation",
                                  max_examples=validation_examples, members_per_call=members_per_call, load=load)
    elif not callable(batched):
        raise TypeError(f"batched_objective must be callable (params with a leading [k] axis -> k results), "
                        f"got {type(batched).__name__}")

    def evaluate(params_batch) -> list[tuple[float, dict]]:
        import jax
        k = {int(np.shape(x)[0]) for x in jax.tree_util.tree_leaves(params_batch)}
        if len(k) != 1:
            raise ValueError(f"params batch leaves disagree on the batch axis: {sorted(k)}")
        k = k.pop()
        return [result_to_value(r, kind, expert_accuracy) for r in split_results(batched(params_batch), k)]

    evaluate.batched = True
    evaluate.kind = kind          # marks a converted evaluator: results are already (value, metrics)
    return evaluate


def _is_converted(fn) -> bool:
    return is_batched(fn) and getattr(fn, "kind", None) in ("accuracy", "normalized")


def resolve_objectives(objective, batched_objective, *, make_objective: Callable, kind: str, batch_size: int,
                       adapter=None, heads=None, tasks=None, expert_accuracy=None, evaluate_fn=None,
                       validation_examples=128):
    """``(evaluate, batched_evaluate or None)`` of a search (see the module docstring).

    ``evaluate``: ``params -> (value, metrics)`` (the exact anchor, the final model, and trials when
    there is no batched objective). ``batched_evaluate``: ``params_batch -> [(value, metrics)]``; the
    library's validation objective gets one when ``batch_size > 1`` (and no ``evaluate_fn``).
    """
    if batched_objective is not None and not callable(batched_objective):
        raise TypeError(f"batched_objective must be callable (params with a leading [k] axis -> k results), "
                        f"got {type(batched_objective).__name__}")
    if objective is not None and is_batched(objective):
        if batched_objective is not None:
            raise ValueError("the objective is batched (batched=True) and batched_objective is given too; "
                             "pass one of them")
        batched_objective, objective = objective, None
    if batched_objective is not None and _is_converted(batched_objective):
        # a make_batched_objective(...) result: used as it is
        if batched_objective.kind != kind:
            raise ValueError(f"batched_objective was made with kind={batched_objective.kind!r} but the search's "
                             f"objective is {kind!r}; make it with kind={kind!r}")
        if objective is None:
            def evaluate(params):
                return batched_objective(stack_params([params]))[0]
        else:
            evaluate = make_objective(objective, kind=kind, adapter=adapter, heads=heads, tasks=tasks,
                                      expert_accuracy=expert_accuracy, evaluate_fn=evaluate_fn,
                                      validation_examples=validation_examples)
        return evaluate, batched_objective
    if batched_objective is not None and objective is None:
        objective = single_from_batched(batched_objective)
    evaluate = make_objective(objective, kind=kind, adapter=adapter, heads=heads, tasks=tasks,
                              expert_accuracy=expert_accuracy, evaluate_fn=evaluate_fn,
                              validation_examples=validation_examples)
    if batched_objective is not None:
        return evaluate, make_batched_objective(batched_objective, kind=kind, expert_accuracy=expert_accuracy)
    if objective is None and evaluate_fn is None and batch_size > 1:
        return evaluate, make_batched_objective(None, kind=kind, adapter=adapter, heads=heads, tasks=tasks,
                                                expert_accuracy=expert_accuracy,
                                                validation_examples=validation_examples,
                                                members_per_call=batch_size)
    return evaluate, None


# ----------------------------------------------------------------------------- the runner
class BatchRunner:
    """Evaluates the points of one search step.

    Args:
      space: the search space.
      params_fn: ``(module hparams, **extras) -> params``; vmapped when it is ``Prepared.params``
        and ``batch_size > 1``.
      evaluate: ``params -> (value, metrics)``.
      batched_evaluate: ``params_batch -> [(value, metrics)]`` or ``None``.
      batch_size: ``B``, the padded size of the vmapped params batch.
    """

    def __init__(self, space: SearchSpace, params_fn: Callable, evaluate: Callable,
                 batched_evaluate: Callable | None = None, batch_size: int = 1):
        self.space, self.params_fn, self.evaluate = space, params_fn, evaluate
        self.batched_evaluate, self.batch_size = batched_evaluate, int(batch_size)
        self._vparams = None
        if self.batch_size > 1 and is_vmappable(params_fn):
            import jax

            def one(prep, rho, scale, extras):
                return prep.params(module_hparams_of_row(space, rho, scale), **extras)

            self._prep = params_fn.__self__
            self._vparams = jax.jit(jax.vmap(one, in_axes=(None, 0, 0, 0)))

    @property
    def vmapped(self) -> bool:
        """Whether the params of a batch come from one vmapped call."""
        return self._vparams is not None

    def merged(self, point: Mapping[str, float]) -> PyTree:
        """The params of one point (the params function called once)."""
        return self.params_fn(module_hparams(self.space, group_hparams(self.space, point)),
                              **extras_of(self.space, point))

    def params_batch(self, points: Sequence[Mapping[str, float]]) -> PyTree:
        """The params of ``k <= B`` points, leaves ``[k, ...]`` (one vmapped call when possible)."""
        k = len(points)
        if self._vparams is None:
            return stack_params([self.merged(p) for p in points])
        import jax
        padded = list(points) + [points[-1]] * max(0, self.batch_size - k)
        arr = point_arrays(self.space, padded)
        out = self._vparams(self._prep, arr.rho, arr.scale, arr.extras)
        if len(padded) > k:
            out = jax.tree_util.tree_map(lambda x: x[:k], out)
        return out

    def run(self, points: Sequence[Mapping[str, float]]) -> Iterator[tuple[int, float, dict, float]]:
        """Yield ``(index, value, metrics, seconds)`` per point, as each result is known (all at once
        for a batched objective; ``seconds`` is the trial's share of the shared work plus its own)."""
        points = list(points)
        k = len(points)
        if not k:
            return
        if k > self.batch_size:
            raise ValueError(f"{k} points for a batch of {self.batch_size}")
        t0 = time.perf_counter()
        if self.batched_evaluate is not None:
            results = self.batched_evaluate(self.params_batch(points))
            secs = (time.perf_counter() - t0) / k
            for i, (value, metrics) in enumerate(results):
                yield i, value, metrics, secs
            return
        if self._vparams is None:
            for i, p in enumerate(points):
                t = time.perf_counter()
                value, metrics = self.evaluate(self.merged(p))
                yield i, value, metrics, time.perf_counter() - t
            return
        batch = self.params_batch(points)
        shared = (time.perf_counter() - t0) / k
        for i in range(k):
            t = time.perf_counter()
            value, metrics = self.evaluate(member(batch, i))
            yield i, value, metrics, shared + time.perf_counter() - t


__all__ = ["BatchRunner", "make_batched_objective", "resolve_objectives", "result_to_value", "split_results",
           "is_batched", "is_vmappable", "stack_params", "member", "single_from_batched"]
