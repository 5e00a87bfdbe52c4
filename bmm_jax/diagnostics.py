"""Diagnostics of a merge as pytrees: arrays that stay on device, static facts as metadata.

One schema for :func:`bmm_jax.merge` and :meth:`bmm_jax.Prepared.merge`. Both containers are
registered pytrees (their arrays are children, the static facts auxiliary data), so a merge inside
``jax.jit`` / ``vmap`` / ``scan`` returns them like any other output. Mapping-style access is kept:
``diag["modules"][path]["rho"]``, ``diag["carry"]``.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax

# per-module array fields, in order
ARRAY_FIELDS = ("rho", "scale", "lambda", "delta_norm", "anchor_distance", "carried")
STATIC_FIELDS = ("kind", "block", "shape")


class _MappingAccess:
    """``get`` / ``keys`` / ``in`` on top of ``__getitem__`` (mapping-style access to a dataclass)."""

    def get(self, key: str, default=None):
        try:
            return self[key]
        except KeyError:
            return default

    def __contains__(self, key) -> bool:
        return key in self.keys()


@dataclasses.dataclass(frozen=True)
class ModuleDiagnostics(_MappingAccess):
    """One regressed module.

    Arrays (float32 scalars, or with leading batch axes under ``vmap``): ``rho``, ``scale`` (assembly
    scale ``s``), ``lambda`` (``rho tr(S)/d_in``), ``delta_norm`` (``||s Delta||_F``),
    ``anchor_distance`` (``||s Delta - s T_a||_F / ||T_a||_F``), ``carried`` (bool: no expert changed
    the module, so it is carried from the base). Static: ``kind``, ``block``, ``shape`` (``[d_in, d_out]``).
    """
    rho: Any
    scale: Any
    lam: Any
    delta_norm: Any
    anchor_distance: Any
    carried: Any
    kind: str | None = None
    block: int | None = None
    shape: tuple = ()

    def __getitem__(self, key: str):
        if key == "lambda":
            return self.lam
        if key == "shape":
            return list(self.shape)
        if key in ARRAY_FIELDS or key in STATIC_FIELDS:
            return getattr(self, key)
        raise KeyError(key)

    def keys(self):
        return ARRAY_FIELDS + STATIC_FIELDS

    def to_dict(self) -> dict:
        """Host copy: Python floats / bools (one ``jax.device_get``)."""
        host = jax.device_get([getattr(self, "lam" if f == "lambda" else f) for f in ARRAY_FIELDS])
        out = {f: (bool(v) if f == "carried" else float(v)) for f, v in zip(ARRAY_FIELDS, host)}
        out.update(kind=self.kind, block=self.block, shape=list(self.shape))
        return out


jax.tree_util.register_dataclass(ModuleDiagnostics,
                                 data_fields=["rho", "scale", "lam", "delta_norm", "anchor_distance", "carried"],
                                 meta_fields=["kind", "block", "shape"])


@dataclasses.dataclass(frozen=True)
class MergeDiagnostics(_MappingAccess):
    """Whole-merge diagnostics: ``modules`` (``{path: ModuleDiagnostics}`` in tree order) and static
    ``carry``, ``prior``, ``num_experts``, ``devices``, ``factor_dtype``."""
    modules: dict
    carry: str = "anchor"
    prior: str = "isotropic"
    num_experts: int = 0
    devices: int = 1
    factor_dtype: str = "float32"

    def __getitem__(self, key: str):
        if key in ("modules", "carry", "prior", "num_experts", "devices", "factor_dtype"):
            return getattr(self, key)
        raise KeyError(key)

    def keys(self):
        return ("modules", "carry", "prior", "num_experts", "devices", "factor_dtype")

    def to_dict(self) -> dict:
        """JSON-ready host copy (one ``jax.device_get`` of every module's arrays)."""
        return {"modules": {p: m.to_dict() for p, m in self.modules.items()}, "carry": self.carry,
                "prior": self.prior, "num_experts": self.num_experts, "devices": self.devices,
                "factor_dtype": self.factor_dtype}


jax.tree_util.register_dataclass(MergeDiagnostics, data_fields=["modules"],
                                 meta_fields=["carry", "prior", "num_experts", "devices", "factor_dtype"])

__all__ = ["ModuleDiagnostics", "MergeDiagnostics"]
