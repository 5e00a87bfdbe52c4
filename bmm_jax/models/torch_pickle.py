"""Read PyTorch checkpoints (``torch.save`` files) into numpy without importing torch.

Two on-disk formats are supported:

* **legacy** (``torch.save(..., _use_new_zipfile_serialization=False)``, the default before
  torch 1.6): five pickles in a row, then raw storage bytes::

      pickle(MAGIC_NUMBER)          # int 0x1950a86a20f9469cfc6c
      pickle(PROTOCOL_VERSION)      # int 1001
      pickle(sys_info)              # {'protocol_version', 'little_endian', 'type_sizes'}
      pickle(obj)                   # the checkpoint; storages are persistent ids
      pickle(storage_keys)          # list[str]: order of the raw storages that follow
      for key in storage_keys:      # each: int64 element count, then count * itemsize bytes
          <int64 numel><raw bytes>

  A storage's persistent id is ``('storage', <torch.XStorage>, root_key, location, numel,
  view_metadata)``; ``view_metadata`` is ``None`` or ``(view_key, offset, view_numel)`` (a view
  into the root storage, offsets in elements).

* **zip** (torch >= 1.6 default): a zip archive ``<name>/data.pkl`` + ``<name>/data/<key>``
  (raw bytes of each storage) + optional ``<name>/byteorder``; persistent ids are
  ``('storage', <torch.XStorage>, key, location, numel)``.

Tensors are pickled as ``torch._utils._rebuild_tensor_v2(storage, storage_offset, size, stride,
requires_grad, backward_hooks[, metadata])``; they become C-contiguous numpy arrays (strides are
honoured, so non-contiguous tensors — e.g. weights converted from TensorFlow layouts — come out
with the right values). Only a small allow-list of globals is resolved (``collections.OrderedDict``,
the torch tensor/parameter rebuild functions, ``torch.*Storage``, ``torch.Size``); anything else
raises ``pickle.UnpicklingError`` naming the global, so no arbitrary code runs while loading.
"""
from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import zipfile
from typing import Any, Mapping

import numpy as np

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001


def _bfloat16():
    import ml_dtypes  # a jax dependency
    return np.dtype(ml_dtypes.bfloat16)


# torch storage class name -> numpy dtype (little-endian; byte-swapped for big-endian files)
_STORAGE_DTYPES = {
    "DoubleStorage": np.dtype("<f8"),
    "FloatStorage": np.dtype("<f4"),
    "HalfStorage": np.dtype("<f2"),
    "BFloat16Storage": None,  # resolved lazily through ml_dtypes
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
    "ComplexFloatStorage": np.dtype("<c8"),
    "ComplexDoubleStorage": np.dtype("<c16"),
    "UntypedStorage": np.dtype("u1"),
}


class _StorageType:
    """Stand-in for a ``torch.XStorage`` class: only its dtype matters."""

    def __init__(self, name: str):
        self.name = name
        dt = _STORAGE_DTYPES[name]
        self.dtype = _bfloat16() if dt is None else dt


class _StorageRef:
    """A storage seen in the pickle; its data arrives later (legacy) or on demand (zip)."""

    def __init__(self, key: str, dtype: np.dtype, numel: int, offset: int = 0):
        self.key, self.dtype, self.numel, self.offset = key, dtype, int(numel), int(offset)


class _TensorRef:
    """A tensor seen in the pickle, materialised once its storage's bytes are known."""

    def __init__(self, storage: _StorageRef, offset: int, size, stride):
        if not isinstance(storage, _StorageRef):
            raise pickle.UnpicklingError(
                f"tensor rebuilt from {type(storage).__name__}, expected a storage persistent id")
        self.storage = storage
        self.offset = int(offset)
        self.size = tuple(int(s) for s in size)
        self.stride = tuple(int(s) for s in stride)


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
    return _TensorRef(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *unused):
    return data


_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch.nn.parameter", "Parameter"): _rebuild_parameter,
    ("torch", "Size"): tuple,
    ("_codecs", "encode"): lambda s, enc="latin1": s.encode(enc),  # protocol-2 bytes
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("__builtin__", "set"): set,
}


