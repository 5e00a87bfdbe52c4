"""Files a search writes into its run directory.

``groups.json`` / ``groups.txt``  the resolved group -> modules table (written before searching)
``trials.json`` / ``trials.csv``  every trial (the exact anchor first, as trial 0), best so far
``best.json``                     the returned hyper-parameters and value
``convergence.png``               value per trial, best so far, the anchor's line
``hparams_by_depth.png``          the best trial's log10 rho and s per module, by depth and kind

Plots use a private Agg canvas (no global matplotlib backend change).
"""
from __future__ import annotations

import csv
import json
import math
import os
from typing import Mapping, Sequence

import numpy as np

from bmm_jax.search.space import RHO_SUFFIX, SCALE_SUFFIX, SearchSpace, groups_dict, groups_table
from bmm_jax.search.study import TrialRecord


def _atomic_write(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_groups(run_dir: str, space: SearchSpace) -> str:
    """Write ``groups.json`` and ``groups.txt``; return the table text."""
    table = groups_table(space)
    _atomic_write(os.path.join(run_dir, "groups.txt"), table + "\n")
    _atomic_write(os.path.join(run_dir, "groups.json"), json.dumps(groups_dict(space), indent=1) + "\n")
    return table


def best_so_far(values: Sequence[float | None]) -> list[float | None]:
    """Running maximum, ignoring ``None`` (not yet any value -> ``None``)."""
    out, best = [], None
    for v in values:
        if v is not None and math.isfinite(v) and (best is None or v > best):
            best = v
        out.append(best)
    return out


def trial_dicts(records: Sequence[TrialRecord]) -> list[dict]:
    """JSON-ready trials with ``best_so_far``."""
    bsf = best_so_far([r.value for r in records])
    out = []
    for r, b in zip(records, bsf):
        d = r._asdict()
        d["best_so_far"] = b
        out.append(d)
    return out


def write_trials(run_dir: str, records: Sequence[TrialRecord], space: SearchSpace) -> None:
    """Write ``trials.json`` and ``trials.csv`` (parameter and per-task metric columns)."""
    rows = trial_dicts(records)
    _atomic_write(os.path.join(run_dir, "trials.json"), json.dumps(rows, indent=1) + "\n")
    pnames = space.parameter_names
    mnames = sorted({k for r in records for k in r.metrics})
    head = ["trial", "source", "state", "value", "best_so_far", "seconds", "infeasible_reason"] + pnames + mnames
    tmp = os.path.join(run_dir, "trials.csv.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(head)
        for d in rows:
            w.writerow([d["id"], d["source"], d["state"], d["value"], d["best_so_far"], d["seconds"],
                        d["infeasible_reason"] or ""]
                       + [d["point"].get(p, "") for p in pnames] + [d["metrics"].get(m, "") for m in mnames])
    os.replace(tmp, os.path.join(run_dir, "trials.csv"))


def write_best(run_dir: str, best: Mapping) -> None:
    _atomic_write(os.path.join(run_dir, "best.json"), json.dumps(best, indent=1, sort_keys=True) + "\n")


def _figure(rows: int, cols: int, size):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=size)
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False)
    return fig, axes


def plot_convergence(path: str, records: Sequence[TrialRecord], anchor_value: float | None,
                     title: str = "") -> None:
    """Value per trial (seeds and fallbacks marked), best so far, and the anchor's line."""
    fig, axes = _figure(1, 1, (7, 4))
    ax = axes[0, 0]
    xs = [r.id for r in records]
    vals = [r.value for r in records]
    kinds = {"anchor": ("anchor (exact)", "k", "*"), "seed": ("seeded", "tab:orange", "s"),
             "designer": ("designer", "tab:blue", "o"), "fallback": ("fallback", "tab:red", "x")}
    for key, (label, color, marker) in kinds.items():
        pts = [(x, v) for x, v, r in zip(xs, vals, records)
               if v is not None and r.source.split(":")[0] == key]
        if pts:
            ax.scatter(*zip(*pts), s=22, c=color, marker=marker, label=label, zorder=3)
    bsf = best_so_far(vals)
    pts = [(x, b) for x, b in zip(xs, bsf) if b is not None]
    if pts:
        ax.step(*zip(*pts), where="post", c="tab:green", label="best so far", zorder=2)
    if anchor_value is not None:
        ax.axhline(anchor_value, c="k", ls="--", lw=1, label="anchor")
    bad = [x for x, r in zip(xs, records) if r.state == "INFEASIBLE"]
    if bad:
        ax.scatter(bad, [min(v for v in vals if v is not None)] * len(bad) if any(v is not None for v in vals)
                   else [0.0] * len(bad), c="grey", marker="v", label="infeasible")
    ax.set_xlabel("trial")
    ax.set_ylabel("validation objective")
    ax.set_title(title or "search convergence")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best", framealpha=0.6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_hparams_by_depth(path: str, space: SearchSpace, point: Mapping[str, float] | None,
                          title: str = "") -> None:
    """log10 rho and s of every module by depth (block index; ``-`` for modules outside blocks),
    one line per module kind, for the flat ``point`` (usually the best trial)."""
    fig, axes = _figure(2, 1, (7, 5.5))
    if point is None:
        for ax in axes[:, 0]:
            ax.text(0.5, 0.5, "no completed trial", ha="center", va="center", transform=ax.transAxes)
        fig.savefig(path, dpi=110)
        return
    by_kind: dict[str, list[tuple[int, float, float]]] = {}
    for g in space.groups:
        lr, s = float(point[g.name + RHO_SUFFIX]), float(point[g.name + SCALE_SUFFIX])
        for m in g.modules:
            by_kind.setdefault(str(m.kind), []).append((-1 if m.block is None else int(m.block), lr, s))
    markers = "osD^v<>xP*"
    for i, (kind, pts) in enumerate(sorted(by_kind.items())):
        pts = sorted(pts)
        d = np.array([p[0] for p in pts], dtype=float)
        for row, col in ((0, 1), (1, 2)):
            axes[row, 0].plot(d, [p[col] for p in pts], marker=markers[i % len(markers)], ms=4, lw=1,
                              label=kind)
    axes[0, 0].set_ylabel("log10 rho")
    axes[0, 0].set_ylim(*_pad(space.log10_rho_range))
    axes[1, 0].set_ylabel("scale s")
    axes[1, 0].set_ylim(*_pad(space.scale_range))
    axes[1, 0].set_xlabel("depth (block; -1: outside blocks)")
    from matplotlib.ticker import MaxNLocator
    for ax in axes[:, 0]:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in axes[:, 0]:
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7, ncol=4, loc="lower left")
    axes[0, 0].set_title(title or f"hyper-parameters by depth (grouping {space.grouping!r})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _pad(rng):
    lo, hi = rng
    w = 0.05 * (hi - lo)
    return lo - w, hi + w
