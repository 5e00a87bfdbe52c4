"""The outer loop's fast path (method.md §2): factor every module once, re-solve in one matmul.

``prepare(base, experts, anchor, grams)`` forms each regressed module's ``S, B, T_a`` and factors
``S = Q diag(e) Q^T`` (isotropic prior) or keeps ``S, B, T_a`` (diagonal prior); the returned
:class:`Prepared` is a pytree. ``prep.params(hparams)`` re-solves the whole model for new
``(rho, scale)``::

    Delta = Q diag(1 / (e + lambda)) (Q^T B + lambda c Q^T T_a)      lambda = rho tr(S) / d_in

one matmul per module, as a pure function: ``jax.vmap`` over a batch of hyperparameter settings
evaluates several trials at once, ``jax.grad`` differentiates with respect to ``rho`` and ``s``.
``prep.sample(key, M, hparams)`` draws merged models from the posterior (method.md §5).
"""
from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from bmm_jax._tree import PyTree, is_traced
from bmm_jax.diagnostics import MergeDiagnostics, ModuleDiagnostics
from bmm_jax.engine import module_statistics
from bmm_jax.hparams import check_number, check_scale, concrete_float, resolve_hparams
from bmm_jax.labels import Label
from bmm_jax.memory import maybe_trim
from bmm_jax.solve import HIGHEST, EigenFactors, _factor_one, _solve_one
from bmm_jax.validation import check_option, module_gram

FACTOR_DTYPES = ("float32", "bfloat16")
# float32 elements of statistics per stack on one device (a stack's factors are formed module by
# module and stacked; smaller stacks keep the transient copy small)
STACK_ELEMENTS_1DEV = 2 ** 22
STACK_ELEMENTS = 2 ** 24


class Stack(NamedTuple):
    """Same-shape modules, stacked on a leading axis ``[M, ...]``.

    ``factors``: :class:`EigenFactors` (isotropic prior) or ``(S, B, T_a)`` (diagonal prior);
    ``changed [M]``: 1 where some expert changed the module (else it is carried from the base);
    ``lam_unit [M]``: ``tr(S) / d_in`` (``lambda = rho * lam_unit``)."""
    factors: Any
    changed: jax.Array
    lam_unit: jax.Array


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _module_factors_jit(view, how, prior, base_leaf, expert_leaves, gram, anchor_leaf, weights):
    return _module_factors(view, how, prior, base_leaf, expert_leaves, gram, anchor_leaf, weights)


def _module_factors(view, how, prior, base_leaf, expert_leaves, gram, anchor_leaf, weights):
    """``(factors, changed, tr(S)/d_in)`` of one module (pure). An unchanged module (``S = 0``) is
    factored as ``S = I`` (harmless; its result is replaced by the base leaf)."""
    s, b, ta, changed, _ = module_statistics(view, how, base_leaf, expert_leaves, gram, anchor_leaf, weights)
    d = s.shape[-1]
    s = jnp.where(changed, s, jnp.eye(d, dtype=s.dtype))
    unit = jnp.trace(s) / d
    if prior == "isotropic":
        f = _factor_one(s, b, ta)
    else:
        f = (s, b, ta)
    return f, changed.astype(jnp.float32), unit


@jax.jit
def _to_bfloat16(f: EigenFactors) -> EigenFactors:
    bf = jnp.bfloat16
    return EigenFactors(f.q.astype(bf), f.e, f.qtb.astype(bf), f.qtta.astype(bf), f.mean_e)


