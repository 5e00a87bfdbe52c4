"""BMM on ``flax.nnx`` models: params out with ``nnx.state``, merge, back in with ``nnx.update``.

A tiny ``nnx`` residual MLP (``proj``, ``blocks[i].mlp_in`` / ``mlp_out``, ``head``) is
pre-trained on a generic synthetic task, then fine-tuned (optax adamw; a compiled ``lax.scan`` over
the model's functional form, ``nnx.split`` / ``nnx.merge``) into K experts on K synthetic tasks
(inputs from each task's own random subspace, labels from its own random teacher). Then:

1. ``nnx.state(model, nnx.Param).to_pure_dict()`` gives each model's params as a plain nested
   dict (list indices become int keys, so paths read ``blocks/0/mlp_in/kernel``). Do not pass the
   ``nnx.State`` itself: its leaves are ``nnx.Param`` variables, whose array sits one level deeper
   (paths ``.../kernel/value``), so no leaf path ends in ``kernel`` and the label tree would regress
   nothing.
2. :func:`bmm_jax.build_labels` on the pure dict: ``proj`` and the blocks' ``mlp_in`` /
   ``mlp_out`` kernels are regressed, ``head`` is excluded (task-specific), biases and norms are
   carried from the anchor. The table is printed.
3. :func:`bmm_jax.task_vectors`, the Task Arithmetic anchor and :func:`bmm_jax.merge` with
   data-free Grams (jitted: the merge is a pure function of the params dicts).
4. ``nnx.replace_by_pure_dict(state, merged)`` then ``nnx.update(model, state)`` puts the merged
   params into a model (a clone of the base), which is then called as any nnx model.

Heads are task-specific: every merged trunk is evaluated on task t with expert t's head. Prints the
accuracy of the base, the experts, Task Arithmetic and BMM per task.

Usage::

    .venv/bin/python experiments/nnx_merge.py             # defaults, ~15 s on 2 CPU cores
    .venv/bin/python experiments/nnx_merge.py --experts 4 --steps 300 --json /tmp/nnx_merge.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

import bmm_jax  # noqa: E402

METHODS = ("base", "expert", "task_arithmetic", "bmm")


class Block(nnx.Module):
    def __init__(self, width: int, hidden: int, rngs: nnx.Rngs):
        self.norm = nnx.LayerNorm(width, rngs=rngs)
        self.mlp_in = nnx.Linear(width, hidden, rngs=rngs)
        self.mlp_out = nnx.Linear(hidden, width, rngs=rngs)

    def __call__(self, x):
        return x + self.mlp_out(nnx.gelu(self.mlp_in(self.norm(x))))


class Net(nnx.Module):
    def __init__(self, dim: int, width: int, hidden: int, blocks: int, classes: int, rngs: nnx.Rngs):
        self.proj = nnx.Linear(dim, width, rngs=rngs)
        self.blocks = nnx.List([Block(width, hidden, rngs) for _ in range(blocks)])
        self.norm = nnx.LayerNorm(width, rngs=rngs)
        self.head = nnx.Linear(width, classes, rngs=rngs)

    def __call__(self, x):
        x = self.proj(x)
        for b in self.blocks:
            x = b(x)
        return self.head(self.norm(x))


def params_of(model: nnx.Module) -> dict:
    """The model's ``nnx.Param`` values as a plain nested dict of arrays (what bmm_jax takes)."""
    return nnx.state(model, nnx.Param).to_pure_dict()


def load_params(model: nnx.Module, params: dict) -> nnx.Module:
    """Write a plain params dict (as returned by :func:`params_of`) into ``model`` in place."""
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(model, state)
    return model


def make_tasks(key, num_tasks: int, dim: int, rank: int, classes: int, noise: float = 0.05):
    """K tasks: ``sample(key, t, n) -> (x [n, dim], y [n])``; task t's inputs span its own subspace."""
    ku, kv, kw = jax.random.split(key, 3)
    bases = jnp.linalg.qr(jax.random.normal(ku, (num_tasks, dim, rank)))[0]
    v = jax.random.normal(kv, (num_tasks, rank, 4 * rank)) / np.sqrt(rank)
    w = jax.random.normal(kw, (num_tasks, 4 * rank, classes)) / np.sqrt(4 * rank)

    def sample(key, t, n):
        kz, ke = jax.random.split(key)
        z = jax.random.normal(kz, (n, rank))
        x = z @ bases[t].T * np.sqrt(dim / rank) + noise * jax.random.normal(ke, (n, dim))
        return x, jnp.argmax(jnp.tanh(z @ v[t]) @ w[t], axis=-1)

    return sample


