"""Grams as safetensors files: exact round trips, per-task files, merges from loaded Grams, the
streamed collector, and rejection of bad files (messages naming the file).

References: Grams written from numpy inputs by hand (masked mean of x x^T), the safetensors
package's own reader, and merges with the in-memory Grams.
"""
from __future__ import annotations

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

import bmm_jax
from bmm_jax.grams import Grams
from bmm_jax.grams.files import (GramFiles, accumulate_grams, collect_grams_to_file, grams_from_state,
                                 is_gram_file, load_grams, read_metadata, save_grams)
from bmm_jax.labels import build_labels, regressed

D, T = 8, 6


class _Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        q = nn.Dense(D, name="q_proj")(x)
        k = nn.Dense(4, name="k_proj")(x)                   # grouped-query shapes: k/v narrower
        v = nn.Dense(4, name="v_proj")(x)
        x = x + nn.Dense(D, name="o_proj")(jnp.concatenate([q[..., :4] * k, v], -1))
        g = nn.Dense(12, name="gate_proj")(x)
        u = nn.Dense(12, name="up_proj")(x)
        return x + nn.Dense(D, name="down_proj")(jax.nn.silu(g) * u)


class _Tiny(nn.Module):
    @nn.compact
    def __call__(self, x):
        for i in range(2):
            x = _Block(name=f"layers_{i}")(x)
        return x


MODEL = _Tiny()


def apply_fn(params, batch):
    return MODEL.apply({"params": params}, batch["x"])


def mask_fn(batch, shape):
    return jnp.reshape(batch["mask"], (-1,))


@pytest.fixture(scope="module")
def setup():
    base = MODEL.init(jax.random.PRNGKey(0), jnp.zeros((1, T, D)))["params"]
    leaves, tree = jax.tree_util.tree_flatten(base)
    experts = []
    for k in range(3):
        rng = np.random.default_rng(k)
        experts.append(jax.tree_util.tree_unflatten(tree, [
            x + jnp.asarray(0.05 * rng.standard_normal(x.shape), jnp.float32) for x in leaves]))
    labels = build_labels(base)

    def batches(task):
        rng = np.random.default_rng(10 + task)
        out = []
        for _ in range(2):
            x = rng.standard_normal((3, T, D)).astype(np.float32)
            m = np.ones((3, T), bool)
            m[0, 4:] = False
            m[2, :2] = False
            out.append({"x": x, "mask": m})
        return out
    return base, experts, labels, batches


_CACHE = {}


def _grams(setup):
    """The in-memory activation Grams of the three experts (computed once per module)."""
    if id(setup) not in _CACHE:
        base, experts, labels, batches = setup
        _CACHE[id(setup)] = bmm_jax.grams.activations(apply_fn, experts, [batches(k) for k in range(3)], labels,
                                                      mask_fn=mask_fn, progress=False)
    return _CACHE[id(setup)]


def test_round_trip_exact_and_metadata(tmp_path, setup):
    base, experts, labels, batches = setup
    g = _grams(setup)
    # the first layer's q/k/v input is the raw input: a hand-computed masked mean
    for k in range(3):
        xs = np.concatenate([b["x"][b["mask"]] for b in batches(k)]).astype(np.float64)
        np.testing.assert_allclose(np.asarray(g["layers_0/q_proj/kernel"][k]), xs.T @ xs / len(xs), rtol=1e-5,
                                   atol=1e-6)
    path = save_grams(tmp_path / "all.safetensors", g, labels, task_name=["a", "b", "c"],
                      metadata={"calibration": "random", "n": 2})
    assert is_gram_file(path)
    back = load_grams(path)
    assert set(back.key_of) == set(g.key_of) and back.key_of == g.key_of
    for p in g.key_of:
        np.testing.assert_array_equal(np.asarray(back[p]), np.asarray(g[p]))
    assert back.num_tokens == g.num_tokens and back.kind == "activations" and back.num_experts == 3
    meta = read_metadata(path)
    assert json.loads(meta["task_names"]) == ["a", "b", "c"]
    assert json.loads(meta["user"]) == {"calibration": "random", "n": 2}
    recs = json.loads(meta["labels"])
    assert {r["path"] for r in recs} == {l.path for l in regressed(labels)}
    k_rec = next(r for r in recs if r["path"] == "layers_1/k_proj/kernel")
    assert (k_rec["kind"], k_rec["d_in"], k_rec["d_out"], k_rec["input_group"]) == ("k", D, 4, "layers_1:qkv-input")
    # one tensor per input group (q/k/v share one, gate/up share one), read by the safetensors package
    with safe_open(path, framework="numpy") as f:
        assert sorted(f.keys()) == sorted(set(g.key_of.values()))
        np.testing.assert_array_equal(f.get_tensor("layers_0:mlp-input"), np.asarray(g["layers_0/up_proj/kernel"]))
    assert len(set(g.key_of.values())) == 2 * 4


