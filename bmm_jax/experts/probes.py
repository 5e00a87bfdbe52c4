"""Linear probes on frozen features: the probe heads (the pretrained rows of a results table, and
the frozen expert heads of the task-arithmetic protocol)."""
from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bmm_jax._tree import PyTree
from bmm_jax.models.adapter import ModelAdapter, head_logits, take


def extract_features(adapter: ModelAdapter, params: PyTree, batch: dict, batch_size: int = 128) -> np.ndarray:
    """Pooled features ``[N, feature_dim]`` of a preprocessed batch (padded, jitted batches; text
    is processed in order of length so batches trim to short length buckets), in row order."""
    from bmm_jax.evaluate import batched_logits
    d = adapter.feature_dim
    eye = {"kernel": jnp.eye(d, dtype=jnp.float32), "bias": jnp.zeros((d,), jnp.float32)}
    if adapter.length_buckets and "attention_mask" in batch:
        order = np.argsort(np.asarray(batch["attention_mask"]).sum(axis=1), kind="stable")
        feats = batched_logits(adapter, params, eye, take(batch, order), batch_size)
        out = np.empty_like(feats)
        out[order] = feats
        return out
    return batched_logits(adapter, params, eye, batch, batch_size)


class ProbeFit(NamedTuple):
    """A fitted linear probe: ``head`` (on raw features), the chosen ``l2`` and the validation
    accuracy per candidate ``l2`` (empty without validation data)."""
    head: dict
    l2: float
    val_accuracy: dict


def linear_probe(features: np.ndarray, labels: np.ndarray, num_classes: int, *, l2: float = 1e-3,
                 steps: int = 200, val_features: np.ndarray | None = None,
                 val_labels: np.ndarray | None = None, l2_grid: Sequence[float] = ()) -> ProbeFit:
    """Multinomial logistic regression (ridge-penalised) on frozen features.

    Minimises ``mean CE(z W + b, y) + l2 * ||W||_F^2`` over centred features scaled by one global
    factor, ``z = (x - mu) / r`` with ``r`` the RMS of the centred features (every dimension is
    penalised alike, so near-constant feature dimensions do not get huge weights that would make
    later fine-tuning unstable), by full-batch L-BFGS from zero. ``mu`` and ``r`` are folded into
    the returned head so that ``head_logits(head, x)`` applies to raw features.

    With validation data and a non-empty ``l2_grid``, every ``l2`` of the grid is fitted and the
    one with the best validation accuracy is kept (ties: the larger ``l2``).

    Args:
      features: ``[N, d]`` float features; ``labels``: ``[N]`` ints in ``[0, num_classes)``.
      num_classes: C.
      l2: penalty without a grid.
      steps: L-BFGS iterations.
      val_features, val_labels: optional ``[M, d]`` / ``[M]`` validation data for the grid.
      l2_grid: candidate penalties.

    Returns:
      :class:`ProbeFit` with ``head = {"kernel": [d, C], "bias": [C]}`` (float32 numpy).
    """
    x = np.asarray(features, np.float32)
    y = np.asarray(labels, np.int32)
    if x.ndim != 2 or y.shape != x.shape[:1]:
        raise ValueError(f"features must be [N, d] and labels [N]; got {x.shape} and {y.shape}")
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got range [{y.min()}, {y.max()}]")
    mu = x.mean(axis=0)
    r = np.float32(np.sqrt(np.mean((x - mu) ** 2)) + 1e-6)
    z = jnp.asarray((x - mu) / r)

    def fold(w) -> dict:
        kernel = np.asarray(w["kernel"], np.float32) / r
        bias = np.asarray(w["bias"], np.float32) - mu @ kernel
        return {"kernel": kernel.astype(np.float32), "bias": bias.astype(np.float32)}

    grid = tuple(float(v) for v in l2_grid) if (l2_grid and val_features is not None) else (float(l2),)
    fits, accs = {}, {}
    for lam in grid:
        w = _fit_probe(z, jnp.asarray(y), jnp.float32(lam), int(num_classes), int(steps))
        fits[lam] = fold(w)
        if len(grid) > 1:
            vx = np.asarray(val_features, np.float32)
            vy = np.asarray(val_labels)
            lg = vx @ fits[lam]["kernel"] + fits[lam]["bias"]
            accs[lam] = float(np.mean(np.argmax(lg, axis=1) == vy))
    best = max(grid, key=lambda lam: (accs.get(lam, 0.0), lam))
    return ProbeFit(fits[best], best, accs)


@functools.partial(jax.jit, static_argnums=(3, 4))
def _fit_probe(z, y, l2, num_classes: int, steps: int):
    """L-BFGS on the penalised mean cross-entropy (see :func:`linear_probe`); ``l2`` is traced."""
    w0 = {"kernel": jnp.zeros((z.shape[1], num_classes), jnp.float32),
          "bias": jnp.zeros((num_classes,), jnp.float32)}

    def loss(w):
        lg = head_logits(w, z)
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(lg, y)) + l2 * jnp.sum(w["kernel"] ** 2)

    opt = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(loss)

    def body(carry, _):
        w, state = carry
        value, grad = value_and_grad(w, state=state)
        updates, state = opt.update(grad, state, w, value=value, grad=grad, value_fn=loss)
        return (optax.apply_updates(w, updates), state), value

    (w, _), _ = jax.lax.scan(body, (w0, opt.init(w0)), None, length=steps)
    return w



__all__ = ["extract_features", "ProbeFit", "linear_probe"]
