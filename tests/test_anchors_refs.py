"""Independent numpy transcriptions of the anchors' reference algorithms (float64), used by
tests/test_anchors.py, and the checks of these transcriptions themselves (hand-computed cases) and
of float64 agreement (x64 in a subprocess).

Each reference works on a flat ``{path: array}`` view of the params and follows the published code
(FusionBench 0.2.33 / the authors' repositories) step by step, with plain numpy: TIES flattens every
task vector of the whole model and takes ``kthvalue`` + ``>=``; TSV-M takes per-tensor SVDs and
polar factors by SVD; Iso-CTS works on the PyTorch ``[d_out, d_in]`` view; WUDI's exact minimiser is
``numpy.linalg.lstsq`` of the stacked problem; RegMean a dense ``solve``.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np

# ---------------------------------------------------------------------------------------------
# flat views


def flat(tree) -> dict:
    """``{path: numpy array}`` in ``tree_flatten`` order (paths ``a/b/kernel``)."""
    import jax
    out = {}
    for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        out["/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in p)] = np.asarray(leaf)
    return out


def task_vectors(base: dict, experts: list[dict]) -> dict:
    """``{path: [K, *shape]}`` float64 task vectors, the subtraction done in float32 (as the
    library does for float32 leaves) so that magnitude orderings agree bit for bit."""
    out = {}
    for p, b in base.items():
        cd = np.float64 if b.dtype == np.float64 else np.float32
        out[p] = np.stack([e[p].astype(cd) - b.astype(cd) for e in experts]).astype(np.float64)
    return out


def is_kernel(path: str) -> bool:
    return path.split("/")[-1] == "kernel"


# ---------------------------------------------------------------------------------------------
# TIES (Yadav et al.; FusionBench ties_merging_utils, merge_func="mean")

def ties_reference(taus: dict, density: float) -> dict:
    """The reference: all task vectors flattened per task; ``k = n - int(n * density)``;
    ``kthvalue(k)`` of ``|tv|`` then ``>=``; ``sign(sum)``, zeros -> majority; disjoint mean."""
    paths = list(taus)
    num = next(iter(taus.values())).shape[0]
    m = np.concatenate([taus[p].reshape(num, -1) for p in paths], axis=1)
    n = m.shape[1]
    k = n - int(n * density)
    if k == 0:                       # density 1: the reference fails; keep everything
        kth = np.zeros((num, 1))
    else:
        kth = np.sort(np.abs(m), axis=1)[:, k - 1:k]          # k-th smallest, 1-based
    trimmed = m * (np.abs(m) >= kth)
    sign = np.sign(trimmed.sum(0))
    sign[sign == 0] = np.sign(sign.sum())
    keep = np.where(sign[None] > 0, trimmed > 0, trimmed < 0)
    sel = trimmed * keep
    merged = sel.sum(0) / np.maximum((sel != 0).sum(0), 1)
    out, start = {}, 0
    for p in paths:
        size = taus[p][0].size
        out[p] = merged[start:start + size].reshape(taus[p].shape[1:])
        start += size
    return out


def ties_leaf_reference(t: np.ndarray, density: float) -> np.ndarray:
    """Per-tensor trimming: keep ``max(1, floor(density n))``, the tensor's majority sign."""
    k, n = t.shape[0], t[0].size
    flat_t = t.reshape(k, n)
    keep = max(1, int(density * n + 1e-9))
    trimmed = np.zeros_like(flat_t)
    for i in range(k):
        thr = np.sort(np.abs(flat_t[i]))[n - keep]
        trimmed[i] = np.where(np.abs(flat_t[i]) >= thr, flat_t[i], 0)
    sign = np.sign(trimmed.sum(0))
    sign[sign == 0] = np.sign(sign.sum())
    agree = np.where(sign > 0, trimmed > 0, trimmed < 0)
    merged = (trimmed * agree).sum(0) / np.maximum(agree.sum(0), 1)
    return merged.reshape(t.shape[1:])


# ---------------------------------------------------------------------------------------------
# TSV-M, Iso-C, Iso-CTS (on the PyTorch view [d_out, d_in]; TSV-M and Iso-C are transpose-
# equivariant, Iso-CTS is not)

