"""The embedding projector (docs/method.md §8): identity at step 0, learned after.

    y = x + W_out(norm(blocks(x)))        W_out zero-initialised

`blocks` is a small stack of pre-norm transformer blocks (multi-head
self-attention + MLP, residual) applied to every token embedding on its own,
as a sequence of length 1: embeddings of different tokens never mix, so the
projector can be applied to the whole table [V, D] once per step or to the
gathered embeddings [B, T, D], with the same result. Defaults follow the paper
(3 layers, 12 heads, MLP x2). Because `W_out` starts at zero, the projector is
exactly the identity at initialisation (tested), so training starts from the
FVT embeddings.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx


@dataclasses.dataclass(frozen=True)
class ProjectorConfig:
  """Size of the embedding projector.

  Attributes:
    num_layers: transformer blocks.
    num_heads: attention heads (must divide the embedding width).
    mlp_ratio: MLP hidden width as a multiple of the embedding width.
    eps: RMSNorm epsilon.
  """

  num_layers: int = 3
  num_heads: int = 12
  mlp_ratio: int = 2
  eps: float = 1e-6

  def __post_init__(self):
    for name in ("num_layers", "num_heads", "mlp_ratio"):
      if getattr(self, name) < 1:
        raise ValueError(f"ProjectorConfig.{name} must be >= 1, got {getattr(self, name)}.")


class _Block(nnx.Module):
  """Pre-norm attention + MLP block over a [N, S, D] batch of short sequences."""

  def __init__(self, dim: int, cfg: ProjectorConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype, use_bias=False)
    self.norm1 = nnx.RMSNorm(dim, epsilon=cfg.eps, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.attn = nnx.MultiHeadAttention(num_heads=cfg.num_heads, in_features=dim, decode=False,
                                       **kw)
    self.norm2 = nnx.RMSNorm(dim, epsilon=cfg.eps, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.up = nnx.Linear(dim, cfg.mlp_ratio * dim, **kw)
    self.down = nnx.Linear(cfg.mlp_ratio * dim, dim, **kw)

  def __call__(self, x):
    x = x + self.attn(self.norm1(x))  # [N, S, D]
    return x + self.down(jax.nn.gelu(self.up(self.norm2(x))))


class EmbeddingProjector(nnx.Module):
  """Learned residual map of token embeddings, the identity at initialisation.

  Args:
    dim: embedding width D.
    cfg: sizes (default: 3 layers, 12 heads, MLP x2).
    rngs: parameter init streams.
    dtype: compute dtype.
    param_dtype: parameter dtype.
  """

  def __init__(self, dim: int, cfg: ProjectorConfig | None = None, *, rngs: nnx.Rngs,
               dtype=jnp.float32, param_dtype=jnp.float32):
    cfg = cfg or ProjectorConfig()
    if dim % cfg.num_heads:
      raise ValueError(f"The projector's num_heads={cfg.num_heads} must divide the embedding "
                       f"width {dim}; pick a divisor (e.g. {_divisors(dim)}).")
    self.cfg = nnx.static(cfg)
    self.blocks = nnx.List([_Block(dim, cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
                            for _ in range(cfg.num_layers)])
    self.final_norm = nnx.RMSNorm(dim, epsilon=cfg.eps, rngs=rngs, dtype=dtype,
                                  param_dtype=param_dtype)
    # Zero-initialised last layer: y == x exactly at step 0.
    self.out = nnx.Linear(dim, dim, use_bias=False, kernel_init=nnx.initializers.zeros,
                          rngs=rngs, dtype=dtype, param_dtype=param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    """Projects embeddings x [..., D] -> [..., D], each token independently."""
    shape = x.shape
    h = x.reshape(-1, 1, shape[-1])  # every embedding a sequence of length 1: [N, 1, D]
    for blk in self.blocks:
      h = blk(h)
    delta = self.out(self.final_norm(h)).reshape(shape)
    return x + delta.astype(x.dtype)


def _divisors(n: int) -> list[int]:
  return [d for d in range(1, min(n, 64) + 1) if n % d == 0]
