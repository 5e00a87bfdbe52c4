"""Streaming merge, file to file: ``merge_checkpoints(base, experts, out, ...)``.

The base and the K experts are read tensor by tensor from their safetensors shards (memory-mapped,
:mod:`bmm_jax.streaming.reader`); each tensor is merged on its own and written at once into the
output shards (:mod:`bmm_jax.streaming.writer`), then its pages and buffers are released. The
per-tensor work calls the library's own functions on a one-leaf pytree ``{name: array}``, so the
streamed result is the in-memory one:

* the anchor: ``bmm_jax.anchors.<name>(base1, experts1, labels=..., anchor_scale=...)``. Every
  supported anchor is per leaf (TIES trims per tensor and per task, as mergekit does; the
  original TIES code trims the whole flattened model at once);
* BMM (``method="bmm"``) on a regressed module: ``bmm_jax.merge`` on that module with data-free
  Grams from its task vectors, or Grams read from a file / given per tensor;
* carried tensors (embeddings, ``lm_head``, norms, biases) follow ``carry`` (the anchor by
  default). A carried tensor whose ``K`` float32 copies exceed ``chunk_bytes`` is processed in row
  chunks: exact for the elementwise rules (average, TA, and the mean task vector that TSV-M /
  Iso-C give non-module leaves); TIES on such a tensor runs :mod:`bmm_jax.streaming.chunked`
  (exact per-tensor thresholds and majority sign over the chunks). TSV-M / Iso-C / Iso-CTS
  SVD-merge the regressed modules (``modules="labels"``, the streamed default); with
  ``anchor_options={"modules": "all_2d"}`` (the in-memory default: every 2-D tensor, embeddings
  included) a 2-D carried tensor is merged as a matrix, held whole.

Memory bound. Peak resident memory is the runtime (Python, jax, compiled kernels: its RSS before
the first tensor, ``R0``) plus the working set of the largest tensor, never the model::

    peak RSS <= R0 + max_t W(t)            (reported as memory.working_set_bound_bytes)
    W(t) = (K + 1) n s_in + n s_out + F(t)      (jax copies of the K + 1 inputs, the output)
    F(t) = 4 [(K + 3) d_in d_out + 3 d_in^2]    BMM on a regressed [d_in, d_out] module
                                               (task kernels, B, T_a, result; S, its row blocks,
                                               its Cholesky factor)
         = 4 (2 K + 2) n                       an anchor on a tensor held whole (task vectors,
                                               their transforms, the merged task vector)
         = 3 chunk_bytes                       a chunked carried tensor (6 chunk_bytes for TIES:
                                               task vectors, |tau| bits, trimmed values)

with ``n`` elements, ``s_in`` / ``s_out`` bytes per element. ``tests/test_streaming.py`` measures
it in a subprocess; ``experiments/bench_llm.py`` merges a Llama-3.2-1B-shaped model (K = 4) inside
a 3 GiB memory cgroup. Freed buffers go back to glibc's heap, where the next tensor's buffers
reuse them; inside :func:`bmm_jax.memory.trimming` (what ``bmm-merge`` and the benchmark do) the
heap's free pages are also returned to the OS after every tensor. The library never touches the
allocator unless asked.

Output: an HF folder (``config.json`` and tokenizer files copied from the base,
``model.safetensors`` or ``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``,
``metadata={"format": "pt"}``, and the report ``bmm_jax_merge.json``) that appears atomically
(:class:`bmm_jax.streaming.writer.OutputFolder`), or an orbax checkpoint
(``out_format="orbax"``, :func:`bmm_jax.checkpoint.save`, leaves nested by the dotted names). A
report (JSON) is also written beside the output (``<out>.json``).

transformers' Flax ``from_pretrained`` reads a single ``model.safetensors`` (PyTorch naming,
``from_pt`` is implied by the ``"pt"`` format tag) but not sharded safetensors (its code raises
"coming soon"); PyTorch reads both. The default ``max_shard_size="5GB"`` keeps models up to 5 GB
in one file.

Vocabularies of different sizes: for the vocabulary tensors (``embed_tokens``, ``wte``,
``lm_head``... :data:`bmm_jax.streaming.labels.VOCAB_PATTERNS`), the rows every model has are
merged as above; each extra row is the mean of that row over the experts that have it (the base's
row if no expert has it); the output has the largest row count, ``config.json``'s ``vocab_size``
follows, the tokenizer files come from an expert with the largest vocabulary, and the report's
``vocabulary`` entry says so per tensor.

Several processes (``coordinator_address``, ``num_processes``, ``process_id``; see
:mod:`bmm_jax.distributed`): every process reads all headers and computes the same plan; the
tensors are shared out by :func:`bmm_jax.distributed.assign` (cost-balanced, deterministic);
each process writes the shards holding its own tensors into the shared temporary folder (so the
output's parent folder must be on a file system every process sees, as the inputs must be
readable by every process); process 0 then writes the index, config and report, and renames the
folder into place after every process reported success (an error anywhere aborts the whole
output). Each tensor is computed by the same code on one device whichever process owns it, so
the result equals the single-process merge bit for bit.
"""
from __future__ import annotations

