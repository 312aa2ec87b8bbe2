"""One Flax NNX decoder-only transformer for Llama, Qwen2/3 and Gemma2/3.

Family differences are switches of `ModelConfig` (biases, q/k norm, sandwich
norms, soft-capping, embedding scaling, sliding-window layers, two RoPE bases).
Parameters are stored in `param_dtype` and cast to the compute `dtype` at use;
RMSNorm, RoPE and the attention softmax always run in float32.

Every parameter carries logical sharding axes in its `out_sharding` metadata
(see `alm.models.sharding`); `shard_model(model, mesh)` places it on a mesh.

Conventions:
  * `hidden_states[0]` is the embedding output (after Gemma's sqrt(D) scale),
    `hidden_states[l]` the residual stream after block l (1..L), before the
    final norm; `model.unembed(hidden_states[L])` gives the logits.
  * Causality and sliding windows are by slot index (like HF); `positions` only
    feed RoPE. By default positions count the real tokens of each row
    (`cumsum(attention_mask) - 1`, restarting at every new `segment_ids`
    value), so left padding and packed documents get the positions they would
    have alone.
"""

from __future__ import annotations

import contextvars
import math
from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from alm.models.config import ModelConfig, RopeScaling

Array = jax.Array
_NEG = -0.7 * float(np.finfo(np.float32).max)  # finite: fully-masked rows stay NaN-free


class InputError(ValueError):
  """Bad input to the model (shape, dtype, token id out of range)."""


# Building blocks ------------------------------------------------------------------


# When set, parameters are created as shape/dtype placeholders (no random
# numbers are drawn); loaders fill them from a checkpoint. Much faster than
# `nnx.eval_shape`, which traces every initializer.
_ABSTRACT_INIT = contextvars.ContextVar("alm_abstract_init", default=False)


def _normal(rngs: nnx.Rngs, shape: tuple[int, ...], dtype, std: float):
  if _ABSTRACT_INIT.get():
    return jax.ShapeDtypeStruct(shape, dtype)
  return (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)


def _full(shape: tuple[int, ...], value: float, dtype):
  if _ABSTRACT_INIT.get():
    return jax.ShapeDtypeStruct(shape, dtype)
  return jnp.full(shape, value, dtype)


def _param(value: Array, names: tuple[str | None, ...]) -> nnx.Param:
  # Sharding is applied explicitly by `alm.models.sharding.shard_model`, so
  # creation never needs a mesh in context (no eager sharding).
  return nnx.Param(value, out_sharding=names, eager_sharding=False)


class Dense(nnx.Module):
  """y = x @ kernel (+ bias), kernel [in, out] with logical axes `names`."""

  def __init__(self, d_in: int, d_out: int, names: tuple[str, str], *, bias: bool,
               rngs: nnx.Rngs, dtype, param_dtype, std: float = 0.02):
    self.kernel = _param(_normal(rngs, (d_in, d_out), param_dtype, std), names)
    self.bias = _param(_full((d_out,), 0.0, param_dtype), (names[1],)) if bias else None
    self.dtype = dtype

  def __call__(self, x: Array) -> Array:
    y = jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y


