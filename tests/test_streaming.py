"""Streaming merge, file to file (issue 13): tiny random Llama / Mistral / Qwen2 / Gemma / GPT-2
checkpoints in PyTorch naming, merged tensor by tensor and checked against the in-memory library
calls on the whole flat params dict and against numpy references."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import bmm_jax
from bmm_jax.streaming import (Checkpoint, ShardWriter, is_bmm_output, merge_checkpoints, shard_names,
                               tensor_labels)
from bmm_jax.streaming.chunked import kth_largest_abs_chunked
from bmm_jax.streaming.synthetic import hf_config, llm_shapes, write_expert, write_random_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HP = {"rho": 0.3, "scale": 1.0}
TINY = {
    "llama": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=96, tie_word_embeddings=False, max_position_embeddings=64),
    "mistral": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=96, max_position_embeddings=64, sliding_window=None),
    "qwen2": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=96, max_position_embeddings=64, tie_word_embeddings=True),
    "gemma": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, vocab_size=96, max_position_embeddings=64),
    "gpt2": dict(n_embd=32, n_layer=2, n_head=4, vocab_size=96, n_positions=64),
}


def _make(root, family, k=3, dtype="float32", **extra):
    cfg = hf_config(family, **{**TINY[family], **extra})
    base = write_random_model(os.path.join(root, f"{family}-base"), cfg, dtype=dtype, seed=0)
    experts = [write_expert(os.path.join(root, f"{family}-e{i}"), base, seed=i + 1, scale=0.2, perturb_all=True)
               for i in range(k)]
    return base, experts


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("ckpts"))
    return {f: _make(root, f) for f in TINY}


def _load(path):
    c = Checkpoint(path)
    out = {n: np.array(c.tensor(n)) for n in c.names()}
    c.close()
    return out


def _flat(base, experts):
    b = _load(base)
    return b, [_load(e) for e in experts], tensor_labels({n: v.shape for n, v in b.items()})


def _close(a, b, tol=2e-6):
    for n in a:
        x, y = np.asarray(a[n], np.float64), np.asarray(b[n], np.float64)
        assert x.shape == y.shape, n
        err = np.max(np.abs(x - y)) / max(1.0, float(np.max(np.abs(y))))
        assert err <= tol, (n, err)


def _np_bmm(w0, ws, wa, label, rho, scale):
    """Independent float64 reference of the closed form with data-free Grams (method.md §2, §3.2)."""
    view = (lambda w: w.T) if label.layout == "transposed" else (lambda w: w)
    t = [view(np.asarray(w, np.float64) - np.asarray(w0, np.float64)) for w in ws]
    ta = view(np.asarray(wa, np.float64) - np.asarray(w0, np.float64))
    g = [x @ x.T / np.sum(x * x) for x in t]
    s = sum(g)
    b = sum(gi @ ti for gi, ti in zip(g, t))
    lam = rho * np.trace(s) / s.shape[0]
    delta = np.linalg.solve(s + lam * np.eye(s.shape[0]), b + lam * ta)
    return np.asarray(w0, np.float64) + scale * view(delta)


# ------------------------------------------------------------------------------ equality with in-memory
@pytest.mark.parametrize("family", list(TINY))
def test_streamed_bmm_equals_in_memory(models, tmp_path, family):
    base, experts = models[family]
    out = str(tmp_path / "out")
    rep = merge_checkpoints(base, experts, out, anchor="task_arithmetic", anchor_scale=0.3, hparams=HP)
    got = _load(out)
    b, es, labels = _flat(base, experts)
    anchor = bmm_jax.anchors.task_arithmetic(b, es, anchor_scale=0.3)
    ref = bmm_jax.merge(b, es, anchor, None, HP, labels=labels).params
    _close(got, ref)
    mods = [n for n, l in labels.items() if l.regressed]
    assert set(rep["modules"]) == set(mods) and len(mods) == rep["regressed"] > 0
    n = mods[-1]                                    # an mlp-out module: independent float64 reference
    want = _np_bmm(b[n], [e[n] for e in es], anchor[n], labels[n], HP["rho"], HP["scale"])
    np.testing.assert_allclose(got[n], want, rtol=2e-5, atol=2e-6)
    for nm, l in labels.items():                   # carried tensors are the anchor's
        if not l.regressed:
            np.testing.assert_allclose(got[nm], np.asarray(anchor[nm]), rtol=0, atol=1e-7)
    assert rep["processes"] == 1 and os.path.isfile(out + ".json")
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["model_type"] == family


@pytest.mark.parametrize("anchor", ["average", "task_arithmetic", "ties", "tsv"])
def test_streamed_anchors_equal_in_memory(models, tmp_path, anchor):
    base, experts = models["llama"]
    out = str(tmp_path / "out")
    # a tiny chunk budget: embeddings and lm_head go through the chunked path (TIES: chunked TIES)
    rep = merge_checkpoints(base, experts, out, method="anchor", anchor=anchor, chunk_bytes=3 * 4 * 32 * 20)
    got = _load(out)
    b, es, labels = _flat(base, experts)
    opts = {"ties": {"trim": "leaf"}, "tsv": {"modules": "labels"}}.get(anchor, {})
    fn = bmm_jax.anchors.get(anchor)
    ref = fn(b, es, labels=labels, **opts) if anchor == "tsv" else fn(b, es, **opts)
    _close(got, ref, tol=1e-6)
    if anchor == "average":                        # numpy reference
        for n in b:
            np.testing.assert_allclose(got[n], np.mean([e[n] for e in es], axis=0), rtol=1e-6, atol=1e-7)
    if anchor == "ties":
        assert set(rep["ties_chunked"]) == {"model.embed_tokens.weight", "lm_head.weight"}
        assert rep["ties_chunked"]["lm_head.weight"]["chunks"] > 1
        n = "lm_head.weight"                       # brute-force numpy TIES of one tensor
        tau = np.stack([e[n] - b[n] for e in es]).reshape(len(es), -1).astype(np.float64)
        k = int(0.2 * tau.shape[1])
        th = -np.sort(-np.abs(tau), axis=1)[:, k - 1:k]
        tr = np.where(np.abs(tau) >= th, tau, 0.0)
        el = np.sign(tr.sum(0))
        el = np.where(el == 0, np.sign(el.sum()), el)
        agree = np.where(el > 0, tr > 0, tr < 0)
        merged = (np.where(agree, tr, 0).sum(0) / np.maximum(agree.sum(0), 1)).reshape(b[n].shape)
        np.testing.assert_allclose(got[n], b[n] + merged, rtol=1e-5, atol=1e-6)


def test_kth_largest_chunked_matches_sort():
    rng = np.random.default_rng(0)
    base = rng.standard_normal((50, 7)).astype(np.float32)
    exps = [base + rng.standard_normal((50, 7)).astype(np.float32) * s for s in (0.1, 1e-3, 10.0)]
    exps[1][:20] = base[:20]                       # many exact zeros in one task

    def chunks():
        for lo in range(0, 50, 9):
            yield base[lo:lo + 9], [e[lo:lo + 9] for e in exps]
    for k in (1, 17, 200, 350):
        got = kth_largest_abs_chunked(chunks, k, 3)
        want = [np.sort(np.abs(e.astype(np.float32) - base).ravel())[::-1][k - 1] for e in exps]
        np.testing.assert_array_equal(got, np.asarray(want, np.float32))


# ------------------------------------------------------------------------------ output folders
def test_output_loads_with_flax_from_pretrained(models, tmp_path):
    import transformers
    for family, cls in (("llama", transformers.FlaxLlamaForCausalLM),):
        base, experts = models[family]
        out = str(tmp_path / family)
        merge_checkpoints(base, experts, out, hparams=HP)
        got = _load(out)
        with jax.numpy_dtype_promotion("standard"):              # HF's own model code
            model = cls.from_pretrained(out)
        flat = {"/".join(k): v for k, v in __import__("flax").traverse_util.flatten_dict(model.params).items()}
        if family == "llama":
            np.testing.assert_array_equal(flat["model/layers/1/mlp/down_proj/kernel"],
                                          got["model.layers.1.mlp.down_proj.weight"].T)
            np.testing.assert_array_equal(flat["model/embed_tokens/embedding"], got["model.embed_tokens.weight"])
        assert all(np.all(np.isfinite(np.asarray(v))) for v in flat.values())
    try:
        import torch  # noqa: F401
    except ImportError:
        return
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "llama"))
    np.testing.assert_allclose(model.state_dict()["model.layers.1.mlp.down_proj.weight"].numpy(),
                               _load(str(tmp_path / "llama"))["model.layers.1.mlp.down_proj.weight"])


def test_sharded_output_and_orbax(models, tmp_path):
    from safetensors import safe_open
    base, experts = models["gemma"]
    out = str(tmp_path / "sharded")
    rep = merge_checkpoints(base, experts, out, method="anchor", anchor="task_arithmetic", max_shard_size=20_000)
    n = len(rep["shards"])
    assert n > 2 and rep["shards"] == shard_names(n)
    with open(os.path.join(out, "model.safetensors.index.json")) as f:
        index = json.load(f)
    ref = _load(base)
    assert set(index["weight_map"]) == set(ref)
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in ref.values())
    got = {}
    for fn in rep["shards"]:                         # the safetensors package reads every shard
        with safe_open(os.path.join(out, fn), framework="numpy") as f:
            assert f.metadata() == {"format": "pt"}
            got.update({k: f.get_tensor(k) for k in f.keys()})
    _close(got, _load(out), tol=0)
    orb = str(tmp_path / "orbax")
    merge_checkpoints(base, experts, orb, method="anchor", anchor="task_arithmetic", out_format="orbax")
    tree = bmm_jax.checkpoint.load(orb)
    leaf = tree["model"]["layers"]["1"]["mlp"]["up_proj"]["weight"]
    np.testing.assert_array_equal(leaf, got["model.layers.1.mlp.up_proj.weight"])
    assert not [p for p in os.listdir(tmp_path) if "bmm-tmp" in p]


def test_output_safety(models, tmp_path):
    base, experts = models["llama"]
    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty and was not written by bmm_jax"):
        merge_checkpoints(base, experts, str(user), method="anchor", anchor="average")
    assert (user / "notes.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="overlaps the input"):
        merge_checkpoints(base, experts, os.path.join(base, "inner"), method="anchor", anchor="average")
    out = str(tmp_path / "out")
    merge_checkpoints(base, experts, out, method="anchor", anchor="average")
    first = _load(out)
    merge_checkpoints(base, experts, out, method="anchor", anchor="task_arithmetic")   # replaces its own
    assert is_bmm_output(out)
    assert not all(np.array_equal(first[n], v) for n, v in _load(out).items())
    merge_checkpoints(base, experts, str(user), method="anchor", anchor="average", overwrite=True)
    assert not (user / "notes.txt").exists() and is_bmm_output(str(user))
    with pytest.raises(ValueError, match="cannot be streamed"):
        merge_checkpoints(base, experts, out, anchor="regmean")
    with pytest.raises(ValueError, match="expert 1 .* does not have the base's tensors"):
        merge_checkpoints(base, [experts[0], models["gpt2"][1][0]], out)


def test_vocabulary_mismatch(tmp_path):
    cfg = hf_config("llama", **TINY["llama"])
    base = write_random_model(str(tmp_path / "base"), cfg, dtype="float32", seed=0)
    e = [write_expert(str(tmp_path / f"e{i}"), base, seed=i + 1, scale=0.2, extra_vocab_rows=r)
         for i, r in enumerate((3, 5, 0))]
    out = str(tmp_path / "out")
    rep = merge_checkpoints(base, e, out, anchor="task_arithmetic", hparams=HP)
    got = _load(out)
    b = _load(base)
    es = [_load(x) for x in e]
    v = 96
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["vocab_size"] == v + 5
    voc = rep["vocabulary"]["tensors"]
    assert set(voc) == {"model.embed_tokens.weight", "lm_head.weight"}
    assert voc["lm_head.weight"]["shared_rows"] == v and voc["lm_head.weight"]["out_rows"] == v + 5
    assert voc["lm_head.weight"]["extra_rows"] == [{"rows": [v, v + 3], "from": ["expert 0", "expert 1"]},
                                                   {"rows": [v + 3, v + 5], "from": ["expert 1"]}]
    assert rep["vocabulary"]["tokenizer_from"] == os.path.abspath(e[1])
    for n in voc:
        assert got[n].shape == (v + 5, 32)
        shared = bmm_jax.anchors.task_arithmetic({n: b[n]}, [{n: x[n][:v]} for x in es])[n]
        np.testing.assert_allclose(got[n][:v], shared, rtol=0, atol=1e-7)
        np.testing.assert_allclose(got[n][v:v + 3], (es[0][n][v:v + 3] + es[1][n][v:v + 3]) / 2, rtol=1e-6)
        np.testing.assert_array_equal(got[n][v + 3:], es[1][n][v + 3:])
    # regressed modules: unaffected, equal to the in-memory merge on the shared tensors
    labels = tensor_labels({n: x.shape for n, x in b.items()})
    mod = "model.layers.0.self_attn.q_proj.weight"
    anchor = bmm_jax.anchors.task_arithmetic({mod: b[mod]}, [{mod: x[mod]} for x in es])
    ref = bmm_jax.merge({mod: b[mod]}, [{mod: x[mod]} for x in es], anchor, None, HP, labels={mod: labels[mod]})
    np.testing.assert_allclose(got[mod], ref.params[mod], rtol=0, atol=1e-7)


def test_grams_from_files_and_mapping(models, tmp_path):
    from bmm_jax.grams._base import Grams
    from bmm_jax.grams.files import save_grams
    base, experts = models["qwen2"]
    b, es, labels = _flat(base, experts)
    rng = np.random.default_rng(3)
    groups, key_of = {}, {}
    for n, l in labels.items():
        if l.regressed:
            key_of[n] = l.input_group
            if l.input_group not in groups:
                x = rng.standard_normal((3, 50, l.d_in)).astype(np.float32)
                groups[l.input_group] = np.einsum("kni,knj->kij", x, x) / 50
    grams = Grams({g: v for g, v in groups.items()}, key_of)
    files = []
    for t in range(3):
        p = str(tmp_path / f"task{t}.safetensors")
        save_grams(p, grams, labels, task=t)
        files.append(p)
    ref = bmm_jax.merge(b, es, bmm_jax.anchors.average(b, es), grams, HP, labels=labels).params
    out = str(tmp_path / "out")
    merge_checkpoints(base, experts, out, anchor="average", grams=files, hparams=HP)
    _close(_load(out), ref, tol=5e-6)
    merge_checkpoints(base, experts, out, anchor="average", grams={n: groups[g] for n, g in key_of.items()}, hparams=HP)
    _close(_load(out), ref, tol=5e-6)


def test_shard_writer_checks(tmp_path):
    from bmm_jax.streaming.writer import Entry
    w = ShardWriter(str(tmp_path / "a.safetensors"), [Entry("x", np.float32, (2, 3)), Entry("y", np.int64, (4,))])
    with pytest.raises(ValueError, match="planned"):
        w.write("x", np.zeros((3, 2), np.float32))
    w.write("x", np.ones((2, 3), np.float32))
    with pytest.raises(ValueError, match="never written"):
        w.close()
    assert llm_shapes(hf_config("qwen2", **TINY["qwen2"]))["model.layers.0.self_attn.k_proj.bias"] == (16,)


# ------------------------------------------------------------------------------ subprocesses
_CHILD = """
import sys, json, os
sys.path.insert(0, {repo!r})
from bmm_jax.memory import rss_bytes, peak_rss_bytes, reset_peak_rss
from bmm_jax.streaming import merge_checkpoints
base, experts, out, method = {base!r}, {experts!r}, {out!r}, {method!r}
kw = dict(method=method, anchor="task_arithmetic", hparams={{"rho": 0.3}}, report_path="")
if {twice!r}:      # warm-up: shared libraries paged in, kernels compiled; then measure a second merge
    merge_checkpoints(base + "-warm", [e + "-warm" for e in experts], out + "-warm", **kw)
    reset_peak_rss()
