"""BMM at pytree level (method.md §2): every regressed module solved in closed form.

``merge(base, experts, anchor, grams, hparams)`` returns a :class:`MergeResult` ``(params,
diagnostics)``. ``prepare(...)`` factors every module once (``S = Q diag(e) Q^T``) and returns a
:class:`Prepared` whose ``.params(hparams)`` re-solves the whole model for new ``(rho, scale)`` in
one batched matmul per module shape (the outer loop's fast path).

Conventions
-----------
* Per module (2-D view ``[d_in, d_out]`` of the label tree): ``T_k = W_k - W_0``, ``T_a = W_a - W_0``,
  ``S = sum_k w_k G_k``, ``B = sum_k w_k G_k T_k``, ``lambda = rho tr(S) / d_in`` and
  ``W = W_0 + s (S + lambda I)^{-1} (B + lambda T_a)``.
* On several devices, modules of the same ``(d_in, d_out)`` are stacked on a leading axis, sharded
  over every device (:mod:`bmm_jax.sharding`) and solved by one jitted, vmapped Cholesky (or eigen)
  kernel. On one device :func:`merge` runs each module as one fused jitted call (task kernels ->
  ``S, B`` -> Cholesky -> merged leaf, compiled once per module shape): no stacked copies and no
  host round trip per module.
* Carried leaves (not regressed) come from the anchor (``carry="anchor"``, default), from the base
  (``"base"``), or from ``theta_0 + mean_k tau_k`` (``"mean"``). A regressed module that no expert
  changed is carried from the base unchanged (partially fine-tuned experts).
* ``hparams``: ``{"rho": r, "scale": s}`` for every module, or a mapping from group labels to such
  dicts. A module's entry is looked up, most specific first, under: its leaf path, its module path
  (without ``/kernel``), its block (``"block3"``), its kind (``"q"``, ``"mlp-in"``...), then
  ``"global"`` / ``"default"``. ``scale`` defaults to 1.
"""
from __future__ import annotations

import functools
import math
import time
from collections.abc import Mapping
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from bmm_jax._tree import PyTree, check_experts, leaves_with_paths
from bmm_jax.grams._base import Grams
from bmm_jax.grams.data_free import normalized_weights
from bmm_jax.labels import Label, build_labels, check_labels, label_list
from bmm_jax.memory import trim
from bmm_jax.sharding import module_mesh, shard_stack
from bmm_jax.solve import (HIGHEST, EigenFactors, check_prior, check_rho, eigen_factors_stacked,
                           resolve_factors,
                           lapack_single_thread,
                           is_singular, normal_equations, normal_equations_factored,
                           _solve_one as _solve_one_module,
                           solve_stacked_diagonal, solve_stacked_isotropic)

CARRY = ("anchor", "base", "mean")
FALLBACK_KEYS = ("global", "default")
KIND_ALIASES = {"attn-out": ("out", "attn_out", "o"), "mlp-in": ("mlp_in", "fc1"), "mlp-out": ("mlp_out", "fc2")}


class MergeResult(NamedTuple):
    """``params``: merged pytree (structure and dtypes of ``base``). ``diagnostics``: a dict with
    ``"modules"`` (``{path: {kind, block, shape, rho, lambda, scale, carried, delta_norm,
    anchor_distance}}``), ``"carry"``, ``"prior"``, ``"num_experts"``, ``"devices"``, ``"seconds"``."""
    params: PyTree
    diagnostics: dict


# ------------------------------------------------------------------------------ hparams
def _is_single(h: Mapping) -> bool:
    return "rho" in h and not isinstance(h["rho"], Mapping)


def _check_entry(entry, where: str) -> tuple[float, float]:
    if not isinstance(entry, Mapping):
        raise TypeError(f"hparams{where} must be a dict like {{'rho': 0.3, 'scale': 1.0}}, got "
                        f"{type(entry).__name__}")
    unknown = set(entry) - {"rho", "scale"}
    if unknown:
        raise ValueError(f"hparams{where} has unknown keys {sorted(unknown)}; expected 'rho' and "
                         "optionally 'scale'")
    if "rho" not in entry:
        raise ValueError(f"hparams{where} has no 'rho'")
    try:
        rho = float(entry["rho"])
        scale = float(entry.get("scale", 1.0))
    except (TypeError, ValueError):
        raise TypeError(f"hparams{where}: rho and scale must be numbers, got {dict(entry)}") from None
    check_rho(rho, where=f" (hparams{where})")
    if not math.isfinite(scale):
        raise ValueError(f"hparams{where}: scale must be finite, got {scale}")
    return rho, scale


def module_keys(label: Label) -> tuple[str, ...]:
    """Lookup keys of a module's hyperparameters, most specific first."""
    keys = [label.path]
    if label.path.endswith("/kernel"):
        keys.append(label.path[: -len("/kernel")])
    if label.block is not None:
        keys.append(f"block{label.block}")
    keys.append(label.kind)
    keys.extend(KIND_ALIASES.get(label.kind, ()))
    return tuple(keys) + FALLBACK_KEYS


def resolve_hparams(hparams: Mapping, labels: PyTree) -> dict[str, tuple[float, float]]:
    """``{module path: (rho, scale)}`` for every regressed module of ``labels``.

    Raises:
      ValueError / TypeError: ``rho < 0``, a key that names no module or group, or a module with
      no entry (and no ``"global"`` fallback).
    """
    mods = [l for l in label_list(labels) if l.regressed]
    if not isinstance(hparams, Mapping):
        raise TypeError(f"hparams must be a dict, got {type(hparams).__name__}")
    if _is_single(hparams):
        rho, scale = _check_entry(hparams, "")
        return {l.path: (rho, scale) for l in mods}
    if not hparams:
        raise ValueError("hparams is empty; pass {'rho': ..., 'scale': ...} or a group mapping")
    entries = {str(k): _check_entry(v, f"[{k!r}]") for k, v in hparams.items()}
    known = set(FALLBACK_KEYS)
    for l in mods:
        known.update(module_keys(l))
    unknown = sorted(set(entries) - known)
    if unknown:
        raise ValueError(f"hparams keys {unknown[:5]} name no regressed module, block or kind; "
                         f"known kinds: {sorted({l.kind for l in mods})}, e.g. module "
                         f"'{mods[0].path if mods else '?'}'")
    out = {}
    for l in mods:
        hit = next((entries[k] for k in module_keys(l) if k in entries), None)
        if hit is None:
            raise ValueError(f"module '{l.path}' (kind {l.kind}, block {l.block}) has no hparams "
                             f"entry; add one for it or a 'global' entry")
        out[l.path] = hit
    return out


