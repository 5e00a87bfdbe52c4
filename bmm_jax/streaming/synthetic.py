"""Random HF checkpoints of decoder LLM shapes, written tensor by tensor (tests and benchmarks).

:func:`llm_shapes` lists the tensors of a ``*ForCausalLM`` in PyTorch naming (what the Hub
stores) for ``llama``, ``mistral``, ``qwen2`` (q/k/v biases), ``gemma`` and ``gpt2`` (Conv1D
weights ``[d_in, d_out]``); :func:`write_random_model` writes a base (weights ``N(0, 0.02)``) and
:func:`write_expert` an expert: the base plus a small Gaussian perturbation of every 2-D weight
(optionally with extra vocabulary rows). Memory is one tensor (row chunks for the embeddings), so
Llama-3.2-1B-sized files are built on a small machine.
"""
from __future__ import annotations

import json
import os
from typing import Mapping

import ml_dtypes
import numpy as np

from bmm_jax.streaming.reader import Checkpoint
from bmm_jax.streaming.writer import Entry, OutputFolder, ShardWriter, plan_shards, shard_names, write_index

FAMILIES = ("llama", "mistral", "qwen2", "gemma", "gpt2")
LLAMA_3_2_1B = {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
                "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": True, "head_dim": 64,
                "max_position_embeddings": 131072, "rope_theta": 500000.0, "rms_norm_eps": 1e-5}
_ROW_CHUNK = 1 << 24                       # elements per generated chunk


def hf_config(family: str, **overrides) -> dict:
    """``config.json`` content of a ``family`` model (transformers' config class defaults + overrides)."""
    import transformers
    cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
           "qwen2": transformers.Qwen2Config, "gemma": transformers.GemmaConfig,
           "gpt2": transformers.GPT2Config}[family]
    arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
            "gemma": "GemmaForCausalLM", "gpt2": "GPT2LMHeadModel"}[family]
    cfg = cls(**overrides).to_dict()
    cfg["architectures"] = [arch]
    return cfg


def llm_shapes(config: Mapping) -> dict[str, tuple[int, ...]]:
    """``{tensor name: shape}`` of a causal LM in PyTorch naming, in storage order."""
    fam = config["model_type"]
    if fam == "gpt2":
        d, v, n = config["n_embd"], config["vocab_size"], config["n_layer"]
        inner = config.get("n_inner") or 4 * d
        out = {"transformer.wte.weight": (v, d), "transformer.wpe.weight": (config["n_positions"], d)}
        for i in range(n):
            p = f"transformer.h.{i}."
            out.update({p + "ln_1.weight": (d,), p + "ln_1.bias": (d,), p + "attn.c_attn.weight": (d, 3 * d),
                        p + "attn.c_attn.bias": (3 * d,), p + "attn.c_proj.weight": (d, d), p + "attn.c_proj.bias": (d,),
                        p + "ln_2.weight": (d,), p + "ln_2.bias": (d,), p + "mlp.c_fc.weight": (d, inner),
                        p + "mlp.c_fc.bias": (inner,), p + "mlp.c_proj.weight": (inner, d), p + "mlp.c_proj.bias": (d,)})
        out.update({"transformer.ln_f.weight": (d,), "transformer.ln_f.bias": (d,)})
        return out
    if fam not in FAMILIES:
        raise ValueError(f"unknown family {fam!r}; expected one of {FAMILIES}")
    d, f, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    h, kv = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    hd = config.get("head_dim") or d // h
    out = {"model.embed_tokens.weight": (v, d)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out.update({p + "self_attn.q_proj.weight": (h * hd, d), p + "self_attn.k_proj.weight": (kv * hd, d),
                    p + "self_attn.v_proj.weight": (kv * hd, d), p + "self_attn.o_proj.weight": (d, h * hd)})
        if fam == "qwen2":
            out.update({p + "self_attn.q_proj.bias": (h * hd,), p + "self_attn.k_proj.bias": (kv * hd,),
                        p + "self_attn.v_proj.bias": (kv * hd,)})
        out.update({p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d),
                    p + "mlp.down_proj.weight": (d, f), p + "input_layernorm.weight": (d,),
                    p + "post_attention_layernorm.weight": (d,)})
    out["model.norm.weight"] = (d,)
    if not config.get("tie_word_embeddings", fam != "qwen2"):
        out["lm_head.weight"] = (v, d)
    return out


