"""Grams as files: activation Grams written to safetensors, read back for any later merge.

A Gram file holds, for K_f tasks (usually one task per file), one float32 tensor
``[K_f, d_in, d_in]`` per input group (q/k/v share one, gate/up share one), named by the group
key, and in its safetensors metadata (strings; JSON where structured):

* ``format = "bmm_jax.grams"``, ``version``, ``kind`` (``activations`` / ``data_free`` / ``hybrid``),
* ``num_tasks`` (K_f), ``num_tokens`` (real rows seen per task), ``task_names``,
* ``key_of``: ``{module path: group key}``, ``groups``: ``{group key: d_in}``,
* ``labels``: the regressed modules' labels (path, kind, block, input group, layout, shape) when
  saved with a label tree, and ``user``: free-form JSON metadata.

Files are written atomically (a temporary file in the same folder, fsync, rename), one tensor at
a time (memory: one group's Grams on the host), and never over a file that is not a Gram file.
:func:`load_grams` concatenates several per-task files into one :class:`Grams` with K tasks,
checking that they hold the same modules, groups and shapes (errors name the file);
:class:`GramFiles` reads one group at a time (for merges that stream module by module).
:func:`collect_grams_to_file` streams calibration batches through a model (init / update /
finalize of :mod:`bmm_jax.grams.activations`) and writes the file.
"""
from __future__ import annotations

import json
import os
import struct
import tempfile
import weakref
from collections.abc import Mapping
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from bmm_jax._tree import PyTree
from bmm_jax.grams.activations import GramState, capture_inputs, finalize, init, update
from bmm_jax.grams._base import Grams
from bmm_jax.labels import Label, build_labels, label_list, regressed

FORMAT = "bmm_jax.grams"
VERSION = "1"
_ALIGN = 8


# ----------------------------------------------------------------------------- writing
def _paths_of(paths) -> list[str]:
    if isinstance(paths, (str, bytes)) or hasattr(paths, "__fspath__"):
        p = os.fspath(paths)
        if os.path.isdir(p):
            found = sorted(os.path.join(p, f) for f in os.listdir(p) if f.endswith(".safetensors"))
            if not found:
                raise FileNotFoundError(f"no .safetensors Gram file in folder {p}")
            return found
        return [p]
    out = [os.fspath(p) for p in paths]
    if not out:
        raise ValueError("no Gram file given")
    return out


