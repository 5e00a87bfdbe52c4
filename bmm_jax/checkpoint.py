"""Atomic parameter checkpoints with orbax ``StandardCheckpointer``.

Layout of a checkpoint directory ``path``::

    path/
      params/          orbax StandardCheckpointer checkpoint of the params pytree
      metadata.json    {"format": "bmm_jax.checkpoint/1", "checksum": sha256 of the leaves,
                        "leaves": {leaf path: [dtype, shape]}, "metadata": user metadata}

Saving is atomic: the checkpoint is written to a temporary directory next to ``path`` (same
parent, so the same file system), then moved into place with renames. An existing checkpoint at
``path`` is first renamed to a backup and removed only after the new one is in place; a crash at
any point leaves either the old or the new checkpoint readable (a backup left by a crash between
the two renames is restored by the next :func:`load` / :func:`save`).

:func:`load` verifies the content checksum, so a truncated or bit-flipped checkpoint raises a
``ValueError`` naming the path instead of returning wrong weights.
"""
from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import shutil
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


def _backups(path: str) -> list[str]:
    parent, name = os.path.split(path)
    return sorted(glob.glob(os.path.join(parent, f".{name}.old-*")))


def _recover(path: str) -> None:
    """Restore a backup left by a crash between the two renames of :func:`save`."""
    backups = _backups(path)
    if not os.path.exists(path) and backups:
        os.rename(backups[-1], path)
        backups = backups[:-1]
    for b in backups:
        shutil.rmtree(b, ignore_errors=True)


def save(path: str | os.PathLike, params: PyTree, metadata: dict | None = None) -> str:
    """Atomically save ``params`` (a pytree of arrays) to the directory ``path``.

    Args:
      path: checkpoint directory; its parent is created if needed. An existing checkpoint there
        is replaced (atomically: on failure the old one stays).
      params: pytree of numpy / jax arrays (nested dicts as in Flax).
      metadata: optional JSON-serialisable dict stored beside the weights (read it back with
        :func:`load_metadata`).

    Returns:
      The weight checksum (:func:`tree_checksum`) stored in the checkpoint.
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
    params = jax.tree_util.tree_map(lambda x: x if isinstance(x, (np.ndarray, jax.Array)) else np.asarray(x),
                                    params)
    checksum = tree_checksum(params)
    tmp = os.path.join(parent, f".{name}.tmp-{uuid.uuid4().hex[:12]}")
    try:
        os.makedirs(tmp)
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(os.path.join(tmp, _PARAMS), params)
            ckptr.wait_until_finished()
        meta = {"format": FORMAT, "checksum": checksum, "leaves": _leaf_table(params),
                "metadata": metadata}
        with open(os.path.join(tmp, _META), "w") as f:
            json.dump(meta, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        old = None
        if os.path.exists(path):
            old = os.path.join(parent, f".{name}.old-{uuid.uuid4().hex[:12]}")
            os.rename(path, old)
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
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


__all__ = ["save", "load", "load_metadata", "checksum_of", "tree_checksum", "is_valid"]
