"""Hostile inputs, property-based (hypothesis): random malformed pytrees, label patterns,
hyperparameter dicts, Grams and options fed to ``bmm_jax.merge``, ``bmm_jax.prepare`` (and its
re-solve), the anchors and the Gram estimators.

Every call must either return finite arrays of the right shapes (and dtypes) or raise
``ValueError`` / ``TypeError`` whose message names the offending leaf or argument -- never another
exception, never a silently wrong result. Each generated input carries its own verdict, decided
here independently of the library (the oracle):

* ``invalid``: must raise (NaN/Inf, mismatched structure / shape / dtype, non-numeric leaves,
  negative or non-finite rho, unknown hparams keys, misshapen / asymmetric / indefinite Grams ...);
* ``unusual``: may be accepted only with a warning naming the argument (negative, zero or huge
  scales), or rejected;
* ``edge``: either a finite result or a clear error (integer kernels, zero-size leaves, rho = 0,
  numeric strings);
* ``valid``: must return a finite result of the right shapes.

The outcomes of distinct inputs are tallied; set ``BMM_HOSTILE_TALLY=<file.json>`` to write the
tally (inputs tried, rejected with a clear message, accepted, silently accepted, failures).
"""
from __future__ import annotations

import collections
import copy
import inspect
import json
import math
import os
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bmm_jax
from bmm_jax import anchors as A
from bmm_jax import grams as G
from bmm_jax._tree import leaves_with_paths
from bmm_jax.labels import build_labels

SETTINGS = settings(max_examples=30, deadline=None, derandomize=True, database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])
K = 3


