"""Machinery shared by the anchors: calling convention, validation, task vectors, assembly.

Every anchor works leaf by leaf (never stacking the whole model's task vectors): for leaf ``i`` it
builds ``taus = [K, *leaf.shape]`` (``theta_k - theta_0``) in the *compute dtype* (float32, or
float64 for float64 leaves), computes a merged task vector ``delta`` and writes
``theta_0 + anchor_scale * delta`` cast back to the leaf's dtype. Non-floating leaves (integer
buffers) are always carried from ``theta_0``.

Everything here is a pure function of its inputs: no host round trip, no value-dependent Python
branch (data-dependent choices of an algorithm are ``lax.cond`` on device), so an anchor runs
eagerly (one small jitted kernel per leaf) and inside ``jax.jit`` / ``jax.vmap`` / ``lax.scan``
(where the same kernels are traced into the caller's program).

Module views. A per-module method acts on 2-D views ``[d_in, d_out]`` (Flax ``Dense``
convention) given by :class:`bmm_jax.labels.Label`: the label tree's regressed modules
(:func:`bmm_jax.labels.build_labels`: GPT-2's transposed Conv1D kernels, 1x1 convolutions), and,
with ``modules="all_2d"``, every other 2-D floating leaf too (:func:`module_views`).
"""
from __future__ import annotations

import functools
import inspect
import math
import warnings
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from bmm_jax._tree import PyTree, check_experts, leaves_with_paths
from bmm_jax.labels import Label, build_labels, check_labels

HIGHEST = jax.lax.Precision.HIGHEST
MODULE_SETS = ("all_2d", "labels")


# ------------------------------------------------------------------------------ calling convention
def anchor_function(fn: Callable) -> Callable:
    """Decorator giving an anchor its calling convention ``fn(base, experts, *, options)``.

    * A positional argument after ``(base, experts)`` raises a ``TypeError`` that names the
      keyword options (every option is keyword-only).
    * ``scale=`` (the old name of the anchor's own coefficient) is accepted with a
      ``DeprecationWarning`` and passed on as ``anchor_scale=``.
    """
    options = [n for n, p in inspect.signature(fn).parameters.items()
               if p.kind is inspect.Parameter.KEYWORD_ONLY]

    @functools.wraps(fn)
    def wrapper(base, experts, *args, **kwargs):
        if args:
            kinds = ", ".join(type(a).__name__ for a in args)
            raise TypeError(
                f"{fn.__name__}(base, experts, *, ...) takes its options as keywords only "
                f"({', '.join(options)}); got {len(args)} extra positional argument(s) ({kinds})")
        if "scale" in kwargs:
            if "anchor_scale" in kwargs:
                raise TypeError(f"{fn.__name__}: pass anchor_scale only (scale is its deprecated name)")
            warnings.warn(f"{fn.__name__}(scale=...) is deprecated: the anchor's own coefficient is "
                          "called anchor_scale", DeprecationWarning, stacklevel=2)
            kwargs["anchor_scale"] = kwargs.pop("scale")
        return fn(base, experts, **kwargs)

    return wrapper


# ------------------------------------------------------------------------------ hyper-parameters
def is_array(x) -> bool:
    """A jax array or tracer (concrete or abstract)."""
    return isinstance(x, (jax.Array, jax.core.Tracer))