class RMSNorm(nnx.Module):
  """x / rms(x) * (offset + scale), computed in float32.

  Gemma stores `scale` around 0 and uses offset 1; Llama/Qwen store it around
  1 and use offset 0. Initialised so that the multiplier is 1.
  """

  def __init__(self, dim: int, *, eps: float, offset: float, param_dtype,
               axis_name: str = "norm"):
    self.scale = _param(_full((dim,), 1.0 - offset, param_dtype), (axis_name,))
    self.eps = eps
    self.offset = offset

  def __call__(self, x: Array) -> Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * (self.offset + self.scale[...].astype(jnp.float32))).astype(x.dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> np.ndarray:
  """RoPE inverse frequencies [head_dim / 2] (float64), with HF's scalings."""
  inv = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
  if scaling is None:
    return inv
  if scaling.rope_type == "linear":
    return inv / scaling.factor
  # llama3: long wavelengths slowed by `factor`, short kept, smooth in between.
  old = scaling.original_max_position_embeddings
  low_wl = old / scaling.low_freq_factor
  high_wl = old / scaling.high_freq_factor
  wl = 2 * math.pi / inv
  scaled = np.where(wl > low_wl, inv / scaling.factor, inv)
  smooth = (old / wl - scaling.low_freq_factor) / (scaling.high_freq_factor
                                                    - scaling.low_freq_factor)
  smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
  medium = (wl >= high_wl) & (wl <= low_wl)
  return np.where(medium, smoothed, scaled)


def apply_rope(x: Array, positions: Array, inv_freq: np.ndarray) -> Array:
  """Rotate-half RoPE. x [B, T, N, hd], positions [B, T] -> [B, T, N, hd]."""
  ang = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)  # [B,T,hd/2]
  cos = jnp.cos(ang)[:, :, None, :]
  sin = jnp.sin(ang)[:, :, None, :]
  x32 = x.astype(jnp.float32)
  x1, x2 = jnp.split(x32, 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


@flax.struct.dataclass
class KVCache:
  """Key/value cache for generation.

  Attributes:
    keys: per layer [B, S, K, hd].
    values: per layer [B, S, K, hd].
    key_mask: [B, S] bool, True where a slot holds a real (non-padding) token.
    next_position: [B] int32, the RoPE position of the next real token.
    index: int32 scalar, the next slot to write.
  """

  keys: tuple[Array, ...]
  values: tuple[Array, ...]
  key_mask: Array
  next_position: Array
  index: Array

  @property
  def max_length(self) -> int:
    return int(self.key_mask.shape[1])


@flax.struct.dataclass
class ModelOutput:
  """What `Transformer.__call__` returns.

  Attributes:
    logits: [B, T, V] in the compute dtype.
    hidden_states: {layer: [B, T, D]} for the requested `hidden_layers`.
    cache: the updated KVCache, or None when no cache was passed.
  """

  logits: Array
  hidden_states: dict[int, Array]
  cache: KVCache | None


class Attention(nnx.Module):
  """Grouped-query attention with optional q/k norm, soft-capping and sliding window."""

  def __init__(self, cfg: ModelConfig, layer: int, *, rngs: nnx.Rngs, dtype, param_dtype):
    d, h, k, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.q_proj = Dense(d, h * hd, ("embed", "heads"), bias=cfg.qkv_bias, **kw)
    self.k_proj = Dense(d, k * hd, ("embed", "kv_heads"), bias=cfg.qkv_bias, **kw)
    self.v_proj = Dense(d, k * hd, ("embed", "kv_heads"), bias=cfg.qkv_bias, **kw)
    self.o_proj = Dense(h * hd, d, ("heads", "embed"), bias=cfg.out_bias, **kw)
    if cfg.qk_norm:
      nkw = dict(eps=cfg.rms_norm_eps, offset=cfg.norm_offset, param_dtype=param_dtype,
                 axis_name="head_dim")
      self.q_norm = RMSNorm(hd, **nkw)
      self.k_norm = RMSNorm(hd, **nkw)
    else:
      self.q_norm = self.k_norm = None
    self.num_heads, self.num_kv_heads, self.head_dim = h, k, hd
    self.inv_freq = nnx.static(tuple(rope_inv_freq(hd, cfg.layer_rope_theta(layer),
                                                   cfg.layer_rope_scaling(layer)).tolist()))
    self.scale = cfg.attn_scale
    self.softcap = cfg.attn_logit_softcap
    self.dtype = dtype

  def __call__(self, x: Array, positions: Array, mask: Array,
               kv: tuple[Array, Array] | None, index: Array | None
               ) -> tuple[Array, tuple[Array, Array] | None]:
    b, t, _ = x.shape
    q = self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim)
    k = self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
    v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    inv_freq = np.asarray(self.inv_freq)
    q = apply_rope(q, positions, inv_freq)
    k = apply_rope(k, positions, inv_freq)
    if kv is not None:
      ck, cv = kv
      k = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), (0, index, 0, 0))  # [B,S,K,hd]
      v = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), (0, index, 0, 0))
      kv = (k, v)
    g = self.num_heads // self.num_kv_heads
    q = q.reshape(b, t, self.num_kv_heads, g, self.head_dim)
    logits = jnp.einsum("btkgh,bskh->bkgts", q.astype(self.dtype), k.astype(self.dtype),
                        preferred_element_type=jnp.float32) * self.scale  # [B,K,G,T,S]
    if self.softcap:
      logits = self.softcap * jnp.tanh(logits / self.softcap)
    logits = jnp.where(mask[:, None, None], logits, _NEG)
    probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bkgts,bskh->btkgh", probs.astype(self.dtype), v.astype(self.dtype))
    out = out.reshape(b, t, self.num_heads * self.head_dim)
    return self.o_proj(out), kv


