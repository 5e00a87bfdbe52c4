"""Sharded safetensors output, written tensor by tensor, into a folder that appears atomically.

* :func:`plan_shards` lays the output tensors (names, dtypes, shapes: all known before the merge
  starts) into shards of at most ``max_shard_size`` bytes, in order.
* :class:`ShardWriter` writes one shard's header first (every offset is known), sizes the file,
  then stores each tensor at its offset as soon as it is produced (``os.pwrite``): memory follows
  one tensor, never the shard. Files follow the HF layout: one ``model.safetensors`` if everything
  fits in one shard, else ``model-00001-of-0000n.safetensors`` + ``model.safetensors.index.json``,
  with ``metadata={"format": "pt"}`` (PyTorch naming).
* :class:`OutputFolder` writes into a hidden temporary sibling ``.<name>.bmm-tmp-<id>`` of the
  target (same file system) and renames it into place at the end: a killed merge leaves no
  ``out`` folder, only a hidden temporary one that the next run removes (its marker records the
  host and process that owned it). An existing ``out`` is replaced only if it is an output of
  bmm_jax (it holds :data:`REPORT_NAME` or a bmm_jax orbax checkpoint) or ``overwrite=True``; any
  other non-empty folder is refused, and a replaced folder is removed only after the new one is in
  place.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import struct
import time
import uuid
from typing import Iterable, Sequence

import numpy as np

from bmm_jax.streaming.reader import INDEX_NAME, SINGLE_NAME, dtype_name

REPORT_NAME = "bmm_jax_merge.json"
PARTIAL_MARKER = ".bmm_jax_partial.json"
COPY_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt",
              "added_tokens.json", "spiece.model", "chat_template.jinja", "chat_template.json")
_MAX_WRITE = 1 << 30


def parse_size(size) -> int:
    """``"5GB"`` (10^9), ``"2GiB"`` (2^30), ``"500MB"``, or an int -> bytes."""
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        n = int(size)
    else:
        m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?i?B)?\s*", str(size), re.I)
        if not m:
            raise ValueError(f"max_shard_size must be bytes or like '5GB' / '2GiB', got {size!r}")
        unit = (m.group(2) or "B").upper()
        mult = {"B": 1, "KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "TB": 10 ** 12, "KIB": 2 ** 10,
                "MIB": 2 ** 20, "GIB": 2 ** 30, "TIB": 2 ** 40}[unit]
        n = int(float(m.group(1)) * mult)
    if n <= 0:
        raise ValueError(f"max_shard_size must be positive, got {size!r}")
    return n


class Entry(tuple):
    """``(name, dtype, shape)`` of one output tensor."""
    __slots__ = ()

    def __new__(cls, name: str, dtype, shape: Sequence[int]):
        return super().__new__(cls, (name, np.dtype(dtype), tuple(int(d) for d in shape)))

    name = property(lambda self: self[0])
    dtype = property(lambda self: self[1])
    shape = property(lambda self: self[2])

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


def plan_shards(entries: Iterable[Entry], max_shard_size) -> list[list[Entry]]:
    """Split ``entries`` (in order) into consecutive shards of at most ``max_shard_size`` bytes (a
    tensor larger than that gets a shard of its own)."""
    cap = parse_size(max_shard_size)
    shards: list[list[Entry]] = [[]]
    size = 0
    for e in entries:
        if shards[-1] and size + e.nbytes > cap:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += e.nbytes
    return [s for s in shards if s]


def shard_names(n: int) -> list[str]:
    """HF shard file names for ``n`` shards (``model.safetensors`` when ``n == 1``)."""
    if n == 1:
        return [SINGLE_NAME]
    return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def _header_bytes(entries: Sequence[Entry], metadata: dict | None) -> tuple[bytes, dict[str, int]]:
    header, offsets, pos = {}, {}, 0
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    for e in entries:
        header[e.name] = {"dtype": dtype_name(e.dtype), "shape": list(e.shape), "data_offsets": [pos, pos + e.nbytes]}
        offsets[e.name] = pos
        pos += e.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)           # 8-byte aligned data section
    return raw, offsets


class ShardWriter:
    """One safetensors file whose tensors are written in any order as they are produced.

    Args:
      path: the file to create (must not exist).
      entries: every tensor of the shard, in storage order.
      metadata: the ``__metadata__`` dict (string values), e.g. ``{"format": "pt"}``.
    """

    def __init__(self, path: str, entries: Sequence[Entry], metadata: dict | None = None):
        self.path = path
        self.entries = {e.name: e for e in entries}
        header, offsets = _header_bytes(entries, metadata)
        self._base = 8 + len(header)
        self._offsets = offsets
        self._pending = set(self.entries)
        self._written: dict[str, int] = {}
        self.size = self._base + sum(e.nbytes for e in entries)
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.pwrite(self._fd, struct.pack("<Q", len(header)) + header, 0)
        os.ftruncate(self._fd, self.size)

    def write(self, name: str, array) -> None:
        """Store tensor ``name`` (its dtype and shape must be the planned ones)."""
        e = self.entries.get(name)
        if e is None:
            raise KeyError(f"tensor {name!r} is not planned in shard {os.path.basename(self.path)}")
        if name not in self._pending:
            raise ValueError(f"tensor {name!r} was already written to {os.path.basename(self.path)}")
        a = np.ascontiguousarray(np.asarray(array))
        if a.dtype != e.dtype or a.shape != e.shape:
            raise ValueError(f"tensor {name!r}: got {a.dtype}{list(a.shape)}, planned {e.dtype}{list(e.shape)}")
        buf = memoryview(a.reshape(-1).view(np.uint8))
        pos = self._base + self._offsets[name]
        done = 0
        while done < len(buf):
            done += os.pwrite(self._fd, buf[done:done + _MAX_WRITE], pos + done)
        self._pending.discard(name)

    def write_rows(self, name: str, start_row: int, array) -> None:
        """Store rows ``[start_row, start_row + len(array))`` of tensor ``name`` (axis 0); the
        tensor counts as written once all its bytes are."""
        e = self.entries.get(name)
        if e is None:
            raise KeyError(f"tensor {name!r} is not planned in shard {os.path.basename(self.path)}")
        a = np.ascontiguousarray(np.asarray(array))
        if a.dtype != e.dtype or a.shape[1:] != e.shape[1:] or start_row < 0 or start_row + a.shape[0] > e.shape[0]:
            raise ValueError(f"tensor {name!r}: rows {start_row}..{start_row + a.shape[0]} of {a.dtype}"
                             f"{list(a.shape)} do not fit the planned {e.dtype}{list(e.shape)}")
        row = a[0].nbytes if a.shape[0] else 0
        buf = memoryview(a.reshape(-1).view(np.uint8))
        pos = self._base + self._offsets[name] + start_row * row
        done = 0
        while done < len(buf):
            done += os.pwrite(self._fd, buf[done:done + _MAX_WRITE], pos + done)
        self._written[name] = self._written.get(name, 0) + len(buf)
        if self._written[name] >= e.nbytes:
            self._pending.discard(name)

    @property
    def missing(self) -> list[str]:
        return sorted(self._pending)

    def close(self, sync: bool = True) -> None:
        """Finish the file; raises ``ValueError`` if a planned tensor was never written."""
        if self._fd is None:
            return
        try:
            if self._pending:
                raise ValueError(f"shard {os.path.basename(self.path)}: tensors never written: {self.missing[:5]}")
            if sync:
                os.fsync(self._fd)
        finally:
            os.close(self._fd)
            self._fd = None

    def abort(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def write_index(folder: str, weight_map: dict[str, str], total_size: int) -> str:
    """``model.safetensors.index.json`` (HF layout) in ``folder``."""
    path = os.path.join(folder, INDEX_NAME)
    atomic_write_json(path, {"metadata": {"total_size": int(total_size)}, "weight_map": weight_map})
    return path


def atomic_write_json(path: str, obj) -> None:
    """Write JSON to ``path`` through a temporary file and a rename (never a half-written file)."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = os.path.join(d, f".{os.path.basename(path)}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=_json_default)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _json_default(x):
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)


