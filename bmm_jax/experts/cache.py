"""Building the experts of a benchmark, with an on-disk cache.

Cache layout (``cache_dir`` defaults to :func:`bmm_jax.data.paths.cache_dir`)::

    <cache_dir>/experts/<benchmark>/<task>/probe/{manifest.json, ckpt/}
    <cache_dir>/experts/<benchmark>/<task>/seed<s>/{manifest.json, ckpt/}

``manifest.json`` records the config (head mode included), a hash of the training data, the base
weights' checksum, a fingerprint of the preprocessing (:func:`preprocessing_fingerprint`: what the
adapter makes of a few training inputs, so the cache survives a moved or recreated environment) and
the saved weights' checksum. A rerun with the same config reuses the checkpoint; a changed config, data or base model rebuilds it; a corrupt checkpoint (unreadable, or
a checksum that does not match) is detected and rebuilt. Experts of seed ``s`` use their own
training subsample and batch order, so the seeds are distinct fine-tunes.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from typing import Sequence

import jax
import numpy as np

from bmm_jax import checkpoint
from bmm_jax._tree import PyTree
from bmm_jax.experts.config import Benchmark, BenchmarkSpec, FinetuneConfig
from bmm_jax.experts.finetune import combine, finetune, like, partition
from bmm_jax.experts.probes import extract_features, linear_probe
from bmm_jax.experts.registry import get_benchmark
from bmm_jax.models.adapter import ModelAdapter

log = logging.getLogger("bmm_jax.experts")


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


def preprocessing_fingerprint(adapter: ModelAdapter, inputs) -> str:
    """sha256 of ``adapter.preprocess(inputs)`` (every array's key, dtype, shape and bytes).

    A location-free identity of the preprocessing (tokeniser, sequence length, image size,
    normalisation) for the expert cache: ``adapter.preprocess_key`` names the files the tokeniser was
    read from, so it changes when the same model is installed elsewhere (another virtual environment,
    a clone in another folder), whereas what the preprocessing *does* to the same inputs does not.
    ``inputs`` is a few training inputs (strings or images).
    """
    h = hashlib.sha256(f"{adapter.name}:{adapter.feature_dim}".encode())
    batch = adapter.preprocess(inputs)
    for k in sorted(batch):
        a = np.ascontiguousarray(np.asarray(batch[k]))
        h.update(f"{k}:{a.dtype}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


_FINGERPRINT_INPUTS = 16


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


def _try_reuse(d: str, want: dict, like: PyTree, legacy: dict | None = None) -> tuple[PyTree | None, str]:
    """Load the cached checkpoint in ``d`` if its manifest matches ``want``; else ``(None, why)``.

    ``legacy`` maps a key of ``want`` to ``(old_key, old_value)``: a manifest written before that key
    existed matches when its ``old_key`` equals ``old_value`` (manifests from before the preprocessing
    fingerprint match on the adapter's ``preprocess_key``, so existing caches stay valid)."""
    m = _read_manifest(d)
    if m is None:
        return None, "no manifest" if not os.path.exists(os.path.join(d, "manifest.json")) else "unreadable manifest"
    for k, v in want.items():
        if k not in m and legacy and k in legacy:
            old_key, old_value = legacy[k]
            if m.get(old_key) == old_value:
                continue
            return None, f"{old_key} changed"
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

    Per task: a linear probe on frozen pretrained features (seed-independent), then the expert:
    the encoder fine-tuned against the frozen probe head (``config.head == "frozen"``, the
    default) or with the head too (``"lpft"``). A spec with a ``build`` function (experts from
    downloaded checkpoints) is delegated to it.

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
    if spec.build is not None:
        return spec.build(spec, cache_dir=cache_dir, seed=seed, config=config, progress=progress, tasks=tasks)
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
        prep_fp = preprocessing_fingerprint(adapter, _select(inputs, pidx[:_FINGERPRINT_INPUTS]))
        legacy = {"preprocessing": ("adapter", adapter.preprocess_key)}
        p_want = {"kind": "probe", "benchmark": spec.name, "task": task, "preprocessing": prep_fp,
                  "config": _jsonable(config.probe_part()), "data_hash": p_hash, "base_checksum": base_sum,
                  "num_classes": nc}
        pdir = os.path.join(tdir, "probe")
        tree, why = _try_reuse(pdir, p_want, {"head": head_like}, legacy)
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
            _store(pdir, {"head": probe}, {**p_want, "adapter": adapter.preprocess_key, "n_train": int(len(pidx)), "l2": fit.l2,
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

        # -- expert (frozen probe head, or LP-FT)
        idx = _subset(len(labels), config.max_train, seed=1000 + seed)
        e_hash = data_hash(_select(inputs, idx), labels[idx])
        e_want = {"kind": "expert", "benchmark": spec.name, "task": task, "seed": int(seed),
                  "preprocessing": prep_fp, "config": _jsonable(config.to_dict()),
                  "data_hash": e_hash, "base_checksum": base_sum, "num_classes": nc,
                  "probe_checksum": checkpoint.tree_checksum({"head": probe})}
        edir = os.path.join(tdir, f"seed{seed}")
        ckpt_like = {"encoder": jax.tree_util.tree_map(np.asarray, base_trainable), "head": head_like}
        tree, why = _try_reuse(edir, e_want, ckpt_like, legacy)
        te, ce = time.time(), time.process_time()
        if tree is None:
            if why != "no manifest":
                log.warning("rebuilding expert %s/%s seed %d: %s", spec.name, task, seed, why)
            batch = adapter.preprocess(_select(inputs, idx))
            res = finetune(adapter, base, probe, batch, labels[idx], config, seed=seed, progress=progress,
                           desc=f"{spec.name}/{task} seed{seed}")
            trained, _ = partition(res.params, config.frozen)
            tree = {"encoder": jax.tree_util.tree_map(np.asarray, trained), "head": res.head}
            _store(edir, tree, {**e_want, "adapter": adapter.preprocess_key, "n_train": int(len(idx)),
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
        experts.append(like(combine(tree["encoder"], base_frozen), base))
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


__all__ = ["build_experts", "data_hash", "preprocessing_fingerprint"]