# ----------------------------------------------------------------------------------- the tiny model
def _base(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    f = lambda *s: (0.5 * rng.standard_normal(s)).astype(np.float32)  # noqa: E731
    return {"encoder": {"layer": {"0": {
        "attention": {"self": {"query": {"kernel": f(4, 4), "bias": f(4)}, "value": {"kernel": f(4, 4)}}},
        "intermediate": {"dense": {"kernel": f(4, 6)}},
        "output": {"dense": {"kernel": f(6, 4)}, "LayerNorm": {"scale": f(4)}}}}}}


def _experts(base, k: int = K, seed: int = 1) -> list:
    rng = np.random.default_rng(seed)
    return [jax.tree_util.tree_map(lambda b: (b + 0.1 * rng.standard_normal(b.shape)).astype(b.dtype), base)
            for _ in range(k)]


def _ta_anchor(base, experts, scale=0.3):
    return jax.tree_util.tree_map(lambda b, *e: (b + scale * sum(x - b for x in e)).astype(b.dtype), base, *experts)


BASE = _base()
EXPERTS = _experts(BASE)
ANCHOR = _ta_anchor(BASE, EXPERTS)
PATHS = [p for p, _ in leaves_with_paths(BASE)]
KERNELS = [p for p in PATHS if p.endswith("kernel")]
D_IN = {p: np.shape(x)[0] for p, x in leaves_with_paths(BASE) if p.endswith("kernel")}


def _fresh():
    return copy.deepcopy(BASE), [copy.deepcopy(e) for e in EXPERTS], copy.deepcopy(ANCHOR)


def _get(tree, path):
    for k in path.split("/"):
        tree = tree[k]
    return tree


def _set(tree, path, value):
    *head, last = path.split("/")
    for k in head:
        tree = tree[k]
    tree[last] = value


def _drop(tree, path):
    *head, last = path.split("/")
    for k in head:
        tree = tree[k]
    del tree[last]


# ----------------------------------------------------------------------------------- the tally
OUTCOMES: dict[str, str] = {}          # input description -> outcome (distinct inputs)
FAILURES: dict[str, str] = {}          # input description -> wrong behaviour


@pytest.fixture(scope="module", autouse=True)
def _tally():
    yield
    counts = collections.Counter(OUTCOMES.values())
    table = {"tried": len(OUTCOMES), **dict(sorted(counts.items())), "failures": FAILURES}
    path = os.environ.get("BMM_HOSTILE_TALLY")
    if path:
        with open(path, "w") as f:
            json.dump(table, f, indent=1)


class Wrong(AssertionError):
    pass


def _fail(desc: str, kind: str, detail: str):
    OUTCOMES[desc] = kind
    FAILURES[desc] = f"{kind}: {detail}"[:600]
    raise Wrong(f"{kind}: {desc} -> {detail}"[:2000])


def _dtype(x) -> np.dtype:
    return np.dtype(x.dtype) if hasattr(x, "dtype") else np.result_type(x)


def _finite_like(out, like) -> str | None:
    """None if ``out`` has ``like``'s leaf paths and shapes, ``like``'s float dtypes (float64 may
    come back as float32 without x64), and finite values; else what is wrong."""
    out = getattr(out, "params", out) if not isinstance(out, dict) else out
    lo, ll = leaves_with_paths(out), leaves_with_paths(like)
    if [p for p, _ in lo] != [p for p, _ in ll]:
        return f"result leaves {[p for p, _ in lo][:4]} != input leaves {[p for p, _ in ll][:4]}"
    for (p, o), (_, l) in zip(lo, ll):
        if np.shape(o) != np.shape(l):
            return f"leaf '{p}' has shape {np.shape(o)}, expected {np.shape(l)}"
        do, dl = _dtype(o), _dtype(l)
        if do != dl and not (dl == np.float64 and do == np.float32):
            return f"leaf '{p}' has dtype {do}, expected {dl}"
        if do.kind == "f" or do.name == "bfloat16":
            if not np.all(np.isfinite(np.asarray(o, np.float32))):
                return f"leaf '{p}' has NaN/Inf values"
    return None


def attempt(desc: str, call, *, status: str, names, check=None):
    """Run ``call()`` and judge it (see the module docstring). ``names``: strings of which the
    error (or, for ``unusual`` input, a warning) must contain one."""
    names = [n for n in names if n]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            out = call()
        except (ValueError, TypeError) as e:
            msg = " ".join(str(e).split())
            if status == "valid":
                _fail(desc, "valid input rejected", f"{type(e).__name__}: {msg}")
            if not any(n in msg for n in names):
                _fail(desc, "unclear error", f"{type(e).__name__} names none of {names}: {msg}")
            OUTCOMES[desc] = "rejected with a clear message"
            return None
        except Wrong:
            raise
        except Exception as e:  # noqa: BLE001 - the point: nothing else may escape
            _fail(desc, "wrong exception", f"{type(e).__name__}: {' '.join(str(e).split())[:300]}")
    bad = check(out) if check is not None else None
    if bad:
        _fail(desc, "wrong result", bad)
    if status == "invalid":
        _fail(desc, "silently accepted", "returned a result")
    if status == "unusual":
        if not any(any(n in str(w.message) for n in names) for w in caught
                   if not issubclass(w.category, DeprecationWarning)):
            _fail(desc, "silently accepted", f"no warning naming {names}")
        OUTCOMES[desc] = "accepted with a warning"
        return out
    OUTCOMES[desc] = "accepted (valid)" if status == "valid" else "accepted (edge)"
    return out


# ----------------------------------------------------------------------------------- malformed trees
# a mutation of one leaf of one tree: verdict when only that tree changes
SINGLE = {"nan": "invalid", "inf": "invalid", "-inf": "invalid", "transpose": "invalid", "extra_dim": "invalid",
          "shrink": "invalid", "scalar": "invalid", "empty": "invalid", "int32": "invalid", "int8": "invalid",
          "bool": "invalid", "float16": "invalid", "float64": "invalid", "complex64": "invalid",
          "bfloat16": "invalid", "object": "invalid", "string": "invalid", "list": "invalid",
          "python_str": "invalid", "drop": "invalid", "extra": "invalid", "none": "invalid", "jax": "valid"}
# the same mutation applied to that leaf of every tree (base, experts, anchor)
EVERY = {"int8": "edge", "int32": "edge", "bool": "edge", "float16": "valid", "bfloat16": "valid",
         "float64": "edge", "complex64": "invalid", "object": "invalid", "string": "invalid", "scalar": "edge",
         "empty": "edge", "jax": "valid", "nan": "invalid", "python_str": "invalid"}


def _mutate_leaf(x, kind: str, where: int):
    x = np.asarray(x)
    if kind in ("nan", "inf", "-inf"):
        y = x.copy()
        y.reshape(-1)[where % y.size] = float(kind)
        return y
    if kind == "transpose":
        return x.T if x.ndim == 2 and x.shape[0] != x.shape[1] else x[..., :-1]
    if kind == "extra_dim":
        return x[None]
    if kind == "shrink":
        return x[..., :-1]
    if kind == "scalar":
        return np.float32(0.5)
    if kind == "empty":
        return np.zeros((0,) + x.shape[1:], x.dtype)
    if kind in ("int32", "int8", "bool"):
        return np.round(20 * x).astype(kind)
    if kind in ("float16", "float64", "complex64"):
        return x.astype(kind)
    if kind == "bfloat16":
        return jnp.asarray(x, jnp.bfloat16)
    if kind == "object":
        return x.astype(object)
    if kind == "string":
        return x.astype(str)
    if kind == "list":
        return x.tolist()
    if kind == "python_str":
        return "0.5"
    if kind == "jax":
        return jnp.asarray(x)
    raise AssertionError(kind)


def _apply(tree, path, kind, where):
    if kind == "drop":
        _drop(tree, path)
    elif kind == "none":
        _set(tree, path, None)
    elif kind == "extra":
        _set(tree, path.rsplit("/", 1)[0] + "/extra", np.zeros(3, np.float32))
    else:
        _set(tree, path, _mutate_leaf(_get(tree, path), kind, where))


def _names_for(path, kind):
    if kind == "extra":
        return [path.rsplit("/", 1)[0] + "/extra"]
    return [path]


single_mutation = st.tuples(st.sampled_from(sorted(SINGLE)), st.sampled_from(PATHS),
                            st.sampled_from(["base", "expert0", "expert2", "anchor"]), st.integers(0, 23))
every_mutation = st.tuples(st.sampled_from(sorted(EVERY)), st.sampled_from(PATHS), st.integers(0, 23))


def _trees_single(m):
    kind, path, target, where = m
    base, experts, anchor = _fresh()
    tree = {"base": base, "expert0": experts[0], "expert2": experts[2], "anchor": anchor}[target]
    _apply(tree, path, kind, where)
    status = SINGLE[kind]
    return base, experts, anchor, status, _names_for(path, kind), f"{kind} at {target}:{path}"


def _trees_every(m):
    kind, path, where = m
    base, experts, anchor = _fresh()
    for t in [base, *experts, anchor]:
        _apply(t, path, kind, where)
    return base, experts, anchor, EVERY[kind], _names_for(path, kind), f"{kind} at every tree:{path}"


# containers and arguments that are not pytrees of arrays
def _containers():
    base, experts, anchor = _fresh()
    return [
        ("experts=[]", dict(experts=[]), "invalid", ["expert"]),
        ("one expert", dict(experts=experts[:1]), "invalid", ["expert"]),
        ("experts=a dict", dict(experts=experts[0]), "invalid", ["experts"]),
        ("experts=a tuple", dict(experts=tuple(experts)), "valid", []),
        ("experts=a generator", dict(experts=(e for e in experts)), "edge", ["experts"]),
        ("experts=[None, ...]", dict(experts=[None] + experts[1:]), "invalid", ["expert 0"]),
        ("experts=a string", dict(experts="experts"), "invalid", ["experts"]),
        ("base={}", dict(base={}), "invalid", ["base"]),
        ("base=None", dict(base=None), "invalid", ["base"]),
        ("every tree {}", dict(base={}, experts=[{}, {}], anchor={}), "invalid", ["base", "no array leaves"]),
        ("anchor=None", dict(anchor=None), "invalid", ["anchor"]),
        ("anchor=3.0", dict(anchor=3.0), "invalid", ["anchor"]),
        ("anchor='magic'", dict(anchor="magic"), "invalid", ["magic"]),
        ("anchor=a subtree", dict(anchor=anchor["encoder"]), "invalid", ["anchor"]),
        ("anchor='task_arithmetic'", dict(anchor="task_arithmetic"), "valid", []),
        ("carry='magic'", dict(carry="magic"), "invalid", ["carry", "magic"]),
        ("carry=None", dict(carry=None), "invalid", ["carry"]),
        ("prior='full'", dict(prior="full"), "invalid", ["prior", "full"]),
        ("weights=['a','b','c']", dict(weights=["a", "b", "c"]), "invalid", ["weights"]),
        ("weights='1,1,1'", dict(weights="1,1,1"), "invalid", ["weights"]),
        ("weights=[1,1]", dict(weights=[1.0, 1.0]), "invalid", ["weights"]),
        ("weights=[1,nan,1]", dict(weights=[1.0, float("nan"), 1.0]), "invalid", ["weights"]),
        ("weights=[1,-1,1]", dict(weights=[1.0, -1.0, 1.0]), "invalid", ["weights"]),
        ("weights=[0,0,0]", dict(weights=[0.0, 0.0, 0.0]), "invalid", ["weights"]),
        ("weights=[[1,1,1]]", dict(weights=[[1.0, 1.0, 1.0]]), "invalid", ["weights"]),
        ("weights=[1,2,3]", dict(weights=[1, 2, 3]), "valid", []),
        ("weights={'a':1}", dict(weights={"a": 1.0}), "invalid", ["weights"]),
    ]


CONTAINERS = _containers()


def _call_merge(base, experts, anchor, **kw):
    def call():
        return bmm_jax.merge(base, experts, anchor, **kw)
    return call


def _check_params(like):
    return lambda out: _finite_like(out.params if hasattr(out, "params") else out, like)


@SETTINGS
@given(single_mutation)
def test_merge_one_malformed_leaf(m):
    base, experts, anchor, status, names, desc = _trees_single(m)
    attempt("merge: " + desc, _call_merge(base, experts, anchor), status=status, names=names,
            check=_check_params(base))


@SETTINGS
@given(every_mutation)
def test_merge_same_odd_leaf_everywhere(m):
    base, experts, anchor, status, names, desc = _trees_every(m)
    attempt("merge: " + desc, _call_merge(base, experts, anchor), status=status, names=names,
            check=_check_params(base))


@pytest.mark.parametrize("target", ["base", "expert2", "anchor"])
@pytest.mark.parametrize("kind", sorted(SINGLE))
def test_merge_every_leaf_mutation(kind, target):
    """The table behind the random test: every mutation of one kernel, in each tree."""
    base, experts, anchor, status, names, desc = _trees_single((kind, KERNELS[0], target, 5))
    attempt("merge: " + desc, _call_merge(base, experts, anchor), status=status, names=names,
            check=_check_params(base))


@pytest.mark.parametrize("kind", sorted(EVERY))
def test_merge_every_tree_mutation(kind):
    base, experts, anchor, status, names, desc = _trees_every((kind, KERNELS[2], 5))
    attempt("merge: " + desc, _call_merge(base, experts, anchor), status=status, names=names,
            check=_check_params(base))


@pytest.mark.parametrize("case", range(len(CONTAINERS)), ids=[c[0] for c in CONTAINERS])
def test_merge_bad_containers_and_options(case):
    desc, kw, status, names = CONTAINERS[case]
    base, experts, anchor = _fresh()
    args = {"base": base, "experts": experts, "anchor": anchor}
    opts = {k: v for k, v in kw.items() if k not in args}
    args.update({k: v for k, v in kw.items() if k in args})
    like = args["base"] if isinstance(args["base"], dict) and args["base"] else BASE
    attempt("merge: " + desc, _call_merge(args["base"], args["experts"], args["anchor"], **opts),
            status=status, names=names, check=_check_params(like))


# ----------------------------------------------------------------------------------- hyperparameters
JUNK = st.one_of(st.none(), st.text(max_size=4), st.lists(st.integers(0, 3), max_size=2),
                 st.dictionaries(st.text(max_size=3), st.integers(), max_size=2), st.just(object()))
NUMBER = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32), st.integers(-3, 3),
                   st.sampled_from([0.0, 0.3, 1.0, 1e-3, 1e6, -1.0, -0.0, 1e30]), st.booleans(),
                   st.sampled_from(["0.3", "1", "nan", "-1", "abc", ""]), JUNK)
