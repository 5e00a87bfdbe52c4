"""Atomic parameter checkpoints with orbax ``StandardCheckpointer``.

Layout of a checkpoint directory ``path``::

    path/
      params/          orbax StandardCheckpointer checkpoint of the params pytree
      metadata.json    {"format": "bmm_jax.checkpoint/1", "checksum": sha256 of the leaves,
                        "leaves": {leaf path: [dtype, shape]}, "metadata": user metadata}

Saving is atomic: the checkpoint is written to a temporary directory ``.<name>.tmp-<hex>`` next
to ``path`` (same parent, so the same file system), then moved into place with renames. An
existing checkpoint at ``path`` is first renamed to a backup ``.<name>.old-<hex>`` and removed only
after the new one is in place; a crash at any point leaves either the old or the new checkpoint
readable (a backup left by a crash between the two renames is restored by the next :func:`load` /
:func:`save`). A save holds a lock on its temporary directory; the temporary directories of killed
saves (unlocked, with only checkpoint files inside) are removed by the next save into the same
parent folder.

Saving never destroys what is not a checkpoint: :func:`save` replaces only an empty folder or a
previous bmm_jax checkpoint (``metadata.json`` with this format, next to ``params/`` and nothing
else). A folder of other files or a regular file at ``path`` is refused with a ``ValueError``
naming it, unless ``overwrite=True``. :func:`check_target` runs the same check without writing
(entry points call it before long computations).

:func:`load` verifies the content checksum, so a truncated or bit-flipped checkpoint raises a
``ValueError`` naming the path instead of returning wrong weights.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import uuid
import jax
import numpy as np

from bmm_jax._tree import PyTree, leaves_with_paths

FORMAT = "bmm_jax.checkpoint/1"
_PARAMS = "params"
_META = "metadata.json"

# orbax logs every save/restore at INFO through absl; keep it quiet.
logging.getLogger("absl").setLevel(logging.WARNING)


def tree_checksum(params: PyTree) -> str:
    """sha256 hex digest over every leaf's path, dtype, shape and bytes (tree order).

    Two pytrees have the same checksum iff they have the same leaf paths, dtypes, shapes and
    bitwise-identical values.
    """
    h = hashlib.sha256()
    for path, leaf in leaves_with_paths(params):
        a = np.ascontiguousarray(np.asarray(leaf))
        h.update(path.encode())
        h.update(str(a.dtype).encode())
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _leaf_table(params: PyTree) -> dict[str, list]:
    out = {}
    for p, x in leaves_with_paths(params):
        if not hasattr(x, "dtype"):
            x = np.asarray(x)
        out[p] = [str(np.dtype(x.dtype)), [int(d) for d in x.shape]]
    return out


# temporary and backup names: ".<name>.tmp-<12 hex>" / ".<name>.old-<12 hex>" in the same parent
_TMP_RE = re.compile(r"^\..+\.tmp-[0-9a-f]{12}$")


def _old_re(name: str):
    return re.compile(r"^\." + re.escape(name) + r"\.old-[0-9a-f]{12}$")


def _remove(p: str) -> None:
    """Remove a file, a symlink (not its target) or a directory tree; missing is fine."""
    try:
        st = os.lstat(p)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(p, ignore_errors=True)
    else:
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass


def _backups(path: str) -> list[str]:
    """Backups ``.<name>.old-<hex>`` of ``path``, oldest first."""
    parent, name = os.path.split(path)
    pat = _old_re(name)
    try:
        found = [os.path.join(parent, f) for f in os.listdir(parent) if pat.match(f)]
    except (FileNotFoundError, NotADirectoryError):
        return []

    def mtime(b):
        try:
            return os.lstat(b).st_mtime_ns
        except OSError:
            return 0
    return sorted(found, key=lambda b: (mtime(b), b))


def _recover(path: str) -> None:
    """Restore a backup left by a crash between the two renames of :func:`save`; drop stale ones."""
    backups = _backups(path)
    if not os.path.lexists(path) and backups:
        os.rename(backups[-1], path)
        backups = backups[:-1]
    for b in backups:
        _remove(b)


def _only_checkpoint_files(entries) -> bool:
    """Top-level entries a (possibly unfinished) checkpoint of ours can hold: ``metadata.json`` and
    ``params`` (orbax writes ``params.orbax-checkpoint-tmp-*`` first)."""
    return all(e == _META or e.startswith(_PARAMS) for e in entries)


def _lock_dir(d: str) -> int | None:
    """An fd holding an exclusive ``flock`` on directory ``d``, or None if another process holds it."""
    fd = os.open(d, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            return None
        raise
    return fd


def _make_tmp(parent: str, name: str) -> tuple[str, int]:
    """Create and lock a fresh temporary directory ``.<name>.tmp-<hex>`` in ``parent``."""
    for _ in range(100):
        tmp = os.path.join(parent, f".{name}.tmp-{uuid.uuid4().hex[:12]}")
        os.mkdir(tmp)
        fd = _lock_dir(tmp)
        if fd is not None:
            try:
                if os.path.samestat(os.fstat(fd), os.stat(tmp)):
                    return tmp, fd
            except FileNotFoundError:   # a cleaner took it between mkdir and flock: try another name
                pass
            os.close(fd)
    raise OSError(f"could not create a temporary checkpoint folder in {parent}")


def clean_stale_temps(parent: str | os.PathLike) -> list[str]:
    """Remove the temporary directories that killed saves left in ``parent``; returns them.

    Only directories named ``.<name>.tmp-<12 hex digits>`` that hold nothing but checkpoint files
    (``params*``, ``metadata.json``) and that no live save holds locked are removed.
    """
    parent = os.fspath(parent)
    removed = []
    try:
        names = os.listdir(parent)
    except OSError:
        return removed
    for f in names:
        if not _TMP_RE.match(f):
            continue
        d = os.path.join(parent, f)
        try:
            if not stat.S_ISDIR(os.lstat(d).st_mode) or not _only_checkpoint_files(os.listdir(d)):
                continue
            fd = _lock_dir(d)
        except OSError:
            continue
        if fd is None:                  # a live save is writing it
            continue
        try:
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
        finally:
            os.close(fd)
    return removed


def _describe(entries: list[str]) -> str:
    shown = ", ".join(sorted(entries)[:5])
    return shown + (f", ... ({len(entries)} entries)" if len(entries) > 5 else "")


def is_checkpoint_dir(path: str | os.PathLike) -> bool:
    """True if ``path`` is recognisably a bmm_jax checkpoint: a folder holding ``metadata.json``
    with this module's format and nothing else but ``params/`` (weights are not read)."""
    path = os.fspath(path)
    try:
        entries = os.listdir(path)
    except OSError:
        return False
    return _META in entries and _only_checkpoint_files(entries) and _has_header(path)


