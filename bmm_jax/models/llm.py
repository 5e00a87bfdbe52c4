"""Decoder LLM families: PyTorch-named checkpoints, label trees over them, tied embeddings.

The Flax families (``llama``, ``mistral``, ``gemma``, ``gpt2_lm``) are loaded and adapted by
:mod:`bmm_jax.models.hf`. This module covers what a file-to-file merge needs without a Flax model:

* :func:`torch_labels` — a flat label tree ``{tensor name: Label}`` over the PyTorch-named
  tensors of a HF checkpoint (``model.layers.3.self_attn.q_proj.weight`` ...), from their shapes
  only (safetensors metadata). Linear weights are stored ``[d_out, d_in]`` (``transposed``),
  GPT-2's Conv1D weights ``[d_in, d_out]`` (``dense``). It covers Llama, Mistral, Gemma, GPT-2
  and **Qwen2** (transformers 4.57 has no Flax Qwen2: its checkpoints are merged through this
  flat tree; the q/k/v biases are carried).
* :func:`torch_name` / :func:`torch_state_dict` — Flax param paths and arrays to the PyTorch names
  and layouts ``from_pretrained(..., from_pt=True)`` reads back (tied heads omitted).
* :func:`torch_group` — the input-group key of a Flax label in PyTorch naming, so activation Grams
  collected with a Flax model serve a merge over PyTorch-named tensors.
* :func:`tie_word_embeddings` — FlaxLlama / FlaxMistral always hold a separate ``lm_head``, even
  for checkpoints with tied embeddings (Llama-3.2-1B): it is set to the embedding's transpose.

Kinds and input groups follow :func:`bmm_jax.labels.build_labels`: q/k/v (grouped-query k/v:
``d_out = n_kv_heads * head_dim``) share one input group, gate and up share one, o and down
have their own; embeddings, norms and the LM head are carried.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Sequence

import jax
import numpy as np

from bmm_jax._tree import PyTree, leaves_with_paths
from bmm_jax.labels import Label, build_labels

# Flax families with a causal-LM class in transformers 4.57, and PyTorch-only families.
FLAX_LLM_FAMILIES = ("llama", "mistral", "gemma", "gpt2_lm")
TORCH_ONLY_FAMILIES = ("qwen2",)
LLM_FAMILIES = FLAX_LLM_FAMILIES + TORCH_ONLY_FAMILIES

# GPT-2's Conv1D weights are stored [d_in, d_out] in PyTorch (every other 2-D weight is a Linear).
_TORCH_TRANSPOSED = (r"^(?!.*(^|/)(c_attn|c_proj|c_fc)/kernel$).*kernel$",)
_LEAF_RENAME = {"kernel": "weight", "embedding": "weight", "scale": "weight"}


# ----------------------------------------------------------------------------- names
def torch_name(flax_path: str) -> str:
    """Flax param path -> PyTorch tensor name: ``model/layers/0/mlp/up_proj/kernel`` ->
    ``model.layers.0.mlp.up_proj.weight`` (``kernel``, ``embedding`` and LayerNorm ``scale``
    become ``weight``)."""
    parts = flax_path.split("/")
    parts[-1] = _LEAF_RENAME.get(parts[-1], parts[-1])
    return ".".join(parts)


def torch_group(group: str) -> str:
    """An input-group key of a Flax label tree in PyTorch naming (``model/layers/0/self_attn:qkv-input``
    -> ``model.layers.0.self_attn:qkv-input``; a single-module group is the module's tensor name)."""
    if ":" in group:
        parent, tag = group.rsplit(":", 1)
        return parent.replace("/", ".") + ":" + tag
    return torch_name(group)


def torch_state_dict(params: PyTree, *, tied: bool | None = None) -> dict[str, np.ndarray]:
    """Flax params of a causal LM -> ``{PyTorch name: numpy array in PyTorch layout}``.

    2-D ``kernel`` leaves are transposed (Linear: Flax ``[d_in, d_out]`` -> ``[d_out, d_in]``;
    GPT-2 Conv1D: Flax ``[d_out, d_in]`` -> ``[d_in, d_out]``); everything else keeps its layout.
    ``tied=True`` (default: ``lm_head`` equals the embedding's transpose) drops ``lm_head.weight``,
    as PyTorch checkpoints with tied embeddings do. Arrays are copied to host memory.
    """
    out = {}
    for path, leaf in leaves_with_paths(params):
        x = np.asarray(jax.device_get(leaf))
        if path.endswith("kernel") and x.ndim == 2:
            x = np.ascontiguousarray(x.T)        # safetensors writers take the buffer as it lies
        out[torch_name(path)] = x
    if "lm_head.weight" in out:
        emb = next((v for k, v in out.items() if k.endswith("embed_tokens.weight") or k.endswith("wte.weight")), None)
        if tied is None:
            tied = emb is not None and emb.shape == out["lm_head.weight"].shape and np.array_equal(
                emb, out["lm_head.weight"])
        if tied:
            del out["lm_head.weight"]
    return out


def tie_word_embeddings(params: PyTree) -> PyTree:
    """Copy of ``params`` with ``lm_head/kernel`` set to ``model/embed_tokens/embedding`` transposed
    (FlaxLlama / FlaxMistral with ``tie_word_embeddings``; other trees are returned unchanged).
    Apply it after a merge when the embeddings are tied, so that the head follows the merged
    embedding."""
    if not (isinstance(params, Mapping) and "lm_head" in params and "model" in params
            and "embed_tokens" in params["model"]):
        return params
    out = dict(params)
    out["lm_head"] = {**params["lm_head"], "kernel": params["model"]["embed_tokens"]["embedding"].T}
    return out


# ----------------------------------------------------------------------------- labels
def _shape_of(x) -> tuple[int, ...]:
    if isinstance(x, (tuple, list)) and all(isinstance(d, (int, np.integer)) for d in x):
        return tuple(int(d) for d in x)
    if hasattr(x, "shape"):
        return tuple(int(d) for d in x.shape)
    if hasattr(x, "get_shape"):                       # safetensors slice
        return tuple(int(d) for d in x.get_shape())
    raise TypeError(f"expected a shape tuple or an array-like with .shape, got {type(x).__name__}")


def _pseudo_path(name: str, ndim: int) -> str:
    parts = name.split(".")
    if parts[-1] == "weight" and ndim == 2:
        parts[-1] = "kernel"
    return "/".join(parts)


def _compile(patterns, what: str) -> list[re.Pattern]:
    if patterns is None:
        return []
    if isinstance(patterns, str):
        patterns = (patterns,)
    out = []
    for p in patterns:
        try:
            out.append(re.compile(p))
        except re.error as e:
            raise ValueError(f"{what} pattern {p!r} is not a valid regular expression: {e}") from None
    return out


def torch_labels(tensors: Mapping[str, Any], *, include: Sequence[str] | str | None = None,
                 exclude: Sequence[str] | str | None = None) -> dict[str, Label]:
    """Flat label tree ``{tensor name: Label}`` over PyTorch-named checkpoint tensors.

    Args:
      tensors: ``{name: shape}`` (a tuple of ints) or ``{name: array-like with .shape}``, e.g. the
        shapes read from safetensors headers, or numpy arrays.
      include: regular expressions on the tensor names; if given, only 2-D weights matching one
        of them are regressed. Each pattern must match at least one name.
      exclude: regular expressions of names never regressed; replaces the default (embeddings,
        heads: :data:`bmm_jax.labels.DEFAULT_EXCLUDE`). Each must match at least one name.

    Returns:
      ``{name: Label}`` with ``Label.path == name``. Regressed modules: every 2-D ``*.weight`` of
      a transformer block (q/k/v/o, gate/up/down, GPT-2 c_attn/c_proj/c_fc) with layout
      ``transposed`` (PyTorch Linear) or ``dense`` (GPT-2 Conv1D); kinds, blocks and input groups
      as :func:`bmm_jax.labels.build_labels` gives the Flax model (group keys in PyTorch naming,
      :func:`torch_group`). Biases, norms, embeddings and the head are carried. Use with a flat
      params dict ``{name: array}`` (``bmm_jax.labels.check_labels`` accepts it).
    """
    if not isinstance(tensors, Mapping) or not tensors:
        raise TypeError("tensors must be a non-empty mapping {tensor name: shape or array}")
    shapes = {str(k): _shape_of(v) for k, v in tensors.items()}
    pseudo = {n: _pseudo_path(n, len(s)) for n, s in shapes.items()}
    inc = _compile(include, "include")
    exc = _compile(exclude, "exclude")
    for what, pats in (("include", inc), ("exclude", exc)):
        for p in pats:
            if not any(p.search(n) for n in shapes):
                raise ValueError(f"{what} pattern {p.pattern!r} matches no tensor name "
                                 f"(names look like {sorted(shapes)[:3]})")
    # zero-stride arrays of the right shapes: build_labels reads shapes only
    tree = {pseudo[n]: np.broadcast_to(np.zeros((), np.float32), s) for n, s in shapes.items()}
    transposed = _TORCH_TRANSPOSED
    if inc or exc:
        candidates = [n for n, s in shapes.items() if len(s) == 2 and pseudo[n].endswith("/kernel")]
        # as build_labels: ``exclude`` replaces the default exclusions; with ``include`` only the
        # user's exclusions apply
        sel = [n for n in candidates
               if (not inc or any(p.search(n) for p in inc)) and not any(p.search(n) for p in exc)]
        if not sel:
            raise ValueError("include/exclude select no 2-D weight of the checkpoint")
        rx = "^(" + "|".join(re.escape(pseudo[n]) for n in sel) + ")$"
        labs = build_labels(tree, include=rx, transposed=transposed)
    else:
        labs = build_labels(tree, transposed=transposed)
    back = {p: n for n, p in pseudo.items()}
    out = {}
    for p, lab in labs.items():
        name = back[p]
        if lab.regressed:
            group = lab.input_group
            group = back[group] if group in back else (
                group.rsplit(":", 1)[0].replace("/", ".") + ":" + group.rsplit(":", 1)[1])
            lab = Label(path=name, regressed=True, kind=lab.kind, block=lab.block, input_group=group,
                        layout=lab.layout, d_in=lab.d_in, d_out=lab.d_out)
        else:
            lab = Label(path=name, regressed=False, block=lab.block)
        out[name] = lab
    return {n: out[n] for n in sorted(out)}


def labels_from_safetensors(paths: str | Sequence[str], **kwargs) -> dict[str, Label]:
    """:func:`torch_labels` from the headers of safetensors files (one file or the shards of one
    checkpoint; no tensor is read). Keyword arguments as :func:`torch_labels`."""
    from safetensors import safe_open
    if isinstance(paths, (str, bytes)) or hasattr(paths, "__fspath__"):
        paths = [paths]
    shapes = {}
    for p in paths:
        with safe_open(str(p), framework="numpy") as f:
            for name in f.keys():
                if name in shapes:
                    raise ValueError(f"tensor {name!r} appears in more than one shard ({p})")
                shapes[name] = tuple(f.get_slice(name).get_shape())
    return torch_labels(shapes, **kwargs)


__all__ = ["FLAX_LLM_FAMILIES", "TORCH_ONLY_FAMILIES", "LLM_FAMILIES", "torch_name", "torch_group",
           "torch_state_dict", "tie_word_embeddings", "torch_labels", "labels_from_safetensors"]
