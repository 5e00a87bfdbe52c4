"""``clip8``: the eight-task CLIP benchmark of task arithmetic, for users who have downloaded it.

Tasks (:data:`TASKS`): SUN397, Stanford Cars, RESISC45, EuroSAT, SVHN, GTSRB, MNIST, DTD. The
experts follow the task-arithmetic protocol: each is CLIP's vision tower fine-tuned against the
frozen zero-shot head of its task. Everything here runs from local folders; nothing is
downloaded.

What it reads:

* ``clip_model``: a Hugging Face CLIP folder (``CLIPModel``: ``config.json``,
  ``model.safetensors`` or ``flax_model.msgpack`` — ``pytorch_model.bin`` needs torch — and the
  tokenizer files ``vocab.json`` / ``merges.txt``), e.g. ``openai/clip-vit-base-patch32``.
* ``experts``: a folder with one Hugging Face ``CLIPVisionModel`` folder per task, named after
  the task (``<experts>/<task>``) or as FusionBench publishes them
  (``<experts>/clip-vit-base-patch32_<name>``, ``<name>`` in :data:`FUSIONBENCH_NAMES`); a
  ``{seed}`` field in the path selects a folder per expert seed.
* ``data``: image folders ``<data>/<task>/<split>/<label>/<image>`` for the splits ``train``
  (unlabeled calibration inputs; needed for activation Grams), ``test`` and optionally
  ``validation`` (otherwise a fixed 10% of ``train``, at most 1000 images, is held out as the
  validation split and removed from ``train``). ``<label>`` is the class index in the label
  order of :data:`CLASSNAMES` (as exported from the Hugging Face datasets FusionBench uses) or
  the class name itself (case and ``_``/space insensitive). Any format PIL reads.

The model: the vision tower (:class:`~transformers.FlaxCLIPVisionModel` params, the merged
pytree), pooled output projected by the pretrained ``visual_projection`` (fixed, not merged) and
L2-normalised. Heads: zero-shot heads from the text tower, ``logit_scale * t_c`` with ``t_c`` the
normalised mean over the task's prompt templates (:data:`TEMPLATES`) of the normalised text
embeddings of the class name (CLIP's prompt ensembling). They are the frozen heads of the experts,
so the *pretrained* row of a table is zero-shot CLIP. Images: resized (bicubic) so the shorter
side is the model's image size, centre-cropped, normalised with CLIP's mean and std.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import re
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from bmm_jax.presets._clip8_prompts import CLASSNAMES, TEMPLATES

TASKS = ("sun397", "cars", "resisc45", "eurosat", "svhn", "gtsrb", "mnist", "dtd")
#: Model-name suffixes of FusionBench's ViT-B/32 experts on the Hugging Face hub
#: (``tanganke/clip-vit-base-patch32_<name>``).
FUSIONBENCH_NAMES = {"sun397": "sun397", "cars": "stanford-cars", "resisc45": "resisc45", "eurosat": "eurosat",
                     "svhn": "svhn", "gtsrb": "gtsrb", "mnist": "mnist", "dtd": "dtd"}
#: Hugging Face datasets with these label orders (what FusionBench evaluates on).
HF_DATASETS = {"sun397": "tanganke/sun397", "cars": "tanganke/stanford_cars", "resisc45": "tanganke/resisc45",
               "eurosat": "tanganke/eurosat", "svhn": "ufldl-stanford/svhn (cropped_digits)", "gtsrb": "tanganke/gtsrb",
               "mnist": "ylecun/mnist", "dtd": "tanganke/dtd"}
_ALIASES = {"cars": ("stanford_cars", "stanford-cars"), "sun397": (), "resisc45": (), "eurosat": (), "svhn": (),
            "gtsrb": (), "mnist": (), "dtd": ()}
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
VALIDATION_FRACTION = 0.1
VALIDATION_MAX = 1000
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"unknown clip8 task {task!r}; expected one of {TASKS}")


# ----------------------------------------------------------------------------- CLIP model
@functools.lru_cache(maxsize=2)
def load_clip(path: str):
    """``(FlaxCLIPModel, params, tokenizer)`` of a local Hugging Face CLIP folder (params float32)."""
    import transformers as T
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no CLIP model folder at {path}")
    files = set(os.listdir(path))
    from_pt = "flax_model.msgpack" not in files
    if from_pt and not ({"model.safetensors", "pytorch_model.bin"} & files):
        raise FileNotFoundError(f"{path} holds no flax_model.msgpack, model.safetensors or pytorch_model.bin")
    if not ({"vocab.json", "merges.txt"} <= files):
        raise FileNotFoundError(f"{path} has no CLIP tokenizer files (vocab.json, merges.txt)")
    with jax.numpy_dtype_promotion("standard"):
        from transformers.utils import logging as hf_logging
        level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            if from_pt:
                model = T.FlaxCLIPModel.from_pretrained(path, from_pt=True, local_files_only=True)
                params = model.params
            else:
                model, params = T.FlaxCLIPModel.from_pretrained(path, local_files_only=True, _do_init=False)
        finally:
            hf_logging.set_verbosity(level)
    from flax.core import unfreeze
    params = unfreeze(params) if hasattr(params, "unfreeze") else params
    params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), params)
    tok = T.CLIPTokenizer.from_pretrained(path, local_files_only=True)
    return model, params, tok


def text_embeddings(model, params, tokenizer, texts: Sequence[str], *, batch_size: int = 256) -> np.ndarray:
    """Projected text embeddings ``[len(texts), projection_dim]`` (float32, not normalised), in
    padded batches of ``batch_size`` (one compilation)."""
    max_len = int(model.config.text_config.max_position_embeddings)
    enc = tokenizer(list(texts), padding="max_length", truncation=True, max_length=max_len, return_tensors="np")
    ids = enc["input_ids"].astype(np.int32)
    mask = enc["attention_mask"].astype(np.int32)
    fn = _text_fn(model)
    out = []
    for i in range(0, len(ids), batch_size):
        a, m = ids[i:i + batch_size], mask[i:i + batch_size]
        n = len(a)
        if n < batch_size:
            a = np.concatenate([a, np.repeat(a[:1], batch_size - n, axis=0)])
            m = np.concatenate([m, np.repeat(m[:1], batch_size - n, axis=0)])
        out.append(np.asarray(fn(params, a, m))[:n])
    return np.concatenate(out) if out else np.zeros((0, int(model.config.projection_dim)), np.float32)


_TEXT_FNS: dict = {}


def _text_features(module, ids, mask):
    """The text tower's pooled output (the end-of-text token) through ``text_projection``."""
    pos = jnp.broadcast_to(jnp.arange(ids.shape[-1], dtype=jnp.int32), ids.shape)
    out = module.text_model(input_ids=ids, attention_mask=mask, position_ids=pos, deterministic=True)
    return module.text_projection(out[1])