import functools
import inspect
import os
import sys
import time
from collections.abc import Mapping
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from bmm_jax import distributed
from bmm_jax.labels import Label
from bmm_jax.memory import maybe_trim, peak_rss_bytes, rss_bytes
from bmm_jax.streaming.chunked import row_chunks, ties_chunked
from bmm_jax.streaming.labels import detect_naming, flax_path, is_vocab_tensor, tensor_labels
from bmm_jax.streaming.reader import Checkpoint
from bmm_jax.streaming.writer import (REPORT_NAME, Entry, OutputFolder, ShardWriter, atomic_write_json,
                                      check_output_path, copy_side_files, parse_size, plan_shards,
                                      shard_names, write_index)

METHODS = ("bmm", "anchor")
ANCHORS = ("average", "task_arithmetic", "ties", "tsv", "iso_c", "iso_cts", "wudi")
OUT_FORMATS = ("hf", "orbax")
CARRY = ("anchor", "base", "mean")
DEFAULT_CHUNK_BYTES = 256 << 20
FORMAT = "bmm_jax.merge_checkpoints/1"


# ============================================================================ helpers
def _open(x, what: str) -> Checkpoint:
    if isinstance(x, Checkpoint):
        return x
    if not isinstance(x, (str, os.PathLike)):
        raise TypeError(f"{what} must be a checkpoint folder path, got {type(x).__name__}")
    return Checkpoint(x)


def _is_float(dt) -> bool:
    return np.dtype(dt).kind == "f" or np.dtype(dt).name == "bfloat16"


class _Anchor:
    """The anchor function of :mod:`bmm_jax.anchors` and its options, called on one-leaf trees."""

    def __init__(self, name: str, anchor_scale, options: Mapping | None):
        from bmm_jax import anchors
        if name not in ANCHORS:
            known = ", ".join(ANCHORS)
            if name in anchors.ANCHORS:
                raise ValueError(f"anchor {name!r} cannot be streamed (it needs more than one tensor at a time); "
                                 f"streamable anchors: {known}")
            raise ValueError(f"unknown anchor {name!r}; streamable anchors: {known}")
        self.name = name
        self.fn = anchors.get(name)
        params = inspect.signature(self.fn).parameters
        self.kw = dict(options or {})
        unknown = sorted(set(self.kw) - set(params) - {"anchor_scale", "scale"})
        if unknown:
            raise ValueError(f"anchor {name!r} has no options {unknown}; it takes {sorted(params)[2:]}")
        self.scale_key = "anchor_scale" if "anchor_scale" in params else ("scale" if "scale" in params else None)
        for k in ("anchor_scale", "scale"):
            if k in self.kw and k != self.scale_key:
                v = self.kw.pop(k)
                anchor_scale = v if anchor_scale is None else anchor_scale
        if anchor_scale is not None:
            if self.scale_key is None:
                raise ValueError(f"anchor {name!r} has no scale")
            self.kw[self.scale_key] = float(anchor_scale)
        if "trim" in params:                              # TIES: per tensor, as mergekit
            self.kw.setdefault("trim", "leaf")
            if self.kw["trim"] != "leaf":
                raise ValueError(f"TIES with trim={self.kw['trim']!r} needs the whole model at once; a streamed "
                                 "merge trims per tensor (trim='leaf')")
        if "modules" in params:                           # TSV-M / Iso: SVD-merge the regressed modules only
            self.kw.setdefault("modules", "labels")
        # with modules="all_2d" every 2-D tensor is merged as a matrix: held whole, never chunked
        self.whole_2d = self.kw.get("modules") == "all_2d"
        self.takes_labels = "labels" in params
        defaults = {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}
        self.scale = float(self.kw.get(self.scale_key, defaults.get(self.scale_key, 1.0))) if self.scale_key else 1.0
        self.density = float(self.kw.get("density", defaults.get("density", 0.2)))
        self.elementwise_carry = True            # every streamable anchor treats non-module leaves elementwise

    @property
    def linear_ok(self) -> bool:
        """The anchor is ``theta_0 + sum_k c_k tau_k`` (TA, average) with a concrete scale."""
        from bmm_jax.anchors import LINEAR
        return self.name in LINEAR

    def linear(self, k: int):
        """The :class:`~bmm_jax.anchors.LinearAnchor` of a linear anchor with this scale."""
        from bmm_jax.anchors import LinearAnchor
        return LinearAnchor.of(self.name, k, self.scale)

    def __call__(self, name: str, base_leaf, expert_leaves, label: Label):
        b = {KEY: base_leaf}
        es = [{KEY: e} for e in expert_leaves]
        if self.takes_labels:
            return self.fn(b, es, labels={KEY: leaf_label(label)}, **self.kw)[KEY]
        return self.fn(b, es, **self.kw)[KEY]

    def describe(self) -> dict:
        return {"name": self.name, **{k: v for k, v in self.kw.items()}}