ENTRY = st.fixed_dictionaries({"rho": NUMBER}, optional={"scale": NUMBER,
                                                         "alpha": st.floats(0, 1), "Rho": st.floats(0, 1)})
GROUP_KEYS = ["global", "default", "q", "v", "mlp-in", "mlp-out", "block0", "block7", "nonsense", "",
              "encoder/layer/0/attention/self/query/kernel", "encoder/layer/0/attention/self/query"]
HPARAMS = st.one_of(
    ENTRY,
    st.dictionaries(st.sampled_from(GROUP_KEYS), st.one_of(ENTRY, ENTRY, JUNK), max_size=4),
    JUNK, st.lists(ENTRY, max_size=2))

# kinds and blocks of the tiny model's regressed modules (an independent lookup, method docstring order)
MODULES = {"encoder/layer/0/attention/self/query/kernel": ("q", 0),
           "encoder/layer/0/attention/self/value/kernel": ("v", 0),
           "encoder/layer/0/intermediate/dense/kernel": ("mlp-in", 0),
           "encoder/layer/0/output/dense/kernel": ("mlp-out", 0)}


def _number(v, name):
    """(status, value) of a hyper-parameter value; status valid / edge / unusual / invalid."""
    if isinstance(v, bool):
        return "edge", float(v)
    if isinstance(v, str):
        try:
            x = float(v)
        except ValueError:
            return "invalid", None
        st_, x = _number(x, name)
        return ("edge" if st_ == "valid" else st_), x
    if not isinstance(v, (int, float)):
        return "invalid", None
    x = float(v)
    if not math.isfinite(x):
        return "invalid", x
    if name == "rho":
        if x < 0:
            return "invalid", x
        if x == 0:
            return "edge", x        # singular unless S is full rank
        return "valid", x
    if x <= 0 or x > 1e3:
        return "unusual", x
    return "valid", x


