"""``bmm-merge``: Bayesian Model Merging of your own checkpoints into one orbax checkpoint.

Examples::

    # data-free BMM around Task Arithmetic, fixed hyper-parameters
    bmm-merge --base bert-base/ --experts ft-a/ ft-b/ ft-c/ --anchor task_arithmetic --anchor-scale 0.3 \\
              --rho 0.3 --scale 1.0 --out merged/

    # activation Grams from 256 train inputs per task, module-wise search on validation data
    bmm-merge --base minilm --experts ~/.cache/bmm_jax/experts/minilm5/{mr,bbc}/seed0 --anchor tsv \\
              --grams activations --calibration mr bbc --search --validation mr bbc --out merged/

Inputs (``--base`` / ``--experts`` / ``--model``):

* a HF Flax model folder (``config.json`` + ``flax_model.msgpack`` or ``model.safetensors``; the
  family comes from ``config.json``'s ``model_type`` or ``--family``);
* a bmm_jax orbax checkpoint folder (:mod:`bmm_jax.checkpoint`: ``metadata.json`` + ``params/``)
  holding a params tree, ``{"params": tree, "head": head}`` or the expert cache's
  ``{"encoder": trainable leaves, "head": head}`` (leaves it omits, the frozen ones, are taken from
  the base); an expert cache folder ``.../<task>/seed<s>`` (its ``ckpt/``) works too;
* (``--base`` / ``--model`` only) a built-in pretrained model: ``minilm`` (all-MiniLM-L6-v2) or
  ``effnet-lite0``.

HF folders of PyTorch-named safetensors (what the Hub stores: Llama, Mistral, Qwen2, Gemma, GPT-2...)
as --base and --experts are merged file to file, tensor by tensor, with
:func:`bmm_jax.streaming.merge_checkpoints` (memory follows the largest module, not the model) into
an HF folder (``--out-format hf``, the default there; ``orbax`` possible); ``--anchor-only`` writes
the anchor merge itself; ``--coordinator HOST:PORT --num-processes N --process-id I`` shares the
tensors between N processes (``jax.distributed``), one consistent output.

Outputs: the merged params tree as an orbax checkpoint at ``--out`` (written atomically:
:func:`bmm_jax.checkpoint.save`) and a JSON report (``--report``, default ``<out>.json``).
Outputs are checked before anything is loaded: ``--out`` must be new, empty or a previous bmm_jax
checkpoint (``--overwrite`` replaces any other folder), the report a new file or a previous report,
and no output (``--out``, ``--report``, ``--run-dir``) may be, contain or lie inside an input; their
folders must be writable.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from typing import Any, NamedTuple, Sequence

import numpy as np

from bmm_jax.cli._common import DefaultsFormatter, Parser, UsageError, run_main

PROG = "bmm-merge"
GRAM_MODES = ("data_free", "activations", "hybrid")
SCALED_ANCHORS = ("task_arithmetic", "ties", "tsv", "iso_c", "iso_cts")
BUILTIN_MODELS = ("minilm", "effnet-lite0")
HF_MODEL_TYPES = {"bert": "bert", "roberta": "roberta", "gpt2": "gpt2", "vit": "vit",
                  "clip_vision_model": "clip_vision"}


# ============================================================================ parser
def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog=PROG,
        description="Merge K fine-tuned experts of one base model with Bayesian Model Merging: per linear "
                    "module, a closed-form regression onto the experts under a Gaussian prior centred on an "
                    "anchor merge (TA, TIES, TSV-M, WUDI, ...), with Gram matrices from activations, from the "
                    "task vectors (data-free) or both; hyper-parameters fixed or searched with Vizier on "
                    "validation data. HF safetensors folders (Llama, Mistral, Qwen2, Gemma, GPT-2, BERT, ...) are "
                    "merged streaming, tensor by tensor, file to file, into an HF folder; other inputs into an "
                    "orbax checkpoint; a JSON report beside the output.",
        epilog="Inputs are HF model folders (PyTorch-named safetensors shards are streamed; Flax folders are "
               "loaded whole), bmm_jax orbax checkpoints (bmm_jax.checkpoint; also the "
               "expert cache's <task>/seed<s> folders) or, for --base/--model, the built-in names minilm and "
               "effnet-lite0. Errors exit with status 1 (2 for a bad command line) and one line on stderr.",
        formatter_class=DefaultsFormatter)
    io = p.add_argument_group("models")
    io.add_argument("--base", required=True, help="the pretrained model theta_0 the experts were fine-tuned from")
    io.add_argument("--experts", required=True, nargs="+", metavar="PATH",
                    help="K >= 2 fine-tuned models with the base's parameter tree (one per task)")
    io.add_argument("--family", default=None, choices=sorted(set(HF_MODEL_TYPES.values())),
                    help="HF model family (default: from config.json's model_type)")
    io.add_argument("--model", default=None,
                    help="architecture to run for activation Grams / validation when --base is an orbax "
                         "checkpoint: a HF folder (config.json) or a built-in name (default: --base itself)")
    io.add_argument("--max-length", type=int, default=64, help="text models: tokens per sequence")
    io.add_argument("--out", required=True, help="output folder of the merged orbax checkpoint (replaced atomically "
                                                 "if it holds a previous checkpoint; refused if it holds anything else)")
    io.add_argument("--overwrite", action="store_true",
                    help="replace --out / --report even if they hold other files (never an input)")
    io.add_argument("--report", default=None, help="JSON report path (default: <out>.json)")

    m = p.add_argument_group("merge")
    m.add_argument("--anchor", default="task_arithmetic",
                   help="anchor method: average, task_arithmetic, ties, tsv (TSV-M), iso_c, iso_cts, wudi, regmean")
    m.add_argument("--anchor-scale", type=float, default=None,
                   help="the anchor's own scale (task_arithmetic 0.3, ties/tsv/iso_c/iso_cts 1.0 by default)")
    m.add_argument("--anchor-scale-grid", type=float, nargs="+", default=None, metavar="SCALE",
                   help="choose the anchor's scale on --validation data among these values (instead of "
                        "--anchor-scale)")
    m.add_argument("--grams", default="data_free",
                   help="Gram estimator: data_free (from the task vectors, no data), activations (module "
                        "inputs of expert k on --calibration data of task k), hybrid (both, mixed by --beta)")
    m.add_argument("--calibration", nargs="+", default=None, metavar="SOURCE",
                   help="unlabeled inputs per expert for activations/hybrid Grams (and regmean): a bmm_jax "
                        "dataset name (its train split) or a file (.txt one text per line, .npy inputs, "
                        ".npz with 'inputs', .jsonl/.csv with a 'text' column)")
    m.add_argument("--calibration-examples", type=int, default=256,
                   help="calibration inputs per expert (a seeded random subset)")
    m.add_argument("--calibration-model", choices=("expert", "base"), default="expert",
                   help="which model runs on the calibration inputs of task k")
    m.add_argument("--beta", type=float, default=0.5, help="hybrid Grams: weight of the data Gram in [0, 1]")
    m.add_argument("--rho", type=float, default=1.0, help="fixed relative prior strength rho >= 0 (every module)")
    m.add_argument("--scale", type=float, default=1.0, help="fixed assembly scale s (every module)")
    m.add_argument("--hparams", default=None,
                   help="per-group fixed hyper-parameters: a JSON object or file, e.g. "
                        "'{\"q\": {\"rho\": 1}, \"global\": {\"rho\": 0.3, \"scale\": 1.1}}' (overrides --rho/--scale)")
    m.add_argument("--carry", choices=("anchor", "base", "mean"), default="anchor",
                   help="where leaves that are not regressed modules come from")
    m.add_argument("--prior", choices=("isotropic", "diagonal"), default="isotropic", help="prior covariance")

    st = p.add_argument_group("streaming (HF safetensors inputs: merged tensor by tensor, file to file)")
    st.add_argument("--out-format", choices=("hf", "orbax"), default=None,
                    help="output: an HF folder (safetensors shards + index + config) or an orbax checkpoint "
                         "(default: hf when --base and --experts are PyTorch-named safetensors folders, which are "
                         "then merged streaming with bmm_jax.streaming.merge_checkpoints; orbax otherwise)")
    st.add_argument("--anchor-only", action="store_true",
                    help="streamed merges: write the anchor merge itself (average, TA, TIES...), no BMM")
    st.add_argument("--max-shard-size", default="5GB", help="streamed merges: largest output shard ('5GB', '2GiB')")
    st.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                    help="run as one of --num-processes processes (jax.distributed); process 0 serves HOST:PORT")
    st.add_argument("--num-processes", type=int, default=None, help="number of processes (with --coordinator)")
    st.add_argument("--process-id", type=int, default=None, help="this process's index in [0, N) (with --coordinator)")

    s = p.add_argument_group("search (Vizier, on validation data)")
    s.add_argument("--search", action="store_true",
                   help="search (rho, s) per group with Bayesian optimisation on --validation instead of fixed values")
    s.add_argument("--validation", nargs="+", default=None, metavar="SOURCE",
                   help="labeled validation data per expert: a bmm_jax dataset name (its validation split) or a "
                        "file (.npz with 'inputs' and 'labels', .jsonl/.csv with 'text' and 'label')")
    s.add_argument("--heads", nargs="+", default=None, metavar="PATH",
                   help="classification head per expert ({kernel [d, C], bias [C]}): .npz or orbax checkpoint "
                        "(default: the heads stored in the expert checkpoints)")
    s.add_argument("--validation-examples", type=int, default=128, help="validation examples per expert")
    s.add_argument("--grouping", choices=("global", "type", "block", "module"), default="type",
                   help="hyper-parameter groups of the search")
    s.add_argument("--trials", type=int, default=24, help="Vizier trials")
    s.add_argument("--designer", default="gp_bandit", help="Vizier designer (gp_bandit, gp_ucb_pe, quasi_random, random)")
    s.add_argument("--batch-size", type=int, default=4,
                   help="trials per search step: that many suggestions built with one vmapped Prepared.params and "
                        "evaluated together (memory: that many merged models); 1 = one trial at a time")
    s.add_argument("--run-dir", default=None, help="search directory (Vizier study, reports; resumable) "
                                                    "(default: <out>-search)")
    s.add_argument("--seed", type=int, default=0, help="seed of the search and of the calibration subsets")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


# ============================================================================ loading
class Loaded(NamedTuple):
    """A model given on the command line."""
    params: Any
    head: dict | None
    kind: str                 # "hf" | "orbax" | "builtin"
    source: str
    partial: bool = False     # orbax {"encoder": ...}: frozen leaves omitted
    adapter: Any = None       # built-in adapter
    hf: tuple | None = None   # (family, model) of a HF folder


def _hf_family(path: str, family: str | None) -> str:
    if family is not None:
        return family
    try:
        with open(os.path.join(path, "config.json")) as f:
            mt = json.load(f).get("model_type")
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {os.path.join(path, 'config.json')}: {e}") from None
    if mt not in HF_MODEL_TYPES:
        raise ValueError(f"{path}: unsupported HF model_type {mt!r}; supported: {sorted(HF_MODEL_TYPES)} "
                         "(or pass --family)")
    return HF_MODEL_TYPES[mt]


def _builtin(name: str):
    if name == "minilm":
        from bmm_jax.models.minilm import minilm_adapter
        return minilm_adapter()
    try:
        from bmm_jax.models.effnet_adapter import effnet_adapter
    except ImportError as e:
        raise ValueError(f"built-in model {name!r} is not available in this installation ({e})") from None
    return effnet_adapter()


def _unwrap(tree) -> tuple[Any, dict | None, bool]:
    if isinstance(tree, dict) and "params" in tree and set(tree) <= {"params", "head"}:
        return tree["params"], tree.get("head"), False
    if isinstance(tree, dict) and "encoder" in tree and set(tree) <= {"encoder", "head"}:
        return tree["encoder"], tree.get("head"), True
    return tree, None, False


def load_model(src: str, role: str, *, family: str | None = None, allow_builtin: bool = False) -> Loaded:
    """Load ``src`` (see the module docstring); ``role`` names it in error messages."""
    from bmm_jax import checkpoint
    if allow_builtin and src in BUILTIN_MODELS:
        ad = _builtin(src)
        return Loaded(ad.params, None, "builtin", src, adapter=ad)
    if not os.path.exists(src):
        raise FileNotFoundError(f"{role} checkpoint folder not found: {src}")
    if not os.path.isdir(src):
        raise NotADirectoryError(f"{role} {src} is not a folder (expected a HF model folder or an orbax checkpoint)")
    ck = src
    if not os.path.isfile(os.path.join(ck, "metadata.json")) and os.path.isfile(os.path.join(src, "ckpt", "metadata.json")):
        ck = os.path.join(src, "ckpt")
    if os.path.isfile(os.path.join(ck, "metadata.json")):
        params, head, partial = _unwrap(checkpoint.load(ck))
        return Loaded(params, head, "orbax", src, partial)
    if os.path.isfile(os.path.join(src, "config.json")):
        from bmm_jax.models.hf import load_hf_model
        fam = _hf_family(src, family)
        model, params = load_hf_model(fam, path=src)
        return Loaded(params, None, "hf", src, hf=(fam, model))
    raise ValueError(f"{role} {src} is neither a bmm_jax orbax checkpoint (metadata.json + params/) nor a HF "
                     "model folder (config.json)")


def complete_expert(loaded: Loaded, base, index: int):
    """The expert's params with the base's tree; a partial (expert-cache) checkpoint gets its omitted
    (frozen) leaves from the base. Returns ``(params, filled leaf count)``."""
    if not loaded.partial:
        return loaded.params, 0
    import jax
    from flax import traverse_util
    from bmm_jax._tree import path_str
    flat = traverse_util.flatten_dict(loaded.params, sep="/") if isinstance(loaded.params, dict) else {}
    base_paths = {path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(base)[0]}
    extra = sorted(set(flat) - base_paths)
    if extra or not flat:
        raise ValueError(f"expert {index} ({loaded.source}) does not match the base: leaves not in the base "
                         f"{extra[:3]}" if extra else f"expert {index} ({loaded.source}) holds no parameters")
    filled = len(base_paths - set(flat))
    return jax.tree_util.tree_map_with_path(lambda p, b: flat.get(path_str(p), b), base), filled


def check_heads(heads: Sequence[dict], feature_dim: int | None, sources: Sequence[str]) -> list[dict]:
    out = []
    for k, (h, src) in enumerate(zip(heads, sources)):
        if not isinstance(h, dict) or "kernel" not in h or "bias" not in h:
            raise ValueError(f"head of expert {k} ({src}) must be {{'kernel': [d, C], 'bias': [C]}}")
        kern = np.asarray(h["kernel"], np.float32)
        bias = np.asarray(h["bias"], np.float32)
        if kern.ndim != 2 or bias.shape != (kern.shape[1],) or kern.shape[1] < 2:
            raise ValueError(f"head of expert {k} ({src}): kernel {kern.shape} and bias {bias.shape} are not "
                             "[d, C] and [C] with C >= 2")
        if feature_dim is not None and kern.shape[0] != feature_dim:
            raise ValueError(f"head of expert {k} ({src}) reads {kern.shape[0]} features but the model gives "
                             f"{feature_dim}")
        out.append({"kernel": kern, "bias": bias})
    return out


def load_head(src: str, index: int) -> dict:
    """A head ``{kernel, bias}`` from an ``.npz`` file or an orbax checkpoint (a head tree, or an
    expert checkpoint storing ``head``)."""
    if not os.path.exists(src):
        raise FileNotFoundError(f"head file of expert {index} not found: {src}")
    if src.endswith(".npz"):
        with np.load(src) as z:
            if "kernel" not in z or "bias" not in z:
                raise ValueError(f"head file {src} must hold arrays 'kernel' and 'bias', has {sorted(z.files)}")
            return {"kernel": z["kernel"], "bias": z["bias"]}
    lm = load_model(src, f"head of expert {index}")
    if lm.head is not None:
        return lm.head
    tree = lm.params
    return tree["head"] if isinstance(tree, dict) and "head" in tree else tree


# ============================================================================ data
def _read_table(path: str) -> tuple[list, list | None]:
    texts, labels = [], []
    if path.endswith(".jsonl"):
        with open(path) as f:
            rows = [json.loads(l) for l in f if l.strip()]
    else:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f, delimiter="\t" if path.endswith(".tsv") else ","))
    for i, r in enumerate(rows):
        t = r.get("text", r.get("input"))
        if t is None:
            raise ValueError(f"{path}: row {i + 1} has no 'text' (or 'input') field")
        texts.append(t)
        if "label" in r and r["label"] not in (None, ""):
            labels.append(int(r["label"]))
    if labels and len(labels) != len(texts):
        raise ValueError(f"{path}: {len(texts)} rows but only {len(labels)} labels")
    return texts, (labels or None)


def read_source(src: str, split: str, role: str) -> tuple[Any, np.ndarray | None]:
    """``(inputs, labels or None)`` of a dataset name (``split``) or a file."""
    from bmm_jax.data import DATASETS
    if os.path.isfile(src):
        if src.endswith(".txt"):
            with open(src) as f:
                return [l.rstrip("\n") for l in f if l.strip()], None
        if src.endswith(".npy"):
            return np.load(src), None
        if src.endswith(".npz"):
            with np.load(src) as z:
                key = next((k for k in ("inputs", "x", "input_ids", "images") if k in z), None)
                if key is None:
                    raise ValueError(f"{role} file {src} has no 'inputs' array (has {sorted(z.files)})")
                lab = next((z[k] for k in ("labels", "y") if k in z), None)
                return z[key], None if lab is None else np.asarray(lab)
        if src.endswith((".jsonl", ".csv", ".tsv")):
            texts, labels = _read_table(src)
            return texts, None if labels is None else np.asarray(labels)
        raise ValueError(f"{role} file {src}: unsupported format (use .txt, .npy, .npz, .jsonl, .csv, .tsv)")
    if src in DATASETS:
        from bmm_jax import data, experts
        # the benchmarks' loader (images rescaled to 0..255 as the experts were trained) if present
        load = getattr(experts, "scaled_image_load", data.load)
        x, y = load(src, split)
        return x, np.asarray(y)
    raise FileNotFoundError(f"{role} {src!r} is neither a file nor a bmm_jax dataset ({', '.join(DATASETS)})")


def check_labels(labels, num_classes: int, role: str) -> np.ndarray:
    if labels is None:
        raise ValueError(f"{role} has no labels")
    y = np.asarray(labels)
    if y.ndim != 1 or not (np.issubdtype(y.dtype, np.integer) or (y.size and np.all(np.mod(y, 1) == 0))):
        raise ValueError(f"{role}: labels must be a 1-D array of integer class ids, got {y.dtype}{y.shape}")
    y = y.astype(np.int64)
    bad = sorted({int(v) for v in y if v < 0 or v >= num_classes})
    if bad:
        raise ValueError(f"{role} has labels {bad[:5]}{' ...' if len(bad) > 5 else ''} outside the head's "
                         f"{num_classes} classes (0..{num_classes - 1})")
    return y.astype(np.int32)


def _subset(x, n: int | None, seed: int):
    from bmm_jax.experiment import subset_indices
    idx = subset_indices(len(x), n, seed)
    return x[idx] if isinstance(x, np.ndarray) else [x[i] for i in idx]


# ============================================================================ the merge
def _adapter(args, base: Loaded):
    """The model adapter for activation capture and evaluation (or None if it cannot be built)."""
    if base.adapter is not None and args.model is None:
        return base.adapter
    src = args.model
    if src is None:
        if base.kind != "hf":
            return None
        fam, model = base.hf
        from bmm_jax.models.hf import hf_adapter
        return hf_adapter(fam, model=model, params=base.params, path=base.source, max_length=args.max_length)
    if src in BUILTIN_MODELS:
        return _builtin(src)
    if not os.path.isdir(src) or not os.path.isfile(os.path.join(src, "config.json")):
        raise FileNotFoundError(f"--model folder not found or without config.json: {src}")
    from bmm_jax.models.hf import hf_adapter, load_hf_model
    fam = _hf_family(src, args.family)
    model, params = load_hf_model(fam, path=src)
    return hf_adapter(fam, model=model, params=base.params, path=src, max_length=args.max_length)


def _need_adapter(adapter, what: str):
    if adapter is None:
        raise ValueError(f"{what} needs a model to run: give --base as a HF folder or a built-in name "
                         f"({', '.join(BUILTIN_MODELS)}), or --model")
    return adapter


def _parse_hparams(args) -> dict:
    if args.hparams is None:
        from bmm_jax.solve import check_rho
        check_rho(args.rho, where=" (--rho)")
        return {"rho": float(args.rho), "scale": float(args.scale)}
    text = args.hparams
    if os.path.isfile(text):
        with open(text) as f:
            text = f.read()
    try:
        hp = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--hparams is neither a JSON object nor a JSON file: {e}") from None
    if not isinstance(hp, dict):
        raise ValueError("--hparams must be a JSON object")
    return hp


def validate_args(args) -> None:
    from bmm_jax import anchors
    anchors.get(args.anchor)  # unknown anchor method -> ValueError naming it
    if args.grams not in GRAM_MODES:
        raise ValueError(f"unknown Gram method {args.grams!r}; expected one of {', '.join(GRAM_MODES)}")
    k = len(args.experts)
    if k < 2:
        raise ValueError(f"need at least 2 experts to merge, got {k}")
    if args.anchor_scale is not None and args.anchor not in SCALED_ANCHORS:
        raise ValueError(f"anchor {args.anchor!r} has no scale; --anchor-scale applies to {', '.join(SCALED_ANCHORS)}")
    if args.anchor_scale_grid is not None:
        if args.anchor not in SCALED_ANCHORS:
            raise ValueError(f"anchor {args.anchor!r} has no scale to choose (--anchor-scale-grid)")
        if args.validation is None:
            raise ValueError("--anchor-scale-grid needs --validation data to choose the scale on")
    needs_cal = args.grams in ("activations", "hybrid") or args.anchor == "regmean"
    if needs_cal and args.calibration is None:
        raise ValueError(f"--grams {args.grams}{' / --anchor regmean' if args.anchor == 'regmean' else ''} needs "
                         "--calibration data: one source per expert")
    for name, vals in (("--calibration", args.calibration), ("--validation", args.validation), ("--heads", args.heads)):
        if vals is not None and len(vals) != k:
            raise ValueError(f"{name} needs one entry per expert: got {len(vals)} for {k} experts")
    if args.search and args.validation is None:
        raise ValueError("--search needs --validation data (one labeled source per expert)")
    for name in ("calibration_examples", "validation_examples", "trials", "batch_size", "max_length"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if not 0.0 <= args.beta <= 1.0:
        raise ValueError(f"--beta must be in [0, 1], got {args.beta}")
    if args.search:
        from bmm_jax.search import DESIGNERS
        if args.designer not in DESIGNERS:
            raise ValueError(f"unknown designer {args.designer!r}; expected one of {', '.join(DESIGNERS)}")
    check_outputs(args)


# ============================================================================ outputs
def _real(p: str) -> str:
    return os.path.realpath(os.path.abspath(os.path.expanduser(str(p))))


def _relation(out: str, src: str) -> str | None:
    """How the (real) path ``out`` overlaps ``src``: "is", "contains", "lies inside" or None."""
    if out == src:
        return "is"
    if src.startswith(out.rstrip(os.sep) + os.sep):
        return "contains"
    if out.startswith(src.rstrip(os.sep) + os.sep):
        return "lies inside"
    return None


def _probe_writable(path: str, role: str) -> None:
    """Create and remove a folder in ``path``'s nearest existing ancestor (nothing else is created)."""
    import tempfile
    anc = os.path.dirname(os.path.abspath(path))
    while not os.path.lexists(anc):
        anc = os.path.dirname(anc)
    if not os.path.isdir(anc):
        raise ValueError(f"{role} {path}: {anc} is not a folder")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".bmm-merge-probe-", dir=anc))
    except OSError as e:
        raise ValueError(f"{role} {path}: cannot write in {anc} ({e.strerror or e})") from None