def copy_side_files(src_folder: str, dst_folder: str, *, config: dict | None = None,
                    names: Sequence[str] = COPY_FILES) -> list[str]:
    """Copy config / generation config / tokenizer files that exist in ``src_folder``; ``config``
    (a dict) replaces ``config.json``'s content. Returns the names written."""
    written = []
    for n in names:
        dst = os.path.join(dst_folder, n)
        if n == "config.json" and config is not None:
            atomic_write_json(dst, config)
            written.append(n)
            continue
        src = os.path.join(src_folder, n)
        if os.path.isfile(src):
            shutil.copyfile(src, dst)
            written.append(n)
    return written


# ============================================================================ the output folder
def is_bmm_output(path: str) -> bool:
    """True if the folder ``path`` was written by bmm_jax (a streamed merge or an orbax checkpoint)."""
    if os.path.isfile(os.path.join(path, REPORT_NAME)):
        return True
    meta = os.path.join(path, "metadata.json")
    if os.path.isfile(meta) and os.path.isdir(os.path.join(path, "params")):
        try:
            with open(meta) as f:
                return str(json.load(f).get("format", "")).startswith("bmm_jax.")
        except (OSError, ValueError, AttributeError):
            return False
    return False


def check_output_path(out: str, *, overwrite: bool = False, inputs: Sequence[str] = ()) -> str:
    """Validate the target folder of a merge and return its absolute path.

    Raises:
      ValueError: ``out`` is one of the ``inputs`` (or inside one / holds one), is a file, or is a
        non-empty folder not written by bmm_jax (pass ``overwrite=True`` to replace it).
    """
    out = os.path.abspath(os.fspath(out))
    if not os.path.basename(out):
        raise ValueError(f"output path {out!r} has no final folder name")
    for src in inputs:
        s = os.path.abspath(os.fspath(src))
        if s == out or s.startswith(out + os.sep) or out.startswith(s + os.sep):
            raise ValueError(f"output {out} overlaps the input {s}; choose another folder")
    if os.path.isfile(out):
        raise ValueError(f"output {out} is a file; give a folder path")
    if os.path.isdir(out) and os.listdir(out) and not is_bmm_output(out) and not overwrite:
        raise ValueError(f"output folder {out} is not empty and was not written by bmm_jax; refusing to "
                         "replace it (choose another folder or pass overwrite=True / --overwrite)")
    return out


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_temporaries(out: str) -> list[str]:
    """Remove temporary folders of ``out`` left by killed merges on this host (their marker names
    this host and a process that no longer runs), and finish a commit that was interrupted between
    its two renames (the previous output is put back if ``out`` is missing). Returns the removed
    paths."""
    parent, name = os.path.split(os.path.abspath(out))
    removed = []
    if not os.path.isdir(parent):
        return removed
    host = socket.gethostname()
    out = os.path.join(parent, name)
    for fn in sorted(os.listdir(parent)):
        p = os.path.join(parent, fn)
        if fn.startswith(f".{name}.bmm-old-"):       # a crash between the two renames of a commit
            if not os.path.exists(out):
                os.rename(p, out)                    # the previous output comes back
            else:
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
            continue
        if not fn.startswith(f".{name}.bmm-tmp-"):
            continue
        marker = os.path.join(p, PARTIAL_MARKER)
        try:
            with open(marker) as f:
                m = json.load(f)
        except (OSError, ValueError):
            continue                          # not ours (or being created right now): leave it
        if m.get("host") == host and not _pid_alive(int(m.get("pid", -1))):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