WORST = ["valid", "edge", "unusual", "invalid"]


def _desc(x) -> str:
    return re.sub(r" at 0x[0-9a-f]+", "", repr(x))


def _worst(*s):
    return max(s, key=WORST.index)


def _entry_verdict(e, where):
    if not isinstance(e, dict):
        return "invalid", ["hparams", where]
    unknown = sorted(set(e) - {"rho", "scale"})
    if unknown:
        return "invalid", unknown
    if "rho" not in e:
        return "invalid", ["rho"]
    sr, _ = _number(e["rho"], "rho")
    ss, _ = _number(e.get("scale", 1.0), "scale")
    names = (["rho"] if sr != "valid" else []) + (["scale"] if ss != "valid" else []) + [where, "hparams"]
    return _worst(sr, ss), names


def _hparams_verdict(hp):
    """Verdict and names for a whole hparams argument (the lookup rules of merging.py's docstring):
    every problem found adds its names (the library may report any one of them)."""
    if hp is None:
        return "valid", []
    if not isinstance(hp, dict):
        return "invalid", ["hparams"]
    if "rho" in hp and not isinstance(hp["rho"], dict):
        return _entry_verdict(hp, "")
    if not hp:
        return "invalid", ["hparams"]
    known = {"global", "default"}
    for path, (kind, block) in MODULES.items():
        known |= {path, path[: -len("/kernel")], kind, f"block{block}"}
    status, names = "valid", []
    unknown = sorted(str(k) for k in hp if k not in known)
    if unknown:
        status, names = "invalid", names + [repr(u) for u in unknown] + unknown
    for k, v in hp.items():
        s_, n_ = _entry_verdict(v, str(k))
        if s_ != "valid":
            status, names = _worst(status, s_), names + n_
    for path, (kind, block) in MODULES.items():
        order = [path, path[: -len("/kernel")], f"block{block}", kind, "global", "default"]
        if not any(k in hp for k in order):
            status, names = "invalid", names + [path, "hparams"]
    return status, names or ["hparams"]


