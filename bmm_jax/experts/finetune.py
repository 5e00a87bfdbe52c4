"""Fine-tuning an encoder (and, with LP-FT, its linear head) with ``optax.adamw``.

Schedule: linear warm-up from 0 over ``round(warmup_fraction * steps)`` steps, then cosine decay
to 0 (``optax.warmup_cosine_decay_schedule``; without warm-up ``optax.cosine_decay_schedule``),
gradients clipped to a global norm, decoupled weight decay. With ``FinetuneConfig.head ==
"frozen"`` (the default, the task-arithmetic protocol) the head is a constant of the loss: only
the encoder is trained; with ``"lpft"`` the head is a second parameter group with its own peak
learning rate.
"""
from __future__ import annotations

import re
import weakref
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from bmm_jax._tree import PyTree
from bmm_jax.experts.config import FinetuneConfig
from bmm_jax.models.adapter import ModelAdapter, head_logits, take, trim_batch

ADAM_B1, ADAM_B2, ADAM_EPS = 0.9, 0.999, 1e-8


# ----------------------------------------------------------------------------- pytree helpers
def _flat(tree: PyTree) -> dict[str, Any]:
    return traverse_util.flatten_dict(tree, sep="/")


def partition(params: PyTree, frozen: Sequence[str]) -> tuple[dict, dict]:
    """Split a nested-dict params tree into ``(trainable, frozen)`` nested dicts by leaf-path regex."""
    flat = _flat(params)
    rx = [re.compile(p) for p in frozen]
    fr = {k: v for k, v in flat.items() if any(r.search(k) for r in rx)}
    tr = {k: v for k, v in flat.items() if k not in fr}
    if not tr:
        raise ValueError(f"frozen patterns {tuple(frozen)} freeze every leaf; nothing to fine-tune")
    return traverse_util.unflatten_dict(tr, sep="/"), traverse_util.unflatten_dict(fr, sep="/")


def combine(trainable: dict, frozen: dict) -> dict:
    """Inverse of :func:`partition`."""
    flat = dict(_flat(frozen)) if frozen else {}
    flat.update(_flat(trainable))
    return traverse_util.unflatten_dict(flat, sep="/")


def like(tree, ref):
    """Re-nest ``tree`` (a nested dict) in the container structure of ``ref`` (same paths)."""
    flat = _flat(tree)
    return jax.tree_util.tree_map_with_path(
        lambda p, _: flat["/".join(str(getattr(k, "key", k)) for k in p)], ref)


# ----------------------------------------------------------------------------- schedule / optimiser
def lr_schedule(peak: float, total: int, warmup_fraction: float) -> np.ndarray:
    """Per-step learning rates ``[total]`` (float32) in closed form: linear warm-up from 0 over
    ``round(warmup_fraction * total)`` steps, then cosine decay to 0. These are the values of
    :func:`schedule` (the optax schedule the optimiser uses) at steps ``0 .. total - 1``."""
    steps = np.arange(total, dtype=np.float64)
    warm = int(round(warmup_fraction * total))
    if warm > 0:
        decay = max(total, warm + 1) - warm
        lr = np.where(steps < warm, peak * steps / warm,
                      0.5 * peak * (1 + np.cos(np.pi * np.clip(steps - warm, 0, decay) / decay)))
    else:
        lr = 0.5 * peak * (1 + np.cos(np.pi * steps / max(total, 1)))
    return lr.astype(np.float32)


def schedule(peak: float, total: int, warmup_fraction: float) -> optax.Schedule:
    """The optax learning-rate schedule of :func:`lr_schedule`."""
    warm = int(round(warmup_fraction * total))
    if warm > 0:
        return optax.warmup_cosine_decay_schedule(0.0, float(peak), warm, max(total, warm + 1), end_value=0.0)
    return optax.cosine_decay_schedule(float(peak), max(total, 1))