def generic_sampler(key, dim: int, classes: int):
    kv, kw = jax.random.split(key)
    v = jax.random.normal(kv, (dim, 4 * dim)) / np.sqrt(dim)
    w = jax.random.normal(kw, (4 * dim, classes)) / np.sqrt(4 * dim)

    def sample(key, n):
        x = jax.random.normal(key, (n, dim))
        return x, jnp.argmax(jnp.tanh(x @ v) @ w, axis=-1)

    return sample


def make_trainer(graphdef, sample, *, steps: int, batch: int, lr: float):
    """``train(params, rest, key, task) -> params``: ``steps`` adamw steps on ``sample(key, task, batch)``
    as one compiled ``lax.scan`` over the model's functional form (``nnx.split`` / ``nnx.merge``)."""
    opt = optax.adamw(lr)

    def loss_fn(params, rest, x, y):
        logits = nnx.merge(graphdef, params, rest)(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def train(params, rest, key, task):
        def body(carry, key):
            params, opt_state = carry
            x, y = sample(key, task, batch)
            grads = jax.grad(loss_fn)(params, rest, x, y)
            upd, opt_state = opt.update(grads, opt_state, params)
            return (optax.apply_updates(params, upd), opt_state), None

        (params, _), _ = jax.lax.scan(body, (params, opt.init(params)), jax.random.split(key, steps))
        return params

    return train


@nnx.jit
def accuracy(model, x, y):
    return jnp.mean(jnp.argmax(model(x), -1) == y)


def run(args) -> dict:
    t_start = time.perf_counter()
    key = jax.random.PRNGKey(args.seed)
    k_task, k_gen, k_pre, k_train, k_eval = jax.random.split(key, 5)
    K = args.experts
    sample = make_tasks(k_task, K, args.dim, args.rank, args.classes)
    generic = generic_sampler(k_gen, args.dim, args.classes)

    base_model = Net(args.dim, args.width, args.hidden, args.blocks, args.classes, nnx.Rngs(args.seed))
    graphdef, params, rest = nnx.split(base_model, nnx.Param, ...)
    pretrain = make_trainer(graphdef, lambda key, task, n: generic(key, n), steps=args.pretrain_steps,
                            batch=args.batch, lr=args.lr)
    finetune = make_trainer(graphdef, sample, steps=args.steps, batch=args.batch, lr=args.lr)
    params = pretrain(params, rest, k_pre, 0)
    base_model = nnx.merge(graphdef, params, rest)
    expert_models = [nnx.merge(graphdef, finetune(params, rest, jax.random.fold_in(k_train, t), t), rest)
                     for t in range(K)]

    # --- 1. params out of the models, 2. labels
    base = params_of(base_model)
    experts = [params_of(m) for m in expert_models]
    labels = bmm_jax.build_labels(base)
    print(bmm_jax.format_label_table(labels), flush=True)
    raw = bmm_jax.build_labels(nnx.state(base_model, nnx.Param))
    print(f"(the nnx.State itself, not converted to a pure dict, would give "
          f"{len(bmm_jax.labels.regressed(raw))} regressed modules)\n")

    # --- 3. task vectors, anchor, merge (jitted)
    tau = bmm_jax.task_vectors(base, experts)
    norms = {p: float(jnp.linalg.norm(v.reshape(K, -1), axis=1).mean())
             for p, v in ((l.path, _get(tau, l.path)) for l in bmm_jax.labels.regressed(labels))}
    print("mean task-vector norm per regressed module:",
          ", ".join(f"{p} {n:.3f}" for p, n in norms.items()), flush=True)

    @jax.jit
    def merge(base, experts):
        anchor = bmm_jax.anchors.task_arithmetic(base, experts, labels=labels, anchor_scale=args.anchor_scale)
        merged = bmm_jax.merge(base, experts, anchor, None, {"rho": args.rho, "scale": args.scale},
                               labels=labels)
        return anchor, merged.params

    anchor, merged = merge(base, experts)

    # --- 4. back into nnx models, evaluate with each task's head
    sample_eval = jax.jit(sample, static_argnums=2)
    evals = [sample_eval(k, t, args.eval_size) for t, k in enumerate(jax.random.split(k_eval, K))]
    probe = nnx.clone(base_model)

    def acc_of(trunk: dict) -> list[float]:
        out = []
        for t, (x, y) in enumerate(evals):
            load_params(probe, {**trunk, "head": experts[t]["head"]})
            out.append(float(accuracy(probe, x, y)))
        return out

    res = {"base": acc_of(base), "expert": [float(accuracy(m, x, y)) for m, (x, y) in zip(expert_models, evals)],
           "task_arithmetic": acc_of(anchor), "bmm": acc_of(merged)}
    merged_model = load_params(nnx.clone(base_model), merged)     # the merged nnx model itself
    assert jnp.allclose(merged_model.blocks[0].mlp_in.kernel[...], merged["blocks"][0]["mlp_in"]["kernel"])

    print(f"\naccuracy per task ({K} experts, {args.steps} fine-tuning steps each, rho={args.rho}):")
    print(f"{'task':>5} " + " ".join(f"{m:>15}" for m in METHODS))
    for t in range(K):
        print(f"{t:>5} " + " ".join(f"{res[m][t]:>15.3f}" for m in METHODS))
    print(f"{'mean':>5} " + " ".join(f"{np.mean(res[m]):>15.3f}" for m in METHODS))
    seconds = time.perf_counter() - t_start
    print(f"\n{seconds:.1f} s in all")
    return {"config": vars(args), "accuracy": res, "final": {m: float(np.mean(res[m])) for m in METHODS},
            "regressed": [l.path for l in bmm_jax.labels.regressed(labels)], "seconds": seconds}


def _get(tree, path: str):
    for part in path.split("/"):
        tree = tree[int(part)] if isinstance(tree, dict) and part not in tree and part.isdigit() else tree[part]
    return tree


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Merge flax.nnx models with BMM: fine-tune K experts of a tiny nnx MLP with optax, take "
                    "their params with nnx.state(model, nnx.Param).to_pure_dict(), build the label tree, "
                    "merge (Task Arithmetic anchor, data-free Grams, jitted) and put the result back with "
                    "nnx.update. Prints the accuracy of the base, the experts, Task Arithmetic and BMM.")
    p.add_argument("--experts", type=int, default=3, help="K, the number of tasks / experts (default 3)")
    p.add_argument("--steps", type=int, default=200, help="fine-tuning steps per expert (default 200)")
    p.add_argument("--pretrain-steps", type=int, default=200, help="pre-training steps of the base (default 200)")
    p.add_argument("--batch", type=int, default=64, help="examples per step (default 64)")
    p.add_argument("--eval-size", type=int, default=1024, help="held-out examples per task (default 1024)")
    p.add_argument("--dim", type=int, default=16, help="input dimension (default 16)")
    p.add_argument("--rank", type=int, default=4, help="dimension of each task's input subspace (default 4)")
    p.add_argument("--width", type=int, default=32, help="model width (default 32)")
    p.add_argument("--hidden", type=int, default=64, help="MLP hidden size (default 64)")
    p.add_argument("--blocks", type=int, default=2, help="residual blocks (default 2)")
    p.add_argument("--classes", type=int, default=4, help="classes per task (default 4)")
    p.add_argument("--lr", type=float, default=3e-3, help="adamw learning rate (default 3e-3)")
    p.add_argument("--rho", type=float, default=0.3, help="BMM prior strength rho (default 0.3)")
    p.add_argument("--scale", type=float, default=1.0, help="BMM assembly scale s (default 1)")
    p.add_argument("--anchor-scale", type=float, default=0.3,
                   help="Task Arithmetic coefficient of the anchor (default 0.3)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = p.parse_args(argv)
    for name in ("steps", "batch", "eval_size", "dim", "rank", "width", "hidden", "blocks", "classes"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.experts < 2:
        p.error("--experts must be >= 2 (a merge needs two experts)")
    if args.rank > args.dim:
        p.error("--rank must be <= --dim")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    result = run(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
