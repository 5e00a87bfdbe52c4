"""Anchors and baselines (method.md §6): existing merges as pure functions over pytrees.

Every anchor is called ``anchor(base, experts, **options)`` and returns params with the structure
and leaf dtypes of ``base``; inputs are validated by :func:`bmm_jax._tree.check_experts` (K >= 2
experts, matching structure / shapes / dtypes, finite values). Per-module methods act on the
regressed modules of the label tree (:func:`bmm_jax.labels.build_labels`, overridable with
``labels=``) in their ``[d_in, d_out]`` view, so HF Flax BERT / CLIP / GPT-2 params work as they
are.

=================  ==========================================================================
``average``        ``theta_0 + mean_k tau_k``
``task_arithmetic`` ``theta_0 + scale * sum_k tau_k`` (scale 0.3)
``ties``           trim (per leaf, per task, density 0.2) / elect sign / disjoint mean
``tsv``            TSV-M: per-task top singular triplets, orthogonalised, rebuilt
``iso_c``          flat spectrum of ``sum_k T_k``
``iso_cts``        common + task-specific subspaces, flat spectrum (common fraction 0.8)
``wudi``           WUDI-Merging (Adam, lr 1e-5, 300 steps; ``exact=True`` closed form)
``regmean``        RegMean with activation Grams (``grams=``, alpha 0.95)
=================  ==========================================================================
"""
from __future__ import annotations

from typing import Callable

from bmm_jax.anchors.iso import iso_c, iso_cts
from bmm_jax.anchors.regmean import regmean
from bmm_jax.anchors.simple import average, task_arithmetic
from bmm_jax.anchors.ties import ties
from bmm_jax.anchors.tsv import tsv
from bmm_jax.anchors.wudi import wudi

ANCHORS: dict[str, Callable] = {
    "average": average,
    "task_arithmetic": task_arithmetic,
    "ties": ties,
    "tsv": tsv,
    "iso_c": iso_c,
    "iso_cts": iso_cts,
    "wudi": wudi,
    "regmean": regmean,
}


def get(name: str) -> Callable:
    """The anchor function called ``name`` (a key of :data:`ANCHORS`)."""
    try:
        return ANCHORS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown anchor method {name!r}; known: {', '.join(ANCHORS)}") from None


__all__ = ["ANCHORS", "get", "average", "task_arithmetic", "ties", "tsv", "iso_c", "iso_cts",
           "wudi", "regmean"]
