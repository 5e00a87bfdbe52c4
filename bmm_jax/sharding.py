"""Shard stacks of same-shape modules over every device.

Modules of one shape are stacked on a leading "module" axis; that axis is padded to a multiple of
the device count and laid out with ``NamedSharding(Mesh(devices, ("modules",)), P("modules"))`` so
that a vmapped, jitted solve runs SPMD across devices. Padding rows are copies of row 0 (always
well posed) and are dropped after the solve.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXIS = "modules"


def module_mesh(devices=None) -> Mesh:
    """A 1-D mesh named ``"modules"`` over ``devices`` (default: all devices)."""
    devs = np.asarray(jax.devices() if devices is None else devices)
    return Mesh(devs.reshape(-1), (AXIS,))


def padded_size(m: int, mesh: Mesh) -> int:
    n = mesh.devices.size
    return -(-m // n) * n


def shard_stack(arrays, mesh: Mesh):
    """Stack a list of same-shape arrays on axis 0, pad to the device count, shard axis 0."""
    x = jnp.stack(arrays) if isinstance(arrays, (list, tuple)) else arrays
    m = x.shape[0]
    target = padded_size(m, mesh)
    if target != m:
        x = jnp.concatenate([x, jnp.broadcast_to(x[:1], (target - m,) + x.shape[1:])])
    spec = P(AXIS, *([None] * (x.ndim - 1)))
    return jax.device_put(x, NamedSharding(mesh, spec))