def _is_report(path: str) -> bool:
    try:
        with open(path) as f:
            rep = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(rep, dict) and {"out", "checksum", "argv"} <= set(rep)


def check_outputs(args) -> None:
    """Refuse outputs that would replace, delete or write into an input or a user's files, and
    outputs that cannot be written; run before anything is loaded or merged."""
    from bmm_jax import checkpoint
    # every argument naming an existing file or folder is an input (options added later included)
    inputs = []
    for name, value in sorted(vars(args).items()):
        if name in ("out", "report", "run_dir") or name.startswith("_"):
            continue
        values = value if isinstance(value, (list, tuple)) else [value]
        many = isinstance(value, (list, tuple))
        for k, v in enumerate(values):
            if isinstance(v, (str, os.PathLike)) and str(v) and os.path.lexists(v):
                inputs.append((f"--{name.replace('_', '-')}" + (f" ({k})" if many else ""), str(v), _real(v), True))
    if args.base in BUILTIN_MODELS or args.model in BUILTIN_MODELS:     # the cache it may load from
        from bmm_jax.data.paths import cache_dir
        inputs.append(("the bmm_jax cache", str(cache_dir()), _real(cache_dir()), False))
    report = args.report or os.path.abspath(args.out).rstrip(os.sep) + ".json"
    outputs = [("--out", args.out), ("--report", report)]
    if args.search:
        outputs.append(("--run-dir", args.run_dir or os.path.abspath(args.out).rstrip(os.sep) + "-search"))
    for opt, path in outputs:
        for role, src, real, strict in inputs:
            rel = _relation(_real(path), real)
            if rel is not None and (strict or rel != "lies inside"):
                raise ValueError(f"{opt} {path} {rel} the input {src} ({role}); choose a path outside the inputs")
    out = _real(args.out)
    for opt, path in outputs[1:]:
        rel = _relation(_real(path), out)
        if rel is not None:
            raise ValueError(f"{opt} {path} {rel} --out {args.out} (replaced as a whole when written); "
                             "choose a path outside it")
    overwrite = bool(getattr(args, "overwrite", False))
    checkpoint.check_target(args.out, overwrite=overwrite, what="--out", how="pass --overwrite")
    if os.path.isdir(report):
        raise ValueError(f"--report {report} is a folder; give a file name")
    if os.path.lexists(report) and not overwrite and not _is_report(report):
        raise ValueError(f"refusing to replace --report {report}: it is not a bmm-merge report; choose another "
                         "path, or pass --overwrite to replace it")
    for opt, path in outputs:
        if opt == "--run-dir" and os.path.lexists(path):
            if not os.path.isdir(path):
                raise ValueError(f"--run-dir {path} exists and is not a folder")
            from bmm_jax.search.study import check_run_dir
            check_run_dir(path)              # a damaged or missing study fails now, not after the merge
            _probe_writable(os.path.join(path, "x"), opt)
        else:
            _probe_writable(path, opt)


