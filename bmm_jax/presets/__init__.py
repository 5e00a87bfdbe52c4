"""Benchmark presets for data and checkpoints the user provides (nothing here downloads):
:mod:`bmm_jax.presets.clip8` (the eight-task CLIP ViT benchmark of task arithmetic)."""
