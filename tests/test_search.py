"""Tests of the outer level (bmm_jax.search): space, configs, end-to-end, anchor guarantee,
designer fallback, and resume after a real ``kill -9``.

The merge fast path is injected: ``_TinyPrep`` solves each module with ``bmm_jax.solve.solve_anchored``
(a dense Cholesky solve, independent of the search code) from per-module hyper-parameters.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import bmm_jax.search as S
from bmm_jax._tree import leaves_with_paths
from bmm_jax.labels import build_labels
from bmm_jax.solve import solve_anchored

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
FAST = dict(jax_cache_dir=None)


# --------------------------------------------------------------------------- a tiny problem
def _tiny(seed: int = 0, d: int = 4, blocks: int = 2, k: int = 3):
    rng = np.random.default_rng(seed)

    def mk(f):
        return {"encoder": {"layer": {str(i): {
            "attention": {"self": {"query": {"kernel": f((d, d))}, "value": {"kernel": f((d, d))}}},
            "intermediate": {"dense": {"kernel": f((d, 2 * d)), "bias": f((2 * d,))}}}
            for i in range(blocks)}}}

    base = mk(lambda s: rng.normal(size=s).astype(np.float32))
    experts = [jax.tree_util.tree_map(lambda b: b + 0.2 * rng.normal(size=b.shape).astype(np.float32), base)
               for _ in range(k)]
    anchor = jax.tree_util.tree_map(lambda b, *e: (b + 0.3 * sum(x - b for x in e)).astype(np.float32),
                                    base, *experts)
    grams = {}
    for p, leaf in leaves_with_paths(base):
        if leaf.ndim == 2:
            a = rng.normal(size=(k, leaf.shape[0], 3 * leaf.shape[0])).astype(np.float32)
            grams[p] = np.einsum("kin,kjn->kij", a, a) / a.shape[-1]
    return base, experts, anchor, grams


class _TinyPrep:
    """Stand-in for ``bmm_jax.merge.prepare`` (dependency injection): per-module dense solves."""

    def __init__(self, base, experts, anchor, grams):
        self.base, self.experts, self.anchor, self.grams = base, experts, anchor, grams
        self.labels = build_labels(base)
        self.calls = 0

    def params(self, hparams, **extras):
        self.calls += 1
        b = dict(leaves_with_paths(self.base))
        ex = [dict(leaves_with_paths(e)) for e in self.experts]
        an = dict(leaves_with_paths(self.anchor))
        out = []
        for p, leaf in leaves_with_paths(self.base):
            if p in hparams:
                t = np.stack([e[p] - b[p] for e in ex])
                delta = solve_anchored(t, self.grams[p], an[p] - b[p], rho=hparams[p]["rho"],
                                       scale=hparams[p]["scale"])
                out.append((b[p] + np.asarray(delta)).astype(np.float32))
            else:
                out.append(an[p])
        return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(self.base), out)


def _dist(a, b) -> float:
    return float(sum(np.sum((np.asarray(x, np.float64) - np.asarray(y, np.float64)) ** 2)
                     for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b))))


def _hash(params) -> str:
    h = hashlib.sha1()
    for x in jax.tree_util.tree_leaves(params):
        h.update(np.round(np.asarray(x, np.float64), 5).tobytes())
    return h.hexdigest()[:16]


def _target_objective(prep):
    """Validation objective with a known optimum inside the box: -||theta - theta*||^2 with
    theta* the merge at rho = 0.3, s = 1.1 for every module."""
    mods = {l.path for g in S.build_space(prep.labels, S.SearchConfig()).groups for l in g.modules}
    target = prep.params({p: {"rho": 0.3, "scale": 1.1} for p in mods})
    return lambda params: -_dist(params, target)


# --------------------------------------------------------------------------- space
def test_space_groups_and_seed_points():
    base, *_ = _tiny()
    labels = build_labels(base)
    kernels = sorted(p for p, l in leaves_with_paths(base) if l.ndim == 2)
    expect = {
        "global": {"global": kernels},
        "type": {"q": [p for p in kernels if "query" in p], "v": [p for p in kernels if "value" in p],
                 "mlp-in": [p for p in kernels if "intermediate" in p]},
        "block": {f"block{i}": [p for p in kernels if f"layer/{i}/" in p] for i in range(2)},
        "module": {p: [p] for p in kernels},
    }
    for grouping, groups in expect.items():
        sp = S.build_space(labels, S.SearchConfig(grouping=grouping))
        got = {g.name: sorted(m.path for m in g.modules) for g in sp.groups}
        assert got == {k: sorted(v) for k, v in groups.items()}
        assert sp.num_dims == 2 * len(groups)
        a = S.space.seed_point(sp, "anchor")
        assert all(a[f"{g}:log10_rho"] == 2.0 and a[f"{g}:scale"] == 1.0 for g in groups)
        d = S.space.seed_point(sp, "default")
        assert all(d[f"{g}:log10_rho"] == 0.0 and d[f"{g}:scale"] == 1.0 for g in groups)
    sp = S.build_space(labels, S.SearchConfig(extras=("anchor_scale", S.Extra("beta", 0.0, 1.0))))
    assert sp.bounds["anchor_scale"] == (0.5, 1.5) and sp.bounds["beta"] == (0.0, 1.0)
    assert S.space.seed_point(sp, "anchor")["beta"] == 0.5
    # hparams: rho = 10 ** log10 rho, expanded to every module of the group
    a = S.space.seed_point(sp, "anchor")
    hp = S.space.group_hparams(sp, {**a, **{f"{g}:log10_rho": -1.0 for g in expect['type']}})
    assert hp["q"]["rho"] == pytest.approx(0.1)
    mod = S.space.module_hparams(sp, hp)
    assert set(mod) == set(kernels)


def test_callable_subpackage():
    import bmm_jax
    import bmm_jax.search
    assert callable(bmm_jax.search) and bmm_jax.search.search is S.search
    assert bmm_jax.search.SearchConfig is S.SearchConfig


# --------------------------------------------------------------------------- bad configs
@pytest.mark.parametrize("kwargs, exc, msg", [
    (dict(grouping="layer"), ValueError, "unknown grouping"),
    (dict(num_trials=0), ValueError, "num_trials must be positive"),
    (dict(num_trials=-3), ValueError, "num_trials must be positive"),
    (dict(num_trials=2.5), TypeError, "num_trials must be an int"),
    (dict(log10_rho_range=(2.0, -4.0)), ValueError, "inverted"),
    (dict(log10_rho_range=(1.0, 1.0)), ValueError, "inverted"),
    (dict(scale_range=(1.5, 0.5)), ValueError, "scale_range"),
    (dict(log10_rho_range=(-4.0, float("inf"))), ValueError, "finite"),
    (dict(designer="cmaes"), ValueError, "unknown designer"),
    (dict(objective="f1"), ValueError, "unknown objective"),
    (dict(extras=("gamma",)), ValueError, "unknown extra"),
    (dict(seed_points=("anchor", "best")), ValueError, "unknown seed point"),
])
def test_bad_config_errors(kwargs, exc, msg):
    with pytest.raises(exc, match=msg):
        S.SearchConfig(**kwargs)
    with pytest.raises(ValueError, match="inverted"):
        S.Extra("anchor_scale", 1.0, 0.5)


def test_bad_search_inputs(tmp_path):
    base, experts, anchor, grams = _tiny()
    prep = _TinyPrep(base, experts, anchor, grams)
    obj = lambda p: 0.0
    # a label tree that selects nothing: an empty search space
    empty = build_labels(base, exclude=["kernel"])
    with pytest.raises(ValueError, match="empty search space"):
        S.search(params_fn=prep.params, labels=empty, objective=obj, run_dir=str(tmp_path / "a"),
                 progress=False, verbose=False)
    with pytest.raises(ValueError, match="needs an objective"):
        S.search(prep, None, run_dir=str(tmp_path / "b"), progress=False, verbose=False)
    with pytest.raises(ValueError, match="expert_accuracy"):
        S.search(prep, obj, S.SearchConfig(objective="normalized"), run_dir=str(tmp_path / "c"),
                 progress=False, verbose=False)

    def no_extras(hparams):
        return prep.params(hparams)
    with pytest.raises(ValueError, match="anchor_scale"):
        S.search(params_fn=no_extras, labels=prep.labels, objective=obj,
                 config=S.SearchConfig(extras=("anchor_scale",)), run_dir=str(tmp_path / "d"),
                 progress=False, verbose=False)
    with pytest.raises(ValueError, match="merge fast path"):
        S.search(None, obj, run_dir=str(tmp_path / "e"), progress=False, verbose=False)
    # a run directory holds one search: another grouping is refused
    cfg = S.SearchConfig(num_trials=1, designer="quasi_random", **FAST)
    S.search(prep, obj, cfg, run_dir=str(tmp_path / "f"), anchor=anchor, progress=False, verbose=False)
    with pytest.raises(ValueError, match="different search space"):
        S.search(prep, obj, S.SearchConfig(grouping="block", num_trials=1, designer="quasi_random", **FAST),
                 run_dir=str(tmp_path / "f"), anchor=anchor, progress=False, verbose=False)


# --------------------------------------------------------------------------- end to end
def test_tiny_end_to_end_gp(tmp_path):
    base, experts, anchor, grams = _tiny()
    prep = _TinyPrep(base, experts, anchor, grams)
    objective = _target_objective(prep)
    anchor_value = objective(anchor)
    cfg = S.SearchConfig(num_trials=5, designer="gp_bandit", seed=1, acquisition_evaluations=2000,
                         trial_padding=16, **FAST)
    res = S.search(prep, objective, cfg, run_dir=str(tmp_path), anchor=anchor, progress=False, verbose=False)
    assert res.anchor_value == pytest.approx(anchor_value)
    assert res.best_value >= anchor_value
    # the shared default (rho = 1) is already much closer to theta* than the anchor
    assert res.best_value > anchor_value and res.best_trial > 0
    # the returned params really score best_value (recomputed independently of the search)
    assert objective(res.params) == pytest.approx(res.best_value, rel=1e-5)
    assert [t.id for t in res.trials] == [0, 1, 2, 3, 4, 5]
    assert [t.source for t in res.trials[:3]] == ["anchor", "seed:anchor", "seed:default"]
    assert all(t.state == "COMPLETED" for t in res.trials)
    assert res.trials[1].point["q:log10_rho"] == 2.0 and res.trials[2].point["q:scale"] == 1.0
    vals = [t.value for t in res.trials]
    np.testing.assert_allclose(res.history, np.maximum.accumulate(vals))
    assert res.best_value == max(vals)
    best = res.trials[res.best_trial]
    assert res.hparams["v"]["rho"] == pytest.approx(10 ** best.point["v:log10_rho"])
    # the anchor-equivalent seed is close to, but not better than, the exact anchor here
    assert abs(res.trials[1].value - anchor_value) <= 0.05 * abs(anchor_value)
    for f in ("groups.json", "groups.txt", "trials.json", "trials.csv", "best.json", "convergence.png",
              "hparams_by_depth.png", "vizier.db"):
        assert os.path.getsize(tmp_path / f) > 0, f
    rows = json.loads((tmp_path / "trials.json").read_text())
    assert len(rows) == 6 and rows[-1]["best_so_far"] == pytest.approx(res.best_value)
    assert len((tmp_path / "trials.csv").read_text().strip().splitlines()) == 7
    groups = json.loads((tmp_path / "groups.json").read_text())
    assert sorted(groups["groups"]) == ["mlp-in", "q", "v"]
    # rerunning a finished study evaluates nothing new
    n = prep.calls
    res2 = S.search(prep, objective, cfg, run_dir=str(tmp_path), anchor=anchor, progress=False, verbose=False)
    assert prep.calls == n + 1  # only the final rebuild of the best params
    assert res2.best_value == res.best_value and len(res2.trials) == 6


def test_anchor_returned_when_nothing_beats_it(tmp_path):
    base, experts, anchor, grams = _tiny()
    prep = _TinyPrep(base, experts, anchor, grams)
    objective = lambda p: -_dist(p, anchor)  # the exact anchor is the unique optimum (0)
    res = S.search(prep, objective, S.SearchConfig(num_trials=3, designer="quasi_random", **FAST),
                   run_dir=str(tmp_path), anchor=anchor, progress=False, verbose=False)
    assert res.best_trial == 0 and res.hparams is None and res.best_value == 0.0
    assert res.params is anchor
    assert all(t.value < 0 for t in res.trials[1:])
    assert json.loads((tmp_path / "best.json").read_text())["is_anchor"] is True


def test_normalized_objective_and_infeasible_trial(tmp_path):
    base, experts, anchor, grams = _tiny()
    prep = _TinyPrep(base, experts, anchor, grams)
    calls = []

    def objective(params):  # per-task "accuracies"; the 2nd Vizier trial returns NaN
        calls.append(1)
        d = _dist(params, anchor)
        return {"a": 0.5 + 0.1 * math.exp(-d), "b": float("nan") if len(calls) == 3 else 0.4}

    res = S.search(prep, objective, S.SearchConfig(num_trials=3, designer="quasi_random", objective="normalized", **FAST),
                   run_dir=str(tmp_path), anchor=anchor, expert_accuracy={"a": 0.8, "b": 0.5},
                   progress=False, verbose=False)
    assert res.anchor_value == pytest.approx(((0.6 / 0.8) + (0.4 / 0.5)) / 2)
    states = [t.state for t in res.trials]
    assert states == ["COMPLETED", "COMPLETED", "INFEASIBLE", "COMPLETED"]
    assert res.trials[1].metrics["norm/b"] == pytest.approx(0.8)
    sp = S.build_space(prep.labels, S.SearchConfig())
    p1 = prep.params(S.space.module_hparams(sp, S.space.group_hparams(sp, res.trials[1].point)))
    assert res.trials[1].metrics["acc/a"] == pytest.approx(0.5 + 0.1 * math.exp(-_dist(p1, anchor)))
    assert res.trials[1].value == pytest.approx((res.trials[1].metrics["acc/a"] / 0.8 + 0.8) / 2)


# --------------------------------------------------------------------------- designer fallback
class _BadDesigner:
    """Returns an empty suggestion, a NaN one, an out-of-box one, then raises, in turn."""

    def __init__(self, problem, seed=0):
        self.problem, self.n, self.fed = problem, 0, 0

    def update(self, completed, active):
        self.fed += len(completed.trials)

    def suggest(self, count=1):
        from vizier import pyvizier as vz
        self.n += 1
        names = [p.name for p in self.problem.search_space.parameters]
        kind = self.n % 4
        if kind == 1:
            return [vz.TrialSuggestion(parameters={})]
        if kind == 2:
            return [vz.TrialSuggestion(parameters={n: float("nan") for n in names})]
        if kind == 3:
            return [vz.TrialSuggestion(parameters={n: 1e6 for n in names})]
        raise FloatingPointError("NaN features from the acquisition optimiser")


def test_empty_suggestion_falls_back(tmp_path):
    base, experts, anchor, grams = _tiny()
    prep = _TinyPrep(base, experts, anchor, grams)
    made = []

    def factory(problem, *, seed):
        made.append(_BadDesigner(problem, seed))
        return made[-1]

    res = S.search(prep, _target_objective(prep), S.SearchConfig(num_trials=7, **FAST), run_dir=str(tmp_path),
                   anchor=anchor, designer_factory=factory, progress=False, verbose=False)
    vz_trials = res.trials[1:]
    assert len(vz_trials) == 7 and all(t.state == "COMPLETED" for t in vz_trials)
    assert [t.source.split(":")[0] for t in vz_trials] == ["seed", "seed"] + ["fallback"] * 5
    sp = S.build_space(prep.labels, S.SearchConfig())
    for t in vz_trials:  # every recorded point is complete, finite and inside the box
        assert set(t.point) == set(sp.bounds)
        for n, (lo, hi) in sp.bounds.items():
            assert lo <= t.point[n] <= hi and math.isfinite(t.point[n])
    assert len({json.dumps(t.point, sort_keys=True) for t in vz_trials}) == 7  # no repeated point
    assert made[0].fed == 7  # every finished trial was fed to the designer once


# --------------------------------------------------------------------------- resume after kill -9
_CHILD = r"""
import os, sys, time
sys.path.insert(0, {here!r}); sys.path.insert(0, {root!r})
import test_search as T
import bmm_jax.search as S
base, experts, anchor, grams = T._tiny()
prep = T._TinyPrep(base, experts, anchor, grams)
obj = T._target_objective(prep)
log = {log!r}
def objective(params):
    h = T._hash(params)
    with open(log, "a") as f: f.write("start " + h + "\n")
    n = sum(1 for l in open(log) if l.startswith("start"))
    if n == {kill_at}:
        open(log + ".ready", "w").close()
        time.sleep(120)  # killed here, mid-evaluation
    v = obj(params)
    with open(log, "a") as f: f.write("end " + h + "\n")
    return v
