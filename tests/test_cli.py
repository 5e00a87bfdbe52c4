"""Tests of the entry points ``bmm-merge`` and ``bmm-experiment`` on tiny configurations: they write
the files they promise (checked against an independent numpy computation of the BMM closed form),
and fail with one clear line and a non-zero status on bad arguments."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from bmm_jax.cli import experiment as cli_experiment
from bmm_jax.cli import merge as cli_merge

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import test_experiment as TE  # noqa: E402  (the tiny benchmark shared with test_experiment.py)

BERT = dict(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
            max_position_embeddings=16, pad_token_id=0)
Q = ("encoder", "layer", "0", "attention", "self", "query", "kernel")


def _get(tree, path):
    for p in path:
        tree = tree[p]
    return np.asarray(tree)


def _perturb(params, seed, sigma=0.05):
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda x: (np.asarray(x) + sigma * rng.normal(size=np.shape(x))).astype(np.float32),
                                  params)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Tiny random BERT base + 3 experts as HF Flax folders and as orbax checkpoints with heads,
    calibration (.npy token ids) and validation (.npz) files, a mismatched expert."""
    from bmm_jax import checkpoint
    from bmm_jax.models.hf import load_hf_model
    d = tmp_path_factory.mktemp("models")
    model, base = load_hf_model("bert", config=BERT, seed=0)
    base = jax.tree_util.tree_map(np.asarray, base)
    experts = [_perturb(base, k + 1) for k in range(3)]
    out = {"dir": d, "base_params": base, "expert_params": experts}
    with jax.numpy_dtype_promotion("standard"):
        model.save_pretrained(str(d / "base_hf"), params=base)
        for k, e in enumerate(experts):
            model.save_pretrained(str(d / f"hf{k}"), params=e)
    rng = np.random.default_rng(0)
    classes = (2, 3, 2)
    for k, e in enumerate(experts):
        head = {"kernel": rng.normal(size=(16, classes[k])).astype(np.float32),
                "bias": np.zeros(classes[k], np.float32)}
        checkpoint.save(str(d / f"orbax{k}"), {"params": e, "head": head})
        ids = rng.integers(1, 40, size=(12, 8)).astype(np.int32)
        ids[:, 6:] = 0
        np.save(d / f"cal{k}.npy", ids)
        np.savez(d / f"val{k}.npz", inputs=ids, labels=rng.integers(0, classes[k], size=12).astype(np.int32))
    np.savez(d / "val_bad.npz", inputs=ids, labels=np.array([0, 1, 5] * 4, np.int32))   # 5 >= 2 classes
    odd, odd_params = load_hf_model("bert", config={**BERT, "intermediate_size": 24}, seed=0)
    with jax.numpy_dtype_promotion("standard"):
        odd.save_pretrained(str(d / "hf_odd"), params=jax.tree_util.tree_map(np.asarray, odd_params))
    return out


def _run(argv, capsys):
    rc = cli_merge.main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


