"""Adapters for Hugging Face Flax models (transformers 4.57, the last release with Flax models).

Encoder families: ``bert`` (FlaxBertModel), ``roberta`` (FlaxRobertaModel), ``clip_vision``
(FlaxCLIPVisionModel), ``vit`` (FlaxViTModel), ``gpt2`` (FlaxGPT2Model). Causal-LM families
(:data:`CAUSAL_FAMILIES`): ``llama`` (FlaxLlamaForCausalLM), ``mistral`` (FlaxMistralForCausalLM),
``gemma`` (FlaxGemmaForCausalLM), ``gpt2_lm`` (FlaxGPT2LMHeadModel); their params include the LM
head, so a merged tree loads back into the causal LM. transformers 4.57 has no Flax Qwen2: Qwen2
checkpoints are merged through the PyTorch-named label tree of :mod:`bmm_jax.models.llm`.
A model comes either from a local folder (``path``: ``model.safetensors`` / ``pytorch_model.bin``
converted with ``from_pt=True``, or ``flax_model.msgpack``), never from the network, or from a
config (random init, for tiny test models).

Causal LMs: the adapter runs the decoder body only (``model`` / ``transformer`` submodule, not
the ``[.., vocab]`` LM head), so features and activation capture cost no vocabulary matmul;
position ids are ``cumsum(attention_mask) - 1`` (left or right padding); padding tokens are
masked out of activation Grams. FlaxLlama / FlaxMistral always hold an ``lm_head``: for a config
with ``tie_word_embeddings`` it is set to the embedding's transpose on load
(:func:`bmm_jax.models.llm.tie_word_embeddings`; apply it again after a merge). FlaxMistral builds
a diagonal-only attention mask when ``sliding_window`` is ``None`` (a transformers bug): the
loader sets it to ``max_position_embeddings`` (no window), the documented meaning of ``None``.

Features (``pooling``): ``"mean"`` masked mean of the last hidden state (default for BERT /
RoBERTa), ``"cls"`` first token of the last hidden state (default for ViT), ``"pooler"`` the
model's pooler output (default for CLIP vision: the post-LayerNorm CLS token), ``"last"`` the last
real token (default for GPT-2).
"""
from __future__ import annotations

import copy
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bmm_jax.models.adapter import ModelAdapter, masked_mean, to_image_array

# Offline by argument, not by environment: every ``from_pretrained`` below reads a local folder with
# ``local_files_only=True`` (importing this module leaves ``os.environ`` alone).

TEXT_FAMILIES = ("bert", "roberta", "gpt2")
VISION_FAMILIES = ("clip_vision", "vit")
CAUSAL_FAMILIES = ("llama", "mistral", "gemma", "gpt2_lm")
FAMILIES = TEXT_FAMILIES + VISION_FAMILIES + CAUSAL_FAMILIES
_POOLINGS = ("mean", "cls", "pooler", "last")
_DEFAULT_POOLING = {"bert": "mean", "roberta": "mean", "gpt2": "last", "clip_vision": "pooler", "vit": "cls",
                    "llama": "last", "mistral": "last", "gemma": "last", "gpt2_lm": "last"}
# the decoder body of each causal LM (its hidden states; the LM head is not run)
_BODY = {"llama": "model", "mistral": "model", "gemma": "model", "gpt2_lm": "transformer"}
# (mean, std) on the 0..1 scale, the families' usual image processors.
_IMAGE_NORM = {"clip_vision": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
               "vit": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))}


def _classes(family: str):
    import transformers as T
    return {
        "bert": (T.FlaxBertModel, T.BertConfig),
        "roberta": (T.FlaxRobertaModel, T.RobertaConfig),
        "gpt2": (T.FlaxGPT2Model, T.GPT2Config),
        "clip_vision": (T.FlaxCLIPVisionModel, T.CLIPVisionConfig),
        "vit": (T.FlaxViTModel, T.ViTConfig),
        "llama": (T.FlaxLlamaForCausalLM, T.LlamaConfig),
        "mistral": (T.FlaxMistralForCausalLM, T.MistralConfig),
        "gemma": (T.FlaxGemmaForCausalLM, T.GemmaConfig),
        "gpt2_lm": (T.FlaxGPT2LMHeadModel, T.GPT2Config),
    }[family]


