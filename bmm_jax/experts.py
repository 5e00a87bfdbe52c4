"""Fine-tuned experts for the merging benchmarks, with an on-disk cache.

Benchmarks (:data:`BENCHMARKS`):

* ``minilm5``: all-MiniLM-L6-v2 fine-tuned on 5 text tasks (mr, uncertainty, dutch_polarity,
  bbc, fortunes). The word embeddings are frozen (they are carried, never merged); the 6
  transformer layers and LayerNorms are fine-tuned.
* ``effnet4``: EfficientNet-Lite0 (32 px) on 4 image tasks (mnist, fashion_mnist, optdigits,
  ising). Blocks 0-11 are a frozen trunk run once inside preprocessing; blocks 12-15 + the head
  convolution (the adapter's params) are fine-tuned.

Per task, two heads (linear maps on the adapter's pooled features):

* the *probe head*: a linear probe (L2-regularised multinomial logistic regression) on the frozen
  pretrained features; it scores the pretrained encoder (the "pretrained" row of a results table).
* the *expert head*: initialised from the probe head and fine-tuned together with the encoder
  (LP-FT); merged encoders are evaluated with each task's expert head.

Cache layout (``cache_dir`` defaults to :func:`bmm_jax.data.paths.cache_dir`)::

    <cache_dir>/experts/<benchmark>/<task>/probe/{manifest.json, ckpt/}
    <cache_dir>/experts/<benchmark>/<task>/seed<s>/{manifest.json, ckpt/}

``manifest.json`` records the config, a hash of the training data, the base weights' checksum
and the saved weights' checksum. A rerun with the same config reuses the checkpoint; a changed
config, data or base model rebuilds it; a corrupt checkpoint (unreadable, or a checksum that
does not match) is detected and rebuilt. Experts of seed ``s`` use their own training subsample
and batch order, so the seeds are distinct fine-tunes.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import re
import time
import weakref
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bmm_jax import checkpoint
from bmm_jax._tree import PyTree
from bmm_jax.models.adapter import ModelAdapter, head_logits, init_head, take, trim_batch
from flax import traverse_util

log = logging.getLogger(__name__)

LoadFn = Callable[[str, str], tuple]


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    """Expert fine-tuning and linear-probe settings.

    Attributes:
      max_train: training examples per task and seed (a seeded random subset of the train split).
      epochs: passes over that subset.
      batch_size: examples per optimiser step.
      learning_rate: peak AdamW learning rate of the encoder (linear warm-up, cosine decay).
      head_learning_rate: peak learning rate of the expert head (initialised from the probe).
      weight_decay: AdamW decoupled weight decay (encoder and head).
      warmup_fraction: fraction of the steps spent warming up.
      grad_clip: global gradient-norm clip.
      frozen: regular expressions of encoder leaves kept at their pretrained value (not trained,
        not stored in the expert checkpoint).
      probe_max_train: training examples of the linear probe (a fixed subset, same for all seeds).
      probe_steps: full-batch L-BFGS iterations of the probe.
      probe_l2: L2 penalty of the probe (mean cross-entropy scale, features centred and scaled
        to unit RMS), used as is when ``probe_l2_grid`` is empty.
      probe_l2_grid: candidate penalties; the one with the best accuracy on (at most
        ``probe_max_val`` examples of) the task's validation split is kept.
      probe_max_val: validation examples used to choose the probe's penalty.
      max_length: text adapters: tokens per sequence.
      feature_batch_size: batch size for frozen-feature extraction.
    """
    max_train: int = 2000
    epochs: int = 2
    batch_size: int = 32
    learning_rate: float = 1e-4
    head_learning_rate: float = 1e-3
    weight_decay: float = 0.0
    warmup_fraction: float = 0.1
    grad_clip: float = 1.0
    frozen: tuple[str, ...] = (r"(^|/)embeddings/",)
    probe_max_train: int = 2000
    probe_steps: int = 200
    probe_l2: float = 1e-3
    probe_l2_grid: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1)
    probe_max_val: int = 512
    max_length: int = 64
    feature_batch_size: int = 128

    def __post_init__(self):
        for f in ("max_train", "epochs", "batch_size", "probe_max_train", "probe_steps", "max_length",
                  "feature_batch_size", "probe_max_val"):
            if int(getattr(self, f)) <= 0:
                raise ValueError(f"FinetuneConfig.{f} must be positive, got {getattr(self, f)}")
        for f in ("learning_rate", "head_learning_rate", "weight_decay", "probe_l2", "grad_clip"):
            if not float(getattr(self, f)) >= 0:
                raise ValueError(f"FinetuneConfig.{f} must be >= 0, got {getattr(self, f)}")
        if not 0 <= self.warmup_fraction < 1:
            raise ValueError(f"FinetuneConfig.warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        object.__setattr__(self, "frozen", tuple(self.frozen))
        object.__setattr__(self, "probe_l2_grid", tuple(float(v) for v in self.probe_l2_grid))
        if any(not v >= 0 for v in self.probe_l2_grid):
            raise ValueError(f"FinetuneConfig.probe_l2_grid must hold penalties >= 0, got {self.probe_l2_grid}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def probe_part(self) -> dict:
        """The fields the linear probe depends on."""
        return {k: v for k, v in self.to_dict().items() if k.startswith("probe_") or k == "max_length"}


@dataclasses.dataclass(frozen=True)
class BenchmarkSpec:
    """A benchmark: tasks, how to build the adapter, default config, and the data loader.

    ``make_adapter(config) -> ModelAdapter`` may read only ``config.max_length`` and
    ``config.feature_batch_size`` (adapters are memoised on those); ``load(task, split) ->
    (inputs, labels)`` (default :func:`bmm_jax.data.load`).
    """
    name: str
    tasks: tuple[str, ...]
    make_adapter: Callable[[FinetuneConfig], ModelAdapter]
    config: FinetuneConfig = FinetuneConfig()
    load: LoadFn | None = None


class Benchmark(NamedTuple):
    """Built experts of one benchmark and seed.

    Attributes:
      name: benchmark name.
      tasks: task names (order of ``expert_params``).
      adapter: the model adapter (``adapter.params`` is θ0).
      base_params: θ0, the pretrained encoder params.
      expert_params: list of K expert param trees (structure of ``base_params``), task order.
      heads: ``task -> expert head`` (fine-tuned with the expert; use it for merged models).
      probe_heads: ``task -> linear-probe head`` on frozen pretrained features.
      config: the :class:`FinetuneConfig` used.
      stats: ``task -> dict`` (n_train, n_probe, num_classes, seconds, reused, final_loss, ...)
        and ``"_total_seconds"``.
      seed: the fine-tuning seed.
      load: ``(task, split) -> (inputs, labels)``, the data loader the experts were trained with
        (pass it as ``load=`` to :func:`bmm_jax.evaluate.evaluate` and use it for calibration
        data: for EffNet-4 it rescales optdigits' 0..16 counts to 0..255).
    """
    name: str
    tasks: tuple[str, ...]
    adapter: ModelAdapter
    base_params: PyTree
    expert_params: list
    heads: dict
    probe_heads: dict
    config: FinetuneConfig
    stats: dict
    seed: int = 0
    load: LoadFn | None = None


# ----------------------------------------------------------------------------- benchmarks
TEXT_TASKS = ("mr", "uncertainty", "dutch_polarity", "bbc", "fortunes")
VISION_TASKS = ("mnist", "fashion_mnist", "optdigits", "ising")


def scaled_image_load(task: str, split: str):
    """:func:`bmm_jax.data.load` with image pixels rescaled to 0..255 (``uint8``).

    Datasets whose encoding tops out below 255 (optdigits: block counts 0..16, see
    ``bmm_jax.data.info(name).pixel_max``) are mapped linearly, ``round(x * 255 / pixel_max)``;
    others and text datasets are returned unchanged.
    """
    from bmm_jax import data
    x, y = data.load(task, split)
    pmax = data.info(task).pixel_max
    if isinstance(x, np.ndarray) and pmax and pmax != 255:
        x = np.round(x.astype(np.float32) * np.float32(255.0 / pmax)).astype(np.uint8)
    return x, y


def _minilm(config: FinetuneConfig) -> ModelAdapter:
    from bmm_jax.models.minilm import minilm_adapter
    return minilm_adapter(max_length=config.max_length)


def _effnet(config: FinetuneConfig) -> ModelAdapter:
    from bmm_jax.models.effnet_adapter import effnet_adapter
    return effnet_adapter(batch_size=config.feature_batch_size)


#: The two benchmarks. Budgets (2-core CPU): see ``experiments/build_experts.py``. MiniLM-5:
#: LP-FT of the 6 transformer layers (embeddings frozen) on 768 examples per task, 2 epochs of
#: batch 16 (96 steps), length-bucketed batches of at most 64 tokens. EffNet-4: blocks 12-15 +
#: conv head on 6000 examples per task, 4 epochs of batch 64, on cached trunk features.
BENCHMARKS: dict[str, BenchmarkSpec] = {
    "minilm5": BenchmarkSpec(
        "minilm5", TEXT_TASKS, _minilm,
        FinetuneConfig(max_train=768, epochs=2, batch_size=16, learning_rate=5e-5, head_learning_rate=1e-4,
                       probe_max_train=1000, probe_max_val=512, max_length=64, feature_batch_size=64)),
    "effnet4": BenchmarkSpec(
        "effnet4", VISION_TASKS, _effnet,
        FinetuneConfig(max_train=6000, epochs=4, batch_size=64, learning_rate=3e-4, head_learning_rate=1e-4,
                       frozen=(), probe_max_train=4000, probe_max_val=1000, feature_batch_size=256),
        load=scaled_image_load),
}


def get_benchmark(benchmark: str | BenchmarkSpec) -> BenchmarkSpec:
    if isinstance(benchmark, BenchmarkSpec):
        return benchmark
    if benchmark not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {benchmark!r}; expected one of {sorted(BENCHMARKS)} or a BenchmarkSpec")
    return BENCHMARKS[benchmark]


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


def _like(tree, ref):
    """Re-nest ``tree`` (a nested dict) in the container structure of ``ref`` (same paths)."""
    flat = _flat(tree)
    return jax.tree_util.tree_map_with_path(
        lambda p, _: flat["/".join(str(getattr(k, "key", k)) for k in p)], ref)


# ----------------------------------------------------------------------------- features / probe
def extract_features(adapter: ModelAdapter, params: PyTree, batch: dict, batch_size: int = 128) -> np.ndarray:
    """Pooled features ``[N, feature_dim]`` of a preprocessed batch (padded, jitted batches; text
    is processed in order of length so batches trim to short length buckets), in row order."""
    from bmm_jax.evaluate import batched_logits
    d = adapter.feature_dim
    eye = {"kernel": jnp.eye(d, dtype=jnp.float32), "bias": jnp.zeros((d,), jnp.float32)}
    if adapter.length_buckets and "attention_mask" in batch:
        order = np.argsort(np.asarray(batch["attention_mask"]).sum(axis=1), kind="stable")
        feats = batched_logits(adapter, params, eye, take(batch, order), batch_size)
        out = np.empty_like(feats)
        out[order] = feats
        return out
    return batched_logits(adapter, params, eye, batch, batch_size)


class ProbeFit(NamedTuple):
    """A fitted linear probe: ``head`` (on raw features), the chosen ``l2`` and the validation
    accuracy per candidate ``l2`` (empty without validation data)."""
    head: dict
    l2: float
    val_accuracy: dict


def linear_probe(features: np.ndarray, labels: np.ndarray, num_classes: int, *, l2: float = 1e-3,
                 steps: int = 200, val_features: np.ndarray | None = None,
                 val_labels: np.ndarray | None = None, l2_grid: Sequence[float] = ()) -> ProbeFit:
    """Multinomial logistic regression (ridge-penalised) on frozen features.

    Minimises ``mean CE(z W + b, y) + l2 * ||W||_F^2`` over centred features scaled by one global
    factor, ``z = (x - mu) / r`` with ``r`` the RMS of the centred features (every dimension is
    penalised alike, so near-constant feature dimensions do not get huge weights that would make
    later fine-tuning unstable), by full-batch L-BFGS from zero. ``mu`` and ``r`` are folded into
    the returned head so that ``head_logits(head, x)`` applies to raw features.

    With validation data and a non-empty ``l2_grid``, every ``l2`` of the grid is fitted and the
    one with the best validation accuracy is kept (ties: the larger ``l2``).

    Args:
      features: ``[N, d]`` float features; ``labels``: ``[N]`` ints in ``[0, num_classes)``.
      num_classes: C.
      l2: penalty without a grid.
      steps: L-BFGS iterations.
      val_features, val_labels: optional ``[M, d]`` / ``[M]`` validation data for the grid.
      l2_grid: candidate penalties.

    Returns:
      :class:`ProbeFit` with ``head = {"kernel": [d, C], "bias": [C]}`` (float32 numpy).
    """
    x = np.asarray(features, np.float32)
    y = np.asarray(labels, np.int32)
    if x.ndim != 2 or y.shape != x.shape[:1]:
        raise ValueError(f"features must be [N, d] and labels [N]; got {x.shape} and {y.shape}")
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got range [{y.min()}, {y.max()}]")
    mu = x.mean(axis=0)
    r = np.float32(np.sqrt(np.mean((x - mu) ** 2)) + 1e-6)
    z = jnp.asarray((x - mu) / r)

    def fold(w) -> dict:
        kernel = np.asarray(w["kernel"], np.float32) / r
        bias = np.asarray(w["bias"], np.float32) - mu @ kernel
        return {"kernel": kernel.astype(np.float32), "bias": bias.astype(np.float32)}

    grid = tuple(float(v) for v in l2_grid) if (l2_grid and val_features is not None) else (float(l2),)
    fits, accs = {}, {}
    for lam in grid:
        w = _fit_probe(z, jnp.asarray(y), jnp.float32(lam), int(num_classes), int(steps))
        fits[lam] = fold(w)
        if len(grid) > 1:
            vx = np.asarray(val_features, np.float32)
            vy = np.asarray(val_labels)
            lg = vx @ fits[lam]["kernel"] + fits[lam]["bias"]
            accs[lam] = float(np.mean(np.argmax(lg, axis=1) == vy))
    best = max(grid, key=lambda lam: (accs.get(lam, 0.0), lam))
    return ProbeFit(fits[best], best, accs)


@functools.partial(jax.jit, static_argnums=(3, 4))
def _fit_probe(z, y, l2, num_classes: int, steps: int):
    """L-BFGS on the penalised mean cross-entropy (see :func:`linear_probe`); ``l2`` is traced."""
    w0 = {"kernel": jnp.zeros((z.shape[1], num_classes), jnp.float32),
          "bias": jnp.zeros((num_classes,), jnp.float32)}

    def loss(w):
        lg = head_logits(w, z)
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(lg, y)) + l2 * jnp.sum(w["kernel"] ** 2)

    opt = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(loss)

    def body(carry, _):
        w, state = carry
        value, grad = value_and_grad(w, state=state)
        updates, state = opt.update(grad, state, w, value=value, grad=grad, value_fn=loss)
        return (optax.apply_updates(w, updates), state), value

    (w, _), _ = jax.lax.scan(body, (w0, opt.init(w0)), None, length=steps)
    return w


# ----------------------------------------------------------------------------- fine-tuning
class FinetuneResult(NamedTuple):
    """``params`` (full encoder tree), ``head``, ``losses [steps]`` (training loss per step)."""
    params: PyTree
    head: dict
    losses: np.ndarray


def lr_schedule(peak: float, total: int, warmup_fraction: float) -> np.ndarray:
    """Per-step learning rates ``[total]`` (float32): linear warm-up from 0 over
    ``round(warmup_fraction * total)`` steps, then cosine decay to 0 (as
    ``optax.warmup_cosine_decay_schedule``; without warm-up, ``optax.cosine_decay_schedule``)."""
    steps = np.arange(total, dtype=np.float64)
    warm = int(round(warmup_fraction * total))
    if warm > 0:
        decay = max(total, warm + 1) - warm
        lr = np.where(steps < warm, peak * steps / warm,
                      0.5 * peak * (1 + np.cos(np.pi * np.clip(steps - warm, 0, decay) / decay)))
    else:
        lr = 0.5 * peak * (1 + np.cos(np.pi * steps / max(total, 1)))
    return lr.astype(np.float32)


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


_STEPS: "weakref.WeakKeyDictionary[ModelAdapter, dict]" = weakref.WeakKeyDictionary()

ADAM_B1, ADAM_B2, ADAM_EPS = 0.9, 0.999, 1e-8


class AdamState(NamedTuple):
    """AdamW moments (pytrees like the trained state) and the step count ``t`` (float32 scalar)."""
    m: PyTree
    v: PyTree
    t: jax.Array


def adam_init(state: PyTree) -> AdamState:
    zeros = jax.tree_util.tree_map(jnp.zeros_like, state)
    return AdamState(zeros, zeros, jnp.zeros((), jnp.float32))


def adamw_step(state: dict, grads: dict, opt: AdamState, lr: dict, *, grad_clip: float,
               weight_decay: float) -> tuple[dict, AdamState]:
    """One AdamW step (Loshchilov & Hutter), as ``optax.chain(clip_by_global_norm(grad_clip),
    adamw(lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay))`` but with one learning rate per
    top-level key of ``state`` (``lr = {"encoder": ..., "head": ...}``, float32 scalars) and
    written for strict dtype promotion (the step count is float32).

    ``g <- g * min(1, grad_clip / ||g||)`` (global norm over every leaf; no clipping if
    ``grad_clip <= 0``); ``m <- b1 m + (1 - b1) g``; ``v <- b2 v + (1 - b2) g^2``;
    ``p <- p - lr * (m / (1 - b1^t) / (sqrt(v / (1 - b2^t)) + eps) + weight_decay * p)``.
    """
    leaves = jax.tree_util.tree_leaves(grads)
    if grad_clip > 0:
        norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in leaves))
        factor = jnp.minimum(jnp.float32(1.0), jnp.float32(grad_clip) / jnp.maximum(norm, jnp.float32(1e-30)))
        grads = jax.tree_util.tree_map(lambda g: g * factor.astype(g.dtype), grads)
    t = opt.t + jnp.float32(1.0)
    m = jax.tree_util.tree_map(lambda m, g: ADAM_B1 * m + (1.0 - ADAM_B1) * g, opt.m, grads)
    v = jax.tree_util.tree_map(lambda v, g: ADAM_B2 * v + (1.0 - ADAM_B2) * jnp.square(g), opt.v, grads)
    c1 = 1.0 - jnp.power(jnp.float32(ADAM_B1), t)
    c2 = 1.0 - jnp.power(jnp.float32(ADAM_B2), t)
    new = {}
    for key, sub in state.items():
        rate = lr[key]
        new[key] = jax.tree_util.tree_map(
            lambda p, m_, v_: p - rate * ((m_ / c1) / (jnp.sqrt(v_ / c2) + ADAM_EPS) + weight_decay * p),
            sub, m[key], v[key])
    return new, AdamState(m, v, t)


def _train_step(adapter: ModelAdapter, grad_clip: float, weight_decay: float):
    """Jitted AdamW step (shared by every task fine-tuned with ``adapter``; compiled once per
    batch shape and head size). Learning rates are arguments, so schedules do not recompile."""
    cache = _STEPS.setdefault(adapter, {})
    key = (float(grad_clip), float(weight_decay))
    if key in cache:
        return cache[key]

    def loss_fn(st, frozen, b, y):
        feats = adapter.apply(combine(st["encoder"], frozen), b)
        lg = head_logits(st["head"], feats)
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(lg, y))

    @jax.jit
    def step(st, opt_state, frozen, b, y, lr_encoder, lr_head):
        loss, grads = jax.value_and_grad(loss_fn)(st, frozen, b, y)
        new, opt_state = adamw_step(st, grads, opt_state, {"encoder": lr_encoder, "head": lr_head},
                                    grad_clip=grad_clip, weight_decay=weight_decay)
        return new, opt_state, loss

    cache[key] = step
    return step


def finetune(adapter: ModelAdapter, params: PyTree, head: dict, batch: dict, labels: np.ndarray,
             config: FinetuneConfig, *, seed: int = 0, progress: bool = True,
             desc: str = "fine-tune") -> FinetuneResult:
    """Fine-tune encoder + linear head with AdamW on softmax cross-entropy.

    Schedule: :func:`lr_schedule` (linear warm-up, cosine decay) with peak
    ``config.learning_rate`` for the encoder and ``config.head_learning_rate`` for the head;
    gradients clipped to global norm ``config.grad_clip``; decoupled weight decay
    ``config.weight_decay``. Batches: :func:`batch_plan` (length-bucketed for text adapters).

    Args:
      adapter: model adapter; ``adapter.apply`` is differentiated (run deterministically: no
        dropout; frozen BatchNorm statistics live in ``adapter.extra_variables``).
      params: initial encoder params (θ0).
      head: initial head ``{"kernel": [d, C], "bias": [C]}`` (e.g. the linear probe).
      batch: preprocessed training inputs (dict of arrays, ``N`` rows); ``labels``: ``[N]`` int.
      config: :class:`FinetuneConfig` (epochs, batch size, learning rates, frozen leaves...).
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
    total = len(plan)
    lr_e = lr_schedule(config.learning_rate, total, config.warmup_fraction)
    lr_h = lr_schedule(config.head_learning_rate, total, config.warmup_fraction)
    trainable, frozen = partition(params, config.frozen)
    step = _train_step(adapter, config.grad_clip, config.weight_decay)
    state = {"encoder": jax.tree_util.tree_map(jnp.asarray, trainable),
             "head": jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), head)}
    opt_state = adam_init(state)
    losses = []
    bar = _tqdm(total=total, desc=desc, disable=not progress)
    try:
        for i, idx in enumerate(plan):
            b = trim_batch(take(batch, idx), adapter.length_buckets)
            state, opt_state, loss = step(state, opt_state, frozen, b, labels[idx],
                                          jnp.float32(lr_e[i]), jnp.float32(lr_h[i]))
            losses.append(loss)
            bar.update(1)
            if (i + 1) % 10 == 0:
                bar.set_postfix(loss=f"{float(np.mean([float(l) for l in losses[-10:]])):.4f}")
    finally:
        bar.close()
    new = combine(state["encoder"], frozen)
    return FinetuneResult(_like(new, params), jax.tree_util.tree_map(np.asarray, state["head"]),
                          np.asarray([float(l) for l in losses], np.float32))


