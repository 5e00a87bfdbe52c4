"""``bmm-experiment``: run a merging benchmark end to end and print the results table.

Examples::

    bmm-experiment                                  # preset "default": the README main job
    bmm-experiment --preset full --benchmark minilm5 --export experiments/results/minilm5
    bmm-experiment --preset full --benchmark effnet4 --seeds 0 1 2 --module-trials 24

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
    from bmm_jax.experiment import BASELINES, BMM_ANCHORS, GRAM_MODES, HPARAM_MODES, PRESETS
    p = Parser(
        prog=PROG,
        description="Run a benchmark configuration end to end: experts built (or reused from the cache), "
                    "every method merged and evaluated, results written as JSON, CSV, a markdown table and "
                    "plots into a run directory (atomically), and the table printed. Options left out take "
                    "the preset's value.",
        formatter_class=DefaultsFormatter)
    p.add_argument("--preset", default="default", choices=sorted(PRESETS),
                   help="'default': the README main job (MiniLM-5, seed 0, TA and TSV-M anchors vs BMM with "
                        "data-free and activation Grams, module-wise hyper-parameters); 'full': every method, "
                        "seeds 0 1 2 (the README tables)")
    p.add_argument("--benchmark", default=None, help="benchmark name: minilm5 or effnet4")
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
                   help="Vizier trials of the module-wise search (preset: 24 full, 16 default)")
    p.add_argument("--designer", default=None, help="Vizier designer (gp_bandit, gp_ucb_pe, quasi_random, random)")
    p.add_argument("--validation-examples", type=int, default=None,
                   help="validation examples per task for every selection (preset: 128)")
    p.add_argument("--test-examples", type=int, default=None, help="test examples per task (preset: all)")
    p.add_argument("--calibration-examples", type=int, default=None,
                   help="unlabeled train inputs per task for activation Grams (preset: 256)")
    p.add_argument("--scale-grid", action="append", default=None, metavar="ANCHOR=S1,S2,...",
                   help="validation grid of an anchor's own scale, e.g. task_arithmetic=0.05,0.1,0.3 "
                        "(repeatable; anchors not given keep the preset's grid)")
    p.add_argument("--wudi-steps", type=int, default=None, help="Adam steps of WUDI-Merging (preset: 300)")
    p.add_argument("--cache-dir", default=None, help="expert cache root (default $BMM_JAX_CACHE or ~/.cache/bmm_jax)")
    p.add_argument("--run-dir", default=None, help="output directory (default runs/<name>); a rerun resumes in it")
    p.add_argument("--name", default=None, help="experiment name (default: the preset's)")
    p.add_argument("--export", default=None, metavar="PREFIX",
                   help="also copy the results to PREFIX.json (the records), PREFIX.md (table), PREFIX.csv "
                        "(summary) and PREFIX_*.png, e.g. experiments/results/minilm5")
    p.add_argument("--table", default=None, metavar="RECORDS_JSON",
                   help="only print the markdown tables of an existing records file (e.g. "
                        "experiments/results/minilm5.json) and exit; runs nothing")
    p.add_argument("--no-plots", action="store_true", help="do not write the PNG plots")
    p.add_argument("--quiet", action="store_true", help="no progress bars or per-method lines")
    return p


def config_from_args(args):
    from bmm_jax.experiment import preset
    ov = dict(benchmark=args.benchmark, seeds=args.seeds, baselines=args.baselines, bmm_anchors=args.anchors,
              bmm_grams=args.grams, bmm_hparams=args.hparams, module_grouping=args.grouping,
              shared_trials=args.shared_trials, module_trials=args.module_trials, designer=args.designer,
              validation_examples=args.validation_examples, test_examples=args.test_examples,
              calibration_examples=args.calibration_examples, wudi_steps=args.wudi_steps,
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
    if args.benchmark is not None:
        from bmm_jax.experts import get_benchmark
        get_benchmark(args.benchmark)
    return preset(args.preset, **ov)


def export(files: dict, prefix: str) -> list[str]:
    """Copy the results to ``PREFIX.json`` / ``.md`` / ``.csv`` / ``_*.png`` (atomically)."""
    from bmm_jax.experiment import atomic_write_text
    out = []
    pairs = [("records", ".json"), ("table", ".md"), ("summary_csv", ".csv"),
             ("plot_tasks", "_accuracy_by_task.png"), ("plot_normalized", "_normalized.png")]
    for kind, suffix in pairs:
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


def main(argv=None) -> int:
    def body():
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.table is not None:
            import json
            from bmm_jax.experiment import format_table
            if not os.path.isfile(args.table):
                raise FileNotFoundError(f"records file not found: {args.table}")
            with open(args.table) as f:
                recs = json.load(f)
            if not isinstance(recs, list) or not recs:
                raise ValueError(f"{args.table} is not a non-empty list of records")
            print(format_table(recs, "test"))
            return 0
        cfg = config_from_args(args)
        from bmm_jax.experiment import run_experiment
        if not args.quiet:
            print(f"{PROG}: {cfg.name} on {cfg.benchmark_name}, seeds {list(cfg.seeds)} -> {cfg.resolved_run_dir}",
                  file=sys.stderr, flush=True)
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