def make_optimizer(config: FinetuneConfig, total_steps: int) -> optax.GradientTransformation:
    """``optax.chain(clip_by_global_norm(grad_clip), adamw per parameter group)`` for a state
    ``{"encoder": ..., "head": ...}`` (LP-FT) or ``{"encoder": ...}`` (frozen head).

    Each group is ``optax.adamw(schedule(peak), b1=0.9, b2=0.999, eps=1e-8, weight_decay)`` with
    peak ``config.learning_rate`` (encoder) or ``config.head_learning_rate`` (head). The clip is
    over the global norm of every trained leaf (no clipping when ``grad_clip == 0``).

    optax's bias correction raises a Python float to the int32 step count, which strict dtype
    promotion rejects: call ``update`` under ``jax.numpy_dtype_promotion("standard")`` (as
    :func:`finetune` does).
    """
    def adamw(peak):
        return optax.adamw(schedule(peak, total_steps, config.warmup_fraction), b1=ADAM_B1, b2=ADAM_B2,
                           eps=ADAM_EPS, weight_decay=config.weight_decay)

    groups = {"encoder": adamw(config.learning_rate)}
    if config.head == "lpft":
        groups["head"] = adamw(config.head_learning_rate)
    tx = optax.partition(groups, {k: k for k in groups})
    if config.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(config.grad_clip), tx)
    return tx


# ----------------------------------------------------------------------------- batches
def batch_plan(n: int, batch_size: int, epochs: int, rng: np.random.Generator,
               lengths: np.ndarray | None = None, buckets: Sequence[int] = ()) -> list[np.ndarray]:
    """Index arrays of every optimiser step (``epochs * (n // batch_size)`` steps of ``batch_size``).

    Every epoch is a fresh random permutation cut into ``n // batch_size`` batches (the remainder,
    a random subset, is skipped that epoch). With token ``lengths [n]`` and length ``buckets``,
    the permutation is stably sorted by bucket before cutting, so a batch holds sequences of
    (mostly) one bucket and is trimmed to it (far fewer padded tokens); the batches of an epoch
    are then shuffled. Indices inside a batch are sorted.
    """
    per_epoch = n // batch_size
    plan = []
    if lengths is not None and buckets:
        edges = np.asarray(sorted(buckets))
        bucket = np.searchsorted(edges, np.asarray(lengths), side="left")
    else:
        bucket = None
    for _ in range(epochs):
        perm = rng.permutation(n)[:per_epoch * batch_size]   # a random remainder is skipped
        if bucket is not None:
            perm = perm[np.argsort(bucket[perm], kind="stable")]
        chunks = [np.sort(perm[i * batch_size:(i + 1) * batch_size]) for i in range(per_epoch)]
        if bucket is not None:
            chunks = [chunks[i] for i in rng.permutation(per_epoch)]
        plan += chunks
    return plan


# ----------------------------------------------------------------------------- training
class FinetuneResult(NamedTuple):
    """``params`` (full encoder tree), ``head`` (the input head when it is frozen),
    ``losses [steps]`` (training loss per step)."""
    params: PyTree
    head: dict
    losses: np.ndarray


_STEPS: "weakref.WeakKeyDictionary[ModelAdapter, dict]" = weakref.WeakKeyDictionary()


def _train_step(adapter: ModelAdapter, config: FinetuneConfig, total: int):
    """Jitted optimiser step (shared by every task fine-tuned with ``adapter`` and the same
    optimiser settings; compiled once per batch shape and head size)."""
    cache = _STEPS.setdefault(adapter, {})
    key = (config.head, float(config.grad_clip), float(config.weight_decay), float(config.learning_rate),
           float(config.head_learning_rate), float(config.warmup_fraction), int(total))
    if key in cache:
        return cache[key]
    tx = make_optimizer(config, total)

    def loss_fn(st, head, frozen, b, y):
        feats = adapter.apply(combine(st["encoder"], frozen), b)
        lg = head_logits(st["head"] if "head" in st else head, feats)
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(lg, y))

    @jax.jit
    def step(st, opt_state, head, frozen, b, y):
        loss, grads = jax.value_and_grad(loss_fn)(st, head, frozen, b, y)
        with jax.numpy_dtype_promotion("standard"):
            updates, opt_state = tx.update(grads, opt_state, st)
            st = optax.apply_updates(st, updates)
        return st, opt_state, loss

    cache[key] = (tx, step)
    return cache[key]


