"""Fine-tuned experts for the merging benchmarks, with an on-disk cache.

Benchmarks (:data:`BENCHMARKS`, :mod:`bmm_jax.experts.registry`):

* ``minilm5``: all-MiniLM-L6-v2 fine-tuned on 5 text tasks (mr, uncertainty, dutch_polarity,
  bbc, fortunes). The word embeddings are frozen (they are carried, never merged); the 6
  transformer layers and LayerNorms are fine-tuned.
* ``effnet4``: EfficientNet-Lite0 (32 px) on 4 image tasks (mnist, fashion_mnist, optdigits,
  ising). Blocks 0-11 are a frozen trunk run once inside preprocessing; blocks 12-15 + the head
  convolution (the adapter's params) are fine-tuned.

Per task, the *probe head* is a linear probe (L2-regularised multinomial logistic regression) on
the frozen pretrained features (:mod:`bmm_jax.experts.probes`); it scores the pretrained encoder.
The *expert head* is, by default, that same probe kept frozen while the encoder is fine-tuned
(``FinetuneConfig.head = "frozen"``: the task-arithmetic protocol, so every expert keeps the
pretrained feature space and their task vectors can be merged); ``head="lpft"`` fine-tunes it with
the encoder (LP-FT). Merged encoders are evaluated with each task's expert head.

Modules: :mod:`~bmm_jax.experts.config` (FinetuneConfig, BenchmarkSpec, Benchmark),
:mod:`~bmm_jax.experts.registry` (the benchmarks), :mod:`~bmm_jax.experts.finetune` (optax
AdamW fine-tuning), :mod:`~bmm_jax.experts.probes` (linear probes),
:mod:`~bmm_jax.experts.cache` (:func:`build_experts` and the on-disk cache).
"""
from __future__ import annotations

from bmm_jax.experts.cache import (_adapter, _default_cache_dir, _read_manifest, _subset,  # noqa: F401
                                   build_experts, data_hash,
                                   preprocessing_fingerprint)
from bmm_jax.experts.config import HEAD_MODES, Benchmark, BenchmarkSpec, FinetuneConfig, LoadFn  # noqa: F401
from bmm_jax.experts.finetune import (FinetuneResult, batch_plan, combine, finetune, like,  # noqa: F401
                                      lr_schedule, make_optimizer, partition, schedule)
from bmm_jax.experts.probes import ProbeFit, extract_features, linear_probe
from bmm_jax.experts.registry import BENCHMARKS, TEXT_TASKS, VISION_TASKS, get_benchmark, scaled_image_load

__all__ = ["FinetuneConfig", "BenchmarkSpec", "Benchmark", "BENCHMARKS", "HEAD_MODES", "build_experts",
           "finetune", "make_optimizer", "schedule", "linear_probe", "ProbeFit", "lr_schedule", "batch_plan",
           "scaled_image_load", "FinetuneResult", "extract_features", "partition", "combine", "data_hash", "preprocessing_fingerprint",
           "get_benchmark", "TEXT_TASKS", "VISION_TASKS"]