def _resolve_delta(prior: str, factors, rho, scale, c):
    """``(s Delta [d_in, d_out], ||s Delta - s c T_a||, ||c T_a||)`` of one module (pure)."""
    if prior == "isotropic":
        f = factors
        lam = rho * f.mean_e
        qtta = f.qtta.astype(jnp.float32)
        inner = (f.qtb.astype(jnp.float32) + (lam * c) * qtta) / (f.e + lam)[:, None]
        if f.q.dtype == jnp.bfloat16:
            out = jnp.matmul(f.q, inner.astype(jnp.bfloat16), preferred_element_type=jnp.float32)
        else:
            out = jnp.matmul(f.q, inner, precision=HIGHEST)
        dist = jnp.sqrt(jnp.sum(jnp.square(inner - c * qtta)))       # Q is orthogonal
        ta_norm = jnp.sqrt(jnp.sum(jnp.square(c * qtta)))
        return scale * out, scale * dist, ta_norm
    s, b, ta = factors
    out = _solve_one(s, b, c * ta, rho, 1.0, True)
    return scale * out, scale * jnp.sqrt(jnp.sum(jnp.square(out - c * ta))), jnp.sqrt(jnp.sum(jnp.square(c * ta)))


def _apply_stack(prior: str, layouts: tuple, stack_factors, changed, rho, scale, c, base_leaves, with_stats: bool):
    """Merged leaves of one stack (tuple, in stack order) and, if ``with_stats``, ``[M, 3]`` of
    ``(||s Delta||, anchor distance, 0)``. Pure; jitted per stack by the eager path."""
    out, stats = [], []
    for j, (b, layout) in enumerate(zip(base_leaves, layouts)):
        f = jax.tree_util.tree_map(lambda x: x[j], stack_factors)
        d, dist, ta_norm = _resolve_delta(prior, f, rho[j], scale[j], c)
        label = Label(path="", regressed=True, layout=layout, d_in=d.shape[0], d_out=d.shape[1])
        merged = (b.astype(jnp.float32) + label.from_matrix(d).reshape(b.shape)).astype(b.dtype)
        out.append(jnp.where(changed[j] > 0, merged, b))
        if with_stats:
            stats.append(jnp.stack([jnp.sqrt(jnp.sum(jnp.square(d))), dist / jnp.maximum(ta_norm, 1e-30)]))
    return tuple(out), (jnp.stack(stats) if with_stats else None)


_apply_stack_jit = jax.jit(_apply_stack, static_argnums=(0, 1, 8))


def _sample_stack(prior: str, layouts: tuple, stack_factors, changed, rho, scale, c, base_leaves, key, temperature):
    """One posterior draw of every module of a stack: ``W = W_0 + s (Delta* + sigma (S + lambda P)^{-1/2} Z)``."""
    out = []
    keys = jax.random.split(key, len(base_leaves))
    for j, (b, layout) in enumerate(zip(base_leaves, layouts)):
        f = jax.tree_util.tree_map(lambda x: x[j], stack_factors)
        d, _, _ = _resolve_delta(prior, f, rho[j], 1.0, c)
        z = jax.random.normal(keys[j], d.shape, jnp.float32)
        if prior == "isotropic":
            lam = rho[j] * f.mean_e
            noise = jnp.matmul(f.q.astype(jnp.float32), z / jnp.sqrt(f.e + lam)[:, None], precision=HIGHEST)
        else:
            s = f[0]
            lam = rho[j] * jnp.trace(s) / s.shape[-1]
            ds = jnp.diagonal(s)
            p = jnp.maximum(ds / jnp.maximum(jnp.mean(ds), jnp.finfo(s.dtype).tiny), jnp.finfo(s.dtype).eps)
            low = jnp.linalg.cholesky(s + jnp.diag(lam * p))
            noise = jax.scipy.linalg.solve_triangular(low, z, lower=True, trans="T")
        d = scale[j] * (d + temperature * noise)
        label = Label(path="", regressed=True, layout=layout, d_in=d.shape[0], d_out=d.shape[1])
        merged = (b.astype(jnp.float32) + label.from_matrix(d).reshape(b.shape)).astype(b.dtype)
        out.append(jnp.where(changed[j] > 0, merged, b))
    return tuple(out)


