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
import hashlib
import json
import logging
import os
import re
import time
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
      probe_l2: L2 penalty of the probe (on the mean cross-entropy scale), on standardised
        features.
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
    probe_l2: float = 1e-4
    max_length: int = 64
    feature_batch_size: int = 128

    def __post_init__(self):
        for f in ("max_train", "epochs", "batch_size", "probe_max_train", "probe_steps", "max_length",
                  "feature_batch_size"):
            if int(getattr(self, f)) <= 0:
                raise ValueError(f"FinetuneConfig.{f} must be positive, got {getattr(self, f)}")
        for f in ("learning_rate", "head_learning_rate", "weight_decay", "probe_l2", "grad_clip"):
            if not float(getattr(self, f)) >= 0:
                raise ValueError(f"FinetuneConfig.{f} must be >= 0, got {getattr(self, f)}")
        if not 0 <= self.warmup_fraction < 1:
            raise ValueError(f"FinetuneConfig.warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        object.__setattr__(self, "frozen", tuple(self.frozen))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def probe_part(self) -> dict:
        """The fields the linear probe depends on."""
        return {k: v for k, v in self.to_dict().items()
                if k.startswith("probe_") or k in ("max_length", "feature_batch_size")}


@dataclasses.dataclass(frozen=True)
class BenchmarkSpec:
    """A benchmark: tasks, how to build the adapter, default config, and the data loader.

    ``make_adapter(config) -> ModelAdapter``; ``load(task, split) -> (inputs, labels)`` (default
    :func:`bmm_jax.data.load`).
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
      stats: ``task -> dict`` (n_train, n_probe, num_classes, seconds, reused, final_loss, ...).
      seed: the fine-tuning seed.
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


# ----------------------------------------------------------------------------- benchmarks
TEXT_TASKS = ("mr", "uncertainty", "dutch_polarity", "bbc", "fortunes")
VISION_TASKS = ("mnist", "fashion_mnist", "optdigits", "ising")


def _minilm(config: FinetuneConfig) -> ModelAdapter:
    from bmm_jax.models.minilm import minilm_adapter
    return minilm_adapter(max_length=config.max_length)


def _effnet(config: FinetuneConfig) -> ModelAdapter:
    from bmm_jax.models.effnet_adapter import effnet_adapter
    return effnet_adapter(batch_size=config.feature_batch_size)


BENCHMARKS: dict[str, BenchmarkSpec] = {
    "minilm5": BenchmarkSpec(
        "minilm5", TEXT_TASKS, _minilm,
        FinetuneConfig(max_train=1500, epochs=2, batch_size=32, learning_rate=1e-4, head_learning_rate=1e-3,
                       probe_max_train=2000, max_length=64)),
    "effnet4": BenchmarkSpec(
        "effnet4", VISION_TASKS, _effnet,
        FinetuneConfig(max_train=4000, epochs=3, batch_size=64, learning_rate=1e-3, head_learning_rate=1e-3,
                       frozen=(), probe_max_train=4000, feature_batch_size=256)),
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
    """Pooled features ``[N, feature_dim]`` of a preprocessed batch (padded, jitted batches)."""
    from bmm_jax.evaluate import batched_logits
    d = adapter.feature_dim
    eye = {"kernel": jnp.eye(d, dtype=jnp.float32), "bias": jnp.zeros((d,), jnp.float32)}
    return batched_logits(adapter, params, eye, batch, batch_size)


def linear_probe(features: np.ndarray, labels: np.ndarray, num_classes: int, *, l2: float = 1e-4,
                 steps: int = 200) -> dict:
    """Multinomial logistic regression on frozen features.

    Minimises ``mean CE(x W + b, y) + l2 * ||W_std||^2`` over standardised features
    ``(x - mu) / sd`` with L-BFGS, then folds the standardisation into the returned head so that
    ``head_logits(head, x)`` applies to raw features.

    Args:
      features: ``[N, d]`` float features.
      labels: ``[N]`` integer labels in ``[0, num_classes)``.
      num_classes: C.

    Returns:
      ``{"kernel": [d, C], "bias": [C]}`` float32.
    """
    x = jnp.asarray(features, jnp.float32)
    y = jnp.asarray(labels, jnp.int32)
    if x.ndim != 2 or y.shape != x.shape[:1]:
        raise ValueError(f"features must be [N, d] and labels [N]; got {x.shape} and {y.shape}")
    mu = jnp.mean(x, axis=0)
    sd = jnp.std(x, axis=0) + 1e-6
    xs = (x - mu) / sd
    w0 = {"kernel": jnp.zeros((x.shape[1], num_classes), jnp.float32),
          "bias": jnp.zeros((num_classes,), jnp.float32)}

    def loss(w):
        lg = head_logits(w, xs)
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(lg, y)) + l2 * jnp.sum(w["kernel"] ** 2)

    w = _lbfgs(loss, w0, steps)
    kernel = w["kernel"] / sd[:, None]
    bias = w["bias"] - jnp.matmul(mu, kernel, precision=jax.lax.Precision.HIGHEST)
    return {"kernel": np.asarray(kernel, np.float32), "bias": np.asarray(bias, np.float32)}


def _lbfgs(loss, w0, steps: int):
    opt = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(loss)

    @jax.jit
    def run(w):
        def body(carry, _):
            w, state = carry
            value, grad = value_and_grad(w, state=state)
            updates, state = opt.update(grad, state, w, value=value, grad=grad, value_fn=loss)
            return (optax.apply_updates(w, updates), state), value
        (w, _), values = jax.lax.scan(body, (w, opt.init(w)), None, length=steps)
        return w, values

    w, _ = run(w0)
    return w


# ----------------------------------------------------------------------------- fine-tuning
class FinetuneResult(NamedTuple):
    """``params`` (full encoder tree), ``head``, ``losses [steps]`` (training loss per step)."""
    params: PyTree
    head: dict
    losses: np.ndarray


def finetune(adapter: ModelAdapter, params: PyTree, head: dict, batch: dict, labels: np.ndarray,
             config: FinetuneConfig, *, seed: int = 0, progress: bool = True,
             desc: str = "fine-tune") -> FinetuneResult:
    """Fine-tune encoder + linear head with AdamW on softmax cross-entropy.

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
    bs = min(config.batch_size, n)
    steps_per_epoch = n // bs
    total = steps_per_epoch * config.epochs
    trainable, frozen = partition(params, config.frozen)
    warm = int(round(config.warmup_fraction * total))

    def sched(peak):
        if warm > 0:
            return optax.warmup_cosine_decay_schedule(0.0, peak, warm, max(total, warm + 1), end_value=0.0)
        return optax.cosine_decay_schedule(peak, max(total, 1))

    tx = optax.chain(
        optax.clip_by_global_norm(config.grad_clip) if config.grad_clip > 0 else optax.identity(),
        optax.multi_transform(
            {"encoder": optax.adamw(sched(config.learning_rate), weight_decay=config.weight_decay),
             "head": optax.adamw(sched(config.head_learning_rate), weight_decay=config.weight_decay)},
            {"encoder": "encoder", "head": "head"}))
    state = {"encoder": trainable, "head": jax.tree_util.tree_map(jnp.asarray, head)}
    opt_state = tx.init(state)

    def loss_fn(st, frozen, b, y):
        feats = adapter.apply(combine(st["encoder"], frozen), b)
        lg = head_logits(st["head"], feats)
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(lg, y))

    @jax.jit
    def step(st, opt_state, frozen, b, y):
        loss, grads = jax.value_and_grad(loss_fn)(st, frozen, b, y)
        updates, opt_state = tx.update(grads, opt_state, st)
        return optax.apply_updates(st, updates), opt_state, loss

    rng = np.random.default_rng(seed)
    losses = []
    bar = _tqdm(total=total, desc=desc, disable=not progress)
    try:
        for _ in range(config.epochs):
            perm = rng.permutation(n)
            for i in range(steps_per_epoch):
                idx = np.sort(perm[i * bs:(i + 1) * bs])
                b = trim_batch(take(batch, idx), adapter.length_buckets)
                state, opt_state, loss = step(state, opt_state, frozen, b, labels[idx])
                losses.append(loss)
                bar.update(1)
                if (len(losses) % 10) == 0:
                    bar.set_postfix(loss=f"{float(loss):.4f}")
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
    t_start = time.time()
    adapter = spec.make_adapter(config)
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

        # -- linear probe on frozen pretrained features (seed-independent subset)
        pidx = _subset(len(labels), config.probe_max_train, seed=0)
        p_hash = data_hash(_select(inputs, pidx), labels[pidx])
        p_want = {"kind": "probe", "benchmark": spec.name, "task": task, "adapter": adapter.preprocess_key,
                  "config": _jsonable(config.probe_part()), "data_hash": p_hash, "base_checksum": base_sum,
                  "num_classes": nc}
        pdir = os.path.join(tdir, "probe")
        tree, why = _try_reuse(pdir, p_want, {"head": head_like})
        tp = time.time()
        if tree is None:
            if why != "no manifest":
                log.warning("rebuilding linear probe %s/%s: %s", spec.name, task, why)
            feats = extract_features(adapter, base, adapter.preprocess(_select(inputs, pidx)),
                                     config.feature_batch_size)
            probe = linear_probe(feats, labels[pidx], nc, l2=config.probe_l2, steps=config.probe_steps)
            _store(pdir, {"head": probe}, {**p_want, "n_train": int(len(pidx))})
            st["probe_reused"] = False
        else:
            probe = tree["head"]
            st["probe_reused"] = True
        st["probe_reason"] = why
        st["n_probe"] = int(len(pidx))
        st["probe_seconds"] = time.time() - tp
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
        te = time.time()
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
        st["seconds"] = time.time() - t0
        experts.append(_like(combine(tree["encoder"], base_frozen), base))
        heads[task] = tree["head"]
        stats[task] = st
    stats["_total_seconds"] = time.time() - t_start
    return Benchmark(spec.name, tasks, adapter, base, experts, heads, probes, config, stats, int(seed))


def _subset(n: int, k: int, seed: int) -> np.ndarray:
    if k >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).permutation(n)[:k])


__all__ = ["FinetuneConfig", "BenchmarkSpec", "Benchmark", "BENCHMARKS", "build_experts", "finetune",
           "linear_probe", "extract_features", "partition", "combine", "data_hash", "get_benchmark"]
