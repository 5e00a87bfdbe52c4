"""Input validation, apart from the maths (the thin shell around the pure core).

Structure, shape and dtype checks read static information only (``.shape`` / ``.dtype`` / tree
structure), so they run, and raise, also while ``jax.jit`` / ``vmap`` / ``scan`` trace a call.
Value checks (NaN/Inf, Gram symmetry) run only on concrete inputs, on the arrays' own devices: one
fused reduction and one scalar read by the host per check (:func:`bmm_jax._tree.all_finite`).
Every message names the leaf or the argument.
"""
from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from bmm_jax._tree import PyTree, all_finite, check_experts, check_tree_finite, is_traced, leaves_with_paths
from bmm_jax.grams._base import Grams
from bmm_jax.labels import Label, build_labels, check_labels

CARRY = ("anchor", "base", "mean")
PRIORS = ("isotropic", "diagonal")


def check_option(value, name: str, allowed: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; expected one of {tuple(allowed)}")
    return value


def check_regressed_float(lab: Sequence[Label], base: PyTree) -> None:
    """A regressed module must be a floating kernel: integer (quantised) kernels are carried."""
    for l, leaf in zip(lab, jax.tree_util.tree_leaves(base)):
        if l.regressed:
            dt = np.dtype(leaf.dtype) if hasattr(leaf, "dtype") else np.result_type(leaf)
            if not (np.issubdtype(dt, np.floating) or dt.name == "bfloat16"):
                raise ValueError(f"leaf '{l.path}' has dtype {dt}: integer (quantised) kernels cannot be "
                                 "regressed; build_labels carries them (exclude it from the label tree)")


def resolve_labels(labels, base: PyTree) -> tuple[PyTree, list[Label]]:
    """``(label tree, labels in tree order)``: ``build_labels(base)`` by default, else validated."""
    tree = build_labels(base) if labels is None else labels
    lab = check_labels(tree, base)
    check_regressed_float(lab, base)
    return tree, lab


def check_weights(weights, k: int):
    """Task weights ``[K]`` as a float32 array (default ones). Concrete values must be finite,
    ``>= 0`` and not all 0; a traced array is only shape-checked."""
    if weights is None:
        return jnp.ones((k,), jnp.float32)
    if isinstance(weights, (str, bytes)) or isinstance(weights, Mapping):
        raise TypeError(f"weights must be a sequence or array of {k} numbers (one per expert), got "
                        f"{type(weights).__name__}")
    if isinstance(weights, jax.Array):
        if weights.shape != (k,):
            raise ValueError(f"weights must have shape ({k},) (one per expert), got {tuple(weights.shape)}")
        if not jnp.issubdtype(weights.dtype, jnp.floating) and not jnp.issubdtype(weights.dtype, jnp.integer):
            raise TypeError(f"weights must be real numbers, got dtype {weights.dtype}")
        if not isinstance(weights, jax.core.Tracer):
            w = weights.astype(jnp.float32)
            ok = jax.device_get(jnp.all(jnp.isfinite(w)) & jnp.all(w >= 0) & jnp.any(w > 0))
            if not bool(ok):
                raise ValueError("weights must be finite, >= 0 and not all 0")
        return weights.astype(jnp.float32)
    try:
        items = list(weights)
    except TypeError:
        raise TypeError(f"weights must be a sequence or array of {k} numbers, got {type(weights).__name__}") from None
    if any(isinstance(x, jax.core.Tracer) for x in items):
        return jnp.stack([jnp.asarray(x, jnp.float32) for x in items])
    for i, x in enumerate(items):
        if isinstance(x, (str, bytes, bool, np.bool_)) or not np.isscalar(x) and np.ndim(x) != 0:
            raise TypeError(f"weights[{i}] must be a number, got {type(x).__name__} ({x!r})")
    try:
        w = np.asarray(items, np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"weights must be numbers, got {items!r}") from None
    if w.shape != (k,):
        raise ValueError(f"weights must have shape ({k},) (one per expert), got {w.shape}")
    if not np.all(np.isfinite(w)) or np.any(w < 0) or not np.any(w > 0):
        raise ValueError(f"weights must be finite, >= 0 and not all 0, got {w.tolist()}")
    return jnp.asarray(w, jnp.float32)


def module_gram(grams, label: Label, base_leaf, expert_leaves: Sequence, k: int):
    """``(how, gram)`` of one module: ``("data_free", None)``, ``("factor", F [K, d_in, r])`` or
    ``("dense", G [K, d_in, d_in])``; shapes and dtypes checked statically."""
    path = label.path
    if grams is None:
        return "data_free", None
    if isinstance(grams, Grams):
        if path not in grams.key_of:
            raise ValueError(f"grams have no entry for regressed module '{path}' (kind {grams.kind}); "
                             "estimate them with the same label tree")
        if grams.normalizes(path, base_leaf, expert_leaves):
            return "data_free", None
        f = grams.factor(path)
        if f is not None:
            if f.ndim != 3 or tuple(f.shape[:2]) != (k, label.d_in):
                raise ValueError(f"Gram factor of '{path}' has shape {tuple(f.shape)}, expected "
                                 f"[{k}, {label.d_in}, r]")
            _check_float(f, f"Gram factor of '{path}'")
            return "factor", f
        g = grams[path]
    elif isinstance(grams, Mapping):
        if path not in grams:
            raise ValueError(f"grams have no entry for regressed module '{path}'")
        g = grams[path]
    else:
        raise TypeError(f"grams must be a bmm_jax.grams.Grams or a dict {{module path: [K, d_in, d_in]}}, "
                        f"got {type(grams).__name__}")
    g = as_gram_array(g, f"Gram of '{path}'")
    if tuple(g.shape) != (k, label.d_in, label.d_in):
        raise ValueError(f"Gram of '{path}' has shape {tuple(g.shape)}, expected [K, d_in, d_in] = "
                         f"{(k, label.d_in, label.d_in)}")
    _check_float(g, f"Gram of '{path}'")
    return "dense", g


def as_gram_array(g, what: str):
    """``g`` as an array (jax arrays and tracers unchanged); a clear ``TypeError`` for anything else."""
    if hasattr(g, "shape") and hasattr(g, "dtype"):
        return g
    if isinstance(g, (str, bytes, Mapping)) or g is None:
        raise TypeError(f"{what} must be an array [K, d_in, d_in], got {type(g).__name__}")
    try:
        arr = np.asarray(g)
    except (TypeError, ValueError):
        raise TypeError(f"{what} must be an array [K, d_in, d_in], got {type(g).__name__}") from None
    if arr.dtype.kind not in "iuf":
        raise TypeError(f"{what} must be a real array, got {type(g).__name__} of dtype {arr.dtype}")
    return jnp.asarray(arr)


def _check_float(x, what: str) -> None:
    dt = np.dtype(x.dtype)
    if not (np.issubdtype(dt, np.floating) or dt.name == "bfloat16"):
        raise TypeError(f"{what} has dtype {dt}, expected floating")


@jax.jit
def _gram_defects(gs):
    """Per Gram: ``[asymmetry, indefiniteness]`` relative to its largest diagonal entry. Indefinite
    means a negative diagonal entry or a 2x2 principal minor violating ``G_ij^2 <= G_ii G_jj``
    (necessary for PSD; exact PSD would cost an eigendecomposition per task)."""
    out = []
    for g in gs:
        g = g.astype(jnp.float32)
        diag = jnp.diagonal(g, axis1=-2, axis2=-1)
        scale = jnp.maximum(jnp.max(jnp.abs(diag), axis=-1), jnp.finfo(jnp.float32).tiny)[..., None, None]
        asym = jnp.max(jnp.abs(g - jnp.swapaxes(g, -1, -2)) / scale)
        neg = jnp.max(jnp.maximum(-diag, 0.0) / scale[..., 0])
        dpos = jnp.maximum(diag, 0.0)
        bound = jnp.sqrt(dpos[..., :, None] * dpos[..., None, :])
        cs = jnp.max((jnp.abs(g) - bound) / scale)
        out.append(jnp.stack([asym, jnp.maximum(neg, cs)]))
    return jnp.stack(out)


# tolerances of the Gram checks, relative to the largest diagonal entry (float32 accumulations)
GRAM_ASYMMETRY_TOL = 1e-4
GRAM_INDEFINITE_TOL = 1e-3


def check_gram_values(named: Sequence[tuple[str, Any]]) -> None:
    """Eager: NaN/Inf, asymmetric or (clearly) indefinite dense Grams ``[K, d, d]`` are rejected,
    naming the module."""
    named = [(p, g) for p, g in named if not isinstance(g, jax.core.Tracer)]
    if not named:
        return
    check_tree_finite("grams", [(f"[{p!r}]", g) for p, g in named])
    defects = np.asarray(jax.device_get(_gram_defects([jnp.asarray(g) for _, g in named])))
    for (p, _), (asym, indef) in zip(named, defects):
        if asym > GRAM_ASYMMETRY_TOL:
            raise ValueError(f"Gram of '{p}' is not symmetric (max |G - G^T| = {asym:.3g} of its largest "
                             "diagonal entry): Grams are X^T X / n, symmetric PSD")
        if indef > GRAM_INDEFINITE_TOL:
            raise ValueError(f"Gram of '{p}' is not positive semi-definite (a negative diagonal entry or "
                             f"|G_ij| > sqrt(G_ii G_jj), by {indef:.3g} of its largest diagonal entry)")


def validate(base: PyTree, experts: Sequence[PyTree], anchor: PyTree | None = None, grams=None, *,
             labels: PyTree | None = None, weights=None) -> None:
    """Check merge inputs without merging; raises ``ValueError`` / ``TypeError`` naming the leaf.

    Static checks (structure, shapes, dtypes, label tree, Gram shapes) always run, at trace time
    too. Value checks run when the inputs are concrete: NaN/Inf in the base, the experts, the anchor
    and dense Grams (one on-device reduction, one scalar to the host), Gram symmetry and positive
    semi-definiteness (2x2 minors), task weights.
    """
    experts = check_experts(base, experts, check_finite=False)
    _, lab = resolve_labels(labels, base)
    k = len(experts)
    check_weights(weights, k)
    trees = [base] + experts
    if anchor is not None and not isinstance(anchor, str):
        if hasattr(anchor, "params") and not isinstance(anchor, Mapping):
            anchor = anchor.params
        check_experts(base, [anchor], min_experts=1, names=["anchor"], check_finite=False)
        trees.append(anchor)
    base_leaves = jax.tree_util.tree_leaves(base)
    expert_leaves = [jax.tree_util.tree_leaves(e) for e in experts]
    dense = []
    if grams is not None:
        seen = set()
        for i, l in enumerate(lab):
            if not l.regressed:
                continue
            how, g = module_gram(grams, l, base_leaves[i], [e[i] for e in expert_leaves], k)
            key = grams.key_of[l.path] if isinstance(grams, Grams) else l.path
            if how == "dense" and key not in seen:
                seen.add(key)
                dense.append((l.path, g))
    if is_traced(trees):
        return
    names = ["base"] + [f"expert {i}" for i in range(k)] + (["anchor"] if len(trees) > k + 1 else [])
    leaves = [leaf for t in trees for leaf in jax.tree_util.tree_leaves(t)]
    if not all_finite(leaves):
        for who, t in zip(names, trees):
            check_tree_finite(who, leaves_with_paths(t))
    check_gram_values(dense)


def warn_foreign_data_free(grams, lab, base_leaves, expert_leaves) -> None:
    """Warn once if data-free Grams were computed from leaves other than the ones being merged."""
    if not isinstance(grams, Grams) or is_traced((base_leaves, expert_leaves)):
        return
    for i, l in enumerate(lab):
        if l.regressed and l.path in grams.key_of and grams.from_other_leaves(
                l.path, base_leaves[i], [e[i] for e in expert_leaves]):
            warnings.warn(f"the data-free Grams (e.g. of '{l.path}') were computed from other experts than "
                          "the ones being merged; they enter the solve as given", stacklevel=3)
            return


__all__ = ["validate", "check_weights", "module_gram", "resolve_labels", "check_option", "check_gram_values",
           "CARRY", "PRIORS"]
