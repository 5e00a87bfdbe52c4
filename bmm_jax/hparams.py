"""Hyperparameters of a merge: per-module ``(rho, scale)`` from a flat or grouped mapping.

``hparams`` is ``{"rho": r, "scale": s}`` for every module, or a mapping from group labels to such
dicts. A module's entry is looked up, most specific first, under: its leaf path, its module path
(without ``/kernel``), its block (``"block3"``), its kind (``"q"``, ``"mlp-in"``...; aliases
``"out"``, ``"fc1"``...), then ``"global"`` / ``"default"``. ``scale`` (the *assembly* scale ``s`` of
``W = W_0 + s Delta``) defaults to 1.

Values may be Python numbers, numpy scalars or JAX scalars, traced ones included (``jit``,
``vmap`` over a batch of settings, ``grad`` with respect to them): the structure of the mapping is
static and checked at trace time; the values are checked (finite, ``rho >= 0``, ``scale >= 0``)
only when they are concrete.
"""
from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Mapping

import jax
import numpy as np

from bmm_jax._tree import PyTree
from bmm_jax.labels import Label, label_list

FALLBACK_KEYS = ("global", "default")
KIND_ALIASES = {"attn-out": ("out", "attn_out", "o"), "mlp-in": ("mlp_in", "fc1"), "mlp-out": ("mlp_out", "fc2")}
KEYS = ("rho", "scale")
# an assembly scale above this is accepted with a warning (the search space is [0.5, 1.5])
UNUSUAL_SCALE = 10.0


def is_single(h: Mapping) -> bool:
    """True for one ``{"rho": ..., "scale": ...}`` entry (as opposed to a group mapping)."""
    return "rho" in h and not isinstance(h["rho"], Mapping)


def is_concrete(x) -> bool:
    """True unless ``x`` is a JAX tracer (its value unknown at trace time)."""
    return not isinstance(x, jax.core.Tracer)


def check_number(value, what: str):
    """A scalar hyperparameter: a real number or a 0-d real array (traced ones included).

    Returns the value unchanged (Python numbers stay Python numbers). Raises ``TypeError`` naming
    ``what`` for strings, booleans, containers and arrays of other shapes or dtypes.
    """
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{what} must be a number, got a bool ({value!r})")
    if isinstance(value, numbers.Real):
        return value
    shape = getattr(value, "shape", None)
    dtype = getattr(value, "dtype", None)
    if shape is not None and dtype is not None:
        if tuple(shape) != ():
            raise TypeError(f"{what} must be a scalar, got an array of shape {tuple(shape)}")
        kind = np.dtype(dtype).kind if np.dtype(dtype).name != "bfloat16" else "f"
        if kind not in "fiu":
            raise TypeError(f"{what} must be a real number, got dtype {dtype}")
        return value
    raise TypeError(f"{what} must be a number, got {type(value).__name__} ({value!r})")


def concrete_float(x) -> float | None:
    """``float(x)`` for a concrete Python / numpy scalar, ``None`` for a JAX array or tracer
    (a concrete jax scalar is read with one explicit ``jax.device_get``)."""
    if isinstance(x, jax.core.Tracer):
        return None
    if isinstance(x, jax.Array):
        return float(jax.device_get(x))
    return float(x)


def check_entry(entry, where: str = ""):
    """``(rho, scale)`` of one entry, validated: structure always, values when concrete."""
    if not isinstance(entry, Mapping):
        raise TypeError(f"hparams{where} must be a dict like {{'rho': 0.3, 'scale': 1.0}}, got "
                        f"{type(entry).__name__}")
    unknown = set(entry) - set(KEYS)
    if unknown:
        raise ValueError(f"hparams{where} has unknown keys {sorted(map(str, unknown))}; expected 'rho' and "
                         "optionally 'scale'")
    if "rho" not in entry:
        raise ValueError(f"hparams{where} has no 'rho'")
    rho = check_number(entry["rho"], f"hparams{where}['rho']")
    scale = check_number(entry.get("scale", 1.0), f"hparams{where}['scale']")
    r = concrete_float(rho) if not isinstance(rho, jax.Array) else None
    if r is not None:
        check_rho(r, where=f" (hparams{where})")
    s = concrete_float(scale) if not isinstance(scale, jax.Array) else None
    if s is not None:
        check_scale(s, f"hparams{where}['scale']")
    return rho, scale


