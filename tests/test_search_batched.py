"""Batched search steps (``SearchConfig.batch_size``): the vmapped ``Prepared.params`` plus a batched
objective give the same trials as the one-at-a-time loop and as an independent float64 numpy merge;
a ``kill -9`` in the middle of a batch loses and repeats nothing but that batch's evaluations; the
batched validation evaluation matches a numpy forward pass; argument errors name the argument.
"""
from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bmm_jax
import bmm_jax.search as S
from bmm_jax._tree import leaves_with_paths

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import test_search as TS  # noqa: E402  (tiny problems shared with the search tests)

FAST = dict(jax_cache_dir=None)


# --------------------------------------------------------------------------- references
def np_merge(base, experts, anchor, labels, point, space):
    """float64 numpy BMM merge (data-free Grams, isotropic prior, carry="anchor") at a flat search
    point, written from method.md: G_k = T_k T_k^T / ||T_k||_F^2, S = sum G_k, B = sum G_k T_k,
    lambda = rho tr(S) / d_in, W = W_0 + s (S + lambda I)^{-1} (B + lambda c T_a); carried leaves
    W_0 + c (W_a - W_0), with c the anchor_scale extra (1 without it)."""
    c = float(point.get("anchor_scale", 1.0))
    group = {m.path: g.name for g in space.groups for m in g.modules}
    b = dict(leaves_with_paths(base))
    a = dict(leaves_with_paths(anchor))
    ex = [dict(leaves_with_paths(e)) for e in experts]
    out = {}
    for p, w0 in b.items():
        w0 = np.asarray(w0, np.float64)
        ta = np.asarray(a[p], np.float64) - w0
        if p not in group:
            out[p] = w0 + c * ta
            continue
        rho = 10.0 ** point[group[p] + ":log10_rho"]
        s = point[group[p] + ":scale"]
        ts = [np.asarray(e[p], np.float64) - w0 for e in ex]
        gs = [t @ t.T / np.sum(t * t) for t in ts]
        sm = sum(gs)
        bm = sum(g @ t for g, t in zip(gs, ts))
        lam = rho * np.trace(sm) / sm.shape[0]
        out[p] = w0 + s * np.linalg.solve(sm + lam * np.eye(sm.shape[0]), bm + lam * c * ta)
    return out


