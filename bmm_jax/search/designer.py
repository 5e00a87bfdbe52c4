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

Batches (``SearchConfig.batch_size = B > 1``): Vizier's GP bandit asked for ``count > 1`` points
ranks the single-point UCB candidates of its acquisition optimiser and returns the top ones, which
are near copies of each other (measured: pairwise L-inf distance 0.0-0.007 in a 12-dim box). With
``batch_size > 1`` :func:`make_designer` gives the GP bandits a *set* acquisition instead: Vizier's
q-UCB (Monte-Carlo upper confidence bound of the best of ``B`` jointly distributed points,
coefficient ``1.8 * sqrt(pi / 2)``, which is UCB's 1.8 at ``B = 1``), optimised by the same Eagle
strategy over sets of ``B`` points (``n_parallel = B``), with the trust region applied to the
set's farthest point (:func:`set_scoring_function_factory`; Vizier's own trust-region code
assumes one point). One batch suggestion then costs about two single suggestions on this CPU, not
``B``. GP-UCB-PE has its own batch path (UCB point plus pure-exploration points); the sequence
designers return the next ``count`` points. :meth:`SafeDesigner.suggest_many` asks a GP designer
for a fixed ``B`` points (``min_request``) and keeps what it needs, so the acquisition optimiser
compiles for one set size per study.

:class:`SafeDesigner` checks every suggestion (all parameters present, finite, inside the box);
GP-UCB-PE sometimes returns a suggestion with no parameters (NaN features from its acquisition
optimiser), and any designer may raise: both fall back to a quasi-random point.
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from typing import Any, Callable, Sequence

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
_SET_SCORING = None


def _set_scoring_cls():
    import equinox as eqx
    import jax.numpy as jnp

    class SetScoringFunction(eqx.Module):
        """Vizier's ``BayesianScoringFunction`` for a set acquisition (``xs``: ``[batch, n_parallel,
        D]``): the acquisition scores each set; the trust region (if any) holds when every point of
        the set lies within the trust radius of an observed point (the set's largest minimum L-inf
        distance), else the set scores ``-1e12 - distance`` as in Vizier."""
        predictor: Any
        acquisition_fn: Any
        trust_region: Any

        def score(self, xs, seed):
            return self.score_with_aux(xs, seed)[0]

        def score_with_aux(self, xs, seed):
            pred, aux = self.predictor.predict_with_aux(xs)
            acquisition = self.acquisition_fn(pred, seed=seed)           # [batch]
            if self.trust_region is not None:
                distance = jnp.max(self.trust_region.min_linf_distance(xs), axis=-1)   # [batch]
                radius = self.trust_region.trust_radius
                acquisition = jnp.where((distance <= radius) | (radius > 0.5), acquisition, -1e12 - distance)
                aux = aux | {"linf_distance": distance}
            return acquisition, aux

    return SetScoringFunction


def set_scoring_function_factory(coefficient: float = 1.8 * math.sqrt(math.pi / 2), num_samples: int = 100):
    """A Vizier ``ScoringFunctionFactory`` ``(data, predictive, use_trust_region) -> scoring function``
    scoring *sets* of points with q-UCB (``coefficient``, ``num_samples`` Monte-Carlo draws; the
    default coefficient equals UCB's 1.8 for a single point) and a set-wise trust region. Use with
    ``VizierGPBandit(..., scoring_function_is_parallel=True)``."""
    global _SET_SCORING
    if _SET_SCORING is None:
        _SET_SCORING = _set_scoring_cls()
    cls = _SET_SCORING

    def factory(data, predictive, use_trust_region: bool = False):
        from vizier._src.algorithms.designers.gp import acquisitions as acq
        tr = acq.TrustRegion(data.features) if use_trust_region else None
        return cls(predictive, acq.QUCB(coefficient=float(coefficient), num_samples=int(num_samples)), tr)

    return factory