# ----------------------------------------------------------------------------- bmm-merge
def test_merge_hf_data_free_matches_numpy(models, capsys, tmp_path):
    from bmm_jax import checkpoint
    d = models["dir"]
    out = tmp_path / "merged"
    rc, so, se = _run(["--base", d / "base_hf", "--experts", d / "hf0", d / "hf1", d / "hf2",
                       "--anchor", "task_arithmetic", "--anchor-scale", "0.5", "--rho", "0.3", "--scale", "1.1",
                       "--out", out, "--quiet"], capsys)
    assert rc == 0, se
    assert "wrote" in so and os.path.isdir(out) and os.path.isfile(str(out) + ".json")
    merged = checkpoint.load(str(out))
    rep = json.load(open(str(out) + ".json"))
    assert rep["anchor"] == {"method": "task_arithmetic", "scale": 0.5, "scale_grid": None}
    assert rep["hparams"] == {"rho": 0.3, "scale": 1.1} and rep["grams"]["mode"] == "data_free"
    assert rep["checksum"] == checkpoint.tree_checksum(merged) and rep["modules"]["regressed"] == 12
    # independent reference: method.md §2 with data-free Grams, in float64 numpy, one module
    w0 = _get(models["base_params"], Q).astype(np.float64)
    t = [(_get(e, Q).astype(np.float64) - w0) for e in models["expert_params"]]
    g = [tk @ tk.T / np.sum(tk ** 2) for tk in t]
    s = sum(g)
    b = sum(gk @ tk for gk, tk in zip(g, t))
    ta = 0.5 * sum(t)
    lam = 0.3 * np.trace(s) / s.shape[0]
    want = w0 + 1.1 * np.linalg.solve(s + lam * np.eye(s.shape[0]), b + lam * ta)
    np.testing.assert_allclose(_get(merged, Q), want, rtol=2e-4, atol=2e-5)
    # a carried leaf (LayerNorm) comes from the anchor: theta_0 + 0.5 sum tau
    ln = ("encoder", "layer", "1", "output", "LayerNorm", "scale")
    ref = _get(models["base_params"], ln) + 0.5 * sum(_get(e, ln) - _get(models["base_params"], ln)
                                                      for e in models["expert_params"])
    np.testing.assert_allclose(_get(merged, ln), ref, rtol=1e-5, atol=1e-6)


def test_merge_orbax_activations_search(models, capsys, tmp_path):
    from bmm_jax import checkpoint
    d = models["dir"]
    out = tmp_path / "merged"
    rc, so, se = _run(["--base", d / "base_hf", "--experts", d / "orbax0", d / "orbax1", d / "orbax2",
                       "--anchor", "tsv", "--anchor-scale-grid", "0.5", "1.0", "--grams", "activations",
                       "--calibration", d / "cal0.npy", d / "cal1.npy", d / "cal2.npy",
                       "--calibration-examples", "8", "--search", "--trials", "2", "--designer", "quasi_random",
                       "--validation", d / "val0.npz", d / "val1.npz", d / "val2.npz",
                       "--out", out, "--report", tmp_path / "rep.json", "--quiet"], capsys)
    assert rc == 0, se
    rep = json.load(open(tmp_path / "rep.json"))
    assert rep["grams"]["mode"] == "activations" and rep["grams"]["calibration_examples"] == 8
    assert set(rep["anchor"]["scale_grid"]) == {"0.5", "1.0"}
    assert rep["anchor"]["scale"] == max((0.5, 1.0), key=lambda c: (rep["anchor"]["scale_grid"][str(c)], -c))
    s = rep["search"]
    assert s["trials"] == 2 and s["best_value"] >= s["anchor_value"]
    assert os.path.isfile(os.path.join(s["run_dir"], "vizier.db"))
    assert rep["validation"]["merged_mean"] == pytest.approx(s["best_value"])
    assert rep["validation"]["merged_mean"] >= rep["validation"]["anchor_mean"]
    merged = checkpoint.load(str(out))
    assert jax.tree_util.tree_structure(merged) == jax.tree_util.tree_structure(models["base_params"])