class OutputFolder:
    """A temporary sibling of ``out`` that becomes ``out`` on :meth:`commit`.

    Args:
      out: target folder (validated with :func:`check_output_path` by the caller).
      run_id: suffix of the temporary folder (the same on every process of a multi-process merge).
      create: create the folder (``False`` on processes that only write into it).
    """

    def __init__(self, out: str, run_id: str | None = None, *, create: bool = True):
        self.out = os.path.abspath(out)
        parent, name = os.path.split(self.out)
        self.run_id = run_id or uuid.uuid4().hex[:12]
        self.tmp = os.path.join(parent, f".{name}.bmm-tmp-{self.run_id}")
        if create:
            os.makedirs(parent, exist_ok=True)
            clean_stale_temporaries(self.out)
            os.makedirs(self.tmp)
            atomic_write_json(os.path.join(self.tmp, PARTIAL_MARKER),
                              {"pid": os.getpid(), "host": socket.gethostname(), "created": time.time()})

    def path(self, name: str) -> str:
        return os.path.join(self.tmp, name)

    def commit(self) -> str:
        """Move the finished folder to ``out`` (an existing bmm_jax output there is replaced)."""
        parent, name = os.path.split(self.out)
        old = None
        if os.path.exists(self.out):
            old = os.path.join(parent, f".{name}.bmm-old-{self.run_id}")
            os.rename(self.out, old)
        os.rename(self.tmp, self.out)
        try:
            os.remove(os.path.join(self.out, PARTIAL_MARKER))
        except FileNotFoundError:
            pass
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.out

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


__all__ = ["Entry", "plan_shards", "shard_names", "ShardWriter", "write_index", "copy_side_files",
           "OutputFolder", "check_output_path", "clean_stale_temporaries", "is_bmm_output", "parse_size",
           "atomic_write_json", "REPORT_NAME"]
