"""Tiny random transformers of every supported family, for fast tests.

`tiny_config("gemma3")` has the switches of Gemma 3 (sandwich norms, q/k norm,
soft-capping, sliding + global layers with two RoPE bases, sqrt(D) embedding
scale) at toy sizes; `tiny_model` builds it with random weights. Norm scales
and biases are random too (not 1 / 0), so that a test comparing against an
independent forward actually exercises them.
"""

from __future__ import annotations

from typing import Literal

import jax.numpy as jnp
import numpy as np
from flax import nnx

from alm.models.config import ModelConfig, RopeScaling
from alm.models.transformer import Transformer, abstract_transformer

TinyFamily = Literal["llama", "llama3", "qwen2", "qwen3", "gemma2", "gemma3"]
TINY_FAMILIES = ("llama", "llama3", "qwen2", "qwen3", "gemma2", "gemma3")


def tiny_config(family: TinyFamily = "llama", vocab_size: int = 64, **overrides) -> ModelConfig:
  """A toy-sized config with the switches of `family`.

  Args:
    family: "llama", "llama3" (llama with Llama 3.1 RoPE scaling), "qwen2"
      (qkv bias), "qwen3" (q/k norm), "gemma2" (soft-capping, alternating
      sliding layers), "gemma3" (q/k norm, 2 RoPE bases, 5:1 sliding layers).
    vocab_size: vocabulary size.
    **overrides: any ModelConfig field.

  Returns:
    The config.
  """
  base = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=48, num_layers=2,
              num_heads=4, num_kv_heads=2, head_dim=8, rms_norm_eps=1e-6,
              max_position_embeddings=256)
  if family == "llama":
    cfg = dict(family="llama", rope_theta=10000.0, tie_embeddings=True)
  elif family == "llama3":
    cfg = dict(family="llama", rope_theta=500000.0, tie_embeddings=False,
               rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 16))
  elif family == "qwen2":
    cfg = dict(family="qwen2", rope_theta=1e6, qkv_bias=True, tie_embeddings=False)
  elif family == "qwen3":
    cfg = dict(family="qwen3", rope_theta=1e6, qk_norm=True, tie_embeddings=True)
  elif family == "gemma2":
    cfg = dict(family="gemma2", num_layers=4, norm_offset=1.0, activation="gelu_tanh",
               sandwich_norm=True, embed_scale=True, query_pre_attn_scalar=16.0,
               attn_logit_softcap=5.0, final_logit_softcap=3.0, sliding_window=4,
               layer_types=("sliding", "full", "sliding", "full"))
  elif family == "gemma3":
    cfg = dict(family="gemma3", num_layers=6, num_kv_heads=1, head_dim=16, norm_offset=1.0,
               activation="gelu_tanh", qk_norm=True, sandwich_norm=True, embed_scale=True,
               query_pre_attn_scalar=16.0, rope_theta=1e6, rope_local_theta=1e4,
               sliding_window=4, layer_types=("sliding",) * 5 + ("full",))
  else:
    raise ValueError(f"Unknown tiny family {family!r}; valid: {', '.join(TINY_FAMILIES)}.")
  return ModelConfig(**{**base, **cfg, **overrides})


def randomize_params(model: nnx.Module, seed: int = 0, *, weight_std: float = 0.2,
                     norm_std: float = 0.3, random_norms: bool = True) -> None:
  """Fills every parameter of `model` with random values (in place).

  Kernels and embeddings ~ N(0, weight_std^2) (larger than a training init so
  tiny models have peaky, non-trivial distributions); norm scales are their
  neutral value plus N(0, norm_std^2) noise and biases N(0, norm_std^2) when
  `random_norms`, else neutral (multiplier 1, bias 0). Uses numpy's RNG, so no
  JAX kernel is compiled per parameter shape.
  """
  rng = np.random.default_rng(seed)
  offset = model.cfg.norm_offset
  for path, var in nnx.iter_graph(model):
    if not isinstance(var, nnx.Param):
      continue
    shape, dtype = var.get_value().shape, var.get_value().dtype
    kind = path[-1]
    if kind in ("kernel", "embedding"):
      v = rng.normal(0.0, weight_std, shape)
    elif kind == "scale":
      v = (1.0 - offset) + (rng.normal(0.0, norm_std, shape) if random_norms else 0.0)
    else:  # bias
      v = rng.normal(0.0, norm_std, shape) if random_norms else np.zeros(shape)
    var.set_value(jnp.asarray(np.asarray(v, np.float32), dtype))


def tiny_model(family: TinyFamily = "llama", vocab_size: int = 64, *, seed: int = 0,
               dtype=jnp.float32, param_dtype=jnp.float32, random_norms: bool = True,
               **overrides) -> Transformer:
  """A tiny random `Transformer` of `family` (see `tiny_config`).

  Args:
    family: see `tiny_config`.
    vocab_size: vocabulary size.
    seed: parameter seed.
    dtype: compute dtype.
    param_dtype: parameter dtype.
    random_norms: randomize norm scales and biases (default True).
    **overrides: any ModelConfig field.

  Returns:
    The model.
  """
  cfg = tiny_config(family, vocab_size, **overrides)
  model = abstract_transformer(cfg, dtype=dtype, param_dtype=param_dtype)
  randomize_params(model, seed, random_norms=random_norms)
  return model
