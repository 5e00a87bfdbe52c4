"""Configuration objects of the expert benchmarks: fine-tuning settings, benchmark specs, built
benchmarks."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

from bmm_jax._tree import PyTree
from bmm_jax.models.adapter import ModelAdapter

LoadFn = Callable[[str, str], tuple]

#: How the expert head is trained: ``"frozen"`` (the linear probe, kept fixed while the encoder is
#: fine-tuned: the task-arithmetic protocol, every expert keeps the pretrained feature space) or
#: ``"lpft"`` (initialised from the probe and fine-tuned with the encoder).
HEAD_MODES = ("frozen", "lpft")


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    """Expert fine-tuning and linear-probe settings.

    Attributes:
      max_train: training examples per task and seed (a seeded random subset of the train split).
      epochs: passes over that subset.
      batch_size: examples per optimiser step.
      learning_rate: peak AdamW learning rate of the encoder (linear warm-up, cosine decay).
      head_learning_rate: peak learning rate of the expert head (``head="lpft"`` only).
      weight_decay: AdamW decoupled weight decay (encoder and, with LP-FT, head).
      warmup_fraction: fraction of the steps spent warming up.
      grad_clip: global gradient-norm clip (``0``: none).
      head: ``"frozen"`` (default: the expert head is the task's linear probe, fixed during
        fine-tuning, as in the task-arithmetic protocol where every expert is trained against
        CLIP's frozen zero-shot head) or ``"lpft"`` (head initialised from the probe and trained
        together with the encoder).
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
    head: str = "frozen"
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
        if self.head not in HEAD_MODES:
            raise ValueError(f"FinetuneConfig.head must be one of {HEAD_MODES}, got {self.head!r}")
        object.__setattr__(self, "frozen", tuple(self.frozen))
        object.__setattr__(self, "probe_l2_grid", tuple(float(v) for v in self.probe_l2_grid))
        if any(not v >= 0 for v in self.probe_l2_grid):
            raise ValueError(f"FinetuneConfig.probe_l2_grid must hold penalties >= 0, got {self.probe_l2_grid}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def probe_part(self) -> dict:
        """The fields the linear probe depends on."""
        return {k: v for k, v in self.to_dict().items() if k.startswith("probe_") or k == "max_length"}

    def replace(self, **changes) -> "FinetuneConfig":
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class BenchmarkSpec:
    """A benchmark: tasks, how to build the adapter, default config, and the data loader.

    ``make_adapter(config) -> ModelAdapter`` may read only ``config.max_length`` and
    ``config.feature_batch_size`` (adapters are memoised on those); ``load(task, split) ->
    (inputs, labels)`` (default :func:`bmm_jax.data.load`).

    ``build``: optional ``build(spec, *, cache_dir, seed, config, progress, tasks) -> Benchmark``
    for benchmarks whose experts are not fine-tuned here (e.g. downloaded checkpoints,
    :mod:`bmm_jax.presets.clip8`); :func:`bmm_jax.experts.build_experts` then delegates to it.
    ``protocol``: JSON-able description of what the benchmark reads (paths, options): an
    experiment's run directory is tied to it.
    """
    name: str
    tasks: tuple[str, ...]
    make_adapter: Callable[[FinetuneConfig], ModelAdapter]
    config: FinetuneConfig = FinetuneConfig()
    load: LoadFn | None = None
    build: Callable[..., "Benchmark"] | None = None
    protocol: Any = None


class Benchmark(NamedTuple):
    """Built experts of one benchmark and seed.

    Attributes:
      name: benchmark name.
      tasks: task names (order of ``expert_params``).
      adapter: the model adapter (``adapter.params`` is θ0).
      base_params: θ0, the pretrained encoder params.
      expert_params: list of K expert param trees (structure of ``base_params``), task order.
      heads: ``task -> expert head`` (the frozen probe, or the LP-FT head; use it for merged models).
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


__all__ = ["FinetuneConfig", "BenchmarkSpec", "Benchmark", "HEAD_MODES", "LoadFn"]