def check_hparam(value, name: str, *, low: float | None = None, low_open: bool = False,
                 high: float | None = None):
    """A hyper-parameter that may be traced: a Python / numpy real number, or a JAX scalar.

    Python and numpy numbers are checked on the host (finite, in range) and returned as
    ``float``. JAX arrays (concrete or traced) are checked statically only (shape ``()``, real
    dtype) and returned as they are: checking their value would read them back to the host.
    """
    if is_array(value):
        if value.shape != ():
            raise ValueError(f"{name} must be a scalar, got an array of shape {tuple(value.shape)}")
        if not (jnp.issubdtype(value.dtype, jnp.floating) or jnp.issubdtype(value.dtype, jnp.integer)):
            raise TypeError(f"{name} must be a real number, got an array of dtype {value.dtype}")
        return value
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a real number, got bool")
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}") from None
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {value}")
    if name == "anchor_scale":        # negative: an error; 0 or above 10: a warning
        from bmm_jax.hparams import check_scale
        check_scale(v, name)
    if low is not None and (v <= low if low_open else v < low):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low:g}, got {value}")
    if high is not None and v > high:
        raise ValueError(f"{name} must be <= {high:g}, got {value}")
    return v


def check_static_fraction(value, name: str, *, low_open: bool, high: float = 1.0) -> float:
    """An option that fixes shapes or control flow (a density, a subspace fraction): a Python
    number in ``(0, high]`` (``low_open``) or ``[0, high]``; a JAX array is a ``TypeError``."""
    if is_array(value):
        raise TypeError(f"{name} fixes shapes or control flow: pass a Python number, not a "
                        "JAX array (it cannot be traced)")
    v = check_hparam(value, name)
    ok = (v > 0.0 if low_open else v >= 0.0) and v <= high
    if not ok:
        interval = ("(0, " if low_open else "[0, ") + f"{high:g}]"
        raise ValueError(f"{name} must be in {interval}, got {value}")
    return v


def check_modules(modules) -> str:
    if modules not in MODULE_SETS:
        raise ValueError(f"modules must be one of {MODULE_SETS}, got {modules!r}")
    return modules


# ------------------------------------------------------------------------------ inputs
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

    def leaf_experts(self, i: int) -> list:
        """The K expert leaves ``i`` as jax arrays (numpy leaves are put on the device one leaf at
        a time, never the whole model)."""
        return [jnp.asarray(e[i]) for e in self.expert_leaves]

    def taus(self, i: int) -> jax.Array:
        """``[K, *shape]`` task vectors of leaf ``i`` in the compute dtype (one fused kernel)."""
        dt = compute_dtype(leaf_dtype(self.base_leaves[i]))
        return stack_task_vectors(jnp.asarray(self.base_leaves[i]), self.leaf_experts(i), dt)

    def matrices(self, i: int, view: Label | None = None) -> jax.Array:
        """``[K, d_in, d_out]`` task kernels of leaf ``i`` in ``view`` (default its label)."""
        view = self.labels[i] if view is None else view
        return view.to_matrix(self.taus(i))

    def regressed_indices(self) -> list[int]:
        """Indices of the floating regressed leaves."""
        if self.labels is None:
            return []
        return [i for i, l in enumerate(self.labels) if l.regressed and self.is_float(i)]


def prepare(base: PyTree, experts: Sequence[PyTree], labels: PyTree | None = None, *,
            need_labels: bool = True) -> Context:
    """Validate ``experts`` against ``base`` (:func:`bmm_jax._tree.check_experts`: static
    structure / shape / dtype checks, NaN/Inf only for concrete inputs) and the label tree
    (:func:`bmm_jax.labels.check_labels`, static).

    ``labels`` defaults to ``build_labels(base)`` when ``need_labels``; a given label tree is
    validated even when the method does not need one.
    """
    experts = check_experts(base, experts)
    flat, treedef = jax.tree_util.tree_flatten(base)
    paths = [p for p, _ in leaves_with_paths(base)]
    expert_leaves = [jax.tree_util.tree_leaves(e) for e in experts]
    labs = None
    if labels is not None:
        labs = check_labels(labels, base)
    elif need_labels:
        labs = check_labels(build_labels(base), base)
    return Context(treedef, paths, list(flat), expert_leaves, labs)


