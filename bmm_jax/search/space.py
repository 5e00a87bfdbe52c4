"""The search space of the outer level (method.md §4), resolved from the label tree.

Each hyper-parameter group ``g`` (``Label.group(grouping)`` for ``grouping`` in
``global | type | block | module``) gets two Vizier parameters:

* ``"<g>:log10_rho"`` — ``log10`` of the relative prior strength, LINEAR in ``[-4, 2]`` by default.
  We search ``log10 rho`` on a linear Vizier scale rather than ``rho`` on Vizier's ``LOG`` scale:
  Vizier's GP maps both to the same unit interval, so the search is identical, but the stored
  values are exact and readable (the anchor seed is exactly ``2.0``, not ``exp(log(100))``,
  which may fall outside the box by one ulp and fail ``assert_contains``).
* ``"<g>:scale"`` — the assembly scale ``s``, linear in ``[0.5, 1.5]``.

plus optional *extras* (``anchor_scale``, the anchor's own scale; ``beta``, the hybrid Gram mix of
§3.3; or any name the params function accepts as a keyword argument).

A point of the space is a flat ``{parameter name: float}`` dict (Vizier's view); the search passes
the params function *per-module* hyper-parameters ``{module path: {"rho": ρ, "scale": s}}`` (the
``module`` grouping of ``bmm_jax.merge``, unambiguous whatever the search grouping) and reports
*per-group* hyper-parameters ``{group: {"rho": ρ, "scale": s}}``.
"""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np

from bmm_jax._tree import PyTree
from bmm_jax.labels import GROUPINGS, Label, hparam_groups

OBJECTIVES = ("accuracy", "normalized")
DESIGNERS = ("gp_bandit", "gp_ucb_pe", "gp_bandit_default", "gp_ucb_pe_default", "quasi_random",
             "random")
SEED_POINTS = ("anchor", "default", "centre")
RHO_SUFFIX = ":log10_rho"
SCALE_SUFFIX = ":scale"