def _unknown_family(family: str) -> ValueError:
    if family == "qwen2":
        return ValueError("transformers 4.57 has no Flax Qwen2 model: merge Qwen2 checkpoints through "
                          "their PyTorch-named tensors (bmm_jax.models.llm.torch_labels / "
                          "labels_from_safetensors)")
    return ValueError(f"unknown HF family {family!r}; expected one of {FAMILIES}")


def _fix_config(family: str, config):
    """Work around FlaxMistral's ``sliding_window=None`` mask (see the module docstring)."""
    if family == "mistral" and getattr(config, "sliding_window", 0) is None:
        config = copy.deepcopy(config)
        config.sliding_window = int(config.max_position_embeddings)
    return config


def _tie(family: str, config, params):
    if family in ("llama", "mistral") and getattr(config, "tie_word_embeddings", False):
        from bmm_jax.models.llm import tie_word_embeddings
        return tie_word_embeddings(params)
    return params


def load_hf_model(family: str, *, path: str | None = None, config: Any = None, seed: int = 0,
                  add_pooling_layer: bool | None = None, init: bool = True):
    """Load (``path``) or randomly initialise (``config``) a HF Flax model of ``family``.

    Args:
      family: one of :data:`FAMILIES`.
      path: local model folder. Safetensors / PyTorch weights are converted with ``from_pt=True``
        (no torch needed for safetensors); ``flax_model.msgpack`` is read directly.
      config: a ``PretrainedConfig`` of the family or a dict of its fields (random init with
        ``seed``, jitted).
      add_pooling_layer: BERT / RoBERTa / ViT only; ``None`` keeps the family default.
      init: with ``config``: ``False`` builds the model without initialising it and returns the
        params' shapes (``jax.ShapeDtypeStruct`` leaves; nothing is computed or allocated), e.g.
        to label a large model or to fill the params yourself.

    Returns:
      ``(model, params)``: the ``FlaxPreTrainedModel`` (its
      ``.module`` is the linen module; call it with ``params=``) and its params (nested dicts).
    """
    if family not in FAMILIES:
        raise _unknown_family(family)
    if (path is None) == (config is None):
        raise ValueError("give exactly one of path= (local folder) or config= (random init)")
    model_cls, config_cls = _classes(family)
    kwargs = {}
    if add_pooling_layer is not None and family in ("bert", "roberta", "vit"):
        kwargs["add_pooling_layer"] = add_pooling_layer
    if path is not None:
        path = os.fspath(path)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"no model folder at {path}")
        files = set(os.listdir(path))
        from_pt = "flax_model.msgpack" not in files
        if from_pt and not ({"model.safetensors", "pytorch_model.bin"} & files):
            raise FileNotFoundError(f"{path} holds no flax_model.msgpack, model.safetensors or pytorch_model.bin")
        if family == "mistral":
            kwargs["config"] = _fix_config(family, config_cls.from_pretrained(path, local_files_only=True))
        with jax.numpy_dtype_promotion("standard"):   # HF Flax code assumes standard promotion
            if from_pt:
                # transformers' PyTorch->Flax conversion reads the randomly initialised params to
                # match names and shapes, so it needs ``_do_init=True``. Its "weights not used"
                # warning (a dropped pooler, position-id buffers) is expected: silenced.
                from transformers.utils import logging as hf_logging
                level = hf_logging.get_verbosity()
                hf_logging.set_verbosity_error()
                try:
                    model = model_cls.from_pretrained(path, from_pt=True, local_files_only=True, **kwargs)
                finally:
                    hf_logging.set_verbosity(level)
                params = model.params
            else:
                model, params = model_cls.from_pretrained(path, local_files_only=True, _do_init=False,
                                                          **kwargs)
        params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32)
                                        if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating) else jnp.asarray(x),
                                        _plain(params))
        return model, _tie(family, model.config, params)
    if isinstance(config, dict):
        config = config_cls(**config)
    if not isinstance(config, config_cls):
        raise TypeError(f"config for family {family!r} must be a {config_cls.__name__} or a dict, got "
                        f"{type(config).__name__}")
    config = _fix_config(family, config)
    with jax.numpy_dtype_promotion("standard"):
        model = model_cls(config, seed=seed, _do_init=False, **kwargs)
        if not init:
            return model, _plain(model.params_shape_tree)
        params = jax.jit(model.init_weights, static_argnums=1)(jax.random.PRNGKey(seed), model.input_shape)
    return model, _tie(family, config, _plain(params))