def _text_fn(model):
    fn = _TEXT_FNS.get(id(model))
    if fn is None:
        def f(params, ids, mask):
            with jax.numpy_dtype_promotion("standard"):
                return model.module.apply({"params": params}, ids, mask, method=_text_features)
        fn = _TEXT_FNS[id(model)] = jax.jit(f)
    return fn


def zero_shot_head(model, params, tokenizer, classnames: Sequence[str], templates: Sequence[str], *,
                   batch_size: int = 256) -> dict:
    """Zero-shot head ``{"kernel": [projection_dim, C], "bias": [C]}`` (float32 numpy): column ``c``
    is ``logit_scale * t_c``, ``t_c`` the L2-normalised mean over ``templates`` of the
    L2-normalised text embeddings of ``template.format(c=classnames[c])``; the bias is 0. On
    L2-normalised image embeddings it gives CLIP's zero-shot logits."""
    if not classnames or not templates:
        raise ValueError("a zero-shot head needs class names and templates")
    texts = [t.format(c=c) for c in classnames for t in templates]
    emb = text_embeddings(model, params, tokenizer, texts, batch_size=batch_size).astype(np.float64)
    emb /= np.linalg.norm(emb, axis=-1, keepdims=True)
    emb = emb.reshape(len(classnames), len(templates), -1).mean(axis=1)
    emb /= np.linalg.norm(emb, axis=-1, keepdims=True)
    scale = float(np.exp(np.asarray(params["logit_scale"], np.float64)))
    return {"kernel": (scale * emb.T).astype(np.float32), "bias": np.zeros((len(classnames),), np.float32)}


