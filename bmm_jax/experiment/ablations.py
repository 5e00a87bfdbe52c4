"""Ablations of BMM's design choices on a benchmark, each a table and a plot.

:func:`run_ablations` refines one anchor (default Task Arithmetic at its validation-chosen scale)
with one Gram mode (default activations) and varies one choice at a time; every search uses the
same designer, seed and trial budget (``trials``, default ``config.module_trials``) and selects
on the validation subset only:

``prior``          prior strength: ρ → ∞ (the anchor itself), the searched ρ (grouping ``type``), ρ → 0
                   (ρ = 1e-6, s = 1), and a sweep of one shared ρ (s = 1) from 1e-6 to 1e4
``grouping``       hyper-parameter groups ``global`` / ``type`` / ``block`` / ``module``
``budget``         best validation value and the test accuracy of the incumbent after each of up to
                   ``budget_trials`` (64) trials of one ``type`` search
``rho_only``       ρ only (s fixed at 1) vs ρ and s per group
``prior_kind``     isotropic vs diagonal prior
``gram_grouping``  data-free Grams per module vs per input group (q, k and v read one input: their
                   task kernels are concatenated, ``G_k = T_k T_k^T / ||T_k||^2`` with
                   ``T_k = [T_q T_k T_v]``, as the WUDI authors solve the fused qkv weight)

Results: ``<run_dir>/ablations/ablations.json`` (records ``{"ablation", "setting", "x", "seed",
"split", "accuracy", "tasks"}``, accuracy = mean over tasks), ``ablations.md`` (one table per
ablation: mean ± std over seeds) and ``ablation_<name>.png``. Resumable: finished items are kept
in ``seed<s>/ablations/progress.json`` and the Vizier studies in ``seed<s>/ablations/search/``.
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Mapping, NamedTuple, Sequence

import numpy as np

from bmm_jax._tree import PyTree
from bmm_jax.experiment.config import ExperimentConfig
from bmm_jax.experiment.files import atomic_write_json, atomic_write_text, jsonable
from bmm_jax.experiment.running import SeedRun, _log

ABLATIONS = ("prior", "grouping", "budget", "rho_only", "prior_kind", "gram_grouping")
ALL_GROUPINGS = ("global", "type", "block", "module")
RHO_ZERO = 1e-6
RHO_SWEEP = (1e-6, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1e4)
RHO_ONLY_BOX = (1.0 - 1e-6, 1.0 + 1e-6)   # s pinned at 1 (a box Vizier accepts)


def data_free_group_grams(base: PyTree, experts: Sequence[PyTree], labels: PyTree | None = None):
    """Data-free Grams per *input group* (method.md §3.2 applied to a fused weight): for the
    modules reading one input (q, k, v), ``G_k = T_k T_k^T / ||T_k||_F^2`` with ``T_k`` the
    concatenation ``[T_k^(m1) T_k^(m2) ...]`` of their task kernels along the output axis; every
    module of the group shares it. Stored as factors ``[K, d_in, sum d_out]``.

    Returns:
      :class:`bmm_jax.grams.Grams` (kind ``"data_free_group"``).
    """
    import jax
    import jax.numpy as jnp

    from bmm_jax._tree import check_experts
    from bmm_jax.grams import Grams
    from bmm_jax.grams.data_free import module_task_kernels, normalized_factors
    from bmm_jax.labels import build_labels, check_labels
    experts = check_experts(base, experts)
    labels = build_labels(base) if labels is None else labels
    lab = check_labels(labels, base)
    base_leaves = jax.tree_util.tree_leaves(base)
    expert_leaves = [jax.tree_util.tree_leaves(e) for e in experts]
    members: dict[str, list[int]] = {}
    for i, l in enumerate(lab):
        if l.regressed:
            members.setdefault(l.input_group or l.path, []).append(i)
    if not members:
        raise ValueError("the label tree selects no regressed module: nothing to estimate")
    key_of, factors = {}, {}
    for group, idx in members.items():
        t = jnp.concatenate([module_task_kernels(lab[i], base_leaves[i], [e[i] for e in expert_leaves])
                             for i in idx], axis=-1)
        factors[group] = normalized_factors(t)
        for i in idx:
            key_of[lab[i].path] = group
    return Grams({}, key_of, factors=factors, kind="data_free_group")


class AblationResult(NamedTuple):
    """What :func:`run_ablations` / :func:`bmm_jax.experiment.fewshot.run_fewshot` return:
    ``records``, the markdown ``table``, the output directory, ``{kind: path}`` of the written
    files, ``details`` and the wall time in ``seconds``."""
    records: list
    table: str
    run_dir: str
    files: dict
    details: dict
    seconds: float


class ItemRun:
    """One seed of an ablation-style run: items evaluated once and persisted."""

    def __init__(self, config: ExperimentConfig, seed: int, run_dir: str, subdir: str, settings: Mapping):
        self.sr = SeedRun(config, config.spec(), seed, run_dir, subdir=subdir)
        self.config, self.seed, self.settings = config, seed, jsonable(dict(settings))
        self.file = os.path.join(self.sr.dir, "items.json")
        self.items: dict[str, dict] = {}
        if os.path.exists(self.file):
            with open(self.file) as f:
                saved = json.load(f)
            if saved.get("protocol") != config.protocol() or saved.get("settings") != self.settings:
                raise ValueError(f"{self.file} was written by another protocol or other settings; use another "
                                 "run directory (--run-dir)")
            self.items = saved.get("items", {})

    def save(self) -> None:
        atomic_write_json(self.file, {"protocol": self.config.protocol(), "settings": self.settings,
                                      "items": self.items})

    def item(self, name: str, compute) -> dict:
        """The stored item ``name`` or ``compute() -> {"validation": {task: acc}, "test": ..., "info"}``."""
        if name not in self.items:
            t0 = time.perf_counter()
            out = dict(compute())
            out.setdefault("info", {})["seconds"] = time.perf_counter() - t0
            self.items[name] = jsonable(out)
            self.save()
            v, t = out.get("validation"), out.get("test")
            _log(f"[{self.config.benchmark_name} seed {self.seed}] {name}: "
                 + (f"val {100 * np.mean(list(v.values())):.2f} " if v else "")
                 + (f"test {100 * np.mean(list(t.values())):.2f}" if t else ""), self.config.progress)
        return self.items[name]

    def both(self, params, **info) -> dict:
        return {"validation": self.sr.eval(params, "validation"), "test": self.sr.eval(params, "test"), "info": info}

    def searched(self, name: str, anchor: str, gram: str, grouping: str, trials: int, *, prior: str = "isotropic",
                 prep=None, **search_kw) -> dict:
        """A search's best model, evaluated (cached as item ``search|name``)."""
        def compute():
            res, cfg = self.sr.search(anchor, gram, grouping, trials, os.path.join(self.sr.dir, "search", name),
                                      prior=prior, prep=prep, **search_kw)
            return self.both(res.params, hparams=res.hparams, extras=res.extras, best_value=res.best_value,
                             anchor_value=res.anchor_value, kept_anchor=res.best_trial == 0,
                             num_trials=len(res.trials), grouping=grouping)
        return self.item(f"search|{name}", compute)


