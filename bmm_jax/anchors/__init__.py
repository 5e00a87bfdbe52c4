"""Anchors and baselines (method.md §6): existing merges as pure functions over pytrees.

Every anchor is called ``anchor(base, experts, *, labels=None, anchor_scale=..., **options)``:
``base`` and ``experts`` (K >= 2 pytrees) positionally, every option keyword-only (a misplaced
positional argument is a ``TypeError`` naming the options). It returns params with the structure
and leaf dtypes of ``base``; ``anchor_scale`` is the anchor's own coefficient ``theta_0 +
anchor_scale * merged`` in every anchor (the old name ``scale=`` still works, with a
``DeprecationWarning``; the assembly scale of BMM is the hyper-parameter ``"scale"``).

Pure and traceable: each anchor runs eagerly and inside ``jax.jit``, ``jax.vmap`` (e.g. over a
stacked batch of expert sets, or over ``anchor_scale``) and ``lax.scan``. Hyper-parameters
(``anchor_scale``, ``alpha``, ``lr``, ``rcond``) may be Python numbers or (traced) JAX scalars;
options that change shapes or control flow (``density``, ``trim``, ``common_fraction``,
``modules``, ``steps``, ``exact``, ``labels``) are static. Inputs are validated by
:func:`bmm_jax._tree.check_experts` (static checks at trace time, NaN/Inf only eagerly) and
:func:`bmm_jax.labels.check_labels`.

Per-module methods act on 2-D views ``[d_in, d_out]`` of the label tree's regressed modules
(:func:`bmm_jax.labels.build_labels`, overridable with ``labels=``), so HF Flax BERT / CLIP / GPT-2
params work as they are; TSV-M and Iso-C/CTS merge every 2-D leaf by default, as their reference
code does (``modules="labels"``: regressed modules only).

=================== ==========================================================================
``average``         ``theta_0 + mean_k tau_k``
``task_arithmetic`` ``theta_0 + anchor_scale * sum_k tau_k`` (anchor_scale 0.3)
``ties``            trim (whole model per task, density 0.2) / elect sign / disjoint mean
``tsv``             TSV-M: per-task top singular triplets, orthogonalised, rebuilt
``iso_c``           flat spectrum of ``sum_k T_k``
``iso_cts``         common + task-specific subspaces, flat spectrum (common fraction 0.8)
``wudi``            WUDI-Merging (Adam, lr 1e-5, 300 steps; ``exact=True`` stable closed form)
``regmean``         RegMean with activation Grams (``grams=``, alpha 0.95)
=================== ==========================================================================
"""
from __future__ import annotations

import inspect
from typing import Callable

from bmm_jax.anchors.iso import iso_c, iso_cts
from bmm_jax.anchors.regmean import regmean
from bmm_jax.anchors.simple import LINEAR, LinearAnchor, average, task_arithmetic
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


def default_anchor_scale(name: str) -> float:
    """The default ``anchor_scale`` of the anchor called ``name`` (0.3 for task arithmetic, else
    1.0)."""
    return float(inspect.signature(get(name)).parameters["anchor_scale"].default)


__all__ = ["ANCHORS", "LinearAnchor", "LINEAR", "get", "default_anchor_scale", "average", "task_arithmetic", "ties", "tsv",
           "iso_c", "iso_cts", "wudi", "regmean"]
