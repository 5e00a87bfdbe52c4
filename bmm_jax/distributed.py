"""Several processes (hosts) with JAX's own multi-controller runtime (``jax.distributed``).

Every process runs the same program: :func:`initialize` connects it to the coordinator
(``jax.distributed.initialize(coordinator_address, num_processes, process_id)``); after that
``jax.devices()`` spans every process and the collectives of
:mod:`jax.experimental.multihost_utils` work (on CPU through gloo, JAX's default CPU collectives).

* :func:`assign` shares work items (tensors of a checkpoint) between processes deterministically:
  longest-processing-time-first on a cost estimate, ties broken by item order, so every process
  computes the same assignment from the same inputs without communicating.
* :func:`allgather_json`, :func:`broadcast_json`, :func:`barrier`: small control messages.
* :func:`sum_across_processes` sums a pytree of arrays over processes (every process gets the
  sum); :func:`allreduce_gram_state` applies it to the running sums of
  :mod:`bmm_jax.grams.activations` (``GramState(sums, counts)``), so activation Grams accumulate
  data-parallel: each process updates the state with its own batches, one collective adds the
  states, and ``finalize`` then gives the Grams of all the batches (token-weighted means).

With one process (no coordinator) every function is a local no-op, so the same code runs
single-process.
"""
from __future__ import annotations

import heapq
import json
from typing import Any, Sequence

import jax
import numpy as np


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, **kwargs) -> tuple[int, int]:
    """Join the multi-process runtime (once; later calls with the same settings are no-ops).

    Args:
      coordinator_address: ``"HOST:PORT"`` of process 0's coordinator service.
      num_processes: number of processes N (>= 1).
      process_id: this process's index in ``[0, N)``.
      kwargs: passed to :func:`jax.distributed.initialize` (e.g. ``local_device_ids``).

    Returns:
      ``(process_index, process_count)``.

    Raises:
      ValueError: an incomplete or invalid combination of arguments.
    """
    given = [coordinator_address is not None, num_processes is not None, process_id is not None]
    if any(given) and not all(given):
        raise ValueError("coordinator_address, num_processes and process_id go together: give all three "
                         f"(got coordinator_address={coordinator_address!r}, num_processes={num_processes!r}, "
                         f"process_id={process_id!r})")
    if not any(given):
        return process_index(), process_count()
    if not isinstance(coordinator_address, str) or ":" not in coordinator_address:
        raise ValueError(f"coordinator_address must be 'HOST:PORT', got {coordinator_address!r}")
    n, i = int(num_processes), int(process_id)
    if n < 1:
        raise ValueError(f"num_processes must be >= 1, got {num_processes}")
    if not 0 <= i < n:
        raise ValueError(f"process_id must be in [0, {n}), got {process_id}")
    if is_initialized():
        if (process_count(), process_index()) != (n, i):
            raise ValueError(f"jax.distributed is already initialized as process {process_index()} of "
                             f"{process_count()}, not {i} of {n}")
        return i, n
    if n == 1:
        return 0, 1
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=n, process_id=i, **kwargs)
    return process_index(), process_count()


def is_initialized() -> bool:
    try:
        return bool(jax.distributed.is_initialized())
    except AttributeError:                               # pragma: no cover - older jax
        from jax._src import distributed as _d
        return _d.global_state.client is not None


def process_index() -> int:
    return int(jax.process_index())


def process_count() -> int:
    return int(jax.process_count())


def assign(costs: Sequence[float], num_processes: int | None = None) -> list[int]:
    """Process index of each item: longest-processing-time-first on ``costs`` (deterministic).

    Items are taken by decreasing cost (equal costs in item order) and each goes to the process
    with the least total cost so far (the lowest index on ties).
    """
    n = process_count() if num_processes is None else int(num_processes)
    if n < 1:
        raise ValueError(f"num_processes must be >= 1, got {num_processes}")
    order = sorted(range(len(costs)), key=lambda i: (-float(costs[i]), i))
    heap = [(0.0, p) for p in range(n)]
    out = [0] * len(costs)
    for i in order:
        load, p = heapq.heappop(heap)
        out[i] = p
        heapq.heappush(heap, (load + float(costs[i]), p))
    return out


def barrier(name: str) -> None:
    """Wait until every process reaches the barrier ``name`` (no-op with one process)."""
    if process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def allgather_json(obj: Any) -> list:
    """Every process's JSON-serialisable ``obj``, in process order (a collective)."""
    if process_count() == 1:
        return [json.loads(json.dumps(obj, default=str))]
    from jax.experimental import multihost_utils
    raw = np.frombuffer(json.dumps(obj, default=str).encode(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.asarray([raw.size], np.int32))).reshape(-1)
    buf = np.zeros(int(sizes.max()), np.uint8)
    buf[:raw.size] = raw
    allb = np.asarray(multihost_utils.process_allgather(buf)).reshape(len(sizes), -1)
    return [json.loads(allb[p, :int(s)].tobytes().decode()) for p, s in enumerate(sizes)]


def broadcast_json(obj: Any) -> Any:
    """Process 0's ``obj`` on every process (a collective)."""
    return allgather_json(obj if process_index() == 0 else None)[0]


def sum_across_processes(tree):
    """Elementwise sum over processes of a pytree of arrays with the same shapes on every process
    (float32 / int results on the host, as numpy arrays). One process: the tree itself."""
    if process_count() == 1:
        return tree
    from jax.experimental import multihost_utils
    gathered = multihost_utils.process_allgather(tree)
    return jax.tree_util.tree_map(lambda x: np.sum(np.asarray(x), axis=0), gathered)


def allreduce_gram_state(state):
    """Sum a :class:`bmm_jax.grams.activations.GramState` (``sums``, ``counts``) over processes.

    Each process accumulates its own batches with ``activations.update``; after this call every
    process holds the state of all batches, and ``activations.finalize`` gives the pooled Grams
    ``sum_p S_p / sum_p n_p``.
    """
    from bmm_jax.grams.activations import GramState
    import jax.numpy as jnp
    summed = sum_across_processes({"sums": dict(state.sums), "counts": dict(state.counts)})
    return GramState({g: jnp.asarray(v, jnp.float32) for g, v in summed["sums"].items()},
                     {g: jnp.asarray(v, jnp.float32) for g, v in summed["counts"].items()})


__all__ = ["initialize", "is_initialized", "process_index", "process_count", "assign", "barrier",
           "allgather_json", "broadcast_json", "sum_across_processes", "allreduce_gram_state"]