S.search(prep, objective, S.SearchConfig(num_trials={n}, designer="quasi_random", jax_cache_dir=None),
         run_dir={run!r}, anchor=anchor, progress=False, verbose=False)
"""


def test_resume_after_kill9(tmp_path):
    run, log, n, kill_at = str(tmp_path / "run"), str(tmp_path / "evals.log"), 6, 4
    code = _CHILD.format(here=HERE, root=ROOT, log=log, kill_at=kill_at, n=n, run=run)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
    t0 = time.time()
    while not os.path.exists(log + ".ready"):
        if proc.poll() is not None:
            raise AssertionError("child search exited early: " + proc.stderr.read().decode()[-3000:])
        if time.time() - t0 > 80:
            proc.kill()
            raise AssertionError("child search never reached the kill point")
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL

    # resume in this process with the same run directory
    base, experts, anchor, grams = _tiny()
    prep = _TinyPrep(base, experts, anchor, grams)
    obj = _target_objective(prep)

    def objective(params):
        h = _hash(params)
        with open(log, "a") as f:
            f.write("start " + h + "\n")
        v = obj(params)
        with open(log, "a") as f:
            f.write("end " + h + "\n")
        return v

    res = S.search(prep, objective, S.SearchConfig(num_trials=n, designer="quasi_random", **FAST),
                   run_dir=run, anchor=anchor, progress=False, verbose=False)
    trials = res.trials[1:]
    assert [t.id for t in trials] == list(range(1, n + 1))
    assert all(t.state == "COMPLETED" for t in trials)
    lines = open(log).read().split()
    starts = [h for k, h in zip(lines[::2], lines[1::2]) if k == "start"]
    ends = [h for k, h in zip(lines[::2], lines[1::2]) if k == "end"]
    # the hashes of the stored trials' params, recomputed independently
    sp = S.build_space(prep.labels, S.SearchConfig())
    hashes = [_hash(prep.params(S.space.module_hparams(sp, S.space.group_hparams(sp, t.point)))) for t in trials]
    assert len(set(hashes)) == n
    killed = starts[kill_at - 1]  # evaluation #4 = anchor, trial 1, trial 2, then trial 3
    assert killed == hashes[2]
    assert sorted(ends) == sorted([_hash(anchor)] + hashes)  # every trial finished exactly once
    assert starts.count(killed) == 2  # the interrupted trial was re-evaluated once, same point
    assert len(starts) == n + 2  # nothing else repeated (the anchor included)


# --------------------------------------------------------------------------- a damaged or missing study
def _run_files(run) -> dict:
    """{name: bytes} of every file of a run directory but its lock (an independent record)."""
    return {f: open(os.path.join(run, f), "rb").read() for f in sorted(os.listdir(run)) if f != ".search.lock"}


def _finished_run(tmp_path, name="run"):
    base, experts, anchor, grams = _tiny()
    prep = _TinyPrep(base, experts, anchor, grams)
    run = str(tmp_path / name)
    cfg = S.SearchConfig(num_trials=2, designer="quasi_random", **FAST)
    S.search(prep, lambda p: 0.0, cfg, run_dir=run, anchor=anchor, progress=False, verbose=False)
    return prep, anchor, cfg, run


@pytest.mark.parametrize("damage", ["truncated", "garbage", "header_only", "zeroed_pages"])
def test_damaged_study_is_named_and_nothing_is_rewritten(tmp_path, damage):
    prep, anchor, cfg, run = _finished_run(tmp_path)
    db = os.path.join(run, "vizier.db")
    raw = open(db, "rb").read()
    if damage == "truncated":
        bad = raw[: len(raw) // 2]
    elif damage == "garbage":
        bad = os.urandom(len(raw))
    elif damage == "header_only":
        bad = raw[:100]
    else:                                  # every page after the first zeroed
        bad = raw[:4096] + bytes(len(raw) - 4096)
    open(db, "wb").write(bad)
    before = _run_files(run)
    with pytest.raises(S.StudyError, match=r"search study .*run/vizier\.db .*new run directory") as e:
        S.search(prep, lambda p: 0.0, cfg, run_dir=run, anchor=anchor, progress=False, verbose=False)
    assert isinstance(e.value, ValueError) and len(str(e.value).splitlines()) == 1
    assert _run_files(run) == before       # groups.json, trials.json, vizier.db: untouched


@pytest.mark.parametrize("how", ["deleted", "zero_length"])
def test_missing_study_beside_old_reports_is_refused(tmp_path, how):
    prep, anchor, cfg, run = _finished_run(tmp_path)
    db = os.path.join(run, "vizier.db")
    if how == "deleted":
        os.remove(db)
    else:
        open(db, "wb").close()
    before = _run_files(run)
    state = "missing" if how == "deleted" else "empty"
    with pytest.raises(S.StudyError, match=rf"vizier\.db is {state}, but .* holds the reports of an earlier search "
                                           r"\(trials\.json, trials\.csv, best\.json\)"):
        S.search(prep, lambda p: 0.0, cfg, run_dir=run, anchor=anchor, progress=False, verbose=False)
    assert _run_files(run) == before
    # with the old reports moved aside, a new study starts (an empty database file is fine then)
    for f in ("trials.json", "trials.csv", "best.json"):
        os.rename(os.path.join(run, f), os.path.join(run, f + ".old"))
    res = S.search(prep, lambda p: 1.0, cfg, run_dir=run, anchor=anchor, progress=False, verbose=False)
    assert [t.id for t in res.trials] == [0, 1, 2] and res.trials[1].value == 1.0


def test_refused_rerun_leaves_the_run_directory_untouched(tmp_path):
    prep, anchor, cfg, run = _finished_run(tmp_path)
    before = _run_files(run)
    other = S.SearchConfig(grouping="block", num_trials=2, designer="quasi_random", **FAST)
    with pytest.raises(S.StudyError, match="different search space"):
        S.search(prep, lambda p: 0.0, other, run_dir=run, anchor=anchor, progress=False, verbose=False)
    assert _run_files(run) == before       # groups.json still describes the stored study
    groups = json.loads(before["groups.json"])
    assert groups == json.loads(json.dumps(S.space.groups_dict(S.build_space(prep.labels, cfg))))
    f = tmp_path / "a_file"
    f.write_text("x")
    with pytest.raises(ValueError, match="exists and is not a directory"):
        S.search(prep, lambda p: 0.0, cfg, run_dir=str(f), anchor=anchor, progress=False, verbose=False)
    assert f.read_text() == "x"


def test_live_run_directory_is_refused(tmp_path):
    import fcntl
    prep, anchor, cfg, run = _finished_run(tmp_path)
    before = _run_files(run)
    with open(os.path.join(run, ".search.lock"), "a+") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)       # another live process
        with pytest.raises(S.RunDirInUse, match="in use by another live search"):
            S.search(prep, lambda p: 0.0, cfg, run_dir=run, anchor=anchor, progress=False, verbose=False)
    assert _run_files(run) == before


# --------------------------------------------------------------------------- kill -9 at a random point
_RANDOM_CHILD = r"""
import os, sys, time, random
sys.path.insert(0, {here!r}); sys.path.insert(0, {root!r})
import test_search as T
import bmm_jax.search as S
base, experts, anchor, grams = T._tiny()
prep = T._TinyPrep(base, experts, anchor, grams)
obj = T._target_objective(prep)
log = {log!r}
rng = random.Random({seed})
def objective(params):
    h = T._hash(params)
    with open(log, "a") as f: f.write("start " + h + "\n")
    time.sleep(rng.uniform(0.02, 0.08))
    v = obj(params)
    with open(log, "a") as f: f.write("end " + h + "\n")
    return v
