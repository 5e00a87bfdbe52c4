"""Per-tensor TIES on a tensor too large to hold ``K`` float32 copies of: row chunks, exact.

:func:`bmm_jax.anchors.ties` trims every leaf per task at its exact ``k``-th largest magnitude
(``k = max(1, floor(density n))``), elects signs per entry, falls back to the leaf's majority sign
where the elected sum is exactly 0, and averages the agreeing entries. On a Llama-3 embedding
(128256 x 2048, K = 4) its ``[K, n]`` float32 task vectors alone are 4 GiB, so the streamed merge
runs the same computation over row chunks of the memory-mapped tensors:

1. the per-task thresholds by a radix selection on the IEEE bits of ``|tau|`` (non-negative
   floats are ordered like their integer bits): two histogram passes over the chunks (bits
   30-15, then 14-0 of the entries in the selected bin), exact, no sort buffer;
2. the leaf's majority sign: one pass summing the elected signs;
3. the merged rows, chunk by chunk, written as they are produced.

Every step is elementwise given the thresholds and the majority sign, so the result equals
:func:`bmm_jax.anchors.ties` on the whole tensor (checked in ``tests/test_streaming.py``). Memory:
one chunk (``K`` float32 copies of ``rows x cols``) at a time.
"""
from __future__ import annotations

from typing import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

_PASSES = ((15, 16), (0, 15))            # (shift, bits) of the radix digits of a 31-bit pattern


@jax.jit
def _abs_bits(base_chunk, expert_chunks):
    b = base_chunk.astype(jnp.float32)
    t = jnp.stack([e.astype(jnp.float32) - b for e in expert_chunks])
    return jax.lax.bitcast_convert_type(jnp.abs(t), jnp.int32).reshape(t.shape[0], -1)


def _trim(base_chunk, expert_chunks, thresh):
    b = base_chunk.astype(jnp.float32)
    taus = jnp.stack([e.astype(jnp.float32) - b for e in expert_chunks]).reshape(len(expert_chunks), -1)
    return jnp.where(jnp.abs(taus) >= thresh[:, None], taus, jnp.zeros_like(taus))


@jax.jit
def _elected_sum(base_chunk, expert_chunks, thresh):
    trimmed = _trim(base_chunk, expert_chunks, thresh)
    return jnp.sum(jnp.sign(jnp.sum(trimmed, axis=0)).astype(jnp.int32))


@jax.jit
def _ties_rows(base_chunk, expert_chunks, thresh, majority, scale):
    """Merged rows (base dtype): the operations of ``anchors.ties.ties_merge_flat`` with the
    thresholds and majority sign of the whole tensor, then ``theta_0 + scale * merged``."""
    trimmed = _trim(base_chunk, expert_chunks, thresh)
    elected = jnp.sign(jnp.sum(trimmed, axis=0))
    elected = jnp.where(elected == 0, majority, elected)
    agree = jnp.where(elected > 0, trimmed > 0, trimmed < 0)
    total = jnp.sum(jnp.where(agree, trimmed, jnp.zeros_like(trimmed)), axis=0)
    count = jnp.sum(agree, axis=0).astype(trimmed.dtype)
    merged = (total / jnp.maximum(count, 1.0)).reshape(base_chunk.shape)
    return (base_chunk.astype(jnp.float32) + scale * merged).astype(base_chunk.dtype)


def _select(counts: np.ndarray, rank: int) -> tuple[int, int]:
    """Digit holding the ``rank``-th largest (1-based) of a histogram, and the rank inside it."""
    above = np.cumsum(counts[::-1])
    j = int(np.searchsorted(above, rank))                  # first top-down cumulative count >= rank
    digit = len(counts) - 1 - j
    return digit, rank - (int(above[j - 1]) if j > 0 else 0)


ChunkFn = Callable[[], Iterator[tuple]]


def kth_largest_abs_chunked(chunks: ChunkFn, k: int, num_experts: int) -> np.ndarray:
    """Per task, the exact ``k``-th largest ``|theta_k - theta_0|`` over all chunks -> ``[K]`` float32.

    ``chunks()`` yields ``(base_rows, [expert_rows])`` (numpy or jax arrays) covering the tensor; it
    is called twice (one histogram pass per radix digit).
    """
    prefix = np.zeros(num_experts, np.int64)
    rank = np.full(num_experts, k, np.int64)
    for shift, nbits in _PASSES:
        counts = np.zeros((num_experts, 1 << nbits), np.int64)
        width = shift + nbits
        for b, es in chunks():
            bits = np.asarray(_abs_bits(jnp.asarray(b), [jnp.asarray(e) for e in es]))
            for t in range(num_experts):
                x = bits[t]
                if width < 31:                           # keep the entries matching the prefix so far
                    x = x[(x >> width) == prefix[t]]
                counts[t] += np.bincount((x >> shift) & ((1 << nbits) - 1), minlength=1 << nbits)
            del bits
        for t in range(num_experts):
            digit, rank[t] = _select(counts[t], int(rank[t]))
            prefix[t] = (prefix[t] << nbits) | digit
    return prefix.astype(np.int32).view(np.float32)


def ties_chunked(chunks: ChunkFn, num_entries: int, num_experts: int, *, density: float, scale: float,
                 write: Callable[[int, np.ndarray], None]) -> dict:
    """TIES of one tensor over row chunks; ``write(chunk_index, merged_rows)`` receives the result.

    Args:
      chunks: ``() -> iterator of (base_rows, [expert_rows])`` over the tensor (called 4 times).
      num_entries: elements of the whole tensor (``n``; ``k = max(1, floor(density n))``).
      num_experts: K.
      density, scale: as in :func:`bmm_jax.anchors.ties`.
      write: sink of the merged rows, in chunk order.

    Returns:
      ``{"thresholds": [K], "majority": +-1, "k": k}``.
    """
    k = max(1, int(density * num_entries + 1e-9))        # as anchors.ties
    thresh = kth_largest_abs_chunked(chunks, k, num_experts)
    th = jnp.asarray(thresh)
    total = 0
    for b, es in chunks():
        total += int(_elected_sum(jnp.asarray(b), [jnp.asarray(e) for e in es], th))
    majority = float(np.sign(total))
    for i, (b, es) in enumerate(chunks()):
        out = _ties_rows(jnp.asarray(b), [jnp.asarray(e) for e in es], th, jnp.float32(majority),
                         jnp.float32(scale))
        write(i, np.asarray(out))
    return {"thresholds": thresh.tolist(), "majority": majority, "k": k}


def row_chunks(num_rows: int, row_elements: int, num_experts: int, chunk_bytes: int) -> list[tuple[int, int]]:
    """``[(start, stop)]`` row ranges whose ``K`` float32 copies take at most ``chunk_bytes``."""
    per = max(1, int(chunk_bytes) // max(1, 4 * num_experts * row_elements))
    return [(s, min(num_rows, s + per)) for s in range(0, num_rows, per)]


__all__ = ["kth_largest_abs_chunked", "ties_chunked", "row_chunks"]
