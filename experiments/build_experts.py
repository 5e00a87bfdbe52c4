#!/usr/bin/env python
"""Build (or reuse) the fine-tuned experts of the MiniLM-5 / EffNet-4 benchmarks and score them.

For every task: dataset sizes, the linear probe's test accuracy (pretrained encoder, probe head)
and the fine-tuned expert's test accuracy (expert encoder, expert head), and the build time.
Experts are cached under ``<cache>/experts`` (``$BMM_JAX_CACHE`` or ``~/.cache/bmm_jax``); a
rerun reuses them. Results go to ``--out`` (JSON) and a table is printed.

Examples::

    .venv/bin/python experiments/build_experts.py --benchmark all --seeds 0
    .venv/bin/python experiments/build_experts.py --benchmark minilm5 --seeds 0 1 2 --no-eval
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _table(rows: list[dict]) -> str:
    head = (f"{'benchmark':9s} {'seed':>4s} {'task':15s} {'train':>6s} {'val':>5s} {'test':>6s} "
            f"{'ft-n':>5s} {'probe':>6s} {'expert':>6s} {'build s':>8s} {'cpu s':>7s} {'reused':>6s}")
    lines = [head, "-" * len(head)]
    for r in rows:
        def pct(v):
            return f"{100 * v:6.2f}" if isinstance(v, float) else f"{'-':>6s}"
        lines.append(f"{r['benchmark']:9s} {r['seed']:4d} {r['task']:15s} {r['n_train']:6d} "
                     f"{r['n_validation']:5d} {r['n_test']:6d} {r['n_finetune']:5d} "
                     f"{pct(r.get('probe_test_acc'))} {pct(r.get('expert_test_acc'))} "
                     f"{r['build_seconds']:8.1f} {r['build_cpu_seconds']:7.1f} {str(r['reused']):>6s}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="build_experts.py",
        description="Build (or reuse from the cache) the linear probes and fine-tuned experts of "
                    "the merging benchmarks, evaluate them on the test splits, and write a JSON "
                    "report plus a table.")
    parser.add_argument("--benchmark", choices=("minilm5", "effnet4", "all"), default="all",
                        help="which benchmark(s) to build (default: all)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="fine-tuning seeds (default: 0); the experiments use 0 1 2")
    parser.add_argument("--cache-dir", default=None,
                        help="cache root (default: $BMM_JAX_CACHE or ~/.cache/bmm_jax)")
    parser.add_argument("--out", default="experiments/results/experts.json",
                        help="JSON report path (default: experiments/results/experts.json)")
    parser.add_argument("--no-eval", action="store_true",
                        help="only build; skip the test-set evaluation")
    parser.add_argument("--max-eval", type=int, default=None,
                        help="evaluate on a fixed random subset of at most this many test examples")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    args = parser.parse_args(argv)

    import jax
    from bmm_jax import data, evaluate, experts

    names = ["minilm5", "effnet4"] if args.benchmark == "all" else [args.benchmark]
    rows, runs = [], []
    for name in names:
        for seed in args.seeds:
            load0 = _loadavg()
            t0, c0 = time.time(), time.process_time()
            bench = experts.build_experts(name, cache_dir=args.cache_dir, seed=seed,
                                          progress=not args.no_progress)
            build_s, build_cpu = time.time() - t0, time.process_time() - c0
            run = {"benchmark": name, "seed": seed, "build_seconds": build_s, "build_cpu_seconds": build_cpu,
                   "loadavg_before": load0, "loadavg_after": _loadavg(),
                   "config": bench.config.to_dict(), "tasks": {}}
            eval_s = 0.0
            for k, task in enumerate(bench.tasks):
                st = bench.stats[task]
                sizes = data.info(task).sizes
                row = {"benchmark": name, "seed": seed, "task": task,
                       "n_train": sizes["train"], "n_validation": sizes["validation"],
                       "n_test": sizes["test"], "n_finetune": st["n_train"], "n_probe": st["n_probe"],
                       "num_classes": st["num_classes"],
                       "build_seconds": st["probe_seconds"] + st["expert_seconds"],
                       "probe_seconds": st["probe_seconds"], "expert_seconds": st["expert_seconds"],
                       "build_cpu_seconds": st["probe_cpu_seconds"] + st["expert_cpu_seconds"],
                       "probe_l2": st.get("probe_l2"), "probe_val_accuracy": st.get("probe_val_accuracy"),
                       "reused": bool(st["probe_reused"] and st["expert_reused"]),
                       "first_loss": st.get("first_loss"), "final_loss": st.get("final_loss")}
                if not args.no_eval:
                    te = time.time()
                    kw = dict(split="test", max_examples=args.max_eval, load=bench.load)
                    row["probe_test_acc"] = evaluate.evaluate(
                        bench.adapter, bench.base_params, bench.probe_heads, [task], **kw)[task]
                    row["expert_test_acc"] = evaluate.evaluate(
                        bench.adapter, bench.expert_params[k], bench.heads, [task], **kw)[task]
                    row["eval_seconds"] = time.time() - te
                    eval_s += row["eval_seconds"]
                rows.append(row)
                run["tasks"][task] = row
            run["eval_seconds"] = eval_s
            runs.append(run)
            print(f"\n{name} seed {seed}: built in {build_s:.1f} s wall, {build_cpu:.1f} s CPU (load average before "
                  f"{load0}, after {run['loadavg_after']}); evaluation {eval_s:.1f} s", flush=True)
            evaluate.clear_cache()

    print()
    print(_table(rows))
    report = {"created": time.strftime("%Y-%m-%dT%H:%M:%S"), "host": platform.node(),
              "cpu_count": os.cpu_count(), "jax": jax.__version__, "runs": runs}
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        prev = {}
        if os.path.exists(args.out):   # keep the runs of other benchmarks / seeds
            try:
                with open(args.out) as f:
                    prev = json.load(f)
            except (OSError, json.JSONDecodeError):
                prev = {}
        keep = [r for r in prev.get("runs", [])
                if (r.get("benchmark"), r.get("seed")) not in {(r2["benchmark"], r2["seed"]) for r2 in runs}]
        report["runs"] = sorted(keep + runs, key=lambda r: (r["benchmark"], r["seed"]))
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