rep = merge_checkpoints(base, experts, out, progress=True, **kw)
print(json.dumps(rep["memory"]))
"""


def test_memory_bound_in_subprocess(tmp_path):
    """A model of 12 blocks (5 x 26 MiB on disk): the streamed merge's peak RSS above the RSS it had
    before the first tensor stays under the stated working-set bound of the largest tensor, far
    below the (K + 3) x model an in-memory merge holds. Measured on a second merge in the same
    process (the first pages in jaxlib's code and compiles the kernels: RSS that does not grow with
    the model; a 1-block model of the same shapes is merged first)."""
    cfg = hf_config("llama", hidden_size=192, intermediate_size=768, num_hidden_layers=12, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=512, tie_word_embeddings=False, max_position_embeddings=64)
    base = write_random_model(str(tmp_path / "base"), cfg, dtype="float32", seed=0)
    experts = [write_expert(str(tmp_path / f"e{i}"), base, seed=i + 1) for i in range(4)]
    warm = write_random_model(str(tmp_path / "base-warm"), {**cfg, "num_hidden_layers": 1}, dtype="float32", seed=0)
    for i in range(4):                    # a 1-block model of the same shapes for the warm-up merge
        write_expert(str(tmp_path / f"e{i}-warm"), warm, seed=i + 1)
    model_bytes = sum(os.path.getsize(os.path.join(base, f)) for f in os.listdir(base))
    code = _CHILD.format(repo=REPO, base=base, experts=experts, out=str(tmp_path / "out"), method="bmm", twice=True)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    mem = json.loads(r.stdout.strip().splitlines()[-1])
    grew = mem["peak_rss_bytes"][0] - mem["rss_before_merge_bytes"][0]
    bound = mem["working_set_bound_bytes"]
    assert bound < model_bytes
    # compiled kernels (a few shapes) come on top of the tensors' working set: 64 MiB slack; an
    # in-memory merge would hold (K + 3) x model = 7 x 26 MiB
    assert grew <= bound + (64 << 20), (grew, bound)
    assert grew < 3 * model_bytes, (grew, model_bytes)
    print(f"peak RSS growth {grew / 2 ** 20:.1f} MiB, bound {bound / 2 ** 20:.1f} MiB, model {model_bytes / 2 ** 20:.1f} MiB")


def test_killed_merge_leaves_no_output_and_rerun_completes(models, tmp_path):
    base, experts = models["llama"]
    out = str(tmp_path / "out")
    slow = """
import bmm_jax.streaming.merge as m, time
orig = m._Merger.tensor
def tensor(self, t, write):
    orig(self, t, write); time.sleep(0.5)
m._Merger.tensor = tensor
"""
    code = _CHILD.format(repo=REPO, base=base, experts=experts, out=out, method="anchor", twice=False).replace(
        "from bmm_jax.streaming import merge_checkpoints", "from bmm_jax.streaming import merge_checkpoints\n" + slow)
    p = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    seen = 0
    for line in p.stderr:                           # kill -9 after a few tensors were written
        if line.startswith("[0] "):
            seen += 1
            if seen == 3:
                p.send_signal(signal.SIGKILL)
                break
    p.wait(timeout=60)
    assert p.returncode == -signal.SIGKILL
    assert not os.path.exists(out)
    left = [f for f in os.listdir(tmp_path) if f.startswith(".out.bmm-tmp-")]
    assert len(left) == 1
    rep = merge_checkpoints(base, experts, out, method="anchor", anchor="task_arithmetic")
    assert os.path.isdir(out) and not [f for f in os.listdir(tmp_path) if "bmm-tmp" in f]
    assert rep["tensors"] == len(_load(out))
