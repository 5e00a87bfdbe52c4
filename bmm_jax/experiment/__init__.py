"""End-to-end merging experiments on a benchmark: every method, evaluated, tabulated, plotted.

``run_experiment(config)`` runs one :class:`ExperimentConfig` on a benchmark of
:mod:`bmm_jax.experts` (``"minilm5"``, ``"effnet4"``, :mod:`bmm_jax.presets.clip8` or any
:class:`~bmm_jax.experts.BenchmarkSpec`):

1. per seed, build (or reuse from the cache) the linear probes and fine-tuned experts
   (:func:`bmm_jax.experts.build_experts`, ``seed`` = the experts' fine-tuning seed; by default
   each encoder is fine-tuned against its task's frozen linear-probe head, ``head="lpft"``
   fine-tunes the head too);
2. evaluate every requested method on the test split and on the validation subset used for
   selection (``validation_examples`` per task, a fixed seed-0 subset of the validation split):
   accuracy, NLL, Brier score and ECE (:mod:`bmm_jax.calibration`) from the predicted
   probabilities, plus per-example test statistics:

   * ``pretrained``: θ0 with each task's linear-probe head; ``expert``: expert k on task k;
   * baselines ``average``, ``task_arithmetic``, ``ties``, ``tsv``, ``iso_c``, ``iso_cts``,
     ``wudi``, ``regmean`` (activation Grams); the anchors' own scales (TA, TIES, TSV-M, Iso-C,
     Iso-CTS) are chosen on the validation subset over :attr:`ExperimentConfig.scale_grids`,
     never on test;
   * ``bmm`` for every (anchor, Gram, hyper-parameter mode): the anchor at its selected scale,
     Grams ``activations`` (``calibration_examples`` unlabeled train inputs per task, expert k
     on task k), ``data_free`` or ``hybrid``, hyper-parameters ``shared`` (grouping ``global``,
     ``shared_trials`` trials) or ``module`` (grouping ``module_grouping``, ``module_trials``
     trials) searched by :func:`bmm_jax.search.search` on the validation subset;
   * ``bmm_sampled`` (``sample_draws > 0``): posterior draws around a BMM row's hyper-parameters
     (``Prepared.sample``, method.md §5), predicted probabilities averaged, the temperature chosen
     on validation NLL (or accuracy: ``sample_selection``; :mod:`bmm_jax.experiment.sampling`);
3. compare every BMM row with its anchor (and every sampled row with its point estimate) by a
   paired bootstrap over test examples and seeds (:mod:`bmm_jax.experiment.paired`);
4. write, atomically (temp file + rename), into the run directory::

       records.json   list of {"method", "anchor", "gram", "hparams", "seed", "task", "split",
                      "accuracy", "nll", "brier", "ece", "head"} (one per method x seed x task x split)
       records.csv    the same records as CSV
       summary.csv    one row per method: mean and std over seeds (accuracy and calibration)
       table.md       accuracy table, calibration table, paired comparisons, validation table
       calibration.md, paired.md, paired.json
       details.json   chosen scales, searches, temperatures, timings
       accuracy_by_task.png, normalized_by_method.png, reliability.png
       seed<s>/progress.json          per-seed results so far (a rerun resumes from it)
       seed<s>/examples/<method>.npz  per-example test statistics (correct, nll, confidence)
       seed<s>/search/<anchor>-<gram>-<hparams>/   the Vizier studies (resumable)

:func:`run_ablations` (:mod:`bmm_jax.experiment.ablations`) and :func:`run_fewshot`
(:mod:`bmm_jax.experiment.fewshot`) run the ablations and the few-shot Gram curve in the same
run directory; :func:`combine_ablation_files` pools their result files from separate runs (seeds
run apart) into one table.

Modules: :mod:`~bmm_jax.experiment.config` (configuration, presets), :mod:`~.running` (the run),
:mod:`~.records` (records and tables), :mod:`~.paired` (confidence intervals), :mod:`~.plots`,
:mod:`~.sampling` (posterior temperature), :mod:`~.inputs` (subsets, calibration batches),
:mod:`~.files` (atomic result files), :mod:`~.ablations`, :mod:`~.fewshot`,
:mod:`~.combine`.

Normalised accuracy of a method on a task is its accuracy divided by the task expert's accuracy
on the same split and seed. ``std`` is the sample standard deviation over seeds (0 for 1 seed).
"""
from __future__ import annotations

from bmm_jax.experiment.ablations import ABLATIONS, AblationResult, data_free_group_grams, run_ablations
from bmm_jax.experiment.combine import combine_ablation_files
from bmm_jax.experiment.config import (BASELINES, BMM_ANCHORS, DEFAULT_SAMPLE_TEMPERATURES, DEFAULT_SCALE_GRIDS,
                                       GRAM_MODES, HPARAM_MODES, PRESETS, SAMPLE_SELECTIONS, SCALED, SPLITS,
                                       ExperimentConfig, preset)
from bmm_jax.experiment.fewshot import SHOTS, run_fewshot
from bmm_jax.experiment.files import atomic_write_json, atomic_write_text
from bmm_jax.experiment.inputs import batches_of, rescale, subset_indices
from bmm_jax.experiment.paired import Comparison, Interval, compare, format_paired_table, paired_bootstrap
from bmm_jax.experiment.plots import plot_accuracy_by_task, plot_normalized
from bmm_jax.experiment.records import (GRAM_SHORT, LABELS, RECORD_KEYS, SHORT, ExperimentResult, MethodKey,
                                        Summary, format_calibration_table, format_table, method_order, record,
                                        records_csv, summarize, summary_csv)
from bmm_jax.experiment.running import markdown_report, run_experiment, write_results
from bmm_jax.experiment.sampling import TemperatureSearch, select_temperature

__all__ = ["ExperimentConfig", "ExperimentResult", "MethodKey", "Summary", "PRESETS", "BASELINES",
           "BMM_ANCHORS", "GRAM_MODES", "HPARAM_MODES", "SPLITS", "SCALED", "DEFAULT_SCALE_GRIDS",
           "DEFAULT_SAMPLE_TEMPERATURES", "RECORD_KEYS", "preset", "run_experiment", "summarize", "format_table",
           "format_calibration_table", "write_results", "markdown_report", "plot_accuracy_by_task",
           "plot_normalized", "record", "rescale", "batches_of", "subset_indices", "atomic_write_text",
           "atomic_write_json", "records_csv", "summary_csv", "method_order", "Comparison", "Interval", "compare",
           "paired_bootstrap", "format_paired_table", "select_temperature", "TemperatureSearch", "run_ablations",
           "ABLATIONS", "AblationResult", "data_free_group_grams", "run_fewshot", "SHOTS", "SHORT", "LABELS",
           "GRAM_SHORT", "combine_ablation_files", "SAMPLE_SELECTIONS"]
