"""The one solve engine: a pure function per module, applied whole under a trace or chunk by chunk.

:func:`solve_module` takes one regressed module's leaves (base, K experts, anchor), its Gram input
and its hyperparameters and returns the merged leaf and a :class:`ModuleStatus` of small arrays::

    T_k = W_k - W_0 (2-D view)   S = sum_k w_k G_k   B = sum_k w_k G_k T_k   T_a = W_a - W_0
    lambda = rho tr(S) / d_in    W = W_0 + s (S + lambda P)^{-1} (B + lambda P T_a)

It is pure JAX: ``jit``, ``vmap``, ``scan`` and ``grad`` (with respect to the leaves, the task
weights, ``rho`` and ``s``) all apply. A module that no expert changed (``T_k = 0`` for all k)
returns the base leaf (selected on device, no host decision). :func:`solve_stack` is the same
function vmapped over a leading module axis. :func:`solve_modules` is the driver used by
:func:`bmm_jax.merge`: traced, it applies :func:`solve_module` to every module; eager, it runs one
jitted call per module (one device, or inputs already sharded over a mesh: the output keeps the
base leaf's sharding) or one jitted :func:`solve_stack` per chunk of same-shape modules sharded over
a device mesh, blocking per chunk so memory stays bounded, and reads the statuses once at the end.

Gram inputs per module (``how``, static): ``"data_free"`` (``G_k = T_k T_k^T / ||T_k||^2`` formed
from the task kernels in-kernel), ``"factor"`` (``F [K, d_in, r]`` with ``G_k = F_k F_k^T``) or
``"dense"`` (``G [K, d_in, d_in]``).
"""
from __future__ import annotations

import functools
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from bmm_jax.grams.data_free import normalized_weights
from bmm_jax.labels import Label
from bmm_jax.solve import _solve_one, normal_equations, normal_equations_factored
from bmm_jax.solve_data_free import _is_singular, solve_linear_anchor, solve_wide, task_rows
from bmm_jax.solve_lowrank import _data_free_alpha, _woodbury, prefer_woodbury

HOWS = ("data_free", "factor", "dense")


class ModuleStatus(NamedTuple):
    """Per-module scalars (float32 arrays; batched under vmap): ``changed`` (1 if some expert changed
    the module), ``trace_s`` (``tr S``), ``finite_s`` (1 if ``S`` and ``B`` are finite),
    ``finite_out`` (1 if the solution is finite), ``singular`` (1 if ``rho = 0`` and ``S`` is
    numerically singular; only computed when asked), ``lam`` (``lambda``), ``delta_norm``
    (``||s Delta||_F``), ``anchor_distance`` (``||s Delta - s T_a||_F / ||T_a||_F``), ``max_abs``
    (largest ``|T_k|`` entry, to name an overflow)."""
    changed: jax.Array
    trace_s: jax.Array
    finite_s: jax.Array
    finite_out: jax.Array
    singular: jax.Array
    lam: jax.Array
    delta_norm: jax.Array
    anchor_distance: jax.Array
    max_abs: jax.Array


def view_label(view: tuple) -> Label:
    """A path-less :class:`Label` for a static ``view = (layout, d_in, d_out)``."""
    layout, d_in, d_out = view
    return Label(path="", regressed=True, layout=layout, d_in=d_in, d_out=d_out)


def task_kernels(label: Label, base_leaf, expert_leaves):
    """``[K, d_in, d_out]`` float32 task kernels ``T_k = W_k - W_0`` in the 2-D view."""
    b = base_leaf.astype(jnp.float32)
    return label.to_matrix(jnp.stack([e.astype(jnp.float32) - b for e in expert_leaves]))


def anchor_matrix(label: Label, base_leaf, anchor_leaf, t, anchor_coefficients=None):
    """``T_a [d_in, d_out]``: ``sum_k c_k T_k`` from ``anchor_coefficients [K]`` (a linear anchor such as
    Task Arithmetic; ``t`` the ``[K, d_in, d_out]`` task kernels) or ``W_a - W_0`` from the anchor leaf."""
    if anchor_coefficients is not None:
        return jnp.einsum("k,kio->io", jnp.asarray(anchor_coefficients, jnp.float32), t)
    return label.to_matrix(anchor_leaf.astype(jnp.float32) - base_leaf.astype(jnp.float32))


