"""Deterministic, duplicate-aware, stratified train / validation / test splits (pure numpy).

Rules (applied by :func:`make_splits`):
- an official test split is kept as is; otherwise ``test_fraction`` of every class is held out;
- validation is ``val_fraction`` of every class of the *train pool* (never taken from test);
- identical inputs (same image bytes / same string) always land in the same split, so the three
  splits are disjoint by content (official test splits here share no input with their train);
- every split is returned in a fixed pseudo-random order (so a prefix is a random subset).

Everything is driven by one integer seed; the same raw data and seed give the same splits.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np


class SplitIndices(NamedTuple):
    """Indices into the raw arrays. With an official test split, ``test`` indexes the raw test
    part and ``train`` / ``validation`` the raw train part; otherwise all index the one raw part."""

    train: np.ndarray
    validation: np.ndarray
    test: np.ndarray


def content_key(x) -> bytes | str:
    """Hashable identity of one example: the string itself, or dtype/shape/bytes of an array."""
    if isinstance(x, str):
        return x
    a = np.ascontiguousarray(x)
    return f"{a.dtype}{a.shape}".encode() + a.tobytes()


def group_ids(inputs: Sequence) -> tuple[np.ndarray, np.ndarray]:
    """Group identical inputs.

    Returns:
        ``(gid, first)``: ``gid[i]`` the group of example ``i`` (groups numbered in order of first
        appearance) and ``first[g]`` the index of the first member of group ``g``.
    """
    seen: dict = {}
    gid = np.empty(len(inputs), np.int64)
    first = []
    for i, x in enumerate(inputs):
        g = seen.setdefault(content_key(x), len(seen))
        if g == len(first):
            first.append(i)
        gid[i] = g
    return gid, np.asarray(first, np.int64)


def holdout(inputs: Sequence, labels: np.ndarray, fraction: float,
            rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Hold out about ``fraction`` of each class, moving whole groups of identical inputs.

    For each class ``c`` (ascending), the groups whose first member has label ``c`` are put in a
    random order, and groups are taken in that order while the number of examples taken stays
    ``<= round(fraction · n_c)`` (exactly that many when there are no duplicates).

    Args:
        inputs: ``N`` examples (arrays or strings), used only to find duplicates.
        labels: int array ``[N]``.
        fraction: in ``[0, 1)``.
        rng: consumed in a fixed order.

    Returns:
        ``(kept, held)``: sorted int64 index arrays partitioning ``range(N)``.
    """
    labels = np.asarray(labels)
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction must lie in [0, 1), got {fraction}")
    if labels.shape != (len(inputs),):
        raise ValueError(f"labels must have shape ({len(inputs)},), got {labels.shape}")
    gid, first = group_ids(inputs)
    sizes = np.bincount(gid, minlength=len(first))
    glabel = labels[first]
    held_groups = []
    for c in np.unique(labels):
        groups = rng.permutation(np.flatnonzero(glabel == c))
        target = int(np.floor(fraction * sizes[groups].sum() + 0.5))
        k = int(np.searchsorted(np.cumsum(sizes[groups]), target, side="right"))
        held_groups.append(groups[:k])
    is_held = np.zeros(len(first), bool)
    is_held[np.concatenate(held_groups)] = True
    held_mask = is_held[gid]
    return np.flatnonzero(~held_mask), np.flatnonzero(held_mask)


def make_splits(train_inputs: Sequence, train_labels: np.ndarray, *, has_test: bool,
                n_test: int = 0, seed: int, test_fraction: float = 0.2,
                val_fraction: float = 0.1) -> SplitIndices:
    """Split indices for one dataset (see the module docstring for the rules).

    Args:
        train_inputs, train_labels: the raw train part (or all the data when ``has_test`` is False).
        has_test: whether an official test part of ``n_test`` examples exists.
        seed: the dataset's fixed seed.
    """
    rng = np.random.default_rng(seed)
    if has_test:
        pool, test = np.arange(len(train_inputs)), np.arange(n_test)
    else:
        pool, test = holdout(train_inputs, train_labels, test_fraction, rng)
    sub = [train_inputs[i] for i in pool] if isinstance(train_inputs, (list, tuple)) \
        else train_inputs[pool]
    kept, held = holdout(sub, np.asarray(train_labels)[pool], val_fraction, rng)
    train, val = pool[kept], pool[held]
    return SplitIndices(rng.permutation(train), rng.permutation(val), rng.permutation(test))