@SETTINGS
@given(HPARAMS)
def test_merge_hparams(hp):
    base, experts, anchor = _fresh()
    status, names = _hparams_verdict(hp)
    attempt(f"merge: hparams={_desc(hp)}", _call_merge(base, experts, anchor, hparams=hp), status=status,
            names=names + (["singular", "rho"] if status == "edge" else []), check=_check_params(base))


NAN, INF = float("nan"), float("inf")
SCALE_VALUES = [NAN, INF, -INF, -1.0, -1e-4, 0.0, 1e9, "x", None, "0.5", True, [1.0], 0.3]
HPARAM_CASES = [
    {"rho": NAN}, {"rho": INF}, {"rho": -1.0}, {"rho": -1e-12}, {"rho": "abc"}, {"rho": None}, {"rho": [0.3]},
    {"rho": "0.3"}, {"rho": True}, {"rho": 0}, {"rho": 1e30}, {"rho": 1e-30}, {"rho": 0.3, "scale": -1.0},
    {"rho": 0.3, "scale": 0.0}, {"rho": 0.3, "scale": 1e9}, {"rho": 0.3, "scale": NAN}, {"rho": 0.3, "scale": INF},
    {"rho": 0.3, "scale": "x"}, {"rho": 0.3, "scale": None}, {"rho": 0.3, "alpha": 1.0}, {"scale": 1.0}, {},
    [], "rho=0.3", 0.3, {"q": {"rho": 1.0}}, {"global": {"rho": 1.0}, "nonsense": {"rho": 1.0}},
    {"global": {"rho": -1.0}}, {"global": 0.3}, {"global": {"rho": 1.0}, "q": {"rho": {"nested": 1.0}}},
    {"rho": {"rho": 1.0}}, {"global": {"rho": 1.0}, "block0": {"rho": NAN}},
    {"global": {"rho": 1.0}, "v": {"rho": 0.5, "scale": -2.0}}, {"default": {"rho": 0.5}, "mlp-in": {"rho": 2.0}},
    {"global": {"rho": 0.5}, 3: {"rho": 1.0}}, {"global": {"rho": 0.5}, None: {"rho": 1.0}},
]


@pytest.mark.parametrize("entry", ["merge", "prepared"])
@pytest.mark.parametrize("case", range(len(HPARAM_CASES)), ids=[_desc(h) for h in HPARAM_CASES])
def test_hparams_table(case, entry):
    hp = copy.deepcopy(HPARAM_CASES[case])
    status, names = _hparams_verdict(hp)
    names = names + (["singular", "rho"] if status == "edge" else [])
    if entry == "merge":
        base, experts, anchor = _fresh()
        call, check = _call_merge(base, experts, anchor, hparams=hp), _check_params(base)
    else:
        prep = _prepared()
        call, check = (lambda: prep.params(hp)), (lambda out: _finite_like(out, BASE))
    attempt(f"{entry}: hparams={_desc(hp)}", call, status=status, names=names, check=check)


_PREP = {}


def _prepared():
    if "p" not in _PREP:
        _PREP["p"] = bmm_jax.prepare(BASE, EXPERTS, ANCHOR)
    return _PREP["p"]


@SETTINGS
@given(HPARAMS)
def test_prepared_params_hparams(hp):
    prep = _prepared()
    status, names = _hparams_verdict(hp)
    if hp is None:
        status, names = "invalid", ["hparams"]      # the re-solve needs hyper-parameters
    attempt(f"prepare().params: hparams={_desc(hp)}", lambda: prep.params(hp), status=status,
            names=names + (["singular", "rho"] if status == "edge" else []), check=lambda out: _finite_like(out, BASE))


@settings(SETTINGS, max_examples=20)
@given(single_mutation)
def test_prepare_one_malformed_leaf(m):
    base, experts, anchor, status, names, desc = _trees_single(m)

    def call():
        return bmm_jax.prepare(base, experts, anchor).params({"rho": 0.5, "scale": 1.0})
    attempt("prepare: " + desc, call, status=status, names=names, check=lambda out: _finite_like(out, base))


