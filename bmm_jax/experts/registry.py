"""The built-in benchmarks (``minilm5``, ``effnet4``) and their data loaders."""
from __future__ import annotations

import numpy as np

from bmm_jax.experts.config import BenchmarkSpec, FinetuneConfig
from bmm_jax.models.adapter import ModelAdapter

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


#: The two benchmarks. Budgets (2-core CPU): see ``experiments/build_experts.py``. MiniLM-5: the
#: 6 transformer layers (embeddings frozen) on 768 examples per task, 2 epochs of batch 16 (96
#: steps), length-bucketed batches of at most 64 tokens. EffNet-4: blocks 12-15 + conv head on
#: 6000 examples per task, 4 epochs of batch 64, on cached trunk features. Heads: the frozen
#: linear probes (``FinetuneConfig.head``; ``"lpft"`` fine-tunes them too).
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
    """The :class:`BenchmarkSpec` of a name in :data:`BENCHMARKS` (a spec is returned as is)."""
    if isinstance(benchmark, BenchmarkSpec):
        return benchmark
    if benchmark not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {benchmark!r}; expected one of {sorted(BENCHMARKS)} or a BenchmarkSpec")
    return BENCHMARKS[benchmark]


__all__ = ["TEXT_TASKS", "VISION_TASKS", "BENCHMARKS", "get_benchmark", "scaled_image_load"]