def _check_range(what: str, rng) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in rng)
    except (TypeError, ValueError):
        raise TypeError(f"{what} must be a pair (low, high) of numbers, got {rng!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"{what} must be finite, got ({lo}, {hi})")
    if lo >= hi:
        raise ValueError(f"{what} is empty or inverted: low {lo} >= high {hi}")
    return lo, hi


@dataclasses.dataclass(frozen=True)
class Extra:
    """An extra searched scalar passed to the params function as a keyword argument.

    Attributes:
      name: keyword name (``"anchor_scale"``, ``"beta"``, ...); also the Vizier parameter name.
      low, high: inclusive bounds (``low < high``), linear scale.
      default: value used by the seeded trials (anchor-equivalent and shared default); ``None``
        means the centre of ``[low, high]``.
    """
    name: str
    low: float
    high: float
    default: float | None = None

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name or ":" in self.name:
            raise ValueError(f"extra name must be a non-empty string without ':', got {self.name!r}")
        _check_range(f"extra {self.name!r} range", (self.low, self.high))
        if self.default is not None and not (self.low <= self.default <= self.high):
            raise ValueError(f"extra {self.name!r}: default {self.default} is outside "
                             f"[{self.low}, {self.high}]")

    @property
    def seed_value(self) -> float:
        return float(0.5 * (self.low + self.high) if self.default is None else self.default)


# Built-in extras: names accepted as plain strings in ``SearchConfig.extras``.
BUILTIN_EXTRAS = {
    # The anchor's own scale c: T_a -> c * T_a (for Task-Arithmetic-like anchors the anchor task
    # vector is linear in its coefficient). Seeds use c = 1 (the given anchor).
    "anchor_scale": Extra("anchor_scale", 0.5, 1.5, 1.0),
    # beta of the hybrid Gram estimator (method.md §3.3), default 0.5.
    "beta": Extra("beta", 0.0, 1.0, 0.5),
}


@dataclasses.dataclass(frozen=True)
class SearchConfig:
    """Configuration of a module-wise Bayesian-optimisation search.

    Attributes:
      grouping: ``"global" | "type" | "block" | "module"`` (method.md §4; default ``"type"``).
      num_trials: Vizier trials in the study, seeded trials included (the exact-anchor evaluation
        ``trial 0`` is extra and not a Vizier trial). A resumed search stops at this many finished
        trials in total.
      designer: ``"gp_bandit"`` (default: Vizier's GP bandit configured for speed, see
        :mod:`bmm_jax.search.designer`), ``"gp_ucb_pe"`` (GP-UCB-PE, same speed settings),
        ``"gp_bandit_default"`` / ``"gp_ucb_pe_default"`` (Vizier's own settings, slow),
        ``"quasi_random"``, ``"random"``.
      log10_rho_range: box of ``log10 rho`` per group (default ``(-4, 2)``).
      scale_range: box of ``s`` per group (default ``(0.5, 1.5)``).
      extras: extra searched keyword arguments of the params function: names of
        :data:`BUILTIN_EXTRAS` (``"anchor_scale"``, ``"beta"``) or :class:`Extra` instances.
      seed: random seed of the designer (and of its quasi-random fallback).
      objective: ``"accuracy"`` (mean validation accuracy over tasks) or ``"normalized"`` (mean of
        merged / expert accuracy; needs the experts' validation accuracies).
      seed_points: seeded first trials, in order: ``"anchor"`` (``log10 rho`` at the top of the box,
        ``= 2`` i.e. ``rho = 100``, ``s = 1``: the anchor up to ~1e-2 relative), ``"default"``
        (``rho = 1, s = 1``, the shared default), ``"centre"`` (the centre of the box). Values
        outside the box are clipped into it.
      anchor_trial: evaluate the exact anchor as trial 0 (needs the anchor params) and return it
        when no trial beats it.
      validation_examples: examples per task of the validation split when the objective is built
        from ``adapter/heads/tasks`` (``None``: all).
      acquisition_evaluations: acquisition-function evaluations per suggestion (Eagle strategy) of
        the fast designers (Vizier's default: 75 000).
      ard_restarts: random restarts of the GP hyper-parameter (ARD) fit of the fast designers
        (Vizier's default: 4).
      ard_max_iterations: L-BFGS-B iterations per ARD restart of the fast designers (Vizier's GP
        bandit: 50; its GP-UCB-PE: 500, which made it ~4x slower per suggestion here).
      trial_padding: the fast designers pad the trial axis to at least this many rows (and to the
        next power of 2 above), so that the GP and the acquisition optimiser compile once per
        study instead of at every power of 2.
      jax_cache_dir: persistent JAX compilation cache directory, set only if JAX has none yet
        (saves ~3 s of the first GP suggestion in each later process); ``"auto"`` is
        ``<bmm_jax cache>/jax`` (``$BMM_JAX_CACHE/jax`` or ``~/.cache/bmm_jax/jax``); ``None`` leaves JAX's setting alone.
      study_id: Vizier study id inside the run directory's SQLite datastore.
      batch_size: trials evaluated per step (``B``). Each step takes ``B`` points (a trial left
        ``ACTIVE`` by a killed run, the seeded points, then one ``suggest(count)`` call of the
        designer for the rest), builds their params in one jitted ``jax.vmap`` of
        ``Prepared.params`` (leaves with a leading ``[B]`` axis), evaluates them with one call of a
        batched objective (else one call of the objective per trial) and completes every trial.
        ``1`` is the one-trial-at-a-time loop. The GP-bandit designers then optimise a batch
        acquisition (q-UCB over sets of ``B`` points, :func:`bmm_jax.search.make_designer`) so
        the points of a batch differ. Not part of the study's identity: a study may be resumed
        with another batch size. Memory: ``B`` merged models (plus the objective's activations for
        ``B`` models when batched); use ``1`` where a few copies of the model do not fit. Default
        4: on MiniLM-5 (2-core CPU, ``experiments/bench_search.py --parts throughput``) 4.3
        trials/min against 3.8 at ``B = 1`` (8: 4.5), the gain coming from one set suggestion per
        batch (the CPU forward pass is FLOP-bound, so its cost per trial does not change); on an
        accelerator the vmapped forward also fills the device.
    """
    grouping: str = "type"
    num_trials: int = 50
    designer: str = "gp_bandit"
    log10_rho_range: tuple[float, float] = (-4.0, 2.0)
    scale_range: tuple[float, float] = (0.5, 1.5)
    extras: tuple = ()
    seed: int = 0
    objective: str = "accuracy"
    seed_points: tuple[str, ...] = ("anchor", "default")
    anchor_trial: bool = True
    validation_examples: int | None = 128
    acquisition_evaluations: int = 10_000
    ard_restarts: int = 2
    ard_max_iterations: int = 50
    trial_padding: int = 64
    jax_cache_dir: str | None = "auto"
    study_id: str = "bmm-search"
    batch_size: int = 4

    def __post_init__(self):
        if self.grouping not in GROUPINGS:
            raise ValueError(f"unknown grouping {self.grouping!r}; expected one of {GROUPINGS}")
        if isinstance(self.num_trials, bool) or not isinstance(self.num_trials, (int, np.integer)):
            raise TypeError(f"num_trials must be an int, got {type(self.num_trials).__name__}")
        if self.num_trials <= 0:
            raise ValueError(f"num_trials must be positive, got {self.num_trials}")
        if self.designer not in DESIGNERS:
            raise ValueError(f"unknown designer {self.designer!r}; expected one of {DESIGNERS}")
        object.__setattr__(self, "log10_rho_range", _check_range("log10_rho_range", self.log10_rho_range))
        object.__setattr__(self, "scale_range", _check_range("scale_range", self.scale_range))
        if self.objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {self.objective!r}; expected one of {OBJECTIVES}")
        extras = []
        for e in (self.extras,) if isinstance(self.extras, (str, Extra)) else tuple(self.extras):
            if isinstance(e, str):
                if e not in BUILTIN_EXTRAS:
                    raise ValueError(f"unknown extra {e!r}; built-in extras are {tuple(BUILTIN_EXTRAS)} "
                                     "(pass an Extra(name, low, high) for others)")
                e = BUILTIN_EXTRAS[e]
            if not isinstance(e, Extra):
                raise TypeError(f"extras must be names or Extra instances, got {e!r}")
            extras.append(e)
        names = [e.name for e in extras]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate extras: {names}")
        object.__setattr__(self, "extras", tuple(extras))
        sp = (self.seed_points,) if isinstance(self.seed_points, str) else tuple(self.seed_points)
        for s in sp:
            if s not in SEED_POINTS:
                raise ValueError(f"unknown seed point {s!r}; expected some of {SEED_POINTS}")
        if len(set(sp)) != len(sp):
            raise ValueError(f"duplicate seed points: {sp}")
        object.__setattr__(self, "seed_points", sp)
        if self.validation_examples is not None and self.validation_examples <= 0:
            raise ValueError(f"validation_examples must be positive or None, got {self.validation_examples}")
        for name in ("acquisition_evaluations", "ard_restarts", "trial_padding", "ard_max_iterations"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not isinstance(self.study_id, str) or not self.study_id:
            raise ValueError(f"study_id must be a non-empty string, got {self.study_id!r}")
        if isinstance(self.batch_size, (bool, np.bool_)) or not isinstance(self.batch_size, (int, np.integer)):
            raise TypeError(f"batch_size must be an int (trials per step), got {type(self.batch_size).__name__} "
                            f"({self.batch_size!r})")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 (trials per step), got {self.batch_size}")
        object.__setattr__(self, "batch_size", int(self.batch_size))


class Group(NamedTuple):
    """One hyper-parameter group: its name and its modules (labels, in tree order)."""
    name: str
    modules: tuple[Label, ...]


class SearchSpace(NamedTuple):
    """The resolved search space.

    Attributes:
      grouping: the grouping used.
      groups: the hyper-parameter groups, in label-tree order of their first module.
      log10_rho_range, scale_range: the per-group boxes.
      extras: the extra parameters.
    """
    grouping: str
    groups: tuple[Group, ...]
    log10_rho_range: tuple[float, float]
    scale_range: tuple[float, float]
    extras: tuple[Extra, ...]

    @property
    def parameter_names(self) -> list[str]:
        out = []
        for g in self.groups:
            out += [g.name + RHO_SUFFIX, g.name + SCALE_SUFFIX]
        return out + [e.name for e in self.extras]

    @property
    def bounds(self) -> dict[str, tuple[float, float]]:
        """``{parameter name: (low, high)}``."""
        out = {}
        for g in self.groups:
            out[g.name + RHO_SUFFIX] = self.log10_rho_range
            out[g.name + SCALE_SUFFIX] = self.scale_range
        for e in self.extras:
            out[e.name] = (float(e.low), float(e.high))
        return out

    @property
    def num_dims(self) -> int:
        return 2 * len(self.groups) + len(self.extras)


def build_space(labels: PyTree, config: SearchConfig) -> SearchSpace:
    """Resolve the search space of ``config`` on the label tree ``labels``.

    Raises:
      ValueError: the label tree selects no regressed module (an empty search space), or an extra
        collides with a group parameter name.
    """
    try:
        groups = hparam_groups(labels, config.grouping)
    except ValueError as e:
        raise ValueError(f"empty search space: {e} (check the include/exclude patterns of "
                         "build_labels)") from None
    space = SearchSpace(config.grouping, tuple(Group(n, tuple(m)) for n, m in groups.items()),
                        tuple(config.log10_rho_range), tuple(config.scale_range), tuple(config.extras))
    names = space.parameter_names
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"search parameter names collide: {dup}")
    return space


def problem_statement(space: SearchSpace, metric: str = "objective"):
    """The Vizier ``ProblemStatement``: every parameter a linear DOUBLE, one maximised metric."""
    from vizier import pyvizier as vz
    problem = vz.ProblemStatement()
    root = problem.search_space.root
    for name, (lo, hi) in space.bounds.items():
        root.add_float_param(name, lo, hi, scale_type=vz.ScaleType.LINEAR)
    problem.metric_information.append(vz.MetricInformation(metric, goal=vz.ObjectiveMetricGoal.MAXIMIZE))
    return problem


def _clip(v: float, rng) -> float:
    return float(min(max(v, rng[0]), rng[1]))


def seed_point(space: SearchSpace, which: str) -> dict[str, float]:
    """The flat point of a seeded trial (see ``SearchConfig.seed_points``)."""
    if which not in SEED_POINTS:
        raise ValueError(f"unknown seed point {which!r}; expected one of {SEED_POINTS}")
    lo, hi = space.log10_rho_range
    if which == "anchor":
        lr, s = hi, 1.0
    elif which == "default":
        lr, s = 0.0, 1.0
    else:
        lr, s = 0.5 * (lo + hi), 0.5 * sum(space.scale_range)
    out = {}
    for g in space.groups:
        out[g.name + RHO_SUFFIX] = _clip(lr, space.log10_rho_range)
        out[g.name + SCALE_SUFFIX] = _clip(s, space.scale_range)
    for e in space.extras:
        out[e.name] = e.seed_value if which != "centre" else 0.5 * (e.low + e.high)
    return out


def check_point(space: SearchSpace, point: Mapping[str, Any], *, tol: float = 1e-9) -> dict[str, float] | None:
    """``point`` as floats clipped into the box, or ``None`` if a parameter is missing, not a
    finite number, or outside the box by more than ``tol`` (relative to the box width)."""
    out = {}
    for name, (lo, hi) in space.bounds.items():
        if name not in point:
            return None
        v = point[name]
        v = getattr(v, "value", v)
        try:
            v = float(v)
        except (TypeError, ValueError):
            return None
        if not math.isfinite(v):
            return None
        w = tol * (hi - lo)
        if v < lo - w or v > hi + w:
            return None
        out[name] = min(max(v, lo), hi)
    return out


def group_hparams(space: SearchSpace, point: Mapping[str, float]) -> dict[str, dict[str, float]]:
    """Flat point -> ``{group: {"rho": 10**log10_rho, "scale": s}}``."""
    return {g.name: {"rho": float(10.0 ** float(point[g.name + RHO_SUFFIX])),
                     "scale": float(point[g.name + SCALE_SUFFIX])} for g in space.groups}


def extras_of(space: SearchSpace, point: Mapping[str, float]) -> dict[str, float]:
    """Flat point -> ``{extra name: value}``."""
    return {e.name: float(point[e.name]) for e in space.extras}


class PointArrays(NamedTuple):
    """A batch of ``B`` flat points as arrays (the inputs of the vmapped params function).

    Attributes:
      rho: ``[B, G]`` float32, ``rho = 10 ** log10_rho`` per group (``G = len(space.groups)``, in
        ``space.groups`` order), computed in float64 and rounded once, as :func:`group_hparams`
        followed by the float32 conversion of the merge.
      scale: ``[B, G]`` float32, the assembly scale ``s`` per group.
      extras: ``{extra name: [B] float32}``.
    """
    rho: np.ndarray
    scale: np.ndarray
    extras: dict


def point_arrays(space: SearchSpace, points: Sequence[Mapping[str, float]]) -> PointArrays:
    """Flat points -> :class:`PointArrays` (``B = len(points) >= 1``)."""
    if not len(points):
        raise ValueError("point_arrays needs at least one point")
    hps = [group_hparams(space, p) for p in points]
    rho = np.asarray([[h[g.name]["rho"] for g in space.groups] for h in hps], np.float64).astype(np.float32)
    scale = np.asarray([[h[g.name]["scale"] for g in space.groups] for h in hps], np.float64).astype(np.float32)
    extras = {e.name: np.asarray([float(p[e.name]) for p in points], np.float32) for e in space.extras}
    return PointArrays(rho, scale, extras)


def module_hparams_of_row(space: SearchSpace, rho, scale) -> dict:
    """Per-module hyper-parameters ``{module path: {"rho": rho[g], "scale": scale[g]}}`` from one row
    ``rho [G], scale [G]`` of :class:`PointArrays` (values stay arrays: traceable under ``vmap``)."""
    out = {}
    for i, g in enumerate(space.groups):
        for m in g.modules:
            out[m.path] = {"rho": rho[i], "scale": scale[i]}
    return out


def module_hparams(space: SearchSpace, hparams: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """Per-group hyper-parameters -> per-module ``{module path: {"rho": .., "scale": ..}}``."""
    out = {}
    for g in space.groups:
        if g.name not in hparams:
            raise ValueError(f"hparams has no entry for group {g.name!r}")
        for m in g.modules:
            out[m.path] = {"rho": float(hparams[g.name]["rho"]), "scale": float(hparams[g.name]["scale"])}
    return out


def groups_table(space: SearchSpace) -> str:
    """Plain-text table: group -> its modules (path, kind, block, shape)."""
    rows = [("group", "module", "kind", "block", "d_in x d_out")]
    for g in space.groups:
        for i, m in enumerate(g.modules):
            rows.append((g.name if i == 0 else "", m.path, str(m.kind),
                         "-" if m.block is None else str(m.block), f"{m.d_in} x {m.d_out}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    n_mod = sum(len(g.modules) for g in space.groups)
    lines.append(f"grouping {space.grouping!r}: {len(space.groups)} groups, {n_mod} modules, "
                 f"{space.num_dims} search dimensions (log10 rho in {list(space.log10_rho_range)}, "
                 f"s in {list(space.scale_range)}"
                 + (f", extras {[e.name for e in space.extras]}" if space.extras else "") + ")")
    return "\n".join(lines)


def groups_dict(space: SearchSpace) -> dict:
    """JSON-ready description of the space (``groups.json``)."""
    return {
        "grouping": space.grouping,
        "num_dims": space.num_dims,
        "groups": {g.name: [{"path": m.path, "kind": m.kind, "block": m.block, "d_in": m.d_in,
                             "d_out": m.d_out} for m in g.modules] for g in space.groups},
        "parameters": {n: {"low": lo, "high": hi} for n, (lo, hi) in space.bounds.items()},
        "extras": [dataclasses.asdict(e) for e in space.extras],
    }


def fingerprint(space: SearchSpace, config: SearchConfig) -> str:
    """A JSON string identifying what a study in a run directory searches (resume must match)."""
    return json.dumps({
        "grouping": space.grouping,
        "parameters": {n: list(b) for n, b in space.bounds.items()},
        "modules": {g.name: [m.path for m in g.modules] for g in space.groups},
        "objective": config.objective,
        "seed_points": list(config.seed_points),
    }, sort_keys=True)
