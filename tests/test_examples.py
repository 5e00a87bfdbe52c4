"""Embedding bmm_jax in a training loop: ``grams.capture`` / ``grams.from_states`` and a merge
inside ``jit`` against numpy references; the two examples (``experiments/train_and_merge.py``,
``experiments/nnx_merge.py``) at a tiny size; the README's set-up commands."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bmm_jax
from bmm_jax import grams as G

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Tiny(nn.Module):
    """``mlp_out(tanh(mlp_in(x)))``: two regressed modules with different inputs."""

    @nn.compact
    def __call__(self, x):
        return nn.Dense(3, name="mlp_out")(jnp.tanh(nn.Dense(5, name="mlp_in")(x)))


def _np_forward(p, x):
    """Numpy float64 forward of :class:`Tiny`: ``(output, input of mlp_in, input of mlp_out)``."""
    f = lambda a: np.asarray(a, np.float64)     # noqa: E731
    h = np.tanh(x @ f(p["mlp_in"]["kernel"]) + f(p["mlp_in"]["bias"]))
    return h @ f(p["mlp_out"]["kernel"]) + f(p["mlp_out"]["bias"]), x, h


@pytest.fixture(scope="module")
def tiny():
    rng = np.random.default_rng(0)
    model = Tiny()
    base = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4)))["params"]
    base = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float32), base)
    experts = [jax.tree_util.tree_map(lambda b: (b + 0.3 * rng.normal(size=b.shape)).astype(np.float32), base)
               for _ in range(3)]
    batches = rng.normal(size=(3, 2, 7, 4)).astype(np.float32)      # [K, batches, rows, d]
    apply = lambda p, x: model.apply({"params": p}, x)             # noqa: E731
    return model, apply, base, experts, batches, bmm_jax.build_labels(base)


def _np_grams(experts, batches):
    """{group: [K, d, d]} mean x x^T of every module's input, from the numpy forward pass."""
    out = {"mlp_in/kernel": [], "mlp_out/kernel": []}
    for p, xs in zip(experts, batches):
        x = np.concatenate(list(xs)).astype(np.float64)
        _, a, h = _np_forward(p, x)
        out["mlp_in/kernel"].append(a.T @ a / len(a))
        out["mlp_out/kernel"].append(h.T @ h / len(h))
    return {k: np.stack(v) for k, v in out.items()}


def test_capture_returns_output_and_inputs(tiny):
    model, apply, base, experts, batches, labels = tiny
    x = batches[0, 0]
    out, captured = jax.jit(lambda p, x: G.capture(apply, p, x, labels))(experts[0], x)
    ref_out, ref_in, ref_h = _np_forward(experts[0], x.astype(np.float64))
    np.testing.assert_allclose(np.asarray(out), ref_out, rtol=1e-5, atol=1e-5)
    assert set(captured) == {"mlp_in/kernel", "mlp_out/kernel"}
    np.testing.assert_allclose(np.asarray(captured["mlp_in/kernel"][0]), ref_in, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(captured["mlp_out/kernel"][0]), ref_h, rtol=1e-5, atol=1e-5)
    assert np.asarray(captured["mlp_in/kernel"][1]).all()
    # capture_inputs is the same capture without the output
    again = G.capture_inputs(apply, experts[0], x, labels)
    np.testing.assert_array_equal(np.asarray(again["mlp_out/kernel"][0]), np.asarray(captured["mlp_out/kernel"][0]))


def test_capture_inside_value_and_grad(tiny):
    """The loss's gradient is unchanged by capturing, and the captured inputs come out as aux."""
    model, apply, base, experts, batches, labels = tiny
    x, y = batches[0, 0], jnp.arange(7) % 3

    def loss(p):
        return jnp.mean((apply(p, x) - jax.nn.one_hot(y, 3)) ** 2)

    def loss_and_inputs(p):
        out, cap = G.capture(apply, p, x, labels)
        return jnp.mean((out - jax.nn.one_hot(y, 3)) ** 2), cap

    g_ref = jax.grad(loss)(experts[0])
    (l, cap), g = jax.jit(jax.value_and_grad(loss_and_inputs, has_aux=True))(experts[0])
    for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(g_ref)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(cap["mlp_in/kernel"][0]), x, rtol=1e-6)


@pytest.mark.parametrize("how", ["vmapped", "list", "jit"])
def test_from_states_matches_numpy(tiny, how):
    model, apply, base, experts, batches, labels = tiny
    dims = {"mlp_in/kernel": 4, "mlp_out/kernel": 5}

    def accumulate(p, xs):
        def body(state, x):
            return G.update(state, G.capture_inputs(apply, p, x, labels)), None
        return jax.lax.scan(body, G.init(dims), xs)[0]

    stacked = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *experts)
    states = jax.jit(jax.vmap(accumulate))(stacked, batches)
    if how == "vmapped":
        grams = G.from_states(states, labels)
    elif how == "list":
        grams = G.from_states([jax.tree_util.tree_map(lambda a, k=k: a[k], states) for k in range(3)], labels)
    else:
        grams = jax.jit(lambda s: G.from_states(s, labels))(states)
    ref = _np_grams(experts, batches)
    assert isinstance(grams, G.Grams) and grams.kind == "activations"
    assert set(grams) == {"mlp_in/kernel", "mlp_out/kernel"}
    for path in grams:
        np.testing.assert_allclose(np.asarray(grams[path]), ref[path], rtol=1e-5, atol=1e-6)
    assert [float(grams.num_tokens[k]) for k in range(3)] == [14.0] * 3


