"""Activation Grams (method.md §3.1) as a streaming accumulator.

``G_k = mean over real tokens of x x^T`` (``[d_in, d_in]``) of the input ``x`` of every regressed
module, per input group (q/k/v share one), accumulated in float32 with ``Precision.HIGHEST``:

    state = init(dims)                       # {group: d_in}
    state = update(state, {group: (x [N, d_in], mask [N])})   # jittable, any number of times
    grams = finalize(state)                  # {group: [d_in, d_in]}

Memory is one Gram set, never the activations. Inputs are captured generically from any
``flax.linen`` model with :func:`capture_inputs` (``flax.linen.intercept_methods`` on every submodule
``__call__`` whose ``<scope path>/kernel`` is a regressed leaf), or by a
:class:`bmm_jax.models.ModelAdapter`. :func:`activations` runs each expert (or the base) on its
task's calibration batches and returns :class:`~bmm_jax.grams.Grams` keyed by input group.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, Iterable, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from bmm_jax._tree import PyTree, check_experts
from bmm_jax.grams._base import Grams
from bmm_jax.labels import Label, build_labels, regressed

HIGHEST = jax.lax.Precision.HIGHEST


class GramState(NamedTuple):
    """Running sums: ``sums {group: [d, d]}`` (of masked ``x x^T``), ``counts {group: []}`` (rows)."""
    sums: dict
    counts: dict


def init(dims: Mapping[str, int]) -> GramState:
    """Empty state for ``{input group: d_in}``."""
    return GramState({g: jnp.zeros((d, d), jnp.float32) for g, d in dims.items()},
                     {g: jnp.zeros((), jnp.float32) for g in dims})


def gram_sum(x, mask=None):
    """``sum_n mask_n x_n x_n^T`` and ``sum_n mask_n`` for rows ``x [N, d]`` (float32, HIGHEST)."""
    x = jnp.asarray(x).astype(jnp.float32)
    if mask is not None:
        m = jnp.asarray(mask).astype(jnp.float32)
        x = x * m[:, None]
        n = jnp.sum(m)
    else:
        n = jnp.asarray(x.shape[0], jnp.float32)
    return jnp.matmul(x.T, x, precision=HIGHEST), n


def update(state: GramState, captured: Mapping[str, Any]) -> GramState:
    """Add a batch: ``captured = {group: x [N, d]}`` or ``{group: (x, mask [N])}`` (jittable)."""
    sums, counts = dict(state.sums), dict(state.counts)
    for g, item in captured.items():
        if g not in sums:
            raise KeyError(f"input group {g!r} not in the accumulator (known: {sorted(sums)[:5]}...)")
        x, mask = (item if isinstance(item, tuple) else (item, None))
        x = jnp.reshape(x, (-1, x.shape[-1]))
        if x.shape[-1] != sums[g].shape[0]:
            raise ValueError(f"input group {g!r}: rows have d = {x.shape[-1]}, accumulator has "
                             f"{sums[g].shape[0]}")
        s, n = gram_sum(x, None if mask is None else jnp.reshape(mask, (-1,)))
        sums[g] = sums[g] + s
        counts[g] = counts[g] + n
    return GramState(sums, counts)


def finalize(state: GramState) -> dict:
    """``{group: sums / counts}`` (jittable). Eagerly, raises ``ValueError`` for a group that saw no
    real row; under a transformation such a group's Gram is NaN."""
    counts = state.counts
    if not any(isinstance(c, jax.core.Tracer) for c in counts.values()):
        # eager: one explicit transfer of the per-group counts (scalars) to name an empty group
        host = jax.device_get(dict(counts))
        for g, n in host.items():
            if float(n) <= 0:
                raise ValueError(f"input group {g!r} saw no (unmasked) activation row: cannot form its Gram")
    # traced: a group with no row gives NaN (0 / 0), visible in the result
    return {g: s / counts[g] for g, s in state.sums.items()}


def gram_from_activations(x, mask=None):
    """One-shot ``mean_n x_n x_n^T`` of ``x [..., d]`` over unmasked rows -> ``[d, d]``."""
    x = jnp.asarray(x)
    s, n = gram_sum(x.reshape(-1, x.shape[-1]), None if mask is None else jnp.reshape(mask, (-1,)))
    return s / n


# ----------------------------------------------------------------------------- capture
def _module_index(labels: PyTree) -> dict[str, Label]:
    out = {}
    for l in regressed(labels):
        if not l.path.endswith("/kernel"):
            raise ValueError(f"cannot capture the input of regressed leaf '{l.path}': only "
                             "'.../kernel' leaves of linen submodules are supported")
        out[l.path[: -len("/kernel")]] = l
    return out


