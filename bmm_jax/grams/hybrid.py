"""Hybrid (few-shot) Grams (method.md §3.3).

Per module and expert::

    G_k = tr(G_k^data) * [ beta * G_k^data / tr(G_k^data) + (1 - beta) * G^_k / tr(G^_k) ]

mixing a few-sample activation Gram with the data-free estimate; ``beta in [0, 1]``. A zero trace
drops that term (an expert that left the module unchanged keeps its data Gram; an empty data Gram
gives zero).
"""
from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from bmm_jax.grams._base import Grams


@jax.jit
def mix(data, free, beta):
    """``[K,d,d]`` data Grams and ``[K,d,d]`` data-free Grams -> hybrid ``[K,d,d]``."""
    td = jnp.trace(data, axis1=-2, axis2=-1)[:, None, None]
    tf = jnp.trace(free, axis1=-2, axis2=-1)[:, None, None]
    nd = jnp.where(td > 0, data / jnp.where(td > 0, td, 1.0), 0.0)
    nf = jnp.where(tf > 0, free / jnp.where(tf > 0, tf, 1.0), 0.0)
    w_data = jnp.where(tf > 0, beta, 1.0)
    return td * (w_data * nd + (1.0 - w_data) * nf)


def hybrid(data_grams: Grams, data_free_grams: Grams, beta: float = 0.5) -> Grams:
    """Hybrid Grams for every module present in both inputs (keyed by module path).

    Args:
      data_grams: few-sample activation Grams (a :class:`Grams` or ``{path: [K, d, d]}``).
      data_free_grams: data-free Grams (:func:`bmm_jax.grams.data_free`) of the same modules.
      beta: weight of the data Grams in ``[0, 1]`` (may be traced: ``vmap`` / ``grad`` over it).

    Eagerly, NaN/Inf, asymmetric or indefinite data Grams are rejected naming the module. Pure and
    traceable otherwise.
    """
    from bmm_jax._tree import is_traced
    from bmm_jax.hparams import check_number
    from bmm_jax.validation import as_gram_array, check_gram_values
    check_number(beta, "beta")
    if not isinstance(beta, jax.Array) and not 0.0 <= float(beta) <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    for name, g in (("data_grams", data_grams), ("data_free_grams", data_free_grams)):
        if not isinstance(g, Mapping):
            raise TypeError(f"{name} must be a bmm_jax.grams.Grams or a dict {{module path: [K, d, d]}}, got "
                            f"{type(g).__name__}")
    missing = [p for p in data_free_grams if p not in data_grams]
    if missing:
        raise ValueError(f"data Grams lack modules {missing[:3]}{' ...' if len(missing) > 3 else ''}")
    data = {}
    for path in data_free_grams:
        d = as_gram_array(data_grams[path], f"data Gram of '{path}'")
        if d.ndim != 3 or d.shape[-1] != d.shape[-2]:
            raise ValueError(f"data Gram of '{path}' must be [K, d, d], got shape {tuple(d.shape)}")
        data[path] = d
    if not is_traced((data, beta)):
        check_gram_values(list(data.items()))
    dense, key_of = {}, {}
    for path in data_free_grams:
        d, f = data[path], data_free_grams[path]
        if tuple(d.shape) != tuple(f.shape):
            raise ValueError(f"module '{path}': data Gram shape {tuple(d.shape)} != data-free shape {tuple(f.shape)}")
        dense[path] = mix(jnp.asarray(d, jnp.float32), jnp.asarray(f, jnp.float32), jnp.asarray(beta, jnp.float32))
        key_of[path] = path
    return Grams(dense, key_of, kind="hybrid")