def _rec(ablation: str, setting: str, x, seed: int, split: str, per_task: Mapping[str, float], **extra) -> dict:
    return {"ablation": ablation, "setting": setting, "x": x, "seed": int(seed), "split": split,
            "accuracy": float(np.mean(list(per_task.values()))), "tasks": {t: float(v) for t, v in per_task.items()},
            **extra}


def _records(ablation: str, setting: str, x, seed: int, item: Mapping, **extra) -> list[dict]:
    return [_rec(ablation, setting, x, seed, split, item[split], **extra) for split in ("validation", "test")
            if item.get(split)]


def _search_name(anchor, gram, prior, grouping, trials, rho_only=False) -> str:
    return f"{anchor}-{gram}-{prior}-{grouping}-{trials}" + ("-rho_only" if rho_only else "")


def budget_curve(sr: SeedRun, res, cfg, anchor_params) -> list[dict]:
    """Per number of finished trials ``n`` (0 = the anchor alone): the best validation value so far
    and the test accuracies of that incumbent (evaluated once per distinct incumbent)."""
    from bmm_jax.search import build_space
    from bmm_jax.search.space import group_hparams, module_hparams
    space = build_space(sr._prep.labels, cfg)
    trials = [t for t in res.trials if t.id == 0 or t.state == "COMPLETED" or t.state == "INFEASIBLE"]
    test_cache: dict[int, dict] = {}
    best = None
    out = []
    for n, t in enumerate(trials):
        if t.value is not None and (best is None or t.value > best.value):
            best = t
        if best is None:
            continue
        if best.id not in test_cache:
            params = anchor_params if best.id == 0 else sr._prep.params(
                module_hparams(space, group_hparams(space, best.point)))
            test_cache[best.id] = sr.eval(params, "test")
        val = {k[len("acc/"):]: float(v) for k, v in best.metrics.items() if k.startswith("acc/")}
        out.append({"n": n, "incumbent": best.id, "validation": val, "test": test_cache[best.id]})
    return out