def test_from_states_errors(tiny):
    model, apply, base, experts, batches, labels = tiny
    empty = [G.init({"mlp_in/kernel": 4, "mlp_out/kernel": 5}) for _ in range(2)]
    with pytest.raises(ValueError, match="saw no .*row"):
        G.from_states(empty, labels)
    nan = jax.jit(lambda s: G.from_states(s, labels)["mlp_in/kernel"])(empty)
    assert np.isnan(np.asarray(nan)).all()                       # traced: no check, NaN visible
    with pytest.raises(ValueError, match="no accumulator for input groups .*mlp_out"):
        G.from_states([G.init({"mlp_in/kernel": 4})] * 2, labels)
    with pytest.raises(ValueError, match="mlp_in/kernel.*expected \\[K, 4, 4\\]"):
        G.from_states([G.init({"mlp_in/kernel": 3, "mlp_out/kernel": 5})] * 2, labels)
    with pytest.raises(ValueError, match="GramState"):
        G.from_states([], labels)


def test_merge_inside_jit_with_captured_grams_matches_numpy(tiny):
    """Capture -> accumulate -> from_states -> merge, all in one jitted function, equals the closed
    form ``W0 + s (S + lam I)^-1 (B + lam Ta)`` computed in float64 numpy from the numpy forward."""
    model, apply, base, experts, batches, labels = tiny
    dims = {"mlp_in/kernel": 4, "mlp_out/kernel": 5}
    anchor = jax.tree_util.tree_map(lambda b, *e: b + 0.3 * sum(x - b for x in e), base, *experts)
    rho, scale = 0.2, 0.9

    @jax.jit
    def step(experts, batches):
        states = []
        for p, xs in zip(experts, batches):
            s = G.init(dims)
            for x in xs:
                _, cap = G.capture(apply, p, x, labels)
                s = G.update(s, cap)
            states.append(s)
        grams = G.from_states(states, labels)
        return bmm_jax.merge(base, experts, anchor, grams, {"rho": rho, "scale": scale}, labels=labels).params

    merged = step(experts, batches)
    ref_g = _np_grams(experts, batches)
    for path in ("mlp_in/kernel", "mlp_out/kernel"):
        mod = path.split("/")[0]
        w0 = np.asarray(base[mod]["kernel"], np.float64)
        t = np.stack([np.asarray(e[mod]["kernel"], np.float64) - w0 for e in experts])
        ta = np.asarray(anchor[mod]["kernel"], np.float64) - w0
        g = ref_g[path]
        s_mat = g.sum(0)
        b_mat = np.einsum("kij,kjo->io", g, t)
        lam = rho * np.trace(s_mat) / s_mat.shape[0]
        want = w0 + scale * np.linalg.solve(s_mat + lam * np.eye(len(s_mat)), b_mat + lam * ta)
        np.testing.assert_allclose(np.asarray(merged[mod]["kernel"]), want, rtol=2e-4, atol=2e-5)
        # carried leaves come from the anchor
        np.testing.assert_array_equal(np.asarray(merged[mod]["bias"]), np.asarray(anchor[mod]["bias"]))


