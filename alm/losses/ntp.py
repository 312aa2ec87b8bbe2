"""Next-token prediction (SFT) and the ALM + lambda * NTP combination."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from alm.losses import chunks as chunks_lib
from alm.losses.reduce import LossSum, normalize


def next_token_loss(logits: jax.Array, ids: jax.Array,
                    loss_mask: jax.Array | None = None) -> LossSum:
  """Next-token cross-entropy `-sum_t log p(ids[t] | ids[<t])` and its count.

  Standard language-model likelihood (SFT). Position 0 is never predicted;
  token t is predicted by the logits at t - 1 and counts iff
  `loss_mask[t]`. Uses the fused vocabulary reduction of
  `alm.losses.chunks`, so no float32 [B, T, V] tensor is created even for
  bf16 logits.

  Args:
    logits: [B, T, V] logits (any float dtype).
    ids: int [B, T] token ids.
    loss_mask: optional bool [B, T] (padding and prompt tokens False).

  Returns:
    `LossSum(total=sum of -log p, count=number of predicted tokens)`.
  """
  tok = chunks_lib.token_logprobs(logits, ids)
  keep = jnp.broadcast_to(jnp.arange(ids.shape[1])[None, :] > 0, ids.shape)
  if loss_mask is not None:
    if loss_mask.shape != ids.shape:
      raise ValueError(f"loss_mask must be [B, T] = {ids.shape}, got "
                       f"{loss_mask.shape}")
    keep = keep & loss_mask.astype(bool)
  total = -jnp.sum(jnp.where(keep, tok.path, 0.0))
  return LossSum(total=total, count=jnp.sum(keep).astype(jnp.float32))


def combined_mean(losses: dict[str, LossSum], weights: dict[str, float],
                  global_counts: dict[str, jax.Array] | None = None
                  ) -> jax.Array:
  """`sum_k weight_k * total_k / count_k`, e.g. ALM + lambda * NTP.

  Each loss is a mean over its own items (chunks for ALM, tokens for NTP) of
  the global batch: pass `global_counts` (psummed or accumulated counts) when
  `losses` covers only a shard or a micro-batch.

  Args:
    losses: name -> `LossSum`.
    weights: name -> weight; every name of `losses` must have one.
    global_counts: optional name -> global item count.

  Returns:
    The weighted sum of means (float32 scalar).
  """
  missing = sorted(set(losses) - set(weights))
  if missing:
    raise ValueError(f"no weight for losses {missing}; weights given for "
                     f"{sorted(weights)}")
  out = jnp.zeros((), jnp.float32)
  for name, loss in losses.items():
    count = loss.count if global_counts is None else global_counts[name]
    out = out + weights[name] * normalize(loss.total, count)
  return out
