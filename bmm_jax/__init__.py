"""bmm_jax: Bayesian Model Merging in JAX.

Fuse K fine-tuned experts into one model, module by module, with a closed-form Bayesian regression
whose prior is centred on an anchor merge (method.md). Main entry points:

* :func:`task_vectors` -- ``theta_k - theta_0`` with a leading expert axis;
* :mod:`bmm_jax.anchors` -- existing merges (average, TA, TIES, TSV-M, Iso-C/CTS, WUDI, RegMean);
* :mod:`bmm_jax.grams` -- Gram estimators (``data_free``, ``activations``, ``hybrid``);
* :func:`solve_anchored` -- the per-module closed form;
* :func:`merge` / :func:`prepare` -- the whole pytree (and its fast re-solve path);
* :func:`search` -- module-wise Bayesian optimisation of the hyperparameters with Vizier;
* :mod:`bmm_jax.labels` -- the label tree deciding what is regressed.
"""
from __future__ import annotations

import importlib

from bmm_jax import anchors, grams, labels
from bmm_jax.labels import build_labels, format_label_table
from bmm_jax.diagnostics import MergeDiagnostics, ModuleDiagnostics
from bmm_jax.merging import MergeResult, merge
from bmm_jax.prepared import Prepared, prepare
from bmm_jax.solve import solve_anchored
from bmm_jax.validation import validate
from bmm_jax.task_vectors import add_task_vector, task_vectors

__version__ = "0.1.0"

_LAZY = ("search", "data", "models", "evaluate", "experts", "checkpoint", "experiment", "memory", "streaming",
         "distributed")


def __getattr__(name):           # heavy subpackages (Vizier, transformers, TFDS) load on first use
    if name == "merge_checkpoints":      # streaming file-to-file merge (safetensors / orbax)
        from bmm_jax.streaming import merge_checkpoints
        return merge_checkpoints
    if name in _LAZY:
        return importlib.import_module(f"bmm_jax.{name}")
    raise AttributeError(f"module 'bmm_jax' has no attribute {name!r}")


__all__ = ["task_vectors", "add_task_vector", "solve_anchored", "merge", "prepare", "MergeResult",
           "Prepared", "MergeDiagnostics", "ModuleDiagnostics", "validate", "anchors", "grams", "labels", "build_labels", "format_label_table", "search"]