class _Unpickler(pickle.Unpickler):
    """Allow-list unpickler; ``persistent_load`` turns storage ids into :class:`_StorageRef`."""

    def __init__(self, file, path: str, *, legacy: bool):
        super().__init__(file, encoding="utf-8")
        self._path = path
        self._legacy = legacy
        self.storages: dict[str, _StorageRef] = {}  # root key -> root storage

    def find_class(self, module, name):
        if (module, name) in _ALLOWED_GLOBALS:
            return _ALLOWED_GLOBALS[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise pickle.UnpicklingError(
            f"{self._path}: the checkpoint references the global '{module}.{name}', which this "
            "torch-free reader does not support (only tensors, storages, OrderedDict and plain "
            "Python containers are read)")

    def persistent_load(self, pid):
        if not isinstance(pid, tuple) or not pid or pid[0] != "storage":
            kind = pid[0] if isinstance(pid, tuple) and pid else pid
            raise pickle.UnpicklingError(
                f"{self._path}: unsupported persistent id {kind!r} (pickled modules or other "
                "non-storage objects are not supported; save a state_dict instead)")
        if self._legacy:
            if len(pid) != 6:
                raise pickle.UnpicklingError(f"{self._path}: malformed legacy storage id {pid!r}")
            _, stype, root_key, _location, numel, view_meta = pid
        else:
            if len(pid) != 5:
                raise pickle.UnpicklingError(f"{self._path}: malformed zip storage id {pid!r}")
            _, stype, root_key, _location, numel = pid
            view_meta = None
        if not isinstance(stype, _StorageType):
            raise pickle.UnpicklingError(f"{self._path}: storage type {stype!r} is not a torch storage")
        root_key = str(root_key)
        root = self.storages.get(root_key)
        if root is None:
            root = self.storages[root_key] = _StorageRef(root_key, stype.dtype, numel)
        if view_meta is None:
            return root
        _view_key, offset, view_numel = view_meta
        return _StorageRef(root_key, stype.dtype, view_numel, offset=offset)


def _materialise(obj, arrays: Mapping[str, np.ndarray], path: str):
    """Replace every :class:`_TensorRef` in ``obj`` by a C-contiguous numpy array."""
    if isinstance(obj, _TensorRef):
        st = obj.storage
        data = arrays[st.key]
        base = st.offset + obj.offset
        if len(obj.size) != len(obj.stride):
            raise ValueError(f"{path}: tensor with size {obj.size} but stride {obj.stride}")
        if any(s < 0 for s in obj.size) or any(s < 0 for s in obj.stride):
            raise ValueError(f"{path}: negative size/stride {obj.size}/{obj.stride}")
        if 0 in obj.size:
            return np.zeros(obj.size, dtype=data.dtype)
        last = base + sum((n - 1) * s for n, s in zip(obj.size, obj.stride))
        if base < 0 or last >= data.shape[0]:
            raise ValueError(
                f"{path}: tensor of size {obj.size}, stride {obj.stride}, offset {base} reads "
                f"element {last} of storage '{st.key}' which holds only {data.shape[0]} elements "
                "(corrupt or truncated checkpoint)")
        view = np.lib.stride_tricks.as_strided(
            data[base:], shape=obj.size, strides=tuple(s * data.itemsize for s in obj.stride),
            writeable=False)
        return np.array(view, order="C")  # a copy: never aliases the raw file buffer
    if isinstance(obj, dict):
        out = type(obj)() if isinstance(obj, collections.OrderedDict) else {}
        for k, v in obj.items():
            out[k] = _materialise(v, arrays, path)
        return out
    if isinstance(obj, list):
        return [_materialise(v, arrays, path) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_materialise(v, arrays, path) for v in obj)
    return obj


def _check_file(path) -> str:
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"torch checkpoint not found: {path}")
    if not os.path.isfile(path):
        raise ValueError(f"torch checkpoint path is not a regular file: {path}")
    return path


def _load_legacy_object(path: str):
    with open(path, "rb") as f:
        try:
            magic = pickle.load(f)
        except Exception as e:  # noqa: BLE001 - anything here means "not this format"
            raise ValueError(f"{path}: not a legacy torch checkpoint (cannot read the magic "
                             f"number: {type(e).__name__}: {e})") from None
        if magic != MAGIC_NUMBER:
            raise ValueError(f"{path}: not a legacy torch checkpoint (magic number {magic!r}, "
                             f"expected {MAGIC_NUMBER:#x})")
        try:
            protocol = pickle.load(f)
            sys_info = pickle.load(f)
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"{path}: corrupt legacy torch checkpoint header: "
                             f"{type(e).__name__}: {e}") from None
        if protocol != PROTOCOL_VERSION:
            raise ValueError(f"{path}: unsupported legacy protocol version {protocol!r} "
                             f"(expected {PROTOCOL_VERSION})")
        if not isinstance(sys_info, dict):
            raise ValueError(f"{path}: corrupt legacy header, sys_info is {type(sys_info).__name__}")
        little = bool(sys_info.get("little_endian", True))
        unpickler = _Unpickler(f, path, legacy=True)
        try:
            obj = unpickler.load()
            keys = pickle.load(f)
        except pickle.UnpicklingError:
            raise
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"{path}: corrupt legacy torch checkpoint (unpickling failed: "
                             f"{type(e).__name__}: {e})") from None
        if not isinstance(keys, list) or set(map(str, keys)) != set(unpickler.storages):
            raise ValueError(f"{path}: corrupt legacy torch checkpoint (the storage key list does "
                             "not match the storages referenced by the pickle)")
        arrays = {}
        for key in map(str, keys):
            st = unpickler.storages[key]
            head = f.read(8)
            if len(head) != 8:
                raise ValueError(f"{path}: truncated legacy torch checkpoint (missing the size of "
                                 f"storage '{key}')")
            (numel,) = struct.unpack("<q" if little else ">q", head)
            if numel != st.numel:
                raise ValueError(f"{path}: corrupt legacy torch checkpoint (storage '{key}' has "
                                 f"{numel} elements on disk, the pickle says {st.numel})")
            dtype = st.dtype if little else st.dtype.newbyteorder(">")
            nbytes = numel * dtype.itemsize
            raw = f.read(nbytes)
            if len(raw) != nbytes:
                raise ValueError(f"{path}: truncated legacy torch checkpoint (storage '{key}' needs "
                                 f"{nbytes} bytes, {len(raw)} left)")
            arr = np.frombuffer(raw, dtype=dtype)
            arrays[key] = arr if little else arr.astype(st.dtype)
    return _materialise(obj, arrays, path)


