"""BMM inside a training loop: K experts fine-tuned with optax, merged inside the jitted step.

A tiny ``flax.linen`` residual MLP (input projection ``proj``, blocks ``block_i`` of ``mlp_in`` /
``mlp_out``, a classification ``head``) is pre-trained on a generic synthetic task (the base
``theta_0``), then fine-tuned into K experts, one per synthetic task: task t draws inputs
``x = U_t z + noise`` from its own random r-dimensional subspace ``U_t`` of the d-dimensional input
space and labels them with its own random two-layer teacher on ``z``. The K experts train together:
their params carry a leading ``[K]`` axis and one jitted step ``vmap``s forward, backward and
the adamw update over them.

The same forward pass that computes the loss also captures the input of every regressed module
(:func:`bmm_jax.grams.capture` inside ``jax.value_and_grad(..., has_aux=True)``) and adds it to a
per-expert activation Gram accumulator (:func:`bmm_jax.grams.update`, ``vmap``ped). Every
``--merge-every`` steps the same compiled step (its ``merge_now`` flag, a traced bool, selects a
``lax.cond`` branch) also turns the accumulator states into :class:`bmm_jax.grams.Grams`
(:func:`bmm_jax.grams.from_states`), merges the experts with :func:`bmm_jax.merge` (Task
Arithmetic anchor, activation Grams) and, for comparison, with data-free Grams and plain Task
Arithmetic, evaluates every model on held-out data of every task, and resets the accumulator:
the merge sees the activations of the last window of training. The step is compiled once; only
the metrics leave the device.

Heads are task-specific (as in model-merging benchmarks): the merged trunk is evaluated on task t
with expert t's head. The printed table gives, averaged over tasks: the base (its trunk with
expert t's head), the experts on their own tasks, Task Arithmetic, BMM with data-free Grams and
BMM with the activation Grams accumulated during training.

Usage::

    .venv/bin/python experiments/train_and_merge.py                     # defaults, ~20 s on 2 CPU cores
    .venv/bin/python experiments/train_and_merge.py --experts 4 --steps 600 --merge-every 200
    .venv/bin/python experiments/train_and_merge.py --json /tmp/train_and_merge.json
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import bmm_jax  # noqa: E402
from bmm_jax import grams as G  # noqa: E402

METHODS = ("base", "expert", "task_arithmetic", "bmm_data_free", "bmm_activations")


# ----------------------------------------------------------------------------- model and data
class Block(nn.Module):
    """Pre-norm residual MLP block: ``x + mlp_out(gelu(mlp_in(norm(x))))``."""
    hidden: int

    @nn.compact
    def __call__(self, x):
        h = nn.LayerNorm(name="norm")(x)
        h = nn.gelu(nn.Dense(self.hidden, name="mlp_in")(h))
        return x + nn.Dense(x.shape[-1], name="mlp_out")(h)


class Net(nn.Module):
    """``head(norm(blocks(proj(x))))``: params ``proj``, ``block_i/{norm,mlp_in,mlp_out}``, ``norm``, ``head``."""
    width: int
    hidden: int
    blocks: int
    classes: int

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(self.width, name="proj")(x)
        for i in range(self.blocks):
            x = Block(self.hidden, name=f"block_{i}")(x)
        return nn.Dense(self.classes, name="head")(nn.LayerNorm(name="norm")(x))


def make_tasks(key, num_tasks: int, dim: int, rank: int, classes: int, noise: float = 0.05):
    """K synthetic tasks: ``sample(key, t, n) -> (x [n, dim], y [n])`` (pure, jittable, ``t`` traced)."""
    ku, kv, kw = jax.random.split(key, 3)
    bases = jnp.linalg.qr(jax.random.normal(ku, (num_tasks, dim, rank)))[0]        # U_t [dim, rank]
    v = jax.random.normal(kv, (num_tasks, rank, 4 * rank)) / np.sqrt(rank)
    w = jax.random.normal(kw, (num_tasks, 4 * rank, classes)) / np.sqrt(4 * rank)

    def sample(key, t, n):
        kz, ke = jax.random.split(key)
        z = jax.random.normal(kz, (n, rank))
        x = z @ bases[t].T * np.sqrt(dim / rank) + noise * jax.random.normal(ke, (n, dim))
        y = jnp.argmax(jnp.tanh(z @ v[t]) @ w[t], axis=-1)
        return x, y

    return sample


def generic_task(key, dim: int, classes: int):
    """The pre-training task: isotropic inputs, a random two-layer teacher on all of them."""
    kv, kw = jax.random.split(key)
    v = jax.random.normal(kv, (dim, 4 * dim)) / np.sqrt(dim)
    w = jax.random.normal(kw, (4 * dim, classes)) / np.sqrt(4 * dim)

    def sample(key, n):
        x = jax.random.normal(key, (n, dim))
        return x, jnp.argmax(jnp.tanh(x @ v) @ w, axis=-1)

    return sample


def accuracy(logits, y):
    return jnp.mean(jnp.argmax(logits, -1) == y)


# ----------------------------------------------------------------------------- the loop
def run(args) -> dict:
    t_start = time.perf_counter()
    key = jax.random.PRNGKey(args.seed)
    k_task, k_gen, k_init, k_pre, k_train, k_eval = jax.random.split(key, 6)
    K, d = args.experts, args.dim
    model = Net(args.width, args.hidden, args.blocks, args.classes)
    apply = lambda p, x: model.apply({"params": p}, x)                     # noqa: E731
    sample = make_tasks(k_task, K, d, args.rank, args.classes)
    generic = generic_task(k_gen, d, args.classes)

    def ce(logits, y):
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    # --- the base: pre-trained on the generic task (one compiled scan)
    pre_opt = optax.adamw(args.lr)

    @jax.jit
    def pretrain(key_init, key):
        params = model.init(key_init, jnp.zeros((1, d)))["params"]

        def body(carry, key):
            params, opt_state = carry
            x, y = generic(key, args.batch)
            loss, g = jax.value_and_grad(lambda p: ce(apply(p, x), y))(params)
            upd, opt_state = pre_opt.update(g, opt_state, params)
            return (optax.apply_updates(params, upd), opt_state), loss

        (params, _), _ = jax.lax.scan(body, (params, pre_opt.init(params)),
                                      jax.random.split(key, args.pretrain_steps))
        return params

    base = pretrain(k_init, k_pre)
    labels = bmm_jax.build_labels(base)             # proj, block_i/mlp_in, block_i/mlp_out regressed
    dims = {l.input_group: l.d_in for l in bmm_jax.labels.regressed(labels)}
    hparams = {"rho": args.rho, "scale": args.scale}

    # --- held-out data of every task: [K, n, d], [K, n]
    x_eval, y_eval = jax.jit(jax.vmap(lambda k, t: sample(k, t, args.eval_size)))(jax.random.split(k_eval, K),
                                                                                  jnp.arange(K))

    def evaluate(trunks, heads):
        """``{method: trunk}`` -> ``{method: [K] accuracy on task t with head t}`` in one vmapped
        forward pass; a trunk is one params tree or a ``[K]``-stacked one (the experts)."""
        base_ndim = [l.ndim for l in jax.tree_util.tree_leaves(base)]

        def per_task(tree):
            stacked = [l.ndim for l in jax.tree_util.tree_leaves(tree)] != base_ndim
            return tree if stacked else jax.tree_util.tree_map(lambda a: jnp.broadcast_to(a, (K,) + a.shape), tree)

        names = list(trunks)
        stack = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *[per_task(trunks[n]) for n in names])

        def one(tr, head, x, y):
            return accuracy(apply({**tr, "head": head}, x), y)

        acc = jax.vmap(jax.vmap(one), in_axes=(0, None, None, None))(stack, heads, x_eval, y_eval)
        return {n: acc[i] for i, n in enumerate(names)}

    # --- the K experts: one stacked pytree, trained together
    opt = optax.adamw(args.lr)
    experts = jax.tree_util.tree_map(lambda b: jnp.broadcast_to(b, (K,) + b.shape), base)
    opt_state = jax.jit(jax.vmap(opt.init))(experts)
    gram_state = jax.jit(jax.vmap(lambda _: G.init(dims)))(jnp.arange(K))   # sums [K, d, d], counts [K]

    def loss_and_inputs(params, x, y):
        logits, captured = G.capture(apply, params, x, labels)            # one forward pass
        return ce(logits, y), captured

    def merge_and_evaluate(experts, gram_state):
        expert_list = [jax.tree_util.tree_map(lambda a, k=k: a[k], experts) for k in range(K)]
        anchor = bmm_jax.anchors.task_arithmetic(base, expert_list, labels=labels,
                                                 anchor_scale=args.anchor_scale)
        grams = G.from_states(gram_state, labels)
        merged = bmm_jax.merge(base, expert_list, anchor, grams, hparams, labels=labels).params
        data_free = bmm_jax.merge(base, expert_list, anchor, None, hparams, labels=labels).params
        acc = evaluate({"base": base, "expert": experts, "task_arithmetic": anchor, "bmm_data_free": data_free,
                        "bmm_activations": merged}, experts["head"])
        return {**acc, "tokens": jnp.stack([jnp.asarray(grams.num_tokens[k], jnp.float32) for k in range(K)])}

    def no_merge(experts, gram_state):
        return {**{m: jnp.zeros((K,), jnp.float32) for m in METHODS}, "tokens": jnp.zeros((K,), jnp.float32)}

    @functools.partial(jax.jit, donate_argnums=(0, 1, 2))
    def step(experts, opt_state, gram_state, key, merge_now):
        """One training step of the K experts; if ``merge_now`` (a traced bool), also the merges."""
        x, y = jax.vmap(lambda k, t: sample(k, t, args.batch))(jax.random.split(key, K), jnp.arange(K))
        (loss, captured), grads = jax.vmap(jax.value_and_grad(loss_and_inputs, has_aux=True))(experts, x, y)
        upd, opt_state = jax.vmap(opt.update)(grads, opt_state, experts)
        experts = jax.vmap(optax.apply_updates)(experts, upd)
        gram_state = jax.vmap(G.update)(gram_state, captured)
        metrics = jax.lax.cond(merge_now, merge_and_evaluate, no_merge, experts, gram_state)
        gram_state = jax.tree_util.tree_map(lambda a: jnp.where(merge_now, jnp.zeros_like(a), a),
                                            gram_state)   # a merge starts the next window
        return experts, opt_state, gram_state, {"loss": jnp.mean(loss), **metrics}

    rows = []
    print(f"{K} experts, {args.steps} steps, merge every {args.merge_every} "
          f"(rho={args.rho}, scale={args.scale}, TA anchor_scale={args.anchor_scale})", flush=True)
    print(f"{'step':>5} {'loss':>7} " + " ".join(f"{m:>15}" for m in METHODS), flush=True)
    t_loop = time.perf_counter()
    for i, key_i in enumerate(jax.random.split(k_train, args.steps), start=1):
        do_merge = i % args.merge_every == 0 or i == args.steps
        experts, opt_state, gram_state, metrics = step(experts, opt_state, gram_state, key_i, do_merge)
        if do_merge:
            m = jax.device_get(metrics)
            row = {"step": i, "loss": float(m["loss"]), "window_rows": float(np.min(m["tokens"])),
                   **{k: [float(a) for a in m[k]] for k in METHODS}}
            rows.append(row)
            print(f"{i:>5} {row['loss']:>7.4f} " + " ".join(f"{np.mean(row[k]):>15.3f}" for k in METHODS),
                  flush=True)
    last = rows[-1]
    print("\nper task at the last merge (accuracy):")
    print(f"{'task':>5} " + " ".join(f"{m:>15}" for m in METHODS))
    for t in range(K):
        print(f"{t:>5} " + " ".join(f"{last[m][t]:>15.3f}" for m in METHODS))
    result = {"config": vars(args), "merges": rows, "final": {m: float(np.mean(last[m])) for m in METHODS},
              "seconds": {"total": time.perf_counter() - t_start, "loop": time.perf_counter() - t_loop}}
    print(f"\n{result['seconds']['total']:.1f} s in all ({result['seconds']['loop']:.1f} s of training "
          "and merging, compilation included)")
    return result


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Fine-tune K experts of a tiny flax.linen MLP with optax and, inside the same jitted "
                    "training step every --merge-every steps, accumulate activation Grams from the training "
                    "forward pass and merge the experts with BMM (bmm_jax.merge under jit). Prints the "
                    "accuracy of the base, the experts, Task Arithmetic, BMM with data-free Grams and BMM "
                    "with the activation Grams, averaged over the tasks.")
    p.add_argument("--experts", type=int, default=3, help="K, the number of tasks / experts (default 3)")
    p.add_argument("--steps", type=int, default=300, help="fine-tuning steps (default 300)")
    p.add_argument("--merge-every", type=int, default=100, help="merge every N steps (and at the last step)")
    p.add_argument("--pretrain-steps", type=int, default=300, help="pre-training steps of the base (default 300)")
    p.add_argument("--batch", type=int, default=64, help="examples per expert and step (default 64)")
    p.add_argument("--eval-size", type=int, default=1024, help="held-out examples per task (default 1024)")
    p.add_argument("--dim", type=int, default=16, help="input dimension (default 16)")
    p.add_argument("--rank", type=int, default=4, help="dimension of each task's input subspace (default 4)")
    p.add_argument("--width", type=int, default=32, help="model width (default 32)")
    p.add_argument("--hidden", type=int, default=64, help="MLP hidden size (default 64)")
    p.add_argument("--blocks", type=int, default=2, help="residual blocks (default 2)")
    p.add_argument("--classes", type=int, default=4, help="classes per task (default 4)")
    p.add_argument("--lr", type=float, default=3e-3, help="adamw learning rate (default 3e-3)")
    p.add_argument("--rho", type=float, default=0.01, help="BMM prior strength rho (default 0.01)")
    p.add_argument("--scale", type=float, default=1.0, help="BMM assembly scale s (default 1)")
    p.add_argument("--anchor-scale", type=float, default=0.3,
                   help="Task Arithmetic coefficient of the anchor (default 0.3)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = p.parse_args(argv)
    for name in ("experts", "steps", "merge_every", "batch", "eval_size", "dim", "rank", "width", "hidden",
                 "blocks", "classes"):
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