def _has_header(path: str) -> bool:
    """True if ``path/metadata.json`` is a header of this format (other files may sit beside it)."""
    try:
        with open(os.path.join(path, _META)) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("format") == FORMAT


def check_target(path: str | os.PathLike, *, overwrite: bool = False, what: str = "checkpoint path",
                 how: str = "pass overwrite=True") -> str:
    """Check that :func:`save` may write to ``path``, without writing anything there.

    Allowed: a missing path, an empty folder, a previous bmm_jax checkpoint
    (:func:`is_checkpoint_dir`) and, with ``overwrite=True``, anything else but the file system
    root. ``what`` / ``how`` word the error (e.g. ``"--out"`` / ``"pass --overwrite"``).

    Returns:
      ``"absent" | "empty" | "checkpoint" | "other"`` (the last only with ``overwrite``).

    Raises:
      ValueError: naming ``path`` and what is there.
    """
    path = os.path.abspath(os.fspath(path))
    parent, name = os.path.split(path)
    if not name:
        raise ValueError(f"{what} {path!r} has no final directory name")
    if not os.path.lexists(path):
        return "absent"
    if os.path.isdir(path):
        try:
            entries = os.listdir(path)
        except OSError as e:
            raise ValueError(f"{what} {path} exists but cannot be listed ({e.strerror})") from None
        if not entries:
            return "empty"
        if is_checkpoint_dir(path):
            return "checkpoint"
        if overwrite:
            return "other"
        if _has_header(path):
            others = [e for e in entries if e != _META and not e.startswith(_PARAMS)]
            why = f"it is a checkpoint with other files beside it ({_describe(others)})"
        else:
            why = f"it is a folder that is not a bmm_jax checkpoint (holds {_describe(entries)})"
        raise ValueError(f"refusing to replace {what} {path}: {why}; choose another path, or {how} to "
                         "replace it")
    if overwrite:
        return "other"
    kind = "a regular file" if os.path.isfile(path) else "not a folder"
    raise ValueError(f"refusing to replace {what} {path}: it is {kind}, not a bmm_jax checkpoint folder; "
                     f"choose another path, or {how} to replace it")


