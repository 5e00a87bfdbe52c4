"""Benchmark: wall time and peak RSS of every merging step on eight CLIP ViT-B/32-shaped experts.

Issue 2, "Benchmark". The base is a randomly initialised ``FlaxCLIPVisionModel`` with the default
``CLIPVisionConfig()`` (shapes from ``jax.eval_shape``, values ``N(0, 0.02)``; nothing is
downloaded); expert k is ``base + N(0, sigma^2)`` (full-rank random task vectors). Every measured
step runs in a fresh subprocess that first builds base + experts (not timed), then runs the step
once (compilation included: a cold call, as a user sees it) and reads its peak RSS (``VmHWM``), so
peaks never mix between steps. The fast-path re-solve steps free the experts after ``prepare`` (the
``Prepared`` holds no reference to them, as in a search) and reset the peak before the re-solves:
their ``peak_rss_bytes`` is the re-solve phase's, ``process_peak_rss_bytes_before_resolve`` the
process's up to then (setup + prepare, experts alive).

Steps: task vectors; each anchor (average, task_arithmetic, ties, tsv, iso_c, iso_cts, wudi with
its 300 Adam steps, wudi exact, regmean with random activation-like Grams); data-free Grams
(every factor materialised once); the eigen factorisation (``bmm_jax.prepare``); the full
data-free BMM merge; one fast-path re-solve (``prep.params(new hparams)`` after a warm-up call);
the same full data-free solve in plain numpy/scipy (``scipy.linalg.cho_factor``/``cho_solve``
per module); and an agreement check between the two solves (not timed against a target).

Memory bound: ``(K + 3) x model bytes + one Gram set``, one Gram set = one float32
``[d_in, d_in]`` matrix per regressed module (what the solve needs: ``S``, or ``Q``).

Usage::

    .venv/bin/python experiments/bench_merge.py                 # full benchmark (~30-40 min)
    .venv/bin/python experiments/bench_merge.py --quick         # tiny config, smoke test
    .venv/bin/python experiments/bench_merge.py --steps merge,fast_resolve --out /tmp/b.json

References (FusionBench 0.2.33, PyTorch CPU, 2 threads, 8 ViT-B/32 experts, on this machine
kind): task arithmetic 0.8-2.1 s, Iso-C 14.5 s, TIES 36 s (22 GiB peak), TSV-M 105 s, RegMean
34 s solve (+345 s Gram collection), WUDI 36.5 s per Adam iteration (about 4 h for 400).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

DEFAULT_OUT = os.path.join(REPO, "experiments", "results", "bench_merge.json")
HPARAMS = {"rho": 0.3, "scale": 1.0}
RESOLVE_HPARAMS = ({"rho": 0.1, "scale": 0.9}, {"rho": 1.0, "scale": 1.1}, {"rho": 0.03, "scale": 1.0})

# FusionBench 0.2.33 reference seconds (issue 2); WUDI: per Adam iteration.
FUSIONBENCH = {"task_arithmetic": 2.1, "iso_c": 14.5, "ties": 36.0, "tsv": 105.0, "regmean": 34.0,
               "wudi": 36.5 * 300, "wudi_exact": 36.5 * 300, "iso_cts": 105.0}
WUDI_FB_PER_ITER = 36.5
FB_WUDI_TOTAL = 4 * 3600.0
FB_TSV = 105.0

# (name, description)
STEPS = (
    ("setup", "build base + K experts only (baseline of every step)"),
    ("task_vectors", "bmm_jax.task_vectors(base, experts)"),
    ("average", "anchors.average"),
    ("task_arithmetic", "anchors.task_arithmetic(anchor_scale=0.3)"),
    ("ties", "anchors.ties (density 0.2, whole-model trim)"),
    ("tsv", "anchors.tsv (TSV-M)"),
    ("iso_c", "anchors.iso_c"),
    ("iso_cts", "anchors.iso_cts"),
    ("wudi", "anchors.wudi (Adam lr 1e-5, 300 steps)"),
    ("wudi_exact", "anchors.wudi(exact=True)"),
    ("regmean", "anchors.regmean (random activation-like Grams)"),
    ("data_free_grams", "grams.data_free + every factor materialised"),
    ("prepare", "bmm_jax.prepare (anchor, statistics, eigen factors)"),
    ("merge", "bmm_jax.merge data-free, TA anchor, rho 0.3"),
    ("fast_resolve", "prep.params(new hparams), after a warm-up"),
    ("fast_resolve_bf16", "same with prepare(factor_dtype='bfloat16'); error vs the exact merge"),
    ("numpy_merge", "same merge in numpy/scipy (cho_factor/cho_solve)"),
    ("merge_numpy_experts", "bmm_jax.merge with base/experts as numpy arrays (as loaded from files)"),
    ("merge_trimmed", "bmm_jax.merge inside memory.trimming() (opt-in allocator hygiene)"),
    ("merge_jit", "jax.jit(merge) of the whole model: compile and run seconds"),
    ("vmapped_trials", "jax.vmap(prep.params) over a batch of 4 settings vs 4 sequential re-solves"),
    ("agreement", "max |bmm - numpy| / max |delta| (check, not a target)"),
)
STEP_NAMES = tuple(n for n, _ in STEPS)


# ============================================================================== model + experts
def clip_config(quick: bool):
    from transformers import CLIPVisionConfig
    if quick:
        return CLIPVisionConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                                num_attention_heads=4, image_size=32, patch_size=8)
    return CLIPVisionConfig()


def param_shapes(quick: bool):
    """``{path: ShapeDtypeStruct}`` pytree of FlaxCLIPVisionModel params (no init, no download)."""
    import jax
    import numpy as np
    from transformers.models.clip.modeling_flax_clip import FlaxCLIPVisionModule
    cfg = clip_config(quick)
    module = FlaxCLIPVisionModule(cfg, dtype=np.float32)
    x = jax.ShapeDtypeStruct((1, cfg.image_size, cfg.image_size, cfg.num_channels), np.float32)
    return jax.eval_shape(module.init, jax.random.PRNGKey(0), x)["params"]


def build_models(quick: bool, num_experts: int, sigma: float, seed: int = 0):
    """``(base, experts)`` as pytrees of float32 jax arrays, built leaf by leaf (numpy RNG)."""
    import jax
    import numpy as np
    shapes = param_shapes(quick)
    flat, treedef = jax.tree_util.tree_flatten(shapes)
    rng = np.random.default_rng(seed)
    base_leaves = []
    expert_leaves = [[] for _ in range(num_experts)]
    for sd in flat:
        b = rng.standard_normal(sd.shape, dtype=np.float32)
        b *= np.float32(0.02)
        for k in range(num_experts):
            e = rng.standard_normal(sd.shape, dtype=np.float32)
            e *= np.float32(sigma)
            e += b
            expert_leaves[k].append(jax.device_put(e))
            del e
        base_leaves.append(jax.device_put(b))
        del b
    base = jax.tree_util.tree_unflatten(treedef, base_leaves)
    experts = [jax.tree_util.tree_unflatten(treedef, l) for l in expert_leaves]
    return base, experts


def model_bytes(tree) -> int:
    import jax
    import numpy as np
    return int(sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(tree)))


def gram_set_bytes(labels) -> int:
    from bmm_jax.labels import regressed
    return int(sum(l.d_in * l.d_in * 4 for l in regressed(labels)))


def activation_like_grams(base, labels, num_experts: int, seed: int = 1):
    """Random activation-like Grams ``[K, d, d]`` per input group (q/k/v share one).

    ``G = A A^T / r + eps I`` with ``A [d, r]`` (``r = min(d, 64)``) whose columns decay like a
    power law, plus a few outlier coordinates with large variance (as in transformer
    activations); float32, symmetric positive definite.
    """
    import jax
    import jax.numpy as jnp
    from bmm_jax.grams import Grams
    from bmm_jax.labels import input_groups

    @jax.jit
    def one(key, decay):
        d = decay.shape[0]
        r = min(d, 64)
        ka, ko = jax.random.split(key)
        a = jax.random.normal(ka, (d, r), jnp.float32) * (1.0 + jnp.arange(r, dtype=jnp.float32)) ** -0.7
        outl = jnp.where(jax.random.uniform(ko, (d,)) < 0.01, 5.0, 1.0)
        a = a * outl[:, None]
        g = jnp.matmul(a, a.T, precision="highest") / r
        return g + 1e-3 * jnp.eye(d, dtype=jnp.float32) * jnp.mean(jnp.diagonal(g))

    dense, key_of = {}, {}
    key = jax.random.PRNGKey(seed)
    for group, mods in input_groups(labels).items():
        d = mods[0].d_in
        ks = jax.random.split(jax.random.fold_in(key, len(dense)), num_experts)
        dense[group] = jnp.stack([one(k, jnp.zeros((d,), jnp.float32)) for k in ks])
        for l in mods:
            key_of[l.path] = group
    return Grams(dense, key_of, kind="activations")


# ============================================================================== numpy/scipy solve
def numpy_merge(base, experts, rho: float, scale: float, ta_scale: float = 0.3):
    """The full data-free BMM merge (task-arithmetic anchor) in plain numpy/scipy.

    Per regressed module: ``T_k``, ``F_k = T_k / ||T_k||``, ``S = sum_k F_k F_k^T``,
    ``B = sum_k F_k F_k^T T_k`` (through ``T_k^T T_k`` when ``d_out <= d_in``),
    ``lambda = rho tr(S) / d_in``, Cholesky of ``S + lambda I`` and ``W = W_0 + s (S + lambda
    I)^{-1} (B + lambda T_a)`` with ``T_a = ta_scale sum_k T_k``. Carried leaves: the anchor.
    Returns a flat list of numpy leaves (tree_flatten order of ``base``).
    """
    import jax
    import numpy as np
    import scipy.linalg
    from bmm_jax.labels import build_labels, label_list
    labels = label_list(build_labels(base))
    base_leaves = [np.asarray(x) for x in jax.tree_util.tree_leaves(base)]
    exp_leaves = [[np.asarray(x) for x in jax.tree_util.tree_leaves(e)] for e in experts]
    k = len(experts)
    out = []
    for i, (l, b) in enumerate(zip(labels, base_leaves)):
        tsum = np.zeros_like(b)
        for e in exp_leaves:
            tsum += e[i]
            tsum -= b
        if not l.regressed:
            out.append(b + np.float32(ta_scale) * tsum)
            continue
        t = np.stack([e[i] - b for e in exp_leaves])                       # [K, d_in, d_out]
        if l.layout == "transposed":
            t = np.swapaxes(t, -1, -2)
        d_in, d_out = t.shape[1:]
        ta = np.float32(ta_scale) * (tsum.T if l.layout == "transposed" else tsum)
        s = np.zeros((d_in, d_in), np.float32)
        bb = np.zeros((d_in, d_out), np.float32)
        for kk in range(k):
            n2 = float(np.vdot(t[kk], t[kk]))
            if n2 == 0.0:
                continue
            w = np.float32(1.0 / n2)
            if d_out <= d_in:
                small = t[kk].T @ t[kk]                                    # [d_out, d_out]
                s += w * (t[kk] @ t[kk].T)
                bb += w * (t[kk] @ small)
            else:
                g = w * (t[kk] @ t[kk].T)                                  # [d_in, d_in]
                s += g
                bb += g @ t[kk]
        lam = np.float32(rho * np.trace(s) / d_in)
        s[np.diag_indices(d_in)] += lam
        c = scipy.linalg.cho_factor(s, lower=True, overwrite_a=True, check_finite=False)
        delta = scipy.linalg.cho_solve(c, bb + lam * ta, overwrite_b=True, check_finite=False)
        if l.layout == "transposed":
            delta = delta.T
        out.append(b + np.float32(scale) * delta.reshape(b.shape))
        del t, s, bb, c, delta, ta
    return out


# ============================================================================== one step (worker)
def _block(tree):
    import jax
    return jax.block_until_ready(tree)


def _maxrss_bytes() -> int:
    """Peak RSS since the process start or the last ``bmm_jax.memory.reset_peak_rss()``."""
    from bmm_jax.memory import peak_rss_bytes
    return peak_rss_bytes()


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


ANCHOR_STEPS = ("average", "task_arithmetic", "ties", "tsv", "iso_c", "iso_cts", "wudi", "wudi_exact", "regmean")


def run_step(name: str, quick: bool, num_experts: int, sigma: float, wudi_steps: int) -> dict:
    """Build the models, run ``name`` once, return its measurements."""
    t0 = time.perf_counter()
    import jax
    import numpy as np
    import bmm_jax
    runtime_rss = _maxrss_bytes()
    base, experts = build_models(quick, num_experts, sigma)
    _block((base, experts))
    labels = bmm_jax.build_labels(base)
    info = {"setup_seconds": time.perf_counter() - t0, "runtime_rss_bytes": runtime_rss,
            "setup_rss_bytes": _maxrss_bytes()}
    extra = {}
    pre = None
    if name == "regmean":
        pre = _block(activation_like_grams(base, labels, num_experts))
    elif name in ("fast_resolve", "fast_resolve_bf16"):
        dt = "bfloat16" if name.endswith("bf16") else "float32"
        t1 = time.perf_counter()
        pre = bmm_jax.prepare(base, experts, "task_arithmetic", bmm_jax.grams.data_free(base, experts),
                              factor_dtype=dt)
        _block(jax.tree_util.tree_leaves(pre))
        extra["prepare_seconds"] = time.perf_counter() - t1
        extra["prepare_peak_rss_bytes"] = _maxrss_bytes()                # setup + prepare, experts alive
        _block(pre.params(HPARAMS))                                     # warm-up (compiles)
        # a search keeps only the Prepared: it holds no expert references, so the experts are
        # freed here and the re-solves' own peak is measured from this point on
        extra["process_peak_rss_bytes_before_resolve"] = _maxrss_bytes()
        del experts
        import gc
        gc.collect()
        import bmm_jax.memory
        bmm_jax.memory.trim()
        extra["peak_reset"] = bmm_jax.memory.reset_peak_rss()
    info["pre_rss_bytes"] = _maxrss_bytes()

    c = _cpu_seconds()
    t = time.perf_counter()
    if name == "setup":
        pass
    elif name == "task_vectors":
        _block(bmm_jax.task_vectors(base, experts))
    elif name in ANCHOR_STEPS:
        # The anchors set no BLAS limits themselves; a user on a shared CPU opts in with the scoped
        # bmm_jax.solve.lapack_single_thread() (multi-threaded OpenBLAS spins while it waits for
        # its threads: on this loaded 2-core machine a 768 x 768 eigh / SVD runs 15-30x slower).
        from bmm_jax.solve import lapack_single_thread
        extra["lapack_single_thread"] = True
        with lapack_single_thread():
            if name in ("average", "ties", "tsv", "iso_c", "iso_cts"):
                _block(bmm_jax.anchors.get(name)(base, experts))
            elif name == "task_arithmetic":
                _block(bmm_jax.anchors.task_arithmetic(base, experts, anchor_scale=0.3))
            elif name == "wudi":
                _block(bmm_jax.anchors.wudi(base, experts, steps=wudi_steps))
                extra["adam_steps"] = wudi_steps
            elif name == "wudi_exact":
                _block(bmm_jax.anchors.wudi(base, experts, exact=True))
            elif name == "regmean":
                _block(bmm_jax.anchors.regmean(base, experts, grams=pre))
    elif name == "data_free_grams":
        g = bmm_jax.grams.data_free(base, experts)
        for path in g:
            _block(g.factor(path))
    elif name == "prepare":
        prep = bmm_jax.prepare(base, experts, "task_arithmetic", bmm_jax.grams.data_free(base, experts))
        _block(jax.tree_util.tree_leaves(prep))
    elif name == "merge":
        params, _ = bmm_jax.merge(base, experts, "task_arithmetic", bmm_jax.grams.data_free(base, experts),
                                  dict(HPARAMS))
        _block(params)
    elif name == "merge_numpy_experts":
        base_np = jax.tree_util.tree_map(np.asarray, base)
        experts_np = [jax.tree_util.tree_map(np.asarray, e) for e in experts]
        del experts
        base = base_np
        import gc
        gc.collect()
        import bmm_jax.memory
        extra["peak_reset"] = bmm_jax.memory.reset_peak_rss()
        t = time.perf_counter()
        params, _ = bmm_jax.merge(base_np, experts_np, "task_arithmetic", None, dict(HPARAMS))
        _block(params)
    elif name == "merge_trimmed":
        import bmm_jax.memory
        with bmm_jax.memory.trimming():
            params, _ = bmm_jax.merge(base, experts, "task_arithmetic", bmm_jax.grams.data_free(base, experts),
                                      dict(HPARAMS))
            _block(params)
    elif name == "merge_jit":
        fn = jax.jit(lambda b, es, r, s_: bmm_jax.merge(b, es, "task_arithmetic", None,
                                                         {"rho": r, "scale": s_}).params)
        tc = time.perf_counter()
        compiled = fn.lower(base, experts, 0.3, 1.0).compile()
        extra["compile_seconds"] = time.perf_counter() - tc
        tr = time.perf_counter()
        _block(compiled(base, experts, 0.3, 1.0))
        extra["run_seconds"] = time.perf_counter() - tr
    elif name == "vmapped_trials":
        import jax.numpy as jnp
        prep = bmm_jax.prepare(base, experts, "task_arithmetic")
        del experts
        batch = jnp.asarray([0.03, 0.1, 0.3, 1.0], jnp.float32)
        vfn = jax.jit(lambda pr, r: jax.vmap(lambda x: pr.params({"rho": x, "scale": 1.0}))(r))
        _block(vfn(prep, batch))                                        # compile
        sfn = jax.jit(lambda pr, r: pr.params({"rho": r, "scale": 1.0}))
        _block(sfn(prep, batch[0]))
        tb, ts = [], []
        for _ in range(3):                                             # interleaved A/B
            t1 = time.perf_counter()
            _block(vfn(prep, batch))
            tb.append(time.perf_counter() - t1)
            t1 = time.perf_counter()
            for x in batch:
                _block(sfn(prep, x))
            ts.append(time.perf_counter() - t1)
        extra["batched_trials_per_second"] = 4 / float(np.median(tb))
        extra["sequential_trials_per_second"] = 4 / float(np.median(ts))
    elif name in ("fast_resolve", "fast_resolve_bf16"):
        times = []
        for hp in RESOLVE_HPARAMS:
            ti = time.perf_counter()
            _block(pre.params(hp))
            times.append(time.perf_counter() - ti)
        extra["resolve_seconds_each"] = times
    elif name == "numpy_merge":
        numpy_merge(base, experts, HPARAMS["rho"], HPARAMS["scale"])
    elif name == "agreement":
        params, _ = bmm_jax.merge(base, experts, "task_arithmetic", bmm_jax.grams.data_free(base, experts),
                                  dict(HPARAMS))
        ref = numpy_merge(base, experts, HPARAMS["rho"], HPARAMS["scale"])
        worst, worst_path = 0.0, None
        from bmm_jax._tree import leaves_with_paths
        for (path, x), r, b in zip(leaves_with_paths(params), ref, jax.tree_util.tree_leaves(base)):
            x = np.asarray(x)
            b = np.asarray(b)
            denom = max(float(np.max(np.abs(r - b))), 1e-30)
            err = float(np.max(np.abs(x - r))) / denom
            if err > worst:
                worst, worst_path = err, path
        extra["max_rel_diff"] = worst
        extra["worst_leaf"] = worst_path
    else:
        raise ValueError(f"unknown step {name!r}; known: {', '.join(STEP_NAMES)}")
    seconds = time.perf_counter() - t
    info["cpu_seconds"] = _cpu_seconds() - c
    if name in ("fast_resolve", "fast_resolve_bf16"):
        seconds = float(np.median(extra["resolve_seconds_each"]))
        info["cpu_seconds"] /= len(RESOLVE_HPARAMS)
    info.update(seconds=seconds, peak_rss_bytes=_maxrss_bytes(), **extra)
    if name == "fast_resolve_bf16":          # accuracy, after the peak is read (not part of the step)
        hp = RESOLVE_HPARAMS[-1]
        got = jax.tree_util.tree_leaves(pre.params(hp))
        del pre
        base, experts = build_models(quick, num_experts, sigma)      # the same seeded draw
        exact = jax.tree_util.tree_leaves(bmm_jax.merge(base, experts, "task_arithmetic",
                                                        bmm_jax.grams.data_free(base, experts), dict(hp)).params)
        worst = 0.0
        for g, e, b in zip(got, exact, jax.tree_util.tree_leaves(base)):
            g, e, b = (np.asarray(x, np.float64) for x in (g, e, b))
            worst = max(worst, float(np.max(np.abs(g - e))) / max(float(np.max(np.abs(e - b))), 1e-30))
        info["max_rel_diff_vs_exact"] = worst
    return info


# ============================================================================== driver
def _fmt_mib(b) -> str:
    return "-" if b is None else f"{b / 2 ** 20:,.0f}"


def _targets(res: dict, bound: float) -> dict:
    """Target name -> {"value", "limit", "met"} for every measured step that has a target."""
    out = {}

    def sec(n):
        return res.get(n, {}).get("seconds")

    m = sec("merge")
    if m is not None:
        out["merge >= 100x faster than FusionBench WUDI (4 h)"] = {"value": m, "limit": FB_WUDI_TOTAL / 100,
                                                                  "met": m < FB_WUDI_TOTAL / 100}
        out["merge faster than FusionBench TSV-M (105 s)"] = {"value": m, "limit": FB_TSV, "met": m < FB_TSV}
        npm = sec("numpy_merge")
        if npm is not None:
            out["merge not slower than numpy/scipy"] = {"value": m, "limit": npm, "met": m <= npm}
    for n in ("task_arithmetic", "ties", "tsv", "iso_c", "iso_cts", "regmean", "wudi", "wudi_exact"):
        v = sec(n)
        if v is not None:
            lim = FUSIONBENCH[n]
            ref = {"iso_cts": " (vs TSV-M, no Iso-CTS reference)", "wudi": " (36.5 s x 300 iterations)",
                   "wudi_exact": " (vs 300 FusionBench iterations)", "regmean": " (solve only)"}.get(n, "")
            out[f"{n} faster than FusionBench{ref}"] = {"value": v, "limit": lim, "met": v < lim}
    for n, what in (("fast_resolve", "float32, exact"), ("fast_resolve_bf16", "bfloat16 factors")):
        v = sec(n)
        if v is not None:
            out[f"fast-path re-solve <= 0.5 s ({what})"] = {"value": v, "limit": 0.5, "met": v <= 0.5}
    for n, r in res.items():
        if "peak_rss_bytes" in r and n not in ("agreement",):
            lim = bound + (r.get("extra_bound_bytes") or 0)
            out[f"peak RSS {n} <= bound"] = {"value": r["peak_rss_bytes"], "limit": lim,
                                             "met": r["peak_rss_bytes"] <= lim}
    return out


def print_table(report: dict) -> None:
    res = report["steps"]
    bound = report["memory_bound_bytes"]
    print(f"\nCLIP ViT-B/32-shaped experts: K = {report['num_experts']}, model = "
          f"{report['model_bytes'] / 2 ** 20:,.1f} MiB ({report['model_params']:,} params), one Gram set = "
          f"{report['gram_set_bytes'] / 2 ** 20:,.1f} MiB, bound (K+3) x model + Gram set = "
          f"{bound / 2 ** 20:,.0f} MiB; {report['cpu_count']} CPUs, jax {report['jax_version']}")
    hdr = (f"{'step':<18}{'seconds':>10}{'cpu s':>9}{'peak RSS MiB':>14}{'net MiB':>9}{'inputs MiB':>12}"
           f"{'<= bound':>10}{'FusionBench s':>15}  load")
    print(hdr)
    print("-" * len(hdr))
    for n in STEP_NAMES:
        r = res.get(n)
        if r is None:
            continue
        if "error" in r:
            print(f"{n:<18}  FAILED: {r['error'][:80]}")
            continue
        lim = bound + (r.get("extra_bound_bytes") or 0)
        ok = "yes" if r["peak_rss_bytes"] <= lim else "NO"
        fb = FUSIONBENCH.get(n)
        fbs = "-" if fb is None else (f"{WUDI_FB_PER_ITER:g}/iter" if n == "wudi" else f"{fb:g}")
        if n in ("wudi_exact", "iso_cts"):
            fbs = "-"
        if n == "task_arithmetic":
            fbs = "0.8-2.1"
        if n == "merge":
            fbs = f"<{FB_WUDI_TOTAL / 100:g}, <{FB_TSV:g}"
        load = "{:.1f}".format(r.get("loadavg_before", [float("nan")])[0])
        net = r["peak_rss_bytes"] - r.get("runtime_rss_bytes", 0)
        print(f"{n:<18}{r['seconds']:>10.2f}{r.get('cpu_seconds', float('nan')):>9.1f}{_fmt_mib(r['peak_rss_bytes']):>14}"
              f"{_fmt_mib(net):>9}{_fmt_mib(r.get('pre_rss_bytes')):>12}{ok:>10}{fbs:>15}  {load}")
    if "agreement" in res and "max_rel_diff" in res["agreement"]:
        print(f"bmm vs numpy/scipy merge: max |diff| / max |delta| = {res['agreement']['max_rel_diff']:.2e}")
    for n in ("fast_resolve", "fast_resolve_bf16"):
        r = res.get(n, {})
        if "resolve_seconds_each" in r:
            print(f"{n} re-solves: " + ", ".join(f"{x:.2f} s" for x in r["resolve_seconds_each"])
                  + (f"; prepare {r['prepare_seconds']:.1f} s" if "prepare_seconds" in r else "")
                  + (f"; max |bf16 - exact| / max |delta| = {r['max_rel_diff_vs_exact']:.1e}"
                     if "max_rel_diff_vs_exact" in r else "")
                  + (f"; re-solve peak RSS {_fmt_mib(r['peak_rss_bytes'])} MiB with the experts freed "
                     f"(process peak before: {_fmt_mib(r['process_peak_rss_bytes_before_resolve'])} MiB"
                     + (f", after prepare: {_fmt_mib(r['prepare_peak_rss_bytes'])} MiB"
                        if "prepare_peak_rss_bytes" in r else "") + ")"
                     if r.get("peak_reset") else ""))
    for n in STEP_NAMES:
        if "seconds_each" in res.get(n, {}):
            print(f"{n}: {res[n]['runs']} fresh-process runs, " + ", ".join(f"{x:.2f}" for x in res[n]["seconds_each"])
                  + " s (median shown)")
    print("net = peak RSS minus the interpreter + libraries before the models were built "
          "(runtime_rss_bytes); the bound is checked on the full peak")
    print("\ntargets:")
    for name, t in report["targets"].items():
        v, lim = t["value"], t["limit"]
        if "RSS" in name:
            vs = f"{v / 2 ** 20:,.0f} MiB vs {lim / 2 ** 20:,.0f} MiB"
        else:
            vs = f"{v:.2f} s vs {lim:.2f} s"
        print(f"  [{'met' if t['met'] else 'MISSED'}] {name}: {vs}")


def markdown_table(report: dict) -> str:
    """The measured steps as a markdown table (for the README): seconds, peak and net RSS,
    FusionBench reference and whether each target was met."""
    res, bound = report["steps"], report["memory_bound_bytes"]
    targets = report.get("targets", {})
    lines = ["| step | wall s | peak RSS MiB | net MiB | FusionBench 0.2.33 s | speed target | RSS <= bound |",
             "|---|---:|---:|---:|---:|:---:|:---:|"]
    desc = dict(STEPS)
    for n in STEP_NAMES:
        r = res.get(n)
        if r is None or "error" in r:
            continue
        fb = {"task_arithmetic": "0.8–2.1", "wudi": "≈ 4 h (36.5/iter)", "regmean": "34 (solve)",
              "merge": "WUDI/100 = 144, TSV-M 105"}.get(n, FUSIONBENCH.get(n))
        if n in ("wudi_exact", "iso_cts"):
            fb = None
        speed = [t for k, t in targets.items() if "RSS" not in k and (k.startswith(n + " ") or k.startswith(n + ":")
                                                                       or (n == "merge" and k.startswith("merge "))
                                                                       or (n.startswith("fast_resolve") and
                                                                           k.startswith("fast-path") and
                                                                           ("bfloat16" in k) == n.endswith("bf16")))]
        sp = "–" if not speed else ("met" if all(t["met"] for t in speed) else "**missed**")
        lim = bound + (r.get("extra_bound_bytes") or 0)
        ok = "—" if n == "agreement" else ("met" if r["peak_rss_bytes"] <= lim else "**missed**")
        net = r["peak_rss_bytes"] - r.get("runtime_rss_bytes", 0)
        lines.append(f"| {n} — {desc[n].replace('|', chr(92) + '|')} | {r['seconds']:.2f} | {r['peak_rss_bytes'] / 2 ** 20:,.0f} | "
                     f"{net / 2 ** 20:,.0f} | {fb if fb is not None else '—'} | {sp} | {ok} |")
    return "\n".join(lines)


def _run_worker(name: str, args, k: int, wudi_steps: int) -> dict:
    """Run one step in a fresh process; its measurements (or ``{"error": ...}``)."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as tf:
        wout = tf.name
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, "--worker-out", wout,
           "--num-experts", str(k), "--sigma", str(args.sigma), "--wudi-steps", str(wudi_steps)]
    if args.quick:
        cmd.append("--quick")
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    try:
        if proc.returncode != 0:
            lines = (proc.stderr or proc.stdout).strip().splitlines()
            print(f"\n[bench] step {name} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
            return {"error": lines[-1] if lines else f"exit {proc.returncode}", "returncode": proc.returncode}
        with open(wout) as f:
            info = json.load(f)
    finally:
        os.unlink(wout)
    info.update(loadavg_before=list(load0), loadavg_after=list(os.getloadavg()), process_wall_seconds=wall)
    return info


def _aggregate(infos: list[dict]) -> dict:
    """One step's result from its runs: the median run's record (by seconds), with ``seconds_each``
    and the maximum peak RSS over the runs."""
    ok = [i for i in infos if "error" not in i]
    if not ok:
        return infos[-1]
    if len(ok) == 1:
        return ok[0]
    ok.sort(key=lambda i: i["seconds"])
    out = dict(ok[(len(ok) - 1) // 2])
    out["seconds_each"] = [i["seconds"] for i in infos if "error" not in i]
    out["peak_rss_bytes"] = max(i["peak_rss_bytes"] for i in ok)
    out["runs"] = len(ok)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] + " Writes JSON and prints a table.",
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Steps: " + ", ".join(STEP_NAMES))
    p.add_argument("--out", default=DEFAULT_OUT, help=f"JSON output path (default {DEFAULT_OUT})")
    p.add_argument("--quick", action="store_true",
                   help="tiny CLIP config (hidden 64, 2 layers), K = 4, 3 WUDI steps: a smoke test")
    p.add_argument("--num-experts", type=int, default=None, help="K (default 8, quick 4)")
    p.add_argument("--sigma", type=float, default=1e-3, help="std of the expert perturbations")
    p.add_argument("--wudi-steps", type=int, default=None, help="WUDI Adam steps (default 300, quick 3)")
    p.add_argument("--steps", default=None,
                   help="comma-separated subset of steps (default all); results merge into an existing --out")
    p.add_argument("--repeat", type=int, default=1,
                   help="fresh-process runs per step, interleaved across the selected steps (so a drifting "
                        "machine speed hits every step alike); seconds = median, peak RSS = max (default 1)")
    p.add_argument("--markdown", action="store_true",
                   help="print the results already in --out as a markdown table and exit (runs nothing)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    k = args.num_experts or (4 if args.quick else 8)
    wudi_steps = args.wudi_steps if args.wudi_steps is not None else (3 if args.quick else 300)

    if args.markdown:
        if not os.path.exists(args.out):
            p.error(f"--markdown: no results at {args.out}; run the benchmark first")
        with open(args.out) as f:
            print(markdown_table(json.load(f)))
        return 0
    if args.worker:
        info = run_step(args.worker, args.quick, k, args.sigma, wudi_steps)
        with open(args.worker_out, "w") as f:
            json.dump(info, f)
        return 0

    if args.repeat < 1:
        p.error(f"--repeat must be >= 1, got {args.repeat}")
    steps = STEP_NAMES if args.steps is None else tuple(s.strip() for s in args.steps.split(",") if s.strip())
    unknown = [s for s in steps if s not in STEP_NAMES]
    if unknown:
        p.error(f"unknown steps {unknown}; known: {', '.join(STEP_NAMES)}")

    import jax
    import bmm_jax
    base_shapes = param_shapes(args.quick)
    labels = bmm_jax.build_labels(base_shapes)
    mbytes = model_bytes(base_shapes)
    gbytes = gram_set_bytes(labels)
    from bmm_jax.labels import input_groups
    group_bytes = sum(m[0].d_in ** 2 * 4 for m in input_groups(labels).values())
    bound = (k + 3) * mbytes + gbytes

    report = {}
    if args.steps is not None and os.path.exists(args.out):
        with open(args.out) as f:
            old = json.load(f)
        if old.get("quick") == args.quick and old.get("num_experts") == k:
            report = old
    report.update({
        "description": "bmm_jax merge benchmark, CLIP ViT-B/32-shaped experts (experiments/bench_merge.py)",
        "quick": args.quick, "num_experts": k, "sigma": args.sigma, "wudi_steps": wudi_steps,
        "model_params": mbytes // 4, "model_bytes": mbytes, "gram_set_bytes": gbytes,
        "gram_set_definition": "one float32 [d_in, d_in] per regressed module",
        "activation_gram_set_bytes_per_task": group_bytes,
        "memory_bound_bytes": bound, "memory_bound": "(K + 3) x model_bytes + gram_set_bytes",
        "hparams": HPARAMS, "resolve_hparams": list(RESOLVE_HPARAMS),
        "cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
        "jax_version": jax.__version__, "fusionbench_seconds": FUSIONBENCH,
        "fusionbench_wudi_seconds_per_iteration": WUDI_FB_PER_ITER,
        "note": ("timings are cold (jit compilation included) except fast_resolve (median of 3 after a "
                 "warm-up); the machine's 2 cores are shared with other jobs: see loadavg per step"),
    })
    res = report.setdefault("steps", {})
    try:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(steps) * args.repeat, desc="bench", unit="run")
    except ImportError:
        bar = None
    runs: dict[str, list[dict]] = {}
    for rep in range(args.repeat):
        for name in steps:
            if bar is not None:
                bar.set_postfix_str(name if args.repeat == 1 else f"{name} ({rep + 1}/{args.repeat})")
            else:
                print(f"[bench] {name} ...", flush=True)
            info = _run_worker(name, args, k, wudi_steps)
            if "error" not in info and name == "regmean":
                info["extra_bound_bytes"] = k * group_bytes       # its input: K activation Gram sets
            runs.setdefault(name, []).append(info)
            if "error" not in info:
                msg = f"{name}: {info['seconds']:.2f} s, peak RSS {_fmt_mib(info['peak_rss_bytes'])} MiB"
                (bar.write if bar is not None else print)(msg)
            if bar is not None:
                bar.update(1)
    for name, infos in runs.items():
        res[name] = _aggregate(infos)
    report["targets"] = _targets(res, bound)
    report["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    if bar is not None:
        bar.close()
    out_dir = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(out_dir, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=out_dir, suffix=".tmp", delete=False) as f:
        json.dump(report, f, indent=1)                     # written whole, then renamed: never half a file
    os.replace(f.name, args.out)
    print_table(report)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