def zero_shot_heads(clip_model: str, tasks: Sequence[str] = TASKS, *, batch_size: int = 256) -> dict:
    """``task -> zero-shot head`` for the tasks of :data:`TASKS` (class names and templates of
    :data:`CLASSNAMES` / :data:`TEMPLATES`)."""
    model, params, tok = load_clip(os.fspath(clip_model))
    out = {}
    for t in tasks:
        _check_task(t)
        out[t] = zero_shot_head(model, params, tok, CLASSNAMES[t], TEMPLATES[t], batch_size=batch_size)
    return out


# ----------------------------------------------------------------------------- images
def clip_image(img, size: int) -> np.ndarray:
    """CLIP preprocessing of one image up to normalisation: RGB, shorter side resized to ``size``
    (bicubic), centre crop ``size x size``; ``uint8 [size, size, 3]``. ``img``: a path, a PIL image
    or an array ``[H, W]`` / ``[H, W, C]``."""
    from PIL import Image
    if isinstance(img, (str, os.PathLike)):
        with Image.open(img) as im:
            im = im.convert("RGB")
    elif isinstance(img, np.ndarray):
        a = img if img.dtype == np.uint8 else np.clip(np.round(img), 0, 255).astype(np.uint8)
        im = Image.fromarray(a.squeeze(-1) if a.ndim == 3 and a.shape[-1] == 1 else a).convert("RGB")
    else:
        im = img.convert("RGB")
    w, h = im.size
    s = size / min(w, h)
    nw, nh = max(size, round(w * s)), max(size, round(h * s))
    im = im.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return np.asarray(im.crop((left, top, left + size, top + size)), np.uint8)


def clip_adapter(clip_model: str):
    """The clip8 :class:`~bmm_jax.models.adapter.ModelAdapter`: CLIP's vision tower (params = the
    ``FlaxCLIPVisionModel`` tree ``{"vision_model": ...}``), features = the L2-normalised
    projected pooled output. Batches: ``{"pixels": uint8 [B, S, S, 3]}`` (normalised on device, so
    cached evaluation splits take a quarter of the float32 memory)."""
    import transformers as T

    from bmm_jax.models.hf import hf_adapter
    model, params, _ = load_clip(os.fspath(clip_model))
    vcfg = model.config.vision_config
    with jax.numpy_dtype_promotion("standard"):
        vm = T.FlaxCLIPVisionModel(vcfg, _do_init=False)
    vparams = {"vision_model": params["vision_model"]}
    proj = jnp.asarray(params["visual_projection"]["kernel"], jnp.float32)
    size = int(vcfg.image_size)
    mean = jnp.asarray(CLIP_MEAN, jnp.float32) * 255.0
    std = jnp.asarray(CLIP_STD, jnp.float32) * 255.0
    base = hf_adapter("clip_vision", model=vm, params=vparams, pooling="pooler", name="clip8-vision")

    def preprocess(inputs):
        if isinstance(inputs, dict):
            raise TypeError("clip8 preprocess takes raw images (paths, PIL images or arrays), not a batch dict")
        imgs = [clip_image(x, size) for x in inputs]
        return {"pixels": np.stack(imgs) if imgs else np.zeros((0, size, size, 3), np.uint8)}

    def call_args(batch):
        x = (jnp.asarray(batch["pixels"]).astype(jnp.float32) - mean) / std
        return (x,), {"deterministic": True}

    def pool(out, batch):
        z = jnp.matmul(out.pooler_output, proj, precision=jax.lax.Precision.HIGHEST)
        return z / jnp.linalg.norm(z, axis=-1, keepdims=True)

    return dataclasses.replace(
        base, call_args=call_args, pool=pool, preprocess_fn=preprocess, feature_dim=int(proj.shape[1]),
        preprocess_key=f"clip8:{os.path.abspath(os.fspath(clip_model))}:{size}px",
        info={**base.info, "source": os.fspath(clip_model), "projection_dim": int(proj.shape[1])})