def module_statistics(view: tuple, how: str, base_leaf, expert_leaves, gram, anchor_leaf, weights,
                      anchor_coefficients=None):
    """``(S [d,d], B [d,do], T_a [d,do], changed, max_abs)`` of one module (pure)."""
    label = view_label(view)
    t = task_kernels(label, base_leaf, expert_leaves)
    w = jnp.asarray(weights, jnp.float32)
    if how == "data_free":          # F_k F_k^T = T_k T_k^T / ||T_k||^2: no [K, d_in, d_out] factor array
        s, b = normal_equations_factored(t, t, normalized_weights(t, w), self_factored=True)
    elif how == "factor":
        s, b = normal_equations_factored(t, gram.astype(jnp.float32), w)
    elif how == "dense":
        s, b = normal_equations(t, gram.astype(jnp.float32), w)
    else:
        raise ValueError(f"unknown Gram input {how!r}; expected one of {HOWS}")
    ta = anchor_matrix(label, base_leaf, anchor_leaf, t, anchor_coefficients)
    absmax = jnp.max(jnp.abs(t))
    return s, b, ta, absmax > 0, absmax


def _norm(x):
    return jnp.sqrt(jnp.sum(jnp.square(x)))


def solve_module(view: tuple, how: str, prior: str, base_leaf, expert_leaves: Sequence, gram, anchor_leaf,
                 weights, rho, scale, *, check_singular: bool = False, anchor_coefficients=None):
    """One module of BMM, pure: returns ``(merged leaf, ModuleStatus)``.

    Args:
      view: static ``(layout, d_in, d_out)`` of the module (:class:`bmm_jax.labels.Label`).
      how: static ``"data_free" | "factor" | "dense"`` (see the module docstring).
      prior: static ``"isotropic" | "diagonal"``.
      base_leaf, expert_leaves, anchor_leaf: the module's leaves in their stored layout.
      gram: ``None`` (data_free), ``F [K, d_in, r]`` or ``G [K, d_in, d_in]``.
      weights: ``[K]`` task weights. rho, scale: scalars (traceable).
      check_singular: static; also test ``S`` for singularity (an eigendecomposition; the eager
        driver asks for it only where ``rho = 0``).
      anchor_coefficients: ``None`` or ``[K]`` (may be traced): the anchor is linear in the task
        vectors, ``T_a = sum_k c_k T_k`` (Task Arithmetic: ``c_k = alpha``; averaging: ``1 / K``);
        ``anchor_leaf`` is then not read (pass ``None``).

    Data-free Grams with the isotropic prior take the row-oriented solves of
    :mod:`bmm_jax.solve_data_free`: ``K d_out > d_in`` in ``d_in`` space; ``K d_out <= d_in`` with a
    linear anchor in the ``K d_out`` space (push-through), which never forms ``B`` or ``T_a``.

    The merged leaf has the base leaf's shape and dtype; an unchanged module returns the base leaf.
    """
    label = view_label(view)
    k, d_in, d_out = len(expert_leaves), view[1], view[2]
    if how == "data_free" and prior == "isotropic" and (k * d_out > d_in or anchor_coefficients is not None):
        return _solve_module_rows(view, base_leaf, expert_leaves, anchor_leaf, anchor_coefficients, weights, rho,
                                  scale, check_singular)
    if prior == "isotropic" and how in ("data_free", "factor") and prefer_woodbury(
            d_in, d_out, k, None if gram is None else int(gram.shape[-1])):
        return _solve_module_lowrank(view, how, base_leaf, expert_leaves, gram, anchor_leaf, weights, rho, scale,
                                     check_singular, anchor_coefficients)
    s, b, ta, changed, absmax = module_statistics(view, how, base_leaf, expert_leaves, gram, anchor_leaf, weights,
                                                  anchor_coefficients)
    d = s.shape[-1]
    # an unchanged module has S = 0 (lambda = 0): solve a harmless system instead, then select the base
    s_safe = jnp.where(changed, s, jnp.eye(d, dtype=s.dtype))
    rho = jnp.asarray(rho, jnp.float32)
    scale = jnp.asarray(scale, jnp.float32)
    out = _solve_one(s_safe, b, ta, rho, scale, prior == "diagonal")
    base32 = base_leaf.astype(jnp.float32)
    merged = (base32 + label.from_matrix(out).reshape(base_leaf.shape)).astype(base_leaf.dtype)
    leaf = jnp.where(changed, merged, base_leaf)
    tr = jnp.trace(s)
    ta_norm = _norm(ta)
    status = ModuleStatus(
        changed=changed.astype(jnp.float32), trace_s=tr,
        finite_s=(jnp.isfinite(tr) & jnp.all(jnp.isfinite(b))).astype(jnp.float32),
        finite_out=jnp.all(jnp.isfinite(out)).astype(jnp.float32),
        singular=_is_singular(s_safe) if check_singular else jnp.zeros((), jnp.float32),
        lam=jnp.where(changed, rho * tr / d, 0.0),
        delta_norm=jnp.where(changed, _norm(out), 0.0),
        anchor_distance=jnp.where(changed, _norm(out - scale * ta) / jnp.maximum(ta_norm, 1e-30), 0.0),
        max_abs=absmax)
    return leaf, status


