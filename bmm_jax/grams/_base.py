"""The Gram container shared by every estimator.

A :class:`Grams` maps a regressed module's path to its per-task Gram matrices, an array
``[K, d_in, d_in]`` (float32, symmetric PSD, in the module's 2-D ``[d_in, d_out]`` view).
Modules of one input group (q/k/v) share one stored array. Estimators may store factors instead
of dense matrices (the data-free Grams keep ``F_k = T_k / ||T_k||_F`` with ``G_k = F_k F_k^T``);
:meth:`Grams.factor` exposes them so the solver can avoid materialising ``[K, d, d]``.

``Grams`` is a pytree: its arrays (dense Grams, stored factors, the source leaves of data-free
factors, token counts) are children and the key map / kind are static, so it passes through
``jax.jit``, ``vmap`` and ``lax.scan`` like any other argument.
"""
from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Callable, Iterator

import jax
import jax.numpy as jnp

from bmm_jax.labels import Label


@functools.partial(jax.jit, static_argnums=(0,))
def source_factors(view: tuple, base_leaf, expert_leaves) -> jax.Array:
    """``F_k = T_k / ||T_k||_F`` (zero where ``T_k = 0``) of one module from its leaves, float32
    ``[K, d_in, d_out]``; ``view = (layout, d_in, d_out)`` is static (one compilation per shape)."""
    layout, d_in, d_out = view
    label = Label(path="", regressed=True, layout=layout, d_in=d_in, d_out=d_out)
    b = base_leaf.astype(jnp.float32)
    t = label.to_matrix(jnp.stack([e.astype(jnp.float32) - b for e in expert_leaves]))
    sq = jnp.sum(t * t, axis=(-2, -1), keepdims=True)
    safe = jnp.where(sq > 0, sq, 1.0)
    return jnp.where(sq > 0, t / jnp.sqrt(safe), 0.0)


class Grams(Mapping):
    """Mapping ``module path -> [K, d_in, d_in]`` per-task Gram matrices.

    Args:
      dense: ``{key: array [K, d, d]}`` of stored dense Grams.
      key_of: ``{module path: key}``; several modules may share one key (input groups).
      factors: optional ``{key: array [K, d, r]}`` with ``G_k = F_k F_k^T`` (a zero-argument
        callable returning the array is accepted too; it is evaluated when the Grams are flattened
        as a pytree); dense matrices for those keys are built on access.
      kind: ``"activations" | "data_free" | "hybrid"`` (informational).
      num_tokens: optional ``{key: count}`` of the activation rows behind each Gram.
      sources: optional ``{key: (base_leaf, expert_leaves)}`` with ``views {key: (layout, d_in,
        d_out)}``: factors that are the normalised task kernels ``F_k = T_k / ||T_k||_F`` of exactly
        these leaves (the data-free Grams), computed on demand; a solver that forms ``T_k`` anyway
        may derive ``F_k`` itself (:meth:`normalizes`).
    """

    def __init__(self, dense: dict, key_of: dict[str, str], *, factors: dict | None = None,
                 kind: str = "activations", num_tokens: dict | None = None, sources: dict | None = None,
                 views: dict | None = None):
        self._dense = dict(dense)
        self._factors = dict(factors or {})
        self._sources = {k: (b, tuple(es)) for k, (b, es) in (sources or {}).items()}
        self._views = dict(views or {})
        self.key_of = dict(key_of)
        self.kind = kind
        self.num_tokens = dict(num_tokens or {})
        missing = [k for k in self._sources if k not in self._views and k not in self._factors]
        if missing:
            raise ValueError(f"Gram sources {missing[:3]} need views (layout, d_in, d_out)")
        for path, key in self.key_of.items():
            if key not in self._dense and key not in self._factors and key not in self._sources:
                raise ValueError(f"Gram key {key!r} of module '{path}' has no stored matrix")

    # ----------------------------------------------------------------- mapping
    def __getitem__(self, path: str):
        key = self.key_of[path]
        if key not in self._dense:
            f = self.factor(path)
            return jnp.einsum("kir,kjr->kij", f, f, precision="highest")
        return self._dense[key]

    def factor(self, path: str):
        """``[K, d_in, r]`` factor with ``G = F F^T`` if stored as factors, else ``None``."""
        key = self.key_of[path]
        f = self._factors.get(key)
        if f is not None:
            return f() if callable(f) else f
        if key in self._sources:
            b, es = self._sources[key]
            return source_factors(self._views[key], b, list(es))
        return None

    def normalizes(self, path: str, base_leaf, expert_leaves) -> bool:
        """True if the factor of ``path`` is ``T_k / ||T_k||_F`` of exactly these leaves (same
        objects, in order): ``F`` can then be formed from the task kernels in the solver's kernel."""
        src = self._sources.get(self.key_of.get(path))
        if src is None:
            return False
        b, es = src
        return (b is base_leaf and len(es) == len(expert_leaves)
                and all(x is y for x, y in zip(es, expert_leaves)))

    def from_other_leaves(self, path: str, base_leaf, expert_leaves) -> bool:
        """True for data-free factors built from leaves other than these (another model's experts)."""
        key = self.key_of.get(path)
        return key in self._sources and not self.normalizes(path, base_leaf, expert_leaves)

    def __iter__(self) -> Iterator[str]:
        return iter(self.key_of)

    def __len__(self) -> int:
        return len(self.key_of)

    def arrays(self) -> list:
        """Every stored array (dense Grams and stored factors; not the data-free sources)."""
        out = list(self._dense.values())
        out += [f for f in self._factors.values() if not callable(f)]
        return out

    @property
    def num_experts(self) -> int:
        for v in list(self._dense.values()):
            return int(v.shape[0])
        for key, (b, es) in self._sources.items():
            return len(es)
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

    # ----------------------------------------------------------------- pytree
    def _flatten(self):
        factors = {k: (f() if callable(f) else f) for k, f in self._factors.items()}
        children = (self._dense, factors, self._sources, self.num_tokens)
        aux = (tuple(sorted(self.key_of.items())), self.kind, tuple(sorted(self._views.items())))
        return children, aux

    @classmethod
    def _unflatten(cls, aux, children):
        key_of, kind, views = aux
        dense, factors, sources, num_tokens = children
        obj = cls.__new__(cls)
        obj._dense, obj._factors, obj._sources = dict(dense), dict(factors), dict(sources)
        obj._views, obj.key_of, obj.kind, obj.num_tokens = dict(views), dict(key_of), kind, dict(num_tokens)
        return obj


jax.tree_util.register_pytree_node(Grams, Grams._flatten, Grams._unflatten)
