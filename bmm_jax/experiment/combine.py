"""Pooling the ablation or few-shot result files of separate runs into one table.

Seeds of an ablation study are often run apart: on other machines, in other sessions, or after a
cache was lost. :func:`combine_ablation_files` reads the JSON files that
:func:`~bmm_jax.experiment.run_ablations` / :func:`~bmm_jax.experiment.run_fewshot` wrote (their
``<name>.json`` or an ``--export PREFIX.json``), checks that they are one study (same benchmark,
same settings, same protocol where the files record it, disjoint seeds) and writes the pooled
records like a single run would: ``<name>.json``, ``<name>.md`` (mean ± std over all seeds) and the
plots. The input files are only read.
"""
from __future__ import annotations

import json
import os
import re
from typing import Sequence

from bmm_jax.experiment.ablations import AblationResult, write_ablations
from bmm_jax.experiment.config import ExperimentConfig

_SEEDS_SUFFIX = re.compile(r",? seeds \[[^\]]*\]$")
_RECORD_FIELDS = ("ablation", "setting", "seed", "split", "accuracy")


def _load(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"results file not found: {path}")
    try:
        with open(path) as f:
            d = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict) or not isinstance(d.get("records"), list) or not d["records"]:
        raise ValueError(f"{path}: not an ablation or few-shot results file (a JSON object with a non-empty "
                         "'records' list, as run_ablations / run_fewshot write)")
    for i, r in enumerate(d["records"]):
        missing = [k for k in _RECORD_FIELDS if not isinstance(r, dict) or k not in r]
        if missing:
            raise ValueError(f"{path}: record {i} lacks {missing}; not an ablation or few-shot record")
    return d


def _kind(records) -> str:
    return "fewshot" if all(r["ablation"] == "fewshot" for r in records) else "ablations"


def combine_ablation_files(paths: Sequence[str], config: ExperimentConfig, *,
                           out_dir: str | None = None) -> AblationResult:
    """Pool the records of ablation (or few-shot) result files written by separate runs.

    Args:
      paths: two or more JSON files written by :func:`~bmm_jax.experiment.run_ablations` or
        :func:`~bmm_jax.experiment.run_fewshot`, all of one kind, holding disjoint seeds.
      config: the configuration the runs used (benchmark, validation subset size, plots). Files that
        record their protocol (written since it was added) must match ``config.protocol()``; older
        files are checked on benchmark and settings only.
      out_dir: output directory (default ``<config run dir>/<name>_combined``, ``<name>`` being
        ``ablations`` or ``fewshot``).

    Returns:
      :class:`~bmm_jax.experiment.ablations.AblationResult` of the pooled records (ordered by the
      files' smallest seed); ``details["combined_from"]`` lists each file, its seeds and wall
      time, and ``seconds`` is the sum of the runs' wall times.

    Raises:
      FileNotFoundError: a file does not exist.
      ValueError: a file is not a results file, or the files are not one study (the message names
        the two files and the field that differs, or the seed they share).
    """
    paths = [os.fspath(p) for p in paths]
    if len(paths) < 2:
        raise ValueError(f"combine needs two or more results files, got {len(paths)}")
    if len(set(map(os.path.abspath, paths))) != len(paths):
        raise ValueError("the same results file is given twice")
    loaded = [(p, _load(p)) for p in paths]
    first_path, first = loaded[0]
    name = _kind(first["records"])
    protocol = config.protocol()
    owner: dict[int, str] = {}
    for p, d in loaded:
        if _kind(d["records"]) != name:
            raise ValueError(f"{p} holds {_kind(d['records'])} records but {first_path} holds {name} records")
        for field in ("benchmark", "settings"):
            if d.get(field) != first.get(field):
                raise ValueError(f"{p} and {first_path} are not one study: their '{field}' differ "
                                 f"({d.get(field)!r} vs {first.get(field)!r})")
        if d.get("benchmark") != config.benchmark_name:
            raise ValueError(f"{p} is a {d.get('benchmark')!r} run but the configuration's benchmark is "
                             f"{config.benchmark_name!r} (pass the runs' --preset and --benchmark)")
        if "protocol" in d and d["protocol"] != protocol:
            diff = sorted(k for k in set(d["protocol"]) | set(protocol) if d["protocol"].get(k) != protocol.get(k))
            raise ValueError(f"{p} was run under another protocol than the configuration's (differs in {diff}); "
                             "pass the runs' --preset and options")
        if _SEEDS_SUFFIX.sub("", d.get("title", "")) != _SEEDS_SUFFIX.sub("", first.get("title", "")):
            raise ValueError(f"{p} and {first_path} are not one study: titles {d.get('title')!r} vs "
                             f"{first.get('title')!r}")
        for s in sorted({int(r["seed"]) for r in d["records"]}):
            if s in owner:
                raise ValueError(f"seed {s} is in both {owner[s]} and {p}; each seed may come from one file only")
            owner[s] = p
    loaded.sort(key=lambda pd: min(int(r["seed"]) for r in pd[1]["records"]))
    records = [r for _, d in loaded for r in d["records"]]
    seeds = sorted(owner)
    title = f"{_SEEDS_SUFFIX.sub('', first.get('title', name))}, seeds {seeds}"
    seed_details: dict = {}
    for _, d in loaded:
        seed_details.update((d.get("details") or {}).get("seeds") or {})
    seconds = float(sum(d.get("seconds") or 0.0 for _, d in loaded))
    details = {"settings": first.get("settings"), "seeds": seed_details, "seconds": seconds,
               "combined_from": [{"file": os.path.abspath(p), "seeds": sorted({int(r["seed"]) for r in d["records"]}),
                                  "seconds": d.get("seconds")} for p, d in loaded]}
    out_dir = os.path.abspath(out_dir or os.path.join(config.resolved_run_dir, f"{name}_combined"))
    files = write_ablations(records, out_dir, title=title, details=details, config=config, plots=config.plots,
                            name=name)
    with open(files["table"]) as f:
        table = f.read()
    return AblationResult(records, table, out_dir, files, details, seconds)


__all__ = ["combine_ablation_files"]