def _tqdm(**kw):
    from tqdm.auto import tqdm
    return tqdm(**kw)


# ----------------------------------------------------------------------------- cache
def data_hash(inputs, labels) -> str:
    """sha256 of training inputs (strings or arrays) and labels."""
    h = hashlib.sha256()
    if isinstance(inputs, np.ndarray):
        a = np.ascontiguousarray(inputs)
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(a.tobytes())
    else:
        for s in inputs:
            b = s.encode("utf-8", "surrogatepass") if isinstance(s, str) else np.asarray(s).tobytes()
            h.update(len(b).to_bytes(8, "little"))
            h.update(b)
    lab = np.ascontiguousarray(np.asarray(labels, np.int64))
    h.update(lab.tobytes())
    return h.hexdigest()


def _read_manifest(d: str) -> dict | None:
    try:
        with open(os.path.join(d, "manifest.json")) as f:
            m = json.load(f)
        return m if isinstance(m, dict) else None
    except (OSError, json.JSONDecodeError):
        return None


def _write_manifest(d: str, manifest: dict) -> None:
    tmp = os.path.join(d, f".manifest.json.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(d, "manifest.json"))


def _try_reuse(d: str, want: dict, like: PyTree) -> tuple[PyTree | None, str]:
    """Load the cached checkpoint in ``d`` if its manifest matches ``want``; else ``(None, why)``."""
    m = _read_manifest(d)
    if m is None:
        return None, "no manifest" if not os.path.exists(os.path.join(d, "manifest.json")) else "unreadable manifest"
    for k, v in want.items():
        if m.get(k) != v:
            return None, f"{k} changed"
    try:
        tree = checkpoint.load(os.path.join(d, "ckpt"), like=like)
    except (FileNotFoundError, ValueError) as e:
        return None, f"corrupt checkpoint ({e})"
    if checkpoint.tree_checksum(tree) != m.get("weight_checksum"):
        return None, "corrupt checkpoint (weight checksum differs from the manifest)"
    return tree, "reused"


def _store(d: str, tree: PyTree, manifest: dict) -> None:
    os.makedirs(d, exist_ok=True)
    checksum = checkpoint.save(os.path.join(d, "ckpt"), tree, metadata={"kind": manifest.get("kind")})
    _write_manifest(d, {**manifest, "weight_checksum": checksum, "created": time.strftime("%Y-%m-%dT%H:%M:%S")})


def _jsonable(x):
    return json.loads(json.dumps(x, default=str))


def _default_cache_dir() -> str:
    from bmm_jax.data.paths import cache_dir
    return os.fspath(cache_dir())


def _num_classes(labels: np.ndarray, task: str) -> int:
    lab = np.asarray(labels)
    if lab.ndim != 1 or not np.issubdtype(lab.dtype, np.integer):
        raise ValueError(f"task {task!r}: labels must be a 1-D integer array, got {lab.dtype}{lab.shape}")
    if lab.min() < 0:
        raise ValueError(f"task {task!r}: negative label {lab.min()}")
    return max(int(lab.max()) + 1, 2)


def _select(inputs, idx):
    if isinstance(inputs, np.ndarray):
        return inputs[idx]
    return [inputs[i] for i in idx]


def build_experts(benchmark: str | BenchmarkSpec, *, cache_dir: str | None = None, seed: int = 0,
                  config: FinetuneConfig | None = None, progress: bool = True,
                  tasks: Sequence[str] | None = None) -> Benchmark:
    """Build (or reuse from the cache) the linear probes and fine-tuned experts of a benchmark.

    Args:
      benchmark: ``"minilm5"``, ``"effnet4"`` or a :class:`BenchmarkSpec`.
      cache_dir: root of the cache (default :func:`bmm_jax.data.paths.cache_dir`); experts live
        under ``<cache_dir>/experts/<benchmark>/<task>/``.
      seed: fine-tuning seed (training subsample and batch order); seeds give distinct experts.
      config: overrides the benchmark's default :class:`FinetuneConfig`.
      progress: tqdm bars while fine-tuning.
      tasks: a subset of the benchmark's tasks (default all).

    Returns:
      :class:`Benchmark`.
    """
    spec = get_benchmark(benchmark)
    config = config or spec.config
    if not isinstance(config, FinetuneConfig):
        raise TypeError(f"config must be a FinetuneConfig, got {type(config).__name__}")
    tasks = tuple(spec.tasks if tasks is None else tasks)
    unknown = [t for t in tasks if t not in spec.tasks]
    if unknown:
        raise ValueError(f"tasks {unknown} are not in benchmark {spec.name!r} ({spec.tasks})")
    load = spec.load
    if load is None:
        from bmm_jax import data
        load = data.load
    root = os.path.join(os.fspath(cache_dir) if cache_dir is not None else _default_cache_dir(),
                        "experts", spec.name)
    t_start, c_start = time.time(), time.process_time()
    adapter = _adapter(spec, config)
    base = adapter.params
    base_sum = checkpoint.tree_checksum(base)
    _, base_frozen = partition(base, config.frozen)
    base_trainable, _ = partition(base, config.frozen)
    experts, heads, probes, stats = [], {}, {}, {}
    for task in tasks:
        t0 = time.time()
        inputs, labels = load(task, "train")
        labels = np.asarray(labels)
        if len(inputs) != len(labels):
            raise ValueError(f"task {task!r}: {len(inputs)} train inputs but {len(labels)} labels")
        nc = _num_classes(labels, task)
        st = {"n_train_split": int(len(labels)), "num_classes": nc}
        head_like = {"kernel": np.zeros((adapter.feature_dim, nc), np.float32),
                     "bias": np.zeros((nc,), np.float32)}
        tdir = os.path.join(root, task)

        # -- linear probe on frozen pretrained features (seed-independent subsets)
        pidx = _subset(len(labels), config.probe_max_train, seed=0)
        p_hash = data_hash(_select(inputs, pidx), labels[pidx])
        val = None
        if config.probe_l2_grid:
            v_inputs, v_labels = load(task, "validation")
            vidx = _subset(len(v_labels), config.probe_max_val, seed=0)
            val = (_select(v_inputs, vidx), np.asarray(v_labels)[vidx])
            p_hash = hashlib.sha256((p_hash + data_hash(*val)).encode()).hexdigest()
        p_want = {"kind": "probe", "benchmark": spec.name, "task": task, "adapter": adapter.preprocess_key,
                  "config": _jsonable(config.probe_part()), "data_hash": p_hash, "base_checksum": base_sum,
                  "num_classes": nc}
        pdir = os.path.join(tdir, "probe")
        tree, why = _try_reuse(pdir, p_want, {"head": head_like})
        tp, cp = time.time(), time.process_time()
        if tree is None:
            if why != "no manifest":
                log.warning("rebuilding linear probe %s/%s: %s", spec.name, task, why)
            feats = extract_features(adapter, base, adapter.preprocess(_select(inputs, pidx)),
                                     config.feature_batch_size)
            vfeats = None if val is None else extract_features(adapter, base, adapter.preprocess(val[0]),
                                                               config.feature_batch_size)
            fit = linear_probe(feats, labels[pidx], nc, l2=config.probe_l2, steps=config.probe_steps,
                               val_features=vfeats, val_labels=None if val is None else val[1],
                               l2_grid=config.probe_l2_grid)
            probe = fit.head
            _store(pdir, {"head": probe}, {**p_want, "n_train": int(len(pidx)), "l2": fit.l2,
                                           "val_accuracy": {str(k): v for k, v in fit.val_accuracy.items()}})
            st["probe_reused"] = False
        else:
            probe = tree["head"]
            st["probe_reused"] = True
        pm = _read_manifest(pdir) or {}
        st["probe_l2"], st["probe_val_accuracy"] = pm.get("l2"), pm.get("val_accuracy")
        st["probe_reason"] = why
        st["n_probe"] = int(len(pidx))
        st["probe_seconds"] = time.time() - tp
        st["probe_cpu_seconds"] = time.process_time() - cp
        probes[task] = probe

        # -- expert (LP-FT)
        idx = _subset(len(labels), config.max_train, seed=1000 + seed)
        e_hash = data_hash(_select(inputs, idx), labels[idx])
        e_want = {"kind": "expert", "benchmark": spec.name, "task": task, "seed": int(seed),
                  "adapter": adapter.preprocess_key, "config": _jsonable(config.to_dict()),
                  "data_hash": e_hash, "base_checksum": base_sum, "num_classes": nc,
                  "probe_checksum": checkpoint.tree_checksum({"head": probe})}
        edir = os.path.join(tdir, f"seed{seed}")
        like = {"encoder": jax.tree_util.tree_map(np.asarray, base_trainable), "head": head_like}
        tree, why = _try_reuse(edir, e_want, like)
        te, ce = time.time(), time.process_time()
        if tree is None:
            if why != "no manifest":
                log.warning("rebuilding expert %s/%s seed %d: %s", spec.name, task, seed, why)
            batch = adapter.preprocess(_select(inputs, idx))
            res = finetune(adapter, base, probe, batch, labels[idx], config, seed=seed, progress=progress,
                           desc=f"{spec.name}/{task} seed{seed}")
            trained, _ = partition(res.params, config.frozen)
            tree = {"encoder": jax.tree_util.tree_map(np.asarray, trained), "head": res.head}
            _store(edir, tree, {**e_want, "n_train": int(len(idx)),
                                "first_loss": float(res.losses[0]) if len(res.losses) else None,
                                "final_loss": float(np.mean(res.losses[-10:])) if len(res.losses) else None})
            st["expert_reused"] = False
        else:
            st["expert_reused"] = True
        st["expert_reason"] = why
        m = _read_manifest(edir) or {}
        st["first_loss"], st["final_loss"] = m.get("first_loss"), m.get("final_loss")
        st["n_train"] = int(len(idx))
        st["expert_seconds"] = time.time() - te
        st["expert_cpu_seconds"] = time.process_time() - ce
        st["seconds"] = time.time() - t0
        experts.append(_like(combine(tree["encoder"], base_frozen), base))
        heads[task] = tree["head"]
        stats[task] = st
    stats["_total_seconds"] = time.time() - t_start
    stats["_total_cpu_seconds"] = time.process_time() - c_start
    return Benchmark(spec.name, tasks, adapter, base, experts, heads, probes, config, stats, int(seed),
                     load)


_ADAPTERS: dict = {}


def _adapter(spec: BenchmarkSpec, config: FinetuneConfig) -> ModelAdapter:
    """``spec.make_adapter(config)``, memoised per (factory, the config fields an adapter may
    read: ``max_length``, ``feature_batch_size``): the same adapter object across calls keeps its
    jitted training step and evaluation functions (no recompilation when several seeds or
    configs are built in one process)."""
    key = (spec.make_adapter, config.max_length, config.feature_batch_size)
    ad = _ADAPTERS.get(key)
    if ad is None:
        if len(_ADAPTERS) >= 4:
            _ADAPTERS.pop(next(iter(_ADAPTERS)))
        ad = _ADAPTERS[key] = spec.make_adapter(config)
    return ad


def _subset(n: int, k: int, seed: int) -> np.ndarray:
    if k >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).permutation(n)[:k])


__all__ = ["FinetuneConfig", "BenchmarkSpec", "Benchmark", "BENCHMARKS", "build_experts", "finetune",
           "linear_probe", "ProbeFit", "lr_schedule", "adamw_step", "adam_init", "AdamState", "batch_plan", "scaled_image_load", "FinetuneResult", "extract_features", "partition", "combine", "data_hash", "get_benchmark"]