class Prepared:
    """Factored modules for repeated merges with new hyperparameters (a pytree).

    Attributes:
      labels: the label tree. ``modules``: paths of the solved modules (tree order).
      unchanged: regressed modules no expert changed (carried from the base; known eagerly only).
      num_experts: K. ``carry``, ``prior``, ``factor_dtype``: the options of :func:`prepare`.
    Methods: :meth:`params` (merged pytree), :meth:`deltas`, :meth:`merge` (:class:`MergeResult`),
    :meth:`sample` (posterior draws). All are pure in the hyperparameters: ``jit``, ``vmap`` over a
    batch of settings and ``grad`` apply; a :class:`Prepared` can itself be a ``jit`` argument.

    It keeps no reference to the experts (with ``carry="mean"`` the carried leaves ``theta_0 +
    mean_k tau_k`` are formed once, in :func:`prepare`): a caller may free them after :func:`prepare`.
    """

    def __init__(self, *, base_leaves, carry_leaves, stacks, treedef, labels_tree, lab, stack_paths, unchanged,
                 carry, prior, num_experts, factor_dtype, devices):
        self._base_leaves = list(base_leaves)
        self._carry_leaves = list(carry_leaves)
        self._stacks = list(stacks)
        self._treedef = treedef
        self.labels = labels_tree
        self._lab = tuple(lab)
        self._stack_paths = tuple(tuple(p) for p in stack_paths)
        self.unchanged = tuple(unchanged)
        self.carry, self.prior, self.num_experts = carry, prior, num_experts
        self.factor_dtype, self._devices = factor_dtype, devices
        order = {l.path: i for i, l in enumerate(self._lab)}
        self.modules = tuple(sorted((p for ps in self._stack_paths for p in ps if p not in set(self.unchanged)),
                                    key=order.__getitem__))
        self._index = {l.path: i for i, l in enumerate(self._lab)}

    # ------------------------------------------------------------------ pytree
    def _flatten(self):
        children = (self._base_leaves, self._carry_leaves, self._stacks)
        labels_flat, labels_def = jax.tree_util.tree_flatten(self.labels, is_leaf=lambda x: isinstance(x, Label))
        aux = (self._treedef, labels_def, tuple(labels_flat), self._lab, self._stack_paths, self.unchanged,
               self.carry, self.prior, self.num_experts, self.factor_dtype, self._devices)
        return children, aux

    @classmethod
    def _unflatten(cls, aux, children):
        (treedef, labels_def, labels_flat, lab, stack_paths, unchanged, carry, prior, k, fdt, devices) = aux
        base_leaves, carry_leaves, stacks = children
        return cls(base_leaves=base_leaves, carry_leaves=carry_leaves, stacks=stacks, treedef=treedef,
                   labels_tree=jax.tree_util.tree_unflatten(labels_def, labels_flat), lab=lab,
                   stack_paths=stack_paths, unchanged=unchanged, carry=carry, prior=prior, num_experts=k,
                   factor_dtype=fdt, devices=devices)

    # ------------------------------------------------------------------ hyperparameters
    def _per_stack(self, hparams: Mapping, anchor_scale):
        """``[(rho [M], scale [M])]`` per stack (host arrays for concrete numbers), checked."""
        hp = resolve_hparams(hparams, self.labels)
        traced = is_traced(hparams)
        out = []
        for st, paths in zip(self._stacks, self._stack_paths):
            rs = [hp[p][0] for p in paths]
            ss = [hp[p][1] for p in paths]
            if all(isinstance(x, (int, float, np.number)) for x in rs + ss):
                rho, sc = np.asarray(rs, np.float32), np.asarray(ss, np.float32)
                if np.any(rho == 0.0) and not traced:
                    self._check_rho_zero(st, paths, rho)
            else:
                rho = jnp.stack([jnp.asarray(x, jnp.float32) for x in rs])
                sc = jnp.stack([jnp.asarray(x, jnp.float32) for x in ss])
            out.append((rho, sc))
        return out

    def _check_rho_zero(self, st: Stack, paths, rho) -> None:
        if self.prior == "isotropic":
            e_min = jnp.min(st.factors.e, axis=-1)
            bad = jax.device_get((e_min <= 1e-7 * st.factors.mean_e) & (st.changed > 0))
        else:
            from bmm_jax.engine import _is_singular
            bad = jax.device_get(jax.vmap(_is_singular)(st.factors[0]) > 0)
        for j, p in enumerate(paths):
            if rho[j] == 0.0 and bool(bad[j]):
                raise ValueError(f"singular system at module '{p}': rho = 0 and S is rank-deficient; use rho > 0")

    def _anchor_scale(self, anchor_scale):
        check_number(anchor_scale, "anchor_scale")
        c = concrete_float(anchor_scale) if not isinstance(anchor_scale, jax.Array) else None
        if c is not None:
            check_scale(c, "anchor_scale")
        return anchor_scale

    def _traced(self, *xs) -> bool:
        return is_traced((self._base_leaves, self._stacks, xs))

    # ------------------------------------------------------------------ re-solve
    def _solved(self, hparams: Mapping, anchor_scale, with_stats: bool = False):
        """``({leaf index: merged leaf}, {path: (delta_norm, anchor_distance)} or None)``."""
        c = self._anchor_scale(anchor_scale)
        per = self._per_stack(hparams, c)
        traced = self._traced(hparams, anchor_scale)
        solved, stats = {}, ({} if with_stats else None)
        c_arr = np.float32(c) if isinstance(c, (int, float)) else jnp.asarray(c, jnp.float32)
        for st, paths, (rho, sc) in zip(self._stacks, self._stack_paths, per):
            idx = [self._index[p] for p in paths]
            layouts = tuple(self._lab[i].layout for i in idx)
            bases = tuple(jnp.asarray(self._base_leaves[i]) if not traced else self._base_leaves[i] for i in idx)
            fn = _apply_stack if traced else _apply_stack_jit
            leaves, st_stats = fn(self.prior, layouts, st.factors, st.changed, rho, sc, c_arr, bases, with_stats)
            solved.update(zip(idx, leaves))
            if with_stats:
                stats.update(zip(paths, st_stats))
            if not traced:
                maybe_trim()
        return solved, stats

    def _assemble(self, solved: Mapping, anchor_scale) -> PyTree:
        out = []
        for i, (l, b) in enumerate(zip(self._lab, self._base_leaves)):
            if i in solved:
                out.append(solved[i])
            elif l.regressed:
                out.append(b)
            elif self.carry == "anchor":
                from bmm_jax.merging import carried_leaf
                out.append(carried_leaf("anchor", b, self._carry_leaves[i], (), anchor_scale))
            else:
                out.append(self._carry_leaves[i])
        return jax.tree_util.tree_unflatten(self._treedef, out)

    def params(self, hparams: Mapping, *, anchor_scale=1.0) -> PyTree:
        """Merged params for ``hparams`` (any form accepted by :func:`bmm_jax.merge`; values may be
        traced). ``anchor_scale`` multiplies the anchor's task vector (in the prior mean and in
        carried leaves), relative to the anchor given to :func:`prepare`."""
        solved, _ = self._solved(hparams, anchor_scale)
        return self._assemble(solved, anchor_scale)

    def deltas(self, hparams: Mapping, *, anchor_scale=1.0) -> dict:
        """``{path: s * Delta [d_in, d_out]}`` for every solved module (pure)."""
        c = self._anchor_scale(anchor_scale)
        out = {}
        for st, paths, (rho, sc) in zip(self._stacks, self._stack_paths, self._per_stack(hparams, c)):
            for j, p in enumerate(paths):
                if p in self.unchanged:
                    continue
                f = jax.tree_util.tree_map(lambda x: x[j], st.factors)
                d, _, _ = _resolve_delta(self.prior, f, jnp.asarray(rho[j]), jnp.asarray(sc[j]),
                                         jnp.asarray(c, jnp.float32))
                out[p] = d * st.changed[j]
        return out

    def merge(self, hparams: Mapping, *, anchor_scale=1.0):
        """:class:`bmm_jax.MergeResult` with the diagnostics schema of :func:`bmm_jax.merge`."""
        from bmm_jax.merging import MergeResult
        hp = resolve_hparams(hparams, self.labels)
        solved, stats = self._solved(hparams, anchor_scale, with_stats=True)
        traced = self._traced(hparams, anchor_scale)
        units = {}
        for st, paths in zip(self._stacks, self._stack_paths):
            for j, p in enumerate(paths):
                units[p] = (st.lam_unit[j], st.changed[j])
        if not traced:
            units, stats = jax.device_get((units, stats))
        modules = {}
        for l in self._lab:
            if not l.regressed:
                continue
            rho, sc = hp[l.path]
            unit, changed = units[l.path]
            dn, dist = stats[l.path][0], stats[l.path][1]
            if traced:
                f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
                modules[l.path] = ModuleDiagnostics(f32(rho), f32(sc), jnp.where(changed > 0, f32(rho) * unit, 0.0),
                                                    jnp.where(changed > 0, dn, 0.0), jnp.where(changed > 0, dist, 0.0),
                                                    changed == 0, l.kind, l.block, (l.d_in, l.d_out))
            else:
                ch = bool(changed > 0)
                modules[l.path] = ModuleDiagnostics(rho, sc, float(rho) * float(unit) if ch else 0.0,
                                                    float(dn) if ch else 0.0, float(dist) if ch else 0.0, not ch,
                                                    l.kind, l.block, (l.d_in, l.d_out))
        params = self._assemble(solved, anchor_scale)
        return MergeResult(params, MergeDiagnostics(modules, self.carry, self.prior, self.num_experts,
                                                    self._devices, self.factor_dtype))

    def sample(self, key, num_samples: int, hparams: Mapping, *, temperature=1.0, anchor_scale=1.0) -> PyTree:
        """``num_samples`` merged models drawn from the per-module posterior (method.md §5).

        Per module, ``Delta ~ MatrixNormal(Delta*, sigma^2 (S + lambda P)^{-1}, I)`` with ``sigma =
        temperature``, drawn from the eigen factors (isotropic prior: ``Q diag((e + lambda)^{-1/2}) Z``)
        or a Cholesky factor (diagonal prior: ``L^{-T} Z``), ``Z`` standard normal; ``W = W_0 + s Delta``.
        ``temperature = 0`` gives the point estimate :meth:`params`.

        Args:
          key: a ``jax.random`` key; draw ``m`` uses ``split(key, num_samples)[m]`` (one key per draw).
          num_samples: M (static). hparams, anchor_scale: as in :meth:`params` (may be traced).
          temperature: ``sigma >= 0`` (may be traced); choose it on validation NLL.

        Returns:
          A params pytree whose every leaf has a leading ``[M]`` axis (carried leaves broadcast).
        """
        if not isinstance(num_samples, (int, np.integer)) or isinstance(num_samples, bool) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
        check_number(temperature, "temperature")
        t = concrete_float(temperature) if not isinstance(temperature, jax.Array) else None
        if t is not None and (not np.isfinite(t) or t < 0):
            raise ValueError(f"temperature must be finite and >= 0, got {temperature}")
        c = self._anchor_scale(anchor_scale)
        per = self._per_stack(hparams, c)
        keys = jax.random.split(key, num_samples)
        c_arr = jnp.asarray(c, jnp.float32)
        temp = jnp.asarray(temperature, jnp.float32)

        def one(k):
            solved = {}
            stack_keys = jax.random.split(k, max(1, len(self._stacks)))
            for n, (st, paths, (rho, sc)) in enumerate(zip(self._stacks, self._stack_paths, per)):
                idx = [self._index[p] for p in paths]
                layouts = tuple(self._lab[i].layout for i in idx)
                bases = tuple(self._base_leaves[i] for i in idx)
                leaves = _sample_stack(self.prior, layouts, st.factors, st.changed, jnp.asarray(rho),
                                       jnp.asarray(sc), c_arr, bases, stack_keys[n], temp)
                solved.update(zip(idx, leaves))
            return self._assemble(solved, anchor_scale)

        return jax.vmap(one)(keys)

    def __repr__(self) -> str:
        shapes = ", ".join(f"{len(p)}x{tuple(self._lab[self._index[p[0]]].d_in for _ in (0,))[0]}x"
                           f"{self._lab[self._index[p[0]]].d_out}" for p in self._stack_paths)
        dt = "" if self.factor_dtype == "float32" else f", factor_dtype={self.factor_dtype}"
        return f"Prepared({len(self.modules)} modules [{shapes}], prior={self.prior}, carry={self.carry}{dt})"