def run_ablations(config: ExperimentConfig, *, ablations: Sequence[str] = ABLATIONS, anchor: str = "task_arithmetic",
                  gram: str = "activations", trials: int | None = None, budget_trials: int = 64,
                  rho_sweep: Sequence[float] = RHO_SWEEP, run_dir: str | None = None) -> AblationResult:
    """Run the ablations (see the module docstring) for every seed of ``config``.

    Args:
      config: benchmark, seeds, selection protocol (validation subset, designer, Gram sizes,
        anchor scale grids) of the experiment.
      ablations: names from :data:`ABLATIONS`.
      anchor: the anchor BMM refines (its own scale chosen on validation over the config's grid).
      gram: Gram mode of every ablation but ``gram_grouping`` (which compares data-free Grams).
      trials: Vizier trials of every search (default ``config.module_trials``).
      budget_trials: length of the ``budget`` search.
      rho_sweep: shared ρ values (s = 1) of the ``prior`` sweep.
      run_dir: output directory (default ``<config run dir>/ablations``).

    Returns:
      :class:`AblationResult`.
    """
    bad = [a for a in ablations if a not in ABLATIONS]
    if bad or not ablations:
        raise ValueError(f"unknown ablations {bad}; expected some of {ABLATIONS}")
    trials = int(trials or config.module_trials)
    if trials < 1 or int(budget_trials) < 1:
        raise ValueError(f"trials and budget_trials must be positive, got {trials}, {budget_trials}")
    if any(not (math.isfinite(float(r)) and float(r) > 0) for r in rho_sweep):
        raise ValueError(f"rho_sweep must hold positive values, got {rho_sweep}")
    t_start = time.perf_counter()
    root = config.resolved_run_dir
    out_dir = os.path.abspath(run_dir or os.path.join(root, "ablations"))
    settings = {"anchor": anchor, "gram": gram, "trials": trials, "budget_trials": int(budget_trials),
                "rho_sweep": [float(r) for r in rho_sweep]}
    records: list[dict] = []
    details: dict = {"settings": settings, "seeds": {}}
    for seed in config.seeds:
        ir = ItemRun(config, seed, root, "ablations", settings)
        sr = ir.sr
        t_seed = time.perf_counter()
        main = _search_name(anchor, gram, "isotropic", "type", trials)

        def main_search():
            return ir.searched(main, anchor, gram, "type", trials)

        if "prior" in ablations:
            a = ir.item("prior|anchor", lambda: ir.both(sr.anchor(anchor)[0]))
            records += _records("prior", "ρ → ∞ (anchor)", None, seed, a)
            records += _records("prior", "searched", None, seed, main_search())
            z = ir.item("prior|zero", lambda: ir.both(sr.prep(anchor, gram).params({"rho": RHO_ZERO, "scale": 1.0})))
            records += _records("prior", f"ρ → 0 (ρ = {RHO_ZERO:g})", None, seed, z)
            for rho in rho_sweep:
                it = ir.item(f"prior|sweep|{float(rho)!r}",
                             lambda rho=rho: ir.both(sr.prep(anchor, gram).params({"rho": float(rho), "scale": 1.0})))
                records += _records("prior", "one shared ρ, s = 1", float(rho), seed, it)
        if "grouping" in ablations:
            for g in ALL_GROUPINGS:
                it = main_search() if g == "type" else ir.searched(
                    _search_name(anchor, gram, "isotropic", g, trials), anchor, gram, g, trials)
                records += _records("grouping", g, None, seed, it)
        if "budget" in ablations:
            def compute_budget():
                name = _search_name(anchor, gram, "isotropic", "type", budget_trials) + "-budget"
                res, cfg = sr.search(anchor, gram, "type", int(budget_trials), os.path.join(sr.dir, "search", name))
                return {"curve": budget_curve(sr, res, cfg, sr.anchor(anchor)[0]), "info": {"trials": len(res.trials)}}
            b = ir.item("budget", compute_budget)
            for pt in b["curve"]:
                records += _records("budget", "type grouping", pt["n"], seed, pt, incumbent=pt["incumbent"])
        if "rho_only" in ablations:
            records += _records("rho_only", "ρ and s per group", None, seed, main_search())
            it = ir.searched(_search_name(anchor, gram, "isotropic", "type", trials, True), anchor, gram, "type",
                             trials, scale_range=RHO_ONLY_BOX)
            records += _records("rho_only", "ρ only (s = 1)", None, seed, it)
        if "prior_kind" in ablations:
            records += _records("prior_kind", "isotropic", None, seed, main_search())
            it = ir.searched(_search_name(anchor, gram, "diagonal", "type", trials), anchor, gram, "type", trials,
                             prior="diagonal")
            records += _records("prior_kind", "diagonal", None, seed, it)
        if "gram_grouping" in ablations:
            for g, label in (("data_free", "per module"), ("data_free_group", "per input group (fused q/k/v)")):
                it = (main_search() if g == gram else
                      ir.searched(_search_name(anchor, g, "isotropic", "type", trials), anchor, g, "type", trials))
                records += _records("gram_grouping", label, None, seed, it)
        details["seeds"][str(seed)] = {"items": {k: v.get("info") for k, v in ir.items.items()},
                                       "timings": sr.timings, "seconds": time.perf_counter() - t_seed}
        ir = sr = None     # free this seed's experts and factors before the next
    title = f"{config.benchmark_name}: ablations of BMM ({anchor} anchor, {gram} Grams), seeds {list(config.seeds)}"
    return finish_run(records, out_dir, title, details, config, "ablations", t_start)