@pytest.mark.parametrize("case, phrase", [
    ("missing", "expert 1 checkpoint folder not found"),
    ("mismatched", "mismatched experts: expert 1"),
    ("anchor", "unknown anchor method 'magic'"),
    ("grams", "unknown Gram method 'magic'"),
    ("labels", "labels [5] outside the head's 2 classes"),
    ("no_calibration", "needs --calibration"),
    ("counts", "--validation needs one entry per expert"),
    ("batch_size", "--batch-size must be positive, got 0"),
])
def test_merge_errors(models, capsys, tmp_path, case, phrase):
    d = models["dir"]
    experts = [d / "hf0", d / "hf1", d / "hf2"]
    extra = []
    if case == "missing":
        experts[1] = d / "nowhere"
    elif case == "mismatched":
        experts[1] = d / "hf_odd"
    elif case == "anchor":
        extra = ["--anchor", "magic"]
    elif case == "grams":
        extra = ["--grams", "magic"]
    elif case == "labels":
        experts = [d / "orbax0", d / "orbax1", d / "orbax2"]
        extra = ["--search", "--trials", "1", "--validation", d / "val_bad.npz", d / "val1.npz", d / "val2.npz"]
    elif case == "no_calibration":
        extra = ["--grams", "activations"]
    elif case == "counts":
        extra = ["--search", "--validation", d / "val0.npz"]
    elif case == "batch_size":
        extra = ["--search", "--batch-size", "0", "--validation", d / "val0.npz", d / "val1.npz", d / "val2.npz"]
    out = tmp_path / "merged"
    rc, so, se = _run(["--base", d / "base_hf", "--experts", *experts, "--out", out, "--quiet", *extra], capsys)
    assert rc == 1
    lines = se.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bmm-merge: error: ") and phrase in lines[0], se
    assert not os.path.exists(out) and not os.path.exists(str(out) + ".json")