def _plain(tree):
    """FrozenDict / dict params -> plain nested dicts of arrays."""
    from flax.core import unfreeze
    return unfreeze(tree) if hasattr(tree, "unfreeze") or type(tree).__name__ == "FrozenDict" else tree


def _text_preprocess(tokenizer, max_length: int, pad_id: int):
    def preprocess(inputs):
        if isinstance(inputs, np.ndarray) and np.issubdtype(inputs.dtype, np.integer):
            ids = np.asarray(inputs, np.int32)
            if ids.ndim != 2:
                raise ValueError(f"token id inputs must be [N, T], got shape {ids.shape}")
            ids = ids[:, :max_length]
            return {"input_ids": ids, "attention_mask": (ids != pad_id).astype(np.int32)}
        if isinstance(inputs, str):
            raise TypeError("text inputs must be a list of strings, got a single str")
        texts = [str(t) for t in inputs]
        if tokenizer is None:
            raise ValueError("this adapter has no tokenizer: pass token ids [N, T] or build the adapter "
                             "with tokenizer=")
        enc = tokenizer(texts, padding="max_length", truncation=True, max_length=max_length,
                        return_tensors="np", return_token_type_ids=False)
        return {"input_ids": enc["input_ids"].astype(np.int32),
                "attention_mask": enc["attention_mask"].astype(np.int32)}
    return preprocess


def _image_preprocess(size: int, mean, std):
    mean = np.asarray(mean, np.float32) * 255.0
    std = np.asarray(std, np.float32) * 255.0

    def preprocess(inputs):
        x = to_image_array(inputs, size, 3)
        return {"pixel_values": ((x - mean) / std).astype(np.float32)}
    return preprocess


def _default_buckets(max_length: int) -> tuple[int, ...]:
    b = [l for l in (16, 32, 64, 128, 256, 512) if l < max_length]
    return tuple(b) + (max_length,)