def run(args) -> dict:
    import jax
    import bmm_jax
    from bmm_jax import anchors as A
    from bmm_jax import checkpoint
    from bmm_jax import grams as G
    from bmm_jax._tree import check_experts
    from bmm_jax.experiment import atomic_write_json, batches_of, rescale

    if _streamed(args):
        return _run_streamed(args)
    if getattr(args, "out_format", None) == "hf" or getattr(args, "coordinator", None) is not None:
        raise ValueError("--out-format hf and --coordinator need --base and --experts as HF folders of PyTorch-named "
                         "safetensors (what the Hub stores); these inputs merge in memory into an orbax checkpoint")
    t_start = time.perf_counter()
    progress = not args.quiet
    validate_args(args)
    hparams_fixed = None if args.search else _parse_hparams(args)
    timings: dict[str, float] = {}

    # ---------------------------------------------------------------- models
    t0 = time.perf_counter()
    base = load_model(args.base, "base", family=args.family, allow_builtin=True)
    experts_loaded = [load_model(e, f"expert {k}", family=args.family) for k, e in enumerate(args.experts)]
    experts, filled = [], []
    for k, e in enumerate(experts_loaded):
        p, n = complete_expert(e, base.params, k)
        experts.append(p)
        filled.append(n)
    try:
        experts = check_experts(base.params, experts)
    except (ValueError, TypeError) as e:
        msg = str(e)
        for k, src in enumerate(args.experts):
            msg = msg.replace(f"expert {k} ", f"expert {k} ({src}) ", 1) if msg.startswith(f"expert {k} ") else msg
        raise type(e)(f"mismatched experts: {msg}") from None
    timings["load"] = time.perf_counter() - t0
    needs_model = args.grams != "data_free" or args.anchor == "regmean" or args.validation is not None
    adapter = _adapter(args, base) if needs_model else None
    labels = adapter.labels if adapter is not None else bmm_jax.build_labels(base.params)
    names = [f"expert{k}" for k in range(len(experts))]

    # ---------------------------------------------------------------- Grams
    t0 = time.perf_counter()
    act = None
    if args.grams in ("activations", "hybrid") or args.anchor == "regmean":
        adapter = _need_adapter(adapter, "activation Grams")
        n_cal = args.calibration_examples
        streams = []
        for k, src in enumerate(args.calibration):
            x, _ = read_source(src, "train", f"calibration source of expert {k}")
            if len(x) == 0:
                raise ValueError(f"calibration source {src!r} of expert {k} is empty")
            streams.append(batches_of(adapter, _subset(x, n_cal, args.seed + k), min(32, n_cal)))
        run_params = experts if args.calibration_model == "expert" else [base.params] * len(experts)
        act = G.activations(adapter, run_params, streams, labels=labels, progress=progress)
    if args.grams == "activations":
        grams = act
    elif args.grams == "hybrid":
        grams = G.hybrid(act, G.data_free(base.params, experts, labels), beta=args.beta)
    else:
        grams = G.data_free(base.params, experts, labels)
    timings["grams"] = time.perf_counter() - t0

    # ---------------------------------------------------------------- validation data
    heads, evaluate = None, None
    if args.validation is not None:
        adapter = _need_adapter(adapter, "--validation")
        if args.heads is not None:
            raw_heads = [load_head(h, k) for k, h in enumerate(args.heads)]
            srcs = args.heads
        else:
            missing = [k for k, e in enumerate(experts_loaded) if e.head is None]
            if missing:
                raise ValueError(f"--validation needs a classification head per expert: experts {missing} store "
                                 "none; pass --heads")
            raw_heads, srcs = [e.head for e in experts_loaded], args.experts
        heads = dict(zip(names, check_heads(raw_heads, adapter.feature_dim, srcs)))
        val = {}
        for k, src in enumerate(args.validation):
            x, y = read_source(src, "validation", f"validation set {src!r} of expert {k}")
            y = check_labels(y, heads[names[k]]["kernel"].shape[1], f"validation set {src!r} of expert {k}")
            if len(x) != len(y) or len(y) == 0:
                raise ValueError(f"validation set {src!r} of expert {k}: {len(x)} inputs and {len(y)} labels")
            val[names[k]] = (x, y)
        from bmm_jax.evaluate import evaluate as _ev
        batch = 32 if adapter.length_buckets else 256

        def evaluate(params):
            return _ev(adapter, params, heads, names, split="validation", batch_size=batch,
                       max_examples=args.validation_examples, load=lambda task, split: val[task])

    # ---------------------------------------------------------------- anchor
    t0 = time.perf_counter()
    fn = A.get(args.anchor)
    kw = {}
    if args.anchor in ("tsv", "iso_c", "iso_cts", "wudi", "regmean"):
        kw["labels"] = labels
    if args.anchor == "regmean":
        kw["grams"] = act
    grid_scores = None
    if args.anchor in SCALED_ANCHORS and args.anchor_scale_grid is not None:
        unit = fn(base.params, experts, anchor_scale=1.0, **kw)
        grid_scores = {}
        best = None
        for c in args.anchor_scale_grid:
            cand = rescale(base.params, unit, float(c))
            acc = evaluate(cand)
            m = float(np.mean(list(acc.values())))
            grid_scores[str(c)] = m
            if best is None or m > best[0]:
                best = (m, float(c), cand)
        _, anchor_scale, anchor = best
    else:
        if args.anchor in SCALED_ANCHORS and args.anchor_scale is not None:
            kw["anchor_scale"] = float(args.anchor_scale)
        anchor = fn(base.params, experts, **kw)
        anchor = anchor.params if hasattr(anchor, "params") and not isinstance(anchor, dict) else anchor
        anchor_scale = kw.get("anchor_scale", {"task_arithmetic": 0.3}.get(args.anchor, 1.0)
                              if args.anchor in SCALED_ANCHORS else None)
    timings["anchor"] = time.perf_counter() - t0

    # ---------------------------------------------------------------- merge / search
    t0 = time.perf_counter()
    search_info = None
    if args.search:
        from bmm_jax.search import SearchConfig, search
        prep = bmm_jax.prepare(base.params, experts, anchor, grams, labels=labels, carry=args.carry,
                               prior=args.prior, progress=progress)
        cfg = SearchConfig(grouping=args.grouping, num_trials=args.trials, designer=args.designer, seed=args.seed,
                           validation_examples=args.validation_examples, batch_size=args.batch_size)
        run_dir = args.run_dir or os.path.abspath(args.out).rstrip(os.sep) + "-search"
        from bmm_jax.search import RunDirInUse
        try:
            res = search(prep, evaluate, cfg, run_dir=run_dir, anchor=anchor, progress=progress, verbose=progress)
        except RunDirInUse as e:
            raise OSError(str(e)) from None
        merged = res.params
        used_hparams = res.hparams
        search_info = {"grouping": args.grouping, "trials": args.trials, "designer": args.designer,
                       "best_value": res.best_value, "anchor_value": res.anchor_value,
                       "best_trial": res.best_trial, "kept_anchor": res.best_trial == 0, "run_dir": run_dir}
        diagnostics = None
    else:
        merged, diagnostics = bmm_jax.merge(base.params, experts, anchor, grams, hparams_fixed, labels=labels,
                                            carry=args.carry, prior=args.prior)
        used_hparams = hparams_fixed
    timings["merge"] = time.perf_counter() - t0

    validation = None
    if evaluate is not None:
        validation = {"anchor": evaluate(anchor), "merged": evaluate(merged)}
        validation["anchor_mean"] = float(np.mean(list(validation["anchor"].values())))
        validation["merged_mean"] = float(np.mean(list(validation["merged"].values())))

    # ---------------------------------------------------------------- write
    t0 = time.perf_counter()
    merged = jax.tree_util.tree_map(np.asarray, merged)
    meta = {"tool": PROG, "anchor": args.anchor, "anchor_scale": anchor_scale, "grams": args.grams,
            "hparams": used_hparams, "base": args.base, "experts": list(args.experts)}
    checksum = checkpoint.save(args.out, merged, metadata=json.loads(json.dumps(meta, default=str)),
                               overwrite=args.overwrite)
    timings["save"] = time.perf_counter() - t0
    mods = [l for l in jax.tree_util.tree_leaves(labels, is_leaf=lambda x: hasattr(x, "regressed")) if l.regressed]
    report = {
        "out": os.path.abspath(args.out), "checksum": checksum,
        "base": {"source": args.base, "kind": base.kind},
        "experts": [{"source": s, "kind": e.kind, "filled_from_base": n}
                    for s, e, n in zip(args.experts, experts_loaded, filled)],
        "anchor": {"method": args.anchor, "scale": anchor_scale, "scale_grid": grid_scores},
        "grams": {"mode": args.grams, "calibration": args.calibration,
                  "calibration_examples": args.calibration_examples if act is not None else None,
                  "calibration_model": args.calibration_model if act is not None else None,
                  "beta": args.beta if args.grams == "hybrid" else None},
        "hparams": used_hparams, "search": search_info, "validation": validation,
        "carry": args.carry, "prior": args.prior,
        "modules": {"regressed": len(mods),
                    "carried_unchanged": None if diagnostics is None else
                    sum(1 for d in diagnostics["modules"].values() if d.get("carried"))},
        "seconds": {**timings, "total": time.perf_counter() - t_start},
        "argv": sys.argv[1:] if args._argv is None else list(args._argv),
    }
    report_path = args.report or os.path.abspath(args.out).rstrip(os.sep) + ".json"
    atomic_write_json(report_path, report)
    report["report"] = report_path
    return report


