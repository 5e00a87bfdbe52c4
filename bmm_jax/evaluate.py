"""Batched, jitted evaluation of an encoder with one linear head per task.

``evaluate(adapter, params, heads, tasks, split)`` runs ``adapter.apply`` on every example of
each task's split (padded to a fixed batch size, so each batch shape compiles once; text batches
are sorted by length and trimmed to the adapter's length buckets), applies that task's head and
returns the accuracy per task. ``evaluate_metrics`` returns accuracy, NLL, Brier score and ECE
(:mod:`bmm_jax.calibration`) from the predicted probabilities, ``task_log_probs`` the
log-probabilities themselves, and ``ensemble_log_probs`` those of an ensemble (posterior draws
with a leading ``[M]`` axis on every leaf, e.g. :meth:`bmm_jax.Prepared.sample`), whose predicted
probabilities are the average over members. Preprocessed inputs (token ids, normalised images, or cached
frozen-trunk features) are kept in an in-process cache keyed by ``(adapter.preprocess_key, task,
split, max_examples)``, so the ~50 evaluations of a hyper-parameter search preprocess once.
"""
from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from typing import Callable, Mapping, NamedTuple, Sequence

import jax
import numpy as np

from bmm_jax._tree import PyTree
from bmm_jax.models.adapter import ModelAdapter, head_logits, pad_batch, take, trim_batch

LoadFn = Callable[[str, str], tuple]


class Prepared(NamedTuple):
    """A preprocessed split: ``batch`` (dict of numpy arrays, rows in ``order``), ``labels [N]``
    int32 in the same row order, ``order [N]`` (row i is original example ``order[i]``)."""
    batch: dict
    labels: np.ndarray
    order: np.ndarray


_CACHE: "OrderedDict[tuple, Prepared]" = OrderedDict()
_CACHE_MAX = 64
_LOCK = threading.Lock()
_JIT: "weakref.WeakKeyDictionary[ModelAdapter, Callable]" = weakref.WeakKeyDictionary()
_JIT_MEMBERS: "weakref.WeakKeyDictionary[ModelAdapter, Callable]" = weakref.WeakKeyDictionary()


def clear_cache() -> None:
    """Drop every cached preprocessed split."""
    with _LOCK:
        _CACHE.clear()


def _default_load(task: str, split: str):
    from bmm_jax import data
    return data.load(task, split)


def subsample_indices(n: int, max_examples: int | None, seed: int = 0) -> np.ndarray:
    """Sorted indices of a fixed random subset of ``max_examples`` out of ``n`` (all if ``None``)."""
    if max_examples is None or max_examples >= n:
        return np.arange(n)
    if max_examples <= 0:
        raise ValueError(f"max_examples must be positive, got {max_examples}")
    return np.sort(np.random.default_rng(seed).permutation(n)[:max_examples])


def _select(inputs, idx):
    if isinstance(inputs, np.ndarray):
        return inputs[idx]
    return [inputs[i] for i in idx]


def prepare(adapter: ModelAdapter, task: str, split: str = "test", *, max_examples: int | None = None,
            load: LoadFn | None = None) -> Prepared:
    """Load, subsample and preprocess one task's split (cached in-process).

    Args:
      adapter: the model adapter (its ``preprocess_key`` names the preprocessing).
      task, split: passed to ``load`` (default :func:`bmm_jax.data.load`).
      max_examples: a fixed random subset (seed 0) of at most this many examples.
      load: ``(task, split) -> (inputs, labels)``.
    """
    load_fn = load or _default_load
    key = (adapter.preprocess_key or id(adapter.preprocess_fn), task, split, max_examples,
           load_fn if load is not None else None)
    with _LOCK:
        hit = _CACHE.get(key)
        if hit is not None:
            _CACHE.move_to_end(key)
            return hit
    inputs, labels = load_fn(task, split)
    labels = np.asarray(labels)
    if len(inputs) != len(labels):
        raise ValueError(f"task {task!r} split {split!r}: {len(inputs)} inputs but {len(labels)} labels")
    if len(labels) == 0:
        raise ValueError(f"task {task!r} split {split!r} is empty")
    idx = subsample_indices(len(labels), max_examples)
    batch = adapter.preprocess(_select(inputs, idx))
    labels = labels[idx].astype(np.int32)
    order = np.arange(len(labels))
    if adapter.length_buckets and "attention_mask" in batch:
        order = np.argsort(np.asarray(batch["attention_mask"]).sum(axis=1), kind="stable")
        batch = take(batch, order)
        labels = labels[order]
    prep = Prepared(batch, labels, order)
    with _LOCK:
        _CACHE[key] = prep
        while len(_CACHE) > _CACHE_MAX:
            _CACHE.popitem(last=False)
    return prep