def module_views(ctx: Context, modules: str) -> list[Label | None]:
    """The 2-D view of every leaf merged as a matrix (``None``: not a module).

    ``modules="labels"``: the label tree's regressed floating modules. ``modules="all_2d"``: those,
    plus every other floating leaf with ``ndim == 2`` (the reference implementations merge every
    2-D tensor, position and token embeddings included). An unlabelled 2-D leaf named ``kernel``
    is a Flax ``Dense`` kernel ``[d_in, d_out]``; any other 2-D leaf (an embedding table
    ``[rows, features]``) is stored like its PyTorch counterpart, i.e. as ``[d_out, d_in]`` in
    this convention. The orientation matters only to Iso-CTS (its common subspace is taken on the
    PyTorch ``[d_out, d_in]`` view's left side); TSV-M and Iso-C are transpose-equivariant.
    """
    check_modules(modules)
    out: list[Label | None] = []
    for i, path in enumerate(ctx.paths):
        lab = ctx.labels[i]
        if not ctx.is_float(i):
            out.append(None)
        elif lab.regressed:
            out.append(lab)
        elif modules == "all_2d" and len(np.shape(ctx.base_leaves[i])) == 2:
            rows, cols = np.shape(ctx.base_leaves[i])
            if path.split("/")[-1] == "kernel":
                out.append(Label(path=path, regressed=True, kind="other", block=lab.block,
                                 input_group=path, layout="dense", d_in=rows, d_out=cols))
            else:
                out.append(Label(path=path, regressed=True, kind="other", block=lab.block,
                                 input_group=path, layout="transposed", d_in=cols, d_out=rows))
        else:
            out.append(None)
    return out


# ------------------------------------------------------------------------------ kernels
@functools.partial(jax.jit, static_argnames=("dtype",))
def stack_task_vectors(base_leaf, expert_leaves, dtype):
    """``[K, *shape]``: ``expert_leaves[k] - base_leaf`` in ``dtype``."""
    b = jnp.asarray(base_leaf).astype(dtype)
    return jnp.stack([jnp.asarray(e).astype(dtype) - b for e in expert_leaves])


@functools.partial(jax.jit, static_argnames=("dtype",))
def sum_task_vectors(base_leaf, expert_leaves, dtype):
    """``sum_k (expert_leaves[k] - base_leaf)`` in ``dtype`` (the stack is never materialised)."""
    b = jnp.asarray(base_leaf).astype(dtype)
    total = jnp.zeros(b.shape, dtype)
    for e in expert_leaves:
        total = total + (jnp.asarray(e).astype(dtype) - b)
    return total


@functools.partial(jax.jit, static_argnames=("dtype",))
def _add_scaled(base_leaf, delta, scale, dtype):
    return (base_leaf.astype(dtype) + jnp.asarray(scale).astype(dtype) * delta.astype(dtype)
            ).astype(base_leaf.dtype)


def leaf_dtype(x) -> np.dtype:
    dt = getattr(x, "dtype", None)
    return np.dtype(dt if dt is not None else np.asarray(x).dtype)


def is_float_dtype(dt) -> bool:
    return jnp.issubdtype(dt, jnp.floating)


def compute_dtype(dt):
    """float64 stays float64; every other float (bf16, f16, f32) is computed in float32."""
    return jnp.float64 if np.dtype(dt) == np.float64 else jnp.float32


