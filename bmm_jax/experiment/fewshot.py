"""Few-shot hybrid Grams (method.md §3.3): BMM with Grams from a handful of unlabeled inputs.

For each number of shots ``n`` (unlabeled calibration inputs per task, default 1, 2, 4, ..., 64,
256; nested subsets of one seeded permutation), the activation Grams of those ``n`` inputs are mixed
with the data-free Grams, ``G_k(β) = β G_k^data / tr + (1 - β) G_k^free / tr`` rescaled to
``tr(G_k^data)``, and β is searched together with (ρ, s)
(:class:`bmm_jax.search.HybridPrepared`, extra search parameter ``beta``). References, searched
with the same grouping and budget: data-free Grams, and full activation Grams
(``config.calibration_examples`` inputs per task). Output like :mod:`bmm_jax.experiment.ablations`:
``fewshot.json``, ``fewshot.md`` and ``fewshot.png`` (test accuracy against shots).
"""
from __future__ import annotations

import os
import time
from typing import Sequence

from bmm_jax.experiment.ablations import AblationResult, ItemRun, _records, finish_run
from bmm_jax.experiment.config import ExperimentConfig

SHOTS = (1, 2, 4, 8, 16, 32, 64, 256)


def run_fewshot(config: ExperimentConfig, *, shots: Sequence[int] = SHOTS, anchor: str = "task_arithmetic",
                grouping: str = "type", trials: int | None = None,
                run_dir: str | None = None) -> AblationResult:
    """Test accuracy of BMM against the number of unlabeled calibration inputs per task.

    Args:
      config: benchmark, seeds and selection protocol.
      shots: inputs per task of the hybrid Grams.
      anchor: the anchor refined (its own scale chosen on validation).
      grouping: hyper-parameter grouping of every search.
      trials: Vizier trials per search (default ``config.module_trials``).
      run_dir: output directory (default ``<config run dir>/fewshot``).

    Returns:
      :class:`~bmm_jax.experiment.ablations.AblationResult`; records of ablation ``"fewshot"``:
      setting ``"hybrid (β searched)"`` with ``x = n``, references with ``x = None``; the chosen
      β per (seed, n) is in the records' ``beta``.
    """
    shots = tuple(int(n) for n in shots)
    if not shots or any(n < 1 for n in shots) or len(set(shots)) != len(shots):
        raise ValueError(f"shots must be distinct positive ints, got {shots}")
    trials = int(trials or config.module_trials)
    t_start = time.perf_counter()
    root = config.resolved_run_dir
    out_dir = os.path.abspath(run_dir or os.path.join(root, "fewshot"))
    settings = {"shots": list(shots), "anchor": anchor, "grouping": grouping, "trials": trials}
    records: list[dict] = []
    details: dict = {"settings": settings, "seeds": {}}
    for seed in config.seeds:
        ir = ItemRun(config, seed, root, "fewshot", settings)
        sr = ir.sr
        t_seed = time.perf_counter()
        for gram, label in (("data_free", "data-free Grams"),
                            ("activations", f"activation Grams ({config.calibration_examples} inputs per task)")):
            it = ir.searched(f"{anchor}-{gram}-{grouping}-{trials}", anchor, gram, grouping, trials)
            records += _records("fewshot", label, None, seed, it)
        for n in sorted(shots):
            def compute(n=n):
                from bmm_jax.search import HybridPrepared
                b = sr.bench
                sr._prep, sr._prep_key = None, None       # free the previous factors
                prep = HybridPrepared(b.base_params, b.expert_params, sr.anchor(anchor)[0], sr.activation_grams(n),
                                      sr.grams("data_free"), labels=b.adapter.labels)
                res, _ = sr.search(anchor, f"hybrid{n}", grouping, trials,
                                   os.path.join(sr.dir, "search", f"{anchor}-hybrid{n}-{grouping}-{trials}"),
                                   prep=prep, extras=("beta",))
                out = ir.both(res.params, hparams=res.hparams, extras=res.extras, kept_anchor=res.best_trial == 0,
                              best_value=res.best_value, factorizations=prep.num_factorizations)
                del prep
                return out
            it = ir.item(f"hybrid|{n}", compute)
            beta = (it.get("info", {}).get("extras") or {}).get("beta")
            records += _records("fewshot", "hybrid (β searched)", n, seed, it, beta=beta)
        details["seeds"][str(seed)] = {"items": {k: v.get("info") for k, v in ir.items.items()},
                                       "timings": sr.timings, "seconds": time.perf_counter() - t_seed}
        ir = sr = None     # free this seed's experts and factors before the next
    title = f"{config.benchmark_name}: few-shot hybrid Grams ({anchor} anchor, {grouping} grouping), seeds {list(config.seeds)}"
    return finish_run(records, out_dir, title, details, config, "fewshot", t_start)


__all__ = ["SHOTS", "run_fewshot"]