# ------------------------------------------------------------------------------ inputs
def resolve_anchor(anchor, base: PyTree, experts: Sequence[PyTree], *, grams=None,
                   labels: PyTree | None = None) -> PyTree:
    """Anchor params from a params pytree, an object with ``.params``, or an anchor name."""
    if isinstance(anchor, str):
        from bmm_jax import anchors
        fn = anchors.get(anchor)
        if anchor == "regmean":
            if grams is None:
                raise ValueError("anchor 'regmean' needs activation Grams (grams=...)")
            anchor = fn(base, experts, grams=grams, labels=labels)
        elif anchor in ("wudi", "regmean", "tsv", "iso_c", "iso_cts"):
            anchor = fn(base, experts, labels=labels) if labels is not None else fn(base, experts)
        else:
            anchor = fn(base, experts)
    if hasattr(anchor, "params") and not isinstance(anchor, Mapping):
        anchor = anchor.params
    check_experts(base, [anchor], min_experts=1, names=["anchor"])
    return anchor


def _check_labels(labels: PyTree, base: PyTree) -> list[Label]:
    return check_labels(labels, base)


def _weights(weights, k: int) -> jax.Array:
    if weights is None:
        return jnp.ones((k,), jnp.float32)
    w = np.asarray(weights, np.float64)
    if w.shape != (k,):
        raise ValueError(f"weights must have shape ({k},) (one per expert), got {w.shape}")
    if not np.all(np.isfinite(w)) or np.any(w < 0) or not np.any(w > 0):
        raise ValueError(f"weights must be finite, >= 0 and not all 0, got {w.tolist()}")
    return jnp.asarray(w, jnp.float32)


def _gram_lookup(grams, path: str, k: int, label: Label):
    """``("factor", F [K,d,r])`` or ``("dense", G [K,d,d])`` for one module."""
    if isinstance(grams, Grams):
        if path not in grams.key_of:
            raise ValueError(f"grams have no entry for regressed module '{path}' (kind {grams.kind}); "
                             "estimate them with the same label tree")
        f = grams.factor(path)
        if f is not None:
            f = jnp.asarray(f, jnp.float32)
            if f.shape[:2] != (k, label.d_in):
                raise ValueError(f"Gram factor of '{path}' has shape {f.shape}, expected [{k}, {label.d_in}, r]")
            return "factor", f
        g = grams[path]
    else:
        if path not in grams:
            raise ValueError(f"grams have no entry for regressed module '{path}'")
        g = grams[path]
    g = jnp.asarray(g)
    if g.shape != (k, label.d_in, label.d_in):
        raise ValueError(f"Gram of '{path}' has shape {g.shape}, expected [K, d_in, d_in] = "
                         f"{(k, label.d_in, label.d_in)}")
    if not jnp.issubdtype(g.dtype, jnp.floating):
        raise TypeError(f"Gram of '{path}' has dtype {g.dtype}, expected floating")
    if not bool(jnp.all(jnp.isfinite(g))):
        raise ValueError(f"Gram of '{path}' has NaN/Inf values")
    return "dense", g.astype(jnp.float32)


@jax.jit
def _task_kernels(base_leaf, expert_leaves):
    b = base_leaf.astype(jnp.float32)
    return jnp.stack([e.astype(jnp.float32) - b for e in expert_leaves])


@jax.jit
def _data_free_normal_equations(t, w):
    return normal_equations_factored(t, t, normalized_weights(t, w))


class ModuleStats(NamedTuple):
    """Normal-equation statistics of one regressed module: ``S [d,d]``, ``B [d,do]``, ``T_a [d,do]``."""
    label: Label
    s: jax.Array
    b: jax.Array
    ta: jax.Array


def _module_stat(l: Label, base_leaf, expert_leaves, anchor_leaf, grams, k: int, w) -> ModuleStats | None:
    """``S, B, T_a`` of one regressed module, or ``None`` if every expert left it unchanged."""
    t = l.to_matrix(_task_kernels(base_leaf, expert_leaves))
    if not bool(jnp.any(t != 0)):
        return None
    if isinstance(grams, Grams) and grams.normalizes(l.path, base_leaf, expert_leaves):
        s, b = _data_free_normal_equations(t, w)      # factors derived from t, not formed again
    else:
        how, g = _gram_lookup(grams, l.path, k, l)
        s, b = (normal_equations_factored if how == "factor" else normal_equations)(t, g, w)
        del g
    del t
    ta = l.to_matrix(_anchor_task_vector(anchor_leaf, base_leaf))
    if float(jnp.trace(s)) <= 0.0:
        raise ValueError(f"singular system at module '{l.path}': every Gram is zero there (S = 0), "
                         "although the experts changed it; check the Gram estimation")
    return ModuleStats(l, s, b, ta)


@jax.jit
def _anchor_task_vector(anchor_leaf, base_leaf):
    return anchor_leaf.astype(jnp.float32) - base_leaf.astype(jnp.float32)