def assemble(ctx: Context, delta_fn: Callable[[int], jax.Array | None], scale=1.0) -> PyTree:
    """``theta_0 + scale * delta_fn(i)`` for every floating leaf, in each leaf's dtype.

    ``delta_fn(i)`` returns the merged task vector of leaf ``i`` in the leaf's layout, or ``None``
    to carry ``theta_0``. Non-floating leaves are carried without calling it. ``scale`` may be a
    Python number or a (traced) JAX scalar.
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
        out.append(_add_scaled(jnp.asarray(b), jnp.asarray(d), scale, cd))
    return jax.tree_util.tree_unflatten(ctx.treedef, out)


def merge_modules(ctx: Context, views: list[Label | None], matrix_fn: Callable, *, scale=1.0,
                  other: str = "mean") -> PyTree:
    """Apply a per-module merge to every leaf with a view; ``other`` for the remaining leaves.

    Args:
      views: one 2-D view (:class:`Label`) or ``None`` per leaf (:func:`module_views`).
      matrix_fn: ``[K, d_in, d_out] task kernels -> [d_in, d_out]`` merged task kernel.
      other: ``"mean"`` (mean task vector) or ``"base"`` (carry ``theta_0``) for the leaves without
        a view.

    Returns ``theta_0 + scale * merged`` with the structure and dtypes of ``base``.
    """
    if other not in ("mean", "base"):
        raise ValueError(f"other must be 'mean' or 'base', got {other!r}")

    def delta(i):
        view = views[i]
        if view is not None:
            return view.from_matrix(matrix_fn(ctx.matrices(i, view)))
        return mean_task_vector(ctx.taus(i)) if other == "mean" else None

    return assemble(ctx, delta, scale)


@jax.jit
def mean_task_vector(taus):
    return jnp.mean(taus, axis=0)


# ------------------------------------------------------------------------------ polar factors
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


# Gram routes to the SVD (exact maths, LAPACK eigh of the smaller Gram instead of an SVD: 1.4-6x
# faster on CPU for 768 x 768 / 768 x 3072 kernels). Squaring the matrix squares its condition
# number, so every caller checks the returned conditioning ratio on device and takes the SVD
# route (``lax.cond``) when it is below these floors (eigenvalue ratios; float32 rounding of a
# Gram is ~eps * e_max). Eagerly only the branch taken runs; under ``vmap`` both do (a select).
TOP_TRIPLETS_MIN_RATIO = 1e-4     # kept e_r / e_max: kept singular values >= 1% of the largest
POLAR_MIN_RATIO = 1e-2            # e_min / e_max of the polar Gram: condition number <= 10


@jax.jit
def polar_fast(x):
    """:func:`polar` of a 2-D ``x``: through :func:`polar_gram` when ``x`` is rectangular and its
    Gram is well conditioned (``ratio >= POLAR_MIN_RATIO``, decided on device), else the SVD."""
    m, n = x.shape
    if m == n:
        return polar(x)
    p, ratio = polar_gram(x)
    return lax.cond(ratio >= POLAR_MIN_RATIO, lambda: p, lambda: polar(x))


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


# ------------------------------------------------------------------------------ PSD solves
def default_rcond(dtype, m: int) -> float:
    """``m * eps`` of ``dtype`` (LAPACK's and numpy's ``lstsq`` default)."""
    return m * float(jnp.finfo(dtype).eps)


def psd_solve_min_norm(s, b, rcond=None):
    """Min-norm least-squares solution of ``s x = b`` for symmetric PSD ``s [..., m, m]``.

    ``s = Q diag(e) Q^T`` (``eigh``); eigenvalues ``e <= rcond * max(e)`` are dropped (default
    ``rcond = m * eps`` of the dtype; a Python number or a traced scalar). Never forms an
    inverse; ``s = 0`` gives ``x = 0``.
    """
    if rcond is None:
        rcond = default_rcond(s.dtype, s.shape[-1])
    return _psd_solve(s, b, rcond)


@jax.jit
def _psd_solve(s, b, rcond):
    e, q = jnp.linalg.eigh(s)
    cutoff = jnp.asarray(rcond).astype(e.dtype) * jnp.max(e, axis=-1, keepdims=True)
    keep = (e > cutoff) & (e > 0)
    inv = jnp.where(keep, 1.0 / jnp.where(keep, e, 1.0), 0.0)
    qtb = jnp.matmul(jnp.swapaxes(q, -1, -2), b, precision=HIGHEST)
    return jnp.matmul(q, inv[..., :, None] * qtb, precision=HIGHEST)