def test_per_task_files_and_merge_equal_in_memory(tmp_path, setup):
    base, experts, labels, batches = setup
    g = _grams(setup)
    files = [save_grams(tmp_path / f"t{k}.safetensors", g, labels, task=k, task_name=f"t{k}") for k in range(3)]
    back = load_grams(files, labels)
    folder = load_grams(tmp_path, labels)               # a folder: its files sorted by name
    for p in g.key_of:
        np.testing.assert_array_equal(np.asarray(back[p]), np.asarray(g[p]))
        np.testing.assert_array_equal(np.asarray(folder[p]), np.asarray(g[p]))
    gf = GramFiles(files)
    assert gf.num_tasks == 3 and gf.task_names == ["t0", "t1", "t2"]
    np.testing.assert_array_equal(gf.read("layers_1/down_proj/kernel"), np.asarray(g["layers_1/down_proj/kernel"]))
    hp = {"rho": 0.2, "scale": 1.1}
    anchor = bmm_jax.anchors.task_arithmetic(base, experts, labels=labels)
    want = bmm_jax.merge(base, experts, anchor, g, hp, labels=labels)[0]
    got = bmm_jax.merge(base, experts, anchor, back, hp, labels=labels)[0]
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_collector_streams_and_states_add(tmp_path, setup):
    base, experts, labels, batches = setup
    bs = batches(0)
    g = collect_grams_to_file(apply_fn, experts[0], bs, tmp_path / "c.safetensors", labels=labels, mask_fn=mask_fn,
                              task_name="zero", metadata={"source": "test"})
    back = load_grams(tmp_path / "c.safetensors", labels)
    ref = _grams(setup)
    for p in g.key_of:
        np.testing.assert_array_equal(np.asarray(back[p]), np.asarray(g[p]))
        np.testing.assert_allclose(np.asarray(g[p][0]), np.asarray(ref[p][0]), rtol=1e-5, atol=1e-6)
    n_real = sum(int(b["mask"].sum()) for b in bs)
    assert back.num_tokens == {0: float(n_real)}
    # two accumulators over halves of the data add up to one over all of it (data-parallel)
    s1, key_of = accumulate_grams(apply_fn, experts[0], bs[:1], labels=labels, mask_fn=mask_fn)
    s2, _ = accumulate_grams(apply_fn, experts[0], bs[1:], labels=labels, mask_fn=mask_fn)
    summed = jax.tree_util.tree_map(lambda a, b: a + b, s1, s2)
    both = grams_from_state(summed, key_of)
    for p in g.key_of:
        np.testing.assert_allclose(np.asarray(both[p]), np.asarray(g[p]), rtol=1e-6, atol=1e-7)


def test_data_free_grams_saved_dense(tmp_path, setup):
    base, experts, labels, _ = setup
    g = bmm_jax.grams.data_free(base, experts, labels)
    save_grams(tmp_path / "df.safetensors", g)
    back = load_grams(tmp_path / "df.safetensors")
    assert back.kind == "data_free"
    for p in g.key_of:
        t = np.stack([np.asarray(e_leaf, np.float64) for e_leaf in _task_kernels(base, experts, p)])
        want = np.einsum("kio,kjo->kij", t, t) / np.einsum("kio,kio->k", t, t)[:, None, None]
        np.testing.assert_allclose(np.asarray(back[p]), want, rtol=1e-5, atol=1e-7)


def _task_kernels(base, experts, path):
    def leaf(tree):
        for k in path.split("/"):
            tree = tree[k]
        return np.asarray(tree)
    return [leaf(e) - leaf(base) for e in experts]