def capture_inputs(apply_fn: Callable, params: PyTree, batch, labels: PyTree,
                   mask_fn: Callable | None = None) -> dict[str, tuple]:
    """Inputs of every regressed module while ``apply_fn(params, batch)`` runs a linen model.

    Args:
      apply_fn: ``(params, batch) -> anything`` that calls ``module.apply({"params": params}, ...)``.
      params: params pytree of the model (its paths are the label paths).
      batch: passed through to ``apply_fn``.
      labels: label tree of ``params``.
      mask_fn: ``(batch, x_shape) -> [N]`` bool row mask for an input of shape ``[B, ..., d]``
        (``N`` = rows of the flattened input); ``None`` counts every row.

    Returns:
      ``{input group: (x [N, d_in] float32, mask [N] bool)}`` (all calls of a group concatenated;
      q/k/v read one input and are captured once). :func:`capture` also returns the output.
    """
    return capture(apply_fn, params, batch, labels, mask_fn)[1]


def capture(apply_fn: Callable, params: PyTree, batch, labels: PyTree,
            mask_fn: Callable | None = None) -> tuple[Any, dict[str, tuple]]:
    """One forward pass: ``(apply_fn(params, batch), inputs of every regressed module)``.

    The same call a training step makes, so the loss and the activation Grams come from one
    forward pass: use it inside ``jax.value_and_grad(..., has_aux=True)`` (return the captured
    inputs as aux; they are not differentiated) under ``jit`` / ``vmap``, then
    :func:`update` an accumulator. Arguments as :func:`capture_inputs`.

    Returns:
      ``(output, {input group: (x [N, d_in] float32, mask [N] bool)})``.
    """
    by_module = _module_index(labels)
    seen: dict[str, list] = {}
    owner: dict[str, str] = {}

    def interceptor(next_fun, args, kwargs, context):
        if context.method_name == "__call__" and args and context.module.scope is not None:
            mpath = "/".join(str(p) for p in context.module.scope.path)
            lab = by_module.get(mpath)
            if lab is not None:
                x = jnp.asarray(args[0])
                if x.shape[-1] != lab.d_in:
                    raise ValueError(f"module '{mpath}': input last dim {x.shape[-1]} != d_in {lab.d_in}")
                g = lab.input_group
                if owner.setdefault(g, mpath) == mpath:      # one reader per group is enough
                    rows = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
                    m = (jnp.ones((rows.shape[0],), bool) if mask_fn is None
                         else jnp.reshape(mask_fn(batch, x.shape), (-1,)).astype(bool))
                    seen.setdefault(g, []).append((rows, m))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        out = apply_fn(params, batch)
    missing = sorted({l.input_group for l in by_module.values()} - set(seen))
    if missing:
        raise ValueError(f"no input captured for input groups {missing[:5]}: their modules were never "
                         "called as linen submodules with those scope paths")
    return out, {g: (jnp.concatenate([r for r, _ in v]), jnp.concatenate([m for _, m in v]))
                 for g, v in seen.items()}


def from_states(states, labels: PyTree) -> Grams:
    """:class:`Grams` from K accumulator states (one per task), traceable.

    Args:
      states: a sequence of K :class:`GramState` (task k's state k), or one :class:`GramState`
        whose arrays carry a leading task axis (``sums {group: [K, d, d]}``, ``counts {group:
        [K]}``), as accumulated under ``jax.vmap`` over the experts.
      labels: label tree of the model; every input group of its regressed modules must be in the
        states (extra groups are ignored).

    Returns:
      :class:`Grams` (``kind="activations"``): ``[K, d_in, d_in]`` per input group, each regressed
      module mapped to its group, ``num_tokens[k]`` the fewest rows any group of task k saw.

    Raises:
      ValueError: a group missing from a state or shaped unlike its modules' ``d_in``, states
        with different groups, fewer than one task; eagerly also a group with no row (under a
        transformation such a group's Gram is NaN, as in :func:`finalize`).
    """
    mods = regressed(labels)
    if not mods:
        raise ValueError("the label tree selects no regressed module")
    dims = {l.input_group: l.d_in for l in mods}
    if isinstance(states, GramState):
        stacked = states
    else:
        states = list(states)
        if not states or not all(isinstance(s, GramState) for s in states):
            raise ValueError("states must be a GramState with a leading task axis or a non-empty "
                             f"sequence of GramState, got {type(states).__name__}")
        for k, s in enumerate(states):
            missing = sorted(set(dims) - set(s.sums))
            if missing:
                raise ValueError(f"state {k} has no accumulator for input groups {missing[:5]}")
        stacked = GramState({g: jnp.stack([s.sums[g] for s in states]) for g in dims},
                            {g: jnp.stack([jnp.asarray(s.counts[g]) for s in states]) for g in dims})
    missing = sorted(set(dims) - set(stacked.sums))
    if missing:
        raise ValueError(f"the states have no accumulator for input groups {missing[:5]}")
    k = None
    for g, d in dims.items():
        shape = tuple(jnp.shape(stacked.sums[g]))
        if len(shape) != 3 or shape[1:] != (d, d) or tuple(jnp.shape(stacked.counts[g])) != shape[:1]:
            raise ValueError(f"input group {g!r}: sums {shape} / counts {tuple(jnp.shape(stacked.counts[g]))}, "
                             f"expected [K, {d}, {d}] / [K] (d_in of its modules)")
        if k is None:
            k = shape[0]
        elif shape[0] != k:
            raise ValueError(f"input group {g!r} has {shape[0]} tasks, others {k}")
    state = GramState({g: stacked.sums[g] for g in dims}, {g: stacked.counts[g] for g in dims})
    counts = jnp.stack([state.counts[g] for g in dims])                          # [groups, K]
    if isinstance(counts, jax.core.Tracer):
        fewest = jnp.min(counts, axis=0)
        num_tokens = {t: fewest[t] for t in range(k)}
    else:
        host = jax.device_get(counts)                  # eager: one transfer of the row counts
        for (g, row) in zip(dims, host):
            empty = [t for t, n in enumerate(row) if float(n) <= 0]
            if empty:
                raise ValueError(f"input group {g!r} saw no (unmasked) activation row for tasks {empty[:5]}: "
                                 "cannot form its Gram")
        num_tokens = {t: float(min(row[t] for row in host)) for t in range(k)}
    dense = {g: state.sums[g] / state.counts[g][:, None, None] for g in dims}
    return Grams(dense, {l.path: l.input_group for l in mods}, kind="activations", num_tokens=num_tokens)


