"""TFDS builders of the offline datasets, and the loading functions.

Each dataset is a ``tfds.core.GeneratorBasedBuilder`` (registered as ``bmm_<name>``, e.g.
``bmm_mnist``) written with ``file_format='array_record'`` under ``<cache>/tfds`` and read back
through ``builder.as_data_source(split)`` (random access, numpy out; no TensorFlow needed).

Features of every example: ``"image"`` (uint8 tensor ``spec.shape``, stored as raw bytes) or
``"text"`` (utf-8 text), and ``"label"`` (``ClassLabel`` with the spec's class names). Examples
are stored in the split's fixed order (``disable_shuffling``), see :mod:`bmm_jax.data.splits`.

Building is atomic-ish: TFDS writes into ``incomplete.*`` and renames the finished version folder
into place (a crash leaves no folder that :meth:`is_prepared` accepts); a per-dataset file lock
serialises concurrent builds of the same dataset by several processes, and stale ``incomplete.*``
folders are removed under that lock. After loading, split sizes are checked against
:data:`bmm_jax.data.specs.SPECS`.
"""
from __future__ import annotations

import contextlib
import fcntl
import inspect
import io
import shutil
import threading
from pathlib import Path
from typing import Iterator

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from tensorflow_datasets.core.utils import tqdm_utils

from bmm_jax.data import paths, raw
from bmm_jax.data.specs import SPECS, SPLITS, DatasetSpec, check_name, check_split
from bmm_jax.data.splits import make_splits

DATASET_VERSION = "1.0.0"