def module_statistics(base: PyTree, experts: Sequence[PyTree], anchor: PyTree, grams, labels: PyTree,
                      weights=None) -> tuple[list[ModuleStats], list[str]]:
    """``S, B, T_a`` of every regressed module (task kernels formed one module at a time, so peak
    memory is one module's ``[K, d_in, d_out]`` on top of the inputs and the returned statistics;
    :func:`merge` and :func:`prepare` stream them per chunk of same-shape modules instead).

    Returns:
      ``(stats, unchanged)``: statistics of the modules to solve, and paths of regressed modules
      that every expert left unchanged (carried from the base).
    """
    lab = _check_labels(labels, base)
    k = len(experts)
    w = _weights(weights, k)
    base_leaves = [x for _, x in leaves_with_paths(base)]
    anchor_leaves = jax.tree_util.tree_leaves(anchor)
    expert_leaves = [jax.tree_util.tree_leaves(e) for e in experts]
    stats, unchanged = [], []
    for i, l in enumerate(lab):
        if not l.regressed:
            continue
        st = _module_stat(l, base_leaves[i], [e[i] for e in expert_leaves], anchor_leaves[i], grams, k, w)
        if st is None:
            unchanged.append(l.path)
        else:
            stats.append(st)
    return stats, unchanged


# Cap on the float32 elements of one stacked chunk of same-shape modules (S, B and T_a together):
# merge / prepare form the statistics chunk by chunk, so their peak memory on top of the inputs is
# one chunk (64 MiB at the default, or one module per device if larger), never the statistics of
# every module.
CHUNK_ELEMENTS = 2 ** 24
PREPARE_CHUNK_ELEMENTS_1DEV = 2 ** 22