# Every per-tensor library call sees the one-leaf tree {KEY: array} with a label that depends on the
# tensor's shape and role only: the same tree structure and static arguments for every tensor of a
# shape, so jax's trace and compilation caches are hit instead of growing with the tensor names.
KEY = "w"


def leaf_label(label: Label) -> Label:
    """``label`` for the one-leaf tree ``{KEY: array}`` (path ``KEY``, no block)."""
    if not label.regressed:
        return Label(path=KEY, regressed=False)
    return Label(path=KEY, regressed=True, kind=label.kind, block=None, input_group=KEY, layout=label.layout,
                 d_in=label.d_in, d_out=label.d_out)


def _merge_call():
    """``bmm_jax.merge`` with its device argument for one local device (``devices=`` or ``mesh=``)."""
    import bmm_jax
    params = inspect.signature(bmm_jax.merge).parameters
    dev = jax.local_devices()[0]
    if "mesh" in params:
        from bmm_jax.sharding import module_mesh
        extra = {"mesh": module_mesh([dev])}
    elif "devices" in params:
        extra = {"devices": [dev]}
    else:                                                  # pragma: no cover
        extra = {}
    return bmm_jax.merge, extra


def _jsonable(x):
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (bool, str, type(None))):
        return x
    if isinstance(x, (int, np.integer)):
        return int(x)
    try:
        return float(x)
    except (TypeError, ValueError):
        return str(x)


class _Grams:
    """Per-module Gram matrices ``[K, d_in, d_in]`` (float32) from a source, or ``None`` (data-free).

    Gram files (:mod:`bmm_jax.grams.files`, one per task or one with K tasks) are read one input
    group at a time (``GramFiles.read_group``; the last group is kept, so q/k/v and gate/up read
    it once). Their module paths may be the tensor names or the Flax paths of the same model
    (mapped with :func:`bmm_jax.models.llm.torch_name`).
    """

    def __init__(self, grams, k: int, naming: str):
        self.k, self.naming = k, naming
        self.files = None
        self.mapping = None
        self.fn = None
        self._cache = (None, None)
        if grams is None or (isinstance(grams, str) and grams == "data_free"):
            self.kind = "data_free"
        elif callable(grams) and not isinstance(grams, Mapping):
            self.kind, self.fn = "callable", grams
        elif isinstance(grams, Mapping):
            self.kind, self.mapping = "mapping", grams
        else:
            from bmm_jax.grams.files import GramFiles
            from bmm_jax.models.llm import torch_name
            self.kind = "files"
            self.files = GramFiles(grams)
            if self.files.num_tasks != k:
                raise ValueError(f"grams: the Gram files hold {self.files.num_tasks} tasks for {k} experts "
                                 f"({self.files.paths[:2]})")
            self.group_of = {}
            for m, g in self.files.key_of.items():
                self.group_of[m] = g
                self.group_of.setdefault(torch_name(m), g)

    def describe(self):
        return {"kind": self.kind if self.files is None else f"files ({self.files.kind})",
                "files": None if self.files is None else list(self.files.paths)}

    def _keys(self, name: str, label: Label) -> list[str]:
        fp = flax_path(name, 2, self.naming)
        keys = [name, fp, label.input_group or ""]
        if fp.endswith("/kernel"):
            keys.append(fp[: -len("/kernel")])
        return [k for k in keys if k]

    def _lookup(self, table, name: str, label: Label):
        for key in self._keys(name, label):
            if key in table:
                return table[key]
        raise ValueError(f"grams have no entry for module {name!r} (looked for {self._keys(name, label)})")

    def module(self, name: str, label: Label):
        if self.kind == "data_free":
            return None
        if self.kind == "callable":
            g = self.fn(name, label)
        elif self.kind == "mapping":
            g = self._lookup(self.mapping, name, label)
        else:
            group = self._lookup(self.group_of, name, label)
            if self._cache[0] != group:
                self._cache = (None, None)
                self._cache = (group, self.files.read_group(group))
            g = self._cache[1]
        g = np.asarray(g, np.float32)
        if g.shape != (self.k, label.d_in, label.d_in):
            raise ValueError(f"Gram of module {name!r} has shape {g.shape}, expected [K, d_in, d_in] = "
                             f"{(self.k, label.d_in, label.d_in)}")
        return jnp.asarray(g)


# ============================================================================ the plan
class _Tensor:
    """One output tensor: its label, output entry, vocabulary split and cost estimate."""
    __slots__ = ("name", "label", "entry", "shared_rows", "vocab", "cost", "chunked")

    def __init__(self, name, label, entry, shared_rows, vocab, cost, chunked):
        self.name, self.label, self.entry = name, label, entry
        self.shared_rows, self.vocab, self.cost, self.chunked = shared_rows, vocab, cost, chunked