class _BmmBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Common builder: subclasses set ``DATASET`` (a key of ``SPECS``)."""

    VERSION = tfds.core.Version(DATASET_VERSION)
    RELEASE_NOTES = {DATASET_VERSION: "Initial release: deterministic stratified, duplicate-aware splits."}
    DATASET: str = ""
    # ``bmm_jax`` may be a namespace package (editable installs add a non-directory path entry),
    # which breaks TFDS's resource-based lookup of the builder's source folder: give it directly.
    pkg_dir_path = epath.Path(__file__).parent

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        return epath.Path(inspect.getfile(cls))

    @property
    def spec(self) -> DatasetSpec:
        return SPECS[self.DATASET]

    def _info(self) -> tfds.core.DatasetInfo:
        s = self.spec
        if s.kind == "image":
            inp = tfds.features.Tensor(shape=s.shape, dtype=np.uint8,
                                       encoding=tfds.features.Encoding.BYTES)
        else:
            inp = tfds.features.Text()
        key = "image" if s.kind == "image" else "text"
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"{s.description} Source: {s.source}. Terms: {s.license}.",
            features=tfds.features.FeaturesDict(
                {key: inp, "label": tfds.features.ClassLabel(names=list(s.class_names))}),
            supervised_keys=(key, "label"),
            homepage=s.homepage,
            license=s.license,
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        s = self.spec
        data = raw.READERS[s.name]()
        has_test = data.test_inputs is not None
        idx = make_splits(data.train_inputs, data.train_labels, has_test=has_test,
                          n_test=len(data.test_inputs) if has_test else 0, seed=s.seed)
        got = tuple(len(i) for i in idx)
        if got != s.sizes:
            raise ValueError(
                f"{s.name}: the raw files give split sizes {got}, expected {s.sizes}; the data "
                f"package differs from the pinned one ({s.source}); rerun `bmm-data install`")
        test_x, test_y = (data.test_inputs, data.test_labels) if has_test else \
            (data.train_inputs, data.train_labels)
        parts = {"train": (data.train_inputs, data.train_labels, idx.train),
                 "validation": (data.train_inputs, data.train_labels, idx.validation),
                 "test": (test_x, test_y, idx.test)}
        return {split: self._generate_examples(*parts[split]) for split in SPLITS}

    def _generate_examples(self, inputs, labels, index):
        key = "image" if self.spec.kind == "image" else "text"
        for i, j in enumerate(index):
            yield i, {key: inputs[int(j)], "label": int(labels[int(j)])}


class BmmMnist(_BmmBuilder):
    """MNIST (``bmm_mnist``)."""
    DATASET = "mnist"


class BmmFashionMnist(_BmmBuilder):
    """Fashion-MNIST (``bmm_fashion_mnist``)."""
    DATASET = "fashion_mnist"


class BmmOptdigits(_BmmBuilder):
    """UCI optdigits 8×8 (``bmm_optdigits``)."""
    DATASET = "optdigits"


class BmmIsing(_BmmBuilder):
    """2-D Ising phases (``bmm_ising``)."""
    DATASET = "ising"


class BmmMr(_BmmBuilder):
    """MR sentence polarity (``bmm_mr``)."""
    DATASET = "mr"


class BmmUncertainty(_BmmBuilder):
    """CoNLL-2010 uncertainty (``bmm_uncertainty``)."""
    DATASET = "uncertainty"


class BmmDutchPolarity(_BmmBuilder):
    """Dutch book-review polarity (``bmm_dutch_polarity``)."""
    DATASET = "dutch_polarity"


class BmmBbc(_BmmBuilder):
    """BBC News topics (``bmm_bbc``)."""
    DATASET = "bbc"


class BmmFortunes(_BmmBuilder):
    """Fortune topics (``bmm_fortunes``)."""
    DATASET = "fortunes"


BUILDERS: dict[str, type[_BmmBuilder]] = {
    c.DATASET: c for c in (BmmMnist, BmmFashionMnist, BmmOptdigits, BmmIsing, BmmMr,
                           BmmUncertainty, BmmDutchPolarity, BmmBbc, BmmFortunes)}


def builder(name: str, data_dir: str | Path | None = None) -> _BmmBuilder:
    """The TFDS builder of ``name`` on ``data_dir`` (default ``<cache>/tfds``); nothing is built."""
    check_name(name)
    d = Path(data_dir) if data_dir is not None else paths.tfds_dir()
    return BUILDERS[name](data_dir=str(d), file_format="array_record")


def _version_dir(name: str, data_dir: str | Path | None) -> Path:
    d = Path(data_dir) if data_dir is not None else paths.tfds_dir()
    return d / BUILDERS[name].name / DATASET_VERSION


def is_built(name: str, data_dir: str | Path | None = None) -> bool:
    """Whether ``name`` is completely built: its version folder holds ``dataset_info.json``.

    TFDS writes that folder under a temporary name and renames it when complete, so a crashed
    build is never reported as built.
    """
    check_name(name)
    return (_version_dir(name, data_dir) / "dataset_info.json").is_file()


@contextlib.contextmanager
def _quiet():
    """Silence TFDS progress bars and its prints during a build."""
    old = tqdm_utils._active
    tqdm_utils.display_progress_bar(False)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        tqdm_utils.display_progress_bar(old)


def _check_sizes(b: _BmmBuilder) -> None:
    spec = b.spec
    got = tuple(b.info.splits[s].num_examples if s in b.info.splits else -1 for s in SPLITS)
    if got != spec.sizes:
        raise ValueError(f"{spec.name}: built dataset at {b.data_dir} has split sizes {got}, "
                         f"expected {spec.sizes}; delete that folder and rebuild")


def prepare(name: str, data_dir: str | Path | None = None) -> _BmmBuilder:
    """Build ``name`` if needed (once; safe against concurrent processes) and return its builder.

    Raises:
        ValueError: unknown name, or sizes that differ from the spec.
        bmm_jax.data.paths.MissingDataError: not built and its raw package is missing
            (run ``bmm-data install``).
    """
    check_name(name)
    if not is_built(name, data_dir):
        vdir = _version_dir(name, data_dir)  # <data_dir>/<builder name>/<version>
        vdir.parent.mkdir(parents=True, exist_ok=True)
        with open(vdir.parent.parent / f".{vdir.parent.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                if not is_built(name, data_dir):  # another process may have finished meanwhile
                    for stale in vdir.parent.glob("incomplete.*"):
                        shutil.rmtree(stale, ignore_errors=True)
                    if vdir.exists():  # a version folder without dataset_info.json: unusable
                        shutil.rmtree(vdir)
                    with _quiet():
                        builder(name, data_dir).download_and_prepare(
                            download_config=tfds.download.DownloadConfig(
                                try_download_gcs=False,
                                download_mode=tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS))
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
    b = builder(name, data_dir)
    _check_sizes(b)
    return b


def data_source(name: str, split: str, data_dir: str | Path | None = None):
    """Random-access TFDS data source of one split (builds first if needed).

    ``source[i]`` is a dict ``{"image": uint8 [H, W] | "text": bytes, "label": int}``.
    """
    check_name(name)
    check_split(split)
    return prepare(name, data_dir).as_data_source(split)


_CACHE: dict[tuple[str, str, str], tuple] = {}
_CACHE_LOCK = threading.Lock()


def _read_split(name: str, split: str, data_dir: str | Path | None):
    key = (str(Path(data_dir) if data_dir is not None else paths.tfds_dir()), name, split)
    with _CACHE_LOCK:
        hit = _CACHE.get(key)
    if hit is not None:
        return hit
    spec = SPECS[name]
    src = data_source(name, split, data_dir)
    examples = src.__getitems__(list(range(len(src))))
    labels = np.fromiter((e["label"] for e in examples), np.int32, count=len(examples))
    if spec.kind == "image":
        inputs = np.stack([e["image"] for e in examples]) if examples else \
            np.zeros((0, *spec.shape), np.uint8)
        inputs.flags.writeable = False
    else:
        inputs = tuple(e["text"].decode("utf-8") if isinstance(e["text"], bytes) else e["text"]
                       for e in examples)
    labels.flags.writeable = False
    with _CACHE_LOCK:
        _CACHE[key] = (inputs, labels)
    return inputs, labels


def load(name: str, split: str, data_dir: str | Path | None = None):
    """One split of a dataset as ``(inputs, labels)``.

    Args:
        name: one of :data:`bmm_jax.data.DATASETS`.
        split: ``"train"``, ``"validation"`` or ``"test"``.
        data_dir: TFDS data dir (default ``<cache>/tfds``).

    Returns:
        ``inputs``: ``uint8`` array ``[N, H, W]`` for image datasets (a fresh, writable copy), or a
        fresh ``list`` of ``N`` strings for text datasets; ``labels``: ``int32`` array ``[N]`` in
        ``0..C-1``. The first call per process reads the split from disk (building the dataset
        once if needed, seconds); later calls are served from an in-memory cache.

    Raises:
        ValueError: unknown name or split (the message lists the valid ones).
        bmm_jax.data.paths.MissingDataError: the dataset is not built and its raw data package is
            not installed (run ``bmm-data install``).
    """
    spec = check_name(name)
    check_split(split)
    inputs, labels = _read_split(name, split, data_dir)
    if spec.kind == "image":
        return np.array(inputs), np.array(labels)
    return list(inputs), np.array(labels)


def batches(inputs, labels: np.ndarray, batch_size: int, *, seed: int | None = None,
            drop_remainder: bool = False) -> Iterator[tuple]:
    """One epoch of numpy mini-batches ``(inputs[b], labels[b])`` (ready for ``jnp.asarray``).

    Args:
        inputs: array ``[N, ...]`` or a sequence of ``N`` strings (batches are then lists).
        labels: int array ``[N]``.
        batch_size: positive int.
        seed: ``None`` keeps the order; an int shuffles with ``np.random.default_rng(seed)``.
        drop_remainder: drop the last batch when it is smaller than ``batch_size``.
    """
    n = len(labels)
    if len(inputs) != n:
        raise ValueError(f"inputs has {len(inputs)} examples but labels has {n}")
    if not isinstance(batch_size, (int, np.integer)) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    order = np.arange(n) if seed is None else np.random.default_rng(seed).permutation(n)
    stop = n - n % batch_size if drop_remainder else n
    is_array = isinstance(inputs, np.ndarray)
    for start in range(0, stop, batch_size):
        b = order[start:start + batch_size]
        xb = inputs[b] if is_array else [inputs[int(i)] for i in b]
        yield xb, np.asarray(labels)[b]