# ============================================================================ streamed merge
def _streamed(args) -> bool:
    """True for a file-to-file merge: HF PyTorch-named safetensors inputs and an HF (or orbax) output,
    no data-dependent step."""
    from bmm_jax.streaming import Checkpoint, detect_naming, is_safetensors_checkpoint
    if not all(is_safetensors_checkpoint(x) for x in [args.base, *args.experts]):
        return False
    try:
        naming = detect_naming(Checkpoint(args.base).names())
    except (OSError, ValueError):
        return False
    return naming == "pt" or args.out_format == "hf" or args.coordinator is not None


def _run_streamed(args) -> dict:
    from bmm_jax.streaming import is_bmm_output, merge_checkpoints
    unsupported = [flag for flag, on in (("--search", args.search), ("--validation", args.validation is not None),
                                         ("--calibration", args.calibration is not None),
                                         ("--anchor-scale-grid", args.anchor_scale_grid is not None),
                                         ("--model", args.model is not None))
                   if on]
    if args.grams in ("activations", "hybrid"):
        unsupported.append(f"--grams {args.grams} (collect Grams to files first: bmm_jax.grams.files)")
    if unsupported:
        raise ValueError(f"a streamed merge (HF safetensors inputs) does not take {', '.join(unsupported)}; "
                         "use --grams data_free or --grams GRAM_FILE(S)")
    if args.grams != "data_free" and not os.path.exists(args.grams):
        raise ValueError(f"--grams {args.grams!r}: neither data_free nor a Gram file / folder")
    shim = argparse.Namespace(**vars(args))
    shim.grams = "data_free"
    if os.path.isdir(args.out) and is_bmm_output(args.out):
        shim.overwrite = True                          # a previous streamed output is replaced as a whole
    if args.process_id in (None, 0):
        check_outputs(shim)
    report_path = args.report or os.path.abspath(args.out).rstrip(os.sep) + ".json"
    from bmm_jax.memory import trimming
    with trimming():                                   # this process is ours: hand freed pages back per tensor
        rep = merge_checkpoints(
            args.base, args.experts, args.out, method="anchor" if args.anchor_only else "bmm", anchor=args.anchor,
            anchor_scale=args.anchor_scale, grams=args.grams, hparams=_parse_hparams(args), carry=args.carry,
            prior=args.prior, out_format=args.out_format or "hf", max_shard_size=args.max_shard_size,
            overwrite=args.overwrite, report_path=report_path, coordinator_address=args.coordinator,
            num_processes=args.num_processes, process_id=args.process_id, progress=not args.quiet)
    rep["report"] = report_path
    rep["validation"] = None
    return rep


def main(argv=None) -> int:
    def body():
        args = build_parser().parse_args(argv)
        args._argv = argv
        rep = run(args)
        line = f"{PROG}: wrote {rep['out']} and {rep['report']}"
        if rep["validation"] is not None:
            line += (f"; validation mean: anchor {100 * rep['validation']['anchor_mean']:.2f}, "
                     f"merged {100 * rep['validation']['merged_mean']:.2f}")
        print(line, flush=True)
        return 0
    return run_main(PROG, body, debug=bool(os.environ.get("BMM_DEBUG")))


if __name__ == "__main__":
    sys.exit(main())
