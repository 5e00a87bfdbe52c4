"""Label trees for flat checkpoints: one :class:`bmm_jax.labels.Label` per tensor name.

A HF checkpoint is a flat ``{name: tensor}`` map. In PyTorch naming (what the Hub stores, e.g.
``model.layers.0.self_attn.q_proj.weight``) an ``nn.Linear`` weight is ``[d_out, d_in]`` (layout
``transposed``) and GPT-2's ``Conv1D`` weight (``h.0.attn.c_attn.weight``) is ``[d_in, d_out]``
(``dense``). In Flax naming (``...q_proj.kernel``) kernels are ``[d_in, d_out]`` and GPT-2's are
transposed, as in :mod:`bmm_jax.labels`.

The kind (q, k, v, qkv, attn-out, mlp-in, mlp-out), block index and input group of each tensor
come from :func:`bmm_jax.labels.build_labels` applied to a shadow tree whose paths are the names
with ``.`` -> ``/`` (and ``weight`` -> ``kernel`` for 2-D weights in PyTorch naming), so both
namings share the library's one table of module names.

PyTorch naming is delegated to :func:`bmm_jax.models.llm.torch_labels` (the library's flat label
tree, whose input-group keys match Gram files); Flax naming is handled here. Default selection
(regressed): every 2-D weight except embeddings and heads (:data:`bmm_jax.labels.DEFAULT_EXCLUDE`;
in Flax naming also only inside numbered blocks); everything else (embeddings, ``lm_head``,
norms, biases) is carried. ``include`` / ``exclude`` are regular expressions matched
(``re.search``) against the tensor names.
"""
from __future__ import annotations

import re
from typing import Mapping, Sequence

import jax
import numpy as np

from bmm_jax.labels import DEFAULT_EXCLUDE, Label, build_labels, label_list

NAMINGS = ("auto", "pt", "flax")
# Tensors whose rows index the vocabulary (may differ in number between experts).
VOCAB_PATTERNS = (r"embed_tokens\.(weight|embedding)$", r"(^|\.)wte\.(weight|embedding)$", r"(^|\.)lm_head\.(weight|kernel)$",
                  r"(^|\.)embed_out\.weight$", r"word_embeddings\.(weight|embedding)$")


def detect_naming(names: Sequence[str]) -> str:
    """``"flax"`` if any tensor name ends in ``.kernel`` (Flax naming), else ``"pt"``."""
    return "flax" if any(n.endswith(".kernel") for n in names) else "pt"


def shadow_path(name: str, ndim: int, naming: str) -> str:
    """The pytree path used to classify tensor ``name`` (``.`` -> ``/``; PyTorch 2-D ``weight`` ->
    ``kernel``)."""
    parts = name.split(".")
    if naming == "pt" and ndim == 2 and parts[-1] == "weight":
        parts[-1] = "kernel"
    return "/".join(parts)


def _patterns(value, what: str, names: Sequence[str]) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = (value,)
    out = tuple(value)
    for p in out:
        if not isinstance(p, str):
            raise TypeError(f"{what} patterns must be strings, got {type(p).__name__}")
        try:
            rx = re.compile(p)
        except re.error as e:
            raise ValueError(f"{what} pattern {p!r} is not a valid regular expression: {e}") from None
        if not any(rx.search(n) for n in names):
            raise ValueError(f"{what} pattern {p!r} matches no tensor name (names look like {list(names)[:3]})")
    return out


def tensor_labels(shapes: Mapping[str, Sequence[int]], *, include: Sequence[str] | str | None = None,
                  exclude: Sequence[str] | str | None = None, naming: str = "auto") -> dict[str, Label]:
    """``{tensor name: Label}`` for a flat checkpoint (``Label.path`` is the tensor name).

    Args:
      shapes: ``{name: shape}`` of every tensor (e.g. of the base checkpoint).
      include: regexes on tensor names; if given, only 2-D weights matching one are regressed.
      exclude: regexes on tensor names never regressed (replaces the default exclusion of
        embeddings and heads; the "inside a numbered block" rule stays unless ``include`` is given).
      naming: ``"pt"`` (PyTorch, ``[d_out, d_in]`` weights), ``"flax"`` (``[d_in, d_out]`` kernels)
        or ``"auto"`` (:func:`detect_naming`).

    Returns:
      One label per tensor, in the order of ``shapes``; use it as the label tree of a one-leaf
      pytree ``{name: array}`` (``{name: labels[name]}``) or of the whole flat dict.

    Raises:
      ValueError: an invalid pattern, one that matches no name, or an unknown naming.
    """
    names = list(shapes)
    if naming not in NAMINGS:
        raise ValueError(f"unknown naming {naming!r}; expected one of {NAMINGS}")
    if naming == "auto":
        naming = detect_naming(names)
    if naming == "pt":                                  # the library's PyTorch-named label tree
        from bmm_jax.models.llm import torch_labels
        labs = torch_labels({n: tuple(int(d) for d in shapes[n]) for n in names}, include=include, exclude=exclude)
        return {n: labs[n] for n in names}
    include = _patterns(include, "include", names)
    exclude = _patterns(exclude, "exclude", names)
    shadow: dict = {}
    paths = {}
    for n in names:
        shape = tuple(int(d) for d in shapes[n])
        p = shadow_path(n, len(shape), naming)
        paths[n] = p
        node = shadow
        parts = p.split("/")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"tensor name {n!r} nests under another tensor's name")
        node[parts[-1]] = jax.ShapeDtypeStruct(shape, np.float32)
    from bmm_jax.labels import DEFAULT_TRANSPOSED
    transposed = DEFAULT_TRANSPOSED
    kernels = any(p.endswith("kernel") for p in paths.values())
    by_path = {}
    if kernels:
        full = build_labels(shadow, include=(r"kernel$",), transposed=transposed)
        by_path = {l.path: l for l in label_list(full)}
    out = {}
    for n in names:
        p = paths[n]
        l = by_path.get(p)
        if l is None:
            l = Label(path=p, regressed=False, block=_block(p))
        if l.regressed:
            if include is not None:
                keep = any(re.search(x, n) for x in include)
            else:
                keep = l.block is not None and not any(re.search(x, p) for x in DEFAULT_EXCLUDE)
            if exclude is not None and any(re.search(x, n) for x in exclude):
                keep = False
            if not keep:
                l = Label(path=p, regressed=False, block=l.block)
        group = l.input_group.replace("/", ".") if l.input_group else None
        out[n] = Label(path=n, regressed=l.regressed, kind=l.kind, block=l.block, input_group=group,
                       layout=l.layout, d_in=l.d_in, d_out=l.d_out)
    return out


def _block(path: str) -> int | None:
    m = re.search(r"(?:^|/)_?(?:layer|layers|h|blocks|block|transformer_blocks)[/_](\d+)(?:/|$)", path)
    return int(m.group(1)) if m else None


def is_vocab_tensor(name: str, patterns: Sequence[str] = VOCAB_PATTERNS) -> bool:
    """True for tensors whose rows index the vocabulary (embeddings, ``lm_head``)."""
    return any(re.search(p, name) for p in patterns)


def flax_path(name: str, ndim: int, naming: str = "pt") -> str:
    """The Flax params path (``a/b/kernel``) of tensor ``name`` (for Grams keyed by Flax paths)."""
    return shadow_path(name, ndim, naming)


__all__ = ["tensor_labels", "detect_naming", "shadow_path", "flax_path", "is_vocab_tensor", "VOCAB_PATTERNS"]
