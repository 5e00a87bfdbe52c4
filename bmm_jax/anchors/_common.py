"""Machinery shared by the anchors: validation, leaf-by-leaf task vectors, assembly.

Every anchor works leaf by leaf (never stacking the whole model's task vectors): for leaf ``i`` it
builds ``taus = [K, *leaf.shape]`` (``theta_k - theta_0``) in the *compute dtype* (float32, or
float64 for float64 leaves), computes a merged task vector ``delta`` and writes
``theta_0 + scale * delta`` cast back to the leaf's dtype. Non-floating leaves (integer buffers)
are always carried from ``theta_0``.

Regressed modules are the leaves the label tree (:func:`bmm_jax.labels.build_labels`) marks as
``regressed``; their 2-D view ``[d_in, d_out]`` (Flax ``Dense`` convention) comes from
:meth:`bmm_jax.labels.Label.to_matrix`, so GPT-2's transposed Conv1D kernels and 1x1 convolutions
are handled in one place.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from bmm_jax._tree import PyTree, check_experts, leaves_with_paths
from bmm_jax.labels import Label, build_labels, check_labels, label_list
from bmm_jax.solve import single_thread_lapack

HIGHEST = jax.lax.Precision.HIGHEST


class Context(NamedTuple):
    """Validated inputs of one merge, flattened to leaves (all lists in ``tree_flatten`` order).

    Attributes:
      treedef: tree structure of ``base``.
      paths: leaf paths ``"a/b/kernel"``.
      base_leaves: ``theta_0`` leaves.
      expert_leaves: ``expert_leaves[k][i]`` = leaf ``i`` of expert ``k``.
      labels: one :class:`Label` per leaf, or ``None`` when the method needs none.
    """
    treedef: Any
    paths: list
    base_leaves: list
    expert_leaves: list
    labels: list | None

    @property
    def num_experts(self) -> int:
        return len(self.expert_leaves)

    def is_float(self, i: int) -> bool:
        return is_float_dtype(leaf_dtype(self.base_leaves[i]))

    def taus(self, i: int) -> jax.Array:
        """``[K, *shape]`` task vectors of leaf ``i`` in the compute dtype (one fused kernel)."""
        dt = compute_dtype(leaf_dtype(self.base_leaves[i]))
        return stack_task_vectors(self.base_leaves[i], [e[i] for e in self.expert_leaves], dt)

    def matrices(self, i: int) -> jax.Array:
        """``[K, d_in, d_out]`` task kernels of regressed leaf ``i`` (compute dtype)."""
        return self.labels[i].to_matrix(self.taus(i))

    def regressed_indices(self) -> list[int]:
        """Indices of the floating regressed leaves."""
        if self.labels is None:
            return []
        return [i for i, l in enumerate(self.labels) if l.regressed and self.is_float(i)]


@functools.partial(jax.jit, static_argnames=("dtype",))
def stack_task_vectors(base_leaf, expert_leaves, dtype):
    """``[K, *shape]``: ``expert_leaves[k] - base_leaf`` in ``dtype``."""
    b = jnp.asarray(base_leaf).astype(dtype)
    return jnp.stack([jnp.asarray(e).astype(dtype) - b for e in expert_leaves])


@functools.partial(jax.jit, static_argnames=("dtype",))
def _add_scaled(base_leaf, delta, scale, dtype):
    return (base_leaf.astype(dtype) + scale * delta.astype(dtype)).astype(base_leaf.dtype)


def leaf_dtype(x) -> np.dtype:
    dt = getattr(x, "dtype", None)
    return np.dtype(dt if dt is not None else np.asarray(x).dtype)


def is_float_dtype(dt) -> bool:
    return jnp.issubdtype(dt, jnp.floating)


def compute_dtype(dt):
    """float64 stays float64; every other float (bf16, f16, f32) is computed in float32."""
    return jnp.float64 if np.dtype(dt) == np.float64 else jnp.float32


def prepare(base: PyTree, experts: Sequence[PyTree], labels: PyTree | None = None, *,
            need_labels: bool = True) -> Context:
    """Validate ``experts`` against ``base`` (``check_experts``) and the label tree.

    ``labels`` defaults to ``build_labels(base)`` when ``need_labels``; a given label tree must
    have one :class:`Label` per leaf of ``base`` with matching paths.
    """
    experts = check_experts(base, experts)
    flat, treedef = jax.tree_util.tree_flatten(base)
    paths = [p for p, _ in leaves_with_paths(base)]
    expert_leaves = [jax.tree_util.tree_leaves(e) for e in experts]
    labs = None
    if need_labels:
        tree = build_labels(base) if labels is None else labels
        labs = check_labels(tree, base)
    return Context(treedef, paths, list(flat), expert_leaves, labs)


def assemble(ctx: Context, delta_fn: Callable[[int], jax.Array | None], scale=1.0) -> PyTree:
    """``theta_0 + scale * delta_fn(i)`` for every floating leaf, in each leaf's dtype.

    ``delta_fn(i)`` returns the merged task vector of leaf ``i`` in the leaf's layout, or ``None``
    to carry ``theta_0``. Non-floating leaves are carried without calling it.
    """
    out = []
    for i, b in enumerate(ctx.base_leaves):
        dt = leaf_dtype(b)
        if not is_float_dtype(dt):
            out.append(jnp.asarray(b))
            continue
        d = delta_fn(i)
        if d is None:
            out.append(jnp.asarray(b))
            continue
        cd = compute_dtype(dt)
        out.append(_add_scaled(jnp.asarray(b), jnp.asarray(d), jnp.asarray(scale, cd), cd))
    return jax.tree_util.tree_unflatten(ctx.treedef, out)


@single_thread_lapack
def merge_modules(base: PyTree, experts: Sequence[PyTree], matrix_fn: Callable, *,
                  labels: PyTree | None = None, scale=1.0, other: str = "mean") -> PyTree:
    """Apply a per-module merge to every regressed module; ``other`` for the remaining leaves.

    Args:
      matrix_fn: ``[K, d_in, d_out] task kernels -> [d_in, d_out]`` merged task kernel.
      other: ``"mean"`` (mean task vector) or ``"base"`` (carry ``theta_0``) for leaves that are
        not regressed modules.

    Returns ``theta_0 + scale * merged`` with the structure and dtypes of ``base``.
    """
    if other not in ("mean", "base"):
        raise ValueError(f"other must be 'mean' or 'base', got {other!r}")
    ctx = prepare(base, experts, labels)

    def delta(i):
        lab = ctx.labels[i]
        if lab.regressed:
            return lab.from_matrix(matrix_fn(ctx.matrices(i)))
        return mean_task_vector(ctx.taus(i)) if other == "mean" else None

    return assemble(ctx, delta, scale)


@jax.jit
def mean_task_vector(taus):
    return jnp.mean(taus, axis=0)


@jax.jit
def polar(x):
    """Nearest matrix with orthonormal columns (or rows, if wide): ``U V^T`` of ``x = U S V^T``.

    A matrix at least twice as tall as wide is first reduced by QR (``x = Q R``, polar
    ``Q polar(R)``: exact, and ~2x faster than LAPACK's SVD of the tall matrix); wide likewise.
    """
    m, n = x.shape[-2:]
    if m >= 2 * n:
        q, r = jnp.linalg.qr(x)
        return jnp.matmul(q, _polar_svd(r), precision=HIGHEST)
    if n >= 2 * m:
        q, r = jnp.linalg.qr(jnp.swapaxes(x, -1, -2))
        return jnp.swapaxes(jnp.matmul(q, _polar_svd(r), precision=HIGHEST), -1, -2)
    return _polar_svd(x)


def _polar_svd(x):
    u, _, vt = jnp.linalg.svd(x, full_matrices=False)
    return jnp.matmul(u, vt, precision=HIGHEST)


def polar_fast(x):
    """:func:`polar` of a 2-D ``x``, through :func:`polar_gram` when ``x`` is rectangular and its
    Gram is well conditioned (checked), else through the SVD. Not traceable (data-dependent)."""
    m, n = x.shape
    if m != n:
        p, ratio = _polar_gram_jit(x)
        if float(ratio) >= POLAR_MIN_RATIO:
            return p
    return polar(x)


# Gram routes to the SVD (exact maths, LAPACK eigh of the smaller Gram instead of an SVD: 1.4-6x
# faster on CPU for 768 x 768 / 768 x 3072 kernels). Squaring the matrix squares its condition
# number, so every caller checks the returned conditioning ratio and falls back to the SVD when
# it is below these floors (eigenvalue ratios; float32 rounding of a Gram is ~eps * e_max).
TOP_TRIPLETS_MIN_RATIO = 1e-4     # kept e_r / e_max: kept singular values >= 1% of the largest
POLAR_MIN_RATIO = 1e-2            # e_min / e_max of the polar Gram: condition number <= 10


def top_triplets_gram(x, rank: int):
    """Top ``rank`` singular triplets of ``x [..., m, n]`` through ``eigh`` of its smaller Gram.

    Returns ``(u [..., m, rank], s [..., rank], vt [..., rank, n], ratio [...])`` with singular
    values in decreasing order and ``ratio = e_rank / e_max`` (eigenvalues of the Gram, 0 for a
    zero matrix): the triplets are accurate when ``ratio >= TOP_TRIPLETS_MIN_RATIO``. Traceable
    (``rank`` static).
    """
    m, n = x.shape[-2:]
    xt = jnp.swapaxes(x, -1, -2)
    wide = m <= n
    g = jnp.matmul(x, xt, precision=HIGHEST) if wide else jnp.matmul(xt, x, precision=HIGHEST)
    e, q = jnp.linalg.eigh(g)                                 # ascending
    e = jnp.flip(e, -1)[..., :rank]
    q = jnp.flip(q, -1)[..., :rank]                           # [..., min(m, n), rank]
    s = jnp.sqrt(jnp.maximum(e, 0.0))
    inv = jnp.where(s > 0, 1.0 / jnp.where(s > 0, s, 1.0), 0.0)
    if wide:
        u = q
        vt = jnp.matmul(jnp.swapaxes(q, -1, -2), x, precision=HIGHEST) * inv[..., :, None]
    else:
        u = jnp.matmul(x, q, precision=HIGHEST) * inv[..., None, :]
        vt = jnp.swapaxes(q, -1, -2)
    emax = e[..., 0]
    ratio = jnp.where(emax > 0, e[..., -1] / jnp.where(emax > 0, emax, 1.0), 0.0)
    return u, s, vt, ratio


def polar_gram(x):
    """Polar factor of ``x [m, n]`` (``U V^T`` of its thin SVD) as ``x (x^T x)^{-1/2}`` (or
    ``(x x^T)^{-1/2} x`` if wide), through ``eigh`` of the smaller Gram.

    Returns ``(p, ratio)``, ``ratio = e_min / e_max`` of the Gram: accurate when
    ``ratio >= POLAR_MIN_RATIO`` (use :func:`polar` otherwise). Traceable.
    """
    m, n = x.shape
    tall = m >= n
    g = jnp.matmul(x.T, x, precision=HIGHEST) if tall else jnp.matmul(x, x.T, precision=HIGHEST)
    e, q = jnp.linalg.eigh(g)
    ok = e > 0
    isq = jnp.where(ok, 1.0 / jnp.sqrt(jnp.where(ok, e, 1.0)), 0.0)
    root = jnp.matmul(q * isq[None, :], q.T, precision=HIGHEST)          # g^{-1/2}
    p = jnp.matmul(x, root, precision=HIGHEST) if tall else jnp.matmul(root, x, precision=HIGHEST)
    ratio = jnp.where(e[-1] > 0, e[0] / jnp.where(e[-1] > 0, e[-1], 1.0), 0.0)
    return p, ratio


_polar_gram_jit = jax.jit(polar_gram)


def psd_solve_min_norm(s, b, rcond=None):
    """Min-norm least-squares solution of ``s x = b`` for symmetric PSD ``s [..., m, m]``.

    ``s = Q diag(e) Q^T`` (``eigh``); eigenvalues ``e <= rcond * max(e)`` are dropped (default
    ``rcond = m * eps`` of the dtype). Never forms an inverse; ``s = 0`` gives ``x = 0``.
    """
    m = s.shape[-1]
    if rcond is None:
        rcond = m * float(jnp.finfo(s.dtype).eps)
    return _psd_solve(s, b, float(rcond))


@jax.jit
def _psd_solve(s, b, rcond):
    e, q = jnp.linalg.eigh(s)
    cutoff = rcond * jnp.max(e, axis=-1, keepdims=True)
    keep = (e > cutoff) & (e > 0)
    inv = jnp.where(keep, 1.0 / jnp.where(keep, e, 1.0), 0.0)
    qtb = jnp.matmul(jnp.swapaxes(q, -1, -2), b, precision=HIGHEST)
    return jnp.matmul(q, inv[..., :, None] * qtb, precision=HIGHEST)


def check_scale(scale, name: str = "scale") -> float:
    try:
        v = float(scale)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a real number, got {type(scale).__name__}") from None
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {scale}")
    return v


def check_fraction(value, name: str, *, low_open: bool, high: float = 1.0) -> float:
    v = check_scale(value, name)
    ok = (v > 0.0 if low_open else v >= 0.0) and v <= high
    if not ok:
        interval = ("(0, " if low_open else "[0, ") + f"{high:g}]"
        raise ValueError(f"{name} must be in {interval}, got {value}")
    return v