def _plan(base: Checkpoint, experts: Sequence[Checkpoint], labels: dict, *, method: str, carry: str,
          dtype, chunk_bytes: int, whole_2d: bool = False) -> list[_Tensor]:
    names = base.names()
    k = len(experts)
    plan = []
    for ei, e in enumerate(experts):
        missing = [n for n in names if n not in e]
        extra = [n for n in e.names() if n not in base]
        if missing or extra:
            raise ValueError(f"expert {ei} ({e.path}) does not have the base's tensors: missing {missing[:5]}"
                             f"{' ...' if len(missing) > 5 else ''}, unexpected {extra[:5]}"
                             f"{' ...' if len(extra) > 5 else ''}")
    for n in names:
        bi = base.info(n)
        infos = [e.info(n) for e in experts]
        lab = labels[n]
        out_shape, shared, vocab = bi.shape, None, None
        for ei, i in enumerate(infos):
            if i.shape != bi.shape:
                same_cols = len(i.shape) == len(bi.shape) >= 1 and i.shape[1:] == bi.shape[1:]
                if not (same_cols and is_vocab_tensor(n) and not lab.regressed):
                    raise ValueError(f"expert {ei} ({experts[ei].path}) tensor {n!r}: shape {list(i.shape)} != base "
                                     f"shape {list(bi.shape)}")
            if _is_float(i.dtype) != _is_float(bi.dtype):
                raise TypeError(f"expert {ei} tensor {n!r}: dtype {i.dtype} is not compatible with the base's {bi.dtype}")
        rows = [bi.shape[0]] + [i.shape[0] for i in infos] if bi.shape else []
        if rows and len(set(rows)) > 1:
            shared = min(rows)
            out_shape = (max(rows),) + bi.shape[1:]
            vocab = {"base_rows": rows[0], "expert_rows": rows[1:], "out_rows": max(rows), "shared_rows": shared}
        out_dtype = np.dtype(dtype) if (dtype is not None and _is_float(bi.dtype)) else bi.dtype
        nel = int(np.prod(out_shape, dtype=np.int64))
        if lab.regressed and method == "bmm" and _is_float(bi.dtype):
            cost = k * lab.d_in * lab.d_out * (lab.d_in + min(lab.d_in, lab.d_out)) + lab.d_in ** 3 / 3
        else:
            cost = 40.0 * k * nel
        chunked = (not lab.regressed and _is_float(bi.dtype) and carry != "base" and len(out_shape) >= 1
                   and 4 * k * nel > chunk_bytes and out_shape[0] > 1
                   and not (whole_2d and len(out_shape) == 2 and (method == "anchor" or carry == "anchor")))
        plan.append(_Tensor(n, lab, Entry(n, out_dtype, out_shape), shared, vocab, cost, chunked))
    return plan


def working_set_bytes(t: _Tensor, k: int, method: str, in_itemsize: int, chunk_bytes: int,
                      ties: bool = False) -> int:
    """The working set ``W(t)`` of one tensor (see the module docstring)."""
    n = int(np.prod(t.entry.shape, dtype=np.int64))
    out = n * t.entry.dtype.itemsize
    if t.chunked:
        return (6 if ties else 3) * chunk_bytes + out // max(1, len(row_chunks(t.entry.shape[0], n // t.entry.shape[0],
                                                                                 k, chunk_bytes)))
    base = (k + 1) * n * in_itemsize + out
    l = t.label
    if l.regressed and method == "bmm":
        return base + 4 * ((k + 3) * l.d_in * l.d_out + 3 * l.d_in * l.d_in)
    return base + 4 * (2 * k + 2) * n


