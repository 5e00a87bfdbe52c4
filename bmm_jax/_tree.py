"""Pytree helpers shared by the whole library: path names and input validation.

Paths are written ``"encoder/layer/0/attention/self/query/kernel"``: the keys of the nested
dict (or the attribute / index names of other containers) joined by ``/``.
"""
from __future__ import annotations

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


def _check_finite(who: str, leaves: list[tuple[str, Any]]) -> None:
    for path, leaf in leaves:
        dt = _dtype(leaf)
        if not (np.issubdtype(dt, np.floating) or dt.name == "bfloat16"):
            continue
        arr = np.asarray(leaf, dtype=np.float32 if dt.itemsize < 4 else dt)
        if not np.all(np.isfinite(arr)):
            n_nan = int(np.isnan(arr).sum())
            n_inf = int(np.isinf(arr).sum())
            raise ValueError(f"{who} leaf '{path}' has non-finite values ({n_nan} NaN, {n_inf} Inf)")