def fixed_trial_padding(min_trials: int = 64):
    """A Vizier ``PaddingSchedule`` with a fixed trial axis (see the module docstring)."""
    global _FTP
    if _FTP is None:
        _FTP = _fixed_trial_padding_cls()
    return _FTP(min_trials=int(min_trials))


def make_designer(name: str, problem, *, seed: int = 0, acquisition_evaluations: int = 10_000,
                  ard_restarts: int = 2, trial_padding: int = 64, ard_max_iterations: int = 50,
                  resume_offset: int = 0, batch_size: int = 1):
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
      batch_size: points per suggestion of the search; ``> 1`` gives the GP bandits the set
        acquisition of :func:`set_scoring_function_factory` (see the module docstring).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    batch = {} if batch_size == 1 else dict(scoring_function_factory=set_scoring_function_factory(),
                                            scoring_function_is_parallel=True)
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
                return gp_bandit.VizierGPBandit(problem, rng=rng, **batch)
            return gp_bandit.VizierGPBandit(
                problem, rng=rng, padding_schedule=fixed_trial_padding(trial_padding), **batch,
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
      min_request: :meth:`suggest_many` asks the designer for at least this many points and keeps
        the first ``count`` (a GP designer with a set acquisition then compiles for one set size).

    Attributes:
      num_fallbacks: how many suggestions came from the fallback.
      latencies: seconds per :meth:`suggest` / :meth:`suggest_many` call.
    """

    def __init__(self, designer, space: SearchSpace, problem, *, seed: int = 0, skip: int = 0,
                 min_request: int = 1):
        self.designer = designer
        self.min_request = max(1, int(min_request))
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
        return self.suggest_many(1)[0]

    def suggest_many(self, count: int) -> list[tuple[dict[str, float], str]]:
        """``count`` valid points of the box from one ``designer.suggest`` call, each with its source
        (``"designer"`` or ``"fallback: <why>"``). Missing, invalid or repeated suggestions (and a
        designer that raises) are replaced by quasi-random points."""
        if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 1:
            raise ValueError(f"count must be a positive int, got {count!r}")
        t0 = time.perf_counter()
        why_all, got = None, []
        try:
            with vizier_jax_context():
                sugg = list(self.designer.suggest(max(int(count), self.min_request)))
        except Exception as e:  # any designer failure falls back, never aborts the search
            sugg = []
            why_all = f"the designer raised {type(e).__name__}: {e}"
            log.warning("designer failed, falling back to quasi-random", exc_info=True)
        out, seen = [], set()
        for j in range(int(count)):
            point, why = None, why_all
            if j < len(sugg):
                params = sugg[j].parameters
                point = check_point(self.space, {k: params[k].value for k in params})
                if point is None:
                    why = (f"the designer returned an invalid suggestion "
                           f"({len(params)} of {self.space.num_dims} parameters, missing, non-finite "
                           "or outside the box)")
                elif _key(point) in seen:
                    point, why = None, "the designer repeated a point of the same batch"
            elif why is None:
                why = "the designer returned no suggestion" if not sugg else \
                    f"the designer returned {len(sugg)} of {count} suggestions"
            source = "designer"
            if point is None:
                log.warning("%s; using a quasi-random point instead", why)
                self.num_fallbacks += 1
                source = f"fallback: {why}"
                point = self._fallback_point()
            seen.add(_key(point))
            out.append((point, source))
        self.latencies.append(time.perf_counter() - t0)
        return out

    def _fallback_point(self) -> dict[str, float]:
        for _ in range(100):
            with vizier_jax_context():
                s = self._fallback_designer().suggest(1)[0]
            point = check_point(self.space, {k: s.parameters[k].value for k in s.parameters})
            if point is not None:
                return point
        raise RuntimeError("the quasi-random fallback produced no valid point")  # pragma: no cover


def _key(point: dict) -> tuple:
    return tuple(sorted(point.items()))
