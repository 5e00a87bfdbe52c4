"""bmm_jax changes no process-wide setting at import or call time.

In a fresh interpreter: the third-party packages bmm_jax builds on are imported and JAX's CPU
backend and numpy's BLAS are started first (their own import-time settings are not ours); then a
snapshot of ``os.environ``, every ``jax.config`` value, threadpoolctl's BLAS / OpenMP thread limits,
the ``warnings`` filters and the root logger; then ``bmm_jax`` and every one of its modules are
imported, a tiny merge pipeline runs (task vectors, every anchor, data-free / activation / hybrid
Grams, ``merge`` eager and under ``jit``, ``prepare`` and a re-solve, ``solve_anchored``,
``validate``), and the snapshot is taken again: it must be unchanged. glibc's allocator is watched
too: no ``malloc_trim`` / ``mallopt`` call may happen unless the caller asked for one
(``bmm_jax.memory.trimming()``).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent(r'''
    import importlib, json, logging, os, pkgutil, sys, warnings

    # --- third-party packages (their own import-time settings are not bmm_jax's) and backends
    import flax.linen as nn, jax, jax.numpy as jnp, numpy as np, optax, scipy.linalg, threadpoolctl  # noqa
    import transformers, tensorflow_datasets, orbax.checkpoint, vizier  # noqa: F401
    jnp.ones(3).block_until_ready()
    np.ones((64, 64)) @ np.ones((64, 64))

    def snapshot():
        return {
            "environ": dict(os.environ),
            "jax.config": {k: repr(getattr(jax.config, k, jax.config.values[k])) for k in sorted(jax.config.values)},
            "threadpools": sorted((d["user_api"], d["internal_api"], d["filepath"], d["num_threads"])
                                  for d in threadpoolctl.threadpool_info()),
            "warnings.filters": [repr(f) for f in warnings.filters],
            "root logger": [logging.getLogger().level, [repr(h) for h in logging.getLogger().handlers]],
        }

    before = snapshot()

    # --- glibc allocator calls, recorded (bmm_jax.memory is the one place that makes them)
    import bmm_jax.memory as memory
    calls = []

    class Recorder:
        def mallopt(self, *a):
            calls.append("mallopt")
            return 1

        def malloc_trim(self, *a):
            calls.append("malloc_trim")
            return 1

    memory._libc = lambda: Recorder()

    # --- import the package and every module in it
    import bmm_jax
    failed = {}
    for mod in pkgutil.walk_packages(bmm_jax.__path__, "bmm_jax."):
        try:
            importlib.import_module(mod.name)
        except Exception as e:                      # reported, and the test fails on it
            failed[mod.name] = f"{type(e).__name__}: {e}"
    for name in bmm_jax._LAZY:
        getattr(bmm_jax, name)
    after_import = snapshot()

    # --- a tiny merge pipeline
    rng = np.random.default_rng(0)

    class Tiny(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.Dense(8, name="mlp_in")(x)
            return nn.Dense(6, name="mlp_out")(jnp.tanh(h))

    model = Tiny()
    base = jax.tree_util.tree_map(np.asarray, model.init(jax.random.PRNGKey(0), jnp.zeros((1, 6)))["params"])
    experts = [jax.tree_util.tree_map(lambda b: (b + 0.1 * rng.normal(size=b.shape)).astype(np.float32), base)
               for _ in range(3)]
    labels = bmm_jax.build_labels(base)
    hp = {"rho": 0.3, "scale": 1.0}
    apply = lambda p, x: model.apply({"params": p}, x)
    batches = [[jnp.asarray(rng.normal(size=(5, 6)), jnp.float32) for _ in range(2)] for _ in range(3)]

    bmm_jax.task_vectors(base, experts)
    free = bmm_jax.grams.data_free(base, experts)
    data = bmm_jax.grams.activations(apply, experts, batches, labels, progress=False)
    bmm_jax.grams.hybrid(data, free, 0.5)
    for name in ("average", "task_arithmetic", "ties", "tsv", "iso_c", "iso_cts"):
        getattr(bmm_jax.anchors, name)(base, experts, labels=labels)
    bmm_jax.anchors.wudi(base, experts, labels=labels, steps=2)
    bmm_jax.anchors.wudi(base, experts, labels=labels, exact=True)
    bmm_jax.anchors.regmean(base, experts, grams=data, labels=labels)
    anchor = bmm_jax.anchors.task_arithmetic(base, experts, labels=labels)
    bmm_jax.validate(base, experts, anchor, data, labels=labels)
    bmm_jax.merge(base, experts, anchor, data, hp, labels=labels)
    bmm_jax.merge(base, experts, "ties", None, hp, labels=labels)
    jax.jit(lambda b, e: bmm_jax.merge(b, e, "task_arithmetic", None, hp, labels=labels).params)(base, experts)
    prep = bmm_jax.prepare(base, experts, anchor, free, labels=labels)
    prep.params({"rho": 0.1, "scale": 1.2})
    t = np.stack([e["mlp_in"]["kernel"] - base["mlp_in"]["kernel"] for e in experts])
    bmm_jax.solve_anchored(t, np.stack([np.eye(6, dtype=np.float32)] * 3), t.mean(0), rho=0.3)

    # --- a streamed file-to-file merge (tiny random Llama)
    import tempfile
    from bmm_jax.streaming.synthetic import hf_config, write_expert, write_random_model
    with tempfile.TemporaryDirectory() as root:
        cfg = hf_config("llama", hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                        num_key_value_heads=1, vocab_size=40, tie_word_embeddings=True)
        b = write_random_model(os.path.join(root, "base"), cfg, seed=0)
        es = [write_expert(os.path.join(root, f"e{i}"), b, seed=i + 1) for i in range(2)]
        bmm_jax.merge_checkpoints(b, es, os.path.join(root, "out"), report_path="")
    after_calls = snapshot()
    unasked = list(calls)
    bmm_jax.memory.trim()                           # asked for: the recorder must see it

    print("RESULT " + json.dumps({"before": before, "after_import": after_import, "after_calls": after_calls,
                                  "allocator_calls": unasked, "asked_calls": calls[len(unasked):],
                                  "import_failures": failed}))
''')


def _diff(a: dict, b: dict) -> dict:
    out = {}
    for section in a:
        x, y = a[section], b[section]
        if x == y:
            continue
        if isinstance(x, dict):
            out[section] = {k: (x.get(k), y.get(k)) for k in sorted(set(x) | set(y)) if x.get(k) != y.get(k)}
        else:
            out[section] = (x, y)
    return out


def test_no_process_global_side_effects():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1]
    res = json.loads(line[len("RESULT "):])
    assert res["import_failures"] == {}, res["import_failures"]
    changed_by_import = _diff(res["before"], res["after_import"])
    assert changed_by_import == {}, f"importing bmm_jax changed process-wide settings: {changed_by_import}"
    changed_by_calls = _diff(res["after_import"], res["after_calls"])
    assert changed_by_calls == {}, f"bmm_jax calls changed process-wide settings: {changed_by_calls}"
    assert res["allocator_calls"] == [], (f"glibc allocator calls nobody asked for: {res['allocator_calls']} "
                                          "(only inside bmm_jax.memory.trimming())")
    assert "malloc_trim" in res["asked_calls"]     # the recorder is wired: a requested trim is seen


def test_the_probe_sees_changes():
    """The snapshot catches what it is meant to catch (an env var, a jax flag, a BLAS limit)."""
    probe = textwrap.dedent(r'''
        import os, threadpoolctl, jax, numpy as np
        np.ones((8, 8)) @ np.ones((8, 8))
        before = (dict(os.environ), jax.config.jax_enable_x64, [d["num_threads"] for d in threadpoolctl.threadpool_info()])
        os.environ["BMM_PROBE"] = "1"
        jax.config.update("jax_enable_x64", True)
        threadpoolctl.threadpool_limits(1)
        after = (dict(os.environ), jax.config.jax_enable_x64, [d["num_threads"] for d in threadpoolctl.threadpool_info()])
        print(before[0] != after[0], before[1] != after[1],
              before[2] != after[2] or os.cpu_count() == 1)
    ''')
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["True", "True", "True"]