def _solve_module_rows(view, base_leaf, expert_leaves, anchor_leaf, anchor_coefficients, weights, rho, scale,
                       check_singular: bool):
    """:func:`solve_module` for data-free Grams and the isotropic prior, in row orientation
    (:mod:`bmm_jax.solve_data_free`)."""
    label = view_label(view)
    k, d_in, d_out = len(expert_leaves), view[1], view[2]

    def to_rows(x):                       # leaf-shaped -> [d_out, d_in] (a no-op for "transposed")
        return jnp.swapaxes(label.to_matrix(x), -1, -2)

    u = task_rows(to_rows, base_leaf, expert_leaves)
    rho = jnp.asarray(rho, jnp.float32)
    scale = jnp.asarray(scale, jnp.float32)
    if k * d_out > d_in:
        if anchor_coefficients is not None:
            c = jnp.asarray(anchor_coefficients, jnp.float32)
            ta_rows = sum(c[i] * u[i] for i in range(k))
        else:
            ta_rows = to_rows(anchor_leaf.astype(jnp.float32) - base_leaf.astype(jnp.float32))
        out, st = solve_wide(u, ta_rows, weights, rho, scale, check_singular=check_singular)
    else:
        out, st = solve_linear_anchor(u, anchor_coefficients, weights, rho, scale, check_singular=check_singular)
    base32 = base_leaf.astype(jnp.float32)
    merged = (base32 + label.from_matrix(jnp.swapaxes(out, -1, -2)).reshape(base_leaf.shape)).astype(base_leaf.dtype)
    changed = st.changed
    leaf = jnp.where(changed, merged, base_leaf)
    ta_norm = _norm(st.ta_rows)
    status = ModuleStatus(
        changed=changed.astype(jnp.float32), trace_s=st.trace_s, finite_s=st.finite_s,
        finite_out=jnp.all(jnp.isfinite(out)).astype(jnp.float32),
        singular=st.singular,
        lam=jnp.where(changed, rho * st.trace_s / d_in, 0.0),
        delta_norm=jnp.where(changed, _norm(out), 0.0),
        anchor_distance=jnp.where(changed, _norm(out - scale * st.ta_rows) / jnp.maximum(ta_norm, 1e-30), 0.0),
        max_abs=st.max_abs)
    return leaf, status