def finetune(adapter: ModelAdapter, params: PyTree, head: dict, batch: dict, labels: np.ndarray,
             config: FinetuneConfig, *, seed: int = 0, progress: bool = True,
             desc: str = "fine-tune") -> FinetuneResult:
    """Fine-tune an encoder on softmax cross-entropy through a linear head, with ``optax.adamw``.

    ``config.head == "frozen"``: ``head`` is fixed (the task-arithmetic protocol); ``"lpft"``:
    the head is trained too, with peak learning rate ``config.head_learning_rate``. Schedule and
    optimiser: :func:`make_optimizer`. Batches: :func:`batch_plan` (length-bucketed for text).

    Args:
      adapter: model adapter; ``adapter.apply`` is differentiated (run deterministically: no
        dropout; frozen BatchNorm statistics live in ``adapter.extra_variables``).
      params: initial encoder params (θ0).
      head: the head ``{"kernel": [d, C], "bias": [C]}`` (e.g. the linear probe).
      batch: preprocessed training inputs (dict of arrays, ``N`` rows); ``labels``: ``[N]`` int.
      config: :class:`FinetuneConfig` (epochs, batch size, learning rates, head mode, frozen leaves).
      seed: batch-order seed.
      progress: show a tqdm bar.

    Returns:
      :class:`FinetuneResult`; frozen leaves of ``params`` are returned unchanged (same arrays).
    """
    labels = np.asarray(labels, np.int32)
    n = len(labels)
    if n == 0:
        raise ValueError("finetune needs at least one training example")
    bs = min(config.batch_size, n)
    lengths = None
    if adapter.length_buckets and "attention_mask" in batch:
        lengths = np.asarray(batch["attention_mask"]).sum(axis=1)
    rng = np.random.default_rng(seed)
    plan = batch_plan(n, bs, config.epochs, rng, lengths, adapter.length_buckets)
    trainable, frozen = partition(params, config.frozen)
    tx, step = _train_step(adapter, config, len(plan))
    head32 = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), head)
    state = {"encoder": jax.tree_util.tree_map(jnp.asarray, trainable)}
    if config.head == "lpft":
        state["head"] = head32
    with jax.numpy_dtype_promotion("standard"):
        opt_state = tx.init(state)
    losses = []
    bar = _tqdm(total=len(plan), desc=desc, disable=not progress)
    try:
        for i, idx in enumerate(plan):
            b = trim_batch(take(batch, idx), adapter.length_buckets)
            state, opt_state, loss = step(state, opt_state, head32, frozen, b, labels[idx])
            losses.append(loss)
            bar.update(1)
            if (i + 1) % 10 == 0:
                bar.set_postfix(loss=f"{float(np.mean([float(l) for l in losses[-10:]])):.4f}")
    finally:
        bar.close()
    new = combine(state["encoder"], frozen)
    out_head = state["head"] if "head" in state else head32
    return FinetuneResult(like(new, params), jax.tree_util.tree_map(np.asarray, out_head),
                          np.asarray([float(l) for l in losses], np.float32))


def _tqdm(**kw):
    from tqdm.auto import tqdm
    return tqdm(**kw)


__all__ = ["FinetuneResult", "finetune", "make_optimizer", "schedule", "lr_schedule", "batch_plan",
           "partition", "combine", "like", "ADAM_B1", "ADAM_B2", "ADAM_EPS"]