jax.tree_util.register_pytree_node(Prepared, Prepared._flatten, Prepared._unflatten)


def _stack_groups(jobs, n_devices: int, max_elements: int):
    """Job indices grouped by (view, how, gram shape), split into stacks of at most ``max_elements``
    statistics elements (a multiple of ``n_devices`` modules), largest working sets first."""
    groups: dict[tuple, list[int]] = {}
    for j, (l, how, g) in enumerate(jobs):
        key = ((l.layout, l.d_in, l.d_out), how, None if g is None else tuple(g.shape))
        groups.setdefault(key, []).append(j)
    out = []
    for key, idx in groups.items():
        (_, d_in, d_out) = key[0]
        per = 4 * d_in * d_in + 2 * d_in * d_out
        cap = n_devices * max(1, max_elements // (n_devices * per))
        n_chunks = -(-len(idx) // cap)
        size = -(-len(idx) // n_chunks)
        for a in range(0, len(idx), size):
            out.append((key, idx[a:a + size], per * len(idx[a:a + size])))
    return sorted(out, key=lambda x: -x[2])


def prepare(base: PyTree, experts: Sequence[PyTree], anchor, grams=None, *, labels: PyTree | None = None,
            carry: str = "anchor", prior: str = "isotropic", weights=None, mesh=None, devices=None,
            validate: bool = True, progress: bool = False, factor_dtype: str = "float32") -> Prepared:
    """Factor every regressed module once for fast re-solves (method.md §2, "fast path"). Pure and
    traceable like :func:`bmm_jax.merge`, whose arguments it shares (no ``hparams``).

    With the isotropic prior each module keeps ``EigenFactors`` (``S = Q diag(e) Q^T``, ``Q^T B``,
    ``Q^T T_a``); a re-solve is then one matmul per module. With ``prior="diagonal"`` the stacked
    ``S, B, T_a`` are kept and each re-solve is a Cholesky.

    ``factor_dtype="bfloat16"`` (isotropic prior only) stores ``Q``, ``Q^T B`` and ``Q^T T_a`` in
    bfloat16 (half the memory) and re-solves with bfloat16 products accumulated in float32: relative
    error ~1e-3 of ``Delta``, fine for ranking hyperparameters; compute the final model with
    :func:`bmm_jax.merge`.
    """
    from bmm_jax.merging import merge_inputs, resolve_mesh
    check_option(factor_dtype, "factor_dtype", FACTOR_DTYPES)
    if factor_dtype != "float32" and prior != "isotropic":
        raise ValueError(f"factor_dtype={factor_dtype!r} needs prior='isotropic' (the diagonal prior has "
                         "no eigen fast path: it re-solves by float32 Cholesky)")
    inp = merge_inputs(base, experts, anchor, grams, labels=labels, carry=carry, prior=prior, weights=weights,
                       validate=validate)
    experts, labels, lab, k, w, traced = inp.experts, inp.labels, inp.lab, inp.k, inp.w, inp.traced
    base_leaves, treedef, anchor_leaves, expert_leaves = inp.base_leaves, inp.treedef, inp.anchor_leaves, inp.expert_leaves
    jobs, index = [], []
    for i, l in enumerate(lab):
        if l.regressed:
            how, g = module_gram(grams, l, base_leaves[i], tuple(e[i] for e in expert_leaves), k)
            jobs.append((l, how, g))
            index.append(i)
    the_mesh = None if traced else resolve_mesh(mesh, devices, (base, experts))
    n_dev = 1 if the_mesh is None else int(the_mesh.devices.size)
    groups = _stack_groups(jobs, n_dev, STACK_ELEMENTS if n_dev > 1 else STACK_ELEMENTS_1DEV)
    if progress and not traced:
        from tqdm.auto import tqdm
        groups = tqdm(groups, desc="eigen factors", unit="stack")
    stacks, stack_paths = [], []
    for key, idx, _ in groups:
        view, how, _ = key
        per_module = []
        for j in idx:
            l, _, g = jobs[j]
            i = index[j]
            args = (base_leaves[i], [e[i] for e in expert_leaves], g, anchor_leaves[i], w)
            if traced:
                per_module.append(_module_factors(view, how, prior, *args))
            else:
                args = (jnp.asarray(args[0]), [jnp.asarray(e) for e in args[1]], g, jnp.asarray(args[3]), w)
                per_module.append(_module_factors_jit(view, how, prior, *args))
        factors = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *[m[0] for m in per_module])
        changed = jnp.stack([m[1] for m in per_module])
        unit = jnp.stack([m[2] for m in per_module])
        del per_module
        if factor_dtype == "bfloat16":
            factors = _to_bfloat16(factors)
        if the_mesh is not None:
            factors, changed, unit = _shard_stack((factors, changed, unit), the_mesh)
        stacks.append(Stack(factors, changed, unit))
        stack_paths.append(tuple(jobs[j][0].path for j in idx))
        if not traced:
            jax.block_until_ready(stacks[-1])
            maybe_trim()
    if carry == "mean":
        carry_leaves = [None if l.regressed else __import__("bmm_jax.merging", fromlist=["x"]).carried_leaf(
            "mean", base_leaves[i], None, [e[i] for e in expert_leaves]) for i, l in enumerate(lab)]
    elif carry == "anchor":
        carry_leaves = [None if l.regressed else anchor_leaves[i] for i, l in enumerate(lab)]
    else:
        carry_leaves = [None if l.regressed else base_leaves[i] for i, l in enumerate(lab)]
    unchanged = ()
    if not traced:
        masks = jax.device_get([st.changed for st in stacks])
        unchanged = tuple(p for paths, m in zip(stack_paths, masks) for p, ch in zip(paths, m) if ch == 0)
    return Prepared(base_leaves=base_leaves, carry_leaves=carry_leaves, stacks=stacks, treedef=treedef,
                    labels_tree=labels, lab=lab, stack_paths=stack_paths, unchanged=unchanged, carry=carry,
                    prior=prior, num_experts=k, factor_dtype=factor_dtype, devices=n_dev)


def _shard_stack(tree, mesh):
    """Pad the leading axis of every array to a multiple of the device count (copies of row 0) and
    shard it over the flattened mesh."""
    from jax.sharding import NamedSharding, PartitionSpec as P
    flat = jax.sharding.Mesh(mesh.devices.reshape(-1), ("modules",))
    n = flat.devices.size

    def put(x):
        m = x.shape[0]
        target = -(-m // n) * n
        if target != m:
            x = jnp.concatenate([x, jnp.broadcast_to(x[:1], (target - m,) + x.shape[1:])])
        return jax.device_put(x, NamedSharding(flat, P("modules", *([None] * (x.ndim - 1)))))
    return jax.tree_util.tree_map(put, tree)


__all__ = ["prepare", "Prepared", "Stack", "FACTOR_DTYPES"]
