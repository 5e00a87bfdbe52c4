"""Atomic orbax checkpoints: bitwise round trip, crash safety (simulated failures inside the
write), and clear errors for missing, corrupt and mismatched checkpoints."""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bmm_jax import checkpoint


def _tree(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((7, 5)).astype(np.float32)
    w[0, 0] = -0.0                      # sign of zero must survive
    w[0, 1] = np.float32(1e-42)         # a subnormal too
    return {
        "encoder": {"layer": {"0": {"kernel": w, "bias": rng.standard_normal(5).astype(np.float32)}},
                    "scale": np.float64(rng.standard_normal())},
        "head": {"kernel": jnp.asarray(rng.standard_normal((5, 3)), jnp.float32),
                 "steps": np.array([3, -1, 7], np.int32)},
        "half": jnp.asarray(rng.standard_normal(4), jnp.bfloat16),
    }


def _bits(tree) -> list[tuple[str, str, tuple, bytes]]:
    """(path, dtype, shape, raw bytes) of every leaf: an independent bitwise comparison key."""
    out = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        a = np.asarray(leaf)
        out.append((jax.tree_util.keystr(path), str(a.dtype), a.shape, a.tobytes()))
    return out


def _siblings(path) -> list[str]:
    parent, name = os.path.split(os.fspath(path))
    return sorted(f for f in os.listdir(parent) if f != name)


def _largest_file(root) -> str:
    files = [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs]
    return max(files, key=os.path.getsize)


def test_round_trip_is_bitwise_identical(tmp_path):
    tree = _tree()
    path = tmp_path / "ckpt"
    digest = checkpoint.save(path, tree, metadata={"task": "mr", "seed": 0})
    assert digest == checkpoint.tree_checksum(tree) == checkpoint.checksum_of(path)
    assert _bits(checkpoint.load(path)) == _bits(tree)
    restored = checkpoint.load(path, like=tree)
    assert _bits(restored) == _bits(tree)
    assert jax.tree_util.tree_structure(restored) == jax.tree_util.tree_structure(tree)
    assert checkpoint.load_metadata(path) == {"task": "mr", "seed": 0}
    assert checkpoint.is_valid(path, like=tree)
    assert _siblings(path) == []          # no temporary or backup folders left behind


def test_checksum_sees_every_bit_dtype_and_path():
    tree = _tree()
    base = checkpoint.tree_checksum(tree)
    assert checkpoint.tree_checksum(_tree()) == base
    flipped = _tree()
    k = flipped["encoder"]["layer"]["0"]["kernel"]
    k.view(np.uint32)[3, 2] ^= 1                       # one mantissa bit
    assert checkpoint.tree_checksum(flipped) != base
    retyped = _tree()
    retyped["head"]["steps"] = retyped["head"]["steps"].astype(np.int64)
    assert checkpoint.tree_checksum(retyped) != base
    renamed = _tree()
    renamed["tail"] = renamed.pop("half")
    assert checkpoint.tree_checksum(renamed) != base


def test_overwrite_replaces_atomically(tmp_path):
    path = tmp_path / "ckpt"
    checkpoint.save(path, _tree(0))
    checkpoint.save(path, _tree(1), metadata={"v": 2})
    assert _bits(checkpoint.load(path)) == _bits(_tree(1))
    assert checkpoint.load_metadata(path) == {"v": 2}
    assert _siblings(path) == []


@pytest.mark.parametrize("where", ["orbax", "header", "rename"])
def test_crash_mid_save_keeps_previous_checkpoint(tmp_path, monkeypatch, where):
    """A failure inside the weight write, inside the header write, or while moving the new
    checkpoint into place leaves the previous checkpoint loadable (and no debris)."""
    import orbax.checkpoint as ocp

    path = tmp_path / "ckpt"
    old = _tree(0)
    checkpoint.save(path, old, metadata={"v": 1})

    class Crash(RuntimeError):
        pass

    if where == "orbax":
        real = ocp.StandardCheckpointer.save

        def save(self, directory, *args, **kwargs):
            real(self, directory, *args, **kwargs)   # some files are written, then the crash
            raise Crash("killed while writing weights")
        monkeypatch.setattr(ocp.StandardCheckpointer, "save", save)
    elif where == "header":
        def dump(*args, **kwargs):
            raise Crash("killed while writing metadata.json")
        monkeypatch.setattr(checkpoint.json, "dump", dump)
    else:
        real_rename = os.rename
        calls = []

        def rename(src, dst):
            calls.append((src, dst))
            if len(calls) == 2:                        # old moved aside, new not yet in place
                raise Crash("killed between the two renames")
            return real_rename(src, dst)
        monkeypatch.setattr(checkpoint.os, "rename", rename)

    with pytest.raises(Crash):
        checkpoint.save(path, _tree(1), metadata={"v": 2})
    monkeypatch.undo()
    assert _bits(checkpoint.load(path)) == _bits(old)          # the previous checkpoint, intact
    assert checkpoint.load_metadata(path) == {"v": 1}
    assert _siblings(path) == []
    checkpoint.save(path, _tree(1))                            # and saving works again
    assert _bits(checkpoint.load(path)) == _bits(_tree(1))


def test_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint at .*nowhere"):
        checkpoint.load(tmp_path / "nowhere")
    assert not checkpoint.is_valid(tmp_path / "nowhere")


def test_corrupt_checkpoints_are_detected(tmp_path):
    tree = _tree()
    # flipped bytes in the weight data
    p1 = tmp_path / "flipped"
    checkpoint.save(p1, tree)
    f = _largest_file(p1 / "params")
    open(f, "wb").write(bytes(b ^ 0xFF for b in open(f, "rb").read()))   # every byte inverted
    with pytest.raises(ValueError, match="corrupt checkpoint at .*flipped"):
        checkpoint.load(p1)
    assert not checkpoint.is_valid(p1)
    # truncated weight file
    p2 = tmp_path / "truncated"
    checkpoint.save(p2, tree)
    f = _largest_file(p2 / "params")
    open(f, "r+b").truncate(os.path.getsize(f) // 2)
    with pytest.raises(ValueError, match="corrupt checkpoint at .*truncated"):
        checkpoint.load(p2)
    # missing / garbage / foreign header
    p3 = tmp_path / "noheader"
    checkpoint.save(p3, tree)
    os.remove(p3 / "metadata.json")
    with pytest.raises(ValueError, match="corrupt checkpoint at .*noheader.*metadata.json"):
        checkpoint.load(p3)
    p4 = tmp_path / "garbage"
    checkpoint.save(p4, tree)
    (p4 / "metadata.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt checkpoint.*unreadable"):
        checkpoint.load(p4)
    (p4 / "metadata.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(ValueError, match="not a bmm_jax.checkpoint"):
        checkpoint.load(p4)
    # a recorded checksum that does not match the weights
    p5 = tmp_path / "badsum"
    checkpoint.save(p5, tree)
    meta = json.loads((p5 / "metadata.json").read_text())
    meta["checksum"] = "0" * 64
    (p5 / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="checksum"):
        checkpoint.load(p5)
    assert _bits(checkpoint.load(p5, verify=False)) == _bits(tree)
    # an empty directory is not a checkpoint
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="corrupt checkpoint at .*empty"):
        checkpoint.load(tmp_path / "empty")


def test_mismatched_checkpoints(tmp_path):
    tree = _tree()
    path = tmp_path / "ckpt"
    checkpoint.save(path, tree)
    wrong_shape = _tree()
    wrong_shape["head"]["kernel"] = jnp.zeros((5, 4), jnp.float32)
    with pytest.raises(ValueError, match=r"leaf 'head/kernel' is float32\(5, 3\), expected float32\(5, 4\)"):
        checkpoint.load(path, like=wrong_shape)
    wrong_dtype = _tree()
    wrong_dtype["head"]["steps"] = np.zeros(3, np.int64)
    with pytest.raises(ValueError, match="leaf 'head/steps' is int32"):
        checkpoint.load(path, like=wrong_dtype)
    extra = _tree()
    extra["new"] = np.zeros(2, np.float32)
    with pytest.raises(ValueError, match=r"leaves only in `like` \['new'\]"):
        checkpoint.load(path, like=extra)
    fewer = _tree()
    del fewer["half"]
    with pytest.raises(ValueError, match=r"leaves only in the checkpoint \['half'\]"):
        checkpoint.load(path, like=fewer)
    assert not checkpoint.is_valid(path, like=extra)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="empty params tree"):
        checkpoint.save(tmp_path / "c", {})
    with pytest.raises(TypeError, match="not JSON-serialisable"):
        checkpoint.save(tmp_path / "c", _tree(), metadata={"f": object()})
    assert not os.path.exists(tmp_path / "c")


# ----------------------------------------------------------------------------- never destroy a user's files
def _snapshot(root) -> dict:
    """{relative path: bytes} of every file under ``root`` (an independent record of what is there)."""
    out = {}
    for d, _, fs in os.walk(root):
        for f in fs:
            p = os.path.join(d, f)
            out[os.path.relpath(p, root)] = open(p, "rb").read()
    return out


def test_refuses_to_replace_what_is_not_a_checkpoint(tmp_path):
    tree = _tree()
    # a folder of the user's own files
    mine = tmp_path / "mine"
    (mine / "sub").mkdir(parents=True)
    (mine / "notes.txt").write_text("do not delete")
    (mine / "sub" / "data.bin").write_bytes(b"\x00\x01")
    before = _snapshot(mine)
    with pytest.raises(ValueError, match=r"refusing to replace checkpoint path .*mine: it is a folder that is not "
                                         r"a bmm_jax checkpoint \(holds notes.txt, sub\).*overwrite=True"):
        checkpoint.save(mine, tree)
    assert _snapshot(mine) == before and _siblings(mine) == []
    # a regular file
    f = tmp_path / "weights.bin"
    f.write_bytes(b"precious")
    with pytest.raises(ValueError, match=r"refusing to replace checkpoint path .*weights.bin: it is a regular file"):
        checkpoint.save(f, tree)
    assert f.read_bytes() == b"precious"
    # a checkpoint the user put other files beside
    ck = tmp_path / "ck"
    checkpoint.save(ck, tree)
    (ck / "README").write_text("mine")
    with pytest.raises(ValueError, match=r"checkpoint with other files beside it \(README\)"):
        checkpoint.save(ck, _tree(1))
    assert (ck / "README").read_text() == "mine" and _bits(checkpoint.load(ck)) == _bits(tree)
    # a checkpoint whose header is not ours
    foreign = tmp_path / "foreign"
    (foreign / "params").mkdir(parents=True)
    (foreign / "metadata.json").write_text(json.dumps({"format": "other/1"}))
    with pytest.raises(ValueError, match="not a bmm_jax checkpoint"):
        checkpoint.save(foreign, tree)
    assert json.loads((foreign / "metadata.json").read_text()) == {"format": "other/1"}
    # check_target says the same without writing, and accepts absent / empty / checkpoint paths
    (tmp_path / "empty").mkdir()
    assert checkpoint.check_target(tmp_path / "absent") == "absent"
    assert checkpoint.check_target(tmp_path / "empty") == "empty"
    assert checkpoint.check_target(ck, overwrite=True) == "other"
    (ck / "README").unlink()
    assert checkpoint.check_target(ck) == "checkpoint" and checkpoint.is_checkpoint_dir(ck)
    assert not checkpoint.is_checkpoint_dir(mine) and not checkpoint.is_checkpoint_dir(f)
    with pytest.raises(ValueError, match=r"refusing to replace --out .*mine.*pass --overwrite"):
        checkpoint.check_target(mine, what="--out", how="pass --overwrite")
    checkpoint.save(tmp_path / "empty", tree)                 # an empty folder is fine
    assert _bits(checkpoint.load(tmp_path / "empty")) == _bits(tree)


def test_overwrite_replaces_folders_and_files_without_leftovers(tmp_path):
    tree = _tree()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("replace me")
    checkpoint.save(mine, tree, overwrite=True)
    assert _bits(checkpoint.load(mine)) == _bits(tree) and sorted(os.listdir(mine)) == ["metadata.json", "params"]
    f = tmp_path / "weights.bin"
    f.write_bytes(b"old")
    checkpoint.save(f, tree, overwrite=True)
    assert os.path.isdir(f) and _bits(checkpoint.load(f)) == _bits(tree)
    assert _siblings(mine) == ["weights.bin"]                 # no hidden .weights.bin.old-* copy


def test_stale_temporary_folders_are_cleaned(tmp_path):
    """Temporary folders of killed saves go on the next save into the same parent; a live save's
    (locked) folder, folders with foreign content and other hidden names stay."""
    tree = _tree()
    path = tmp_path / "ckpt"
    checkpoint.save(path, tree)
    # what a kill inside orbax / after the header leaves: ours, unlocked
    dead1 = tmp_path / ".ckpt.tmp-0123456789ab"
    (dead1 / "params.orbax-checkpoint-tmp").mkdir(parents=True)
    (dead1 / "params.orbax-checkpoint-tmp" / "d").write_bytes(os.urandom(1000))
    dead2 = tmp_path / ".other.tmp-abcdefabcdef"
    (dead2 / "params").mkdir(parents=True)
    (dead2 / "metadata.json").write_text("{")
    # not ours: a foreign file inside, a name that only looks similar, a live (locked) save
    foreign = tmp_path / ".ckpt.tmp-00000000000f"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    similar = tmp_path / ".ckpt.tmp-xyz"
    similar.mkdir()
    live = tmp_path / ".ckpt.tmp-feedfeedfeed"
    live.mkdir()
    fd = checkpoint._lock_dir(str(live))
    assert fd is not None
    try:
        checkpoint.save(path, _tree(1))
        left = _siblings(path)
    finally:
        os.close(fd)
    assert left == sorted([foreign.name, similar.name, live.name])
    assert (foreign / "notes.txt").read_text() == "keep"
    assert _bits(checkpoint.load(path)) == _bits(_tree(1))
    checkpoint.save(path, tree)                               # the live one, now unlocked and empty, goes too
    assert _siblings(path) == sorted([foreign.name, similar.name])


# ----------------------------------------------------------------------------- kill -9 drill
_SAVER = r"""
import os, sys
sys.path.insert(0, {here!r}); sys.path.insert(0, {root!r})
import numpy as np
from bmm_jax import checkpoint
import test_checkpoint as T
trees = [T._big_tree(0), T._big_tree(1)]
i = 0
while True:
    checkpoint.save({path!r}, trees[i % 2], metadata={{"i": i}})
    print(i, flush=True)
    i += 1
"""


def _big_tree(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {"w": {str(j): rng.standard_normal((192, 192)).astype(np.float32) for j in range(6)},
            "b": rng.standard_normal(192).astype(np.float32)}


def test_kill9_during_saves_keeps_a_complete_checkpoint(tmp_path):
    """``kill -9`` at random points of a stream of saves to one path: every time, the path holds
    the previous or the new checkpoint, complete and bitwise (checksum-verified); the next save
    leaves no temporary or backup folder behind."""
    import random
    import signal
    import subprocess
    import sys
    import time
    here = os.path.dirname(os.path.abspath(__file__))
    path = str(tmp_path / "ckpt")
    want = [_bits(_big_tree(0)), _bits(_big_tree(1))]
    rng = random.Random()
    seed = rng.randrange(1 << 30)
    rng.seed(seed)
    kills = 3
    for drill in range(kills):
        proc = subprocess.Popen([sys.executable, "-c", _SAVER.format(here=here, root=os.path.dirname(here),
                                                                     path=path)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "JAX_PLATFORMS": "cpu"})
        first = proc.stdout.readline()                        # one save finished: the path exists
        assert first.strip().isdigit(), proc.stderr.read()[-3000:]
        t0 = time.perf_counter()
        second = proc.stdout.readline()                       # the duration of one save
        per_save = time.perf_counter() - t0
        assert second.strip().isdigit(), proc.stderr.read()[-3000:]
        time.sleep(rng.uniform(0.0, 2.0 * per_save))          # a random point of the next save(s)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL
        got = checkpoint.load(path)                           # verifies the checksum
        i = checkpoint.load_metadata(path)["i"]
        assert _bits(got) == want[i % 2], f"drill {drill} (seed {seed}): checkpoint {i} does not hold its tree"
    checkpoint.save(path, _big_tree(0), metadata={"i": -1})
    assert _siblings(path) == [], f"seed {seed}"
    assert _bits(checkpoint.load(path)) == want[0]