def activations(model, params_per_task: Sequence[PyTree], batches_per_task: Sequence[Iterable],
                labels: PyTree | None = None, *, mask_fn: Callable | None = None,
                progress: bool = True, jit: bool = True) -> Grams:
    """Activation Grams of every regressed module for K tasks (method.md §3.1).

    Args:
      model: a :class:`bmm_jax.models.ModelAdapter` (its ``capture`` and padding masks are used),
        or an ``apply_fn(params, batch)`` calling a linen module's ``apply``.
      params_per_task: K params pytrees: expert k runs on task k's inputs (pass ``[base] * K`` to
        use the base model).
      batches_per_task: K iterables of batches (adapter: preprocessed batch dicts, optionally with
        an ``"example_mask"`` entry ``[B]`` marking real examples).
      labels: label tree (default: the adapter's, or ``build_labels(params_per_task[0])``).
      mask_fn: for an ``apply_fn``: ``(batch, x_shape) -> [N]`` row mask (padding tokens False).
      progress: tqdm bar over tasks and batches.
      jit: jit the capture + update step (compiled once per batch shape).

    Returns:
      :class:`Grams` (``kind="activations"``) with dense ``[K, d_in, d_in]`` per input group and
      every regressed module mapped to its group; ``num_tokens[k]`` real rows seen per task.
    """
    params_per_task = list(params_per_task)
    batches_per_task = list(batches_per_task)
    if len(params_per_task) != len(batches_per_task):
        raise ValueError(f"{len(params_per_task)} params pytrees but {len(batches_per_task)} batch "
                         "streams: pass one of each per task")
    if len(params_per_task) < 1:
        raise ValueError("activations needs at least one task")
    check_experts(params_per_task[0], params_per_task, min_experts=1)
    is_adapter = hasattr(model, "capture") and hasattr(model, "labels")
    if labels is None:
        labels = model.labels if is_adapter else build_labels(params_per_task[0])
    mods = regressed(labels)
    if not mods:
        raise ValueError("the label tree selects no regressed module")
    dims = {l.input_group: l.d_in for l in mods}

    if is_adapter:
        def step(state, params, batch):
            ex = batch.get("example_mask")
            b = {k: v for k, v in batch.items() if k != "example_mask"}
            cap = model.capture(params, b, ex, labels=labels)
            return update(state, {g: (c.x, c.mask) for g, c in cap.items()})
    else:
        if not callable(model):
            raise TypeError("model must be a ModelAdapter or an apply_fn(params, batch)")

        def step(state, params, batch):
            return update(state, capture_inputs(model, params, batch, labels, mask_fn))

    step = jax.jit(step) if jit else step
    per_task, tokens = [], []
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(desc="activation Grams", unit="batch")
    for k, (params, batches) in enumerate(zip(params_per_task, batches_per_task)):
        state = init(dims)
        for batch in batches:
            state = step(state, params, batch)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(task=k)
        tokens.append(min(float(n) for n in state.counts.values()))
        per_task.append(finalize(state))
    if bar is not None:
        bar.close()
    dense = {g: jnp.stack([t[g] for t in per_task]) for g in dims}
    key_of = {l.path: l.input_group for l in mods}
    return Grams(dense, key_of, kind="activations", num_tokens=dict(enumerate(tokens)))


__all__ = ["GramState", "init", "update", "finalize", "gram_sum", "gram_from_activations",
           "capture_inputs", "capture", "from_states", "activations"]