def _jit_logits(adapter: ModelAdapter):
    fn = _JIT.get(adapter)
    if fn is None:
        fn = jax.jit(lambda params, head, batch: head_logits(head, adapter.apply(params, batch)))
        _JIT[adapter] = fn
    return fn


def batched_logits(adapter: ModelAdapter, params: PyTree, head: dict, batch: dict,
                   batch_size: int = 128) -> np.ndarray:
    """Logits ``[N, C]`` of a preprocessed ``batch`` (rows in batch order), computed in padded
    batches of ``batch_size`` with one jitted function per adapter."""
    fn = _jit_logits(adapter)
    n = len(next(iter(batch.values())))
    outs = []
    for i in range(0, n, batch_size):
        chunk = take(batch, slice(i, i + batch_size))
        chunk, ex_mask = pad_batch(chunk, batch_size)
        chunk = trim_batch(chunk, adapter.length_buckets)
        outs.append((fn(params, head, chunk), int(ex_mask.sum())))
    return np.concatenate([np.asarray(o)[:m] for o, m in outs]) if outs else np.zeros((0, 0), np.float32)


def task_logits(adapter: ModelAdapter, params: PyTree, heads: Mapping[str, dict], tasks: Sequence[str],
                split: str = "test", *, batch_size: int = 128, max_examples: int | None = None,
                load: LoadFn | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``task -> (logits [N, C] float32, labels [N] int32)`` in the split's example order
    (after the ``max_examples`` subsample)."""
    _check_heads(heads, tasks)
    out = {}
    for task in tasks:
        prep = prepare(adapter, task, split, max_examples=max_examples, load=load)
        lg = batched_logits(adapter, params, heads[task], prep.batch, batch_size)
        inv = np.empty_like(prep.order)
        inv[prep.order] = np.arange(len(prep.order))
        out[task] = (lg[inv], prep.labels[inv])
    return out


def task_log_probs(adapter: ModelAdapter, params: PyTree, heads: Mapping[str, dict], tasks: Sequence[str],
                   split: str = "test", *, batch_size: int = 128, max_examples: int | None = None,
                   load: LoadFn | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``task -> (log_probs [N, C] float32, labels [N] int32)``: ``log_softmax`` of
    :func:`task_logits`, in the split's example order."""
    from bmm_jax.calibration import log_probabilities
    res = task_logits(adapter, params, heads, tasks, split, batch_size=batch_size, max_examples=max_examples,
                      load=load)
    return {t: (np.asarray(log_probabilities(lg)), y) for t, (lg, y) in res.items()}


def member_params(draws: PyTree, m: int) -> PyTree:
    """Member ``m`` of params with a leading ensemble axis on every leaf."""
    return jax.tree_util.tree_map(lambda x: x[m], draws)


def ensemble_size(draws: PyTree) -> int:
    """``M``, the shared leading axis of every leaf of ``draws`` (checked)."""
    sizes = {int(np.shape(x)[0]) if np.ndim(x) else -1 for x in jax.tree_util.tree_leaves(draws)}
    if len(sizes) != 1 or -1 in sizes:
        raise ValueError(f"ensemble params need one leading [M] axis on every leaf; got leading sizes {sorted(sizes)}")
    return sizes.pop()


def ensemble_log_probs(adapter: ModelAdapter, draws: PyTree, heads: Mapping[str, dict], tasks: Sequence[str],
                       split: str = "test", *, batch_size: int = 128, max_examples: int | None = None,
                       load: LoadFn | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``task -> (log_probs [N, C], labels [N])`` of an ensemble: the log of the member-averaged
    predicted probabilities, ``log(mean_m softmax(logits_m))``.

    Args:
      draws: params whose every leaf has a leading ``[M]`` axis (e.g. ``prep.sample(key, M,
        hparams)``); members are evaluated one at a time (memory of one member's activations).
      Other arguments: as in :func:`task_log_probs`.
    """
    from jax.scipy.special import logsumexp
    m_total = ensemble_size(draws)
    acc: dict[str, np.ndarray] = {}
    labels: dict[str, np.ndarray] = {}
    for m in range(m_total):
        res = task_log_probs(adapter, member_params(draws, m), heads, tasks, split, batch_size=batch_size,
                             max_examples=max_examples, load=load)
        for t, (lp, y) in res.items():
            acc[t] = lp if t not in acc else np.asarray(logsumexp(np.stack([acc[t], lp]), axis=0))
            labels[t] = y
    return {t: (acc[t] - np.float32(np.log(m_total)), labels[t]) for t in tasks}


def metrics_of(log_probs: Mapping[str, tuple], num_bins: int = 15) -> dict[str, dict[str, float]]:
    """``task -> {"accuracy", "nll", "brier", "ece"}`` of ``task -> (log_probs, labels)``."""
    from bmm_jax.calibration import metrics_dict
    return {t: metrics_dict(lp, y, num_bins) for t, (lp, y) in log_probs.items()}


def evaluate_metrics(adapter: ModelAdapter, params: PyTree, heads: Mapping[str, dict], tasks: Sequence[str],
                     split: str = "test", batch_size: int = 128, max_examples: int | None = None, *,
                     load: LoadFn | None = None, num_bins: int = 15) -> dict[str, dict[str, float]]:
    """``{task: {"accuracy", "nll", "brier", "ece"}}`` of the encoder ``params`` with each task's
    head (arguments as in :func:`evaluate`; ECE with ``num_bins`` equal-width bins)."""
    return metrics_of(task_log_probs(adapter, params, heads, tasks, split, batch_size=batch_size,
                                     max_examples=max_examples, load=load), num_bins)


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy of ``logits [N, C]`` against integer ``labels [N]``."""
    logits = np.asarray(logits)
    labels = np.asarray(labels)
    if logits.ndim != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"logits must be [N, C] and labels [N]; got {logits.shape} and {labels.shape}")
    return float(np.mean(np.argmax(logits, axis=1) == labels))


def evaluate(adapter: ModelAdapter, params: PyTree, heads: Mapping[str, dict], tasks: Sequence[str],
             split: str = "test", batch_size: int = 128, max_examples: int | None = None, *,
             load: LoadFn | None = None) -> dict[str, float]:
    """Accuracy per task of the encoder ``params`` with each task's own head.

    Args:
      adapter: model adapter.
      params: encoder params (same structure as ``adapter.params``): pretrained, an expert or a
        merged model.
      heads: ``task -> {"kernel": [feature_dim, C], "bias": [C]}``.
      tasks: task names (keys of ``heads``).
      split: ``"validation"`` or ``"test"`` (anything ``load`` accepts).
      batch_size: examples per jitted call (the last batch is padded, so one compilation per
        batch shape).
      max_examples: evaluate on a fixed random subset (seed 0) of at most this many examples.
      load: ``(task, split) -> (inputs, labels)`` (default :func:`bmm_jax.data.load`).

    Returns:
      ``{task: accuracy in [0, 1]}`` in the order of ``tasks``.
    """
    res = task_logits(adapter, params, heads, tasks, split, batch_size=batch_size,
                      max_examples=max_examples, load=load)
    return {t: accuracy(*res[t]) for t in tasks}


def _jit_member_logits(adapter: ModelAdapter):
    fn = _JIT_MEMBERS.get(adapter)
    if fn is None:
        one = lambda params, head, batch: head_logits(head, adapter.apply(params, batch))  # noqa: E731
        fn = jax.jit(jax.vmap(one, in_axes=(0, None, None)))
        _JIT_MEMBERS[adapter] = fn
    return fn


def _members(params: PyTree, start: int, stop: int, size: int) -> PyTree:
    """Members ``start:stop`` of a batched params tree, padded to ``size`` by repeating the first."""
    def cut(x):
        x = x[start:stop]
        if stop - start < size:
            x = jax.numpy.concatenate([x, jax.numpy.repeat(x[:1], size - (stop - start), axis=0)])
        return x
    return jax.tree_util.tree_map(cut, params)


def evaluate_batch(adapter: ModelAdapter, params: PyTree, heads: Mapping[str, dict], tasks: Sequence[str],
                   split: str = "test", batch_size: int = 128, max_examples: int | None = None, *,
                   load: LoadFn | None = None, members_per_call: int | None = None) -> list[dict[str, float]]:
    """Accuracy per task of each of ``M`` encoder params at once (the trials of a batched search).

    The forward pass is ``jax.vmap``-ed over the members: one jitted call per example batch
    evaluates ``members_per_call`` models (default all ``M``) on the same inputs. Results equal
    :func:`evaluate` of each member up to float32 noise in the logits (an exact tie of two logits may
    then break the other way).

    Args:
      params: encoder params whose every leaf has a leading ``[M]`` axis (e.g.
        ``jax.vmap(prep.params)(...)``).
      members_per_call: models per jitted call; memory holds this many models' activations of one
        example batch. Fewer than ``M`` evaluates the members in chunks, the last chunk padded (by
        repeating a member, results dropped) so every call has the same shape and compiles once.
      Other arguments: as in :func:`evaluate`.

    Returns:
      ``[{task: accuracy}]``, one dict per member, in member order.
    """
    _check_heads(heads, tasks)
    m_total = ensemble_size(params)
    per = m_total if members_per_call is None else int(members_per_call)
    if per < 1:
        raise ValueError(f"members_per_call must be a positive int, got {members_per_call!r}")
    fn = _jit_member_logits(adapter)
    out: list[dict[str, float]] = [{} for _ in range(m_total)]
    chunks = [(a, min(a + per, m_total)) for a in range(0, m_total, per)]
    parts = [params if (a, b) == (0, m_total) and per == m_total else _members(params, a, b, per) for a, b in chunks]
    for task in tasks:
        prep = prepare(adapter, task, split, max_examples=max_examples, load=load)
        n = len(prep.labels)
        for (a, b), part in zip(chunks, parts):
            logits = []
            for i in range(0, n, batch_size):
                chunk, ex_mask = pad_batch(take(prep.batch, slice(i, i + batch_size)), batch_size)
                chunk = trim_batch(chunk, adapter.length_buckets)
                logits.append((fn(part, heads[task], chunk), int(ex_mask.sum())))
            lg = np.concatenate([np.asarray(x)[:, :k] for x, k in logits], axis=1)   # [per, n, C]
            for j in range(b - a):
                out[a + j][task] = accuracy(lg[j], prep.labels)
    return out


def normalized_accuracy(merged: Mapping[str, float], expert: Mapping[str, float]) -> dict[str, float]:
    """``task -> merged[task] / expert[task]`` (the merging literature's normalised accuracy)."""
    missing = sorted(set(merged) ^ set(expert))
    if missing:
        raise ValueError(f"merged and expert accuracies cover different tasks: {missing}")
    out = {}
    for t in merged:
        if expert[t] <= 0:
            raise ValueError(f"expert accuracy of task {t!r} is {expert[t]}; cannot normalise by it")
        out[t] = float(merged[t]) / float(expert[t])
    return out


def mean_accuracy(acc: Mapping[str, float]) -> float:
    """Unweighted mean over tasks."""
    if not acc:
        raise ValueError("no task accuracies to average")
    return float(np.mean([float(v) for v in acc.values()]))


def _check_heads(heads: Mapping[str, dict], tasks: Sequence[str]) -> None:
    if isinstance(tasks, str):
        raise TypeError(f"tasks must be a sequence of task names, got the string {tasks!r}")
    missing = [t for t in tasks if t not in heads]
    if missing:
        raise ValueError(f"no head for tasks {missing}; heads has {sorted(heads)}")


__all__ = ["evaluate", "evaluate_batch", "evaluate_metrics", "task_logits", "task_log_probs", "ensemble_log_probs", "metrics_of",
           "member_params", "ensemble_size", "batched_logits", "prepare", "accuracy", "normalized_accuracy",
           "mean_accuracy", "clear_cache", "subsample_indices", "Prepared"]