def read_metadata(path: str) -> dict[str, str] | None:
    """The safetensors ``__metadata__`` of ``path`` if it is a bmm_jax Gram file, else ``None``
    (not a safetensors file, or one of another kind). Reads the header only."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                return None
            (n,) = struct.unpack("<Q", head)
            if n <= 0 or n > 100 * 2 ** 20 or n > os.path.getsize(path) - 8:
                return None
            header = json.loads(f.read(n).decode("utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        return None
    return meta


def is_gram_file(path) -> bool:
    """True if ``path`` is a Gram file written by :func:`save_grams`."""
    return read_metadata(os.fspath(path)) is not None


def _label_record(l: Label) -> dict:
    return {"path": l.path, "kind": l.kind, "block": l.block, "input_group": l.input_group,
            "layout": l.layout, "d_in": l.d_in, "d_out": l.d_out}


def _json(obj, what: str) -> str:
    try:
        return json.dumps(obj, sort_keys=True)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{what} must be JSON-serialisable: {e}") from None


def _write_safetensors(path: str, arrays: list[tuple[str, Callable[[], np.ndarray], tuple]], meta: dict,
                       overwrite: bool) -> None:
    """Write a safetensors file tensor by tensor (each ``get()`` is called once, in order),
    atomically: a temporary file beside ``path``, fsync, then ``os.replace``."""
    header: dict[str, Any] = {"__metadata__": meta}
    offset = 0
    for name, _, shape in arrays:
        nbytes = int(np.prod(shape)) * 4
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    hbytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hbytes += b" " * (-len(hbytes) % _ALIGN)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    if os.path.isdir(path):
        raise IsADirectoryError(f"cannot write Gram file {path}: it is a folder")
    if os.path.exists(path):
        if not is_gram_file(path):
            raise FileExistsError(f"refusing to overwrite {path}: it exists and is not a bmm_jax Gram file")
        if not overwrite:
            raise FileExistsError(f"Gram file {path} exists (pass overwrite=True to replace it)")
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(struct.pack("<Q", len(hbytes)))
            f.write(hbytes)
            for name, get, shape in arrays:
                a = np.ascontiguousarray(get(), dtype="<f4")
                if a.shape != tuple(shape):
                    raise ValueError(f"tensor {name!r}: shape {a.shape} != announced {tuple(shape)}")
                f.write(memoryview(a).cast("B"))
                del a
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_grams(path, grams: Grams, labels: PyTree | None = None, *, task: int | None = None,
               task_name: str | Sequence[str] | None = None, metadata: Mapping | None = None,
               overwrite: bool = True) -> str:
    """Write ``grams`` (or one of its tasks) to a safetensors Gram file, atomically.

    Args:
      path: file to write (``.safetensors`` by convention). An existing file is replaced only if
        it is a Gram file (and ``overwrite``); anything else raises ``FileExistsError``.
      grams: :class:`Grams` with K tasks (dense or factored: factors are written as dense Grams).
      labels: optional label tree of the params the Grams belong to; its regressed modules must
        all have a Gram of matching ``d_in``; their labels are recorded in the metadata.
      task: index of the one task to write (a per-task file); ``None`` writes all K tasks.
      task_name: name(s) of the written task(s), recorded in the metadata.
      metadata: JSON-serialisable user metadata (calibration data, model, ...).
      overwrite: replace an existing Gram file.

    Returns:
      ``path`` (as a string).
    """
    if not isinstance(grams, Grams):
        raise TypeError(f"grams must be a bmm_jax.grams.Grams, got {type(grams).__name__}")
    path = os.fspath(path)
    key_of = dict(grams.key_of)
    if not key_of:
        raise ValueError("grams holds no module: nothing to save")
    k_all = grams.num_experts
    if task is None:
        tasks = list(range(k_all))
    else:
        if isinstance(task, bool) or not isinstance(task, (int, np.integer)) or not 0 <= int(task) < k_all:
            raise ValueError(f"task must be an index in [0, {k_all}), got {task!r}")
        tasks = [int(task)]
    names = [task_name] if isinstance(task_name, str) else (list(task_name) if task_name is not None else
                                                             [None] * len(tasks))
    if len(names) != len(tasks):
        raise ValueError(f"task_name: {len(names)} names for {len(tasks)} written tasks")
    first = {}
    for p, g in key_of.items():
        first.setdefault(g, p)
    dims = {}
    for g, p in first.items():
        arr_shape = tuple(jax.eval_shape(lambda p=p: grams[p]).shape)   # abstract: nothing computed
        if len(arr_shape) != 3 or arr_shape[1] != arr_shape[2] or arr_shape[0] != k_all:
            raise ValueError(f"Gram of module '{p}' has shape {arr_shape}, expected [K={k_all}, d, d]")
        dims[g] = int(arr_shape[1])
    label_records = None
    if labels is not None:
        label_records = []
        for l in regressed(labels):
            if l.path not in key_of:
                raise ValueError(f"labels regress module '{l.path}' but grams has no Gram for it")
            if dims[key_of[l.path]] != l.d_in:
                raise ValueError(f"module '{l.path}': label d_in = {l.d_in} but its Gram is "
                                 f"{dims[key_of[l.path]]} x {dims[key_of[l.path]]}")
            label_records.append(_label_record(l))
    tokens = [grams.num_tokens.get(t) for t in tasks]
    meta = {"format": FORMAT, "version": VERSION, "kind": str(grams.kind), "num_tasks": str(len(tasks)),
            "num_tokens": _json([None if n is None else float(n) for n in tokens], "num_tokens"),
            "task_names": _json(names, "task_name"), "key_of": _json(key_of, "key_of"),
            "groups": _json(dims, "groups"), "labels": _json(label_records, "labels"),
            "user": _json(dict(metadata) if metadata is not None else {}, "metadata")}

    def getter(p):
        def get():
            a = grams[p]
            a = a[np.asarray(tasks)] if len(tasks) != k_all else a
            return np.asarray(jax.device_get(a), np.float32)
        return get
    arrays = [(g, getter(first[g]), (len(tasks), dims[g], dims[g])) for g in sorted(first)]
    _write_safetensors(path, arrays, meta, overwrite)
    return path


# ----------------------------------------------------------------------------- reading
class GramFiles:
    """Lazy view of one or more Gram files (per-task files are concatenated along the task axis).

    Args:
      paths: a file, a folder (every ``*.safetensors`` in it, sorted by name) or a sequence of files.

    Attributes:
      paths: the files, in task order. key_of: ``{module path: group key}``. groups: ``{group key:
      d_in}``. num_tasks: K. num_tokens: ``{task index: rows}``. task_names: list of K (or None).
      kind: the Gram kind (``"hybrid"`` if the files differ). labels: recorded label records of
      the first file (list of dicts) or ``None``. user: per-file user metadata.

    Raises:
      ValueError: a file that is not a Gram file, or files that disagree on modules, groups or
      shapes; the message names the file.
    """

    def __init__(self, paths):
        self.paths = _paths_of(paths)
        metas = []
        for p in self.paths:
            if not os.path.isfile(p):
                raise FileNotFoundError(f"no Gram file at {p}")
            meta = read_metadata(p)
            if meta is None:
                raise ValueError(f"{p} is not a bmm_jax Gram file (no '{FORMAT}' safetensors metadata)")
            if meta.get("version") != VERSION:
                raise ValueError(f"{p}: Gram file version {meta.get('version')!r} is not supported "
                                 f"(expected {VERSION})")
            try:
                parsed = {k: json.loads(meta[k]) for k in ("num_tokens", "task_names", "key_of", "groups",
                                                            "labels", "user")}
                parsed["num_tasks"] = int(meta["num_tasks"])
                parsed["kind"] = meta.get("kind", "activations")
            except (KeyError, ValueError) as e:
                raise ValueError(f"{p}: malformed Gram file metadata ({e})") from None
            self._check_file(p, parsed)
            metas.append(parsed)
        ref = metas[0]
        for p, m in zip(self.paths[1:], metas[1:]):
            if m["key_of"] != ref["key_of"]:
                a, b = set(ref["key_of"]), set(m["key_of"])
                diff = (f"missing modules {sorted(a - b)[:3]}" if a - b else
                        f"extra modules {sorted(b - a)[:3]}" if b - a else
                        "the same modules in other input groups")
                raise ValueError(f"{p} does not match {self.paths[0]}: {diff}")
            for g, d in ref["groups"].items():
                if m["groups"].get(g) != d:
                    raise ValueError(f"{p}: group {g!r} has d_in = {m['groups'].get(g)}, but {d} in "
                                     f"{self.paths[0]}")
        self.key_of: dict[str, str] = dict(ref["key_of"])
        self.groups: dict[str, int] = {g: int(d) for g, d in ref["groups"].items()}
        self._per_file = [m["num_tasks"] for m in metas]
        self.num_tasks = sum(self._per_file)
        toks = [n for m in metas for n in m["num_tokens"]]
        self.num_tokens = {i: n for i, n in enumerate(toks) if n is not None}
        self.task_names = [n for m in metas for n in m["task_names"]]
        kinds = {m["kind"] for m in metas}
        self.kind = kinds.pop() if len(kinds) == 1 else "hybrid"
        self.labels = ref["labels"]
        self.user = [m["user"] for m in metas]

    @staticmethod
    def _check_file(p: str, m: dict) -> None:
        from safetensors import safe_open
        if not isinstance(m["key_of"], dict) or not isinstance(m["groups"], dict):
            raise ValueError(f"{p}: malformed Gram file metadata (key_of / groups)")
        if len(m["num_tokens"]) != m["num_tasks"] or len(m["task_names"]) != m["num_tasks"]:
            raise ValueError(f"{p}: metadata lists {len(m['num_tokens'])} token counts for "
                             f"{m['num_tasks']} tasks")
        missing = sorted(set(m["key_of"].values()) - set(m["groups"]))
        if missing:
            raise ValueError(f"{p}: modules refer to input groups {missing[:3]} that the file does not hold")
        with safe_open(p, framework="numpy") as f:
            names = set(f.keys())
            for g, d in m["groups"].items():
                if g not in names:
                    raise ValueError(f"{p}: no tensor for input group {g!r}")
                sl = f.get_slice(g)
                shape = tuple(sl.get_shape())
                if shape != (m["num_tasks"], d, d):
                    raise ValueError(f"{p}: tensor {g!r} has shape {shape}, expected "
                                     f"{(m['num_tasks'], d, d)}")
                if sl.get_dtype() != "F32":
                    raise ValueError(f"{p}: tensor {g!r} has dtype {sl.get_dtype()}, expected F32")

    def read_group(self, group: str) -> np.ndarray:
        """``[K, d, d]`` float32 Grams of one input group, from every file (numpy)."""
        from safetensors import safe_open
        if group not in self.groups:
            raise KeyError(f"no input group {group!r} in Gram files {self.paths[:2]}")
        d = self.groups[group]
        out = np.empty((self.num_tasks, d, d), np.float32)
        i = 0
        for p, n in zip(self.paths, self._per_file):
            with safe_open(p, framework="numpy") as f:
                out[i:i + n] = f.get_tensor(group)
            i += n
        return out

    def read(self, module: str) -> np.ndarray:
        """``[K, d_in, d_in]`` Grams of one module (its input group's)."""
        if module not in self.key_of:
            raise KeyError(f"no Gram for module '{module}' in Gram files {self.paths[:2]}")
        return self.read_group(self.key_of[module])

    def __repr__(self) -> str:
        return (f"GramFiles(files={len(self.paths)}, K={self.num_tasks}, modules={len(self.key_of)}, "
                f"groups={len(self.groups)}, kind={self.kind!r})")


def _rename_fn(rename) -> Callable[[str], str]:
    if rename is None:
        return lambda p: p
    if callable(rename):
        return rename
    if isinstance(rename, Mapping):
        return lambda p: rename.get(p, p)
    raise TypeError(f"rename must be None, a callable or a mapping, got {type(rename).__name__}")


def load_grams(paths, labels: PyTree | None = None, *, rename=None) -> Grams:
    """Read one or more Gram files into one :class:`Grams` (``kind`` and token counts kept).

    Args:
      paths: a file, a folder of ``*.safetensors`` Gram files (sorted by name) or a sequence of
        files; per-task files are concatenated along the task axis in the given order.
      labels: optional label tree of the params to merge: only the groups its regressed modules
        read are loaded, and every regressed module must have a Gram of matching ``d_in``.
      rename: maps a module path stored in the files to the path in ``labels`` (a callable or a
        dict), e.g. :func:`bmm_jax.models.llm.torch_name` to use Grams collected with a Flax model
        for a merge over PyTorch-named tensors.

    Returns:
      :class:`Grams` with ``[K, d, d]`` float32 arrays, one per stored input group.

    Raises:
      ValueError / FileNotFoundError: bad or inconsistent files (naming the file), or a regressed
      module without a (fitting) Gram.
    """
    files = GramFiles(paths)
    ren = _rename_fn(rename)
    key_of = {}
    for m, g in files.key_of.items():
        new = ren(m)
        if new in key_of and key_of[new] != g:
            raise ValueError(f"rename maps two modules with different Grams to '{new}'")
        key_of[new] = g
    if labels is not None:
        if not label_list(labels) or not all(isinstance(l, Label) for l in label_list(labels)):
            raise TypeError("labels must be a label tree from bmm_jax.labels.build_labels")
        labs = regressed(labels)
        if not labs:
            raise ValueError("the label tree selects no regressed module: no Gram to load")
        wanted = {}
        for l in labs:
            if l.path not in key_of:
                raise ValueError(f"Gram files {files.paths[0]}{' ...' if len(files.paths) > 1 else ''} have "
                                 f"no Gram for regressed module '{l.path}'"
                                 + ("" if rename is not None else " (pass rename= if the names differ)"))
            g = key_of[l.path]
            if files.groups[g] != l.d_in:
                raise ValueError(f"module '{l.path}': d_in = {l.d_in} but its Gram in {files.paths[0]} is "
                                 f"{files.groups[g]} x {files.groups[g]}")
            wanted[l.path] = g
        key_of = wanted
    dense = {g: jnp.asarray(files.read_group(g)) for g in sorted(set(key_of.values()))}
    return Grams(dense, key_of, kind=files.kind, num_tokens=dict(files.num_tokens))


# ----------------------------------------------------------------------------- collection
def _is_adapter(model) -> bool:
    return hasattr(model, "run_module") and hasattr(model, "labels") and hasattr(model, "row_mask")


def grams_from_state(state: GramState, key_of: Mapping[str, str], *,
                     kind: str = "activations") -> Grams:
    """One-task :class:`Grams` from a finished accumulator (``sums / counts`` per group).

    ``key_of`` maps module paths to the accumulator's group keys (``{l.path: l.input_group}``).
    ``num_tokens[0]`` is the smallest row count over the groups (the real tokens of the
    calibration text when every group reads every token)."""
    grams = finalize(state)
    missing = sorted(set(key_of.values()) - set(grams))
    if missing:
        raise ValueError(f"key_of refers to groups {missing[:3]} the accumulator does not hold")
    tokens = min(float(n) for n in state.counts.values())
    return Grams({g: v[None] for g, v in grams.items()}, dict(key_of), kind=kind, num_tokens={0: tokens})


# jitted calibration steps, per (model or apply_fn) -> {(labels id, mask_fn id, jit): (labels, mask_fn, step)}:
# calling the collector once per task reuses one compilation per batch shape
_STEPS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _calibration_step(model, labels, mask_fn, adapter: bool, jit: bool):
    key = (id(labels), id(mask_fn), jit)
    try:
        per_model = _STEPS.setdefault(model, {})
    except TypeError:                      # not weak-referenceable: no caching
        per_model = {}
    hit = per_model.get(key)
    if hit is not None and hit[0] is labels and hit[1] is mask_fn:
        return hit[2]
    try:                                   # the cached step must not keep the model alive
        ref = weakref.ref(model)
    except TypeError:
        ref = lambda: model                # noqa: E731
    if adapter:
        def step(st, p, batch):
            m = ref()
            ex = batch.get("example_mask")
            b = {k: v for k, v in batch.items() if k != "example_mask"}
            cap = capture_inputs(lambda pp, bb: m.run_module(pp, bb), p, b, labels,
                                 lambda bb, shape: m.row_mask(shape, bb, ex))
            return update(st, cap)
    else:
        def step(st, p, batch):
            return update(st, capture_inputs(ref(), p, batch, labels, mask_fn))
    step = jax.jit(step) if jit else step
    per_model[key] = (labels, mask_fn, step)
    return step


def accumulate_grams(model, params: PyTree, batches: Iterable, *, labels: PyTree | None = None,
                     mask_fn: Callable | None = None, jit: bool = True, progress: bool = False,
                     state: GramState | None = None) -> tuple[GramState, dict[str, str]]:
    """Stream calibration batches through a model into a Gram accumulator (one task).

    Args:
      model: a :class:`bmm_jax.models.ModelAdapter` (e.g. ``hf_adapter("llama", ...)``; batches
        are its batch dicts, optionally with ``"example_mask" [B]``, or raw inputs such as lists
        of strings, preprocessed with the adapter) or an ``apply_fn(params, batch)`` running a
        linen module (then ``mask_fn(batch, x_shape) -> [N]`` masks rows, padding False).
      params: the params to run (an expert, or the base).
      batches: iterable of batches.
      labels: label tree (default: the adapter's, else ``build_labels(params)``).
      jit: jit the capture + update step (one compilation per batch shape).
      progress: tqdm bar over batches.
      state: an accumulator to continue (default: a fresh one).

    Returns:
      ``(state, key_of)``: the :class:`~bmm_jax.grams.activations.GramState` (sums and row
      counts; states of several processes add up) and ``{module path: group key}``. Modules of
      one input group are captured once (padding tokens masked out).
    """
    adapter = _is_adapter(model)
    if labels is None:
        labels = model.labels if adapter else build_labels(params)
    mods = regressed(labels)
    if not mods:
        raise ValueError("the label tree selects no regressed module")
    dims = {l.input_group: l.d_in for l in mods}
    key_of = {l.path: l.input_group for l in mods}
    if state is None:
        state = init(dims)
    elif set(state.sums) != set(dims):
        raise ValueError("state holds other input groups than the label tree's")

    if not adapter and not callable(model):
        raise TypeError("model must be a ModelAdapter or an apply_fn(params, batch)")
    step = _calibration_step(model, labels, mask_fn, adapter, jit)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(desc="Gram calibration", unit="batch")
    for batch in batches:
        if adapter and not isinstance(batch, Mapping):
            batch = model.preprocess(batch)
        state = step(state, params, dict(batch))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return state, key_of


def collect_grams_to_file(model, params: PyTree, batches: Iterable, path, *, labels: PyTree | None = None,
                          mask_fn: Callable | None = None, task_name: str | None = None,
                          metadata: Mapping | None = None, jit: bool = True, progress: bool = False,
                          overwrite: bool = True) -> Grams:
    """Activation Grams of one task, streamed over calibration batches and written to ``path``.

    :func:`accumulate_grams` then :func:`save_grams` (one task per file, labels recorded).
    Memory: one Gram set and one batch's activations, never the whole calibration set.

    Returns:
      The one-task :class:`Grams` that was written (equal to ``load_grams(path)``).
    """
    adapter = _is_adapter(model)
    if labels is None:
        labels = model.labels if adapter else build_labels(params)
    state, key_of = accumulate_grams(model, params, batches, labels=labels, mask_fn=mask_fn, jit=jit,
                                     progress=progress)
    grams = grams_from_state(state, key_of)
    meta = dict(metadata or {})
    if adapter:
        meta.setdefault("model", getattr(model, "name", None))
        meta.setdefault("preprocess_key", getattr(model, "preprocess_key", None))
    save_grams(path, grams, labels, task=0, task_name=task_name, metadata=meta, overwrite=overwrite)
    return grams


__all__ = ["save_grams", "load_grams", "GramFiles", "read_metadata", "is_gram_file", "grams_from_state",
           "accumulate_grams", "collect_grams_to_file", "FORMAT", "VERSION"]