def finish_run(records, out_dir, title: str, details: dict, config, name: str, t_start: float) -> "AblationResult":
    """Write a runner's records (table, JSON, plots under ``name``) and return its :class:`AblationResult`."""
    seconds = time.perf_counter() - t_start
    details["seconds"] = seconds
    files = write_ablations(records, out_dir, title=title, details=details, config=config, plots=config.plots,
                            name=name)
    with open(files["table"]) as f:
        table = f.read()
    return AblationResult(records, table, out_dir, files, details, seconds)


# ----------------------------------------------------------------------------- tables and files
def _pm(m, s, n) -> str:
    if not math.isfinite(m):
        return "–"
    return f"{100 * m:.1f}" if n <= 1 else f"{100 * m:.1f} ± {100 * s:.1f}"


def format_ablation_table(records: Sequence[Mapping], ablation: str, *, xlabel: str = "x") -> str:
    """Markdown table of one ablation: per setting (and ``x``), validation and test accuracy (%,
    mean over tasks; mean ± std over seeds)."""
    from bmm_jax.experiment.plots import aggregate
    val, test = aggregate(records, ablation, "validation"), aggregate(records, ablation, "test")
    keys = list(dict.fromkeys((r["setting"], r.get("x")) for r in records if r["ablation"] == ablation))
    with_x = any(x is not None for _, x in keys)
    head = ["setting"] + ([xlabel] if with_x else []) + ["validation (%)", "test (%)"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for k in keys:
        v, t = val.get(k, (math.nan, math.nan, 0)), test.get(k, (math.nan, math.nan, 0))
        cells = [k[0]] + ([("–" if k[1] is None else f"{k[1]:g}")] if with_x else []) + [_pm(*v), _pm(*t)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


DESCRIPTIONS = {
    "prior": ("Prior strength", "ρ → ∞ returns the anchor; ρ → 0 drops the prior (RegMean-like with activation "
              "Grams); the sweep uses one shared ρ with s = 1.", "ρ"),
    "grouping": ("Hyper-parameter grouping", "one (ρ, s) per group; same trial budget for every grouping.", "x"),
    "budget": ("Trial budget", "after n trials (0 = the anchor alone): the best validation value and the test "
               "accuracy of that incumbent.", "trials"),
    "rho_only": ("ρ only vs (ρ, s)", "ρ only pins the assembly scale s at 1.", "x"),
    "prior_kind": ("Isotropic vs diagonal prior", "diagonal: λ·diag(S)/mean(diag S) in place of λI.", "x"),
    "gram_grouping": ("Data-free Grams per module vs per input group", "per input group: q, k and v share one "
                      "Gram from their concatenated task kernels (the fused qkv weight solved as one problem).", "x"),
    "fewshot": ("Few-shot hybrid Grams", "hybrid Grams from n unlabeled inputs per task, β searched with (ρ, s); "
                "references: data-free Grams and full activation Grams.", "shots per task"),
}


def write_ablations(records: Sequence[Mapping], out_dir: str, *, title: str, details: Mapping,
                    config: ExperimentConfig, plots: bool = True, name: str = "ablations",
                    references: Mapping[str, Mapping[str, tuple]] | None = None) -> dict:
    """``<name>.json`` (``{"benchmark", "title", "settings", "records", "details", "seconds", "protocol"}``), ``<name>.md``
    (a table per ablation) and ``ablation_<ablation>.png`` (``<name>.png`` for a single one)."""
    from bmm_jax.experiment.plots import aggregate, plot_ablation_bars, plot_curve
    os.makedirs(out_dir, exist_ok=True)
    files = {"json": os.path.join(out_dir, f"{name}.json"), "table": os.path.join(out_dir, f"{name}.md")}
    present = list(dict.fromkeys(r["ablation"] for r in records))
    parts = [f"# {title}", "",
             f"Accuracy (%) = mean over tasks, mean ± std over seeds; every choice made on "
             f"{config.validation_examples or 'all'} validation examples per task.", ""]
    for ab in present:
        head, text, xlabel = DESCRIPTIONS.get(ab, (ab, "", "x"))
        parts += [f"## {head}", "", text, "", format_ablation_table(records, ab, xlabel=xlabel), ""]
    atomic_write_text(files["table"], "\n".join(parts))
    atomic_write_json(files["json"], {"benchmark": config.benchmark_name, "title": title,
                                      "settings": jsonable(details.get("settings")), "records": list(records),
                                      "details": jsonable(details), "seconds": details.get("seconds"),
                                      "protocol": config.protocol()})
    if plots:
        for ab in present:
            path = os.path.join(out_dir, f"ablation_{ab}.png" if name == "ablations" else f"{name}.png")
            head = DESCRIPTIONS.get(ab, (ab,))[0]
            if ab == "prior":
                test = aggregate(records, ab, "test")
                refs = {k[0] + " (test)": v[:2] for k, v in test.items() if k[1] is None}
                plot_curve(records, ab, path, xlabel="ρ (shared, s = 1)", title=f"{title}\n{head}", logx=True,
                           references=refs)
            elif ab == "budget":
                plot_curve(records, ab, path, xlabel="trials", title=f"{title}\n{head}")
            elif ab == "fewshot":
                test = aggregate(records, ab, "test")
                refs = {k[0] + " (test)": v[:2] for k, v in test.items() if k[1] is None}
                plot_curve(records, ab, path, xlabel="unlabeled calibration inputs per task", title=f"{title}\n{head}",
                           logx=True, base=2, references=refs)
            else:
                plot_ablation_bars(records, ab, path, title=f"{title}\n{head}")
            files[f"plot_{ab}"] = path
    return files


__all__ = ["ABLATIONS", "ALL_GROUPINGS", "RHO_SWEEP", "RHO_ZERO", "AblationResult", "run_ablations",
           "data_free_group_grams", "format_ablation_table", "write_ablations", "budget_curve", "ItemRun"]
