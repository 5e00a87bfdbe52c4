"""BMM at pytree level (method.md §2): ``merge(base, experts, anchor, grams, hparams)``.

A thin shell over the pure engine (:mod:`bmm_jax.engine`): validation (:mod:`bmm_jax.validation`),
hyperparameter lookup (:mod:`bmm_jax.hparams`), the anchor, then one :func:`~bmm_jax.engine.solve_module`
per regressed module and the carried leaves. The whole function is traceable: inside ``jax.jit``,
``vmap``, ``lax.scan`` or ``grad`` it applies the engine directly; eagerly it runs the engine chunk
by chunk on the inputs' devices and raises, naming the module, on a singular or overflowing system.

Conventions
-----------
* Per module (2-D view ``[d_in, d_out]`` of the label tree): ``T_k = W_k - W_0``, ``T_a = W_a - W_0``,
  ``S = sum_k w_k G_k``, ``B = sum_k w_k G_k T_k``, ``lambda = rho tr(S) / d_in`` and
  ``W = W_0 + s (S + lambda I)^{-1} (B + lambda T_a)``.
* Carried leaves (not regressed) come from the anchor (``carry="anchor"``, default), from the base
  (``"base"``), or from ``theta_0 + mean_k tau_k`` (``"mean"``). A regressed module that no expert
  changed is carried from the base unchanged (partially fine-tuned experts).
* ``hparams``: see :mod:`bmm_jax.hparams`.
* Devices: inputs sharded over a mesh keep their sharding (one jitted call per module, the output
  constrained to the base leaf's sharding). Unsharded inputs on a host with several devices (or an
  explicit ``mesh=``) are stacked by module shape and the stacked solve is sharded over the mesh.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from bmm_jax._tree import PyTree, check_experts, is_traced
from bmm_jax.diagnostics import MergeDiagnostics, ModuleDiagnostics
from bmm_jax.engine import ModuleJob, solve_modules
from bmm_jax.hparams import FALLBACK_KEYS, KIND_ALIASES, check_keys, module_keys, resolve_hparams
from bmm_jax.labels import Label
from bmm_jax.memory import maybe_trim
from bmm_jax.validation import (CARRY, PRIORS, check_option, check_weights, module_gram, resolve_labels, validate,
                                warn_foreign_data_free)

FACTOR_DTYPES = ("float32", "bfloat16")


class MergeResult(NamedTuple):
    """``params``: merged pytree (structure and dtypes of ``base``). ``diagnostics``: a
    :class:`~bmm_jax.diagnostics.MergeDiagnostics` pytree (``["modules"][path]`` ->
    ``rho, scale, lambda, delta_norm, anchor_distance, carried, kind, block, shape``; ``["carry"]``,
    ``["prior"]``, ``["num_experts"]``, ``["devices"]``)."""
    params: PyTree
    diagnostics: MergeDiagnostics


# ------------------------------------------------------------------------------ inputs
def resolve_anchor(anchor, base: PyTree, experts: Sequence[PyTree], *, grams=None,
                   labels: PyTree | None = None) -> PyTree:
    """Anchor params from a params pytree, an object with ``.params``, a
    :class:`~bmm_jax.anchors.LinearAnchor`, or an anchor name."""
    from bmm_jax.anchors import LinearAnchor
    if isinstance(anchor, LinearAnchor):
        anchor = anchor.materialize(base, experts)
    if isinstance(anchor, str):
        from bmm_jax import anchors
        fn = anchors.get(anchor)
        if anchor == "regmean":
            if grams is None:
                raise ValueError("anchor 'regmean' needs activation Grams (grams=...)")
            anchor = fn(base, experts, grams=grams, labels=labels)
        elif anchor in ("wudi", "tsv", "iso_c", "iso_cts") and labels is not None:
            anchor = fn(base, experts, labels=labels)
        else:
            anchor = fn(base, experts)
    if anchor is None:
        raise TypeError("anchor is required: a params pytree, an object with .params, or an anchor name "
                        "such as 'task_arithmetic'")
    if hasattr(anchor, "params") and not isinstance(anchor, Mapping):
        anchor = anchor.params
    check_experts(base, [anchor], min_experts=1, names=["anchor"], check_finite=False)
    return anchor


def resolve_mesh(mesh, devices, trees) -> jax.sharding.Mesh | None:
    """Where stacked solves run: ``mesh`` (or a mesh over ``devices``) if given; ``None`` (per-module
    calls keeping each leaf's sharding) when the inputs are already sharded over several devices or
    only one device is visible; else a 1-D mesh over every local device."""
    if mesh is not None and devices is not None:
        raise TypeError("pass either mesh= or devices=, not both")
    if mesh is not None:
        if not isinstance(mesh, jax.sharding.Mesh):
            raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
        return mesh if mesh.devices.size > 1 else None
    if devices is not None:
        devs = np.asarray(list(devices)).reshape(-1)
        return jax.sharding.Mesh(devs, ("modules",)) if devs.size > 1 else None
    for leaf in jax.tree_util.tree_leaves(trees):
        sh = getattr(leaf, "sharding", None)
        if sh is not None and len(sh.device_set) > 1:
            return None
    local = jax.local_devices()
    return jax.sharding.Mesh(np.asarray(local), ("modules",)) if len(local) > 1 else None


def carried_leaf(mode: str, base_leaf, anchor_leaf, expert_leaves, anchor_scale=1.0):
    """A carried (not regressed) leaf: the anchor's (its task vector times ``anchor_scale``), the
    base's, or ``theta_0 + mean_k tau_k``; non-floating leaves are taken as they are."""
    if mode == "anchor":
        if isinstance(anchor_scale, (int, float)) and anchor_scale == 1.0:
            return anchor_leaf
        b = jnp.asarray(base_leaf)
        if not jnp.issubdtype(b.dtype, jnp.floating):
            return anchor_leaf
        b32 = b.astype(jnp.float32)
        return (b32 + anchor_scale * (jnp.asarray(anchor_leaf).astype(jnp.float32) - b32)).astype(b.dtype)
    if mode == "base":
        return base_leaf
    b = jnp.asarray(base_leaf)
    if not jnp.issubdtype(b.dtype, jnp.floating):
        return base_leaf
    b32 = b.astype(jnp.float32)
    mean = sum(jnp.asarray(e).astype(jnp.float32) - b32 for e in expert_leaves) / len(expert_leaves)
    return (b32 + mean).astype(b.dtype)


def raise_for_status(label: Label, st: Mapping, rho) -> None:
    """Eager: a clear error for a module whose solve failed (statuses read on the host)."""
    p = label.path
    if not st["changed"]:
        return
    if not st["finite_s"]:
        raise ValueError(f"module '{p}': the normal equations overflowed float32 (task-vector entries up to "
                         f"{st['max_abs']:.3g}): the experts' values are too large to square; rescale them")
    if st["trace_s"] <= 0.0:
        raise ValueError(f"singular system at module '{p}': every Gram is zero there (S = 0), "
                         "although the experts changed it; check the Gram estimation")
    if st["singular"]:
        raise ValueError(f"singular system at module '{p}' ({label.d_in} x {label.d_out}): rho = 0 and the "
                         "weighted Gram S is rank-deficient; use rho > 0 (the anchor prior regularises it)")
    if not st["finite_out"]:
        raise ValueError(f"singular system at module '{p}': the solve produced NaN/Inf (rho = {rho}); "
                         "increase rho")


def module_diagnostics(label: Label, rho, scale, st) -> ModuleDiagnostics:
    """:class:`ModuleDiagnostics` from a status (host values eagerly, arrays under a trace)."""
    if isinstance(st, Mapping):
        return ModuleDiagnostics(rho, scale, float(st["lam"]), float(st["delta_norm"]),
                                 float(st["anchor_distance"]), not bool(st["changed"]),
                                 label.kind, label.block, (label.d_in, label.d_out))
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    return ModuleDiagnostics(f32(rho), f32(scale), st.lam, st.delta_norm, st.anchor_distance, st.changed == 0,
                             label.kind, label.block, (label.d_in, label.d_out))


class MergeInputs(NamedTuple):
    """Validated inputs of :func:`merge` / :func:`bmm_jax.prepare`, flattened to leaf lists."""
    experts: list
    labels: PyTree
    lab: list
    k: int
    w: Any
    traced: bool
    base_leaves: list
    treedef: Any
    anchor_leaves: list
    expert_leaves: list
    owned: bool


def merge_inputs(base, experts, anchor, grams, *, labels, carry: str, prior: str, weights, validate: bool,
                 also_traced=None, linear_regressed: bool = False) -> MergeInputs:
    """The shell shared by :func:`merge` and :func:`bmm_jax.prepare`: static checks (experts, options,
    labels, weights, the anchor's structure), the eager value checks unless traced or ``validate`` is
    False, the anchor computed if named (``owned``), data-free Grams of other experts warned about.
    ``linear_regressed``: the caller solves the regressed modules from a linear anchor's coefficients,
    so those anchor leaves are left as the base's (never computed)."""
    experts = check_experts(base, experts, check_finite=False)
    check_option(carry, "carry mode", CARRY)
    check_option(prior, "prior", PRIORS)
    labels, lab = resolve_labels(labels, base)
    w = check_weights(weights, len(experts))
    from bmm_jax.anchors import LinearAnchor
    owned = isinstance(anchor, (str, LinearAnchor))     # computed here: nobody else holds its leaves
    if linear_regressed and isinstance(anchor, str):
        from bmm_jax.anchors import LINEAR
        if anchor in LINEAR:
            anchor = LinearAnchor.of(anchor, len(experts))
    linear = anchor if isinstance(anchor, LinearAnchor) and linear_regressed else None
    if linear is not None:
        linear.check(len(experts))
        anchor = None                      # materialised below, after the inputs are checked
    elif not isinstance(anchor, str) and anchor is not None:
        anchor = resolve_anchor(anchor, base, experts)
    traced = is_traced((base, experts, anchor, grams, weights, also_traced))
    if validate and not traced:
        from bmm_jax import validation
        validation.validate(base, experts, None if isinstance(anchor, str) else anchor, grams, labels=labels)
    if linear is not None:                 # the regressed modules take the coefficients: their anchor leaves
        anchor = linear.materialize(base, experts, skip=[l.regressed for l in lab])   # are never computed
    anchor = resolve_anchor(anchor, base, experts, grams=grams, labels=labels)
    base_leaves, treedef = jax.tree_util.tree_flatten(base)
    anchor_leaves = jax.tree_util.tree_leaves(anchor)
    expert_leaves = [jax.tree_util.tree_leaves(e) for e in experts]
    warn_foreign_data_free(grams, lab, base_leaves, expert_leaves)
    return MergeInputs(experts, labels, lab, len(experts), w, traced, base_leaves, treedef, anchor_leaves,
                       expert_leaves, owned)


def _linear_coefficients(anchor, experts):
    """``[K]`` float32 coefficients of a linear anchor (a :class:`~bmm_jax.anchors.LinearAnchor` or
    the names ``"task_arithmetic"`` / ``"average"`` with their default scale), else ``None``."""
    from bmm_jax.anchors import LINEAR, LinearAnchor
    if not isinstance(experts, Sequence) or isinstance(experts, (str, bytes)) or len(experts) < 2:
        return None                         # check_experts names the problem
    if isinstance(anchor, str) and anchor in LINEAR:
        anchor = LinearAnchor.of(anchor, len(experts))
    if isinstance(anchor, LinearAnchor):
        return anchor.check(len(experts))
    return None


# ------------------------------------------------------------------------------ merge
def merge(base: PyTree, experts: Sequence[PyTree], anchor, grams=None, hparams: Mapping | None = None, *,
          labels: PyTree | None = None, carry: str = "anchor", prior: str = "isotropic", weights=None,
          mesh=None, devices=None, validate: bool = True) -> MergeResult:
    """Bayesian Model Merging of ``experts`` around ``anchor`` (method.md §2). Pure and traceable.

    Args:
      base: pretrained params ``theta_0`` (a pytree of arrays: jax, numpy, or tracers).
      experts: list of K >= 2 fine-tuned params pytrees with the structure, shapes and dtypes of
        ``base``.
      anchor: the anchor merge: a params pytree, an object with ``.params``, the name of an
        anchor in :mod:`bmm_jax.anchors` (computed with its default options), or a
        :class:`~bmm_jax.anchors.LinearAnchor` ``theta_0 + sum_k c_k tau_k``. A linear anchor (also
        the names ``"task_arithmetic"`` and ``"average"``) enters the regressed modules' solves as
        its coefficients: ``T_a`` is formed in float32 from the task vectors, never read rounded
        to the model's dtype, and low-rank data-free modules are solved in its span.
      grams: per-module Grams ``[K, d_in, d_in]``: a :class:`bmm_jax.grams.Grams` (any of
        ``data_free`` / ``activations`` / ``hybrid``) or a dict ``{module path: array}``.
        ``None``: data-free Grams (§3.2), formed in the solve from the task kernels.
      hparams: ``{"rho": 0.3, "scale": 1.0}`` for all modules, or a mapping from group labels
        (module path, ``"block3"``, kind, ``"global"``) to such dicts (:mod:`bmm_jax.hparams`).
        Values may be traced scalars. Default ``{"rho": 1.0, "scale": 1.0}``.
      labels: label tree (default :func:`bmm_jax.build_labels(base) <bmm_jax.labels.build_labels>`).
      carry: where carried (non-regressed) leaves come from: ``"anchor"``, ``"base"``, ``"mean"``.
      prior: ``"isotropic"`` or ``"diagonal"``.
      weights: ``[K]`` task weights (default 1; may be traced).
      mesh: a :class:`jax.sharding.Mesh` over which same-shape modules are stacked and solved
        (default: inputs already sharded keep their sharding; else all local devices).
      devices: legacy alternative to ``mesh``: a list of devices.
      validate: run the eager value checks (NaN/Inf, Gram symmetry); ``False`` skips them. The
        static checks always run.

    Returns:
      :class:`MergeResult` ``(params, diagnostics)``, both pytrees.

    Raises:
      ValueError / TypeError: invalid experts (naming the leaf and the problem), unknown anchor /
      carry / prior, bad hparams, Grams missing or misshapen for a module, or (eagerly) a singular or
      overflowing system (the module is named).
    """
    hp_in = {"rho": 1.0, "scale": 1.0} if hparams is None else hparams
    check_keys(hp_in)
    coefficients = _linear_coefficients(anchor, experts)
    inp = merge_inputs(base, experts, anchor, grams, labels=labels, carry=carry, prior=prior, weights=weights,
                       validate=validate, also_traced=(hp_in, coefficients),
                       linear_regressed=coefficients is not None)
    labels, lab, k, w, traced = inp.labels, inp.lab, inp.k, inp.w, inp.traced
    base_leaves, treedef, anchor_leaves, expert_leaves = inp.base_leaves, inp.treedef, inp.anchor_leaves, inp.expert_leaves
    owned = inp.owned
    hp = resolve_hparams(hp_in, labels)
    jobs, index = [], []
    for i, l in enumerate(lab):
        if not l.regressed:
            continue
        es = tuple(e[i] for e in expert_leaves)
        how, g = module_gram(grams, l, base_leaves[i], es, k)
        rho, scale = hp[l.path]
        check_singular = (not traced) and isinstance(rho, (int, float)) and float(rho) == 0.0
        if coefficients is None:
            jobs.append(ModuleJob(l, how, base_leaves[i], es, g, anchor_leaves[i], rho, scale, check_singular))
        else:                                  # the anchor enters as T_a = sum_k c_k T_k: no anchor leaf read
            jobs.append(ModuleJob(l, how, base_leaves[i], es, g, None, rho, scale, check_singular, coefficients))
        index.append(i)
    the_mesh = None if traced else resolve_mesh(mesh, devices, (base, experts))
    release = owned and not traced             # an owned anchor's module leaves: freed as their modules are solved
    if release:
        for i in index:
            anchor_leaves[i] = None
        del inp
    leaves, statuses = solve_modules(jobs, w, prior, mesh=the_mesh, traced=traced, after_chunk=maybe_trim,
                                     release_anchors=release)
    if not traced:
        host = jax.device_get([s._asdict() for s in statuses])   # one transfer of every module's status
        for job, st in zip(jobs, host):
            raise_for_status(job.label, st, job.rho)
        statuses = host
        leaves = [_place_like(leaf, job.base) for leaf, job in zip(leaves, jobs)]
    solved = dict(zip(index, leaves))
    modules = {jobs[j].label.path: module_diagnostics(jobs[j].label, jobs[j].rho, jobs[j].scale, statuses[j])
               for j in range(len(jobs))}
    out = []
    for i, (l, b) in enumerate(zip(lab, base_leaves)):
        if i in solved:
            out.append(solved[i])
        else:
            out.append(carried_leaf(carry, b, anchor_leaves[i], [e[i] for e in expert_leaves]))
    params = jax.tree_util.tree_unflatten(treedef, out)
    n_dev = 1 if the_mesh is None else int(the_mesh.devices.size)
    return MergeResult(params, MergeDiagnostics(modules, carry, prior, k, n_dev, "float32"))


def _place_like(leaf, base_leaf):
    """Put a merged leaf where its base leaf lives (a stacked solve leaves it on a mesh device)."""
    sh = getattr(base_leaf, "sharding", None)
    if isinstance(base_leaf, jax.Array) and sh is not None and leaf.sharding != sh:
        return jax.device_put(leaf, sh)
    return leaf


# re-exported for compatibility: the fast path lives in bmm_jax.prepared
from bmm_jax.prepared import Prepared, prepare  # noqa: E402

__all__ = ["merge", "prepare", "Prepared", "MergeResult", "FACTOR_DTYPES", "resolve_hparams", "resolve_anchor",
           "module_keys", "CARRY", "carried_leaf", "validate", "FALLBACK_KEYS", "KIND_ALIASES"]
