"""Host-memory hygiene for large merges: return freed buffers to the OS, read the process peak.

jax's CPU buffers come from glibc ``malloc``. Its default *dynamic* mmap threshold rises to the
size of the last large buffer freed, after which buffers of that size come from the heap, where a
freed one stays resident (fragmentation) instead of going back to the OS. A merge frees and
allocates hundreds of module-sized buffers (task kernels, statistics, anchor and merged leaves):
on ViT-B/32 shapes with K = 8 (``experiments/bench_merge.py``) the full merge's peak RSS carried
~0.5 GiB of such freed-but-resident memory.

Two remedies, both glibc-only (no-ops returning ``False`` elsewhere):

* :func:`trim` (``malloc_trim(0)``) hands the heap's free pages back now. Inside
  :func:`trimming` (opt-in, scoped), :func:`bmm_jax.merge` and :func:`bmm_jax.prepare` call it
  after every chunk of modules (ViT-B/32, K = 8: merge peak 4.46 -> 3.98 GiB for ~3 s of
  re-faulted pages). Outside it they never touch the allocator.
* :func:`release_freed_memory` (opt-in, process-wide) fixes the mmap threshold, so every buffer of
  at least ``threshold_bytes`` is its own mapping, unmapped when jax frees it: the lowest peak
  (3.94 GiB there) at the price of a page fault per fresh page (~+15 % merge time).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import resource
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
DEFAULT_THRESHOLD = 1 << 20            # 1 MiB: a 256 x 1024 float32 block


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return lib if hasattr(lib, "mallopt") else None
    except OSError:                                      # pragma: no cover - musl / odd systems
        return None


def release_freed_memory(threshold_bytes: int = DEFAULT_THRESHOLD) -> bool:
    """Make glibc return freed buffers of ``>= threshold_bytes`` to the OS (see the module doc).

    Affects allocations made after the call. Returns ``True`` if both settings were applied.

    Raises:
      ValueError: ``threshold_bytes`` not a positive int of at most 32 MiB (glibc's maximum
        mmap threshold on 64-bit).
    """
    if not isinstance(threshold_bytes, int) or isinstance(threshold_bytes, bool):
        raise ValueError(f"threshold_bytes must be an int, got {threshold_bytes!r}")
    if not 0 < threshold_bytes <= 32 << 20:
        raise ValueError(f"threshold_bytes must be in (0, 32 MiB], got {threshold_bytes}")
    lib = _libc()
    if lib is None:
        return False
    ok = lib.mallopt(M_MMAP_THRESHOLD, threshold_bytes) == 1
    ok = (lib.mallopt(M_TRIM_THRESHOLD, threshold_bytes) == 1) and ok
    trim()
    return ok


def trim() -> bool:
    """``malloc_trim(0)``: hand the heap's free pages back to the OS now (glibc; else ``False``)."""
    lib = _libc()
    if lib is None or not hasattr(lib, "malloc_trim"):
        return False
    return bool(lib.malloc_trim(0))


def peak_rss_bytes() -> int:
    """The process's peak resident set size in bytes: ``VmHWM`` of ``/proc/self/status`` (since the
    start or the last :func:`reset_peak_rss`), else ``getrusage`` ``ru_maxrss`` (never reset)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):            # pragma: no cover
        pass
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # pragma: no cover
    return int(r) if sys.platform == "darwin" else int(r) * 1024  # pragma: no cover


def reset_peak_rss() -> bool:
    """Reset the peak RSS (``VmHWM``) to the current RSS (Linux: ``5`` into ``/proc/self/clear_refs``),
    so that :func:`peak_rss_bytes` then measures one phase of a process. ``False`` where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:                                      # pragma: no cover
        return False


def rss_bytes() -> int:
    """The current resident set size in bytes (``/proc/self/statm``; the peak where unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):            # pragma: no cover
        return peak_rss_bytes()


__all__ = ["release_freed_memory", "trim", "peak_rss_bytes", "reset_peak_rss", "rss_bytes", "DEFAULT_THRESHOLD"]


# ----------------------------------------------------------------------------- scoped trimming
import contextlib as _contextlib
import contextvars as _contextvars

_TRIMMING = _contextvars.ContextVar("bmm_jax_trimming", default=False)


@_contextlib.contextmanager
def trimming(enabled: bool = True):
    """Inside the block, :func:`bmm_jax.merge`, :func:`bmm_jax.prepare` and the anchors return
    freed heap pages to the OS after every chunk of modules (:func:`trim`).

    Off by default: a library does not touch the process allocator unless asked. On ViT-B/32
    shapes with K = 8 it lowered the merge's peak RSS by ~0.5 GiB for ~3 s of re-faulted pages.
    Scoped to the current thread / context (a ``contextvars`` variable).
    """
    token = _TRIMMING.set(bool(enabled))
    try:
        yield
    finally:
        _TRIMMING.reset(token)


def maybe_trim() -> bool:
    """:func:`trim` if inside :func:`trimming`, else nothing (returns whether it trimmed)."""
    return trim() if _TRIMMING.get() else False