def save(path: str | os.PathLike, params: PyTree, metadata: dict | None = None, *,
         overwrite: bool = False) -> str:
    """Atomically save ``params`` (a pytree of arrays) to the directory ``path``.

    Args:
      path: checkpoint directory; its parent is created if needed. An empty folder or a previous
        checkpoint there is replaced (atomically: on failure the old one stays).
      params: pytree of numpy / jax arrays (nested dicts as in Flax).
      metadata: optional JSON-serialisable dict stored beside the weights (read it back with
        :func:`load_metadata`).
      overwrite: also replace a folder that is not a bmm_jax checkpoint, or a file (default: refuse
        with a ``ValueError``, so that a mistyped path never deletes a user's files).

    Returns:
      The weight checksum (:func:`tree_checksum`) stored in the checkpoint.

    Raises:
      ValueError: an empty params tree, or ``path`` holds something else than a checkpoint (see
        :func:`check_target`).
      TypeError: metadata that is not JSON-serialisable.
    """
    import orbax.checkpoint as ocp

    path = os.path.abspath(os.fspath(path))
    parent, name = os.path.split(path)
    if not name:
        raise ValueError(f"checkpoint path {path!r} has no final directory name")
    if not leaves_with_paths(params):
        raise ValueError(f"refusing to save an empty params tree to {path}")
    if metadata is not None:
        try:
            json.dumps(metadata)
        except TypeError as e:
            raise TypeError(f"checkpoint metadata for {path} is not JSON-serialisable: {e}") from None
    os.makedirs(parent, exist_ok=True)
    _recover(path)
    check_target(path, overwrite=overwrite)
    clean_stale_temps(parent)
    params = jax.tree_util.tree_map(lambda x: x if isinstance(x, (np.ndarray, jax.Array)) else np.asarray(x),
                                    params)
    checksum = tree_checksum(params)
    tmp, lock = _make_tmp(parent, name)
    old = None
    try:
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(os.path.join(tmp, _PARAMS), params)
            ckptr.wait_until_finished()
        meta = {"format": FORMAT, "checksum": checksum, "leaves": _leaf_table(params),
                "metadata": metadata}
        with open(os.path.join(tmp, _META), "w") as f:
            json.dump(meta, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        if os.path.lexists(path):
            old = os.path.join(parent, f".{name}.old-{uuid.uuid4().hex[:12]}")
            os.rename(path, old)
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not os.path.lexists(path):
            try:
                os.rename(old, path)        # put the previous checkpoint back at once
            except OSError:
                pass                        # _recover() restores it on the next load / save
        raise
    finally:
        os.close(lock)
    if old is not None:
        _remove(old)
    return checksum


def _read_meta(path: str) -> dict:
    meta_file = os.path.join(path, _META)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    if not os.path.isfile(meta_file) or not os.path.isdir(os.path.join(path, _PARAMS)):
        raise ValueError(f"corrupt checkpoint at {path}: missing {_META} or {_PARAMS}/ "
                         "(an interrupted or foreign write?)")
    try:
        with open(meta_file) as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"corrupt checkpoint at {path}: unreadable {_META} ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or "checksum" not in meta:
        raise ValueError(f"corrupt checkpoint at {path}: {_META} is not a {FORMAT} header")
    return meta


def load_metadata(path: str | os.PathLike) -> dict | None:
    """The user ``metadata`` dict saved with the checkpoint at ``path`` (``None`` if none)."""
    path = os.path.abspath(os.fspath(path))
    _recover(path)
    return _read_meta(path)["metadata"]


def checksum_of(path: str | os.PathLike) -> str:
    """The weight checksum recorded in the checkpoint header (not re-verified)."""
    path = os.path.abspath(os.fspath(path))
    _recover(path)
    return _read_meta(path)["checksum"]


def load(path: str | os.PathLike, like: PyTree | None = None, *, verify: bool = True) -> PyTree:
    """Load the params pytree saved at ``path``.

    Args:
      path: checkpoint directory written by :func:`save`.
      like: optional pytree of arrays (or ``jax.ShapeDtypeStruct``) the checkpoint must match:
        same leaf paths, shapes and dtypes. Restored leaves follow ``like``'s container types.
      verify: recompute the content checksum and compare with the header.

    Returns:
      The params pytree (leaves are numpy arrays).

    Raises:
      FileNotFoundError: no checkpoint at ``path``.
      ValueError: a corrupt checkpoint (unreadable, checksum mismatch) or one whose tree does not
        match ``like``; the message names the path (and the first mismatching leaves).
    """
    import orbax.checkpoint as ocp

    path = os.path.abspath(os.fspath(path))
    _recover(path)
    meta = _read_meta(path)
    table = meta.get("leaves", {})
    if like is not None:
        want = _leaf_table(like)
        missing = sorted(set(table) - set(want))
        extra = sorted(set(want) - set(table))
        if missing or extra:
            raise ValueError(
                f"checkpoint at {path} does not match the expected tree: leaves only in the "
                f"checkpoint {missing[:5]}{' ...' if len(missing) > 5 else ''}, leaves only in "
                f"`like` {extra[:5]}{' ...' if len(extra) > 5 else ''}")
        for p, (dt, shape) in want.items():
            if table[p] != [dt, shape]:
                raise ValueError(f"checkpoint at {path}: leaf '{p}' is {table[p][0]}{tuple(table[p][1])}"
                                 f", expected {dt}{tuple(shape)}")
    try:
        with ocp.StandardCheckpointer() as ckptr:
            if like is None:
                restored = ckptr.restore(os.path.join(path, _PARAMS))
            else:
                target = jax.tree_util.tree_map(
                    lambda x: jax.ShapeDtypeStruct(tuple(x.shape), x.dtype), like)
                restored = ckptr.restore(os.path.join(path, _PARAMS), target)
    except FileNotFoundError as e:
        raise ValueError(f"corrupt checkpoint at {path}: {e}") from None
    except Exception as e:  # orbax / tensorstore raise many types for damaged files
        raise ValueError(f"corrupt checkpoint at {path}: orbax could not restore it "
                         f"({type(e).__name__}: {str(e)[:300]})") from None
    restored = jax.tree_util.tree_map(np.asarray, restored)
    if verify:
        got = tree_checksum(restored)
        if got != meta["checksum"]:
            raise ValueError(f"corrupt checkpoint at {path}: weight checksum {got[:16]}... does not "
                             f"match the recorded {meta['checksum'][:16]}...")
    return restored


def is_valid(path: str | os.PathLike, like: PyTree | None = None) -> bool:
    """True if :func:`load` would succeed (full read + checksum)."""
    try:
        load(path, like)
        return True
    except (FileNotFoundError, ValueError):
        return False


__all__ = ["save", "load", "load_metadata", "checksum_of", "tree_checksum", "is_valid", "check_target",
           "is_checkpoint_dir", "clean_stale_temps"]