@pytest.mark.parametrize("value", SCALE_VALUES, ids=[_desc(v) for v in SCALE_VALUES])
def test_prepared_anchor_scale(value):
    prep = _prepared()
    s = _option_verdict("prepared", "anchor_scale", value)
    attempt(f"prepare().params: anchor_scale={value!r}",
            lambda: prep.params({"rho": 0.5}, anchor_scale=value), status=s, names=["anchor_scale"],
            check=lambda out: _finite_like(out, BASE))


# ----------------------------------------------------------------------------------- labels
PATTERN = st.one_of(st.sampled_from(["query", "kernel", "dense", "(", "[a-", ".*", "LayerNorm", "bias", "^encoder",
                                     "value/kernel$", "nomatch", "", "q", "intermediate|output"]),
                    st.text(alphabet="qkdenst()[]|.*^$/", max_size=5))
PATTERNS = st.one_of(st.none(), PATTERN, st.lists(PATTERN, max_size=3), st.tuples(PATTERN, PATTERN),
                     st.integers(), st.lists(st.integers(), min_size=1, max_size=2), st.just(b"query"),
                     st.just(re.compile("query")))


def _pattern_verdict(value, name):
    """(ok, patterns or None, names): an independent reading of build_labels' pattern rules."""
    if value is None:
        return True, None, []
    if isinstance(value, (str, re.Pattern)):
        value = [value]
    elif isinstance(value, bytes) or not isinstance(value, (list, tuple)):
        return False, None, [name]
    pats = []
    for v in value:
        v = v.pattern if isinstance(v, re.Pattern) else v
        if not isinstance(v, str):
            return False, None, [name]
        try:
            rx = re.compile(v)
        except re.error:
            return False, None, [name, repr(v)]
        if not any(rx.search(p) for p in PATHS):
            return False, None, [name, repr(v)]
        pats.append(v)
    return True, pats, []


@SETTINGS
@given(PATTERNS, PATTERNS)
def test_label_patterns(include, exclude):
    ok_i, inc, names_i = _pattern_verdict(include, "include")
    ok_e, exc, names_e = _pattern_verdict(exclude, "exclude")
    desc = f"build_labels(include={_desc(include)}, exclude={_desc(exclude)})"
    labels = attempt(desc, lambda: build_labels(BASE, include=include, exclude=exclude),
                     status="valid" if ok_i and ok_e else "invalid", names=names_i + names_e)
    if labels is None:
        return
    # independent reference: 2-D kernels matching an include pattern (if any) and no exclude pattern
    got = {l.path for l in jax.tree_util.tree_leaves(labels, is_leaf=lambda x: hasattr(x, "regressed"))
           if l.regressed}
    want = {p for p in KERNELS if (inc is None or any(re.search(i, p) for i in inc))
            and not any(re.search(e, p) for e in (exc or ()))}
    assert got == want, desc
    base, experts, anchor = _fresh()
    status = "valid" if want else "edge"      # nothing regressed: carry everything, or say so
    attempt(f"merge(labels={desc})", _call_merge(base, experts, anchor, labels=labels), status=status,
            names=["label", "regress", "module"], check=_check_params(base))


def _other_model_labels():
    other = copy.deepcopy(BASE)
    _set(other, "encoder/layer/0/intermediate/dense/kernel", np.zeros((4, 8), np.float32))
    _set(other, "encoder/layer/0/output/dense/kernel", np.zeros((8, 4), np.float32))
    return build_labels(other)


LABEL_CASES = [
    ("labels of another model (same paths, other shapes)", _other_model_labels, ["intermediate/dense/kernel"]),
    ("labels of a subtree", lambda: build_labels(BASE["encoder"]), ["label"]),
    ("labels='all'", lambda: "all", ["label"]),
    ("labels=a dict of strings", lambda: jax.tree_util.tree_map(lambda x: "q", BASE), ["label"]),
    ("labels=[]", lambda: [], ["label"]),
    ("labels=True", lambda: True, ["label"]),
]


@pytest.mark.parametrize("case", range(len(LABEL_CASES)), ids=[c[0] for c in LABEL_CASES])
@pytest.mark.parametrize("entry", ["merge", "prepare", "data_free", "tsv"])
def test_bad_label_trees(case, entry):
    desc, make, names = LABEL_CASES[case]
    labels = make()
    base, experts, anchor = _fresh()
    calls = {"merge": lambda: bmm_jax.merge(base, experts, anchor, labels=labels),
             "prepare": lambda: bmm_jax.prepare(base, experts, anchor, labels=labels),
             "data_free": lambda: dict(G.data_free(base, experts, labels=labels)),
             "tsv": lambda: A.tsv(base, experts, labels=labels)}
    attempt(f"{entry}: {desc}", calls[entry], status="invalid", names=names)


# ----------------------------------------------------------------------------------- anchors
ANCHOR_NAMES = ["average", "task_arithmetic", "ties", "tsv", "iso_c", "iso_cts", "wudi", "regmean"]


