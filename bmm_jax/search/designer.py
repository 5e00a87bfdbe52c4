"""In-RAM Vizier designers configured for speed, and a guard that never lets a bad suggestion through.

Why not ``clients.Study.suggest``: the Vizier service rebuilds the designer and replays the whole
study at each suggestion, and its default GP-UCB-PE took 11–26 s per suggestion on this 2-core CPU
(``shared/deps.md``). Here one designer instance lives in RAM for the whole search and is fed each
completed trial once (:meth:`SafeDesigner.update`); on resume it is re-fed from the SQLite study.

Where the time goes (measured, 24 dims): ~0.6 s of GP algebra, ARD fit and acquisition
optimisation, plus ~5–7 s of XLA compilation *every time the padded trial count changes* — with
Vizier's ``POWERS_OF_2`` padding that is at 1, 2, 4, 8, 16, 32 trials, and twice per size, because
a ``PaddedArray`` that needs no padding carries a different static flag. :class:`FixedTrialPadding`
pads the trial axis to a fixed ``min_trials`` rows (and to the next power of two strictly above
``n`` beyond it), so a study compiles once. The fast settings (:func:`make_designer`) also use 2
ARD restarts (Vizier: 4) of at most 50 L-BFGS-B iterations each (Vizier's GP-UCB-PE: 500) and
10 000 Eagle acquisition evaluations (Vizier: 75 000). Trials are padded in numpy, not with
``jnp.pad`` (which compiles anew for every trial count). GP-UCB-PE stays several times slower
than the GP bandit per suggestion even so: Vizier 0.1.24 rebuilds its acquisition optimiser at
every suggestion, which re-traces and re-compiles it; ``gp_bandit`` is the default. The designer
runs under ``jax.enable_x64(True)`` and standard dtype promotion (thread-local contexts,
:func:`vizier_jax_context`), as Vizier's own service does, without flipping global flags for the
rest of the library.

:class:`SafeDesigner` checks every suggestion (all parameters present, finite, inside the box);
GP-UCB-PE sometimes returns a suggestion with no parameters (NaN features from its acquisition
optimiser), and any designer may raise: both fall back to a quasi-random point.
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from typing import Callable, Sequence

import attrs
import jax
import numpy as np

from bmm_jax.search.space import DESIGNERS, SearchSpace, check_point

log = logging.getLogger(__name__)

DesignerFactory = Callable[..., "object"]  # (problem, *, seed) -> vizier Designer


@contextlib.contextmanager
def vizier_jax_context():
    """JAX settings Vizier's designers are written for, thread-locally: x64 on (as Vizier's own
    service sets globally) and standard dtype promotion (the library's tests run under
    ``jax_numpy_dtype_promotion="strict"``, which Vizier's GP code does not satisfy)."""
    with jax.enable_x64(True), jax.numpy_dtype_promotion("standard"):
        yield


def _vizier():
    from vizier import algorithms as vza
    from vizier import pyvizier as vz
    return vza, vz


def _fixed_trial_padding_cls():
    from vizier._src.jax import types
    from vizier.pyvizier.converters import padding

    @attrs.define(frozen=True, kw_only=True, hash=True, eq=True)
    class FixedTrialPadding(padding.PaddingSchedule):
        """Pads the trial axis to ``max(min_trials, 2**(floor(log2 n) + 1))`` rows (always strictly
        more than ``n``, so the padded/unpadded static flag never flips) and the feature axis to a
        power of two; ``n = 0`` stays 0 (Vizier builds empty label arrays unpadded)."""
        min_trials: int = 64

        def _rows(self, n: int) -> int:
            if n == 0:
                return 0
            return max(int(self.min_trials), 2 ** (int(math.floor(math.log2(n))) + 1))

        @staticmethod
        def _pow2(d: int) -> int:
            return 0 if d == 0 else 2 ** int(math.ceil(math.log2(d)))

        def _pad(self, a, cols):
            # Padded in numpy and wrapped directly (what ``PaddedArray.from_array`` computes with
            # ``jnp.pad``, which compiles anew for every trial count: ~5 small XLA compilations
            # per suggestion, seconds on a loaded 2-core machine).
            a = np.asarray(a)
            shape = a.shape[:-2] + (self._rows(a.shape[-2]), cols(a.shape[-1]))
            fill = self._int_default if np.issubdtype(a.dtype, np.integer) else np.nan
            spec = [(0, n - d) for d, n in zip(a.shape, shape)]
            return types.PaddedArray(
                padded_array=np.pad(a, spec, constant_values=fill),
                fill_value=fill,
                _original_shape=np.asarray(a.shape, np.int32),
                _mask=np.pad(np.ones(a.shape, bool), spec, constant_values=False),
                _nopadding_done=tuple(a.shape) == tuple(shape))

        def pad_features(self, features):
            return self._pad(features, self._pow2)

        def pad_labels(self, labels):
            return self._pad(labels, lambda m: m)

    return FixedTrialPadding


_FTP = None


def fixed_trial_padding(min_trials: int = 64):
    """A Vizier ``PaddingSchedule`` with a fixed trial axis (see the module docstring)."""
    global _FTP
    if _FTP is None:
        _FTP = _fixed_trial_padding_cls()
    return _FTP(min_trials=int(min_trials))


def make_designer(name: str, problem, *, seed: int = 0, acquisition_evaluations: int = 10_000,
                  ard_restarts: int = 2, trial_padding: int = 64, ard_max_iterations: int = 50,
                  resume_offset: int = 0):
    """A Vizier designer for ``problem`` (a ``vz.ProblemStatement``).

    Args:
      name: one of :data:`bmm_jax.search.space.DESIGNERS`: ``gp_bandit`` / ``gp_ucb_pe`` (fast
        settings), ``gp_bandit_default`` / ``gp_ucb_pe_default`` (Vizier's settings),
        ``quasi_random``, ``random``.
      seed: random seed.
      acquisition_evaluations, ard_restarts, trial_padding, ard_max_iterations: the fast settings
        (``ard_max_iterations``: L-BFGS-B iterations of each ARD restart; Vizier's GP bandit uses
        50, its GP-UCB-PE 500 with a tighter tolerance).
      resume_offset: trials the study already has; the sequence designers (``quasi_random``,
        ``random``) skip that far ahead so a resumed search does not repeat their points (the GP
        designers condition on the re-fed trials instead).
    """
    if name not in DESIGNERS:
        raise ValueError(f"unknown designer {name!r}; expected one of {DESIGNERS}")
    vza, vz = _vizier()
    with vizier_jax_context():
        if name == "quasi_random":
            from vizier._src.algorithms.designers import quasi_random
            return quasi_random.QuasiRandomDesigner(problem.search_space, seed=int(seed),
                                                    skip_points=1000 + int(resume_offset))
        if name == "random":
            from vizier._src.algorithms.designers import random as vz_random
            return vz_random.RandomDesigner(problem.search_space, seed=int(seed) + 100_003 * int(resume_offset))
        rng = jax.random.PRNGKey(int(seed))
        from vizier._src.jax.optimizers import jaxopt_wrappers as jw
        ard = jw.JaxoptScipyLbfgsB(jw.LbfgsBOptions(maxiter=int(ard_max_iterations), best_n=None))
        from vizier._src.algorithms.optimizers import eagle_strategy as es
        from vizier._src.algorithms.optimizers import vectorized_base as vb
        if name.startswith("gp_bandit"):
            from vizier._src.algorithms.designers import gp_bandit
            if name == "gp_bandit_default":
                return gp_bandit.VizierGPBandit(problem, rng=rng)
            return gp_bandit.VizierGPBandit(
                problem, rng=rng, padding_schedule=fixed_trial_padding(trial_padding),
                ard_optimizer=ard, ard_random_restarts=int(ard_restarts),
                acquisition_optimizer_factory=vb.VectorizedOptimizerFactory(
                    strategy_factory=es.VectorizedEagleStrategyFactory(eagle_config=es.EagleStrategyConfig()),
                    max_evaluations=int(acquisition_evaluations), suggestion_batch_size=25))
        from vizier._src.algorithms.designers import gp_ucb_pe
        if name == "gp_ucb_pe_default":
            return gp_ucb_pe.VizierGPUCBPEBandit(problem, rng=rng)
        cls = gp_ucb_pe.VizierGPUCBPEBandit
        return cls(problem, rng=rng, padding_schedule=fixed_trial_padding(trial_padding),
                   ard_optimizer=ard, ard_random_restarts=int(ard_restarts),
                   acquisition_optimizer_factory=vb.VectorizedOptimizerFactory(
                       strategy_factory=es.VectorizedEagleStrategyFactory(eagle_config=cls.default_eagle_config),
                       max_evaluations=int(acquisition_evaluations), suggestion_batch_size=25))


class SafeDesigner:
    """A designer wrapper that is fed trials incrementally and only returns valid points.

    Args:
      designer: any Vizier ``Designer`` (``suggest(count)``, ``update(completed, active)``).
      space: the search space (for validation).
      problem: the Vizier problem (for the quasi-random fallback).
      seed: seed of the fallback sampler.
      skip: points of the fallback sequence to skip (so a resumed search does not repeat the
        fallback points of the killed run).

    Attributes:
      num_fallbacks: how many suggestions came from the fallback.
      latencies: seconds per :meth:`suggest` call.
    """

    def __init__(self, designer, space: SearchSpace, problem, *, seed: int = 0, skip: int = 0):
        self.designer = designer
        self.space = space
        self.problem = problem
        self._seed = int(seed)
        self._skip = int(skip)
        self._fallback = None
        self.num_fallbacks = 0
        self.num_fed = 0
        self.latencies: list[float] = []

    def _fallback_designer(self):
        if self._fallback is None:
            from vizier._src.algorithms.designers import quasi_random
            self._fallback = quasi_random.QuasiRandomDesigner(
                self.problem.search_space, seed=self._seed + 7919, skip_points=1000 + self._skip)
        return self._fallback

    def update(self, trials: Sequence) -> None:
        """Feed completed (or infeasible) ``vz.Trial`` objects, each exactly once."""
        trials = list(trials)
        if not trials:
            return
        vza, _ = _vizier()
        with vizier_jax_context():
            self.designer.update(vza.CompletedTrials(trials), vza.ActiveTrials())
        self.num_fed += len(trials)

    def suggest(self) -> tuple[dict[str, float], str]:
        """One valid point of the box and its source: ``"designer"`` or ``"fallback: <why>"``."""
        t0 = time.perf_counter()
        why = None
        point = None
        try:
            with vizier_jax_context():
                sugg = list(self.designer.suggest(1))
            if not sugg:
                why = "the designer returned no suggestion"
            else:
                params = sugg[0].parameters
                point = check_point(self.space, {k: params[k].value for k in params})
                if point is None:
                    why = (f"the designer returned an invalid suggestion "
                           f"({len(params)} of {self.space.num_dims} parameters, missing, non-finite "
                           "or outside the box)")
        except Exception as e:  # any designer failure falls back, never aborts the search
            why = f"the designer raised {type(e).__name__}: {e}"
            log.warning("designer failed, falling back to quasi-random", exc_info=True)
        source = "designer"
        if point is None:
            log.warning("%s; using a quasi-random point instead", why)
            self.num_fallbacks += 1
            source = f"fallback: {why}"
            for _ in range(100):
                with vizier_jax_context():
                    s = self._fallback_designer().suggest(1)[0]
                point = check_point(self.space, {k: s.parameters[k].value for k in s.parameters})
                if point is not None:
                    break
            else:  # pragma: no cover - quasi-random points are always inside the box
                raise RuntimeError("the quasi-random fallback produced no valid point")
        self.latencies.append(time.perf_counter() - t0)
        return point, source