def _solve_module_lowrank(view, how, base_leaf, expert_leaves, gram, anchor_leaf, weights, rho, scale,
                          check_singular: bool, anchor_coefficients=None):
    """:func:`solve_module` in the rank of the Grams (Woodbury, :mod:`bmm_jax.solve_lowrank`) when
    ``K r < d_in`` makes it cheaper: only an ``R x R`` system (``R = K r``) is factored, no
    ``d_in x d_in`` matrix formed. ``S`` then has rank ``<= R < d_in``: ``rho = 0`` is singular."""
    label = view_label(view)
    t = task_kernels(label, base_leaf, expert_leaves)
    w = jnp.asarray(weights, jnp.float32)
    ta = anchor_matrix(label, base_leaf, anchor_leaf, t, anchor_coefficients)
    absmax = jnp.max(jnp.abs(t))
    changed = absmax > 0
    rho = jnp.asarray(rho, jnp.float32)
    scale = jnp.asarray(scale, jnp.float32)
    if how == "data_free":
        alpha = _data_free_alpha(t, w)
        fs = [t[i] for i in range(t.shape[0])]
        tr = jnp.sum(alpha * alpha * jnp.sum(t * t, axis=(-2, -1)))
        out = _woodbury(t, fs, ta, alpha, rho, scale, True)
    else:
        f = gram.astype(jnp.float32)
        alpha = jnp.sqrt(w)
        fs = [f[i] for i in range(f.shape[0])]
        tr = jnp.sum(w * jnp.sum(f * f, axis=(-2, -1)))
        out = _woodbury(t, fs, ta, alpha, rho, scale, False)
    d = view[1]
    base32 = base_leaf.astype(jnp.float32)
    merged = (base32 + label.from_matrix(out).reshape(base_leaf.shape)).astype(base_leaf.dtype)
    leaf = jnp.where(changed, merged, base_leaf)
    ta_norm = _norm(ta)
    status = ModuleStatus(
        changed=changed.astype(jnp.float32), trace_s=tr,
        finite_s=(jnp.isfinite(tr) & jnp.all(jnp.isfinite(t))).astype(jnp.float32),
        finite_out=jnp.all(jnp.isfinite(out)).astype(jnp.float32),
        singular=jnp.ones((), jnp.float32) if check_singular else jnp.zeros((), jnp.float32),
        lam=jnp.where(changed, rho * tr / d, 0.0),
        delta_norm=jnp.where(changed, _norm(out), 0.0),
        anchor_distance=jnp.where(changed, _norm(out - scale * ta) / jnp.maximum(ta_norm, 1e-30), 0.0),
        max_abs=absmax)
    return leaf, status


def solve_stack(view: tuple, how: str, prior: str, base_leaves, expert_leaves: Sequence, grams, anchor_leaves,
                weights, rho, scale, *, check_singular: bool = False, anchor_coefficients=None):
    """:func:`solve_module` vmapped over a leading module axis ``[M, ...]`` of every array argument
    (``expert_leaves``: K arrays ``[M, ...]``; ``grams``: ``None`` or ``[M, K, ...]``; ``rho``,
    ``scale``: ``[M]``; ``anchor_leaves``: ``[M, ...]`` or ``None`` with ``anchor_coefficients [M, K]``);
    ``weights [K]`` is shared."""
    def fn(b, es, g, a, w, r, s, c):
        return solve_module(view, how, prior, b, es, g, a, w, r, s, check_singular=check_singular,
                            anchor_coefficients=c)
    in_axes = (0, 0, None if grams is None else 0, None if anchor_leaves is None else 0, None, 0, 0,
               None if anchor_coefficients is None else 0)
    return jax.vmap(fn, in_axes=in_axes)(base_leaves, list(expert_leaves), grams, anchor_leaves, weights, rho, scale,
                                         anchor_coefficients)


def _solve_module_body(view, how, prior, check_singular, out_sharding, base_leaf, expert_leaves, gram, anchor_leaf,
                       weights, rho, scale, anchor_coefficients):
    leaf, status = solve_module(view, how, prior, base_leaf, expert_leaves, gram, anchor_leaf, weights, rho, scale,
                                check_singular=check_singular, anchor_coefficients=anchor_coefficients)
    if out_sharding is not None:
        leaf = jax.lax.with_sharding_constraint(leaf, out_sharding)
    return leaf, status


_solve_module_jit = jax.jit(_solve_module_body, static_argnums=(0, 1, 2, 3, 4))
# The same, writing the merged leaf into the anchor leaf's buffer (an anchor the caller owns, of the
# base's shape and dtype): the merged model then takes no memory beyond the anchor's.
_solve_module_jit_into_anchor = jax.jit(_solve_module_body, static_argnums=(0, 1, 2, 3, 4), donate_argnums=(8,))


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _solve_stack_jit(view, how, prior, check_singular, base_leaves, expert_leaves, grams, anchor_leaves, weights,
                     rho, scale, anchor_coefficients):
    return solve_stack(view, how, prior, base_leaves, expert_leaves, grams, anchor_leaves, weights, rho, scale,
                       check_singular=check_singular, anchor_coefficients=anchor_coefficients)