def _anchor_call(name, base, experts, **kw):
    fn = A.get(name)
    if name == "wudi":
        kw.setdefault("steps", 3)
    if name == "regmean":
        kw.setdefault("grams", {p: np.broadcast_to(np.eye(D_IN[p], dtype=np.float32), (len(experts), D_IN[p], D_IN[p]))
                                for p in MODULES})
    return lambda: fn(base, experts, **kw)


def _scale_kw(fn):
    params = inspect.signature(fn).parameters
    return "anchor_scale" if "anchor_scale" in params else "scale"


@settings(SETTINGS, max_examples=40)
@given(st.sampled_from(ANCHOR_NAMES), single_mutation.filter(lambda m: m[2] != "anchor"))
def test_anchor_one_malformed_leaf(name, m):
    base, experts, _, status, names, desc = _trees_single(m)
    attempt(f"anchor {name}: {desc}", _anchor_call(name, base, experts), status=status, names=names,
            check=lambda out: _finite_like(out, base))


SCALED = ["task_arithmetic", "ties", "tsv", "iso_c", "iso_cts"]
OPTIONS = {"ties": {"density": NUMBER}, "iso_cts": {"common_fraction": NUMBER}, "wudi": {"lr": NUMBER},
           "regmean": {"alpha": NUMBER}}


def _option_verdict(name, opt, v):
    s, x = _number(v, "scale")
    if s == "invalid":
        return "invalid"
    if opt in ("scale", "anchor_scale"):
        return s
    if opt in ("density", "common_fraction", "alpha"):
        if not 0.0 <= x <= 1.0 or (x == 0.0 and opt == "density"):
            return "invalid"
        return "edge" if s == "edge" or x in (0.0, 1.0) else "valid"
    if opt == "lr":
        return "invalid" if x <= 0 else ("edge" if s == "edge" or x > 1 else "valid")
    return s


@SETTINGS
@given(st.sampled_from(SCALED + ["ties", "iso_cts", "wudi", "regmean"]), st.data())
def test_anchor_options(name, data):
    fn = A.get(name)
    choices = dict(OPTIONS.get(name, {}))
    if name in SCALED:
        choices[_scale_kw(fn)] = NUMBER
    opt = data.draw(st.sampled_from(sorted(choices)))
    v = data.draw(choices[opt])
    status = _option_verdict(name, opt, v)
    base, experts, _ = _fresh()
    attempt(f"anchor {name}: {opt}={_desc(v)}", _anchor_call(name, base, experts, **{opt: v}), status=status,
            names=[opt], check=lambda out: _finite_like(out, base))


@pytest.mark.parametrize("value", SCALE_VALUES, ids=[_desc(v) for v in SCALE_VALUES])
@pytest.mark.parametrize("name", SCALED)
def test_anchor_scale_table(name, value):
    fn = A.get(name)
    opt = _scale_kw(fn)
    base, experts, _ = _fresh()
    attempt(f"anchor {name}: {opt}={_desc(value)}", _anchor_call(name, base, experts, **{opt: value}),
            status=_option_verdict(name, opt, value), names=[opt], check=lambda out: _finite_like(out, base))