def hf_adapter(family: str, *, path: str | None = None, config: Any = None, seed: int = 0,
               tokenizer: Any = None, pooling: str | None = None, max_length: int = 64,
               image_mean=None, image_std=None, name: str | None = None,
               label_kwargs: dict | None = None, model: Any = None, params: Any = None) -> ModelAdapter:
    """A :class:`ModelAdapter` around a HF Flax encoder or causal LM.

    Args:
      family: ``bert | roberta | gpt2 | clip_vision | vit`` or a causal LM ``llama | mistral |
        gemma | gpt2_lm`` (features: the final hidden state of the decoder body, pooled).
      path / config / seed: see :func:`load_hf_model` (or pass an already built ``model``).
      tokenizer: text families: a HF tokenizer; default: loaded from ``path`` if it has tokenizer
        files. Without one, the adapter preprocesses integer token ids ``[N, T]`` only.
      pooling: ``mean | cls | pooler | last`` (default per family, see the module docstring; causal
        LMs: ``last`` (default) or ``mean``).
      max_length: text: tokens per sequence (padding / truncation).
      image_mean, image_std: vision: per-channel normalisation on the 0..1 scale.
      name: adapter name (default: the family).
      label_kwargs: keyword arguments for :func:`bmm_jax.labels.build_labels`.
      model, params: an already loaded ``(model, params)`` pair (skips loading).

    Returns:
      The adapter; ``feature_dim`` is the hidden size.
    """
    if family not in FAMILIES:
        raise _unknown_family(family)
    pooling = pooling or _DEFAULT_POOLING[family]
    if pooling not in _POOLINGS:
        raise ValueError(f"unknown pooling {pooling!r}; expected one of {_POOLINGS}")
    if pooling in ("pooler", "cls") and family in CAUSAL_FAMILIES + ("gpt2",):
        raise ValueError(f"{family} is a causal model with no {pooling} output; use pooling='last' or 'mean'")
    if pooling == "last" and family in VISION_FAMILIES:
        raise ValueError("pooling='last' is for causal text models")
    if model is None:
        model, params = load_hf_model(family, path=path, config=config, seed=seed,
                                      add_pooling_layer=(pooling == "pooler"))
    elif params is None:
        params = model.params
    cfg = model.config
    module = model.module
    from bmm_jax.labels import build_labels
    labels = build_labels(params, **(label_kwargs or {}))
    info = {"family": family, "source": os.fspath(path) if path is not None else "config",
            "pooling": pooling, "config": cfg.to_dict() if hasattr(cfg, "to_dict") else str(cfg)}

    def pool(out, batch):
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        if pooling == "pooler":
            return out.pooler_output
        if pooling == "cls":
            return hidden[:, 0]
        mask = batch.get("attention_mask")
        if mask is None:
            mask = jnp.ones(hidden.shape[:2], jnp.int32)
        if pooling == "mean":
            return masked_mean(hidden, mask)
        last = jnp.maximum(jnp.sum(mask, axis=1) - 1, 0)
        return jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]

    if family in CAUSAL_FAMILIES:
        return _causal_adapter(family, model, params, labels, info, pool, tokenizer=tokenizer, path=path,
                               max_length=max_length, name=name)

    if family in TEXT_FAMILIES:
        if tokenizer is None and path is not None:
            tokenizer = _try_tokenizer(path)
        if tokenizer is not None and family == "gpt2" and tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        if tokenizer is not None and tokenizer.pad_token_id is not None:
            pad_id = int(tokenizer.pad_token_id)
        else:
            pad_id = int(getattr(cfg, "pad_token_id", None) or 0)
        if family == "gpt2":
            pad_id = int(tokenizer.pad_token_id) if tokenizer is not None else int(cfg.eos_token_id)
        padding_idx = int(getattr(cfg, "pad_token_id", 1) or 1)

        def call_args(batch):
            ids = jnp.asarray(batch["input_ids"])
            mask = jnp.asarray(batch["attention_mask"])
            if family == "roberta":
                real = (ids != padding_idx).astype(jnp.int32)
                pos = jnp.cumsum(real, axis=1) * real + padding_idx
            else:
                pos = jnp.broadcast_to(jnp.arange(ids.shape[1], dtype=jnp.int32), ids.shape)
            if family == "gpt2":
                return (ids, mask, pos), {"deterministic": True}
            return (ids, mask), {"token_type_ids": jnp.zeros_like(ids), "position_ids": pos,
                                 "deterministic": True}

        tok_name = getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__
        return ModelAdapter(
            name=name or family, module=module, params=params, feature_dim=int(cfg.hidden_size),
            call_args=call_args, pool=pool, preprocess_fn=_text_preprocess(tokenizer, max_length, pad_id),
            labels=labels, token_mask_fn=lambda b: jnp.asarray(b["attention_mask"]) > 0,
            preprocess_key=f"{family}:{info['source']}:{tok_name}:len{max_length}",
            length_buckets=_default_buckets(max_length), info=info, dtype_promotion="standard")

    size = int(cfg.image_size)
    mean = image_mean if image_mean is not None else _IMAGE_NORM[family][0]
    std = image_std if image_std is not None else _IMAGE_NORM[family][1]

    def call_args_img(batch):
        return (jnp.asarray(batch["pixel_values"]),), {"deterministic": True}

    return ModelAdapter(
        name=name or family, module=module, params=params, feature_dim=int(cfg.hidden_size),
        call_args=call_args_img, pool=pool, preprocess_fn=_image_preprocess(size, mean, std),
        labels=labels, token_mask_fn=None,
        preprocess_key=f"{family}:{info['source']}:{size}px:{tuple(mean)}:{tuple(std)}", info=info,
        dtype_promotion="standard")


