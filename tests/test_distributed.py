"""Several processes with jax.distributed (issue 13): 2 CPU processes on 127.0.0.1 merge their
shares of the tensors into one output equal, bit for bit, to the single-process merge; activation
Gram states summed across processes equal the Gram of all batches (numpy reference)."""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from bmm_jax import distributed
from bmm_jax.streaming import Checkpoint, merge_checkpoints
from bmm_jax.streaming.synthetic import hf_config, write_expert, write_random_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_CHILD = """
import sys, json
sys.path.insert(0, {repo!r})
import numpy as np
import jax.numpy as jnp
from bmm_jax import distributed
import importlib
A = importlib.import_module("bmm_jax.grams.activations")
pid = int(sys.argv[1])
if {cli!r}:
    from bmm_jax.cli.merge import main
    rc = main(["--base", {base!r}, "--experts", *{experts!r}, "--out", {out!r}, "--rho", "0.3",
               "--coordinator", "127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(pid), "--quiet"])
    assert rc == 0
else:
    from bmm_jax.streaming import merge_checkpoints
    rep = merge_checkpoints({base!r}, {experts!r}, {out!r}, anchor="task_arithmetic", hparams={{"rho": 0.3}},
                            coordinator_address="127.0.0.1:{port}", num_processes=2, process_id=pid)
    # data-parallel Grams: each process its own batch, one collective
    x = np.random.default_rng(pid).standard_normal((5 + pid, 3)).astype(np.float32)
    st = A.update(A.init({{"g": 3}}), {{"g": jnp.asarray(x)}})
    g = A.finalize(distributed.allreduce_gram_state(st))["g"]
    print(json.dumps({{"tensors_per_process": rep["tensors_per_process"], "gram": np.asarray(g).tolist(),
                      "gathered": distributed.allgather_json({{"p": pid}})}}))
"""


def _port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def _run_two(code: str):
    procs = [subprocess.Popen([sys.executable, "-c", code, str(i)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (o, e) in zip(procs, outs):
        assert p.returncode == 0, e[-3000:]
    return [o for o, _ in outs]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    cfg = hf_config("llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=96, tie_word_embeddings=False, max_position_embeddings=64)
    base = write_random_model(str(root / "base"), cfg, dtype="bfloat16", seed=0)
    return base, [write_expert(str(root / f"e{i}"), base, seed=i + 1, scale=0.2) for i in range(3)]


@pytest.fixture(scope="module")
def one(model, tmp_path_factory):
    base, experts = model
    out = str(tmp_path_factory.mktemp("one") / "one")
    merge_checkpoints(base, experts, out, anchor="task_arithmetic", hparams={"rho": 0.3})
    return out


def _same(a, b):
    ca, cb = Checkpoint(a), Checkpoint(b)
    assert sorted(ca.names()) == sorted(cb.names())
    for n in ca.names():
        assert ca.tensor(n).tobytes() == cb.tensor(n).tobytes(), n


def test_two_processes_equal_one(model, one, tmp_path):
    base, experts = model
    two = str(tmp_path / "two")
    code = _CHILD.format(repo=REPO, base=base, experts=experts, out=two, port=_port(), cli=False)
    res = [json.loads(o.strip().splitlines()[-1]) for o in _run_two(code)]
    _same(one, two)                                            # bitwise
    with open(os.path.join(two, "bmm_jax_merge.json")) as f:
        rep = json.load(f)
    assert rep["processes"] == 2 and all(n > 0 for n in rep["tensors_per_process"])
    assert len(rep["shards"]) >= 2 and os.path.isfile(os.path.join(two, "model.safetensors.index.json"))
    assert len(rep["modules"]) == 14                           # 2 blocks x 7 modules, from both processes
    xs = [np.random.default_rng(p).standard_normal((5 + p, 3)).astype(np.float32) for p in range(2)]
    allx = np.concatenate(xs).astype(np.float64)
    for r in res:
        np.testing.assert_allclose(r["gram"], allx.T @ allx / len(allx), rtol=1e-5, atol=1e-6)
        assert r["gathered"] == [{"p": 0}, {"p": 1}]


def test_two_processes_cli(model, one, tmp_path):
    base, experts = model
    two = str(tmp_path / "two")
    _run_two(_CHILD.format(repo=REPO, base=base, experts=experts, out=two, port=_port(), cli=True))
    _same(one, two)
    assert os.path.isfile(two + ".json")


def test_assign_is_deterministic_and_balanced():
    costs = [5, 1, 1, 3, 3, 2, 8, 1]
    a = distributed.assign(costs, 3)
    assert a == distributed.assign(costs, 3)
    loads = [sum(c for c, p in zip(costs, a) if p == q) for q in range(3)]
    assert max(loads) <= 9 and sorted(set(a)) == [0, 1, 2]
    assert distributed.assign(costs, 1) == [0] * len(costs)
    assert distributed.initialize() == (0, 1)
    with pytest.raises(ValueError, match="go together"):
        distributed.initialize("127.0.0.1:1234")
    with pytest.raises(ValueError, match="process_id"):
        distributed.initialize("127.0.0.1:1234", 2, 2)