# ----------------------------------------------------------------------------------- Gram estimators
def _valid_grams(k=K, seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for p in MODULES:
        d = D_IN[p]
        a = rng.standard_normal((k, d, 3 * d)).astype(np.float32)
        out[p] = np.einsum("kin,kjn->kij", a, a) / (3 * d)
    return out


GRAM_KINDS = {"valid": "valid", "nan": "invalid", "inf": "invalid", "wrong_d": "invalid", "wrong_k": "invalid",
              "2d": "invalid", "int": "edge", "string": "invalid", "missing": "invalid",
              "asymmetric": "invalid", "indefinite": "invalid", "scaled_1e3": "valid", "zeros": "edge",
              "float64": "valid", "list": "edge", "extra_module": "edge"}


def _mutate_grams(kind, path, seed):
    g = _valid_grams(seed=seed)
    x = g[path]
    if kind == "nan":
        x = x.copy()
        x[0, 0, 1] = np.nan
    elif kind == "inf":
        x = x.copy()
        x[1, 2, 2] = np.inf
    elif kind == "wrong_d":
        x = x[:, :-1, :-1]
    elif kind == "wrong_k":
        x = x[:-1]
    elif kind == "2d":
        x = x[0]
    elif kind == "int":
        x = np.round(10 * x).astype(np.int32)
    elif kind == "string":
        x = "gram"
    elif kind == "missing":
        del g[path]
        return g
    elif kind == "asymmetric":
        x = x.copy()
        x[0] += np.triu(np.ones_like(x[0]), 1)
    elif kind == "indefinite":
        x = x - 3.0 * np.trace(x, axis1=1, axis2=2)[:, None, None] * np.eye(x.shape[1], dtype=np.float32)
    elif kind == "scaled_1e3":
        x = 1e3 * x
    elif kind == "zeros":
        x = np.zeros_like(x)
    elif kind == "float64":
        x = x.astype(np.float64)
    elif kind == "list":
        x = x.tolist()
    elif kind == "extra_module":
        g["encoder/layer/0/nowhere/kernel"] = x
    g[path] = x
    return g


gram_mutation = st.tuples(st.sampled_from(sorted(GRAM_KINDS)), st.sampled_from(sorted(MODULES)), st.integers(0, 5))


@SETTINGS
@given(gram_mutation)
def test_merge_with_malformed_grams(m):
    kind, path, seed = m
    grams = _mutate_grams(kind, path, seed)
    base, experts, anchor = _fresh()
    names = [path, path[: -len("/kernel")]] + (["nowhere"] if kind == "extra_module" else [])
    attempt(f"merge: grams {kind} at {path}", _call_merge(base, experts, anchor, grams=grams, hparams={"rho": 0.3}),
            status=GRAM_KINDS[kind], names=names + (["singular", "rho"] if kind == "zeros" else []),
            check=_check_params(base))


@pytest.mark.parametrize("kind", sorted(GRAM_KINDS))
@pytest.mark.parametrize("entry", ["merge", "hybrid"])
def test_grams_table(entry, kind):
    path = "encoder/layer/0/intermediate/dense/kernel"
    data = _mutate_grams(kind, path, 0)
    base, experts, anchor = _fresh()
    names = [path, path[: -len("/kernel")]] + (["nowhere"] if kind == "extra_module" else [])
    if entry == "merge":
        attempt(f"merge: grams {kind} at {path}", _call_merge(base, experts, anchor, grams=data, hparams={"rho": 0.3}),
                status=GRAM_KINDS[kind], names=names + (["singular", "rho"] if kind == "zeros" else []),
                check=_check_params(base))
    else:
        status = "valid" if kind == "extra_module" else GRAM_KINDS[kind]
        attempt(f"hybrid: data grams {kind} at {path}, beta=0.5", lambda: G.hybrid(data, G.data_free(base, experts),
                                                                                  beta=0.5),
                status=status, names=names, check=_hybrid_check)


def _hybrid_check(out):
    for p in MODULES:
        g = np.asarray(out[p], np.float32)
        if g.shape != (K, D_IN[p], D_IN[p]) or not np.all(np.isfinite(g)):
            return f"hybrid Gram of '{p}' has shape {g.shape} / non-finite values"
    return None


BETA = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32), st.sampled_from([0.0, 0.5, 1.0]),
                 st.booleans(), st.sampled_from(["0.5", "x"]), JUNK)


def _beta_verdict(b):
    if isinstance(b, bool):
        return "edge"
    if isinstance(b, str):
        try:
            x = float(b)
        except ValueError:
            return "invalid"
        return "edge" if 0.0 <= x <= 1.0 else "invalid"
    if not isinstance(b, (int, float)):
        return "invalid"
    return "valid" if 0.0 <= float(b) <= 1.0 else "invalid"


@SETTINGS
@given(gram_mutation, BETA)
def test_hybrid_grams(m, beta):
    kind, path, seed = m
    data = _mutate_grams(kind, path, seed)
    base, experts, _ = _fresh()
    free = G.data_free(base, experts)
    status = _worst(GRAM_KINDS[kind] if kind != "extra_module" else "valid", _beta_verdict(beta))
    names = [path, path[: -len("/kernel")]] + (["beta"] if _beta_verdict(beta) != "valid" else [])
    attempt(f"hybrid: data grams {kind} at {path}, beta={_desc(beta)}", lambda: G.hybrid(data, free, beta=beta),
            status=status, names=names, check=_hybrid_check)


@settings(SETTINGS, max_examples=25)
@given(single_mutation.filter(lambda m: m[2] != "anchor"))
def test_data_free_one_malformed_leaf(m):
    base, experts, _, status, names, desc = _trees_single(m)

    def call():
        g = G.data_free(base, experts)
        return {p: np.asarray(g[p]) for p in g}             # the Grams are lazy: build every one

    def check(out):
        for p in MODULES:
            if p not in out:
                return f"no data-free Gram for '{p}'"
            g = np.asarray(out[p], np.float32)
            if g.shape != (K, D_IN[p], D_IN[p]) or not np.all(np.isfinite(g)):
                return f"data-free Gram of '{p}' has shape {g.shape} / non-finite values"
            # independent reference: G_k = T_k T_k^T / ||T_k||_F^2 in float64
            b = np.asarray(_get(base, p), np.float64)
            for k, e in enumerate(experts):
                t = np.asarray(_get(e, p), np.float64) - b
                ref = t @ t.T / max(np.sum(t * t), 1e-300)
                if not np.allclose(g[k], ref, rtol=1e-4, atol=1e-6):
                    return f"data-free Gram of '{p}' (expert {k}) differs from T T^T / ||T||^2"
        return None
    attempt("data_free: " + desc, call, status=status, names=names, check=check)