# ============================================================================ one tensor
class _Merger:
    def __init__(self, base, experts, plan_by_name, *, method, anchor: _Anchor, grams: _Grams, hparams,
                 carry, prior, weights, chunk_bytes, naming):
        self.base, self.experts = base, experts
        self.k = len(experts)
        self.method, self.anchor, self.grams, self.hparams = method, anchor, grams, hparams
        self.carry, self.prior, self.weights, self.chunk_bytes = carry, prior, weights, chunk_bytes
        self.merge_fn, self.merge_extra = _merge_call()
        self.diags: dict[str, Any] = {}
        self.ties: dict[str, Any] = {}
        self.read_next: Callable[[], None] | None = None   # read-ahead to start once the inputs are read

    # ---- reading
    def _cast(self, x, dt):
        a = np.asarray(x)
        return jnp.asarray(a if a.dtype == dt else a.astype(dt))

    def _inputs(self, name: str, lo: int | None = None, hi: int | None = None):
        """jax copies of rows [lo, hi) (or all) of base and experts, in one dtype (the base's, or
        float32 when the experts' dtypes differ)."""
        def view(c):
            return c.tensor(name) if lo is None else c.rows(name, lo, hi)
        b = view(self.base)
        es = [view(e) for e in self.experts]
        dt = b.dtype if all(e.dtype == b.dtype for e in es) else np.dtype(np.float32)
        out = self._cast(b, dt), [self._cast(e, dt) for e in es]
        if self.read_next is not None:                   # these rows are read: the disk may go on with the next
            nxt, self.read_next = self.read_next, None
            nxt()
        return out

    def _release(self, name: str, lo: int | None = None, hi: int | None = None) -> None:
        for c in (self.base, *self.experts):
            c.release(name, lo, hi)

    def _prefetch(self, name: str, lo: int | None = None, hi: int | None = None) -> None:
        for c in (self.base, *self.experts):
            c.prefetch(name, lo, hi)

    def _ranges(self, t: _Tensor, rows: int) -> list[tuple[int, int]]:
        """Row chunks of a chunked / shared-rows tensor (the whole range for a whole-2-D anchor)."""
        info = self.base.info(t.name)
        row_el = int(np.prod(info.shape[1:], dtype=np.int64))
        mode = "anchor" if self.method == "anchor" else self.carry
        whole = self.anchor.whole_2d and len(info.shape) == 2 and mode == "anchor"
        return [(0, rows)] if whole else row_chunks(rows, row_el, self.k, self.chunk_bytes)

    def prefetch(self, t: _Tensor) -> None:
        """Start reading tensor ``t`` (its first row chunk if it is merged by chunks) from every
        checkpoint in the background, while the previous tensor is being merged."""
        info = self.base.info(t.name)
        if _is_float(info.dtype) and (t.chunked or t.shared_rows is not None):
            rows = t.shared_rows if t.shared_rows is not None else info.shape[0]
            lo, hi = self._ranges(t, rows)[0]
            self._prefetch(t.name, lo, hi)
        else:
            self._prefetch(t.name)

    # ---- merging
    def tensor(self, t: _Tensor, write: Callable[[int, np.ndarray], None]) -> None:
        """Merge tensor ``t`` and hand its rows to ``write(start_row, rows)``."""
        name = t.name
        info = self.base.info(name)
        if not _is_float(info.dtype):
            write(0, np.array(self.base.tensor(name)))      # integer buffers: the base's
            self.base.release(name)
            return
        rows = t.shared_rows if t.shared_rows is not None else (info.shape[0] if info.shape else None)
        if t.chunked or t.shared_rows is not None:
            self._carried_rows(t, rows, write)
        else:
            write(0, self._whole(t))
        if t.vocab is not None:
            self._extra_rows(t, write)
        # jax may alias the memory-mapped inputs (zero-copy on CPU): their pages are touched while
        # computing, so they leave the resident set here, once the tensor is done
        self._release(name)

    def _out(self, x, t: _Tensor) -> np.ndarray:
        a = np.asarray(x)
        return a if a.dtype == t.entry.dtype else a.astype(t.entry.dtype)

    def _whole(self, t: _Tensor) -> np.ndarray:
        name, lab = t.name, t.label
        b, es = self._inputs(name)
        if lab.regressed:
            if self.method == "anchor":
                return self._out(self.anchor(name, b, es, lab), t)
            # a linear anchor (TA, average) enters the solve as its coefficients: never materialised
            anchor = self.anchor.linear(len(es)) if self.anchor.linear_ok else {KEY: self.anchor(name, b, es, lab)}
            rho, scale = self.hparams[name]
            g = self.grams.module(name, lab)
            res = self.merge_fn({KEY: b}, [{KEY: e} for e in es], anchor, None if g is None else {KEY: g},
                                {"rho": rho, "scale": scale}, labels={KEY: leaf_label(lab)}, carry="anchor",
                                prior=self.prior, weights=self.weights, **self.merge_extra)
            diag = res.diagnostics["modules"]
            if KEY in diag:
                d = _jsonable(diag[KEY])
                if isinstance(d, dict):
                    d.update(kind=lab.kind, block=lab.block)
                self.diags[name] = d
            return self._out(res.params[KEY], t)
        return self._out(self._carried(name, b, es, lab), t)

    def _carried(self, name, b, es, lab):
        mode = "anchor" if self.method == "anchor" else self.carry
        if mode == "base":
            return b
        if mode == "mean":
            from bmm_jax.anchors import average
            return average({KEY: b}, [{KEY: e} for e in es])[KEY]
        return self.anchor(name, b, es, Label(path=name, regressed=False, block=lab.block))

    def _carried_rows(self, t: _Tensor, rows: int, write) -> None:
        """Rows [0, rows) of a carried tensor, by chunks (exact: see the module docstring)."""
        name, lab = t.name, t.label
        mode = "anchor" if self.method == "anchor" else self.carry
        ranges = self._ranges(t, rows)

        following, self.read_next = self.read_next, None
        ties = mode == "anchor" and self.anchor.name == "ties"     # four passes over the chunks

        def ahead(i):
            """Once chunk ``i`` is read: read chunk ``i + 1`` in the background (TIES passes wrap
            around), after the last one the next tensor."""
            if i + 1 < len(ranges) or ties:
                self.read_next = lambda: self._prefetch(name, *ranges[(i + 1) % len(ranges)])
            else:
                self.read_next = following

        if ties:
            def chunks():
                for i, (lo, hi) in enumerate(ranges):
                    ahead(i)
                    yield self._inputs(name, lo, hi)
                    self._release(name, lo, hi)
            row_el = int(np.prod(self.base.info(name).shape[1:], dtype=np.int64))
            info_ = ties_chunked(chunks, rows * row_el, self.k, density=self.anchor.density,
                                 scale=self.anchor.scale,
                                 write=lambda i, x: write(ranges[i][0], self._out(x, t)))
            self.ties[name] = {**info_, "chunks": len(ranges)}
            return
        for i, (lo, hi) in enumerate(ranges):
            ahead(i)
            b, es = self._inputs(name, lo, hi)
            write(lo, self._out(self._carried(name, b, es, lab), t))
            del b, es
            self._release(name, lo, hi)

    def _extra_rows(self, t: _Tensor, write) -> None:
        """Rows every model does not have: the mean over the experts that have them (else the base's)."""
        name, v = t.name, t.vocab
        cuts = sorted({r for r in [v["base_rows"], *v["expert_rows"]] if r > v["shared_rows"]})
        lo = v["shared_rows"]
        sources = []
        for hi in cuts:
            have = [ei for ei, r in enumerate(v["expert_rows"]) if r >= hi]
            if have:
                x = np.mean(np.stack([np.asarray(self.experts[ei].rows(name, lo, hi), np.float32) for ei in have]),
                            axis=0)
                src = [f"expert {ei}" for ei in have]
            else:
                x = np.asarray(self.base.rows(name, lo, hi))
                src = ["base"]
            write(lo, self._out(x, t))
            sources.append({"rows": [lo, hi], "from": src})
            lo = hi
        v["extra_rows"] = sources