def polar(x):
    u, _, vt = np.linalg.svd(x, full_matrices=False)
    return u @ vt


def tsv_reference(t: np.ndarray) -> np.ndarray:
    """``compute_and_sum_svd_mem_reduction``: per task SVD, top ``r // K`` triplets placed side by
    side, polar factors (``u @ vh`` of SVDs) of the stacks, rebuild."""
    k, m, n = t.shape
    rk = max(1, min(m, n) // k)
    us, ss, vs = [], [], []
    for tk in t:
        u, s, vt = np.linalg.svd(tk, full_matrices=False)
        us.append(u[:, :rk]), ss.append(s[:rk]), vs.append(vt[:rk])
    return polar(np.concatenate(us, 1)) @ np.diag(np.concatenate(ss)) @ polar(np.concatenate(vs, 0))


def iso_c_reference(t: np.ndarray) -> np.ndarray:
    u, s, vt = np.linalg.svd(t.sum(0), full_matrices=False)
    return s.mean() * u @ vt


def iso_cts_reference(x: np.ndarray, frac: float) -> np.ndarray:
    """``iso_cts`` on PyTorch-layout task matrices ``x [K, d_out, d_in]``."""
    k, m, n = x.shape
    r = min(m, n)
    c = int(r * frac)
    total = int(round((r - c) / k)) * k
    c = r - total
    p = total // k
    u, s, vt = np.linalg.svd(x.sum(0), full_matrices=False)
    uc = u[:, :c]
    us, ss, vs = [], [], []
    for xk in x:
        a, b, ct = np.linalg.svd(xk - uc @ uc.T @ xk, full_matrices=False)
        us.append(a[:, :p]), ss.append(b[:p]), vs.append(ct[:p])
    us.append(uc), ss.append(s[:c]), vs.append(vt[:c])
    sv = np.concatenate(ss)
    return sv.mean() * polar(np.concatenate(us, 1)) @ polar(np.concatenate(vs, 0))


def torch_view(path: str, t: np.ndarray, transposed: bool = False) -> np.ndarray:
    """``[K, d_out, d_in]`` PyTorch view of a 2-D leaf's task vectors: Flax ``Dense`` kernels are
    ``[d_in, d_out]`` (transpose), embedding tables are stored as in PyTorch (as is);
    ``transposed``: a kernel already stored ``[d_out, d_in]`` (GPT-2 Conv1D)."""
    if is_kernel(path) and not transposed:
        return np.swapaxes(t, -1, -2)
    return t


# ---------------------------------------------------------------------------------------------
# WUDI

def wudi_loss(tm, t):
    out = 0.0
    for tk in t:
        n2 = np.sum(tk * tk)
        if n2 > 0:
            out += np.sum(((tm - tk).T @ tk) ** 2) / n2
    return out


def wudi_exact_reference(t):
    """Min-norm least squares of the stacked problem ``min sum_k ||F_k^T (T_m - T_k)||^2``."""
    rows, rhs = [], []
    for tk in t:
        n = np.linalg.norm(tk)
        if n > 0:
            f = tk / n
            rows.append(f.T), rhs.append(f.T @ tk)
    if not rows:
        return np.zeros(t.shape[1:])
    return np.linalg.lstsq(np.concatenate(rows), np.concatenate(rhs), rcond=None)[0]


def wudi_cond(t):
    """``cond(S)``, ``S = sum_k T_k T_k^T / ||T_k||^2``, from the singular values of the stacked
    factor (on the range of ``S``)."""
    a = np.concatenate([tk.T / np.linalg.norm(tk) for tk in t if np.any(tk)])
    sv = np.linalg.svd(a, compute_uv=False)
    return (sv[0] / sv[-1]) ** 2


def wudi_adam_reference(t, lr, steps, b1=0.9, b2=0.999, eps=1e-8):
    """PyTorch-style Adam on the WUDI loss from ``sum_k T_k``, gradient from its definition."""
    tm = t.sum(0)
    m = np.zeros_like(tm)
    v = np.zeros_like(tm)
    for i in range(1, steps + 1):
        g = sum(2 * tk @ (tk.T @ (tm - tk)) / np.sum(tk * tk) for tk in t if np.any(tk))
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        tm = tm - lr * (m / (1 - b1 ** i)) / (np.sqrt(v / (1 - b2 ** i)) + eps)
    return tm


# ---------------------------------------------------------------------------------------------
# RegMean

def regmean_reference(t, g, alpha):
    g = np.asarray(g, np.float64)
    gt = np.where(np.eye(g.shape[-1], dtype=bool), g, alpha * g)
    return np.linalg.solve(gt.sum(0), np.einsum("kij,kjo->io", gt, t))


# ---------------------------------------------------------------------------------------------
# whole-model references: {path: merged params} (float64)

def reference(name: str, base, experts, *, anchor_scale=None, regressed=(), transposed=(),
              grams=None, **opts) -> dict:
    """The reference merge ``name`` of pytrees ``base`` / ``experts``.

    ``regressed``: paths of the label tree's regressed modules; ``transposed``: those stored
    ``[d_out, d_in]``. Options as the library's (``density``, ``trim``, ``modules``,
    ``common_fraction``, ``exact``, ``lr``, ``steps``, ``alpha``).
    """
    b, es = flat(base), [flat(e) for e in experts]
    floating = {p for p, x in b.items() if np.issubdtype(x.dtype, np.floating)}
    taus = {p: t for p, t in task_vectors(b, es).items() if p in floating}
    default = 0.3 if name == "task_arithmetic" else 1.0
    s = default if anchor_scale is None else anchor_scale
    modules = opts.get("modules", "all_2d")

    def matrices(p):
        return p in regressed or (modules == "all_2d" and b[p].ndim == 2)

    def view(p, t):             # [K, d_in, d_out] of a regressed module
        return np.swapaxes(t, -1, -2) if p in transposed else t

    merged = {}
    if name == "average":
        merged = {p: t.mean(0) for p, t in taus.items()}
    elif name == "task_arithmetic":
        merged = {p: t.sum(0) for p, t in taus.items()}
    elif name == "ties":
        density = opts.get("density", 0.2)
        if opts.get("trim", "model") == "model":
            merged = ties_reference(taus, density)
        else:
            merged = {p: ties_leaf_reference(t, density) for p, t in taus.items()}
    elif name in ("tsv", "iso_c"):
        fn = tsv_reference if name == "tsv" else iso_c_reference
        merged = {p: fn(t) if matrices(p) else t.mean(0) for p, t in taus.items()}
    elif name == "iso_cts":
        frac = opts.get("common_fraction", 0.8)
        for p, t in taus.items():
            if matrices(p):
                m = iso_cts_reference(torch_view(p, t, p in transposed), frac)   # [d_out, d_in]
                merged[p] = m.T if is_kernel(p) and p not in transposed else m
            else:
                merged[p] = t.mean(0)
    elif name == "wudi":
        for p, t in taus.items():
            if p in regressed:
                v = view(p, t)
                if opts.get("exact", False):
                    m = wudi_exact_reference(v)
                else:
                    m = wudi_adam_reference(v, opts.get("lr", 1e-5), opts.get("steps", 300))
                merged[p] = view(p, m[None])[0]
    elif name == "regmean":
        alpha = opts.get("alpha", 0.95)
        for p, t in taus.items():
            if p in regressed:
                merged[p] = view(p, regmean_reference(view(p, t), grams[p], alpha)[None])[0]
            else:
                merged[p] = t.mean(0)
    else:
        raise ValueError(name)
    out = {}
    for p, x in b.items():
        out[p] = x.astype(np.float64) + s * merged[p] if p in merged else x.astype(np.float64)
    return out


# ---------------------------------------------------------------------------------------------
# checks of the transcriptions themselves


def _hand_ties_case():
    z5, z4 = np.zeros(5), np.zeros(4)
    t_w = np.array([[3, -1, 0.5, 2, -4], [-2, 1, 1, -3, 1], [1.5, 0.2, -2, 1, -0.5]])
    t_v = np.array([[1, 5, 0, 0], [-1, 0, 0, 6], [0, 0, 7, 0]])
    return {"w": t_w + z5, "v": t_v + z4}


def test_ties_reference_hand_example():
    # n = 9, density 0.4: k = 9 - 3 = 6, the 6th smallest = the 4th largest |value| per task.
    # task 1: 5,4,3,2,... -> >= 2; task 2: 6,3,2,1,1,1,1 -> >= 1; task 3: 7,2,1.5,1 -> >= 1
    # sums w [2.5, 1, -1, 0, -3], v [-1, 5, 7, 6]; signs sum to 2: w[3] takes +.
    out = ties_reference(_hand_ties_case(), 0.4)
    np.testing.assert_allclose(out["w"], [2.25, 1, -2, 1.5, -4])
    np.testing.assert_allclose(out["v"], [-1, 5, 7, 6])


def test_wudi_exact_reference_is_a_stationary_point():
    rng = np.random.default_rng(0)
    t = rng.standard_normal((3, 9, 4))
    tm = wudi_exact_reference(t)
    grad = sum(2 * tk @ (tk.T @ (tm - tk)) / np.sum(tk * tk) for tk in t)
    assert np.abs(grad).max() < 1e-10 * np.abs(t).max()


# ---------------------------------------------------------------------------------------------
# float64: every anchor (eager) against the references at 1e-10 with x64 enabled (subprocess)

_X64_SCRIPT = textwrap.dedent("""
    import sys
    import jax
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import numpy as np
    sys.path.insert(0, {tests!r})
    import test_anchors_refs as R
    import bmm_jax.anchors as A
    from bmm_jax.labels import build_labels, regressed

    rng = np.random.default_rng(0)
    shapes = {{"embeddings": {{"position_embedding": {{"embedding": (6, 5)}}}},
              "layer": {{"0": {{"attention": {{"query": {{"kernel": (5, 5)}}, "out_proj": {{"kernel": (5, 5)}}}},
                              "fc1": {{"kernel": (5, 9), "bias": (9,)}}, "fc2": {{"kernel": (9, 5)}}}}}}}}
    def tree(scale):
        return jax.tree_util.tree_map(lambda s: jnp.asarray(scale * rng.standard_normal(s)), shapes,
                                      is_leaf=lambda x: isinstance(x, tuple))
    base = tree(1.0)
    experts = [jax.tree_util.tree_map(lambda b, t: b + t, base, tree(0.1)) for _ in range(3)]
    mods = [l.path for l in regressed(build_labels(base))]
    grams = {{}}
    for l in regressed(build_labels(base)):
        x = rng.standard_normal((3, 12, l.d_in))
        grams[l.path] = jnp.asarray(np.einsum("kni,knj->kij", x, x) / 12)
    cases = {{"average": {{}}, "task_arithmetic": {{"anchor_scale": 0.4}}, "ties": {{"density": 0.3}},
             "ties_leaf": {{"density": 0.3, "trim": "leaf"}}, "tsv": {{}}, "iso_c": {{}},
             "iso_cts": {{"common_fraction": 0.6}}, "wudi": {{"steps": 20, "lr": 1e-3}},
             "wudi_exact": {{"exact": True}}, "regmean": {{"grams": grams}}}}
    worst = 0.0
    for case, kw in cases.items():
        name = case.split("_leaf")[0].split("_exact")[0]
        fn = A.get(name)
        ref = R.reference(name, base, experts, regressed=mods, **kw)
        got = R.flat(fn(base, experts, **kw))
        for p, r in ref.items():
            assert got[p].dtype == np.float64, (case, p)
            err = np.abs(got[p] - r).max() / max(1.0, np.abs(r).max())
            worst = max(worst, err)
            assert err < 1e-10, (case, p, err)
    print("worst", worst)
""")


def test_float64_agreement_subprocess():
    tests = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    res = subprocess.run([sys.executable, "-c", _X64_SCRIPT.format(tests=tests)], env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    assert "worst" in res.stdout