def _run_body(module, *args, body: str, **kwargs):
    """``module.<body>(*args, **kwargs)``: the decoder of a causal LM without its head (a
    ``method=`` for ``module.apply``; submodule scope paths stay those of the full model)."""
    return getattr(module, body)(*args, **kwargs)


_BODY_METHODS = {b: (lambda module, *a, _b=b, **kw: _run_body(module, *a, body=_b, **kw)) for b in set(_BODY.values())}


def causal_call_args(family: str):
    """``batch -> (args, kwargs)`` running the decoder body of a causal-LM family's linen module:
    ``input_ids``, ``attention_mask`` ``[B, T]`` and position ids ``max(cumsum(mask) - 1, 0)``."""
    if family not in CAUSAL_FAMILIES:
        raise ValueError(f"{family!r} is not a causal-LM family {CAUSAL_FAMILIES}")
    method = _BODY_METHODS[_BODY[family]]

    def call_args(batch):
        ids = jnp.asarray(batch["input_ids"]).astype(jnp.int32)
        mask = jnp.asarray(batch["attention_mask"]).astype(jnp.int32)
        pos = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0).astype(jnp.int32)
        return (ids, mask, pos), {"deterministic": True, "method": method}
    return call_args


def _causal_adapter(family, model, params, labels, info, pool, *, tokenizer, path, max_length, name):
    cfg = model.config
    if tokenizer is None and path is not None:
        tokenizer = _try_tokenizer(path)
    if tokenizer is not None and tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer is not None and tokenizer.pad_token_id is not None:
        pad_id = int(tokenizer.pad_token_id)
    else:
        pad_id = getattr(cfg, "pad_token_id", None)
        pad_id = int(pad_id if pad_id is not None else (cfg.eos_token_id if isinstance(cfg.eos_token_id, int)
                                                        else 0))
    info = {**info, "pad_token_id": pad_id, "tie_word_embeddings": bool(getattr(cfg, "tie_word_embeddings", False))}
    if info["pooling"] == "last":
        def pool(out, batch):                     # the last real token, left or right padding
            hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
            mask = jnp.asarray(batch["attention_mask"]) > 0
            last = jnp.max(jnp.where(mask, jnp.arange(mask.shape[1])[None, :], 0), axis=1)
            return jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
    tok_name = getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__
    return ModelAdapter(
        name=name or family, module=model.module, params=params, feature_dim=int(cfg.hidden_size),
        call_args=causal_call_args(family), pool=pool,
        preprocess_fn=_text_preprocess(tokenizer, max_length, pad_id), labels=labels,
        token_mask_fn=lambda b: jnp.asarray(b["attention_mask"]) > 0,
        preprocess_key=f"{family}:{info['source']}:{tok_name}:len{max_length}",
        length_buckets=_default_buckets(max_length), info=info, dtype_promotion="standard")


def _try_tokenizer(path: str):
    files = set(os.listdir(path))
    if not ({"tokenizer.json", "vocab.txt", "vocab.json", "tokenizer_config.json"} & files):
        return None
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


__all__ = ["hf_adapter", "load_hf_model", "causal_call_args", "FAMILIES", "CAUSAL_FAMILIES"]
