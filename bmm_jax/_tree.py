"""Pytree helpers shared by the whole library: path names and input validation.

Paths are written ``"encoder/layer/0/attention/self/query/kernel"``: the keys of the nested
dict (or the attribute / index names of other containers) joined by ``/``.
"""
from __future__ import annotations

import weakref
from typing import Any, Sequence

import jax
import jax.numpy as jnp
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


def staging() -> bool:
    """True while a staging transformation (``jit``, ``lax.scan`` / ``cond`` bodies, ``eval_shape``)
    traces the current call: even concrete arrays then only yield tracers, so no value can be read."""
    return isinstance(jnp.zeros(()), jax.core.Tracer)


def is_traced(tree: PyTree) -> bool:
    """True if any leaf of ``tree`` is a JAX tracer (``jit``/``vmap``/``grad``/``scan`` inputs) or a
    staging transformation is active (:func:`staging`): value checks are then skipped."""
    return staging() or any(isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves(tree))


def check_experts(base: PyTree, experts: Sequence[PyTree], *, min_experts: int = 2,
                  check_finite: bool = True, names: Sequence[str] | None = None) -> list[PyTree]:
    """Validate ``experts`` against ``base`` and return them as a list.

    Structure, shape and dtype checks use static information only (``.shape`` / ``.dtype``), so they
    also run, and raise, while a transformation traces the call. The NaN/Inf check
    (``check_finite``) runs only on concrete (eager) inputs, on the arrays' own devices: one fused
    reduction per tree and one scalar read by the host (:func:`all_finite`); numpy leaves are
    scanned on the host, where they already are. Traced inputs skip it.

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
    for path, b in base_leaves:
        _check_array_like("base", path, b)
    if check_finite:
        check_tree_finite("base", base_leaves)
    for i, expert in enumerate(experts):
        who = names[i] if names is not None else f"expert {i}"
        if jax.tree_util.tree_structure(expert) != base_struct:
            raise ValueError(
                f"{who} has a different tree structure from base: "
                f"{_describe_structure_difference(base, expert)}")
        expert_leaves = leaves_with_paths(expert)
        for (path, b), (_, e) in zip(base_leaves, expert_leaves):
            _check_array_like(who, path, e)
            bshape, eshape = np.shape(b), np.shape(e)
            if bshape != eshape:
                raise ValueError(f"{who} leaf '{path}': shape {eshape} != base shape {bshape}")
            bd, ed = _dtype(b), _dtype(e)
            if bd != ed:
                raise TypeError(f"{who} leaf '{path}': dtype {ed} != base dtype {bd}")
        if check_finite:
            check_tree_finite(who, expert_leaves)
    return experts


def _check_array_like(who: str, path: str, leaf) -> None:
    if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
        if isinstance(leaf, (int, float, complex, bool, np.generic)):
            return
        raise TypeError(f"{who} leaf '{path}' is a {type(leaf).__name__}, not an array")
    try:
        np.dtype(leaf.dtype)
    except TypeError:
        raise TypeError(f"{who} leaf '{path}' has dtype {leaf.dtype!r}, not a numeric dtype") from None
    if np.dtype(leaf.dtype).kind == "c":
        raise TypeError(f"{who} leaf '{path}' has complex dtype {leaf.dtype}: merging is defined on real "
                        "parameters")
    if np.dtype(leaf.dtype).kind not in "biuf" and np.dtype(leaf.dtype).name != "bfloat16":
        raise TypeError(f"{who} leaf '{path}' has dtype {leaf.dtype}, not a numeric dtype")


def _dtype(x):
    dt = getattr(x, "dtype", None)
    return np.dtype(dt) if dt is not None else np.result_type(x)


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


def _is_float(dt) -> bool:
    return bool(np.issubdtype(dt, np.floating) or dt.name == "bfloat16")


@jax.jit
def _device_all_finite(leaves):
    """One boolean: every value of every leaf finite (min/max propagate NaN and expose Inf)."""
    ok = jnp.asarray(True)
    for x in leaves:
        x = x.astype(jnp.float32) if x.dtype.itemsize < 4 else x
        ok = ok & jnp.isfinite(jnp.min(x)) & jnp.isfinite(jnp.max(x))
    return ok


def _host_finite(arr) -> bool:
    dt = _dtype(arr)
    arr = np.asarray(arr, dtype=np.float32 if dt.itemsize < 4 else dt)
    return arr.size == 0 or bool(np.isfinite(arr.min()) and np.isfinite(arr.max()))


def all_finite(leaves: Sequence) -> bool:
    """True if every floating leaf is free of NaN/Inf.

    jax.Array leaves are reduced on their own devices (respecting their shardings) in one jitted
    call, and one boolean is read by the host (an explicit ``jax.device_get``); numpy leaves are
    scanned on the host. Tracers are skipped. Arrays found finite are remembered (immutable).
    """
    if staging():
        return True
    dev, host = [], []
    for leaf in leaves:
        if isinstance(leaf, jax.core.Tracer) or not _is_float(_dtype(leaf)):
            continue
        if isinstance(leaf, jax.Array):
            if not _known_finite(leaf) and leaf.size:
                dev.append(leaf)
        else:
            host.append(leaf)
    if not all(_host_finite(x) for x in host):
        return False
    if dev:
        if not bool(jax.device_get(_device_all_finite(dev))):
            return False
        for leaf in dev:
            _remember_finite(leaf)
    return True


def check_tree_finite(who: str, leaves: list[tuple[str, Any]]) -> None:
    """Raise ``ValueError`` naming the first leaf with NaN/Inf values (eager inputs only).

    The check itself is :func:`all_finite` (one device reduction, one scalar); only when it fails
    are the leaves examined one by one to name the culprit.
    """
    if all_finite([leaf for _, leaf in leaves]):
        return
    for path, leaf in leaves:
        if isinstance(leaf, jax.core.Tracer) or not _is_float(_dtype(leaf)):
            continue
        if not all_finite([leaf]):
            arr = np.asarray(jax.device_get(leaf), dtype=np.float32)
            n_nan = int(np.isnan(arr).sum())
            n_inf = int(np.isinf(arr).sum())
            raise ValueError(f"{who} leaf '{path}' has non-finite values ({n_nan} NaN, {n_inf} Inf)")
    raise ValueError(f"{who} has non-finite values")


_check_finite = check_tree_finite          # old private name, kept for internal callers