def np_nll(flat, heads, val) -> float:
    """Mean validation log-likelihood (higher is better) of flat params, float64 numpy forward."""
    tree = {"encoder": {"layer": {}}}
    for p, v in flat.items():
        node = tree
        parts = p.split("/")
        for k in parts[:-1]:
            node = node.setdefault(k, {})
        node[parts[-1]] = v
    vals = []
    for t, (x, y) in val.items():
        logits = TS._np_forward(tree, x) @ np.asarray(heads[t]["kernel"], np.float64) + heads[t]["bias"]
        logits = logits - logits.max(1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
        vals.append(np.mean(logp[np.arange(len(y)), y]))
    return float(np.mean(vals))


def _flat(params):
    return {p: np.asarray(v, np.float64) for p, v in leaves_with_paths(params)}


def _jax_nll_batched(heads, val):
    """The same objective in JAX, for params with a leading [k] axis: returns [k] (batched=True)."""
    def one(params):
        vals = []
        for t, (x, y) in val.items():
            logits = TS._jax_forward(params, jnp.asarray(x)) @ heads[t]["kernel"] + heads[t]["bias"]
            logp = jax.nn.log_softmax(logits, axis=-1)
            vals.append(jnp.mean(jnp.take_along_axis(logp, jnp.asarray(y)[:, None], axis=1)))
        return jnp.mean(jnp.stack(vals))

    f = jax.jit(jax.vmap(one))

    def objective(params_batch):
        return np.asarray(f(params_batch), np.float64)
    objective.batched = True
    return objective


# --------------------------------------------------------------------------- batched == single
def test_batched_search_equals_single_and_numpy(tmp_path):
    from bmm_jax import anchors
    base, experts, heads, val = TS._tiny_tasks()
    anchor = anchors.task_arithmetic(base, experts)
    prep = bmm_jax.prepare(base, experts, anchor)
    single = lambda params: np_nll(_flat(params), heads, val)  # noqa: E731
    runs = {}
    for name, b, obj in [("single", 1, single), ("batched", 3, _jax_nll_batched(heads, val)),
                         ("loop", 4, single)]:
        cfg = S.SearchConfig(num_trials=8, designer="quasi_random", batch_size=b, extras=("anchor_scale",), **FAST)
        runs[name] = S.search(prep, obj, cfg, run_dir=str(tmp_path / name), anchor=anchor, progress=False,
                              verbose=False)
    one, bat, loop = runs["single"], runs["batched"], runs["loop"]
    for r in (one, bat, loop):
        assert [t.id for t in r.trials] == list(range(9)) and all(t.state == "COMPLETED" for t in r.trials)
        assert [t.source for t in r.trials[:3]] == ["anchor", "seed:anchor", "seed:default"]
    # the quasi-random sequence does not depend on how many points one call asks for
    assert [t.point for t in bat.trials] == [t.point for t in one.trials] == [t.point for t in loop.trials]
    space = S.build_space(prep.labels, S.SearchConfig(extras=("anchor_scale",)))
    for t1, tb, tl in zip(one.trials[1:], bat.trials[1:], loop.trials[1:]):
        ref = np_nll(np_merge(base, experts, anchor, prep.labels, t1.point, space), heads, val)
        assert t1.value == pytest.approx(ref, rel=1e-4, abs=1e-5)      # float32 merge vs float64 numpy
        assert tb.value == pytest.approx(t1.value, rel=2e-5, abs=2e-6)  # batched: float32 noise only
        assert tl.value == pytest.approx(t1.value, rel=2e-5, abs=2e-6)  # sliced from the vmapped batch
    assert len({t.point["anchor_scale"] for t in bat.trials[3:]}) == 6   # the extra varies inside batches
    # the returned model: the best trial rebuilt by the single path
    assert bat.best_trial == one.best_trial and bat.best_value == pytest.approx(one.best_value, rel=2e-5)


def test_batched_params_equal_single_params():
    from bmm_jax.search.batch import BatchRunner
    base, experts, anchor, _ = TS._tiny()
    prep = bmm_jax.prepare(base, experts, anchor)
    cfg = S.SearchConfig(grouping="block", extras=("anchor_scale",))
    space = S.build_space(prep.labels, cfg)
    rng = np.random.default_rng(0)
    points = [{n: float(rng.uniform(lo, hi)) for n, (lo, hi) in space.bounds.items()} for _ in range(3)]
    runner = BatchRunner(space, prep.params, lambda p: (0.0, {}), None, batch_size=4)
    assert runner.vmapped
    batch = runner.params_batch(points)                       # 3 points, padded to 4 inside
    assert all(np.shape(x)[0] == 3 for x in jax.tree_util.tree_leaves(batch))
    for i, p in enumerate(points):
        ref = np_merge(base, experts, anchor, prep.labels, p, space)
        got = _flat(jax.tree_util.tree_map(lambda x: x[i], batch))
        for path, r in ref.items():
            np.testing.assert_allclose(got[path], r, rtol=1e-4, atol=1e-5, err_msg=path)
    # a params function that is not Prepared.params is called per point
    assert not BatchRunner(space, lambda hp, **kw: prep.params(hp, **kw), lambda p: (0.0, {}), None, 4).vmapped


# --------------------------------------------------------------------------- objective protocol
def test_batched_objective_result_forms_and_errors(tmp_path):
    from bmm_jax.search.batch import split_results
    assert split_results([0.5, {"a": 1.0}], 2) == [0.5, {"a": 1.0}]
    assert split_results(np.array([1.0, 2.0]), 2) == [1.0, 2.0]
    assert split_results({"a": [0.1, 0.2], "b": np.array([0.3, 0.4])}, 2) == [{"a": 0.1, "b": 0.3},
                                                                               {"a": 0.2, "b": 0.4}]
    with pytest.raises(ValueError, match="3 results for a batch of 2"):
        split_results([1.0, 2.0, 3.0], 2)
    with pytest.raises(ValueError, match=r"task 'a' of shape \(3,\)"):
        split_results({"a": [1.0, 2.0, 3.0]}, 2)
    base, experts, anchor, _ = TS._tiny()
    prep = bmm_jax.prepare(base, experts, anchor)
    cfg = S.SearchConfig(num_trials=3, designer="quasi_random", batch_size=2, **FAST)
    with pytest.raises(TypeError, match="batched_objective must be callable"):
        S.search(prep, None, cfg, run_dir=str(tmp_path / "a"), batched_objective=3, progress=False, verbose=False)
    marked = lambda pb: [0.0] * jax.tree_util.tree_leaves(pb)[0].shape[0]  # noqa: E731
    marked.batched = True
    with pytest.raises(ValueError, match="pass one of them"):
        S.search(prep, marked, cfg, run_dir=str(tmp_path / "b"), batched_objective=marked, progress=False,
                 verbose=False)
    with pytest.raises(ValueError, match="returned 1 results for a batch of 2"):
        S.search(prep, None, cfg, run_dir=str(tmp_path / "c"), batched_objective=lambda pb: [0.0], anchor=anchor,
                 progress=False, verbose=False)
    # per-task results and the normalised objective through the batched path
    seen = []

    def per_task(pb):
        k = jax.tree_util.tree_leaves(pb)[0].shape[0]
        seen.append(k)
        return {"a": np.full(k, 0.4), "b": np.full(k, 0.3)}
    res = S.search(prep, None, S.SearchConfig(num_trials=5, designer="quasi_random", batch_size=2,
                                              objective="normalized", **FAST),
                   run_dir=str(tmp_path / "d"), batched_objective=per_task, expert_accuracy={"a": 0.8, "b": 0.6},
                   anchor=anchor, progress=False, verbose=False)
    assert seen == [1, 2, 2, 1]                      # the anchor, two full batches, the last trial alone
    assert all(t.value == pytest.approx(0.5) and t.metrics["norm/a"] == pytest.approx(0.5) for t in res.trials)
    # a make_batched_objective(...) result is taken as it is (its own kind must match the search's)
    made = S.make_batched_objective(per_task, kind="normalized", expert_accuracy={"a": 0.8, "b": 0.6})
    seen.clear()
    res = S.search(prep, None, S.SearchConfig(num_trials=3, designer="quasi_random", batch_size=2,
                                              objective="normalized", **FAST),
                   run_dir=str(tmp_path / "e"), batched_objective=made, anchor=anchor, progress=False, verbose=False)
    assert seen == [1, 2, 1] and all(t.value == pytest.approx(0.5) for t in res.trials)
    with pytest.raises(ValueError, match="kind='normalized'"):
        S.search(prep, None, cfg, run_dir=str(tmp_path / "f"), batched_objective=made, progress=False, verbose=False)


@pytest.mark.parametrize("value, exc", [(0, ValueError), (-2, ValueError), (2.0, TypeError), ("4", TypeError),
                                        (True, TypeError), (None, TypeError)])
def test_batch_size_validation_names_the_argument(value, exc):
    with pytest.raises(exc, match="batch_size"):
        S.SearchConfig(batch_size=value)
    assert S.SearchConfig(batch_size=np.int64(3)).batch_size == 3
    with pytest.raises(ValueError, match="batch_size"):
        S.make_designer("random", None, batch_size=0)


# --------------------------------------------------------------------------- the designer's batches
class _Dup:
    """A designer that returns the same point for every suggestion of a call."""

    def __init__(self, problem):
        self.problem, self.counts = problem, []

    def update(self, completed, active):
        pass

    def suggest(self, count=1):
        from vizier import pyvizier as vz
        self.counts.append(count)
        p = {pc.name: 0.5 * (pc.bounds[0] + pc.bounds[1]) for pc in self.problem.search_space.parameters}
        return [vz.TrialSuggestion(parameters=p) for _ in range(count)]


def test_suggest_many_replaces_repeats_and_keeps_count():
    from bmm_jax.labels import build_labels
    from bmm_jax.search.designer import SafeDesigner
    base, *_ = TS._tiny()
    space = S.build_space(build_labels(base), S.SearchConfig())
    problem = S.space.problem_statement(space)
    d = _Dup(problem)
    safe = SafeDesigner(d, space, problem, min_request=4)
    out = safe.suggest_many(3)
    assert d.counts == [4] and len(out) == 3                            # asked for 4, kept 3
    assert [s.split(":")[0] for _, s in out] == ["designer", "fallback", "fallback"]
    assert "repeated a point of the same batch" in out[1][1]
    assert len({tuple(sorted(p.items())) for p, _ in out}) == 3
    assert safe.num_fallbacks == 2 and len(safe.latencies) == 1
    with pytest.raises(ValueError, match="count"):
        safe.suggest_many(0)


def test_gp_bandit_batch_gives_distinct_points(tmp_path):
    """The GP bandit's set acquisition (q-UCB): the points of a batch differ (Vizier's top-k of the
    single-point acquisition returns near copies)."""
    base, experts, anchor, _ = TS._tiny(blocks=1)
    prep = bmm_jax.prepare(base, experts, anchor)
    target = prep.params({"rho": 0.3, "scale": 1.1})
    obj = lambda p: -TS._dist(p, target)  # noqa: E731
    cfg = S.SearchConfig(grouping="global", num_trials=4, designer="gp_bandit", batch_size=2, seed=1,
                         acquisition_evaluations=500, trial_padding=8, ard_restarts=1, **FAST)
    res = S.search(prep, obj, cfg, run_dir=str(tmp_path), anchor=anchor, progress=False, verbose=False)
    tr = res.trials[1:]
    assert [t.source for t in tr] == ["seed:anchor", "seed:default"] + ["designer"] * 2
    last = [np.array([t.point[n] for n in sorted(t.point)]) for t in tr[2:4]]   # a batch of the fitted GP
    widths = np.array([6.0, 1.0])                                               # log10 rho, scale boxes
    assert np.max(np.abs(last[0] - last[1]) / widths) > 1e-3
    assert res.best_value >= res.anchor_value


# --------------------------------------------------------------------------- the validation objective
def test_evaluate_batch_matches_numpy_and_single():
    sys.path.insert(0, HERE)
    import test_evaluate as TE
    from bmm_jax import evaluate as E
    ad = TE.dense_adapter()
    heads = TE.heads_for()
    members = [jax.tree_util.tree_map(lambda p, a=a: p * a - 0.1 * (a - 1), ad.params) for a in (1.0, 1.7, -0.6)]
    batch = S.batch.stack_params(members)
    full = E.evaluate_batch(ad, batch, heads, ["p", "q"], "validation", batch_size=16, load=TE.dense_load)
    chunked = E.evaluate_batch(ad, batch, heads, ["p", "q"], "validation", batch_size=16, load=TE.dense_load,
                               members_per_call=2)
    assert full == chunked and len(full) == 3
    for m, params in enumerate(members):
        for t in ("p", "q"):
            x, y = TE.dense_load(t, "validation")
            ref = float(np.mean(np.argmax(TE.numpy_logits(params, heads[t], x), 1) == y))
            assert full[m][t] == ref
        assert full[m] == E.evaluate(ad, params, heads, ["p", "q"], "validation", batch_size=16, load=TE.dense_load)
    with pytest.raises(ValueError, match="members_per_call"):
        E.evaluate_batch(ad, batch, heads, ["p"], "validation", load=TE.dense_load, members_per_call=0)
    # the search's own batched objective over the same pieces
    obj = S.make_batched_objective(adapter=ad, heads=heads, tasks=["p", "q"], validation_examples=None,
                                   members_per_call=2, load=TE.dense_load)
    assert obj.batched is True
    got = obj(batch)
    for m in range(3):
        assert got[m][0] == pytest.approx(np.mean([full[m]["p"], full[m]["q"]]))
        assert got[m][1] == {"acc/p": full[m]["p"], "acc/q": full[m]["q"]}


def test_evaluate_batch_text_model_vmapped_forward():
    """Tiny random BERT (length-sorted, bucket-trimmed, padded batches): the vmapped forward over
    three members equals the HF wrapper's own forward of each member with numpy pooling and head."""
    from bmm_jax import evaluate as E
    from bmm_jax.models.hf import hf_adapter, load_hf_model
    cfg = dict(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
               intermediate_size=24, max_position_embeddings=64)
    model, params = load_hf_model("bert", config=cfg, seed=3)
    ad = hf_adapter("bert", model=model, params=params, max_length=24)
    rng = np.random.default_rng(1)
    n = 21
    lens = rng.integers(2, 25, size=n)
    ids = rng.integers(2, 50, size=(n, 24)).astype(np.int32)
    ids[np.arange(24)[None, :] >= lens[:, None]] = 0
    y = rng.integers(0, 3, n).astype(np.int32)
    head = {"kernel": rng.standard_normal((16, 3)).astype(np.float32),
            "bias": rng.standard_normal(3).astype(np.float32)}
    members = [jax.tree_util.tree_map(lambda p, i=i: p + np.float32(0.05 * i) *
                                      rng.standard_normal(np.shape(p)).astype(np.float32), params) for i in range(3)]
    got = E.evaluate_batch(ad, S.batch.stack_params(members), {"t": head}, ["t"], "test", batch_size=8,
                           load=lambda task, split: (ids, y), members_per_call=2)
    mask = (ids != 0).astype(np.int32)
    for m, prm in enumerate(members):
        with jax.numpy_dtype_promotion("standard"):
            hidden = np.asarray(model(ids, attention_mask=mask, params=prm).last_hidden_state, np.float64)
        feats = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
        ref = feats @ head["kernel"] + head["bias"]
        assert got[m]["t"] == float(np.mean(np.argmax(ref, 1) == y))
    assert len({g["t"] for g in got}) > 1          # the members really differ


# --------------------------------------------------------------------------- kill -9 mid-batch
_CHILD = r"""
import os, sys, time
sys.path.insert(0, {here!r}); sys.path.insert(0, {root!r})
import numpy as np, jax
import test_search as T
import test_search_batched as TB
import bmm_jax, bmm_jax.search as S
base, experts, anchor, _ = T._tiny()
prep = bmm_jax.prepare(base, experts, anchor)
obj = TB.kill_objective(prep, {log!r}, kill_batch={kill_batch})
S.search(prep, None, S.SearchConfig(num_trials={n}, designer="quasi_random", batch_size={b}, jax_cache_dir=None),
         run_dir={run!r}, anchor=anchor, batched_objective=obj, progress=False, verbose=False)
"""


def _member_hash(x) -> str:
    import hashlib
    return hashlib.sha1(np.ascontiguousarray(x).tobytes()).hexdigest()[:16]


def kill_objective(prep, log: str, kill_batch: int | None = None):
    """Batched objective ``-||theta - theta*||^2`` (theta* the merge at rho = 0.3, s = 1.1) that logs
    ``start <hash>`` per member (hash of the member's flattened params) and, at the ``kill_batch``-th
    call with more than one member, announces itself and sleeps (to be killed)."""
    target = prep.params({"rho": 0.3, "scale": 1.1})

    def flat(pb):
        return jnp.concatenate([jnp.reshape(x, (x.shape[0], -1)) for x in jax.tree_util.tree_leaves(pb)], axis=1)

    t = flat(jax.tree_util.tree_map(lambda x: x[None], target))
    calls = []

    def objective(pb):
        f = np.asarray(flat(pb), np.float64)
        with open(log, "a") as fh:
            for row in f:
                fh.write("start " + _member_hash(row) + "\n")
        if f.shape[0] > 1:
            calls.append(1)
            if kill_batch is not None and len(calls) == kill_batch:
                open(log + ".ready", "w").close()
                time.sleep(120)
        return -np.sum((f - np.asarray(t, np.float64)) ** 2, axis=1)

    objective.batched = True
    return objective


def test_resume_after_kill9_mid_batch(tmp_path):
    run, log, n, b, kill_batch = str(tmp_path / "run"), str(tmp_path / "evals.log"), 8, 3, 2
    code = _CHILD.format(here=HERE, root=ROOT, log=log, kill_batch=kill_batch, n=n, b=b, run=run)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
    t0 = time.time()
    while not os.path.exists(log + ".ready"):
        if proc.poll() is not None:
            raise AssertionError("child search exited early: " + proc.stderr.read().decode()[-3000:])
        if time.time() - t0 > 240:
            proc.kill()
            raise AssertionError("child search never reached the kill point")
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    # the killed run: anchor, batch 1 (two seeds + one suggestion) completed; batch 2 left ACTIVE
    from bmm_jax.search.study import SQLiteStudy
    base, experts, anchor, _ = TS._tiny()
    prep = bmm_jax.prepare(base, experts, anchor)
    cfg = S.SearchConfig(num_trials=n, designer="quasi_random", batch_size=b, **FAST)
    space = S.build_space(prep.labels, cfg)
    with SQLiteStudy(run, S.space.problem_statement(space), fingerprint=S.space.fingerprint(space, cfg)) as st:
        states = [r.state for r in st.records()]
    assert states == ["COMPLETED"] * 3 + ["ACTIVE"] * 3

    res = S.search(prep, None, cfg, run_dir=run, anchor=anchor, batched_objective=kill_objective(prep, log),
                   progress=False, verbose=False)
    trials = res.trials[1:]
    assert [t.id for t in trials] == list(range(1, n + 1))
    assert all(t.state == "COMPLETED" for t in trials)
    assert len({tuple(sorted(t.point.items())) for t in trials}) == n          # no point repeated as a trial
    # each stored value is its point's objective, from an independent float64 numpy merge
    for t in trials:
        ref = np_merge(base, experts, anchor, prep.labels, t.point, space)
        tgt = np_merge(base, experts, anchor, prep.labels,
                       {**{g.name + ":log10_rho": math.log10(0.3) for g in space.groups},
                        **{g.name + ":scale": 1.1 for g in space.groups}}, space)
        assert t.value == pytest.approx(-sum(np.sum((ref[p] - tgt[p]) ** 2) for p in ref), rel=1e-3, abs=1e-6)
    starts = open(log).read().split()[1::2]
    # anchor + 8 trials evaluated; only the 3 trials of the killed batch were evaluated twice
    assert len(set(starts)) == n + 1
    assert len(starts) == n + 1 + b
    killed = starts[1 + 3:1 + 3 + b]
    assert all(starts.count(h) == 2 for h in killed)
    assert starts[1 + 3 + b:1 + 3 + 2 * b] == killed                         # re-evaluated first on resume
