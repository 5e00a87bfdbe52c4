"""Atomic result files: every file of a run directory is written to a temporary file in the same
directory and renamed into place, so a killed run never leaves a half-written file."""
from __future__ import annotations

import json
import os
import tempfile
from typing import Mapping

import numpy as np


def _atomic(path: str, write, suffix: str = ".tmp") -> None:
    path = os.path.abspath(path)
    d = os.path.dirname(path)
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=suffix, dir=d)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file in the same directory and ``os.replace``."""
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    _atomic(path, write)


def json_default(x):
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, np.bool_):
        return bool(x)
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)


def jsonable(x):
    """``x`` round-tripped through JSON (numpy scalars and arrays converted)."""
    return json.loads(json.dumps(x, default=json_default))


def atomic_write_json(path: str, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, default=json_default) + "\n")


def atomic_savefig(fig, path: str) -> None:
    """``fig.savefig`` (PNG, 110 dpi) written atomically."""
    _atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png"), ".png")


def atomic_write_npz(path: str, arrays: Mapping[str, np.ndarray]) -> None:
    """``np.savez_compressed`` written atomically."""
    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **{k: np.asarray(v) for k, v in arrays.items()})
    _atomic(path, write)


def read_npz(path: str) -> dict[str, np.ndarray] | None:
    """The arrays of an ``.npz`` file, or ``None`` if it is missing or unreadable."""
    try:
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError):
        return None


def figure(size):
    """A matplotlib ``Figure`` on the Agg canvas (no pyplot, no global state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=size)
    FigureCanvasAgg(fig)
    return fig


__all__ = ["atomic_write_text", "atomic_write_json", "atomic_write_npz", "atomic_savefig", "read_npz", "jsonable",
           "json_default", "figure"]