def test_rename_to_other_names(tmp_path, setup):
    base, experts, labels, _ = setup
    g = _grams(setup)
    save_grams(tmp_path / "g.safetensors", g, task=0)
    renamed = {"blocks": {"0": base["layers_0"], "1": base["layers_1"]}}
    labels2 = build_labels(renamed)

    def rename(p):
        return p.replace("layers_", "blocks/")
    with pytest.raises(ValueError, match="no Gram for regressed module 'blocks/0/"):
        load_grams(tmp_path / "g.safetensors", labels2)
    back = load_grams(tmp_path / "g.safetensors", labels2, rename=rename)
    np.testing.assert_array_equal(np.asarray(back["blocks/1/v_proj/kernel"]), np.asarray(g["layers_1/v_proj/kernel"][:1]))


def test_bad_files_rejected(tmp_path, setup):
    base, experts, labels, _ = setup
    g = _grams(setup)
    good = save_grams(tmp_path / "good.safetensors", g, task=0)
    # not a safetensors file at all
    junk = tmp_path / "junk.safetensors"
    junk.write_text("hello")
    with pytest.raises(ValueError, match=r"junk\.safetensors is not a bmm_jax Gram file"):
        load_grams(junk)
    # a model checkpoint (safetensors without our metadata)
    ckpt = tmp_path / "model.safetensors"
    save_file({"w": np.zeros((2, 2), np.float32)}, str(ckpt))
    with pytest.raises(ValueError, match=r"model\.safetensors is not a bmm_jax Gram file"):
        load_grams([good, ckpt])
    # never overwritten by save_grams; an existing Gram file only with overwrite=True
    before = ckpt.read_bytes()
    with pytest.raises(FileExistsError, match="not a bmm_jax Gram file"):
        save_grams(ckpt, g, task=0)
    assert ckpt.read_bytes() == before
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_grams(good, g, task=1, overwrite=False)
    # files that disagree: other modules, other widths
    sub = Grams({"layers_0:qkv-input": g["layers_0/q_proj/kernel"][:1]},
                {"layers_0/q_proj/kernel": "layers_0:qkv-input"})
    other = save_grams(tmp_path / "other.safetensors", sub)
    with pytest.raises(ValueError, match=r"other\.safetensors does not match .*good\.safetensors: missing modules"):
        load_grams([good, other])
    wide = Grams({k: jnp.zeros((1, 3, 3)) for k in set(g.key_of.values())}, g.key_of)
    wpath = save_grams(tmp_path / "wide.safetensors", wide)
    with pytest.raises(ValueError, match=r"wide\.safetensors: group .* has d_in = 3, but (8|12) in .*good"):
        load_grams([good, wpath])
    # a Gram file whose tensor does not have the announced shape
    meta = read_metadata(good)
    with safe_open(good, framework="numpy") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors["layers_0:qkv-input"] = tensors["layers_0:qkv-input"][:, :4, :4].copy()
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata=meta)
    with pytest.raises(ValueError, match=r"bad\.safetensors: tensor 'layers_0:qkv-input' has shape \(1, 4, 4\)"):
        load_grams(bad)
    # labels that need a module the file lacks / a d_in that differs
    with pytest.raises(ValueError, match="no Gram for regressed module 'layers_0/down_proj/kernel'"):
        load_grams(other, labels)
    with pytest.raises(ValueError, match=r"module 'layers_0/down_proj/kernel': d_in = 12 but its Gram in .*wide"):
        load_grams(wpath, labels)
    with pytest.raises(ValueError, match="task must be an index"):
        save_grams(tmp_path / "x.safetensors", g, task=3)
    with pytest.raises(FileNotFoundError, match="no Gram file at"):
        load_grams(tmp_path / "missing.safetensors")


class _FailingGrams(Grams):
    def __getitem__(self, path):
        if path.startswith("layers_1"):
            raise RuntimeError("device lost")
        return super().__getitem__(path)


def test_failed_write_leaves_nothing(tmp_path, setup):
    g = _grams(setup)
    dense = {k: g[next(p for p, kk in g.key_of.items() if kk == k)] for k in set(g.key_of.values())}
    bad = _FailingGrams(dense, g.key_of, kind="activations")
    target = tmp_path / "g.safetensors"
    with pytest.raises(RuntimeError, match="device lost"):
        save_grams(target, bad)
    assert os.listdir(tmp_path) == []
    # an existing Gram file survives a failed rewrite unchanged
    save_grams(target, g)
    before = target.read_bytes()
    with pytest.raises(RuntimeError, match="device lost"):
        save_grams(target, bad)
    assert target.read_bytes() == before and os.listdir(tmp_path) == ["g.safetensors"]