# ----------------------------------------------------------------------------- the example scripts
def _run(script: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, os.path.join(REPO, "experiments", script), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("script", ["train_and_merge.py", "nnx_merge.py"])
def test_example_help(script):
    proc = _run(script, "--help", timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "BMM" in proc.stdout and "--experts" in proc.stdout and "--json" in proc.stdout
    bad = _run(script, "--experts", "1", timeout=300)
    assert bad.returncode == 2 and "--experts must be >= 2" in bad.stderr


def test_train_and_merge_example(tmp_path):
    out = tmp_path / "train_and_merge.json"
    proc = _run("train_and_merge.py", "--steps", "40", "--merge-every", "20", "--pretrain-steps", "50",
                "--eval-size", "256", "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "bmm_activations" in proc.stdout and "per task at the last merge" in proc.stdout
    res = json.loads(out.read_text())
    assert [m["step"] for m in res["merges"]] == [20, 40]
    for m in res["merges"]:
        assert m["window_rows"] == 20 * 64                  # the accumulator restarts after each merge
        for k in ("base", "expert", "task_arithmetic", "bmm_data_free", "bmm_activations"):
            assert len(m[k]) == 3 and all(0.0 <= a <= 1.0 for a in m[k])
    f = res["final"]
    # fine-tuning worked, and the merges rank as the method predicts on these subspace tasks
    assert f["expert"] > f["base"] + 0.3
    assert f["bmm_activations"] > f["task_arithmetic"] + 0.1
    assert f["bmm_activations"] > f["bmm_data_free"]


def test_nnx_merge_example(tmp_path):
    out = tmp_path / "nnx_merge.json"
    proc = _run("nnx_merge.py", "--steps", "100", "--pretrain-steps", "100", "--eval-size", "256",
                "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "would give 0 regressed modules" in proc.stdout          # the raw nnx.State pitfall, shown
    res = json.loads(out.read_text())
    assert res["regressed"] == ["blocks/0/mlp_in/kernel", "blocks/0/mlp_out/kernel", "blocks/1/mlp_in/kernel",
                                "blocks/1/mlp_out/kernel", "proj/kernel"]
    f = res["final"]
    assert f["expert"] > f["base"] + 0.3
    assert f["bmm"] > f["task_arithmetic"] + 0.05


def test_readme_training_loop_snippet_runs(tiny):
    """The README's "Inside your training loop" code, its ``...`` filled by an optax update, runs:
    three steps, the third merges, with the Grams of the three training forward passes (checked
    against Grams from the numpy forward pass of the params each step trained)."""
    import optax
    model, apply, base, experts, batches, labels = tiny
    readme = open(os.path.join(REPO, "README.md")).read().split("## Inside your training loop", 1)[1]
    code = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    filler = "    ...                                                          # optax update, vmapped"
    assert filler in code
    code = code.replace(filler, "    u, opt_state = jax.vmap(opt.update)(g, opt_state, experts)\n"
                                "    experts = jax.vmap(optax.apply_updates)(experts, u)")
    K, opt = 3, optax.sgd(0.05)
    ns = {"jax": jax, "jnp": jnp, "optax": optax, "bmm_jax": bmm_jax, "apply_fn": apply, "labels": labels,
          "base": base, "K": K, "opt": opt,
          "loss_fn": lambda logits, y: optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()}
    exec(code, ns)
    stacked = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *experts)
    opt_state = jax.vmap(opt.init)(stacked)
    gram_state = jax.vmap(lambda _: G.init({"mlp_in/kernel": 4, "mlp_out/kernel": 5}))(jnp.arange(K))
    x, y = batches[:, 0], jnp.zeros((K, 7), jnp.int32)
    trained = []                                                   # params each step's forward pass saw
    for i in range(3):
        trained.append([jax.tree_util.tree_map(lambda a, k=k: np.asarray(a[k]), stacked) for k in range(K)])
        stacked, opt_state, gram_state, merged = ns["step"](stacked, opt_state, gram_state, x, y, i == 2)
        if i < 2:
            np.testing.assert_array_equal(np.asarray(merged["mlp_in"]["kernel"]), base["mlp_in"]["kernel"])
    grams = {"mlp_in/kernel": [], "mlp_out/kernel": []}
    for k in range(K):
        rows = [_np_forward(trained[i][k], x[k].astype(np.float64)) for i in range(3)]
        a, h = np.concatenate([r[1] for r in rows]), np.concatenate([r[2] for r in rows])
        grams["mlp_in/kernel"].append(a.T @ a / len(a))
        grams["mlp_out/kernel"].append(h.T @ h / len(h))
    grams = {g: np.stack(v).astype(np.float32) for g, v in grams.items()}
    ex = [jax.tree_util.tree_map(lambda a, k=k: a[k], stacked) for k in range(K)]
    want = bmm_jax.merge(base, ex, "task_arithmetic", grams, {"rho": 0.01}, labels=labels).params
    for got, ref in zip(jax.tree_util.tree_leaves(merged), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- set-up commands
def test_ci_runs_the_readme_test_command():
    readme = open(os.path.join(REPO, "README.md")).read()
    blocks = re.findall(r"```bash\n(.*?)\n```", readme.split("## Two commands", 1)[1].split("\n## ", 1)[0], re.S)
    assert len(blocks) == 2
    main_job, tests = blocks
    ci = [l for l in open(os.path.join(REPO, ".ci", "run")).read().splitlines() if l and not l.startswith(("#", "set ", "cd "))]
    assert ci == [tests]
    for cmd in (main_job, tests):
        assert "pip install -q -c constraints.txt -e " in cmd
    pins = [l for l in open(os.path.join(REPO, "constraints.txt")).read().splitlines() if l and not l.startswith("#")]
    assert all(re.fullmatch(r"[A-Za-z0-9_.\-]+==[^ ]+", l) for l in pins), pins
    names = {l.split("==")[0].lower().replace("_", "-") for l in pins}
    assert {"jax", "jaxlib", "flax", "optax", "transformers", "google-vizier", "equinox", "pytest"} <= names
