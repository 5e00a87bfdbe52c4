"""The label tree: one label per parameter leaf, deciding what is regressed.

Built with ``jax.tree_util.tree_map_with_path`` over a params pytree, the label tree has the same
structure as the params; each leaf is a :class:`Label`. It decides

* whether a leaf is a *regressed module* (a linear map with a 2-D view ``[d_in, d_out]``) or a
  *carried* leaf,
* the module's kind (``q``, ``k``, ``v``, ``qkv``, ``attn-out``, ``mlp-in``, ``mlp-out``,
  ``other``) and block index (its depth),
* its *input group*: modules that read the same input (q, k, v of one self-attention) share one
  activation Gram (in cross-attention only k and v share one; q reads another input),
* its hyper-parameter group for a grouping ``global | type | block | module``.

Layouts. Flax ``Dense`` kernels are ``[d_in, d_out]`` (``dense``). HF FlaxGPT2's Conv1D kernels are
stored ``[d_out, d_in]`` (``transposed``). 1x1 convolution kernels ``[1, 1, d_in, d_out]`` are
``conv1x1``. :meth:`Label.to_matrix` / :meth:`Label.from_matrix` convert to and from the 2-D view.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from bmm_jax._tree import PyTree, path_str

GROUPINGS = ("global", "type", "block", "module")
KINDS = ("q", "k", "v", "qkv", "attn-out", "mlp-in", "mlp-out", "other")

# Leaves never regressed by default: embeddings and heads.
DEFAULT_EXCLUDE = (
    r"embed", r"(^|/)wte(/|$)", r"(^|/)wpe(/|$)", r"pooler", r"head", r"classifier",
    r"(^|/)_?fc(/|$)", r"stem", r"patch",
)
# Conv1D-style kernels stored [d_out, d_in] (HF FlaxGPT2).
DEFAULT_TRANSPOSED = (r"(^|/)h/\d+/(attn|mlp)/c_(attn|proj|fc)/kernel$",)

_KIND_PATTERNS = (
    ("qkv", r"(^|/)(c_attn|qkv|in_proj|query_key_value|Wqkv)/kernel$"),
    ("q", r"(^|/)(query|q_proj|q|wq|q_lin)/kernel$"),
    ("k", r"(^|/)(key|k_proj|k|wk|k_lin)/kernel$"),
    ("v", r"(^|/)(value|v_proj|v|wv|v_lin)/kernel$"),
    ("attn-out", r"(attention/output/dense|out_proj|o_proj|attn/c_proj|(^|/)wo|attention/out|out_lin)/kernel$"),
    ("mlp-in", r"(intermediate/dense|fc1|mlp/c_fc|up_proj|gate_proj|lin1|wi|expand_conv|mlp_in|dense_in)/kernel$"),
    ("mlp-out", r"((^|/)output/dense|fc2|mlp/c_proj|down_proj|lin2|project_conv|mlp_out|dense_out)/kernel$"),
)
# Cross-attention: q reads the decoder stream, k and v read the encoder output (two input groups).
_CROSS_ATTENTION = re.compile(r"(crossattention|cross_attention|cross_attn|EncDecAttention|encoder_attn)", re.I)
# Gated MLPs (Llama, Mistral, Qwen2, Gemma): gate and up projections read the same input (one group).
_GATED_MLP_IN = re.compile(r"(^|/)(gate_proj|up_proj)/kernel$")
_BLOCK_PATTERN = re.compile(r"(?:^|/)_?(?:layer|layers|h|blocks|block|transformer_blocks)[/_](\d+)(?:/|$)")


@dataclasses.dataclass(frozen=True)
class Label:
    """What to do with one parameter leaf.

    Attributes:
      path: leaf path, ``"a/b/0/kernel"``.
      regressed: True for a regressed module, False for a carried leaf.
      kind: module kind (one of :data:`KINDS`) for regressed modules, ``None`` for carried leaves.
      block: block (depth) index, or ``None`` outside numbered blocks.
      input_group: key of the activation Gram this module reads (shared by q/k/v).
      layout: ``dense`` ([d_in, d_out]), ``transposed`` ([d_out, d_in]) or ``conv1x1``
        ([1, 1, d_in, d_out]); ``None`` for carried leaves.
      d_in, d_out: sizes of the 2-D view.
    """
    path: str
    regressed: bool
    kind: str | None = None
    block: int | None = None
    input_group: str | None = None
    layout: str | None = None
    d_in: int = 0
    d_out: int = 0

    def to_matrix(self, x):
        """Leaf (optionally with leading batch axes) -> ``[..., d_in, d_out]``."""
        if self.layout == "dense":
            return x
        if self.layout == "transposed":
            return jnp.swapaxes(x, -1, -2)
        if self.layout == "conv1x1":
            return x.reshape(x.shape[:-4] + (self.d_in, self.d_out))
        raise ValueError(f"leaf '{self.path}' is carried, it has no matrix view")

    def from_matrix(self, m):
        """``[..., d_in, d_out]`` -> the leaf layout (inverse of :meth:`to_matrix`)."""
        if self.layout == "dense":
            return m
        if self.layout == "transposed":
            return jnp.swapaxes(m, -1, -2)
        if self.layout == "conv1x1":
            return m.reshape(m.shape[:-2] + (1, 1, self.d_in, self.d_out))
        raise ValueError(f"leaf '{self.path}' is carried, it has no matrix view")

    def group(self, grouping: str) -> str:
        """Hyper-parameter group name of this module for a grouping in :data:`GROUPINGS`."""
        if grouping not in GROUPINGS:
            raise ValueError(f"unknown grouping {grouping!r}; expected one of {GROUPINGS}")
        if grouping == "global":
            return "global"
        if grouping == "type":
            return self.kind
        if grouping == "block":
            return "block" + ("-" if self.block is None else str(self.block))
        return self.path


def _matches(patterns: Iterable[str], path: str) -> bool:
    return any(re.search(p, path) for p in patterns)


def _kind_of(path: str) -> str:
    for kind, pat in _KIND_PATTERNS:
        if re.search(pat, path):
            return kind
    return "other"


def _block_of(path: str) -> int | None:
    m = _BLOCK_PATTERN.search(path)
    return int(m.group(1)) if m else None


def _layout_of(path: str, shape: tuple, transposed: Sequence[str]) -> str | None:
    if not path.endswith("kernel"):
        return None
    if len(shape) == 2:
        return "transposed" if _matches(transposed, path) else "dense"
    if len(shape) == 4 and shape[0] == 1 and shape[1] == 1:
        return "conv1x1"
    return None


def build_labels(params: PyTree, *, include: Sequence[str] | None = None,
                 exclude: Sequence[str] | None = None,
                 transposed: Sequence[str] = DEFAULT_TRANSPOSED) -> PyTree:
    """Label tree for ``params``.

    Default selection: every floating leaf named ``kernel`` that is 2-D (or a 1x1 convolution),
    minus embeddings and heads (:data:`DEFAULT_EXCLUDE`). Integer (quantised) kernels are always
    carried: the regression is defined on real-valued weights (a label tree that regresses one is
    rejected by :func:`bmm_jax.merge`).

    Args:
      params: a params pytree (nested dicts, HF Flax ``model.params``, ...).
      include: regular expressions (``re.search`` on the leaf path); if given, only matrix-like
        kernels matching one of them are regressed. Each pattern must match at least one leaf.
      exclude: regular expressions of leaves never regressed; replaces :data:`DEFAULT_EXCLUDE`.
        Each pattern must match at least one leaf.
      transposed: patterns of kernels stored ``[d_out, d_in]``.

    Returns:
      A pytree with the structure of ``params`` whose leaves are :class:`Label`.
    """
    include = _patterns(include, "include")
    exclude = DEFAULT_EXCLUDE if exclude is None else _patterns(exclude, "exclude")
    transposed = _patterns(transposed, "transposed")
    all_paths = [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    for name, pats in (("include", include), ("exclude", None if exclude is DEFAULT_EXCLUDE else exclude)):
        for pat in pats or ():
            try:
                rx = re.compile(pat)
            except re.error as e:
                raise ValueError(f"{name} pattern {pat!r} is not a valid regular expression: {e}") from None
            if not any(rx.search(p) for p in all_paths):
                raise ValueError(f"{name} pattern {pat!r} matches no leaf of the params tree "
                                 f"(leaves look like {all_paths[:3]})")

    def label(path, leaf):
        p = path_str(path)
        shape = tuple(np.shape(leaf))
        layout = _layout_of(p, shape, transposed)
        if layout is not None and (not _is_float_leaf(leaf) or 0 in shape):
            layout = None          # integer (quantised) or empty kernels are carried, never regressed
        selected = layout is not None and not _matches(exclude, p)
        if include is not None:
            selected = layout is not None and _matches(include, p) and not _matches(
                () if exclude is DEFAULT_EXCLUDE else exclude, p)
        if not selected:
            return Label(path=p, regressed=False, block=_block_of(p))
        if layout == "dense":
            d_in, d_out = shape
        elif layout == "transposed":
            d_out, d_in = shape
        else:
            d_in, d_out = shape[2], shape[3]
        kind = _kind_of(p)
        parent = p.rsplit("/", 2)[0] if p.count("/") >= 2 else ""
        if kind in ("q", "k", "v") and _CROSS_ATTENTION.search(p):
            input_group = p if kind == "q" else f"{parent}:kv-input"
        else:
            input_group = f"{parent}:qkv-input" if kind in ("q", "k", "v") else p
        if kind == "mlp-in" and _GATED_MLP_IN.search(p):
            input_group = f"{parent}:mlp-input"
        return Label(path=p, regressed=True, kind=kind, block=_block_of(p), input_group=input_group,
                     layout=layout, d_in=int(d_in), d_out=int(d_out))

    return jax.tree_util.tree_map_with_path(label, params)


def _is_float_leaf(leaf) -> bool:
    dt = getattr(leaf, "dtype", None)
    if dt is None:
        return True
    dt = np.dtype(dt)
    return bool(np.issubdtype(dt, np.floating) or dt.name == "bfloat16")


def _patterns(value, name: str) -> tuple[str, ...] | None:
    """A pattern list argument: a single string is one pattern (not its characters)."""
    if value is None:
        return None
    if isinstance(value, (str, re.Pattern)):
        value = (value,)
    try:
        value = tuple(value)
    except TypeError:
        raise TypeError(f"{name} must be a regular expression or a sequence of them, got "
                        f"{type(value).__name__}") from None
    out = []
    for v in value:
        if isinstance(v, re.Pattern):
            v = v.pattern
        if not isinstance(v, str):
            raise TypeError(f"{name} patterns must be strings, got {type(v).__name__} ({v!r})")
        out.append(v)
    return tuple(out)


def expected_shape(label: Label) -> tuple[int, ...] | None:
    """The leaf shape a regressed label describes (``None`` for carried leaves)."""
    return {"dense": (label.d_in, label.d_out), "transposed": (label.d_out, label.d_in),
            "conv1x1": (1, 1, label.d_in, label.d_out)}.get(label.layout)


def check_labels(labels: PyTree, params: PyTree, *, name: str = "base") -> list[Label]:
    """Validate a label tree against ``params`` and return its labels in tree order.

    The one validator every entry point uses (merge, prepare, the anchors, the Gram estimators):
    one :class:`Label` per leaf, paths equal to the leaf paths, and every regressed label's
    ``(layout, d_in, d_out)`` fitting its leaf's shape (a label tree built from another model with
    the same paths is rejected). Static information only: works on traced params.

    Raises:
      TypeError: ``labels`` is not a label tree. ValueError: a mismatch, naming the leaf.
    """
    labs = label_list(labels)
    if not labs or not all(isinstance(l, Label) for l in labs):
        raise TypeError("labels must be a label tree from bmm_jax.labels.build_labels "
                        "(a pytree whose leaves are Label)")
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    if len(labs) != len(flat):
        raise ValueError(f"labels have {len(labs)} leaves but {name} has {len(flat)}: "
                         f"build the label tree from the same params (bmm_jax.build_labels({name}))")
    for l, (p, leaf) in zip(labs, flat):
        p = path_str(p)
        if l.path != p:
            raise ValueError(f"label path '{l.path}' does not match {name} leaf '{p}': "
                             "build the label tree from the same params")
        if l.regressed:
            want = expected_shape(l)
            shape = tuple(np.shape(leaf))
            if l.d_in < 1 or l.d_out < 1:
                raise ValueError(f"label of leaf '{p}' regresses an empty matrix ({l.d_in} x {l.d_out})")
            if want is None or shape != want:
                raise ValueError(f"label of leaf '{p}' (layout {l.layout}, {l.d_in} x {l.d_out}) does not "
                                 f"fit its shape {shape}: the label tree was built from other params")
    return labs


def label_list(labels: PyTree) -> list[Label]:
    """All labels in tree order."""
    return [l for l in jax.tree_util.tree_leaves(labels, is_leaf=lambda x: isinstance(x, Label))]


def regressed(labels: PyTree) -> list[Label]:
    """Labels of the regressed modules, in tree order."""
    return [l for l in label_list(labels) if l.regressed]


def input_groups(labels: PyTree) -> dict[str, list[Label]]:
    """Input-group key -> the regressed modules that read that input."""
    out: dict[str, list[Label]] = {}
    for l in regressed(labels):
        out.setdefault(l.input_group, []).append(l)
    return out


def hparam_groups(labels: PyTree, grouping: str = "type") -> dict[str, list[Label]]:
    """Hyper-parameter group name -> its regressed modules (for a grouping of :data:`GROUPINGS`)."""
    out: dict[str, list[Label]] = {}
    for l in regressed(labels):
        out.setdefault(l.group(grouping), []).append(l)
    if not out:
        raise ValueError("the label tree selects no regressed module")
    return out


def format_label_table(labels: PyTree, grouping: str | None = "type") -> str:
    """A plain-text table of the regressed modules (path, kind, block, shape, input group, group)."""
    rows = [("path", "kind", "block", "d_in x d_out", "layout", "input group")
            + (("group",) if grouping else ())]
    for l in regressed(labels):
        rows.append((l.path, l.kind, "-" if l.block is None else str(l.block), f"{l.d_in} x {l.d_out}",
                     l.layout, l.input_group) + ((l.group(grouping),) if grouping else ()))
    n_carried = sum(not l.regressed for l in label_list(labels))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append(f"{len(rows) - 1} regressed modules, {n_carried} carried leaves")
    return "\n".join(lines)