# ============================================================================ the entry point
def merge_checkpoints(base, experts: Sequence, out, *, method: str = "bmm", anchor: str = "task_arithmetic",
                      anchor_scale: float | None = None, anchor_options: Mapping | None = None,
                      grams="data_free", hparams: Mapping | None = None,
                      include: Sequence[str] | str | None = None, exclude: Sequence[str] | str | None = None,
                      carry: str = "anchor", prior: str = "isotropic", weights=None, out_format: str = "hf",
                      dtype=None, max_shard_size="5GB", overwrite: bool = False,
                      report_path: str | None = None, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                      coordinator_address: str | None = None, num_processes: int | None = None,
                      process_id: int | None = None, progress: bool = False) -> dict:
    """Merge HF safetensors checkpoints file to file, one tensor at a time (module docstring).

    Args:
      base: folder (or ``.safetensors`` file) of the pretrained model ``theta_0``.
      experts: K >= 2 folders of models fine-tuned from it (same tensor names and shapes; the
        vocabulary tensors may have more or fewer rows).
      out: output folder (created atomically; see ``overwrite``).
      method: ``"bmm"`` (BMM around the anchor on every regressed module) or ``"anchor"`` (write the
        anchor merge itself, e.g. plain averaging, TA, TIES).
      anchor: ``average``, ``task_arithmetic``, ``ties``, ``tsv``, ``iso_c``, ``iso_cts`` or ``wudi``.
      anchor_scale: the anchor's own coefficient (default: the anchor function's default).
      anchor_options: other keyword options of the anchor function (e.g. ``{"density": 0.2}``).
      grams: ``"data_free"`` (from the task vectors), the path of a safetensors Gram file per expert
        (or one file with ``[K, d_in, d_in]`` entries) keyed by tensor name, Flax path or input
        group, a mapping ``{tensor name: [K, d_in, d_in]}``, or a callable ``(name, label) -> array``.
      hparams: ``{"rho": r, "scale": s}`` or a group mapping as in :func:`bmm_jax.merge` (keys: a
        tensor name, ``"block3"``, a kind such as ``"q"`` / ``"mlp-out"``, ``"global"``); default
        ``{"rho": 1.0, "scale": 1.0}``.
      include, exclude: regexes on tensor names selecting the regressed modules
        (:func:`bmm_jax.streaming.labels.tensor_labels`).
      carry: carried tensors from the ``"anchor"`` (default), the ``"base"``, or ``"mean"``
        (``theta_0 + mean_k tau_k``); with ``method="anchor"`` everything is the anchor.
      prior, weights: as in :func:`bmm_jax.merge`.
      out_format: ``"hf"`` (safetensors folder) or ``"orbax"`` (:mod:`bmm_jax.checkpoint`).
      dtype: output dtype of the floating tensors (default: the base's, per tensor).
      max_shard_size: largest output shard (``"5GB"``, ``"2GiB"`` or bytes).
      overwrite: replace a non-empty ``out`` that was not written by bmm_jax (an earlier bmm_jax
        output is always replaced, atomically).
      report_path: where to write the JSON report (default ``<out>.json``; ``""`` for none).
      chunk_bytes: carried tensors whose K float32 copies exceed this are processed in row chunks.
      coordinator_address, num_processes, process_id: run as one of N processes
        (:func:`bmm_jax.distributed.initialize`); every process calls this function with the same
        arguments.
      progress: print one line per tensor on stderr.

    Returns:
      The report (a JSON-serialisable dict): settings, per-module diagnostics of BMM, the
      vocabulary handling, shards, per-process seconds and peak RSS, the working-set bound.

    Raises:
      ValueError / TypeError / FileNotFoundError: unreadable or mismatched checkpoints (naming the
      tensor and expert), a bad option, an unsafe ``out``; with several processes, any process's
      error is raised on every process and no output is written.
    """
    t_start = time.perf_counter()
    rss0 = rss_bytes()
    pidx, pcount = distributed.initialize(coordinator_address, num_processes, process_id)
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    if out_format not in OUT_FORMATS:
        raise ValueError(f"unknown out_format {out_format!r}; expected one of {OUT_FORMATS}")
    if carry not in CARRY:
        raise ValueError(f"unknown carry {carry!r}; expected one of {CARRY}")
    if isinstance(experts, (str, os.PathLike, Checkpoint)) or len(experts) < 2:
        raise ValueError("experts must be a list of at least 2 checkpoint folders")
    chunk_bytes = int(chunk_bytes)
    if chunk_bytes <= 0:
        raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
    parse_size(max_shard_size)
    if dtype is not None and not _is_float(np.dtype(dtype)):
        raise ValueError(f"dtype must be a floating dtype, got {dtype}")
    anc = _Anchor(anchor, anchor_scale, anchor_options)
    b = _open(base, "base")
    es = [_open(e, f"expert {i}") for i, e in enumerate(experts)]
    k = len(es)
    naming = detect_naming(b.names())
    labels = tensor_labels({n: b.info(n).shape for n in b.names()}, include=include, exclude=exclude, naming=naming)
    hp = None
    if method == "bmm":
        try:
            from bmm_jax.hparams import resolve_hparams
        except ImportError:                                # pragma: no cover - older layout
            from bmm_jax.merging import resolve_hparams
        from bmm_jax.solve import check_prior
        check_prior(prior)
        if not any(l.regressed for l in labels.values()):
            raise ValueError("no tensor is a regressed module (2-D weights inside numbered blocks): nothing for "
                             "BMM to solve; use method='anchor' or give include=")
        hp = resolve_hparams({"rho": 1.0, "scale": 1.0} if hparams is None else hparams, labels)
    gram_src = _Grams(grams, k, naming) if method == "bmm" else _Grams("data_free", k, naming)
    plan = _plan(b, es, labels, method=method, carry=carry, dtype=dtype, chunk_bytes=chunk_bytes,
                 whole_2d=anc.whole_2d)
    owner = distributed.assign([t.cost for t in plan], pcount)
    shards_per = [plan_shards([t.entry for t, o in zip(plan, owner) if o == p], max_shard_size) for p in range(pcount)]
    all_shards = [s for per in shards_per for s in per]
    files = shard_names(len(all_shards))
    shard_file = {e.name: files[i] for i, s in enumerate(all_shards) for e in s}
    first = sum(len(per) for per in shards_per[:pidx])
    mine = [(files[first + j], s) for j, s in enumerate(shards_per[pidx])]
    inputs = [b.folder] + [e.folder for e in es]

    # ---------------------------------------------------------------- output folder (process 0)
    msg = None
    folder = None
    if pidx == 0:
        try:
            out = check_output_path(out, overwrite=overwrite, inputs=inputs)
            folder = OutputFolder(out)
            msg = {"ok": True, "run_id": folder.run_id, "out": out}
        except (ValueError, OSError) as e:
            msg = {"ok": False, "error": str(e)}
    msg = distributed.broadcast_json(msg)
    if not msg["ok"]:
        raise ValueError(msg["error"])
    out = msg["out"]
    if folder is None:
        folder = OutputFolder(out, msg["run_id"], create=False)

    # ---------------------------------------------------------------- merge my tensors
    merger = _Merger(b, es, {t.name: t for t in plan}, method=method, anchor=anc, grams=gram_src, hparams=hp,
                     carry=carry, prior=prior, weights=weights, chunk_bytes=chunk_bytes, naming=naming)
    by_name = {t.name: t for t in plan}
    in_itemsize = max(b.info(t.name).dtype.itemsize for t in plan)
    bound = max((working_set_bytes(t, k, method, in_itemsize, chunk_bytes, ties=anc.name == "ties") for t in plan),
                default=0)
    t_merge = time.perf_counter()
    rss_start = rss_bytes()
    error = None
    n_mine = sum(len(s) for _, s in mine)
    done = 0
    order = [e.name for _, entries in mine for e in entries]
    following = dict(zip(order, order[1:]))
    try:
        if order:
            merger.prefetch(by_name[order[0]])
        for fname, entries in mine:
            w = ShardWriter(folder.path(fname), entries, metadata={"format": "pt"})
            try:
                for e in entries:
                    t0 = time.perf_counter()
                    if e.name in following:                # read ahead once this one's inputs are read
                        merger.read_next = functools.partial(merger.prefetch, by_name[following[e.name]])
                    merger.tensor(by_name[e.name], lambda start, x, name=e.name: w.write_rows(name, start, x))
                    maybe_trim()                   # only inside memory.trimming() (bmm-merge opts in)
                    done += 1
                    if progress:
                        print(f"[{pidx}] {done}/{n_mine} {e.name} {list(e.shape)} {time.perf_counter() - t0:.2f}s "
                              f"rss {rss_bytes() / 2 ** 30:.2f} GiB", file=sys.stderr, flush=True)
                w.close()
            except BaseException:
                w.abort()
                raise
    except (ValueError, TypeError, KeyError, OSError, RuntimeError, FloatingPointError) as e:
        error = f"{type(e).__name__}: {e}"
        if pcount == 1:
            folder.abort()
            raise
    part = {"process": pidx, "error": error, "modules": merger.diags, "ties": merger.ties,
            "tensors": n_mine, "seconds": time.perf_counter() - t_merge, "rss_start_bytes": rss_start,
            "rss_at_call_bytes": rss0, "peak_rss_bytes": peak_rss_bytes()}
    parts = distributed.allgather_json(part)
    errors = [f"process {p['process']}: {p['error']}" for p in parts if p["error"]]
    if errors:
        if pidx == 0:
            folder.abort()
        raise ValueError("the merge failed, no output written: " + "; ".join(errors))

    # ---------------------------------------------------------------- finish (process 0)
    modules, ties = {}, {}
    for p in parts:
        modules.update(p["modules"])
        ties.update(p["ties"])
    vocab = {t.name: t.vocab for t in plan if t.vocab is not None}
    config = dict(b.config) if b.config is not None else None
    tok_src = b.folder
    if vocab:
        out_rows = max(v["out_rows"] for v in vocab.values())
        if config is not None and "vocab_size" in config and config["vocab_size"] != out_rows:
            config["vocab_size"] = out_rows
        biggest = [i for i, e in enumerate(es) if any(e.info(n).shape[0] == out_rows for n in vocab)]
        if biggest and b.info(next(iter(vocab))).shape[0] != out_rows:
            tok_src = es[biggest[0]].folder
    report = {
        "format": FORMAT, "out": out, "out_format": out_format, "method": method,
        "anchor": anc.describe(), "grams": gram_src.describe() if method == "bmm" else None,
        "hparams": _jsonable(hparams if hparams is not None else ({"rho": 1.0, "scale": 1.0} if method == "bmm" else None)),
        "carry": carry if method == "bmm" else "anchor", "prior": prior if method == "bmm" else None,
        "weights": None if weights is None else [float(x) for x in weights],
        "base": b.path, "experts": [e.path for e in es], "naming": naming, "num_experts": k,
        "tensors": len(plan), "regressed": sum(t.label.regressed for t in plan),
        "modules": {n: modules[n] for n in (t.name for t in plan) if n in modules},
        "ties_chunked": ties or None,
        "vocabulary": ({"tensors": vocab, "tokenizer_from": tok_src, "config_vocab_size":
                        None if config is None else config.get("vocab_size")} if vocab else None),
        "shards": files if out_format == "hf" else None, "processes": pcount,
        "tensors_per_process": [p["tensors"] for p in parts],
        "memory": {"working_set_bound_bytes": int(bound),
                   "peak_rss_bytes": [p["peak_rss_bytes"] for p in parts],
                   "rss_before_merge_bytes": [p["rss_start_bytes"] for p in parts],
                   "chunk_bytes": chunk_bytes},
        "seconds": {"merge_per_process": [p["seconds"] for p in parts]},
    }
    if pidx == 0:
        try:
            if len(files) > 1:
                total = sum(t.entry.nbytes for t in plan)
                write_index(folder.tmp, shard_file, total)
            if b.config is not None or os.path.isdir(b.folder):
                copy_side_files(b.folder, folder.tmp, config=config)
                if tok_src != b.folder:
                    copy_side_files(tok_src, folder.tmp, names=[n for n in _TOKENIZER_FILES])
            report["seconds"]["total"] = time.perf_counter() - t_start
            if out_format == "hf":
                atomic_write_json(folder.path(REPORT_NAME), report)
                folder.commit()
            else:
                _to_orbax(folder, out, report)
            if report_path is None or report_path:
                atomic_write_json(report_path or (out.rstrip(os.sep) + ".json"), report)
        except BaseException:
            folder.abort()
            raise
    distributed.barrier("bmm_jax-merge-committed")
    for c in [b, *es]:
        c.close()
    return report


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                    "vocab.json", "merges.txt", "vocab.txt", "added_tokens.json", "spiece.model")


def _to_orbax(folder: OutputFolder, out: str, report: dict) -> None:
    """Save the finished temporary HF folder as a bmm_jax orbax checkpoint at ``out`` (leaves
    nested by the dotted tensor names), then remove the temporary folder."""
    from bmm_jax import checkpoint
    ck = Checkpoint(folder.tmp)
    tree: dict = {}
    for n in ck.names():
        node = tree
        parts = n.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = ck.tensor(n)
    checkpoint.save(out, tree, metadata={"report": FORMAT, "method": report["method"],
                                         "anchor": report["anchor"], "base": report["base"],
                                         "experts": report["experts"]})
    del tree
    ck.close()
    folder.abort()


__all__ = ["merge_checkpoints", "working_set_bytes", "METHODS", "ANCHORS", "OUT_FORMATS"]