def _load_zip_object(path: str):
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        pkl = [n for n in names if n == "data.pkl" or n.endswith("/data.pkl")]
        if len(pkl) != 1:
            raise ValueError(f"{path}: zip file is not a torch checkpoint (expected exactly one "
                             f"'*/data.pkl', found {len(pkl)})")
        prefix = pkl[0][: -len("data.pkl")]
        little = True
        if prefix + "byteorder" in names:
            little = zf.read(prefix + "byteorder").decode().strip() != "big"
        unpickler = _Unpickler(io.BytesIO(zf.read(pkl[0])), path, legacy=False)
        try:
            obj = unpickler.load()
        except pickle.UnpicklingError:
            raise
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"{path}: corrupt torch zip checkpoint (unpickling failed: "
                             f"{type(e).__name__}: {e})") from None
        arrays = {}
        for key, st in unpickler.storages.items():
            name = f"{prefix}data/{key}"
            if name not in names:
                raise ValueError(f"{path}: corrupt torch zip checkpoint (missing record '{name}')")
            raw = zf.read(name)
            dtype = st.dtype if little else st.dtype.newbyteorder(">")
            if len(raw) < st.numel * dtype.itemsize:
                raise ValueError(f"{path}: record '{name}' has {len(raw)} bytes, storage needs "
                                 f"{st.numel * dtype.itemsize}")
            arr = np.frombuffer(raw[: st.numel * dtype.itemsize], dtype=dtype)
            arrays[key] = arr if little else arr.astype(st.dtype)
    return _materialise(obj, arrays, path)


def load_object(path) -> Any:
    """Load any ``torch.save`` file (legacy or zip format) with tensors as numpy arrays.

    Returns the pickled object (dicts, lists, tuples, numbers, strings) with every tensor or
    parameter replaced by a C-contiguous ``np.ndarray`` of the tensor's dtype and shape.

    Raises:
      FileNotFoundError: ``path`` does not exist.
      ValueError: not a torch checkpoint, truncated or otherwise corrupt (the message says which).
      pickle.UnpicklingError: the checkpoint needs a Python global outside the allow-list
        (pickled ``nn.Module`` objects, custom classes).
    """
    path = _check_file(path)
    if zipfile.is_zipfile(path):
        return _load_zip_object(path)
    return _load_legacy_object(path)


def _flatten_tensors(obj, prefix: str, out: dict):
    if isinstance(obj, np.ndarray):
        out[prefix] = obj
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            _flatten_tensors(v, f"{prefix}.{k}" if prefix else str(k), out)


def _as_state_dict(obj, path: str) -> dict[str, np.ndarray]:
    if not isinstance(obj, Mapping):
        raise TypeError(f"{path}: the checkpoint holds a {type(obj).__name__}, expected a "
                        "state_dict (a mapping of names to tensors)")
    out: dict[str, np.ndarray] = {}
    _flatten_tensors(obj, "", out)
    if not out:
        raise ValueError(f"{path}: the checkpoint holds no tensor")
    return out


def load_legacy(path) -> dict[str, np.ndarray]:
    """Read a legacy-format (pre-zip) ``torch.save`` state_dict into ``{name: np.ndarray}``.

    Nested mappings are flattened with ``.`` (``{'a': {'w': t}}`` -> ``'a.w'``); non-tensor values
    (e.g. an epoch counter next to the weights) are dropped. Tensors keep their torch dtype
    (``float32`` weights, ``int64`` ``num_batches_tracked`` scalars) and shape (PyTorch layout,
    e.g. conv kernels ``[out, in, kh, kw]``).

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` for a file that is not a
    legacy torch checkpoint or is truncated/corrupt.
    """
    path = _check_file(path)
    if zipfile.is_zipfile(path):
        raise ValueError(f"{path}: this is a zip-format torch checkpoint; use load_state_dict()")
    return _as_state_dict(_load_legacy_object(path), path)


def load_state_dict(path) -> dict[str, np.ndarray]:
    """Like :func:`load_legacy` but accepts both the legacy and the zip format."""
    path = _check_file(path)
    return _as_state_dict(load_object(path), path)
