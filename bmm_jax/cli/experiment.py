"""``bmm-experiment``: run a merging benchmark end to end and print the results table.

Examples::

    bmm-experiment                                  # preset "default": the README main job
    bmm-experiment --preset full --benchmark minilm5 --export experiments/results/minilm5
    bmm-experiment --preset paper --benchmark effnet4 --export experiments/results/effnet4
    bmm-experiment --preset paper --benchmark effnet4 --ablations --export experiments/results/ablations_effnet4
    bmm-experiment --preset paper --benchmark effnet4 --fewshot --export experiments/results/fewshot_effnet4
    bmm-experiment --preset paper --benchmark minilm5 --combine seeds01/ablations.json seed2/ablations.json \\
        --export experiments/results/ablations_minilm5
    bmm-experiment --benchmark clip8 --clip-model ~/clip/clip-vit-base-patch32 \\
        --clip-experts ~/clip/experts --clip-data ~/clip/data --preset paper --seeds 0

See :mod:`bmm_jax.experiment` for what is run and written.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys

from bmm_jax.cli._common import DefaultsFormatter, Parser, UsageError, run_main

PROG = "bmm-experiment"


def build_parser() -> argparse.ArgumentParser:
    from bmm_jax.experiment import (ABLATIONS, BASELINES, BMM_ANCHORS, GRAM_MODES, HPARAM_MODES, PRESETS,
                                    SAMPLE_SELECTIONS, SHOTS)
    p = Parser(
        prog=PROG,
        description="Run a benchmark configuration end to end: experts built (or reused from the cache), "
                    "every method merged and evaluated (accuracy, NLL, Brier score, 15-bin ECE), BMM compared "
                    "with its anchor by paired bootstrap confidence intervals, results written as JSON, CSV, "
                    "markdown tables and plots into a run directory (atomically), and the tables printed. "
                    "With --ablations or --fewshot, the ablation runners instead. Options left out take the "
                    "preset's value; a rerun with the same run directory resumes where it stopped.",
        formatter_class=DefaultsFormatter)
    p.add_argument("--preset", default="default", choices=sorted(PRESETS),
                   help="'default': the README main job (MiniLM-5, seed 0, TA and TSV-M anchors vs BMM with "
                        "data-free and activation Grams, module-wise hyper-parameters); 'full': every method, "
                        "seeds 0 1 2; 'paper': the paper's protocol (frozen expert heads, every method, module-wise "
                        "BMM with the library's default budget of 50 trials, 128 validation examples per task, "
                        "sampled counterparts of the TA and TSV-M activation-Gram rows with 8 posterior draws, "
                        "seeds 0 1 2)")
    p.add_argument("--benchmark", default=None,
                   help="benchmark: minilm5, effnet4, or clip8 (with --clip-model, --clip-experts, --clip-data)")
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="expert fine-tuning seeds (experts are built or reused from the cache per seed)")
    p.add_argument("--baselines", nargs="*", default=None, metavar="METHOD",
                   help=f"baseline rows, some of: {' '.join(BASELINES)}")
    p.add_argument("--anchors", nargs="*", default=None, metavar="ANCHOR",
                   help=f"anchors refined by BMM, some of: {' '.join(BMM_ANCHORS)} (also average, iso_c, iso_cts)")
    p.add_argument("--grams", nargs="+", default=None, metavar="MODE",
                   help=f"BMM Gram modes, some of: {' '.join(GRAM_MODES)}")
    p.add_argument("--hparams", nargs="+", default=None, metavar="MODE",
                   help=f"BMM hyper-parameter modes, some of: {' '.join(HPARAM_MODES)} "
                        "('shared': one (rho, s) for every module; 'module': one per --grouping group)")
    p.add_argument("--grouping", default=None, help="grouping of the module-wise search: type, block or module "
                                                    "(preset: type)")
    p.add_argument("--shared-trials", type=int, default=None, help="Vizier trials of the shared search (preset: 12)")
    p.add_argument("--module-trials", type=int, default=None,
                   help="Vizier trials of the module-wise search (preset: 24 full, 16 default, 50 paper)")
    p.add_argument("--designer", default=None, help="Vizier designer (gp_bandit, gp_ucb_pe, quasi_random, random)")
    p.add_argument("--head", default=None, choices=("frozen", "lpft"),
                   help="expert protocol: 'frozen' fine-tunes each encoder against its task's frozen linear-probe "
                        "head (the task-arithmetic protocol, the default of the built-in benchmarks); 'lpft' "
                        "fine-tunes the head too. Tables and records say which was used")
    p.add_argument("--validation-examples", type=int, default=None,
                   help="validation examples per task for every selection (preset: 128)")
    p.add_argument("--test-examples", type=int, default=None, help="test examples per task (preset: all)")
    p.add_argument("--calibration-examples", type=int, default=None,
                   help="unlabeled train inputs per task for activation Grams (preset: 256)")
    p.add_argument("--scale-grid", action="append", default=None, metavar="ANCHOR=S1,S2,...",
                   help="validation grid of an anchor's own scale, e.g. task_arithmetic=0.05,0.1,0.3 "
                        "(repeatable; anchors not given keep the preset's grid)")
    p.add_argument("--wudi-steps", type=int, default=None, help="Adam steps of WUDI-Merging (preset: 300)")
    g = p.add_argument_group("sampled BMM rows (posterior draws, method.md §5)")
    g.add_argument("--sample-draws", type=int, default=None,
                   help="posterior draws M of the 'bmm_sampled' rows; 0 runs none (preset: 0, paper 8)")
    g.add_argument("--sample-rows", nargs="+", default=None, metavar="ANCHOR/GRAM/HPARAMS",
                   help="which BMM rows get a sampled counterpart (fnmatch patterns, e.g. '*/activations/module'; "
                        "preset: every BMM row)")
    g.add_argument("--sample-temperatures", type=float, nargs="+", default=None, metavar="T",
                   help="posterior temperatures tried on validation NLL, ascending (0, the point estimate, is "
                        "always a candidate; preset: 1e-4 1e-3 1e-2 1e-1 1)")
    g.add_argument("--sample-selection", default=None, choices=SAMPLE_SELECTIONS,
                   help="validation criterion of the temperature: 'nll' (the paper's; may trade accuracy for "
                        "calibration), 'accuracy', or 'nll_keep_accuracy' (lowest NLL among temperatures that keep "
                        "the point estimate's validation accuracy); ties keep the smaller temperature (preset: nll)")
    g.add_argument("--bootstrap-resamples", type=int, default=None,
                   help="resamples of the paired bootstrap intervals (preset: 2000)")
    g = p.add_argument_group("ablations and few-shot Grams (instead of the methods table)")
    g.add_argument("--ablations", nargs="*", default=None, metavar="NAME",
                   help=f"run ablations: some of {' '.join(ABLATIONS)} (none given: all). Writes "
                        "<run-dir>/ablations/{ablations.json,ablations.md,ablation_<name>.png}")
    g.add_argument("--fewshot", action="store_true",
                   help="run the few-shot hybrid-Gram curve (test accuracy vs unlabeled inputs per task, beta "
                        "searched, against data-free and full activation Grams). Writes <run-dir>/fewshot/")
    g.add_argument("--ablation-anchor", default="task_arithmetic", help="anchor refined in the ablations / few-shot")
    g.add_argument("--ablation-gram", default="activations", choices=("activations", "data_free", "hybrid"),
                   help="Gram mode of the ablations (gram_grouping always compares data-free Grams)")
    g.add_argument("--ablation-trials", type=int, default=None,
                   help="Vizier trials of every ablation / few-shot search (default: --module-trials)")
    g.add_argument("--budget-trials", type=int, default=64, help="length of the trial-budget search")
    g.add_argument("--shots", type=int, nargs="+", default=list(SHOTS), help="unlabeled inputs per task (few-shot)")
    g.add_argument("--combine", nargs="+", default=None, metavar="JSON",
                   help="run nothing: pool the ablation or few-shot result files of separate runs (seeds run on "
                        "other machines or at other times; one study: same benchmark, settings and protocol, "
                        "disjoint seeds) into one table, JSON and plots under <run-dir>/<ablations|fewshot>_combined "
                        "(and --export). Give the runs' --preset and --benchmark; the files are only read")
    g.add_argument("--fewshot-grouping", default="type", choices=("global", "type", "block", "module"),
                   help="hyper-parameter grouping of the few-shot searches")
    g = p.add_argument_group("clip8 (downloaded CLIP checkpoints and image folders; see bmm_jax.presets.clip8)")
    g.add_argument("--clip-model", default=None,
                   help="Hugging Face CLIP folder (CLIPModel weights + tokenizer), e.g. openai/clip-vit-base-patch32")
    g.add_argument("--clip-experts", default=None,
                   help="folder of CLIPVisionModel experts: <dir>/<task> or FusionBench's "
                        "<dir>/clip-vit-base-patch32_<name>; '{seed}' in the path selects one folder per seed")
    g.add_argument("--clip-data", default=None, help="image folders <dir>/<task>/<split>/<label>/<image>")
    g.add_argument("--clip-tasks", nargs="+", default=None, metavar="TASK",
                   help="a subset of sun397 cars resisc45 eurosat svhn gtsrb mnist dtd (default: all eight); "
                        "clip8 runs seed 0 unless --seeds is given (with '{seed}' in --clip-experts)")
    p.add_argument("--cache-dir", default=None, help="expert cache root (default $BMM_JAX_CACHE or ~/.cache/bmm_jax)")
    p.add_argument("--run-dir", default=None, help="output directory (default runs/<name>); a rerun resumes in it")
    p.add_argument("--name", default=None, help="experiment name (default: the preset's)")
    p.add_argument("--export", default=None, metavar="PREFIX",
                   help="also copy the results to PREFIX.json (the records), PREFIX.md (tables), PREFIX.csv "
                        "(summary), PREFIX_paired.{md,json}, PREFIX_calibration.md and PREFIX_*.png, e.g. "
                        "experiments/results/minilm5 (ablations / few-shot: PREFIX.json, PREFIX.md, PREFIX_*.png)")
    p.add_argument("--table", default=None, metavar="RECORDS_JSON",
                   help="only print the markdown tables of an existing records file (e.g. "
                        "experiments/results/minilm5.json) and exit; runs nothing")
    p.add_argument("--no-plots", action="store_true", help="do not write the PNG plots")
    p.add_argument("--quiet", action="store_true", help="no progress bars or per-method lines")
    return p


def _benchmark(args):
    clip = (args.clip_model, args.clip_experts, args.clip_data)
    if args.benchmark == "clip8":
        if not all(clip):
            raise UsageError("--benchmark clip8 needs --clip-model, --clip-experts and --clip-data")
        from bmm_jax.presets.clip8 import TASKS, clip8_benchmark
        return clip8_benchmark(*clip, tasks=args.clip_tasks or TASKS)
    if any(clip) or args.clip_tasks:
        raise UsageError("--clip-model / --clip-experts / --clip-data / --clip-tasks need --benchmark clip8")
    if args.benchmark is not None:
        from bmm_jax.experts import get_benchmark
        get_benchmark(args.benchmark)
    return args.benchmark


def config_from_args(args):
    from bmm_jax.experiment import preset
    bench = _benchmark(args)
    seeds = args.seeds
    if seeds is None and args.benchmark == "clip8":
        seeds = (0,)                      # one set of downloaded experts
    ov = dict(benchmark=bench, seeds=seeds, baselines=args.baselines, bmm_anchors=args.anchors,
              bmm_grams=args.grams, bmm_hparams=args.hparams, module_grouping=args.grouping,
              shared_trials=args.shared_trials, module_trials=args.module_trials, designer=args.designer,
              head=args.head, validation_examples=args.validation_examples, test_examples=args.test_examples,
              calibration_examples=args.calibration_examples, wudi_steps=args.wudi_steps,
              sample_draws=args.sample_draws, sample_rows=args.sample_rows,
              sample_temperatures=args.sample_temperatures, sample_selection=args.sample_selection,
              bootstrap_resamples=args.bootstrap_resamples,
              cache_dir=args.cache_dir, run_dir=args.run_dir, name=args.name)
    if args.scale_grid:
        from bmm_jax.experiment import PRESETS, DEFAULT_SCALE_GRIDS
        grids = dict(PRESETS[args.preset].get("scale_grids", DEFAULT_SCALE_GRIDS))
        for item in args.scale_grid:
            name, sep, values = item.partition("=")
            if not sep or not name.strip():
                raise UsageError(f"--scale-grid expects ANCHOR=S1,S2,..., got {item!r}")
            try:
                grids[name.strip()] = tuple(float(v) for v in values.split(",") if v.strip())
            except ValueError:
                raise UsageError(f"--scale-grid {item!r}: scales must be numbers") from None
        ov["scale_grids"] = tuple(grids.items())
    if args.anchors is not None and not args.anchors:
        ov["bmm_anchors"] = ()
    if args.baselines is not None and not args.baselines:
        ov["baselines"] = ()
    if args.no_plots:
        ov["plots"] = False
    if args.quiet:
        ov["progress"] = False
    if args.designer is not None:
        from bmm_jax.search import DESIGNERS
        if args.designer not in DESIGNERS:
            raise ValueError(f"unknown designer {args.designer!r}; expected one of {DESIGNERS}")
    if args.ablations is not None and args.fewshot:
        raise UsageError("--ablations and --fewshot are separate runs; give one")
    if args.combine is not None and (args.ablations is not None or args.fewshot):
        raise UsageError("--combine pools existing result files and runs nothing; drop --ablations / --fewshot")
    return preset(args.preset, **ov)


EXPORTS = [("records", ".json"), ("table", ".md"), ("summary_csv", ".csv"), ("paired", "_paired.md"),
           ("paired_json", "_paired.json"), ("calibration", "_calibration.md"),
           ("plot_tasks", "_accuracy_by_task.png"), ("plot_normalized", "_normalized.png"),
           ("plot_reliability", "_reliability.png")]


def export(files: dict, prefix: str, pairs=None) -> list[str]:
    """Copy the results to ``PREFIX.json`` / ``.md`` / ``.csv`` / ``_*.png`` (atomically)."""
    from bmm_jax.experiment import atomic_write_text
    out = []
    for kind, suffix in (pairs or EXPORTS):
        if kind not in files:
            continue
        dst = prefix + suffix
        os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
        if suffix.endswith(".png"):
            tmp = dst + ".tmp"
            shutil.copyfile(files[kind], tmp)
            os.replace(tmp, dst)
        else:
            with open(files[kind]) as f:
                atomic_write_text(dst, f.read())
        out.append(dst)
    return out


def _ablation_exports(files: dict) -> list:
    pairs = [("json", ".json"), ("table", ".md")]
    for kind in files:
        if kind.startswith("plot_"):
            pairs.append((kind, "_" + kind[len("plot_"):] + ".png"))
    return pairs


def main(argv=None) -> int:
    def body():
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.table is not None:
            import json
            from bmm_jax.experiment import format_calibration_table, format_table
            if not os.path.isfile(args.table):
                raise FileNotFoundError(f"records file not found: {args.table}")
            with open(args.table) as f:
                recs = json.load(f)
            if not isinstance(recs, list) or not recs:
                raise ValueError(f"{args.table} is not a non-empty list of records")
            print(format_table(recs, "test"))
            if any(r.get("nll") is not None for r in recs):
                print("\n" + format_calibration_table(recs, "test"))
            return 0
        cfg = config_from_args(args)
        if args.combine is not None:
            from bmm_jax.experiment import combine_ablation_files
            res = combine_ablation_files(args.combine, cfg)
            print(res.table, flush=True)
            print(f"\n{PROG}: pooled {len(args.combine)} files, seeds "
                  f"{sorted({int(r['seed']) for r in res.records})}; results in {res.run_dir}", flush=True)
            if args.export:
                for f in export(res.files, args.export, _ablation_exports(res.files)):
                    print(f"{PROG}: wrote {f}", flush=True)
            return 0
        if not args.quiet:
            what = "ablations" if args.ablations is not None else ("few-shot Grams" if args.fewshot else "methods")
            print(f"{PROG}: {cfg.name} on {cfg.benchmark_name} ({what}), seeds {list(cfg.seeds)} -> "
                  f"{cfg.resolved_run_dir}", file=sys.stderr, flush=True)
        if args.ablations is not None or args.fewshot:
            from bmm_jax.experiment import ABLATIONS, run_ablations, run_fewshot
            if args.ablations is not None:
                res = run_ablations(cfg, ablations=tuple(args.ablations) or ABLATIONS, anchor=args.ablation_anchor,
                                    gram=args.ablation_gram, trials=args.ablation_trials,
                                    budget_trials=args.budget_trials)
            else:
                res = run_fewshot(cfg, shots=args.shots, anchor=args.ablation_anchor, grouping=args.fewshot_grouping,
                                  trials=args.ablation_trials)
            print(res.table, flush=True)
            print(f"\n{PROG}: done in {res.seconds / 60:.1f} min; results in {res.run_dir}", flush=True)
            if args.export:
                for f in export(res.files, args.export, _ablation_exports(res.files)):
                    print(f"{PROG}: wrote {f}", flush=True)
            return 0
        from bmm_jax.experiment import run_experiment
        res = run_experiment(cfg)
        print(res.table, flush=True)
        print(f"\n{PROG}: done in {res.seconds / 60:.1f} min; results in {res.run_dir}", flush=True)
        if args.export:
            for f in export(res.files, args.export):
                print(f"{PROG}: wrote {f}", flush=True)
        return 0
    return run_main(PROG, body, debug=bool(os.environ.get("BMM_DEBUG")))


if __name__ == "__main__":
    sys.exit(main())
