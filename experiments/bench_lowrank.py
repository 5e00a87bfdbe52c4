"""Benchmark: the data-free anchored solve of one module, dense vs low-rank (Woodbury).

Issue 13, deliverable 4 ("cost that follows the rank"). Data-free Grams have rank <= K d_out; when
``K d_out < d_in`` (grouped-query k/v projections, an LLM's down projection with few experts)
:mod:`bmm_jax.solve_lowrank` solves in the ``K d_out``-dimensional space. For LLM module shapes
this script times, per module (random task vectors ``T_k ~ N(0, 1)``, anchor = 0.3 sum T_k):

* ``dense``: ``S = sum_k w_k T_k T_k^T / ||T_k||^2`` and ``B = sum_k w_k T_k (T_k^T T_k) /
  ||T_k||^2`` (one product per expert), Cholesky of ``S + lambda I``, two triangular solves: the
  dense algorithm (``bmm_jax.solve.normal_equations_factored`` computes the same ``S`` by
  symmetric row blocks; its XLA compilation alone took minutes here, so it is not used);
* ``woodbury``: :func:`bmm_jax.solve_lowrank.solve_data_free_woodbury`;
* ``dense_factor`` / ``lowrank_factor``: the one-off factorisation for the outer loop
  (:func:`bmm_jax.solve.eigen_factors` of ``S`` vs :func:`bmm_jax.solve_lowrank.lowrank_factors`),
  and ``dense_resolve`` / ``lowrank_resolve``: one re-solve for a new ``(rho, scale)``; only for
  ``d_in <= --factor-max-d`` (a ``d_in = 8192`` ``eigh`` takes minutes on a 2-core CPU).

Each step is jitted, run once to compile (``compile_s``, not in the timing), then timed as the
median of ``--repeat`` calls. ``rel_diff`` = ``||W_wood - W_dense||_F / ||W_dense||_F``. Memory:
the model of :func:`bmm_jax.solve_lowrank.solve_costs` (working set beyond the inputs). Writes
JSON and prints a table.

Usage::

    .venv/bin/python experiments/bench_lowrank.py                 # Llama-3.2-1B k/v and down, K = 2, 3
    .venv/bin/python experiments/bench_lowrank.py --quick         # small shapes, smoke test
    .venv/bin/python experiments/bench_lowrank.py --cases kv8b    # Llama-3.1-8B k/v (4096 -> 1024)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

DEFAULT_OUT = os.path.join(REPO, "experiments", "results", "bench_lowrank.json")
# name -> (description, d_in, d_out, K)
CASES = {
    "kv1b_k2": ("Llama-3.2-1B k/v proj, K=2", 2048, 512, 2),
    "kv1b_k3": ("Llama-3.2-1B k/v proj, K=3", 2048, 512, 3),
    "down1b_k2": ("Llama-3.2-1B down proj, K=2", 8192, 2048, 2),
    "down1b_k3": ("Llama-3.2-1B down proj, K=3", 8192, 2048, 3),
    "kv8b": ("Llama-3.1-8B k/v proj, K=3", 4096, 1024, 3),
    "quick_kv": ("small k/v, K=2", 256, 32, 2),
    "quick_down": ("small down, K=2", 512, 128, 2),
}
DEFAULT_CASES = ("kv1b_k2", "kv1b_k3", "down1b_k2")
QUICK_CASES = ("quick_kv", "quick_down")


def _time(fn, repeat):
    import jax
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn())
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return out, compile_s, statistics.median(times)


def run_case(name, repeat, rho=0.3, scale=1.0, factor_max_d=4096):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from bmm_jax.solve import HIGHEST, eigen_factors, resolve_factors
    from bmm_jax.solve_lowrank import (lowrank_factors, prefer_woodbury, resolve_lowrank,
                                       solve_costs, solve_data_free_woodbury)
    desc, d_in, d_out, k = CASES[name]
    rng = np.random.default_rng(0)
    t = jnp.asarray(rng.standard_normal((k, d_in, d_out)).astype(np.float32))
    ta = 0.3 * jnp.sum(t, axis=0)
    def normal_equations(t):
        a = 1.0 / jnp.sum(t * t, axis=(1, 2))                    # w_k / ||T_k||^2, w_k = 1
        s = sum(a[i] * jnp.matmul(t[i], t[i].T, precision=HIGHEST) for i in range(k))
        b = sum(a[i] * jnp.matmul(t[i], jnp.matmul(t[i].T, t[i], precision=HIGHEST), precision=HIGHEST)
                for i in range(k))
        return s, b

    @jax.jit
    def dense(t, ta, rho, scale):
        s, b = normal_equations(t)
        lam = rho * jnp.trace(s) / d_in
        c = jax.scipy.linalg.cho_factor(s + lam * jnp.eye(d_in, dtype=s.dtype), lower=True)
        return scale * jax.scipy.linalg.cho_solve(c, b + lam * ta)

    @jax.jit
    def dense_factor(t, ta):
        s, b = normal_equations(t)
        return eigen_factors(s, b, ta)

    wood = jax.jit(lambda t, ta, rho, scale: solve_data_free_woodbury(t, ta, rho=rho, scale=scale))
    rec = {"case": name, "description": desc, "d_in": d_in, "d_out": d_out, "k": k, "rank": k * d_out,
           "prefer_woodbury": prefer_woodbury(d_in, d_out, k)}
    costs = solve_costs(d_in, d_out, k, d_out)
    rec.update({f"{m}_model_gflop": c.flops / 1e9 for m, c in costs.items()})
    rec.update({f"{m}_model_mib": c.bytes / 2 ** 20 for m, c in costs.items()})
    out_d, rec["dense_compile_s"], rec["dense_s"] = _time(lambda: dense(t, ta, rho, scale), repeat)
    out_w, rec["woodbury_compile_s"], rec["woodbury_s"] = _time(lambda: wood(t, ta, rho, scale), repeat)
    rec["rel_diff"] = float(jnp.linalg.norm(out_w - out_d) / jnp.linalg.norm(out_d))
    del out_d, out_w
    rec["speedup_solve"] = rec["dense_s"] / rec["woodbury_s"]
    if d_in > factor_max_d:
        return rec
    fd, rec["dense_factor_compile_s"], rec["dense_factor_s"] = _time(lambda: dense_factor(t, ta), repeat)
    fl, rec["lowrank_factor_compile_s"], rec["lowrank_factor_s"] = _time(
        lambda: lowrank_factors(t, None, ta), repeat)
    rd = jax.jit(lambda f, r, s: resolve_factors(f, r, s))
    rl = jax.jit(lambda f, r, s: resolve_lowrank(f, r, s))
    a, _, rec["dense_resolve_s"] = _time(lambda: rd(fd, 0.1, 1.2), repeat)
    b, _, rec["lowrank_resolve_s"] = _time(lambda: rl(fl, 0.1, 1.2), repeat)
    rec["resolve_rel_diff"] = float(jnp.linalg.norm(a - b) / jnp.linalg.norm(a))
    rec["dense_factor_mib"] = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(fd)) / 2 ** 20
    rec["lowrank_factor_mib"] = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(fl)) / 2 ** 20
    rec["speedup_factor"] = rec["dense_factor_s"] / rec["lowrank_factor_s"]
    rec["speedup_resolve"] = rec["dense_resolve_s"] / rec["lowrank_resolve_s"]
    return rec


def table(records) -> str:
    cols = [("case", "{}"), ("rank", "{}"), ("dense_s", "{:.2f}"), ("woodbury_s", "{:.2f}"),
            ("speedup_solve", "{:.1f}x"), ("dense_factor_s", "{:.2f}"), ("lowrank_factor_s", "{:.2f}"),
            ("dense_resolve_s", "{:.3f}"), ("lowrank_resolve_s", "{:.3f}"), ("dense_model_mib", "{:.0f}"),
            ("woodbury_model_mib", "{:.0f}"), ("dense_factor_mib", "{:.0f}"), ("lowrank_factor_mib", "{:.0f}"),
            ("rel_diff", "{:.1e}")]
    rows = [[c for c, _ in cols]] + [[f.format(r[c]) if c in r else "-" for c, f in cols] for r in records]
    widths = [max(len(r[i]) for r in rows) for i in range(len(cols))]
    lines = ["  ".join(x.rjust(w) for x, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", nargs="+", choices=sorted(CASES), default=None)
    ap.add_argument("--quick", action="store_true", help="small shapes (smoke test)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--factor-max-d", type=int, default=4096,
                    help="time the outer-loop factorisations only for d_in up to this")
    ap.add_argument("--out", default=None, help=f"JSON output (default {DEFAULT_OUT}; --quick: a temp file)")
    args = ap.parse_args(argv)
    cases = args.cases or (QUICK_CASES if args.quick else DEFAULT_CASES)
    out = args.out or (os.path.join(tempfile.gettempdir(), "bench_lowrank_quick.json") if args.quick else DEFAULT_OUT)
    import jax
    records = []
    for c in cases:
        records.append(run_case(c, args.repeat, factor_max_d=args.factor_max_d))
        print(f"{c}: dense {records[-1]['dense_s']:.2f} s, woodbury {records[-1]['woodbury_s']:.2f} s", flush=True)
    result = {"benchmark": "bench_lowrank", "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                                       "devices": [str(d) for d in jax.devices()]},
              "repeat": args.repeat, "records": records}
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, out)
    print(table(records))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
