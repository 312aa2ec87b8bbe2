"""Sums and counts: means over the global batch, exact under accumulation.

Every loss in `alm.losses` returns a `LossSum` (the sum of its per-item terms
and the number of items: chunks, tokens, positions) instead of a mean. A mean
over a micro-batch or over one device's shard is not the mean over the global
batch; sums and counts add up exactly:

  * gradient accumulation: accumulate `grad(total_i)` and `count_i` over the
    micro-batches, then divide the summed gradient by `sum_i count_i`
    (`count` never depends on the student's parameters, so it is a constant);
  * data parallelism under `shard_map`: `global_mean(loss, axis_name="data")`
    psums both before dividing;
  * plain `jit` with a batch-sharded input: `loss.mean()` is already global.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LossSum:
  """A loss as (sum of per-item terms, number of items).

  Attributes:
    total: float32 scalar, the sum of the per-item losses.
    count: float32 scalar, the number of items that entered `total`.
  """

  total: jax.Array
  count: jax.Array

  def mean(self) -> jax.Array:
    """`total / max(count, 1)`: 0 for an empty batch instead of NaN."""
    return normalize(self.total, self.count)

  def __add__(self, other: "LossSum") -> "LossSum":
    return LossSum(self.total + other.total, self.count + other.count)


def normalize(total: jax.Array, global_count: jax.Array) -> jax.Array:
  """Divides a summed loss (or gradient leaf) by a global item count.

  Args:
    total: a summed loss or any array (e.g. an accumulated gradient leaf).
    global_count: the number of items over the whole global batch.

  Returns:
    `total / max(global_count, 1)`.
  """
  return total / jnp.maximum(jnp.asarray(global_count, jnp.float32), 1.0)


def global_mean(loss: LossSum, axis_name: str | tuple[str, ...] | None = None
                ) -> jax.Array:
  """The mean over the global batch.

  Args:
    loss: this shard's (or micro-batch's) `LossSum`.
    axis_name: mapped axis name(s) to sum over (inside `shard_map`/`pmap`);
      None when `loss` already covers the global batch.

  Returns:
    float32 scalar, `psum(total) / max(psum(count), 1)`.
  """
  total, count = loss.total, loss.count
  if axis_name is not None:
    total = jax.lax.psum(total, axis_name)
    count = jax.lax.psum(count, axis_name)
  return normalize(total, count)
