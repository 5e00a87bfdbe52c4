"""The clip8 preset on a tiny random CLIP and tiny synthetic image folders: zero-shot heads against
``FlaxCLIPModel.get_text_features`` prompt by prompt, the adapter's features against
``get_image_features``, CLIP's resize / centre crop by hand, the image-folder loader, and the
whole preset end to end (experts from CLIPVisionModel folders, merge, evaluation)."""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bmm_jax.presets import clip8 as C

TASKS = ("mnist", "eurosat")
TEXT = dict(vocab_size=514, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=96, bos_token_id=512, eos_token_id=513, pad_token_id=513)
VISION = dict(image_size=32, patch_size=8, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
              num_attention_heads=2)


def _write_tokenizer(d: str) -> None:
    """A byte-level CLIP BPE vocabulary without merges: every character is a token (and a
    word-final token with ``</w>``), then <|startoftext|> (512) and <|endoftext|> (513)."""
    from transformers.models.clip.tokenization_clip import bytes_to_unicode
    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": 256 + i for i, c in enumerate(chars)})
    vocab.update({"<|startoftext|>": 512, "<|endoftext|>": 513})
    with open(os.path.join(d, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(d, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")


def _image(rng, label: int, h: int, w: int) -> np.ndarray:
    img = rng.integers(0, 60, size=(h, w, 3)).astype(np.uint8)
    img[:, :, label % 3] += np.uint8(120 + 10 * label)          # a class-dependent colour
    return img


@pytest.fixture(scope="module")
def clip_world(tmp_path_factory):
    """CLIP folder, two CLIPVisionModel experts (one named by task, one FusionBench-style) and
    image folders (integer and class-name labels; no validation split: carved from train)."""
    import transformers as T
    from PIL import Image
    root = tmp_path_factory.mktemp("clip8")
    cfg = T.CLIPConfig(text_config=TEXT, vision_config=VISION, projection_dim=8)
    with jax.numpy_dtype_promotion("standard"):
        model = T.FlaxCLIPModel(cfg, seed=0)
        model.save_pretrained(str(root / "clip"))
    _write_tokenizer(str(root / "clip"))
    params = jax.tree_util.tree_map(np.asarray, model.params)
    rng = np.random.default_rng(0)
    vis = T.FlaxCLIPVisionModel(cfg.vision_config, _do_init=False)
    experts = {}
    for k, (task, folder) in enumerate((("mnist", "mnist"), ("eurosat", "clip-vit-base-patch32_eurosat"))):
        ep = {"vision_model": jax.tree_util.tree_map(
            lambda x: (x + 0.05 * rng.standard_normal(x.shape)).astype(np.float32), params["vision_model"])}
        with jax.numpy_dtype_promotion("standard"):
            vis.save_pretrained(str(root / "experts" / folder), params=ep)
        experts[task] = ep
    sizes = {"train": 4, "test": 3}
    for task in TASKS:
        for split, n in sizes.items():
            for y in range(len(C.CLASSNAMES[task])):
                name = str(y) if task == "mnist" else C.CLASSNAMES[task][y].replace(" ", "_")
                d = root / "data" / task / split / name
                d.mkdir(parents=True)
                for i in range(n):
                    Image.fromarray(_image(rng, y, 40, 36)).save(d / f"{i}.png")
    return {"root": root, "model": model, "params": params, "experts": experts, "cfg": cfg}


@pytest.fixture(scope="module")
def reference_heads(clip_world):
    """Zero-shot heads from the HF model's own get_text_features, prompts tokenised one by one
    (no attention mask; each prompt extended after its end-of-text token with more end-of-text
    tokens, which the causal text tower and its first-end-of-text pooling ignore)."""
    import transformers as T
    tok = T.CLIPTokenizer.from_pretrained(str(clip_world["root"] / "clip"))
    model, params = clip_world["model"], clip_world["params"]
    out = {}
    for task in TASKS:
        prompts = [t.format(c=c) for c in C.CLASSNAMES[task] for t in C.TEMPLATES[task]]
        ids = [tok(p, return_tensors="np")["input_ids"][0] for p in prompts]
        n = max(len(i) for i in ids)
        batch = np.stack([np.concatenate([i, np.full(n - len(i), TEXT["eos_token_id"])]) for i in ids])
        with jax.numpy_dtype_promotion("standard"):
            emb = np.asarray(model.get_text_features(jnp.asarray(batch, jnp.int32), params=params), np.float64)
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        m = emb.reshape(len(C.CLASSNAMES[task]), len(C.TEMPLATES[task]), -1).mean(1)
        out[task] = np.exp(float(params["logit_scale"])) * (m / np.linalg.norm(m, axis=1, keepdims=True)).T
    return out


def test_zero_shot_heads_match_get_text_features(clip_world, reference_heads):
    heads = C.zero_shot_heads(str(clip_world["root"] / "clip"), TASKS, batch_size=16)
    for task in TASKS:
        ref = reference_heads[task]
        assert heads[task]["kernel"].shape == (8, len(C.CLASSNAMES[task]))
        np.testing.assert_allclose(heads[task]["kernel"], ref, rtol=2e-4, atol=2e-4)
        np.testing.assert_array_equal(heads[task]["bias"], 0.0)


def test_clip_image_and_adapter_features(clip_world):
    # resize the shorter side to 32 (already 32 here) and crop the centre: columns 16..47 of 64
    img = np.arange(32 * 64 * 3, dtype=np.int64).reshape(32, 64, 3) % 251
    np.testing.assert_array_equal(C.clip_image(img.astype(np.uint8), 32), img[:, 16:48].astype(np.uint8))
    big = C.clip_image(np.zeros((80, 64, 3), np.uint8), 32)
    assert big.shape == (32, 32, 3)
    ad = C.clip_adapter(str(clip_world["root"] / "clip"))
    assert ad.feature_dim == 8 and jax.tree_util.tree_structure(ad.params) == jax.tree_util.tree_structure(
        clip_world["experts"]["mnist"])
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, size=(3, 32, 32, 3)).astype(np.uint8)
    feats = np.asarray(ad.apply(ad.params, {"pixels": pixels}))
    x = (pixels / 255.0 - np.asarray(C.CLIP_MEAN)) / np.asarray(C.CLIP_STD)
    with jax.numpy_dtype_promotion("standard"):
        ref = np.asarray(clip_world["model"].get_image_features(jnp.asarray(x.transpose(0, 3, 1, 2), jnp.float32),
                                                                 params=clip_world["params"]), np.float64)
    np.testing.assert_allclose(feats, ref / np.linalg.norm(ref, axis=1, keepdims=True), rtol=1e-4, atol=1e-5)
    # regressed modules: q, k, v, out, fc1, fc2 of both layers
    from bmm_jax.labels import regressed
    assert len(list(regressed(ad.labels))) == 12


def test_image_folder_loader(clip_world):
    data = str(clip_world["root"] / "data")
    tr, ytr = C.image_folder_load(data, "eurosat", "train")
    va, yva = C.image_folder_load(data, "eurosat", "validation")
    te, yte = C.image_folder_load(data, "eurosat", "test")
    assert len(tr) + len(va) == 40 and len(va) == 4 and not set(tr) & set(va) and len(te) == 30
    assert sorted(set(yte.tolist())) == list(range(10))
    # class-name folders map to the label order of CLASSNAMES
    for p, y in zip(te, yte):
        assert os.path.basename(os.path.dirname(p)).replace("_", " ") == C.CLASSNAMES["eurosat"][y]
    with pytest.raises(FileNotFoundError, match="no folder for clip8 task 'dtd'"):
        C.image_folder_load(data, "dtd", "test")
    with pytest.raises(ValueError, match="unknown clip8 task"):
        C.image_folder_load(data, "cifar10", "test")
    assert C.expert_dir(str(clip_world["root"] / "experts"), "eurosat").endswith("clip-vit-base-patch32_eurosat")
    with pytest.raises(ValueError, match="seed"):
        C.expert_dir(str(clip_world["root"] / "experts"), "mnist", seed=1)


def test_clip8_end_to_end(clip_world, reference_heads, tmp_path):
    from bmm_jax import experiment as X
    spec = C.clip8_benchmark(clip_world["root"] / "clip", clip_world["root"] / "experts", clip_world["root"] / "data",
                             tasks=TASKS)
    cfg = X.ExperimentConfig(benchmark=spec, seeds=(0,), baselines=("pretrained", "expert", "task_arithmetic"),
                             bmm_anchors=("task_arithmetic",), bmm_grams=("activations",), bmm_hparams=("shared",),
                             shared_trials=2, designer="quasi_random", validation_examples=8, calibration_examples=6,
                             calibration_batch_size=4, eval_batch_size=16, scale_grids={"task_arithmetic": (0.3, 1.0)},
                             bootstrap_resamples=100, run_dir=str(tmp_path / "run"), name="clip8", progress=False)
    res = X.run_experiment(cfg)
    rec = {(r["method"], r["task"], r["split"]): r for r in res.records}
    assert {r["method"] for r in res.records} == {"pretrained", "expert", "task_arithmetic", "bmm"}
    assert all(r["head"] == "frozen" for r in res.records)
    # the expert rows, recomputed independently: HF get_image_features with the expert's vision tower,
    # normalised, times the prompt-by-prompt zero-shot head
    for task in TASKS:
        paths, y = C.image_folder_load(str(clip_world["root"] / "data"), task, "test")
        x = np.stack([C.clip_image(p, 32) for p in paths]) / 255.0
        x = (x - np.asarray(C.CLIP_MEAN)) / np.asarray(C.CLIP_STD)
        params = {**clip_world["params"], "vision_model": clip_world["experts"][task]["vision_model"]}
        with jax.numpy_dtype_promotion("standard"):
            f = np.asarray(clip_world["model"].get_image_features(jnp.asarray(x.transpose(0, 3, 1, 2), jnp.float32),
                                                                   params=params), np.float64)
        logits = (f / np.linalg.norm(f, axis=1, keepdims=True)) @ reference_heads[task]
        assert rec[("expert", task, "test")]["accuracy"] == pytest.approx(np.mean(logits.argmax(1) == y))
        lp = logits - logits.max(1, keepdims=True)
        lp = lp - np.log(np.exp(lp).sum(1, keepdims=True))
        assert rec[("expert", task, "test")]["nll"] == pytest.approx(-np.mean(lp[np.arange(len(y)), y]), rel=1e-3)
    # BMM never below its anchor on validation; the paired comparison is there
    mean = lambda m, s: np.mean([rec[(m, t, s)]["accuracy"] for t in TASKS])  # noqa: E731
    assert mean("bmm", "validation") >= mean("task_arithmetic", "validation") - 1e-12
    assert [c.reference.method for c in res.paired] == ["task_arithmetic"]
    assert "BMM (TA, act, shared)" in res.table
    with pytest.raises(FileNotFoundError, match="clip8 data folder not found"):
        C.clip8_benchmark(clip_world["root"] / "clip", clip_world["root"] / "experts", clip_world["root"] / "nodata")
