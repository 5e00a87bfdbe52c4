"""Sampling-based BMM (method.md §5): the posterior temperature chosen on validation NLL.

``prep.sample(key, M, hparams, temperature=sigma)`` draws ``M`` merged models; their predicted
probabilities are averaged (:func:`bmm_jax.evaluate.ensemble_log_probs`). The temperature is chosen
by :func:`select_temperature` on the mean validation NLL over tasks (or on accuracy:
``ExperimentConfig.sample_selection``), with the same key at every
temperature (common random numbers: the draws differ only by their scale), never on test.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple, Sequence


def sample_key(sample_seed: int, seed: int, slug: str):
    """The PRNG key of a sampled row: ``sample_seed``, folded with the expert seed and a CRC-32 of
    the row's slug (the same key at every temperature)."""
    import zlib

    import jax
    k = jax.random.fold_in(jax.random.PRNGKey(int(sample_seed)), int(seed))
    return jax.random.fold_in(k, zlib.crc32(slug.encode()) & 0x7FFFFFFF)


class TemperatureSearch(NamedTuple):
    """Result of :func:`select_temperature`: the chosen temperature (0 = the point estimate),
    ``values`` ``{temperature: validation loss}`` of every temperature tried (ascending), and
    ``details`` ``{temperature: what evaluate_at returned besides the value}``."""
    best: float
    values: dict
    details: dict


def select_temperature(evaluate_at: Callable[[float], tuple[float, object]], temperatures: Sequence[float], *,
                       point_value: float, refine: bool = True, patience: int = 2) -> TemperatureSearch:
    """Minimise a validation loss over posterior temperatures.

    The point estimate (temperature 0, loss ``point_value``) is a candidate, so the chosen model is
    never worse on validation than the point estimate. The grid is walked upwards and stops after
    ``patience`` consecutive temperatures worse than the best so far (the loss blows up at large
    temperatures); with ``refine``, the best grid temperature ``t > 0`` is refined by trying
    ``t / sqrt(10)`` and ``t * sqrt(10)``.

    Args:
      evaluate_at: ``t -> (loss, details)`` for ``t > 0``.
      temperatures: ascending positive grid.
      point_value: the loss at ``t = 0``.

    Returns:
      :class:`TemperatureSearch` (ties: the smaller temperature).
    """
    grid = [float(t) for t in temperatures]
    if any(not (math.isfinite(t) and t > 0) for t in grid) or grid != sorted(set(grid)):
        raise ValueError(f"temperatures must be distinct positive finite numbers, ascending; got {temperatures!r}")
    values = {0.0: float(point_value)}
    details: dict = {0.0: None}

    def run(t):
        v, d = evaluate_at(t)
        values[t] = float(v) if math.isfinite(float(v)) else math.inf
        details[t] = d

    worse = 0
    for t in grid:
        best_before = min(values.values())
        run(t)
        worse = worse + 1 if values[t] > best_before else 0
        if worse >= patience:
            break
    positive = {t: v for t, v in values.items() if t > 0}
    if refine and positive:
        tb = min(positive, key=lambda t: (positive[t], t))
        for t in (tb / math.sqrt(10.0), tb * math.sqrt(10.0)):
            if all(abs(t - u) > 1e-12 * t for u in values):
                run(t)
    best = min(values, key=lambda t: (values[t], t))
    order = sorted(values)
    return TemperatureSearch(best, {t: values[t] for t in order}, {t: details[t] for t in order})


__all__ = ["TemperatureSearch", "select_temperature", "sample_key"]
