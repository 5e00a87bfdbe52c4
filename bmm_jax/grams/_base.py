"""The Gram container shared by every estimator.

A :class:`Grams` maps a regressed module's path to its per-task Gram matrices, an array
``[K, d_in, d_in]`` (float32, symmetric PSD, in the module's 2-D ``[d_in, d_out]`` view).
Modules of one input group (q/k/v) share one stored array. Estimators may store factors instead
of dense matrices (the data-free Grams keep ``F_k = T_k / ||T_k||_F`` with ``G_k = F_k F_k^T``);
:meth:`Grams.factor` exposes them so the solver can avoid materialising ``[K, d, d]``.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Callable, Iterator

import jax.numpy as jnp


class Grams(Mapping):
    """Mapping ``module path -> [K, d_in, d_in]`` per-task Gram matrices.

    Args:
      dense: ``{key: array [K, d, d]}`` of stored dense Grams.
      key_of: ``{module path: key}``; several modules may share one key (input groups).
      factors: optional ``{key: array [K, d, r]}`` (or a zero-argument callable returning it, so
        that a factor can be computed on demand instead of stored) with ``G_k = F_k F_k^T``;
        dense matrices for those keys are built lazily on access.
      kind: ``"activations" | "data_free" | "hybrid"`` (informational).
      sources: optional ``{key: (base_leaf, expert_leaves)}`` for factors that are the normalised
        task kernels ``F_k = T_k / ||T_k||_F`` of exactly these leaves (the data-free Grams): a
        solver that forms ``T_k`` anyway may then derive ``F_k`` itself (:meth:`normalizes`).
    """

    def __init__(self, dense: dict, key_of: dict[str, str], *, factors: dict | None = None,
                 kind: str = "activations", num_tokens: dict | None = None, sources: dict | None = None):
        self._dense = dict(dense)
        self._factors = dict(factors or {})
        self._sources = dict(sources or {})
        self.key_of = dict(key_of)
        self.kind = kind
        self.num_tokens = dict(num_tokens or {})
        for path, key in self.key_of.items():
            if key not in self._dense and key not in self._factors:
                raise ValueError(f"Gram key {key!r} of module '{path}' has no stored matrix")

    def __getitem__(self, path: str):
        key = self.key_of[path]
        if key not in self._dense:
            f = self.factor(path)
            return jnp.einsum("kir,kjr->kij", f, f, precision="highest")
        return self._dense[key]

    def factor(self, path: str):
        """``[K, d_in, r]`` factor with ``G = F F^T`` if stored as factors, else ``None``."""
        f = self._factors.get(self.key_of[path])
        return f() if callable(f) else f

    def normalizes(self, path: str, base_leaf, expert_leaves) -> bool:
        """True if the factor of ``path`` is ``T_k / ||T_k||_F`` of exactly these leaves (same
        objects, in order): ``F`` can then be formed from the task kernels in the solver's kernel."""
        src = self._sources.get(self.key_of.get(path))
        if src is None:
            return False
        b, es = src
        return (b is base_leaf and len(es) == len(expert_leaves)
                and all(x is y for x, y in zip(es, expert_leaves)))

    def __iter__(self) -> Iterator[str]:
        return iter(self.key_of)

    def __len__(self) -> int:
        return len(self.key_of)

    @property
    def num_experts(self) -> int:
        for v in list(self._dense.values()):
            return int(v.shape[0])
        for path in self.key_of:
            return int(self.factor(path).shape[0])
        return 0

    def map(self, fn: Callable, kind: str | None = None) -> "Grams":
        """Apply ``fn([K,d,d]) -> [K,d,d]`` to every stored Gram (materialising factors)."""
        keys = set(self.key_of.values())
        dense = {}
        for key in keys:
            path = next(p for p, k in self.key_of.items() if k == key)
            dense[key] = fn(self[path])
        return Grams(dense, self.key_of, kind=kind or self.kind, num_tokens=self.num_tokens)

    def __repr__(self) -> str:
        return (f"Grams(kind={self.kind!r}, modules={len(self.key_of)}, "
                f"stored={len(set(self.key_of.values()))}, K={self.num_experts})")