def check_rho(rho, where: str = "") -> None:
    """Concrete ``rho``: finite and ``>= 0``."""
    r = np.asarray(rho, dtype=np.float64)
    if not np.all(np.isfinite(r)):
        raise ValueError(f"rho must be finite{where}, got {rho}")
    if np.any(r < 0):
        raise ValueError(f"rho must be >= 0{where}, got {rho}")


def check_scale(scale: float, what: str) -> None:
    """Concrete scale: finite and ``>= 0`` (a warning above :data:`UNUSUAL_SCALE`)."""
    if not math.isfinite(scale):
        raise ValueError(f"{what} must be finite, got {scale}")
    if scale < 0:
        raise ValueError(f"{what} must be >= 0 (a negative scale reverses the merged update), got {scale}")
    if scale == 0:
        warnings.warn(f"{what} = 0: the regressed modules stay at the base (the merged update is scaled "
                      "away)", stacklevel=3)
    if scale > UNUSUAL_SCALE:
        warnings.warn(f"{what} = {scale} is unusually large (the search space is [0.5, 1.5]); the merge "
                      "extrapolates far beyond the experts", stacklevel=3)


def check_keys(hparams) -> None:
    """Static shape of an ``hparams`` argument: a dict whose group keys are strings."""
    if not isinstance(hparams, Mapping):
        raise TypeError(f"hparams must be a dict, got {type(hparams).__name__}")
    for k in hparams:
        if not isinstance(k, str):
            raise TypeError(f"hparams keys must be strings (group names), got {type(k).__name__} ({k!r})")


def module_keys(label: Label) -> tuple[str, ...]:
    """Lookup keys of a module's hyperparameters, most specific first."""
    keys = [label.path]
    if label.path.endswith("/kernel"):
        keys.append(label.path[: -len("/kernel")])
    if label.block is not None:
        keys.append(f"block{label.block}")
    keys.append(label.kind)
    keys.extend(KIND_ALIASES.get(label.kind, ()))
    return tuple(keys) + FALLBACK_KEYS


def resolve_hparams(hparams: Mapping, labels: PyTree) -> dict:
    """``{module path: (rho, scale)}`` for every regressed module of ``labels``.

    Values keep their type (Python number or JAX scalar, possibly traced).

    Raises:
      ValueError / TypeError: ``rho < 0``, a non-number, an unknown key, a key that names no module
      or group, or a module with no entry (and no ``"global"`` fallback).
    """
    mods = [l for l in label_list(labels) if l.regressed]
    if not isinstance(hparams, Mapping):
        raise TypeError(f"hparams must be a dict, got {type(hparams).__name__}")
    if is_single(hparams):
        rho, scale = check_entry(hparams, "")
        return {l.path: (rho, scale) for l in mods}
    if not hparams:
        raise ValueError("hparams is empty; pass {'rho': ..., 'scale': ...} or a group mapping")
    if "scale" in hparams and not isinstance(hparams["scale"], Mapping):
        raise ValueError("hparams has 'scale' but no 'rho'; pass {'rho': ..., 'scale': ...}")
    entries = {}
    for k, v in hparams.items():
        if not isinstance(k, str):
            raise TypeError(f"hparams keys must be strings (group names), got {type(k).__name__} ({k!r})")
        entries[k] = check_entry(v, f"[{k!r}]")
    known = set(FALLBACK_KEYS)
    for l in mods:
        known.update(module_keys(l))
    unknown = sorted(set(entries) - known)
    if unknown:
        raise ValueError(f"hparams keys {unknown[:5]} name no regressed module, block or kind; "
                         f"known kinds: {sorted({l.kind for l in mods})}, e.g. module "
                         f"'{mods[0].path if mods else '?'}'")
    out = {}
    for l in mods:
        hit = next((entries[k] for k in module_keys(l) if k in entries), None)
        if hit is None:
            raise ValueError(f"module '{l.path}' (kind {l.kind}, block {l.block}) has no hparams "
                             f"entry; add one for it or a 'global' entry")
        out[l.path] = hit
    return out


__all__ = ["resolve_hparams", "module_keys", "check_entry", "check_number", "check_rho", "check_scale",
           "FALLBACK_KEYS", "KIND_ALIASES", "is_single", "concrete_float"]