# ----------------------------------------------------------------------------- data
def _norm(s: str) -> str:
    return re.sub(r"[\s_]+", " ", s.strip().lower())


def _task_dir(root: str, task: str) -> str:
    for name in (task, *_ALIASES.get(task, ())):
        d = os.path.join(root, name)
        if os.path.isdir(d):
            return d
    raise FileNotFoundError(f"no folder for clip8 task {task!r} under {root} (expected {root}/{task}/<split>/...)")


@functools.lru_cache(maxsize=64)
def _listing(split_dir: str, task: str) -> tuple[tuple[str, ...], np.ndarray]:
    names = CLASSNAMES[task]
    index = {_norm(c): i for i, c in enumerate(names)}
    paths, labels = [], []
    subdirs = sorted(e.name for e in os.scandir(split_dir) if e.is_dir())
    if not subdirs:
        raise FileNotFoundError(f"{split_dir} has no class folders")
    for sub in subdirs:
        if sub.isdigit():
            y = int(sub)
            if y >= len(names):
                raise ValueError(f"{split_dir}/{sub}: label {y} out of range for {task} ({len(names)} classes)")
        elif _norm(sub) in index:
            y = index[_norm(sub)]
        else:
            raise ValueError(f"{split_dir}/{sub}: not a class index or a class name of {task}")
        files = sorted(e.path for e in os.scandir(os.path.join(split_dir, sub))
                       if e.is_file() and e.name.lower().endswith(IMAGE_SUFFIXES))
        paths += files
        labels += [y] * len(files)
    if not paths:
        raise FileNotFoundError(f"{split_dir} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return tuple(paths), np.asarray(labels, np.int32)


def _held_out(n: int) -> np.ndarray:
    k = min(VALIDATION_MAX, max(1, int(round(VALIDATION_FRACTION * n))))
    return np.sort(np.random.default_rng(0).permutation(n)[:k])


def image_folder_load(root: str, task: str, split: str) -> tuple[list[str], np.ndarray]:
    """``(image paths, labels int32)`` of ``<root>/<task>/<split>/<label>/*`` (see the module
    docstring; a missing ``validation`` split is carved out of ``train``)."""
    _check_task(task)
    if split not in ("train", "validation", "test"):
        raise ValueError(f"unknown split {split!r}; expected train, validation or test")
    d = _task_dir(os.fspath(root), task)
    if split in ("train", "test") or os.path.isdir(os.path.join(d, "validation")):
        sd = os.path.join(d, split)
        if not os.path.isdir(sd):
            raise FileNotFoundError(f"no {split} split for clip8 task {task!r}: {sd} is missing")
        paths, labels = _listing(sd, task)
        if split == "train" and not os.path.isdir(os.path.join(d, "validation")):
            keep = np.setdiff1d(np.arange(len(paths)), _held_out(len(paths)))
            return [paths[i] for i in keep], labels[keep]
        return list(paths), labels.copy()
    paths, labels = _listing(os.path.join(d, "train"), task)
    idx = _held_out(len(paths))
    return [paths[i] for i in idx], labels[idx]


# ----------------------------------------------------------------------------- experts
def expert_dir(experts: str, task: str, seed: int = 0) -> str:
    """The folder of ``task``'s expert under ``experts`` (``<experts>/<task>`` or FusionBench's
    ``clip-vit-base-patch32_<name>`` / ``<name>``); ``{seed}`` in ``experts`` is replaced."""
    root = os.fspath(experts)
    if "{seed}" in root:
        root = root.replace("{seed}", str(seed))
    elif seed != 0:
        raise ValueError(f"clip8 experts under {root} are one set (seed 0); put '{{seed}}' in the experts path "
                         "to give one folder per seed")
    fb = FUSIONBENCH_NAMES[task]
    cands = [task, *_ALIASES.get(task, ()), f"clip-vit-base-patch32_{fb}", fb]
    for c in cands:
        d = os.path.join(root, c)
        if os.path.isdir(d):
            return d
    raise FileNotFoundError(f"no expert for clip8 task {task!r} under {root} (tried {', '.join(cands)})")


def load_expert(path: str):
    """A ``CLIPVisionModel`` folder's params ``{"vision_model": ...}`` (float32)."""
    from bmm_jax.models.hf import load_hf_model
    _, params = load_hf_model("clip_vision", path=path)
    return params


def _build(spec, *, cache_dir=None, seed: int = 0, config=None, progress: bool = True, tasks=None):
    import time

    from bmm_jax._tree import check_experts
    from bmm_jax.experts import Benchmark
    from bmm_jax.experts.cache import _adapter
    p = spec.protocol
    tasks = tuple(tasks or spec.tasks)
    t0 = time.time()
    config = config or spec.config
    adapter = _adapter(spec, config)
    heads = zero_shot_heads(p["clip_model"], tasks)
    experts, stats = [], {}
    for t in tasks:
        d = expert_dir(p["experts"], t, seed)
        experts.append(load_expert(d))
        stats[t] = {"source": d, "num_classes": len(CLASSNAMES[t]), "num_templates": len(TEMPLATES[t])}
    try:
        check_experts(adapter.params, experts)
    except (ValueError, TypeError) as e:
        raise ValueError(f"clip8 experts do not match the CLIP vision tower of {p['clip_model']}: {e}") from None
    stats["_total_seconds"] = time.time() - t0
    return Benchmark(spec.name, tasks, adapter, adapter.params, experts, heads, dict(heads), config, stats, int(seed),
                     spec.load)


def clip8_benchmark(clip_model: str, experts: str, data: str, *, tasks: Sequence[str] = TASKS,
                    name: str = "clip8"):
    """The clip8 :class:`~bmm_jax.experts.BenchmarkSpec` for downloaded checkpoints and data
    (see the module docstring); pass it as ``ExperimentConfig(benchmark=...)``.

    Raises:
      FileNotFoundError: a folder is missing; ValueError: an unknown task.
    """
    from bmm_jax.experts import BenchmarkSpec, FinetuneConfig
    tasks = tuple(tasks)
    if not tasks:
        raise ValueError("clip8 needs at least one task")
    for t in tasks:
        _check_task(t)
    paths = {"clip_model": os.path.abspath(os.fspath(clip_model)), "experts": os.path.abspath(os.fspath(experts)),
             "data": os.path.abspath(os.fspath(data))}
    for k, v in paths.items():
        root = os.path.dirname(v.split("{seed}")[0]) if "{seed}" in v else v
        if not os.path.isdir(root):
            raise FileNotFoundError(f"clip8 {k.replace('_', ' ')} folder not found: {v}")
    make = functools.partial(_make_adapter, paths["clip_model"])
    load = functools.partial(image_folder_load, paths["data"])
    return BenchmarkSpec(name, tasks, make, FinetuneConfig(head="frozen"), load=load, build=_build,
                         protocol={**paths, "tasks": list(tasks)})


def _make_adapter(clip_model: str, config=None):
    return clip_adapter(clip_model)


__all__ = ["TASKS", "CLASSNAMES", "TEMPLATES", "FUSIONBENCH_NAMES", "HF_DATASETS", "clip8_benchmark", "clip_adapter",
           "zero_shot_head", "zero_shot_heads", "text_embeddings", "load_clip", "image_folder_load", "clip_image",
           "expert_dir", "load_expert"]
