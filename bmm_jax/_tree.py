"""Pytree helpers shared by the whole library: path names and input validation.

Paths are written ``"encoder/layer/0/attention/self/query/kernel"``: the keys of the nested
dict (or the attribute / index names of other containers) joined by ``/``.
"""
from __future__ import annotations

import weakref
from typing import Any, Sequence

import jax
import numpy as np

PyTree = Any


def key_name(key) -> str:
    """The plain name of one ``jax.tree_util`` path entry."""
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def path_str(path) -> str:
    """``jax.tree_util`` key path -> ``"a/b/0/kernel"``."""
    return "/".join(key_name(k) for k in path)


def leaves_with_paths(tree: PyTree) -> list[tuple[str, Any]]:
    """All leaves of ``tree`` as ``(path string, leaf)``, in ``tree_flatten`` order."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [(path_str(p), leaf) for p, leaf in flat]


def _describe_structure_difference(a: PyTree, b: PyTree) -> str:
    pa = {p for p, _ in leaves_with_paths(a)}
    pb = {p for p, _ in leaves_with_paths(b)}
    missing = sorted(pa - pb)
    extra = sorted(pb - pa)
    parts = []
    if missing:
        parts.append(f"missing leaves {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if extra:
        parts.append(f"unexpected leaves {extra[:5]}{' ...' if len(extra) > 5 else ''}")
    return "; ".join(parts) or "different container types or ordering"


def check_experts(base: PyTree, experts: Sequence[PyTree], *, min_experts: int = 2,
                  check_finite: bool = True, names: Sequence[str] | None = None) -> list[PyTree]:
    """Validate ``experts`` against ``base`` and return them as a list.

    Raises ``TypeError`` for a wrong container / dtype mismatch and ``ValueError`` for a structure
    or shape mismatch, non-finite values or too few experts; every message names the leaf path.
    ``names`` (optional, one per tree) replaces ``"expert {i}"`` in messages (e.g. ``["anchor"]``).
    """
    if isinstance(experts, dict) or not isinstance(experts, (list, tuple)):
        raise TypeError(
            "experts must be a list or tuple of parameter pytrees (one per task), got "
            f"{type(experts).__name__}")
    experts = list(experts)
    if len(experts) < min_experts:
        raise ValueError(f"need at least {min_experts} experts to merge, got {len(experts)}")
    base_struct = jax.tree_util.tree_structure(base)
    base_leaves = leaves_with_paths(base)
    if not base_leaves:
        raise ValueError("base has no array leaves")
    if check_finite:
        _check_finite("base", base_leaves)
    for i, expert in enumerate(experts):
        who = names[i] if names is not None else f"expert {i}"
        if jax.tree_util.tree_structure(expert) != base_struct:
            raise ValueError(
                f"{who} has a different tree structure from base: "
                f"{_describe_structure_difference(base, expert)}")
        for (path, b), (_, e) in zip(base_leaves, leaves_with_paths(expert)):
            bshape, eshape = np.shape(b), np.shape(e)
            if bshape != eshape:
                raise ValueError(f"{who} leaf '{path}': shape {eshape} != base shape {bshape}")
            bd, ed = _dtype(b), _dtype(e)
            if bd != ed:
                raise TypeError(f"{who} leaf '{path}': dtype {ed} != base dtype {bd}")
        if check_finite:
            _check_finite(who, leaves_with_paths(expert))
    return experts


def _dtype(x):
    return np.dtype(getattr(x, "dtype", np.asarray(x).dtype))


# jax.Arrays are immutable: one verified finite stays finite, so re-validating the same experts
# (merge -> its anchor -> its Grams each call check_experts) is skipped. id -> weakref; an entry
# leaves with its array (the weakref callback), so a recycled id can never match a dead array.
_VERIFIED_FINITE: dict[int, Any] = {}


def _forget(ref, key: int) -> None:
    if _VERIFIED_FINITE.get(key) is ref:
        del _VERIFIED_FINITE[key]


def _remember_finite(leaf) -> None:
    key = id(leaf)
    _VERIFIED_FINITE[key] = weakref.ref(leaf, lambda r, key=key: _forget(r, key))


def _known_finite(leaf) -> bool:
    ref = _VERIFIED_FINITE.get(id(leaf))
    return ref is not None and ref() is leaf


def _finite(leaf) -> bool:
    """All values finite: ``min`` and ``max`` propagate NaN and expose +-Inf (two SIMD reductions,
    no boolean temporary, no compilation; 0.06 s for an 87.5 M-parameter model)."""
    dt = _dtype(leaf)
    arr = np.asarray(leaf, dtype=np.float32 if dt.itemsize < 4 else dt)
    return arr.size == 0 or bool(np.isfinite(arr.min()) and np.isfinite(arr.max()))


def _is_float(dt) -> bool:
    return bool(np.issubdtype(dt, np.floating) or dt.name == "bfloat16")


def _check_finite(who: str, leaves: list[tuple[str, Any]]) -> None:
    """Raise ``ValueError`` naming the first leaf with NaN/Inf values.

    jax.Array leaves found finite are remembered (they are immutable) and not scanned again; numpy
    leaves (mutable) are scanned every time.
    """
    for path, leaf in leaves:
        if not _is_float(_dtype(leaf)):
            continue
        cacheable = isinstance(leaf, jax.Array) and not isinstance(leaf, jax.core.Tracer)
        if cacheable and _known_finite(leaf):
            continue
        if _finite(leaf):
            if cacheable:
                _remember_finite(leaf)
            continue
        arr = np.asarray(leaf, dtype=np.float32)
        n_nan = int(np.isnan(arr).sum())
        n_inf = int(np.isinf(arr).sum())
        raise ValueError(f"{who} leaf '{path}' has non-finite values ({n_nan} NaN, {n_inf} Inf)")