def _module_chunks(lab: Sequence[Label], n_devices: int, max_elements: int = CHUNK_ELEMENTS):
    """Leaf indices of the regressed modules, grouped by ``(d_in, d_out)`` and split into chunks.

    Yields ``(shape, [leaf indices])``. A chunk holds a multiple of ``n_devices`` modules (so it
    shards evenly) whose ``d_in^2 + 2 d_in d_out`` elements stay under ``max_elements`` (at least
    ``n_devices`` modules); the chunks of one shape have balanced sizes, so a shape compiles its
    stacked solve at most twice.
    """
    groups: dict[tuple[int, int], list[int]] = {}
    for i, l in enumerate(lab):
        if l.regressed:
            groups.setdefault((l.d_in, l.d_out), []).append(i)
    for (d_in, d_out), idx in groups.items():
        per = d_in * d_in + 2 * d_in * d_out
        cap = n_devices * max(1, max_elements // (n_devices * per))
        n_chunks = -(-len(idx) // cap)
        size = -(-len(idx) // n_chunks)
        size = -(-size // n_devices) * n_devices
        for j in range(0, len(idx), size):
            yield (d_in, d_out), idx[j:j + size]


def _chunk_working_set(chunk, k: int) -> int:
    """Float32 elements a chunk ``((d_in, d_out), idx)`` of :func:`prepare` needs at once (about):
    its statistics and eigendecomposition (``~4 d_in^2 + 2 d_in d_out`` per module) and one module's
    ``[K, d_in, d_out]`` task kernels."""
    (d_in, d_out), idx = chunk
    return len(idx) * (4 * d_in * d_in + 2 * d_in * d_out) + k * d_in * d_out


def _carried_leaf(mode: str, base_leaf, anchor_leaf, expert_leaves, anchor_scale: float = 1.0):
    if mode == "anchor":
        if anchor_scale == 1.0:
            return anchor_leaf
        b = jnp.asarray(base_leaf)
        if not jnp.issubdtype(b.dtype, jnp.floating):
            return anchor_leaf
        return (b.astype(jnp.float32) + anchor_scale * (jnp.asarray(anchor_leaf, jnp.float32)
                                                        - b.astype(jnp.float32))).astype(b.dtype)
    if mode == "base":
        return base_leaf
    b = jnp.asarray(base_leaf)
    if not jnp.issubdtype(b.dtype, jnp.floating):
        return base_leaf
    t = _task_kernels(b, list(expert_leaves))
    return (b.astype(jnp.float32) + jnp.mean(t, axis=0)).astype(b.dtype)


def _check_carry(carry: str) -> None:
    if carry not in CARRY:
        raise ValueError(f"unknown carry mode {carry!r}; expected one of {CARRY}")


def _shape_groups(stats: Sequence[ModuleStats]) -> dict[tuple[int, int], list[int]]:
    groups: dict[tuple[int, int], list[int]] = {}
    for j, st in enumerate(stats):
        groups.setdefault((st.label.d_in, st.label.d_out), []).append(j)
    return groups


@jax.jit
def _add_delta(base_leaf, delta):
    return (base_leaf.astype(jnp.float32) + delta).astype(base_leaf.dtype)


def _apply_delta(l: Label, base_leaf, delta):
    """The merged leaf ``W_0 + delta`` (``delta [d_in, d_out]`` in the 2-D view) in the leaf's layout/dtype."""
    return _add_delta(jnp.asarray(base_leaf), l.from_matrix(delta))


def _assemble(base: PyTree, labels: PyTree, anchor: PyTree, experts, deltas: Mapping[str, jax.Array],
              carry: str, anchor_scale: float = 1.0, solved: Mapping[str, Any] | None = None) -> PyTree:
    """Merged pytree: ``W_0 + deltas[path]`` for solved modules (or the finished leaf ``solved[path]``),
    the base for regressed modules no expert changed, the ``carry`` rule elsewhere."""
    solved = dict(solved or {})
    lab = label_list(labels)
    base_leaves = jax.tree_util.tree_leaves(base)
    for i, l in enumerate(lab):
        if l.regressed and l.path not in solved and l.path in deltas:
            solved[l.path] = _apply_delta(l, base_leaves[i], deltas[l.path])
    return _assemble_leaves(base, lab, jax.tree_util.tree_leaves(anchor), experts, solved, carry, anchor_scale)


def _assemble_leaves(base: PyTree, lab: Sequence[Label], anchor_leaves: Sequence, experts,
                     solved: Mapping[str, Any], carry: str, anchor_scale: float = 1.0) -> PyTree:
    """:func:`_assemble` from the anchor's leaf list (entries of solved modules may be ``None``)."""
    base_leaves, treedef = jax.tree_util.tree_flatten(base)
    expert_leaves = [jax.tree_util.tree_leaves(e) for e in experts]
    out = []
    for i, (l, b) in enumerate(zip(lab, base_leaves)):
        if l.regressed and l.path in solved:
            out.append(solved[l.path])
        elif l.regressed:          # no expert changed it
            out.append(b)
        else:
            out.append(_carried_leaf(carry, b, anchor_leaves[i], [e[i] for e in expert_leaves], anchor_scale))
    return jax.tree_util.tree_unflatten(treedef, out)


def _diag(st: ModuleStats, rho: float, scale: float, delta: jax.Array) -> dict:
    lam = rho * float(jnp.trace(st.s)) / st.label.d_in
    dn = float(jnp.linalg.norm(delta))
    ta = float(jnp.linalg.norm(st.ta))
    return {"kind": st.label.kind, "block": st.label.block, "shape": [st.label.d_in, st.label.d_out],
            "rho": rho, "lambda": lam, "scale": scale, "carried": False, "delta_norm": dn,
            "anchor_distance": float(jnp.linalg.norm(delta - scale * st.ta)) / max(ta, 1e-30)}


# ------------------------------------------------------------------------------ fused module solve
def _view_label(view: tuple) -> Label:
    layout, d_in, d_out = view
    return Label(path="", regressed=True, layout=layout, d_in=d_in, d_out=d_out)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _merge_module(view: tuple, how: str, diagonal: bool, base_leaf, expert_leaves, gram, anchor_leaf,
                  weights, rho, scale):
    """One module of :func:`merge` in one jitted call: task kernels -> ``(S, B)`` -> anchored
    Cholesky solve -> the merged leaf ``W_0 + s Delta`` (layout and dtype of the base leaf).

    ``view = (layout, d_in, d_out)`` and ``how`` (``"factor"``: ``gram`` is ``F [K, d_in, r]``;
    ``"dense"``: ``G [K, d_in, d_in]``; ``"data_free"``: ``gram`` is ``None`` and ``F_k = T_k /
    ||T_k||_F`` is formed here from the task kernels) are static: one compilation per module shape.
    Returns ``(leaf, checks)`` with ``checks = [changed, tr S, finite, ||s Delta||, ||s Delta - s T_a||,
    ||T_a||]`` (float32), read once per chunk: no host round trip between the steps of a module.
    """
    label = _view_label(view)
    b = base_leaf.astype(jnp.float32)
    t = label.to_matrix(jnp.stack([e.astype(jnp.float32) - b for e in expert_leaves]))
    if how == "data_free":             # F_k F_k^T = T_k T_k^T / ||T_k||^2: no [K, d_in, d_out] factor array
        s, bb = normal_equations_factored(t, t, normalized_weights(t, weights))
    else:
        s, bb = (normal_equations_factored if how == "factor" else normal_equations)(t, gram, weights)
    ta = label.to_matrix(anchor_leaf.astype(jnp.float32) - b)
    out = _solve_one_module(s, bb, ta, rho, scale, diagonal)
    leaf = (b + label.from_matrix(out).reshape(b.shape)).astype(base_leaf.dtype)
    norm = lambda x: jnp.sqrt(jnp.sum(jnp.square(x)))
    checks = jnp.stack([jnp.any(t != 0).astype(jnp.float32), jnp.trace(s),
                        jnp.all(jnp.isfinite(out)).astype(jnp.float32), norm(out), norm(out - scale * ta),
                        norm(ta)])
    return leaf, checks


def _merge_fused(lab, base_leaves, expert_leaves, anchor_leaves, owned: bool, grams, hp, k: int, w,
                 diagonal: bool):
    """:func:`merge` on one device: one fused call per module (:func:`_merge_module`), the small
    per-module checks read once per chunk of about :data:`CHUNK_ELEMENTS` statistics elements."""
    solved, diags, unchanged = {}, {}, []
    pending, size = [], 0

    def flush():
        checks = np.asarray(jnp.stack([c for _, _, c in pending]))
        for (i, leaf, _), (changed, tr, finite, dn, dist, ta) in zip(pending, checks):
            l = lab[i]
            rho, scale = hp[l.path]
            if not changed:
                unchanged.append(l.path)
                continue
            if tr <= 0.0:
                raise ValueError(f"singular system at module '{l.path}': every Gram is zero there (S = 0), "
                                 "although the experts changed it; check the Gram estimation")
            if not finite:
                raise ValueError(f"singular system at module '{l.path}': the solve produced NaN/Inf "
                                 f"(rho = {rho}); increase rho")
            solved[l.path] = leaf
            diags[l.path] = {"kind": l.kind, "block": l.block, "shape": [l.d_in, l.d_out], "rho": rho,
                             "lambda": rho * float(tr) / l.d_in, "scale": scale, "carried": False,
                             "delta_norm": float(dn), "anchor_distance": float(dist) / max(float(ta), 1e-30)}
        pending.clear()
        trim()                                 # freed task kernels / statistics leave the process now

    for i, l in enumerate(lab):
        if not l.regressed:
            continue
        es = [e[i] for e in expert_leaves]
        rho, scale = hp[l.path]
        if rho == 0.0:                         # the singularity check needs S on the host
            st = _module_stat(l, base_leaves[i], es, anchor_leaves[i], grams, k, w)
            if st is not None and is_singular(st.s):
                raise ValueError(f"singular system at module '{l.path}' ({l.d_in} x {l.d_out}): rho = 0 and "
                                 "the weighted Gram S is rank-deficient; use rho > 0 (the anchor prior "
                                 "regularises it)")
            del st
        if isinstance(grams, Grams) and grams.normalizes(l.path, base_leaves[i], es):
            how, g = "data_free", None
        else:
            how, g = _gram_lookup(grams, l.path, k, l)
        leaf, checks = _merge_module((l.layout, l.d_in, l.d_out), how, diagonal, jnp.asarray(base_leaves[i]),
                                     [jnp.asarray(e) for e in es], g, jnp.asarray(anchor_leaves[i]), w,
                                     jnp.float32(rho), jnp.float32(scale))
        del g
        if owned:
            anchor_leaves[i] = None
        pending.append((i, leaf, checks))
        size += l.d_in * l.d_in + 2 * l.d_in * l.d_out
        if size >= CHUNK_ELEMENTS:
            flush()
            size = 0
    if pending:
        flush()
    return solved, diags, unchanged


def _chunk_statistics(chunk, lab, base_leaves, expert_leaves, anchor_leaves, owned: bool, grams, k: int, w,
                      unchanged: list) -> list[tuple[int, ModuleStats]]:
    """``[(leaf index, ModuleStats)]`` of one chunk's modules; paths that no expert changed go to
    ``unchanged``; an owned anchor's leaves are dropped once used."""
    stats = []
    for i in chunk:
        st = _module_stat(lab[i], base_leaves[i], [e[i] for e in expert_leaves], anchor_leaves[i], grams, k, w)
        if owned:
            anchor_leaves[i] = None
        if st is None:
            unchanged.append(lab[i].path)
        else:
            stats.append((i, st))
    return stats


def _merge_stacked(lab, base_leaves, expert_leaves, anchor_leaves, owned: bool, grams, hp, k: int, w,
                   solver, mesh):
    """:func:`merge` over several devices: the statistics of each chunk of same-shape modules are
    stacked, sharded over ``mesh`` and solved by one vmapped Cholesky kernel."""
    solved, diags, unchanged = {}, {}, []
    # stream: statistics of one chunk of same-shape modules -> one stacked solve -> merged leaves
    for shape, chunk in _module_chunks(lab, int(mesh.devices.size)):
        stats = _chunk_statistics(chunk, lab, base_leaves, expert_leaves, anchor_leaves, owned, grams, k, w,
                                  unchanged)
        for i, st in stats:
            if hp[st.label.path][0] == 0.0 and is_singular(st.s):
                raise ValueError(f"singular system at module '{st.label.path}' ({st.label.d_in} x "
                                 f"{st.label.d_out}): rho = 0 and the weighted Gram S is rank-deficient; "
                                 "use rho > 0 (the anchor prior regularises it)")
        if not stats:
            continue
        m = len(stats)
        s = shard_stack([st.s for _, st in stats], mesh)
        b = shard_stack([st.b for _, st in stats], mesh)
        ta = shard_stack([st.ta for _, st in stats], mesh)
        rho = shard_stack(jnp.asarray([hp[st.label.path][0] for _, st in stats], jnp.float32), mesh)
        sc = shard_stack(jnp.asarray([hp[st.label.path][1] for _, st in stats], jnp.float32), mesh)
        out = solver(s, b, ta, rho, sc)[:m]
        del s, b, ta
        finite = np.asarray(jnp.all(jnp.isfinite(out), axis=(1, 2)))
        for pos, (i, st) in enumerate(stats):
            path = st.label.path
            if not finite[pos]:
                raise ValueError(f"singular system at module '{path}': the solve produced NaN/Inf "
                                 f"(rho = {hp[path][0]}); increase rho")
            diags[path] = _diag(st, *hp[path], out[pos])
            solved[path] = _apply_delta(st.label, base_leaves[i], out[pos])
        del stats, out
        trim()                             # freed task kernels / statistics leave the process now
    return solved, diags, unchanged


# ------------------------------------------------------------------------------ merge
def merge(base: PyTree, experts: Sequence[PyTree], anchor, grams=None, hparams: Mapping | None = None,
          labels: PyTree | None = None, *, carry: str = "anchor", prior: str = "isotropic",
          weights=None, devices=None) -> MergeResult:
    """Bayesian Model Merging of ``experts`` around ``anchor`` (method.md §2).

    Args:
      base: pretrained params ``theta_0`` (a pytree of arrays).
      experts: list of K >= 2 fine-tuned params pytrees with the structure, shapes and dtypes of
        ``base``.
      anchor: the anchor merge: a params pytree, an object with ``.params``, or the name of an
        anchor in :mod:`bmm_jax.anchors` (computed with its default options).
      grams: per-module Grams ``[K, d_in, d_in]``: a :class:`bmm_jax.grams.Grams` (any of
        ``data_free`` / ``activations`` / ``hybrid``) or a dict ``{module path: array}``.
        ``None``: data-free Grams (§3.2).
      hparams: ``{"rho": 0.3, "scale": 1.0}`` for all modules, or a mapping from group labels
        (module path, ``"block3"``, kind, ``"global"``) to such dicts (see the module docstring).
        Default ``{"rho": 1.0, "scale": 1.0}``.
      labels: label tree (default :func:`bmm_jax.labels.build_labels(base) <build_labels>`).
      carry: where carried (non-regressed) leaves come from: ``"anchor"``, ``"base"``, ``"mean"``.
      prior: ``"isotropic"`` or ``"diagonal"``.
      weights: ``[K]`` task weights (default 1).
      devices: devices to shard module stacks over (default all).

    Returns:
      :class:`MergeResult` ``(params, diagnostics)``.

    Raises:
      ValueError / TypeError: invalid experts (naming the leaf and the problem), unknown anchor /
      carry / prior, bad hparams (``rho < 0``...), Grams missing or misshapen for a module, or a
      singular system (``rho = 0`` and a rank-deficient ``S``; the module is named).
    """
    t0 = time.perf_counter()
    experts = check_experts(base, experts)
    _check_carry(carry)
    check_prior(prior)
    labels = build_labels(base) if labels is None else labels
    _check_labels(labels, base)
    hp = resolve_hparams({"rho": 1.0, "scale": 1.0} if hparams is None else hparams, labels)
    owned = isinstance(anchor, str)            # computed here: nobody else holds its leaves
    anchor = resolve_anchor(anchor, base, experts, grams=grams, labels=labels)
    if grams is None:
        from bmm_jax.grams.data_free import data_free
        grams = data_free(base, experts, labels)
    mesh = module_mesh(devices)
    solver = solve_stacked_diagonal if prior == "diagonal" else solve_stacked_isotropic
    lab = label_list(labels)
    k = len(experts)
    w = _weights(weights, k)
    base_leaves = jax.tree_util.tree_leaves(base)
    anchor_leaves = jax.tree_util.tree_leaves(anchor)
    del anchor                                 # an owned anchor's module leaves are freed once used
    expert_leaves = [jax.tree_util.tree_leaves(e) for e in experts]
    with lapack_single_thread():
        if int(mesh.devices.size) == 1:
            solved, diags, unchanged = _merge_fused(lab, base_leaves, expert_leaves, anchor_leaves, owned, grams,
                                                    hp, k, w, prior == "diagonal")
        else:
            solved, diags, unchanged = _merge_stacked(lab, base_leaves, expert_leaves, anchor_leaves, owned,
                                                      grams, hp, k, w, solver, mesh)
        jax.block_until_ready(solved)
    for path in unchanged:
        diags[path] = {"carried": True, "reason": "no expert changed this module"}
    diags = {l.path: diags[l.path] for l in lab if l.path in diags}       # tree order
    params = _assemble_leaves(base, lab, anchor_leaves, experts, solved, carry)
    return MergeResult(params, {"modules": diags, "carry": carry, "prior": prior,
                                "num_experts": len(experts), "devices": int(mesh.devices.size),
                                "seconds": time.perf_counter() - t0})


# ------------------------------------------------------------------------------ fast path
FACTOR_DTYPES = ("float32", "bfloat16")


_resolve_one = resolve_factors                 # (factors, rho, scale, c) -> scale * Delta


@functools.partial(jax.jit, static_argnums=(5, 6))
def _resolve_apply(factors, rho, scale, c, base_leaves, layouts, with_norms: bool = False):
    """Merged leaves ``W_0 + s Delta`` of the given stacks (isotropic fast path, one device), and
    ``||s Delta||_F`` per module if ``with_norms`` (else ``None``).

    ``factors``: tuple of stacked :class:`EigenFactors`; ``rho``, ``scale``: tuple of ``[M]`` per
    stack; ``base_leaves``: per stack, the ``M <= stack size`` base leaves (their layout and dtype are
    kept); ``layouts``: their :attr:`Label.layout` (static). Padding rows are ignored. One matmul per
    module writing each leaf once. Called with one stack at a time: one program for the whole model
    measured 10-20 % slower on the 2-core CPU (0.65-0.75 vs 0.59-0.61 s, ViT-B/32 bf16).
    """
    out, norms = [], []
    for f_stack, r, sc, bases, lays in zip(factors, rho, scale, base_leaves, layouts):
        for j, (b, layout) in enumerate(zip(bases, lays)):
            f = EigenFactors(*(x[j] for x in f_stack))
            d = _resolve_one(f, r[j], sc[j], c)
            if with_norms:
                norms.append(jnp.sqrt(jnp.sum(jnp.square(d))))
            d = jnp.swapaxes(d, -1, -2) if layout == "transposed" else d.reshape(b.shape)
            out.append((b.astype(jnp.float32) + d).astype(b.dtype))
    return tuple(out), (jnp.stack(norms) if with_norms else None)


@jax.jit
def _to_bfloat16(f: EigenFactors) -> EigenFactors:
    bf = jnp.bfloat16
    return EigenFactors(f.q.astype(bf), f.e, f.qtb.astype(bf), f.qtta.astype(bf), f.mean_e)


_resolve_stacked = jax.jit(jax.vmap(_resolve_one, in_axes=(0, 0, 0, None)))


class _Stack(NamedTuple):
    paths: tuple[str, ...]
    factors: Any          # EigenFactors (isotropic) or (S, B, Ta) (diagonal), stacked, sharded


class Prepared:
    """Factored modules for repeated merges with new hyperparameters (outer-loop fast path).

    Attributes:
      labels: the label tree. ``modules``: paths of the modules that are solved.
      anchor: the anchor params, or ``None`` when :func:`prepare` computed the anchor from its name
        (its solved modules' leaves are then dropped once factored: only carried leaves are kept).
      num_experts: K. ``factor_dtype``: ``"float32"`` or ``"bfloat16"`` (see :func:`prepare`).
    Call :meth:`params` (merged pytree) or :meth:`merge` (:class:`MergeResult`).

    It keeps no reference to the experts (with ``carry="mean"`` the carried leaves
    ``theta_0 + mean_k tau_k`` are formed once, here): a caller may free them after :func:`prepare`,
    and re-solves then need only the base, the factors and the carried leaves.
    """

    def __init__(self, base, experts, anchor, labels, stacks, unchanged, carry, prior, mesh, stats_diag,
                 anchor_leaves=None, factor_dtype: str = "float32"):
        self.base, self.anchor, self.labels = base, anchor, labels
        self.num_experts, self.factor_dtype = len(experts), factor_dtype
        self._anchor_leaves = (list(jax.tree_util.tree_leaves(anchor)) if anchor_leaves is None
                               else list(anchor_leaves))
        lab = label_list(labels)
        if carry == "mean":                      # carried leaves fixed now; the experts are not kept
            base_leaves = jax.tree_util.tree_leaves(base)
            expert_leaves = [jax.tree_util.tree_leaves(e) for e in experts]
            self._carry_leaves = [None if l.regressed else
                                  _carried_leaf("mean", base_leaves[i], None, [e[i] for e in expert_leaves])
                                  for i, l in enumerate(lab)]
        else:
            self._carry_leaves = self._anchor_leaves
        self._stacks, self.unchanged, self.carry, self.prior, self._mesh = stacks, unchanged, carry, prior, mesh
        self._lambda_unit = stats_diag           # {path: tr(S)/d_in}
        order = {l.path: i for i, l in enumerate(label_list(labels))}
        self.modules = tuple(sorted((p for st in stacks for p in st.paths), key=order.__getitem__))  # tree order
        self._index: dict | None = None          # {path: (label, base leaf)}, built on first use

    def _stack_inputs(self, hparams: Mapping, anchor_scale: float, place: bool = True):
        """Yields ``(stack, rho [M], scale [M], c)`` per stack, after checking ``rho = 0`` modules
        (``rho``/``scale`` sharded like the stack, or host numpy arrays if not ``place``)."""
        hp = resolve_hparams(hparams, self.labels)
        c = float(anchor_scale)
        if not math.isfinite(c):
            raise ValueError(f"anchor_scale must be finite, got {anchor_scale}")
        for st in self._stacks:
            if any(hp[p][0] == 0.0 for p in st.paths):
                if self.prior == "isotropic":
                    bad = [p for j, p in enumerate(st.paths) if hp[p][0] == 0.0 and float(jnp.min(
                        st.factors.e[j])) <= 1e-7 * float(st.factors.mean_e[j])]
                else:
                    bad = [p for j, p in enumerate(st.paths) if hp[p][0] == 0.0 and is_singular(st.factors[0][j])]
                if bad:
                    raise ValueError(f"singular system at module '{bad[0]}': rho = 0 and S is "
                                     "rank-deficient; use rho > 0")
            rho = np.asarray([hp[p][0] for p in st.paths], np.float32)
            sc = np.asarray([hp[p][1] for p in st.paths], np.float32)
            if place:
                rho, sc = shard_stack(jnp.asarray(rho), self._mesh), shard_stack(jnp.asarray(sc), self._mesh)
            yield st, rho, sc, c

    def _stack_deltas(self, hparams: Mapping, anchor_scale: float):
        """Yields ``(paths, res [M, d_in, d_out])`` stack by stack (one stack's result alive at a time)."""
        for st, rho, sc, c in self._stack_inputs(hparams, anchor_scale):
            m = len(st.paths)
            if self.prior == "isotropic":
                res = _resolve_stacked(st.factors, rho, sc, jnp.float32(c))[:m]
            else:
                s, b, ta = st.factors
                res = solve_stacked_diagonal(s, b, c * ta, rho, sc)[:m]
            yield st.paths, res

    def deltas(self, hparams: Mapping, *, anchor_scale: float = 1.0) -> dict[str, jax.Array]:
        """``{path: s * Delta [d_in, d_out]}`` for every solved module."""
        out = {}
        for paths, res in self._stack_deltas(hparams, anchor_scale):
            for pos, p in enumerate(paths):
                out[p] = res[pos]
        return out

    def _solved_leaves(self, hparams: Mapping, anchor_scale: float, norms: dict | None = None) -> dict:
        """``{path: merged leaf}``, stack by stack. Isotropic prior on one device: one jitted call per
        stack solves and writes the merged leaves ``W_0 + s Delta`` directly (no stacked result kept)."""
        if self._index is None:
            base_leaves = jax.tree_util.tree_leaves(self.base)
            self._index = {l.path: (l, base_leaves[i]) for i, l in enumerate(label_list(self.labels))
                           if l.regressed}
        solved = {}
        # one device: solve + write the leaves in one call. Several: the stacked solve stays sharded
        # and each module's slice is applied separately (XLA would give the fused call's per-module
        # outputs shardings over the module mesh that cannot be expressed on it).
        if self.prior != "isotropic" or int(self._mesh.devices.size) > 1:
            for paths, res in self._stack_deltas(hparams, anchor_scale):
                for pos, p in enumerate(paths):
                    l, b = self._index[p]
                    solved[p] = _apply_delta(l, b, res[pos])
                    if norms is not None:
                        norms[p] = float(jnp.linalg.norm(res[pos]))
                del res
            return solved
        for st, rho, sc, c in self._stack_inputs(hparams, anchor_scale, place=False):
            layouts = tuple(self._index[p][0].layout for p in st.paths)
            bases = tuple(jnp.asarray(self._index[p][1]) for p in st.paths)
            leaves, dn = _resolve_apply((st.factors,), (rho,), (sc,), np.float32(c), (bases,), (layouts,),
                                        norms is not None)
            solved.update(zip(st.paths, leaves))
            if norms is not None:
                norms.update(zip(st.paths, np.asarray(dn).tolist()))
        return solved

    def params(self, hparams: Mapping, *, anchor_scale: float = 1.0) -> PyTree:
        """Merged params for ``hparams`` (any form accepted by :func:`merge`). ``anchor_scale``
        multiplies the anchor's task vector (in the prior mean and in carried leaves)."""
        solved = self._solved_leaves(hparams, float(anchor_scale))
        return self._assemble(solved, float(anchor_scale))

    def _assemble(self, solved: Mapping, anchor_scale: float) -> PyTree:
        if self.carry == "mean":                 # precomputed carried leaves, independent of anchor_scale
            return _assemble_leaves(self.base, label_list(self.labels), self._carry_leaves, (), solved,
                                    "anchor", 1.0)
        return _assemble_leaves(self.base, label_list(self.labels), self._anchor_leaves, (), solved,
                                self.carry, anchor_scale)

    def merge(self, hparams: Mapping, *, anchor_scale: float = 1.0) -> MergeResult:
        t0 = time.perf_counter()
        hp = resolve_hparams(hparams, self.labels)
        norms: dict[str, float] = {}
        solved = self._solved_leaves(hparams, float(anchor_scale), norms)
        diags = {p: {"rho": hp[p][0], "scale": hp[p][1], "lambda": hp[p][0] * self._lambda_unit[p],
                     "carried": False, "delta_norm": n} for p, n in norms.items()}
        for p in self.unchanged:
            diags[p] = {"carried": True, "reason": "no expert changed this module"}
        diags = {l.path: diags[l.path] for l in label_list(self.labels) if l.path in diags}   # tree order
        params = self._assemble(solved, float(anchor_scale))
        return MergeResult(params, {"modules": diags, "carry": self.carry, "prior": self.prior,
                                    "num_experts": self.num_experts, "devices": int(self._mesh.devices.size),
                                    "factor_dtype": self.factor_dtype,
                                    "seconds": time.perf_counter() - t0})

    def __repr__(self) -> str:
        shapes = ", ".join(f"{len(s.paths)}x{tuple(s.factors[2].shape[1:])}" for s in self._stacks)
        dt = "" if self.factor_dtype == "float32" else f", factor_dtype={self.factor_dtype}"
        return f"Prepared({len(self.modules)} modules [{shapes}], prior={self.prior}, carry={self.carry}{dt})"


def prepare(base: PyTree, experts: Sequence[PyTree], anchor, grams=None, labels: PyTree | None = None, *,
            carry: str = "anchor", prior: str = "isotropic", weights=None, devices=None,
            progress: bool = False, factor_dtype: str = "float32") -> Prepared:
    """Factor every regressed module once for fast re-solves (method.md §2, "fast path").

    Arguments as in :func:`merge` (no ``hparams``). With the isotropic prior each module keeps
    ``EigenFactors`` (``S = Q diag(e) Q^T``, ``Q^T B``, ``Q^T T_a``); a re-solve is then one
    batched matmul per module shape. With ``prior="diagonal"`` the stacked ``S, B, T_a`` are kept
    and each re-solve is a batched Cholesky.

    ``factor_dtype="bfloat16"`` (isotropic prior only) stores ``Q``, ``Q^T B`` and ``Q^T T_a`` in
    bfloat16 (half the memory) and re-solves with bfloat16 products accumulated in float32 (about 3x
    the float32 matmul rate on CPUs with AMX / avx512_bf16, more on accelerators). The result is
    then approximate: relative error ~1e-3 of ``Delta`` (bfloat16 has an 8-bit mantissa), fine for
    ranking hyperparameters in a search; compute the final model with :func:`merge` (exact float32
    Cholesky). The eigendecomposition itself is always float32.
    """
    experts = check_experts(base, experts)
    _check_carry(carry)
    check_prior(prior)
    if factor_dtype not in FACTOR_DTYPES:
        raise ValueError(f"unknown factor_dtype {factor_dtype!r}; expected one of {FACTOR_DTYPES}")
    if factor_dtype != "float32" and prior != "isotropic":
        raise ValueError(f"factor_dtype={factor_dtype!r} needs prior='isotropic' (the diagonal prior has "
                         "no eigen fast path: it re-solves by float32 Cholesky)")
    labels = build_labels(base) if labels is None else labels
    _check_labels(labels, base)
    owned = isinstance(anchor, str)            # computed here: nobody else holds its leaves
    anchor = resolve_anchor(anchor, base, experts, grams=grams, labels=labels)
    if grams is None:
        from bmm_jax.grams.data_free import data_free
        grams = data_free(base, experts, labels)
    mesh = module_mesh(devices)
    lab = label_list(labels)
    k = len(experts)
    w = _weights(weights, k)
    base_leaves = jax.tree_util.tree_leaves(base)
    anchor_leaves = jax.tree_util.tree_leaves(anchor)
    anchor = None if owned else anchor         # an owned anchor's module leaves are freed once used
    expert_leaves = [jax.tree_util.tree_leaves(e) for e in experts]
    stacks, unchanged, unit = [], [], {}
    # largest working sets first (the 3072-wide mlp-out eigh, task kernels, statistics), while the
    # factors kept so far are few; the small chunks come last, when the factors are nearly all there
    # On one device nothing is gained by stacking (each eigh runs alone): chunks of 16 MiB of
    # statistics keep the transient working set small.
    n_dev = int(mesh.devices.size)
    chunks = sorted(_module_chunks(lab, n_dev, CHUNK_ELEMENTS if n_dev > 1 else PREPARE_CHUNK_ELEMENTS_1DEV),
                    key=lambda c: -_chunk_working_set(c, k))
    if progress:
        from tqdm.auto import tqdm
        chunks = tqdm(chunks, desc="eigen factors", unit="chunk")
    # stream: statistics of one chunk of same-shape modules -> stacked eigen factors; S, B, T_a freed
    with lapack_single_thread():
        for shape, chunk in chunks:
            stats = [st for _, st in _chunk_statistics(chunk, lab, base_leaves, expert_leaves, anchor_leaves,
                                                       owned, grams, k, w, unchanged)]
            for st in stats:
                unit[st.label.path] = float(jnp.trace(st.s)) / st.label.d_in
            if not stats:
                continue
            s = shard_stack([st.s for st in stats], mesh)
            b = shard_stack([st.b for st in stats], mesh)
            ta = shard_stack([st.ta for st in stats], mesh)
            paths = tuple(st.label.path for st in stats)
            del stats
            if prior == "isotropic":
                f = eigen_factors_stacked(s, b, ta)
                stacks.append(_Stack(paths, _to_bfloat16(f) if factor_dtype == "bfloat16" else f))
                del f                          # with bf16 factors the float32 ones go now, not next chunk
            else:
                stacks.append(_Stack(paths, (s, b, ta)))
            del s, b, ta
            jax.block_until_ready(stacks[-1].factors)
            trim()                             # freed task kernels / statistics leave the process now
        jax.block_until_ready([st.factors for st in stacks])
    return Prepared(base, experts, anchor, labels, stacks, unchanged, carry, prior, mesh,
                    unit, anchor_leaves=anchor_leaves, factor_dtype=factor_dtype)


__all__ = ["merge", "prepare", "Prepared", "MergeResult", "FACTOR_DTYPES", "resolve_hparams", "resolve_anchor",
           "module_statistics", "module_keys", "CARRY"]
