"""Benchmark of the outer level (issue 4): suggestion latency, search quality, and MiniLM-5.

Three parts (``--parts``), each merged into one JSON file (``--out``) and printed as tables:

``latency``
    Seconds per suggestion vs search dimensions (``--dims``, default 4 8 16 24 48) on a synthetic
    box ``[0, 1]^d`` after ``--latency-init`` random completed trials. Every (designer, d) runs in a
    fresh subprocess without a persistent JAX compilation cache, so the first suggestion includes
    all XLA compilation (what a cold search sees). Designers:

    * ``gp_bandit`` / ``gp_ucb_pe``: this library's configured in-RAM designers
      (:func:`bmm_jax.search.make_designer`: fixed trial padding, 2 ARD restarts, 10 000 Eagle
      evaluations), fed each trial once; ``--latency-suggest`` suggestions each, reported as the
      first (cold) and the median of the rest (steady state);
    * ``vizier_default``: Vizier's default designer (GP-UCB-PE, Vizier's own settings) the way the
      in-process Vizier service runs it: a fresh designer that replays every trial at each
      suggestion. It is slow, so it is capped at ``--default-suggest`` suggestions per d.

``synthetic``
    Best-found value vs trials, GP designers against random and quasi-random search, through the
    real :func:`bmm_jax.search.search` driver (SQLite study, the two seeded trials, fallbacks) on a
    synthetic BMM-like objective: for each hyper-parameter group ``g`` of a BERT-shaped label tree
    (``type`` grouping: 6 groups = 12 dims; ``module`` grouping of 2 blocks: 12 groups = 24 dims),
    ``f = sum_g w_g exp(-(log10 rho_g - c_g)^2 / (2 * 1.5^2) - (s_g - d_g)^2 / (2 * 0.25^2))`` with
    ``c_g ~ U(-3.5, 1.5)``, ``d_g ~ U(0.7, 1.3)``, ``w_g ~ U(0.5, 1.5)`` normalised to sum 1
    (maximum 1), drawn per function seed; ``--seeds`` function/designer seeds per setting.

``throughput``
    Trials per minute of the search on MiniLM-5 against ``SearchConfig.batch_size``
    (``--batch-sizes``, default 1 4 8): the library's default objective (mean validation accuracy,
    ``SearchConfig.validation_examples`` = 128 per task; batched: vmapped forward over the
    trials' params; an arm ``BmM`` such as ``4m1`` runs batch size ``B`` with the forward vmapped
    over ``M`` models per call, ``members_per_call=M``), the GP bandit, the module-wise (``type``) space, BMM with data-free Grams on
    a TA(0.3) anchor. Every measured search resumes a copy of one template study holding
    ``--tp-warm`` finished trials (so every arm's suggestions come from a fitted GP) and runs
    ``--tp-trials`` more (the exact anchor is not evaluated). One untimed warm-up search per arm
    (compilations), then ``--tp-rounds`` rounds in which the arms run in turn, A/B interleaved, the
    order rotated every round. Reported per arm: the median over rounds of trials per minute of the
    whole ``search`` call, and its split (designer seconds, evaluation seconds: params + objective).

``components``
    Where a MiniLM-5 trial's time goes, per trial, for each batch size of ``--batch-sizes``
    (medians of ``--comp-repeats`` interleaved repeats after a warm-up): the merged params (eager
    ``prep.params`` per trial vs one jitted ``jax.vmap(prep.params)`` per batch) and the validation
    evaluation (:func:`bmm_jax.evaluate.evaluate` per trial vs :func:`~bmm_jax.evaluate.evaluate_batch`,
    the forward vmapped over the batch).

``minilm``
    The real MiniLM-5 benchmark (``bmm_jax.experts.build_experts("minilm5", seed=0)``, read from the
    cache only: the part refuses to run while a builder is running or a manifest is missing).
    Anchor: Task Arithmetic with its scale (0.3). BMM with data-free Grams (``bmm_jax.prepare``),
    searched on mean validation accuracy (128 examples per task) with ``grouping="global"``
    (shared hyper-parameters) and ``grouping="type"`` (module-wise), ``--real-trials`` trials each
    (plus the exact-anchor evaluation), optionally a random-search run of the module-wise space
    (``--real-random``); then validation and test accuracy of the anchor and of each search's
    best model, with wall times. Run directories go to ``--run-root``.

Every part records the 1-minute load average before and after (the machine is shared).

Usage::

    .venv/bin/python experiments/bench_search.py --parts latency synthetic
    .venv/bin/python experiments/bench_search.py --parts minilm --real-trials 25
    .venv/bin/python experiments/bench_search.py --parts throughput --batch-sizes 1 4 8
    .venv/bin/python experiments/bench_search.py --quick          # smoke test (~2 min)
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

DEFAULT_OUT = os.path.join(REPO, "experiments", "results", "bench_search.json")
RESULTS = os.path.join(REPO, "experiments", "results")


def _load():
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:  # pragma: no cover
        return None


# =========================================================================== latency
def _synthetic_value(x) -> float:
    import numpy as np
    x = np.asarray(x, np.float64)
    c = 0.3 + 0.4 * np.linspace(0.0, 1.0, len(x))
    return float(np.exp(-np.sum((x - c) ** 2) / (0.1 * len(x))))


def latency_worker(designer: str, dims: int, n_init: int, n_suggest: int, seed: int) -> dict:
    """One (designer, dims) latency measurement, in this (fresh) process."""
    import numpy as np
    from vizier import pyvizier as vz
    from bmm_jax.search import designer as D
    from bmm_jax.search.space import SearchSpace

    problem = vz.ProblemStatement()
    names = [f"x{i:02d}" for i in range(dims)]
    for n in names:
        problem.search_space.root.add_float_param(n, 0.0, 1.0)
    problem.metric_information.append(vz.MetricInformation("objective", goal=vz.ObjectiveMetricGoal.MAXIMIZE))
    rng = np.random.default_rng(seed)

    def completed(point, tid):
        t = vz.Trial(id=tid, parameters=point)
        t.complete(vz.Measurement(metrics={"objective": _synthetic_value([point[n] for n in names])}))
        return t

    trials = [completed({n: float(v) for n, v in zip(names, rng.uniform(size=dims))}, i + 1) for i in range(n_init)]
    # a SearchSpace with the box of the problem, only for SafeDesigner's validity checks
    space = _Box(names)
    lat, cpu, fallbacks = [], [], 0
    import contextlib
    scope = contextlib.ExitStack()
    if designer == "gp_bandit_cached":  # the search's persistent JAX compilation cache, pre-filled
        from bmm_jax.search import _jax_cache
        scope.enter_context(_jax_cache(os.environ["BMM_BENCH_JAX_CACHE"]))
        designer_name = "gp_bandit"
    else:
        designer_name = designer
    if designer == "vizier_default":
        for j in range(n_suggest):
            t0, c0 = time.perf_counter(), time.process_time()
            d = D.make_designer("gp_ucb_pe_default", problem, seed=seed + j)
            safe = D.SafeDesigner(d, space, problem, seed=seed)
            safe.update(trials)          # the service replays the whole study each time
            point, src = safe.suggest()
            lat.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
            fallbacks += src != "designer"
            trials.append(completed(point, len(trials) + 1))
    else:
        d = D.make_designer(designer_name, problem, seed=seed)
        safe = D.SafeDesigner(d, space, problem, seed=seed)
        safe.update(trials)
        for j in range(n_suggest):
            t0, c0 = time.perf_counter(), time.process_time()
            point, src = safe.suggest()
            lat.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
            fallbacks += src != "designer"
            trials.append(completed(point, len(trials) + 1))
            safe.update([trials[-1]])
    scope.close()
    return {"designer": designer, "dims": dims, "n_init": n_init, "latencies": lat, "cpu_seconds": cpu,
            "fallbacks": fallbacks, "first": lat[0],
            "steady_median": statistics.median(lat[1:]) if len(lat) > 1 else None,
            "steady_min": min(lat[1:]) if len(lat) > 1 else None,
            "steady_cpu_median": statistics.median(cpu[1:]) if len(cpu) > 1 else None}


class _Box:
    """Duck-typed stand-in for SearchSpace (bounds / num_dims) for the latency worker."""

    def __init__(self, names):
        self.names = names

    @property
    def bounds(self):
        return {n: (0.0, 1.0) for n in self.names}

    @property
    def num_dims(self):
        return len(self.names)


def _latency_subprocess(args, designer: str, dims: int, n: int, env: dict) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "latency", "--worker-designer",
           designer, "--worker-dims", str(dims), "--latency-init", str(args.latency_init),
           "--worker-suggest", str(n)]
    t0 = time.time()
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.worker_timeout)
        line = [l for l in out.stdout.splitlines() if l.startswith("{")]
        if out.returncode != 0 or not line:
            row = {"designer": designer, "dims": dims, "error": out.stderr[-1500:]}
        else:
            row = json.loads(line[-1])
    except subprocess.TimeoutExpired:
        row = {"designer": designer, "dims": dims, "error": f"timeout after {args.worker_timeout} s"}
    row["process_seconds"] = time.time() - t0
    row["load"] = _load()
    return row


def run_latency(args, previous: dict | None = None) -> dict:
    """Rows of ``previous`` for (designer, dims) pairs not measured now are kept."""
    rows = []
    load0 = _load()
    for dims in args.dims:
        for designer in args.latency_designers:
            n = {"vizier_default": args.default_suggest, "gp_ucb_pe": args.ucb_suggest}.get(designer, args.latency_suggest)
            env = {**os.environ, "JAX_PLATFORMS": "cpu"}
            if designer == "gp_bandit_cached":
                with tempfile.TemporaryDirectory() as cache:
                    env["BMM_BENCH_JAX_CACHE"] = cache
                    warm = _latency_subprocess(args, designer, dims, 2, env)   # fills the cache
                    row = _latency_subprocess(args, designer, dims, n, env)
                    row["warmup_first"] = warm.get("first")
            else:
                row = _latency_subprocess(args, designer, dims, n, env)
            rows.append(row)
            print(_latency_row(row), flush=True)
    done = {(r["designer"], r["dims"]) for r in rows}
    rows = [r for r in (previous or {}).get("rows", []) if (r["designer"], r["dims"]) not in done] + rows
    rows.sort(key=lambda r: (r["dims"], r["designer"]))
    return {"rows": rows, "load_before": load0, "load_after": _load(), "n_init": args.latency_init,
            "note": "fresh process per row; no persistent JAX cache except gp_bandit_cached (the search's "
                    "cache, filled by a previous process): 'first' includes XLA compilation; "
                    "vizier_default rebuilds the designer and replays the study at every suggestion, "
                    "as the Vizier service does; latencies are wall seconds on a shared 2-core machine "
                    "(see 'load'), cpu_seconds the process CPU time"}


def _latency_row(r) -> str:
    if "error" in r:
        return f"  {r['designer']:<15} d={r['dims']:<3} ERROR {r['error'][-200:]!r}"
    st = "-" if r["steady_median"] is None else f"{r['steady_median']:.2f}"
    return (f"  {r['designer']:<15} d={r['dims']:<3} first {r['first']:6.2f} s  steady median {st:>6} s  "
            f"all {[round(x, 2) for x in r['latencies']]}  fallbacks {r['fallbacks']}  load {r['load']}")


def latency_table(res: dict) -> str:
    rows = res["rows"]
    designers = list(dict.fromkeys(r["designer"] for r in rows))
    dims = sorted({r["dims"] for r in rows})
    head = ["dims"] + [f"{d}: first / steady median (s)" for d in designers]
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for d in dims:
        cells = [str(d)]
        for des in designers:
            r = next((r for r in rows if r["dims"] == d and r["designer"] == des), None)
            if r is None or "error" in r:
                cells.append("error" if r else "-")
            else:
                st = "-" if r["steady_median"] is None else f"{r['steady_median']:.2f}"
                sc = r.get("steady_cpu_median")
                cells.append(f"{r['first']:.1f} / {st}" + ("" if sc is None else f" ({sc:.2f} cpu)"))
        lines.append(" | ".join(cells))
    return "\n".join(lines)


# =========================================================================== synthetic quality
def _bert_like(blocks: int = 2, d: int = 4):
    import numpy as np
    z = lambda *s: np.zeros(s, np.float32)
    return {"encoder": {"layer": {str(i): {
        "attention": {"self": {"query": {"kernel": z(d, d)}, "key": {"kernel": z(d, d)}, "value": {"kernel": z(d, d)}},
                      "output": {"dense": {"kernel": z(d, d)}}},
        "intermediate": {"dense": {"kernel": z(d, 2 * d)}},
        "output": {"dense": {"kernel": z(2 * d, d)}}} for i in range(blocks)}}}


def synthetic_function(space, fseed: int):
    """``f(point) -> value in (0, 1]`` (see the module docstring) and its optimum point."""
    import numpy as np
    from bmm_jax.search.space import RHO_SUFFIX, SCALE_SUFFIX
    rng = np.random.default_rng(10_000 + fseed)
    g = len(space.groups)
    c, dd, w = rng.uniform(-3.5, 1.5, g), rng.uniform(0.7, 1.3, g), rng.uniform(0.5, 1.5, g)
    w = w / w.sum()
    names = [grp.name for grp in space.groups]

    def f(point) -> float:
        lr = np.array([point[n + RHO_SUFFIX] for n in names])
        s = np.array([point[n + SCALE_SUFFIX] for n in names])
        return float(np.sum(w * np.exp(-(lr - c) ** 2 / (2 * 1.5 ** 2) - (s - dd) ** 2 / (2 * 0.25 ** 2))))
    return f


def run_one_synthetic(grouping: str, designer: str, seed: int, trials: int) -> dict:
    import numpy as np
    import bmm_jax.search as S
    from bmm_jax.labels import build_labels
    from bmm_jax.search.space import SCALE_SUFFIX
    labels = build_labels(_bert_like())
    cfg = S.SearchConfig(grouping=grouping, num_trials=trials, designer=designer, seed=seed, jax_cache_dir=None,
                         anchor_trial=False)
    space = S.build_space(labels, cfg)
    f = synthetic_function(space, seed)
    # the params function hands the per-module hparams through; the objective reads them back
    by_module = {m.path: g.name for g in space.groups for m in g.modules}

    def params_fn(hparams, **_):
        return hparams

    def objective(hp):
        point = {}
        for path, grp in by_module.items():
            point[grp + ":log10_rho"] = math.log10(hp[path]["rho"])
            point[grp + SCALE_SUFFIX] = hp[path]["scale"]
        return f(point)

    with tempfile.TemporaryDirectory() as d:
        t0 = time.time()
        res = S.search(params_fn=params_fn, labels=labels, objective=objective, config=cfg, run_dir=d,
                       progress=False, verbose=False)
        wall = time.time() - t0
    vals = [t.value for t in res.trials]
    sug = [t.suggest_seconds for t in res.trials if t.suggest_seconds is not None]
    return {"grouping": grouping, "dims": space.num_dims, "designer": designer, "seed": seed,
            "values": vals, "best_so_far": np.maximum.accumulate(np.array(vals, np.float64)).tolist(),
            "best": max(vals), "wall_s": wall, "suggest_median_s": statistics.median(sug) if sug else None,
            "fallbacks": sum(t.source.startswith("fallback") for t in res.trials)}


def run_synthetic(args, previous: dict | None = None, save=None) -> dict:
    """Runs every (grouping, designer, seed); runs already in ``previous`` (same number of trials)
    are kept, and ``save(partial)`` is called after each new run, so an interrupted part resumes."""
    old = {(r["grouping"], r["designer"], r["seed"]): r for r in (previous or {}).get("runs", [])
           if len(r["values"]) == args.trials}
    runs = []
    load0 = _load()
    for grouping in args.groupings:
        for designer in args.synthetic_designers:
            for seed in range(args.seeds):
                if (grouping, designer, seed) in old:
                    runs.append(old[(grouping, designer, seed)])
                    continue
                r = run_one_synthetic(grouping, designer, seed, args.trials)
                r["load"] = _load()
                runs.append(r)
                if save is not None:
                    save({"runs": runs + [v for k, v in old.items() if v not in runs], "trials": args.trials})
                print(f"  {grouping:<7} d={r['dims']:<3} {designer:<13} seed {seed}: best {r['best']:.4f}  "
                      f"wall {r['wall_s']:.1f} s  suggest median "
                      f"{'-' if r['suggest_median_s'] is None else round(r['suggest_median_s'], 2)} s  "
                      f"fallbacks {r['fallbacks']}  load {r['load']}", flush=True)
    return {"runs": runs, "trials": args.trials, "seeds": args.seeds, "load_before": load0, "load_after": _load()}


def synthetic_summary(res: dict, checkpoints=(5, 10, 20, 30, 40, 50)) -> tuple[dict, str]:
    import numpy as np
    out = {}
    lines = []
    keys = list(dict.fromkeys((r["grouping"], r["dims"], r["designer"]) for r in res["runs"]))
    cps = [c for c in checkpoints if c <= res["trials"]]
    head = ["setting", "designer"] + [f"best@{c}" for c in cps] + ["wall s", "suggest s"]
    lines += [" | ".join(head), " | ".join("---" for _ in head)]
    for g, d, des in keys:
        rs = [r for r in res["runs"] if (r["grouping"], r["dims"], r["designer"]) == (g, d, des)]
        b = np.array([r["best_so_far"] for r in rs])
        row = {f"best@{c}": [float(b[:, c - 1].mean()), float(b[:, c - 1].std())] for c in cps}
        row["wall_s"] = float(np.mean([r["wall_s"] for r in rs]))
        sug = [r["suggest_median_s"] for r in rs if r["suggest_median_s"] is not None]
        row["suggest_median_s"] = float(np.median(sug)) if sug else None
        out[f"{g}/{d}/{des}"] = row
        lines.append(" | ".join([f"{g} ({d} dims)", des] + [f"{row[f'best@{c}'][0]:.3f} ± {row[f'best@{c}'][1]:.3f}"
                                                          for c in cps]
                                + [f"{row['wall_s']:.0f}", "-" if row["suggest_median_s"] is None
                                   else f"{row['suggest_median_s']:.2f}"]))
    return out, "\n".join(lines)


def plot_synthetic(res: dict, path: str) -> None:
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    settings = list(dict.fromkeys((r["grouping"], r["dims"]) for r in res["runs"]))
    fig = Figure(figsize=(5.5 * len(settings), 4))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(settings), squeeze=False)[0]
    for ax, (g, d) in zip(axes, settings):
        for des in dict.fromkeys(r["designer"] for r in res["runs"]):
            rs = [r for r in res["runs"] if (r["grouping"], r["dims"], r["designer"]) == (g, d, des)]
            if not rs:
                continue
            b = np.array([r["best_so_far"] for r in rs])
            x = np.arange(1, b.shape[1] + 1)
            m, s = b.mean(0), b.std(0)
            ax.plot(x, m, label=f"{des} ({len(rs)} seeds)")
            ax.fill_between(x, m - s, m + s, alpha=0.15)
        ax.set_title(f"synthetic BMM-like objective, {g} grouping ({d} dims)")
        ax.set_xlabel("trial (2 seeded + suggestions)")
        ax.set_ylabel("best value so far (max 1)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=100)


# =========================================================================== MiniLM-5
def _builder_running() -> bool:
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return any("build_experts" in l and "grep" not in l for l in out.splitlines())


def _manifests_ready(tasks) -> list[str]:
    from bmm_jax.experts import _default_cache_dir
    root = os.path.join(_default_cache_dir(), "experts", "minilm5")
    return [t for t in tasks if not os.path.exists(os.path.join(root, t, "seed0", "manifest.json"))]


def run_minilm(args) -> dict:
    import numpy as np
    import bmm_jax
    from bmm_jax import anchors
    from bmm_jax.evaluate import evaluate
    from bmm_jax.experts import TEXT_TASKS, build_experts

    if _builder_running():
        raise SystemExit("an expert builder (build_experts) is running; the MiniLM-5 part reads the cache only")
    missing = _manifests_ready(TEXT_TASKS)
    if missing:
        raise SystemExit(f"no minilm5 seed0 expert manifest for {missing}; build the experts first")
    out = {"load_before": _load(), "cpu_count": os.cpu_count()}
    t0 = time.time()
    bench = build_experts("minilm5", seed=0, progress=False)
    reused = all(bench.stats[t].get("expert_reused") for t in bench.tasks)
    out["load_experts_s"] = time.time() - t0
    out["experts_reused"] = reused
    if not reused:
        out["warning"] = "some experts were not reused from the cache"
    tasks = list(bench.tasks)
    ad = bench.adapter

    def evals(params, split):
        t = time.time()
        acc = evaluate(ad, params, bench.heads, tasks, split=split,
                       max_examples=args.val_examples if split == "validation" else None)
        return {"per_task": acc, "mean": float(np.mean(list(acc.values()))), "seconds": time.time() - t}

    t = time.time()
    anchor = anchors.task_arithmetic(bench.base_params, bench.expert_params, anchor_scale=args.ta_scale)
    anchor_s = time.time() - t
    t = time.time()
    prep = bmm_jax.prepare(bench.base_params, bench.expert_params, anchor)  # data-free Grams
    out["prepare_s"] = time.time() - t
    out["anchor"] = {"name": "task_arithmetic", "scale": args.ta_scale, "seconds": anchor_s,
                     "validation": evals(anchor, "validation")}
    print(f"  anchor TA({args.ta_scale}) val {out['anchor']['validation']['mean']:.4f}; prepare "
          f"{out['prepare_s']:.1f} s", flush=True)
    if args.experts_reference:
        out["experts"] = {}
        for k, task in enumerate(tasks):
            for split in ("validation", "test"):
                acc = evaluate(ad, bench.expert_params[k], bench.heads, [task], split=split,
                               max_examples=args.val_examples if split == "validation" else None)
                out["experts"].setdefault(task, {})[split] = acc[task]
        print(f"  experts (own task): {out['experts']}", flush=True)
    searches = [("shared", "global", args.real_designer), ("module-wise", "type", args.real_designer)]
    if args.real_random:
        searches.append(("module-wise random", "type", "random"))
    out["searches"] = {}
    for name, grouping, designer in searches:
        run_dir = os.path.join(args.run_root, f"minilm5_{grouping}_{designer}_t{args.real_trials}")
        extra = {} if args.real_batch_size is None else {"batch_size": args.real_batch_size}
        cfg = bmm_jax.search.SearchConfig(grouping=grouping, num_trials=args.real_trials, designer=designer,
                                          seed=0, validation_examples=args.val_examples, **extra)
        t = time.time()
        res = bmm_jax.search(prep, None, cfg, run_dir=run_dir, anchor=anchor, adapter=ad, heads=bench.heads,
                             tasks=tasks, progress=not args.no_progress, verbose=True)
        wall = time.time() - t
        test = evals(res.params, "test")
        sug = [tr.suggest_seconds for tr in res.trials if tr.suggest_seconds is not None]
        ev = [tr.seconds for tr in res.trials if tr.seconds is not None]
        out["searches"][name] = {
            "grouping": grouping, "designer": designer, "num_trials": len(res.trials) - 1,
            "dims": 2 * len(res.hparams or {}) if res.hparams else None, "wall_s": wall,
            "validation_best": res.best_value, "best_trial": res.best_trial, "hparams": res.hparams,
            "test": test, "best_so_far": [None if math.isnan(x) else float(x) for x in res.history],
            "suggest_median_s": statistics.median(sug) if sug else None,
            "trial_eval_median_s": statistics.median(ev) if ev else None,
            "fallbacks": sum(tr.source.startswith("fallback") for tr in res.trials), "run_dir": run_dir,
            "load_after": _load()}
        print(f"  {name}: val {res.best_value:.4f} (trial {res.best_trial}) test {test['mean']:.4f} "
              f"wall {wall:.0f} s", flush=True)
        for png in ("convergence.png", "hparams_by_depth.png"):
            src = os.path.join(run_dir, png)
            if os.path.exists(src) and grouping == "type" and designer != "random":
                import shutil
                os.makedirs(RESULTS, exist_ok=True)
                shutil.copy(src, os.path.join(RESULTS, f"bench_search_minilm5_{png}"))
    out["anchor"]["test"] = evals(anchor, "test")
    out["load_after"] = _load()
    return out


def _minilm_setup(args):
    """(bench, anchor, prep) of MiniLM-5 from the expert cache (refuses while a builder runs)."""
    import bmm_jax
    from bmm_jax import anchors
    from bmm_jax.experts import TEXT_TASKS, build_experts
    if _builder_running():
        raise SystemExit("an expert builder (build_experts) is running; the MiniLM-5 parts read the cache only")
    missing = _manifests_ready(TEXT_TASKS)
    if missing:
        raise SystemExit(f"no minilm5 seed0 expert manifest for {missing}; build the experts first")
    bench = build_experts("minilm5", seed=0, progress=False)
    anchor = anchors.task_arithmetic(bench.base_params, bench.expert_params, anchor_scale=args.ta_scale)
    prep = bmm_jax.prepare(bench.base_params, bench.expert_params, anchor)  # data-free Grams
    return bench, anchor, prep


def run_throughput(args) -> dict:
    import shutil
    import bmm_jax
    load0 = _load()
    t = time.time()
    bench, anchor, prep = _minilm_setup(args)
    setup_s = time.time() - t
    tasks = list(bench.tasks)
    root = os.path.join(args.run_root, "throughput")
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)

    def cfg(b, n):
        return bmm_jax.search.SearchConfig(grouping="type", num_trials=n, designer=args.real_designer, seed=0,
                                           validation_examples=args.val_examples, batch_size=b, anchor_trial=False)

    def one(arm, run_dir, n):
        b, m = _arm(arm)
        kw = {}
        if m is not None:
            kw["batched_objective"] = bmm_jax.search.make_batched_objective(
                adapter=bench.adapter, heads=bench.heads, tasks=tasks, validation_examples=args.val_examples,
                members_per_call=m)
        t0 = time.perf_counter()
        res = bmm_jax.search(prep, None, cfg(b, n), run_dir=run_dir, adapter=bench.adapter, heads=bench.heads,
                             tasks=tasks, progress=False, verbose=False, **kw)
        wall = time.perf_counter() - t0
        new = [tr for tr in res.trials if tr.id > args.tp_warm]
        return {"arm": arm, "batch_size": b, "members_per_call": m or b, "wall_s": wall, "trials": len(new),
                "trials_per_min": 60.0 * len(new) / wall,
                "suggest_s": sum(tr.suggest_seconds or 0.0 for tr in new),
                "eval_s": sum(tr.seconds or 0.0 for tr in new),
                "best": max(tr.value for tr in res.trials if tr.value is not None),
                "fallbacks": sum(tr.source.startswith("fallback") for tr in new), "load": _load()}

    template = os.path.join(root, "template")
    t = time.time()
    one(max(args.batch_sizes, key=lambda a: _arm(a)[0]), template, args.tp_warm)
    template_s = time.time() - t
    print(f"  template study: {args.tp_warm} trials in {template_s:.0f} s", flush=True)
    n = args.tp_warm + args.tp_trials

    def fresh(name):
        d = os.path.join(root, name)
        shutil.rmtree(d, ignore_errors=True)
        shutil.copytree(template, d, ignore=shutil.ignore_patterns(".search.lock"))
        return d

    warm = {}
    for b in args.batch_sizes:      # compilations (vmapped params and forward, set acquisition) untimed
        r = one(b, fresh(f"warm_b{b}"), args.tp_warm + _arm(b)[0])
        warm[b] = r["wall_s"]
        print(f"  warm-up B={b}: {r['wall_s']:.0f} s", flush=True)
    rows = []
    for rnd in range(args.tp_rounds):
        order = args.batch_sizes[rnd % len(args.batch_sizes):] + args.batch_sizes[:rnd % len(args.batch_sizes)]
        for b in order:
            r = one(b, fresh(f"r{rnd}_b{b}"), n)
            r["round"] = rnd
            rows.append(r)
            print(f"  round {rnd} B={b}: {r['trials']} trials in {r['wall_s']:.0f} s = "
                  f"{r['trials_per_min']:.2f} trials/min (designer {r['suggest_s']:.0f} s, evaluation "
                  f"{r['eval_s']:.0f} s; load {r['load']})", flush=True)
    summary = {}
    for b in args.batch_sizes:
        rs = [r for r in rows if r["arm"] == b]
        summary[str(b)] = {k: statistics.median(r[k] for r in rs)
                           for k in ("trials_per_min", "wall_s", "suggest_s", "eval_s")}
        summary[str(b)]["per_round"] = [round(r["trials_per_min"], 3) for r in rs]
    base = summary[str(args.batch_sizes[0])]["trials_per_min"]
    for b in args.batch_sizes:
        summary[str(b)]["ratio_vs_first"] = summary[str(b)]["trials_per_min"] / base
        # paired per round: the arms of one round ran back to back
        pairs = [r["trials_per_min"] / f["trials_per_min"] for r in rows if r["arm"] == b
                 for f in rows if f["arm"] == args.batch_sizes[0] and f["round"] == r["round"]]
        summary[str(b)]["paired_ratio_median"] = statistics.median(pairs)
    return {"rows": rows, "summary": summary, "warmup_s": warm, "setup_s": setup_s, "template_s": template_s,
            "warm_trials": args.tp_warm, "trials_per_search": args.tp_trials, "rounds": args.tp_rounds,
            "batch_sizes": args.batch_sizes, "validation_examples": args.val_examples, "grouping": "type",
            "designer": args.real_designer, "load_before": load0, "load_after": _load(), "cpu_count": os.cpu_count(),
            "note": "trials/min of whole search calls (study reopened, designer re-fed, reports written) "
                    "resuming a copy of one template study; medians over rounds; A/B interleaved on a shared "
                    "machine (see load)"}


def run_components(args) -> dict:
    import jax
    import numpy as np
    from bmm_jax.evaluate import evaluate, evaluate_batch
    from bmm_jax.search import SearchConfig, build_space
    from bmm_jax.search.batch import BatchRunner
    load0 = _load()
    bench, anchor, prep = _minilm_setup(args)
    tasks = list(bench.tasks)
    space = build_space(prep.labels, SearchConfig(grouping="type"))
    rng = np.random.default_rng(0)
    sizes = sorted({_arm(a)[0] for a in args.batch_sizes})
    points = [{n: float(rng.uniform(lo, hi)) for n, (lo, hi) in space.bounds.items()} for _ in range(max(sizes))]
    single = BatchRunner(space, prep.params, None, None, 1)
    runners = {b: BatchRunner(space, prep.params, None, None, b) for b in sizes if b > 1}

    def timed(f):
        t = time.perf_counter()
        jax.block_until_ready(f())
        return time.perf_counter() - t

    def measure(b):
        pts = points[:b]
        if b == 1:
            params = single.merged(pts[0])
            tp = timed(lambda: single.merged(pts[0]))
            te = timed(lambda: evaluate(bench.adapter, params, bench.heads, tasks, split="validation",
                                        max_examples=args.val_examples))
        else:
            pb = runners[b].params_batch(pts)
            tp = timed(lambda: runners[b].params_batch(pts))
            te = timed(lambda: evaluate_batch(bench.adapter, pb, bench.heads, tasks, split="validation",
                                              max_examples=args.val_examples))
        return tp / b, te / b

    for b in sizes:  # warm-up: compilations
        measure(b)
    rows = {b: [] for b in sizes}
    for rep in range(args.comp_repeats):
        for b in sizes[rep % len(sizes):] + sizes[:rep % len(sizes)]:
            rows[b].append(measure(b))
    out = {str(b): {"params_s_per_trial": statistics.median(r[0] for r in rows[b]),
                    "eval_s_per_trial": statistics.median(r[1] for r in rows[b]),
                    "repeats": [[round(x, 3) for x in r] for r in rows[b]]} for b in sizes}
    return {"per_batch_size": out, "batch_sizes": sizes, "validation_examples": args.val_examples,
            "load_before": load0, "load_after": _load()}


def components_table(res: dict) -> str:
    head = ["batch_size", "params s/trial", "evaluation s/trial"]
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for b in res["batch_sizes"]:
        r = res["per_batch_size"][str(b)]
        lines.append(f"{b} | {r['params_s_per_trial']:.3f} | {r['eval_s_per_trial']:.2f}")
    lines.append(f"({res['validation_examples']} validation examples per task; load {res['load_before']} -> "
                 f"{res['load_after']})")
    return "\n".join(lines)


def _arm(arm: str) -> tuple[int, int | None]:
    """``"4"`` -> ``(4, None)``; ``"4m1"`` -> ``(4, 1)`` (batch size, members per forward call)."""
    b, _, m = str(arm).partition("m")
    return int(b), (int(m) if m else None)


def throughput_table(res: dict) -> str:
    head = ["batch_size (mM: M models per forward call)", "trials/min (median)", "per round", "vs B=" + str(res["batch_sizes"][0]),
            "paired ratio", "designer s", "evaluation s", "wall s"]
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for b in res["batch_sizes"]:
        s = res["summary"][str(b)]
        lines.append(f"{b} | {s['trials_per_min']:.2f} | {s['per_round']} | {s['ratio_vs_first']:.2f}x | "
                     f"{s['paired_ratio_median']:.2f}x | {s['suggest_s']:.0f} | {s['eval_s']:.0f} | {s['wall_s']:.0f}")
    lines.append(f"({res['trials_per_search']} trials per search after {res['warm_trials']} finished, "
                 f"{res['rounds']} rounds, {res['validation_examples']} validation examples per task, "
                 f"load {res['load_before']} -> {res['load_after']})")
    return "\n".join(lines)


def minilm_table(res: dict) -> str:
    a = res["anchor"]
    head = ["model", "trials", "val (mean)", "test (mean)", "wall s"]
    lines = [" | ".join(head), " | ".join("---" for _ in head),
             f"anchor TA({a['scale']}) | - | {a['validation']['mean']:.4f} | {a['test']['mean']:.4f} | "
             f"{a['seconds']:.1f}"]
    for name, s in res["searches"].items():
        lines.append(f"BMM {name} ({s['grouping']}, {s['designer']}) | {s['num_trials']} | "
                     f"{s['validation_best']:.4f} | {s['test']['mean']:.4f} | {s['wall_s']:.0f}")
    tasks = list(a["test"]["per_task"])
    lines.append("")
    lines.append("per-task test: " + ", ".join(tasks))
    lines.append(f"  anchor: {[round(a['test']['per_task'][t], 4) for t in tasks]}")
    for name, s in res["searches"].items():
        lines.append(f"  {name}: {[round(s['test']['per_task'][t], 4) for t in tasks]}")
    if "experts" in res:
        lines.append(f"  experts (own): {[round(res['experts'][t]['test'], 4) for t in tasks]}")
    return "\n".join(lines)


# =========================================================================== main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--parts", nargs="+", default=["latency", "synthetic"], choices=["latency", "synthetic", "minilm", "throughput", "components"])
    p.add_argument("--out", default=DEFAULT_OUT, help="JSON file; parts not run are kept from an existing file")
    p.add_argument("--quick", action="store_true", help="tiny settings (smoke test)")
    g = p.add_argument_group("latency")
    g.add_argument("--dims", type=int, nargs="+", default=[4, 8, 16, 24, 48])
    g.add_argument("--latency-designers", nargs="+", default=["gp_bandit", "gp_ucb_pe", "vizier_default"],
                   choices=["gp_bandit", "gp_bandit_cached", "gp_ucb_pe", "gp_bandit_default", "gp_ucb_pe_default",
                            "vizier_default"],
                   help="gp_bandit_cached: gp_bandit with the search's persistent compilation cache "
                        "filled by a previous process (a resumed or repeated search)")
    g.add_argument("--latency-init", type=int, default=10, help="completed random trials before suggesting")
    g.add_argument("--latency-suggest", type=int, default=6, help="suggestions per configured designer")
    g.add_argument("--default-suggest", type=int, default=2, help="suggestions of Vizier's default (slow)")
    g.add_argument("--ucb-suggest", type=int, default=3,
                   help="suggestions of the configured GP-UCB-PE (slow: Vizier rebuilds its acquisition "
                        "optimiser, so it recompiles, at every suggestion)")
    g.add_argument("--worker-timeout", type=int, default=600)
    g = p.add_argument_group("synthetic")
    g.add_argument("--groupings", nargs="+", default=["type", "module"])
    g.add_argument("--synthetic-designers", nargs="+", default=["gp_bandit", "gp_ucb_pe", "random", "quasi_random"])
    g.add_argument("--seeds", type=int, default=5)
    g.add_argument("--trials", type=int, default=40)
    g = p.add_argument_group("minilm")
    g.add_argument("--real-trials", type=int, default=25)
    g.add_argument("--real-designer", default="gp_bandit")
    g.add_argument("--real-random", action="store_true", help="also a random search of the module-wise space")
    g.add_argument("--val-examples", type=int, default=128)
    g.add_argument("--ta-scale", type=float, default=0.3)
    g.add_argument("--experts-reference", action="store_true", help="also evaluate each expert on its task")
    g.add_argument("--run-root", default=os.path.join(os.path.expanduser("~"), ".cache", "bmm_jax", "search_runs"))
    g.add_argument("--no-progress", action="store_true")
    g.add_argument("--real-batch-size", type=int, default=None,
                   help="SearchConfig.batch_size of the minilm part's searches (default: the library's)")
    g = p.add_argument_group("throughput (MiniLM-5; also uses --val-examples, --ta-scale, --real-designer, --run-root)")
    g.add_argument("--batch-sizes", nargs="+", default=["1", "4", "8"],
                   help="arms, the first is the reference: B, or BmM (batch size B, forward vmapped over M "
                        "models per call)")
    g.add_argument("--tp-warm", type=int, default=8, help="finished trials of the template study")
    g.add_argument("--tp-trials", type=int, default=8, help="trials per measured search")
    g.add_argument("--tp-rounds", type=int, default=3)
    g.add_argument("--comp-repeats", type=int, default=3, help="repeats of the components part")
    # internal: one latency measurement in a fresh process
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--worker-designer", help=argparse.SUPPRESS)
    p.add_argument("--worker-dims", type=int, help=argparse.SUPPRESS)
    p.add_argument("--worker-suggest", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker == "latency":
        print(json.dumps(latency_worker(args.worker_designer, args.worker_dims, args.latency_init,
                                        args.worker_suggest, seed=0)), flush=True)
        return 0
    if args.quick:
        args.dims, args.latency_suggest, args.default_suggest, args.ucb_suggest = [4, 24], 3, 1, 2
        args.seeds, args.trials, args.groupings = 1, 8, ["type"]
        args.real_trials = 4
        args.tp_warm, args.tp_trials, args.tp_rounds, args.batch_sizes = 4, 4, 1, ["1", "4"]

    results = {}
    if os.path.exists(args.out):
        with open(args.out) as f:
            results = json.load(f)
    results["machine"] = {"platform": platform.platform(), "cpu_count": os.cpu_count(), "python": sys.version.split()[0]}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)

    def save():
        with open(args.out + ".tmp", "w") as f:
            json.dump(results, f, indent=1)
        os.replace(args.out + ".tmp", args.out)

    if "latency" in args.parts:
        print("== suggestion latency vs dimensions", flush=True)
        results["latency"] = run_latency(args, results.get("latency"))
        save()
        print(latency_table(results["latency"]), flush=True)
    if "synthetic" in args.parts:
        print("== search quality on the synthetic objective", flush=True)
        def save_partial(part):
            results["synthetic"] = part
            save()
        results["synthetic"] = run_synthetic(args, results.get("synthetic"), save_partial)
        summary, table = synthetic_summary(results["synthetic"])
        results["synthetic"]["summary"] = summary
        save()
        print(table, flush=True)
        if not args.quick:
            plot_synthetic(results["synthetic"], os.path.join(RESULTS, "bench_search_synthetic.png"))
    if "throughput" in args.parts:
        print("== MiniLM-5: search trials per minute vs batch_size", flush=True)
        results["throughput"] = run_throughput(args)
        save()
        print(throughput_table(results["throughput"]), flush=True)
    if "components" in args.parts:
        print("== MiniLM-5: per-trial params and evaluation time vs batch_size", flush=True)
        results["components"] = run_components(args)
        save()
        print(components_table(results["components"]), flush=True)
    if "minilm" in args.parts:
        print("== MiniLM-5: anchor vs shared vs module-wise BMM", flush=True)
        results["minilm"] = run_minilm(args)
        save()
        print(minilm_table(results["minilm"]), flush=True)
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