def test_merge_usage_errors_and_help(capsys):
    rc = cli_merge.main(["--experts", "a", "b"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--base" in err[0] and "--out" in err[0]
    parser = cli_merge.build_parser()
    for action in parser._actions:
        assert action.help, f"option {action.option_strings} has no help"
    r = subprocess.run([sys.executable, "-m", "bmm_jax.cli.merge", "--help"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0
    for opt in ("--base", "--experts", "--anchor", "--anchor-scale", "--grams", "--calibration", "--rho",
                "--scale", "--search", "--validation", "--heads", "--out", "--report"):
        assert opt in r.stdout


# ----------------------------------------------------------------------------- bmm-experiment
def test_experiment_cli_tiny(tmp_path, tmp_path_factory, capsys, monkeypatch):
    from bmm_jax import experts
    monkeypatch.setitem(experts.BENCHMARKS, "tiny", TE.TINY_SPEC)
    cache = TE.tiny_cache(tmp_path_factory)
    prefix = tmp_path / "results" / "tiny"
    rc = cli_experiment.main([
        "--preset", "full", "--benchmark", "tiny", "--seeds", "0", "--baselines", "pretrained", "expert", "average",
        "--anchors", "task_arithmetic", "--grams", "data_free", "--hparams", "shared", "--shared-trials", "2",
        "--designer", "quasi_random", "--validation-examples", "16", "--cache-dir", cache,
        "--run-dir", str(tmp_path / "run"), "--export", str(prefix), "--quiet"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert "| BMM (TA, data-free, shared) |" in cap.out and "| Weight averaging |" in cap.out
    recs = json.load(open(str(prefix) + ".json"))
    assert {r["method"] for r in recs} == {"pretrained", "expert", "average", "bmm"}
    assert all(set(r) == set(TE.X.RECORD_KEYS) for r in recs)
    for suffix in (".json", ".md", ".csv", "_accuracy_by_task.png", "_normalized.png"):
        assert os.path.getsize(str(prefix) + suffix) > 0, suffix
    for f in ("records.json", "records.csv", "summary.csv", "table.md", "details.json", "config.json"):
        assert os.path.getsize(tmp_path / "run" / f) > 0, f
    # --table reprints the test table from the exported records, running nothing
    assert cli_experiment.main(["--table", str(prefix) + ".json"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "| method | a | b | mean | normalised mean |" and "BMM (TA, data-free, shared)" in out


def test_experiment_cli_scale_grid_overrides_one_anchor():
    from bmm_jax.experiment import PRESETS
    args = cli_experiment.build_parser().parse_args(
        ["--preset", "default", "--scale-grid", "tsv=0.2,0.4", "--scale-grid", "task_arithmetic=1"])
    grids = dict(cli_experiment.config_from_args(args).scale_grids)
    assert grids == {**dict(PRESETS["default"]["scale_grids"]), "tsv": (0.2, 0.4), "task_arithmetic": (1.0,)}


@pytest.mark.parametrize("argv, rc, phrase", [
    (["--benchmark", "cifar10"], 1, "unknown benchmark 'cifar10'"),
    (["--grams", "magic"], 1, "unknown ['magic']"),
    (["--anchors", "magic"], 1, "unknown ['magic']"),
    (["--designer", "cmaes"], 1, "unknown designer 'cmaes'"),
    (["--seeds", "x"], 2, "invalid int value"),
    (["--preset", "fastest"], 2, "invalid choice"),
    (["--scale-grid", "tsv"], 2, "expects ANCHOR=S1,S2"),
    (["--scale-grid", "tsv=a,b"], 2, "scales must be numbers"),
    (["--scale-grid", "wudi=1"], 1, "'wudi' has no scale"),
    (["--scale-grid", "ties=0,1"], 1, "must be positive finite scales"),
])
def test_experiment_cli_errors(argv, rc, phrase, capsys, tmp_path):
    got = cli_experiment.main(argv + ["--run-dir", str(tmp_path / "run"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert got == rc and len(err) == 1 and err[0].startswith("bmm-experiment: error: ") and phrase in err[0], err
    assert not os.path.exists(tmp_path / "run")


# ----------------------------------------------------------------------------- bmm-merge never destroys inputs
def _snapshot(root) -> dict:
    """{relative path: bytes} of every file under ``root`` (an independent record of what is there)."""
    out = {}
    for d, _, fs in os.walk(root):
        for f in fs:
            p = os.path.join(d, f)
            out[os.path.relpath(p, root)] = open(p, "rb").read()
    return out


@pytest.fixture
def user_models(models, tmp_path):
    """``<tmp>/models/{base,e0,e1}``: HF folders of the user's, as a user would keep them."""
    import shutil
    root = tmp_path / "models"
    for src, dst in (("base_hf", "base"), ("hf0", "e0"), ("hf1", "e1")):
        shutil.copytree(models["dir"] / src, root / dst)
    return root


def _no_loading(monkeypatch):
    """Any load of a model fails loudly: the checks under test must come first."""
    def load(*a, **k):
        raise AssertionError("a model was loaded before the outputs were checked")
    monkeypatch.setattr(cli_merge, "load_model", load)


@pytest.mark.parametrize("case, phrase", [
    ("out_contains", "--out {m} contains the input {m}/base (--base)"),
    ("out_is", "--out {m}/e1 is the input {m}/e1 (--experts (1))"),
    ("out_inside", "--out {m}/e0/merged lies inside the input {m}/e0 (--experts (0))"),
    ("report_inside", "--report {m}/e0/config.json lies inside the input {m}/e0"),
    ("report_is_input", "--report {m}/cal.npy is the input {m}/cal.npy (--calibration (0))"),
    ("run_dir_inside", "--run-dir {m}/base/search lies inside the input {m}/base (--base)"),
    ("report_in_out", "--report {t}/merged/rep.json lies inside --out {t}/merged"),
    ("run_dir_in_out", "--run-dir {t}/merged/search lies inside --out {t}/merged"),
    ("report_is_hparams", "--report {m}/hp.json is the input {m}/hp.json (--hparams)"),
    ("out_is_cache", "--out {m}/base is the input {m}/base (the bmm_jax cache)"),
])
def test_merge_refuses_outputs_overlapping_inputs(user_models, tmp_path, capsys, monkeypatch, case, phrase):
    m, t = str(user_models), str(tmp_path)
    np.save(user_models / "cal.npy", np.ones((2, 3), np.int32))
    argv = ["--base", f"{m}/base", "--experts", f"{m}/e0", f"{m}/e1", "--quiet"]
    out = {"out_contains": m, "out_is": f"{m}/e1", "out_inside": f"{m}/e0/merged"}.get(case, f"{t}/merged")
    argv += ["--out", out]
    if case == "report_inside":
        argv += ["--report", f"{m}/e0/config.json"]
    elif case == "report_is_input":
        argv += ["--grams", "activations", "--calibration", f"{m}/cal.npy", f"{m}/cal.npy",
                 "--report", f"{m}/cal.npy"]
    elif case == "run_dir_inside":
        argv += ["--search", "--validation", "a", "b", "--run-dir", f"{m}/base/search"]
    elif case == "report_in_out":
        argv += ["--report", f"{t}/merged/rep.json"]
    elif case == "run_dir_in_out":
        argv += ["--search", "--validation", "a", "b", "--run-dir", f"{t}/merged/search"]
    elif case == "report_is_hparams":
        (user_models / "hp.json").write_text('{"rho": 0.5}')
        argv += ["--hparams", f"{m}/hp.json", "--report", f"{m}/hp.json"]
    elif case == "out_is_cache":                                # a built-in base loads from the cache
        monkeypatch.setenv("BMM_JAX_CACHE", f"{m}/base")
        argv = ["--base", "minilm", "--experts", f"{m}/e0", f"{m}/e1", "--quiet", "--out", f"{m}/base", "--overwrite"]
    before = _snapshot(user_models)
    _no_loading(monkeypatch)
    rc, so, se = _run(argv, capsys)
    lines = se.strip().splitlines()
    assert rc == 1 and len(lines) == 1 and lines[0].startswith("bmm-merge: error: "), se
    assert phrase.format(m=m, t=t) in lines[0], lines[0]
    assert _snapshot(user_models) == before                    # nothing deleted, nothing written
    assert sorted(os.listdir(tmp_path)) == ["models"]


def test_merge_out_of_user_files_needs_overwrite(models, user_models, tmp_path, capsys, monkeypatch):
    from bmm_jax import checkpoint
    m = str(user_models)
    common = ["--base", f"{m}/base", "--experts", f"{m}/e0", f"{m}/e1", "--quiet"]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    afile = tmp_path / "notes.txt"
    afile.write_text("keep")
    with monkeypatch.context() as mp:
        _no_loading(mp)
        for out, phrase in ((mine, f"refusing to replace --out {mine}: it is a folder that is not a bmm_jax "
                                   "checkpoint (holds thesis.tex); choose another path, or pass --overwrite"),
                            (afile, f"refusing to replace --out {afile}: it is a regular file")):
            rc, so, se = _run(common + ["--out", out], capsys)
            assert rc == 1 and len(se.strip().splitlines()) == 1 and phrase in se, se
        rc, so, se = _run(common + ["--out", tmp_path / "new", "--report", afile], capsys)
        assert rc == 1 and f"refusing to replace --report {afile}: it is not a bmm-merge report" in se, se
    assert (mine / "thesis.tex").read_text() == "years of work" and afile.read_text() == "keep"
    assert sorted(os.listdir(tmp_path)) == ["mine", "models", "notes.txt"]
    # a previous output is replaced without --overwrite (checkpoint and report); --overwrite replaces the rest
    out = tmp_path / "merged"
    for rho in ("0.5", "2.0"):
        rc, so, se = _run(common + ["--out", out, "--rho", rho], capsys)
        assert rc == 0, se
        assert json.load(open(str(out) + ".json"))["hparams"]["rho"] == float(rho)
    assert checkpoint.load_metadata(out)["hparams"]["rho"] == 2.0
    rc, so, se = _run(common + ["--out", mine, "--overwrite"], capsys)
    assert rc == 0, se
    assert checkpoint.is_checkpoint_dir(mine) and not os.path.exists(mine / "thesis.tex")
    assert sorted(f for f in os.listdir(tmp_path) if f.startswith(".")) == []       # no temp or backup left


def test_merge_unwritable_out_fails_before_loading(user_models, tmp_path, capsys, monkeypatch):
    m = str(user_models)
    common = ["--base", f"{m}/base", "--experts", f"{m}/e0", f"{m}/e1", "--quiet"]
    _no_loading(monkeypatch)
    if os.geteuid() == 0:                                       # root writes anywhere but in /sys
        ro = "/sys/bmm-merge-test/merged"
    else:
        d = tmp_path / "ro"
        d.mkdir()
        os.chmod(d, 0o555)
        ro = str(d / "merged")
    rc, so, se = _run(common + ["--out", ro], capsys)
    assert rc == 1 and len(se.strip().splitlines()) == 1 and f"--out {ro}: cannot write in " in se, se
    f = tmp_path / "file"
    f.write_text("x")
    rc, so, se = _run(common + ["--out", f / "merged"], capsys)
    assert rc == 1 and f"is not a folder" in se, se


@pytest.mark.parametrize("damage", ["garbage", "missing_db"])
def test_merge_search_damaged_study_one_line(user_models, tmp_path, capsys, monkeypatch, damage):
    m = str(user_models)
    run = tmp_path / "run"
    run.mkdir()
    (run / "trials.json").write_text("[]\n")
    if damage == "garbage":
        (run / "vizier.db").write_bytes(b"not a database" * 100)
    before = _snapshot(run)
    _no_loading(monkeypatch)
    rc, so, se = _run(["--base", f"{m}/base", "--experts", f"{m}/e0", f"{m}/e1", "--search", "--validation", "a",
                       "b", "--run-dir", run, "--out", tmp_path / "merged", "--quiet"], capsys)
    lines = se.strip().splitlines()
    assert rc == 1 and len(lines) == 1 and lines[0].startswith("bmm-merge: error: search study "), se
    assert f"{run}/vizier.db" in lines[0] and "new run directory" in lines[0]
    assert _snapshot(run) == before


# ----------------------------------------------------------------------------- kill -9 drill
def test_merge_kill9_keeps_old_or_new_output(models, tmp_path, capsys):
    """``kill -9`` of ``bmm-merge`` at random points while it replaces a previous output: ``--out``
    always holds the previous or the new merge, complete (checksum-verified); the rerun succeeds and
    leaves no temporary or backup folder."""
    import random
    import signal
    import time
    from bmm_jax import checkpoint
    d = models["dir"]
    common = ["--base", d / "base_hf", "--experts", d / "hf0", d / "hf1", "--quiet"]
    out = tmp_path / "merged"
    rc, _, se = _run(common + ["--out", out, "--rho", "0.5"], capsys)
    assert rc == 0, se
    old = checkpoint.checksum_of(out)
    argv = [sys.executable, "-m", "bmm_jax.cli.merge"] + [str(a) for a in common] + ["--out", str(out), "--rho", "2.0"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    t0 = time.perf_counter()                                   # the new merge, in a fresh process as below
    r = subprocess.run(argv[:-4] + ["--out", str(tmp_path / "ref"), "--rho", "2.0"], capture_output=True,
                       text=True, env=env, timeout=300)
    full = time.perf_counter() - t0
    assert r.returncode == 0, r.stderr[-3000:]
    new = checkpoint.checksum_of(tmp_path / "ref")
    assert new != old
    rng = random.Random()
    seed = rng.randrange(1 << 30)
    rng.seed(seed)
    for drill in range(2):
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        time.sleep(rng.uniform(0.5, 1.0) * full)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        got = checkpoint.checksum_of(out)
        assert got in (old, new), f"seed {seed}"
        assert checkpoint.tree_checksum(checkpoint.load(out)) == got, f"seed {seed}"    # complete, verified
        assert json.load(open(str(out) + ".json"))["checksum"] in (old, new)
    rc, _, se = _run(common + ["--out", out, "--rho", "2.0"], capsys)
    assert rc == 0, se
    got = checkpoint.checksum_of(out)
    assert checkpoint.tree_checksum(checkpoint.load(out)) == got == json.load(open(str(out) + ".json"))["checksum"]
    assert checkpoint.load_metadata(out)["hparams"]["rho"] == 2.0
    left = [f for f in os.listdir(tmp_path) if f.startswith(".merged.") and not f.startswith(".merged.json.")]
    assert left == [], f"seed {seed}: {left}"
