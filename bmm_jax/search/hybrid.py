"""Searching the hybrid-Gram mix ``beta`` (method.md §3.3) with the outer loop.

``bmm_jax.prepare`` factors every module for *fixed* Grams, so its ``Prepared.params`` has no
``beta``: a new ``beta`` changes every ``S = sum_k w_k G_k(beta)`` and with it every eigen
factorisation. :class:`HybridPrepared` is the honest way to search ``beta``: its
``params(hparams, *, beta, anchor_scale=1.0)`` re-mixes the Grams
(:func:`bmm_jax.grams.hybrid.hybrid`) and re-runs :func:`bmm_jax.prepare` whenever ``beta``
changes, keeping the last ``cache_size`` factorisations. A trial with a new ``beta`` therefore
costs one eigendecomposition per module (seconds for a MiniLM, not the one-matmul fast path);
trials that only change ``rho`` / ``s`` at a cached ``beta`` are fast-path re-solves.

Use it as ``search(prep=HybridPrepared(...), config=SearchConfig(extras=("beta",), ...))``.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Mapping, Sequence

from bmm_jax._tree import PyTree, check_experts
from bmm_jax.grams._base import Grams
from bmm_jax.labels import build_labels


class HybridPrepared:
    """BMM with hybrid Grams ``G_k(beta)`` mixed from data and data-free Grams, per ``beta``.

    Args:
      base, experts, anchor: as in :func:`bmm_jax.prepare` (the anchor is resolved once: a name
        such as ``"wudi"`` is computed here, not per ``beta``).
      data_grams: few-shot activation Grams (:class:`bmm_jax.grams.Grams` or ``{path: [K, d, d]}``).
      free_grams: data-free Grams (default :func:`bmm_jax.grams.data_free.data_free`).
      labels: label tree (default ``build_labels(base)``).
      carry, prior, weights, devices: passed to :func:`bmm_jax.prepare`.
      cache_size: how many ``beta`` factorisations to keep (least recently used dropped).

    Attributes:
      labels: the label tree (what :func:`bmm_jax.search.search` reads).
      num_factorizations: how many times :func:`bmm_jax.prepare` ran.
    """

    def __init__(self, base: PyTree, experts: Sequence[PyTree], anchor, data_grams, free_grams=None,
                 labels: PyTree | None = None, *, carry: str = "anchor", prior: str = "isotropic",
                 weights=None, devices=None, cache_size: int = 2):
        from bmm_jax.merging import resolve_anchor
        experts = check_experts(base, experts)
        self.base, self.experts = base, experts
        self.labels = build_labels(base) if labels is None else labels
        self.anchor = resolve_anchor(anchor, base, experts, grams=data_grams, labels=self.labels)
        if free_grams is None:
            from bmm_jax.grams.data_free import data_free
            free_grams = data_free(base, experts, self.labels)
        self.data_grams = _as_grams(data_grams, "data_grams")
        self.free_grams = _as_grams(free_grams, "free_grams")
        self._kw = dict(carry=carry, prior=prior, weights=weights, devices=devices)
        if int(cache_size) < 1:
            raise ValueError(f"cache_size must be >= 1, got {cache_size}")
        self._cache_size = int(cache_size)
        self._cache: OrderedDict[float, object] = OrderedDict()
        self.num_factorizations = 0

    def prepared(self, beta: float):
        """The :class:`bmm_jax.Prepared` of the hybrid Grams at ``beta`` (cached)."""
        beta = _check_beta(beta)
        if beta in self._cache:
            self._cache.move_to_end(beta)
            return self._cache[beta]
        from bmm_jax.grams.hybrid import hybrid
        from bmm_jax.merging import prepare
        grams = hybrid(self.data_grams, self.free_grams, beta)
        prep = prepare(self.base, self.experts, self.anchor, grams, labels=self.labels, **self._kw)
        self.num_factorizations += 1
        self._cache[beta] = prep
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return prep

    def params(self, hparams: Mapping, *, beta: float = 0.5, anchor_scale: float = 1.0) -> PyTree:
        """Merged params for ``hparams`` (any form :func:`bmm_jax.merge` accepts) with hybrid Grams
        at ``beta`` in [0, 1] and the anchor task vector scaled by ``anchor_scale``."""
        return self.prepared(beta).params(hparams, anchor_scale=anchor_scale)

    def __repr__(self) -> str:
        return (f"HybridPrepared({len(self.experts)} experts, cached betas {list(self._cache)}, "
                f"{self.num_factorizations} factorisations)")


def _check_beta(beta) -> float:
    try:
        b = float(beta)
    except (TypeError, ValueError):
        raise TypeError(f"beta must be a number in [0, 1], got {beta!r}") from None
    if not (math.isfinite(b) and 0.0 <= b <= 1.0):
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    return b


def _as_grams(g, what: str) -> Grams:
    if isinstance(g, Grams):
        return g
    if isinstance(g, Mapping):
        return Grams(dict(g), {p: p for p in g}, kind=what)
    raise TypeError(f"{what} must be a bmm_jax.grams.Grams or a {{module path: [K, d, d]}} dict, "
                    f"got {type(g).__name__}")


__all__ = ["HybridPrepared"]