S.search(prep, objective, S.SearchConfig(num_trials={n}, designer="quasi_random", jax_cache_dir=None),
         run_dir={run!r}, anchor=anchor, progress=False, verbose=False)
"""


def test_resume_after_kill9_at_random_points(tmp_path):
    """Two ``kill -9`` at random moments (inside an evaluation, a datastore write, the designer...),
    then a resume: every trial id 1..n completed once with a distinct point, at most one
    evaluation per kill repeated (the trial left ACTIVE), nothing lost."""
    import random
    run, log, n = str(tmp_path / "run"), str(tmp_path / "evals.log"), 12
    rng = random.Random()
    seed = rng.randrange(1 << 30)
    rng.seed(seed)
    kills = 0
    for drill in range(2):
        code = _RANDOM_CHILD.format(here=HERE, root=ROOT, log=log, n=n, run=run, seed=seed + drill)
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                env={**os.environ, "JAX_PLATFORMS": "cpu"})
        t0 = time.time()
        have = sum(1 for l in open(log)) if os.path.exists(log) else 0
        while (sum(1 for l in open(log)) if os.path.exists(log) else 0) == have:   # it started evaluating
            if proc.poll() is not None or time.time() - t0 > 80:
                proc.kill()
                raise AssertionError("child search did not start: " + proc.stderr.read().decode()[-3000:])
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.3))
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait()
    assert kills >= 1, f"seed {seed}: the searches finished before any kill"
    base, experts, anchor, grams = _tiny()
    prep = _TinyPrep(base, experts, anchor, grams)
    obj = _target_objective(prep)

    def objective(params):
        h = _hash(params)
        with open(log, "a") as f:
            f.write("start " + h + "\n")
        v = obj(params)
        with open(log, "a") as f:
            f.write("end " + h + "\n")
        return v

    res = S.search(prep, objective, S.SearchConfig(num_trials=n, designer="quasi_random", **FAST),
                   run_dir=run, anchor=anchor, progress=False, verbose=False)
    trials = res.trials[1:]
    msg = f"seed {seed}, {kills} kills"
    assert [t.id for t in trials] == list(range(1, n + 1)), msg
    assert all(t.state == "COMPLETED" for t in trials), msg
    sp = S.build_space(prep.labels, S.SearchConfig())
    hashes = [_hash(prep.params(S.space.module_hparams(sp, S.space.group_hparams(sp, t.point)))) for t in trials]
    assert len(set(hashes)) == n, msg                           # no point repeated as a new trial
    for t, h in zip(trials, hashes):                            # each stored value is its point's objective
        assert t.value == pytest.approx(obj(prep.params(S.space.module_hparams(sp, S.space.group_hparams(sp, t.point)))))
    words = open(log).read().split()
    starts = [h for k, h in zip(words[::2], words[1::2]) if k == "start"]
    repeated = len(starts) - len(set(starts))
    assert set(starts) == set(hashes) | {_hash(anchor)}, msg      # nothing evaluated that is not a trial
    assert repeated <= kills, msg                               # at most the interrupted evaluation, per kill


# --------------------------------------------------------------------------- the real fast path
# A tiny residual "transformer-like" MLP with BERT-style paths (q, v, mlp-in, mlp-out per block),
# K = 3 classification tasks, experts fine-tuned from a random base with Adam, each with its own
# head; the objective is mean validation accuracy computed in numpy (independent of bmm_jax).
_D, _C, _K, _BLOCKS = 8, 3, 3, 2


def _np_forward(params, x):
    h = np.asarray(x, np.float64)
    for i in range(_BLOCKS):
        b = {k: v for k, v in params["encoder"]["layer"][str(i)].items()}
        q = np.asarray(b["attention"]["self"]["query"]["kernel"], np.float64)
        v = np.asarray(b["attention"]["self"]["value"]["kernel"], np.float64)
        h = h + np.tanh(h @ q) * (h @ v)
        wi = np.asarray(b["intermediate"]["dense"]["kernel"], np.float64)
        bi = np.asarray(b["intermediate"]["dense"]["bias"], np.float64)
        wo = np.asarray(b["output"]["dense"]["kernel"], np.float64)
        h = h + np.maximum(h @ wi + bi, 0.0) @ wo
    return h


def _np_accuracy(params, head, x, y) -> float:
    logits = _np_forward(params, x) @ np.asarray(head["kernel"], np.float64) + np.asarray(head["bias"], np.float64)
    return float(np.mean(np.argmax(logits, axis=1) == y))


def _jax_forward(params, x):
    import jax.numpy as jnp
    h = x
    for i in range(_BLOCKS):
        b = params["encoder"]["layer"][str(i)]
        h = h + jnp.tanh(h @ b["attention"]["self"]["query"]["kernel"]) * (h @ b["attention"]["self"]["value"]["kernel"])
        h = h + jax.nn.relu(h @ b["intermediate"]["dense"]["kernel"] + b["intermediate"]["dense"]["bias"]) \
            @ b["output"]["dense"]["kernel"]
    return h


_TASKS_CACHE = {}


def _tiny_tasks():
    """(base, experts, heads, val [(x, y)] per task); built once per test session (~1 s)."""
    if "v" in _TASKS_CACHE:
        return _TASKS_CACHE["v"]
    import jax.numpy as jnp
    import optax
    rng = np.random.default_rng(7)
    f32 = lambda *s, sc=1.0: (sc * rng.normal(size=s)).astype(np.float32)
    base = {"encoder": {"layer": {str(i): {
        "attention": {"self": {"query": {"kernel": f32(_D, _D, sc=0.3)}, "value": {"kernel": f32(_D, _D, sc=0.3)}}},
        "intermediate": {"dense": {"kernel": f32(_D, 2 * _D, sc=0.3), "bias": np.zeros(2 * _D, np.float32)}},
        "output": {"dense": {"kernel": f32(2 * _D, _D, sc=0.2)}}} for i in range(_BLOCKS)}}}
    data = []
    for k in range(_K):
        mu, a = f32(_D), f32(_D, _C)
        x = (mu + f32(384, _D)).astype(np.float32)
        y = np.argmax(np.tanh(x @ f32(_D, _D)) @ a + 0.5 * x @ a, axis=1)
        data.append((x[:256], y[:256], x[256:], y[256:]))
    opt = optax.adam(1e-2)

    def loss(p, x, y):
        logits = _jax_forward(p["enc"], x) @ p["head"]["kernel"] + p["head"]["bias"]
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))

    @jax.jit
    def train(p, x, y):
        def step(c, _):
            p, s = c
            g = jax.grad(loss)(p, x, y)
            u, s = opt.update(g, s, p)
            return (optax.apply_updates(p, u), s), None
        (p, _), _ = jax.lax.scan(step, (p, opt.init(p)), None, length=150)
        return p

    experts, heads = [], {}
    for k, (x, y, _, _) in enumerate(data):
        head = {"kernel": f32(_D, _C, sc=0.3), "bias": np.zeros(_C, np.float32)}
        with jax.numpy_dtype_promotion("standard"):  # optax's Adam mixes int32 counts and floats
            p = train({"enc": base, "head": head}, x, y)
        experts.append(jax.tree_util.tree_map(np.asarray, p["enc"]))
        heads[f"t{k}"] = jax.tree_util.tree_map(np.asarray, p["head"])
    val = {f"t{k}": (d[2], d[3]) for k, d in enumerate(data)}
    _TASKS_CACHE["v"] = base, experts, heads, val
    return _TASKS_CACHE["v"]


def _val_objective(heads, val):
    return lambda params: {t: _np_accuracy(params, heads[t], x, y) for t, (x, y) in val.items()}


_COMPILES: list = []
jax.monitoring.register_event_duration_secs_listener(
    lambda name, secs, **kw: _COMPILES.append(name) if name.endswith("backend_compile_duration") else None)


def test_end_to_end_real_prepare(tmp_path):
    import bmm_jax
    from bmm_jax import anchors
    base, experts, heads, val = _tiny_tasks()
    assert all(_np_accuracy(e, heads[f"t{k}"], *val[f"t{k}"]) > 0.6 for k, e in enumerate(experts))
    anchor = anchors.task_arithmetic(base, experts)
    prep = bmm_jax.prepare(base, experts, anchor)  # data-free Grams, isotropic eigen fast path
    objective = _val_objective(heads, val)
    anchor_value = float(np.mean(list(objective(anchor).values())))
    cfg = S.SearchConfig(num_trials=6, designer="quasi_random", extras=("anchor_scale",), **FAST)
    res = bmm_jax.search(prep, objective, cfg, run_dir=str(tmp_path), anchor=anchor, progress=False,
                         verbose=False)
    # each trial is a fast-path re-solve: once warm, new hyper-parameter values compile nothing
    sp = S.build_space(prep.labels, cfg)
    hps = [S.space.module_hparams(sp, S.space.group_hparams(sp, t.point)) for t in res.trials[-2:]]
    prep.params(hps[0], anchor_scale=0.8)
    n0 = len(_COMPILES)
    prep.params(hps[1], anchor_scale=0.7)
    prep.params({p: {"rho": 2 * h["rho"], "scale": h["scale"]} for p, h in hps[0].items()}, anchor_scale=1.3)
    assert len(_COMPILES) == n0
    assert res.anchor_value == pytest.approx(anchor_value)
    assert res.best_value >= anchor_value
    assert [t.source for t in res.trials[:3]] == ["anchor", "seed:anchor", "seed:default"]
    # the anchor-equivalent seed (rho = 100, anchor_scale = 1) behaves like the anchor
    assert abs(res.trials[1].value - anchor_value) <= 2.5 / len(next(iter(val.values()))[1])
    # the returned params score best_value, recomputed independently
    got = objective(res.params)
    assert float(np.mean(list(got.values()))) == pytest.approx(res.best_value)
    if res.best_trial:
        best = res.trials[res.best_trial]
        assert res.extras == {"anchor_scale": pytest.approx(best.point["anchor_scale"])}
        assert set(res.hparams) == {"q", "v", "mlp-in", "mlp-out"}
        rebuilt = prep.params({k: v for k, v in res.hparams.items()}, anchor_scale=res.extras["anchor_scale"])
        assert _dist(rebuilt, res.params) == pytest.approx(0.0, abs=1e-8)
    assert os.path.exists(res.study) and res.study.endswith("vizier.db")


def test_beta_extra_needs_hybrid_wrapper(tmp_path):
    import bmm_jax
    from bmm_jax import anchors
    from bmm_jax.grams.data_free import data_free
    from bmm_jax.grams.hybrid import hybrid
    base, experts, heads, val = _tiny_tasks()
    anchor = anchors.task_arithmetic(base, experts)
    objective = _val_objective(heads, val)
    cfg = S.SearchConfig(num_trials=4, designer="quasi_random", extras=("beta",), **FAST)
    with pytest.raises(ValueError, match="HybridPrepared"):
        bmm_jax.search(bmm_jax.prepare(base, experts, anchor), objective, cfg, run_dir=str(tmp_path / "a"),
                       anchor=anchor, progress=False, verbose=False)
    # stand-in few-shot data Grams: random rank-16 PSD matrices per module and task
    labels = bmm_jax.build_labels(base)
    data = {}
    rng = np.random.default_rng(3)
    for p, leaf in leaves_with_paths(base):
        if leaf.ndim == 2:
            a = rng.normal(size=(_K, leaf.shape[0], 16)).astype(np.float32)
            data[p] = np.einsum("kin,kjn->kij", a, a) / 16.0
    hp = S.HybridPrepared(base, experts, anchor, data, labels=labels)
    res = S.search(hp, objective, cfg, run_dir=str(tmp_path / "b"), anchor=anchor, progress=False, verbose=False)
    assert res.best_value >= res.anchor_value
    betas = [t.point["beta"] for t in res.trials[1:]]
    assert betas[:2] == [0.5, 0.5] and len(set(betas)) == 3  # seeds share beta = 0.5
    # one eigen factorisation per distinct beta (+ the final rebuild of the best trial's params,
    # whose beta may have left the 2-entry cache)
    assert 3 <= hp.num_factorizations <= 4
    # a trial's params equal an independent dense merge with hybrid Grams at that beta
    t = res.trials[-1]
    sp = S.build_space(labels, cfg)
    mod = S.space.module_hparams(sp, S.space.group_hparams(sp, t.point))
    want = bmm_jax.merge(base, experts, anchor, hybrid(hp.data_grams, data_free(base, experts, labels), t.point["beta"]),
                         mod, labels=labels).params
    got = hp.params(mod, beta=t.point["beta"])
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-3, atol=2e-4)
    with pytest.raises(ValueError, match="beta must be in"):
        hp.params(mod, beta=1.5)