class MLP(nnx.Module):
  """Gated MLP: down(act(gate(x)) * up(x))."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
    d, f = cfg.hidden_size, cfg.intermediate_size
    kw = dict(bias=cfg.mlp_bias, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.gate_proj = Dense(d, f, ("embed", "mlp"), **kw)
    self.up_proj = Dense(d, f, ("embed", "mlp"), **kw)
    self.down_proj = Dense(f, d, ("mlp", "embed"), **kw)
    self.activation = cfg.activation

  def __call__(self, x: Array) -> Array:
    gate = self.gate_proj(x)
    if self.activation == "silu":
      gate = jax.nn.silu(gate)
    else:
      gate = jax.nn.gelu(gate, approximate=True)
    return self.down_proj(gate * self.up_proj(x))


class Block(nnx.Module):
  """Pre-norm block; Gemma adds post-norms on both branches (sandwich norms)."""

  def __init__(self, cfg: ModelConfig, layer: int, *, rngs: nnx.Rngs, dtype, param_dtype):
    nkw = dict(eps=cfg.rms_norm_eps, offset=cfg.norm_offset, param_dtype=param_dtype)
    self.attn_norm = RMSNorm(cfg.hidden_size, **nkw)
    self.attn = Attention(cfg, layer, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.mlp_norm = RMSNorm(cfg.hidden_size, **nkw)
    self.mlp = MLP(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    if cfg.sandwich_norm:
      self.post_attn_norm = RMSNorm(cfg.hidden_size, **nkw)
      self.post_mlp_norm = RMSNorm(cfg.hidden_size, **nkw)
    else:
      self.post_attn_norm = self.post_mlp_norm = None
    self.sliding = cfg.layer_types[layer] == "sliding"

  def __call__(self, x, positions, mask, kv, index):
    h, kv = self.attn(self.attn_norm(x), positions, mask, kv, index)
    if self.post_attn_norm is not None:
      h = self.post_attn_norm(h)
    x = x + h
    h = self.mlp(self.mlp_norm(x))
    if self.post_mlp_norm is not None:
      h = self.post_mlp_norm(h)
    return x + h, kv


class Embedder(nnx.Module):
  """The input embedding table [V, D] (logical axes ("vocab", "embed"))."""

  def __init__(self, vocab_size: int, dim: int, *, rngs: nnx.Rngs, param_dtype):
    self.embedding = _param(_normal(rngs, (vocab_size, dim), param_dtype, 0.02),
                            ("vocab", "embed"))


# Input checks -----------------------------------------------------------------------


def _is_concrete(x) -> bool:
  return not isinstance(x, jax.core.Tracer)


def check_token_ids(ids, vocab_size: int, name: str = "input_ids") -> None:
  """Raises InputError if concrete `ids` are not an int [B, T] array in [0, vocab_size).

  Inside `jax.jit` the values are unknown, so only shape and dtype are checked;
  call this before a jitted forward when ids come from outside.

  Args:
    ids: token ids.
    vocab_size: the model's vocabulary size.
    name: the argument name used in messages.
  """
  if not hasattr(ids, "dtype"):
    ids = np.asarray(ids)
  shape, dtype = tuple(ids.shape), ids.dtype
  if len(shape) != 2:
    raise InputError(f"{name} must have shape [batch, length], got shape {shape}; "
                     "wrap a single sequence as ids[None].")
  if not jnp.issubdtype(dtype, jnp.integer):
    raise InputError(f"{name} must be an integer array, got dtype {dtype}.")
  if _is_concrete(ids) and np.size(ids):
    a = np.asarray(ids)
    bad = (a < 0) | (a >= vocab_size)
    if bad.any():
      b, t = np.argwhere(bad)[0]
      raise InputError(
          f"{name}[{b}, {t}] = {a[b, t]} is out of range: this model's vocabulary has "
          f"{vocab_size} ids (0..{vocab_size - 1}); {int(bad.sum())} ids are out of range. "
          "Was the text encoded with a different tokenizer?")


def _default_positions(attention_mask: Array, segment_ids: Array | None) -> Array:
  """Position of each token among the real tokens of its row / segment. [B, T] int32."""
  m = attention_mask.astype(jnp.int32)
  count = jnp.cumsum(m, axis=1)  # real tokens up to and including t
  if segment_ids is None:
    return jnp.maximum(count - 1, 0)
  # Restart the count at each segment change: subtract the count before the
  # segment's first token (a running max of "count at segment starts").
  start = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool),
                           segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
  before = jnp.where(start, count - m, 0)
  before = jax.lax.cummax(before, axis=1)
  return jnp.maximum(count - before - 1, 0)


# The model -------------------------------------------------------------------------


class Transformer(nnx.Module):
  """Decoder-only transformer (Llama / Qwen2 / Qwen3 / Gemma2 / Gemma3).

  Args:
    cfg: the architecture.
    rngs: random streams for parameter init (`nnx.Rngs(seed)`).
    dtype: compute dtype (e.g. jnp.bfloat16).
    param_dtype: storage dtype of parameters.
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32):
    self.cfg = nnx.static(cfg)
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.embedder = Embedder(cfg.vocab_size, cfg.hidden_size, rngs=rngs, param_dtype=param_dtype)
    self.layers = nnx.List([Block(cfg, i, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
                            for i in range(cfg.num_layers)])
    self.final_norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, offset=cfg.norm_offset,
                              param_dtype=param_dtype)
    if cfg.tie_embeddings:
      self.lm_head = None
    else:
      self.lm_head = Dense(cfg.hidden_size, cfg.vocab_size, ("embed", "vocab"), bias=False,
                           rngs=rngs, dtype=dtype, param_dtype=param_dtype)

  # Pieces other code reuses (embedding transfer, byte students, losses). -----

  def embed(self, input_ids: Array) -> Array:
    """Input embeddings of `input_ids` [B, T] -> [B, T, D] (Gemma's sqrt(D) included)."""
    x = jnp.take(self.embedder.embedding[...], input_ids, axis=0).astype(self.dtype)
    if self.cfg.embed_scale:
      # HF casts the scale to the compute dtype first; do the same for bf16 parity.
      x = x * jnp.asarray(math.sqrt(self.cfg.hidden_size), self.dtype)
    return x

  def unembed(self, h: Array) -> Array:
    """Logits [B, T, V] from the last block's residual stream h [B, T, D].

    Applies the final norm, the (tied or separate) output projection and the
    final logit soft-cap.
    """
    h = self.final_norm(h.astype(self.dtype))
    if self.lm_head is None:
      logits = jnp.dot(h, self.embedder.embedding[...].astype(self.dtype).T)
    else:
      logits = self.lm_head(h)
    cap = self.cfg.final_logit_softcap
    if cap:
      logits = cap * jnp.tanh(logits / cap)
    return logits

  def logits_at(self, input_ids: Array, *, attention_mask: Array | None = None,
                at: Array) -> Array:
    """Logits [B, K, V] at positions `at` [B, K] of the forward over `input_ids`.

    The output layer runs on the K gathered positions only when this is traced
    under `jit` (the full logits of `__call__` are then unused and removed);
    what scoring a few tokens after a long context needs (`alm.eval.scoring`).
    """
    return self.unembed_at(self.final_hidden(input_ids, attention_mask=attention_mask), at)

  def final_hidden(self, input_ids: Array, *, attention_mask: Array | None = None) -> Array:
    """The last block's residual stream [B, T, D] (what `unembed_at` reads).

    With `unembed_at`, the two halves of `logits_at`: scoring runs the body
    once and the output layer on blocks of positions (`alm.eval.scoring`).
    """
    out = self(input_ids, attention_mask=attention_mask, hidden_layers=(-1,))
    return out.hidden_states[self.cfg.num_layers]

  def unembed_at(self, hidden: Array, at: Array) -> Array:
    """Logits [B, K, V] at positions `at` [B, K] of `hidden` (from `final_hidden`)."""
    return self.unembed(jnp.take_along_axis(hidden, at[..., None], axis=1))

  def init_cache(self, batch_size: int, max_length: int, dtype=None) -> KVCache:
    """An empty KV cache for `batch_size` rows of up to `max_length` tokens."""
    c = self.cfg
    dtype = dtype or self.dtype
    shape = (batch_size, max_length, c.num_kv_heads, c.head_dim)
    zeros = tuple(jnp.zeros(shape, dtype) for _ in range(c.num_layers))
    return KVCache(keys=zeros, values=tuple(jnp.zeros(shape, dtype) for _ in range(c.num_layers)),
                   key_mask=jnp.zeros((batch_size, max_length), bool),
                   next_position=jnp.zeros((batch_size,), jnp.int32),
                   index=jnp.zeros((), jnp.int32))

  def __call__(self, input_ids: Array | None = None, *, inputs_embeds: Array | None = None,
               positions: Array | None = None, segment_ids: Array | None = None,
               attention_mask: Array | None = None, cache: KVCache | None = None,
               hidden_layers: Sequence[int] = ()) -> ModelOutput:
    """Runs the model.

    Args:
      input_ids: int [B, T] token ids (exactly one of input_ids / inputs_embeds).
      inputs_embeds: [B, T, D] input embeddings used instead of `embed(ids)`
        (they must already include any embedding scaling).
      positions: int [B, T] RoPE positions (default: see module docstring).
      segment_ids: int [B, T] document ids of packed sequences; tokens attend
        only within their own segment. Not supported together with `cache`.
      attention_mask: bool/int [B, T], 1 for real tokens, 0 for padding.
        Padding keys are never attended to; outputs at padding are undefined.
      cache: a KVCache (from `init_cache`) to extend; the new keys go to slots
        `cache.index .. cache.index + T - 1`.
      hidden_layers: which residual-stream states to return: 0 = embeddings,
        l = after block l, negative counts from L (-1 = after the last block).

    Returns:
      ModelOutput with logits [B, T, V], the requested hidden states and the
      updated cache (None without one).

    Raises:
      InputError: bad shapes/dtypes, both or neither of ids and embeddings,
        token ids out of range (checked when the ids are concrete values),
        a hidden layer out of range, a cache that is too short.
    """
    cfg = self.cfg
    if (input_ids is None) == (inputs_embeds is None):
      raise InputError("Pass exactly one of input_ids and inputs_embeds.")
    if input_ids is not None:
      check_token_ids(input_ids, cfg.vocab_size)
      x = self.embed(input_ids)
    else:
      if inputs_embeds.ndim != 3 or inputs_embeds.shape[-1] != cfg.hidden_size:
        raise InputError(f"inputs_embeds must have shape [batch, length, {cfg.hidden_size}], "
                         f"got {inputs_embeds.shape}.")
      x = inputs_embeds.astype(self.dtype)
    b, t, _ = x.shape
    for name, arr in (("positions", positions), ("segment_ids", segment_ids),
                      ("attention_mask", attention_mask)):
      if arr is not None and tuple(arr.shape) != (b, t):
        raise InputError(f"{name} must have shape [batch, length] = {(b, t)}, got {arr.shape}.")
    n_layers = cfg.num_layers
    wanted = []
    for layer in hidden_layers:
      norm = layer + n_layers + 1 if layer < 0 else layer
      if not 0 <= norm <= n_layers:
        raise InputError(f"hidden layer {layer} is out of range for a {n_layers}-layer model "
                         f"(valid: 0..{n_layers} or -{n_layers + 1}..-1).")
      wanted.append(norm)
    if segment_ids is not None and cache is not None:
      raise InputError("segment_ids (packed documents) cannot be combined with a KV cache; "
                       "use attention_mask padding for batched generation.")

    valid = (jnp.ones((b, t), bool) if attention_mask is None
             else jnp.asarray(attention_mask).astype(bool))
    if positions is None:
      positions = _default_positions(valid, segment_ids)
      if cache is not None:
        positions = positions + cache.next_position[:, None]

    if cache is None:
      q_idx = k_idx = jnp.arange(t)
      key_valid = valid
      index = None
    else:
      if _is_concrete(cache.index) and int(cache.index) + t > cache.max_length:
        raise InputError(f"The KV cache holds {cache.max_length} tokens; writing {t} more at "
                         f"slot {int(cache.index)} overflows it. Use a longer init_cache.")
      index = cache.index
      q_idx = index + jnp.arange(t)
      k_idx = jnp.arange(cache.max_length)
      key_valid = jax.lax.dynamic_update_slice(cache.key_mask, valid, (0, index))
    mask = (k_idx[None, :] <= q_idx[:, None])[None] & key_valid[:, None, :]  # [B,T,S]
    if segment_ids is not None:
      mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
    sliding_mask = None
    if cfg.sliding_window and "sliding" in cfg.layer_types:
      sliding_mask = mask & ((q_idx[:, None] - k_idx[None, :]) < cfg.sliding_window)[None]

    hidden = {}
    if 0 in wanted:
      hidden[0] = x
    new_keys, new_values = [], []
    for i, block in enumerate(self.layers):
      kv = None if cache is None else (cache.keys[i], cache.values[i])
      m = sliding_mask if block.sliding else mask
      x, kv = block(x, positions, m, kv, index)
      if kv is not None:
        new_keys.append(kv[0])
        new_values.append(kv[1])
      if i + 1 in wanted:
        hidden[i + 1] = x
    logits = self.unembed(x)
    new_cache = None
    if cache is not None:
      new_cache = KVCache(keys=tuple(new_keys), values=tuple(new_values), key_mask=key_valid,
                          next_position=cache.next_position + valid.sum(axis=1).astype(jnp.int32),
                          index=cache.index + t)
    return ModelOutput(logits=logits, hidden_states=hidden, cache=new_cache)


def abstract_transformer(cfg: ModelConfig, *, dtype=jnp.float32,
                         param_dtype=jnp.float32) -> Transformer:
  """A Transformer whose parameters are `jax.ShapeDtypeStruct` placeholders.

  Loaders fill every parameter with `var.set_value(array)`; nothing is
  random-initialised or traced.
  """
  token = _ABSTRACT_INIT.set(True)
  try:
    return Transformer(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype)
  finally:
    _ABSTRACT_INIT.reset(token)