def _write_folder(path: str, config: Mapping, entries: list[Entry], fill, max_shard_size) -> str:
    """Write every entry through ``fill(entry, writer)`` into an atomically created folder."""
    folder = OutputFolder(path)
    try:
        shards = plan_shards(entries, max_shard_size)
        names = shard_names(len(shards))
        weight_map = {}
        for fn, s in zip(names, shards):
            w = ShardWriter(folder.path(fn), s, metadata={"format": "pt"})
            for e in s:
                fill(e, w)
                weight_map[e.name] = fn
            w.close()
        if len(shards) > 1:
            write_index(folder.tmp, weight_map, sum(e.nbytes for e in entries))
        with open(folder.path("config.json"), "w") as f:
            json.dump(dict(config), f, indent=1)
        return folder.commit()
    except BaseException:
        folder.abort()
        raise


def _rows(total: int, row: int):
    step = max(1, _ROW_CHUNK // max(1, row))
    for s in range(0, total, step):
        yield s, min(total, s + step)


def write_random_model(path: str, config: Mapping, *, dtype="bfloat16", seed: int = 0,
                       max_shard_size="5GB") -> str:
    """Write a base model with random weights: 2-D ``N(0, 0.02)``, norms ``1 + N(0, 0.02)`` (GPT-2
    LayerNorm) or ``N(0, 0.02)`` (Gemma's ``1 + w``) and 1, biases ``N(0, 0.02)``."""
    dt = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    shapes = llm_shapes(config)
    entries = [Entry(n, dt, s) for n, s in shapes.items()]
    rng = np.random.default_rng(seed)
    gemma = config["model_type"] == "gemma"

    def fill(e: Entry, w: ShardWriter):
        if len(e.shape) == 2:
            for lo, hi in _rows(e.shape[0], e.shape[1]):
                w.write_rows(e.name, lo, (0.02 * rng.standard_normal((hi - lo, e.shape[1]), np.float32)).astype(dt))
            return
        x = 0.02 * rng.standard_normal(e.shape, np.float32)
        if e.name.endswith("norm.weight") or ".ln_" in e.name and e.name.endswith(".weight"):
            x = x if gemma else 1.0 + x
        w.write(e.name, x.astype(dt))

    return _write_folder(path, config, entries, fill, max_shard_size)


def write_expert(path: str, base: str, *, seed: int, scale: float = 0.05, extra_vocab_rows: int = 0,
                 max_shard_size="5GB", perturb_all: bool = False) -> str:
    """An expert of the model at ``base``: every 2-D weight plus ``scale * std(weight) * N(0, 1)``
    (every floating tensor with ``perturb_all``), other tensors copied; ``extra_vocab_rows`` random
    rows appended to the vocabulary tensors (``config.json``'s ``vocab_size`` follows)."""
    from bmm_jax.streaming.labels import is_vocab_tensor
    ck = Checkpoint(base)
    config = dict(ck.config or {})
    rng = np.random.default_rng(seed)
    entries = []
    for n in ck.names():
        i = ck.info(n)
        shape = i.shape
        if extra_vocab_rows and is_vocab_tensor(n):
            shape = (shape[0] + extra_vocab_rows,) + shape[1:]
        entries.append(Entry(n, i.dtype, shape))
    if extra_vocab_rows and "vocab_size" in config:
        config["vocab_size"] = config["vocab_size"] + extra_vocab_rows

    def fill(e: Entry, w: ShardWriter):
        i = ck.info(e.name)
        if len(e.shape) == 2 or perturb_all:
            rows = i.shape[0] if i.shape else 1
            row = int(np.prod(i.shape[1:], dtype=np.int64)) if i.shape else 1
            for lo, hi in _rows(rows, row):
                x = np.asarray(ck.rows(e.name, lo, hi) if i.shape else ck.tensor(e.name), np.float32)
                std = float(np.std(x)) or 0.02
                x = x + scale * std * rng.standard_normal(x.shape, np.float32)
                if i.shape:
                    w.write_rows(e.name, lo, x.astype(i.dtype))
                else:
                    w.write(e.name, x.astype(i.dtype))
                ck.release(e.name, lo, hi) if i.shape else None
        else:
            w.write(e.name, np.array(ck.tensor(e.name)))
        if e.shape != i.shape:
            extra = (0.02 * rng.standard_normal((e.shape[0] - i.shape[0],) + i.shape[1:], np.float32)).astype(i.dtype)
            w.write_rows(e.name, i.shape[0], extra)

    out = _write_folder(path, config, entries, fill, max_shard_size)
    ck.close()
    return out


__all__ = ["FAMILIES", "LLAMA_3_2_1B", "hf_config", "llm_shapes", "write_random_model", "write_expert"]