class ModuleJob(NamedTuple):
    """One regressed module for :func:`solve_modules`: its label, leaves, Gram input and hparams;
    ``anchor_coefficients`` (``[K]``) replaces ``anchor`` for a linear anchor (:func:`solve_module`)."""
    label: Label
    how: str
    base: Any
    experts: tuple
    gram: Any
    anchor: Any
    rho: Any
    scale: Any
    check_singular: bool
    anchor_coefficients: Any = None


def _sharding_of(x):
    """The NamedSharding of a committed multi-device jax array, else ``None``."""
    sh = getattr(x, "sharding", None)
    if isinstance(sh, jax.sharding.NamedSharding) and len(sh.device_set) > 1:
        return sh
    return None


# Cap on the float32 elements of one chunk's working set (task kernels and their transforms, S, B,
# the result; :func:`working_elements`): the eager driver blocks after every chunk, so its transient
# memory is about one chunk on top of the inputs. A module above the cap is a chunk of its own.
CHUNK_ELEMENTS = 2 ** 24


def working_elements(d_in: int, d_out: int, k: int) -> int:
    """Float32 elements a module's solve holds at once: the ``K`` task kernels and one transform of
    them, ``T_a``, ``B`` and the result (``(2K + 3) d_in d_out``), ``S`` and its factor (``2 d_in^2``)."""
    return (2 * k + 3) * d_in * d_out + 2 * d_in * d_in


