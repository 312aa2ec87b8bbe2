"""GradMag: balance several losses by their gradient magnitudes.

See docs/method.md §6.

`w_k = 1 / ||grad_{theta_sub} L_k||` on a small parameter subset (e.g. the
last block), treated as constants; the total is `sum_k w_k L_k / sum_k w_k`.
In the spirit of GradNorm (Chen et al., 2018), as suggested in the ALM paper
(Minixhofer et al.). One forward pass of `loss_fn` (which takes the already
computed teacher outputs from its closure, so the teacher runs once per step),
one backward pass per loss for the norms (under `jit`, XLA prunes them to the
subset), and one backward pass for the weighted total.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class GradMagInfo:
  """Per-loss values, subset gradient norms and weights (name -> scalar)."""

  losses: dict[str, jax.Array]
  norms: dict[str, jax.Array]
  weights: dict[str, jax.Array]


def gradmag_value_and_grad(
    loss_fn: Callable[[Any], dict[str, jax.Array]], params: Any,
    in_subset: Callable[[tuple, jax.Array], bool], *, eps: float = 1e-12,
) -> tuple[jax.Array, Any, GradMagInfo]:
  """Value and gradient of the GradMag-balanced total loss.

  Args:
    loss_fn: params -> {name: scalar loss}; teacher outputs are closed over.
    params: a pytree of trainable parameters (e.g. an `nnx.State`).
    in_subset: `(key_path, leaf) -> bool`, the leaves whose gradient norms
      set the weights.
    eps: added to each norm (a loss with zero gradient gets a large weight
      instead of inf).

  Returns:
    (total, grads of total w.r.t. params, `GradMagInfo`).
  """
  losses, vjp = jax.vjp(loss_fn, params)
  names = sorted(losses)
  if not names:
    raise ValueError("loss_fn returned no losses")
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  subset = [in_subset(path, leaf) for path, leaf in flat]
  if not any(subset):
    raise ValueError("in_subset selected no parameter leaf; GradMag needs a "
                     "non-empty parameter subset (e.g. the last block)")
  norms = {}
  for k in names:
    (g,) = vjp({n: jnp.ones_like(losses[n]) if n == k else
                jnp.zeros_like(losses[n]) for n in names})
    leaves = jax.tree_util.tree_leaves(g)
    sq = sum(jnp.sum(jnp.square(l.astype(jnp.float32)))
             for l, s in zip(leaves, subset) if s)
    norms[k] = jnp.sqrt(sq)
  w = balance_weights(jnp.stack([norms[k] for k in names]), eps=eps)
  weights = {k: w[i] for i, k in enumerate(names)}
  total = sum(weights[k] * losses[k] for k in names)
  (grads,) = vjp({k: weights[k].astype(losses[k].dtype) for k in names})
  return total, grads, GradMagInfo(losses=losses, norms=norms, weights=weights)


def balance_weights(norms: jax.Array, base: jax.Array | None = None, *,
                    eps: float = 1e-12) -> jax.Array:
  """GradMag's weights from per-loss gradient norms on the subset, as constants.

  `w_k = b_k / (|g_k| + eps) / sum_j b_j / (|g_j| + eps)` with base weights
  `b` (default all 1: the plain GradMag of `gradmag_value_and_grad`).

  Args:
    norms: float [K] subset gradient norms of the K losses.
    base: optional float [K] base weights (a loss with base 0 gets weight 0).
    eps: added to each norm.

  Returns:
    float32 [K] weights summing to 1 (stop-gradient).
  """
  raw = 1.0 / (norms.astype(jnp.float32) + eps)
  if base is not None:
    raw = raw * base
  return jax.lax.stop_gradient(raw / jnp.sum(raw))
