"""Hidden-state alignment at the ends of aligned chunks (docs/method.md §6).

Source: the auxiliary hidden-state loss of Minixhofer et al., "Universal
Cross-Tokenizer Distillation via Approximate Likelihood Matching". At the last
token of each (unconstrained) chunk, for each chosen layer pair (l, l'):

  sum_d (h^T_l[d] - P(h^S_l')[d])^2 / ms_l[d]

where `ms_l[d]` is the teacher's per-channel mean square over the chunks of
the batch, averaged over chunks and layer pairs. The channels are summed, as
in the squared norm `||h^T - P(h^S)||^2` of docs/method.md §6 (a mean would
shrink the loss, and its weight against the ALM loss, by the teacher width): a
student that outputs zeros scores exactly the teacher width D_T. `P` is a
learned linear map when the widths differ, the identity otherwise.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from alm.losses import chunks as chunks_lib
from alm.losses.reduce import LossSum


class HiddenProjector(nnx.Module):
  """`P`: student width -> teacher width (identity when they are equal)."""

  def __init__(self, student_dim: int, teacher_dim: int, *, rngs: nnx.Rngs,
               param_dtype=jnp.float32):
    self.identity = student_dim == teacher_dim
    if not self.identity:
      init = nnx.initializers.lecun_normal()
      self.kernel = nnx.Param(init(rngs.params(), (student_dim, teacher_dim),
                                   param_dtype))

  def __call__(self, h: jax.Array) -> jax.Array:
    """[..., D_S] -> [..., D_T]."""
    if self.identity:
      return h
    return h @ self.kernel[...].astype(h.dtype)


def _chunk_ends(h, ids_shape, chunk_ids, num_chunks, loss_mask):
  zero = chunks_lib.TokenLogProbs(path=jnp.zeros(ids_shape, jnp.float32),
                                  boundary=None)
  ch = chunks_lib.chunk_logprobs(zero, chunk_ids, num_chunks, loss_mask)
  return ch


def hidden_state_loss(
    teacher_hidden: Sequence[jax.Array], student_hidden: Sequence[jax.Array],
    teacher_chunk_ids: jax.Array, student_chunk_ids: jax.Array,
    projector: HiddenProjector, *, teacher_loss_mask: jax.Array | None = None,
    student_loss_mask: jax.Array | None = None,
    channel_mean_square: Sequence[jax.Array] | None = None,
) -> LossSum:
  """Normalised squared error between chunk-end hidden states.

  Args:
    teacher_hidden: per layer pair, teacher states [B, T_T, D_T] (stopped).
    student_hidden: per layer pair, student states [B, T_S, D_S].
    teacher_chunk_ids, student_chunk_ids: int chunk ids (-1 = none).
    projector: a `HiddenProjector` D_S -> D_T.
    teacher_loss_mask, student_loss_mask: optional bool [B, T] masks.
    channel_mean_square: optional per-pair [D_T] teacher mean squares over
      the GLOBAL batch (pass them under accumulation or sharding for an exact
      global loss); by default computed from this batch's chunk ends.

  Returns:
    `LossSum(total = sum over chunks of the pair-averaged error, count =
    number of valid chunks)`.
  """
  if len(teacher_hidden) != len(student_hidden) or not teacher_hidden:
    raise ValueError(
        f"need one student state per teacher state (layer pairs); got "
        f"{len(teacher_hidden)} teacher and {len(student_hidden)} student")
  c = min(teacher_chunk_ids.shape[1], student_chunk_ids.shape[1])
  ct = _chunk_ends(None, teacher_chunk_ids.shape, teacher_chunk_ids, c,
                   teacher_loss_mask)
  cs = _chunk_ends(None, student_chunk_ids.shape, student_chunk_ids, c,
                   student_loss_mask)
  valid = ct.valid & cs.valid  # [B, C]
  count = jnp.sum(valid).astype(jnp.float32)
  total = jnp.zeros((), jnp.float32)
  for k, (ht, hs) in enumerate(zip(teacher_hidden, student_hidden)):
    ht = jax.lax.stop_gradient(ht).astype(jnp.float32)
    et = jnp.take_along_axis(ht, ct.last[..., None], axis=1)  # [B, C, D_T]
    es = projector(jnp.take_along_axis(hs, cs.last[..., None], axis=1)
                   ).astype(jnp.float32)
    if channel_mean_square is None:
      ms = (jnp.sum(jnp.where(valid[..., None], et**2, 0.0), axis=(0, 1))
            / jnp.maximum(count, 1.0))
    else:
      ms = jnp.asarray(channel_mean_square[k], jnp.float32)
    err = jnp.sum((et - es) ** 2 / jnp.maximum(ms, 1e-12), axis=-1)  # [B,C]
    total = total + jnp.sum(jnp.where(valid, err, 0.0))
  return LossSum(total=total / len(teacher_hidden), count=count)


def chunk_end_square_sums(
    teacher_hidden: Sequence[jax.Array], teacher_chunk_ids: jax.Array,
    student_chunk_ids: jax.Array, *, teacher_loss_mask: jax.Array | None = None,
    student_loss_mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Per-pair sums of the teacher's squared chunk-end states, and the chunk count.

  Summed over several (micro-)batches and divided, they give the
  `channel_mean_square` of `hidden_state_loss` over the whole batch.

  Returns:
    (float32 [P, D_T] sums over valid chunks, float32 scalar count).
  """
  c = min(teacher_chunk_ids.shape[1], student_chunk_ids.shape[1])
  ct = _chunk_ends(None, teacher_chunk_ids.shape, teacher_chunk_ids, c, teacher_loss_mask)
  cs = _chunk_ends(None, student_chunk_ids.shape, student_chunk_ids, c, student_loss_mask)
  valid = ct.valid & cs.valid
  sums = []
  for ht in teacher_hidden:
    et = jnp.take_along_axis(jax.lax.stop_gradient(ht).astype(jnp.float32),
                             ct.last[..., None], axis=1)
    sums.append(jnp.sum(jnp.where(valid[..., None], et**2, 0.0), axis=(0, 1)))
  return jnp.stack(sums), jnp.sum(valid).astype(jnp.float32)