def _chunks(jobs: Sequence[ModuleJob], n_devices: int, max_elements: int = CHUNK_ELEMENTS):
    """Indices into ``jobs`` grouped by ``(view, how, dtype, check_singular)`` and split into chunks of
    a multiple of ``n_devices`` modules (balanced sizes, so a shape compiles at most twice)."""
    groups: dict[tuple, list[int]] = {}
    for j, job in enumerate(jobs):
        l = job.label
        key = ((l.layout, l.d_in, l.d_out), job.how, str(job.base.dtype), job.check_singular,
               None if job.gram is None else tuple(job.gram.shape), job.anchor_coefficients is None)
        groups.setdefault(key, []).append(j)
    for key, idx in groups.items():
        (_, d_in, d_out) = key[0]
        per = working_elements(d_in, d_out, len(jobs[idx[0]].experts))
        cap = n_devices * max(1, max_elements // (n_devices * per))
        n_chunks = -(-len(idx) // cap)
        size = -(-len(idx) // n_chunks)
        size = -(-size // n_devices) * n_devices
        for a in range(0, len(idx), size):
            yield key, idx[a:a + size]


def _pad_stack(arrays: Sequence, target: int):
    x = jnp.stack([jnp.asarray(a) for a in arrays])
    if target > x.shape[0]:
        x = jnp.concatenate([x, jnp.broadcast_to(x[:1], (target - x.shape[0],) + x.shape[1:])])
    return x


def solve_modules(jobs: Sequence[ModuleJob], weights, prior: str, *, mesh=None, traced: bool = False,
                  progress=None, after_chunk=None, release_anchors: bool = False):
    """Merged leaves and statuses of every job: ``([leaf], [ModuleStatus])`` in job order.

    ``traced``: apply :func:`solve_module` directly (inside the caller's trace). Otherwise eager:
    ``mesh`` (a :class:`jax.sharding.Mesh` over more than one device) stacks same-shape modules over
    its devices; without one each module is one jitted call whose output keeps the base leaf's
    sharding. Eager calls block after each chunk (bounded memory) and call ``after_chunk()``.

    ``release_anchors`` (eager, ``jobs`` a list, the anchor owned by the caller): replace each job by
    one without its anchor leaf as soon as the module is dispatched, and (single device) donate the
    anchor leaf so the merged leaf is written into its buffer (never when the anchor leaf is the base
    or an expert leaf): the anchor and the merged model then take one model's memory together, not
    two, and no module-sized output is allocated between transients (less heap fragmentation).
    """
    if traced:
        out = [solve_module((j.label.layout, j.label.d_in, j.label.d_out), j.how, prior, j.base, list(j.experts),
                            j.gram, j.anchor, weights, j.rho, j.scale, check_singular=False,
                            anchor_coefficients=j.anchor_coefficients) for j in jobs]
        return [o[0] for o in out], [o[1] for o in out]
    leaves: list = [None] * len(jobs)
    statuses: list = [None] * len(jobs)
    n_dev = 1 if mesh is None else int(mesh.devices.size)
    if n_dev <= 1:
        pending, size = [], 0
        if release_anchors:            # an anchor array is donated only if no other job or input holds it
            users = {id(x) for job in jobs for x in (job.base, *job.experts)}
            uses: dict[int, int] = {}
            for job in jobs:
                uses[id(job.anchor)] = uses.get(id(job.anchor), 0) + 1
        for j, job in enumerate(jobs):
            l = job.label
            anchor = job.anchor
            donate = (release_anchors and isinstance(anchor, jax.Array) and anchor.dtype == job.base.dtype
                      and anchor.shape == job.base.shape and not anchor.is_deleted()
                      and id(anchor) not in users and uses[id(anchor)] == 1)       # never a user's array
            fn = _solve_module_jit_into_anchor if donate else _solve_module_jit
            if release_anchors:
                jobs[j] = job._replace(anchor=None)
            leaf, st = fn((l.layout, l.d_in, l.d_out), job.how, prior, job.check_singular,
                          _sharding_of(job.base), jnp.asarray(job.base),
                          [jnp.asarray(e) for e in job.experts], job.gram,
                          None if anchor is None else jnp.asarray(anchor),
                          weights, jnp.float32(job.rho) if _is_py(job.rho) else job.rho,
                          jnp.float32(job.scale) if _is_py(job.scale) else job.scale,
                          None if job.anchor_coefficients is None else jnp.asarray(job.anchor_coefficients,
                                                                                   jnp.float32))
            del anchor
            leaves[j], statuses[j] = leaf, st
            size += working_elements(l.d_in, l.d_out, len(job.experts))
            del job
            pending.append(leaf)
            if size >= CHUNK_ELEMENTS:
                jax.block_until_ready(pending)
                pending, size = [], 0
                if after_chunk is not None:
                    after_chunk()
            if progress is not None:
                progress.update(1)
        jax.block_until_ready(pending)
        return leaves, statuses
    from jax.sharding import NamedSharding, PartitionSpec as P
    devices = mesh.devices.reshape(-1)
    flat_mesh = jax.sharding.Mesh(devices, ("modules",))

    def place(x):
        return jax.device_put(x, NamedSharding(flat_mesh, P("modules", *([None] * (x.ndim - 1)))))

    for key, idx in _chunks(jobs, n_dev):
        view, how, _, check_singular, _, no_coefficients = key
        m = len(idx)
        target = -(-m // n_dev) * n_dev
        sel = [jobs[j] for j in idx]
        k = len(sel[0].experts)
        base = place(_pad_stack([j.base for j in sel], target))
        experts = [place(_pad_stack([j.experts[e] for j in sel], target)) for e in range(k)]
        grams = None if sel[0].gram is None else place(_pad_stack([j.gram for j in sel], target))
        anchor = place(_pad_stack([j.anchor for j in sel], target)) if no_coefficients else None
        coefficients = None if no_coefficients else place(_pad_stack(
            [jnp.asarray(j.anchor_coefficients, jnp.float32) for j in sel], target))
        rho = place(_pad_stack([jnp.float32(j.rho) for j in sel], target))
        scale = place(_pad_stack([jnp.float32(j.scale) for j in sel], target))
        out, st = _solve_stack_jit(view, how, prior, check_singular, base, experts, grams, anchor, weights, rho, scale,
                                   coefficients)
        del base, experts, grams, anchor
        if release_anchors:
            for j in idx:
                jobs[j] = jobs[j]._replace(anchor=None)
            del sel
        for pos, j in enumerate(idx):
            leaves[j] = out[pos]
            statuses[j] = jax.tree_util.tree_map(lambda x: x[pos], st)
        jax.block_until_ready(out)
        del out
        if after_chunk is not None:
            after_chunk()
        if progress is not None:
            progress.update(m)
    return leaves, statuses


def _is_py(x) -> bool:
    return isinstance(x, (int, float, np.floating, np.integer))


__all__ = ["solve_module", "solve_stack", "solve_modules", "module_statistics", "task_kernels", "ModuleStatus",
           "ModuleJob", "view_label", "HOWS", "CHUNK_ELEMENTS"]
