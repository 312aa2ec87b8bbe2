"""GGUF metadata -> `ModelConfig` (architectures llama and gemma3).

llama.cpp's converter leaves out facts that llama.cpp hard-codes per
architecture; where the metadata is silent we use llama.cpp's constants and
say so in a comment.
"""

from __future__ import annotations

import numpy as np

from alm.models.config import GGUF_ARCHITECTURES, ConfigError, ModelConfig, RopeScaling

def _gguf_source(source):
  """A path, `alm.models.gguf_file.GGUFFile` or `gguf.GGUFReader` -> (get(key), has_tensor(name))."""
  from alm.models.gguf_file import GGUFFile  # pylint: disable=import-outside-toplevel

  if isinstance(source, (str, bytes)) or hasattr(source, "__fspath__"):
    source = GGUFFile(source)
  if isinstance(source, GGUFFile):
    return source.get, source.has_tensor
  # gguf.GGUFReader
  names = {t.name for t in source.tensors}

  def get(key, default=None):
    f = source.fields.get(key)
    if f is None:
      return default
    if key == "tokenizer.ggml.tokens":
      return [None] * len(f.data)
    return f.contents()

  return get, names.__contains__


def from_gguf(source) -> ModelConfig:
  """`ModelConfig.from_gguf`: see there."""
  field, has_tensor = _gguf_source(source)
  arch = field("general.architecture")
  if arch not in GGUF_ARCHITECTURES:
    raise ConfigError(
        f"GGUF architecture {arch!r} is not supported; alm loads GGUF files of architectures "
        f"{', '.join(GGUF_ARCHITECTURES)} (other families load from an HF safetensors "
        "directory).")

  def need(key: str):
    v = field(f"{arch}.{key}")
    if v is None:
      raise ConfigError(f"GGUF metadata {arch}.{key} is missing; cannot build the config.")
    return v

  n_layers = int(need("block_count"))
  d = int(need("embedding_length"))
  n_heads = int(need("attention.head_count"))
  n_kv = field(f"{arch}.attention.head_count_kv", n_heads)
  if isinstance(n_kv, list):
    raise ConfigError("GGUF per-layer head_count_kv is not supported.")
  head_dim = int(field(f"{arch}.attention.key_length", d // n_heads))
  value_dim = int(field(f"{arch}.attention.value_length", head_dim))
  if value_dim != head_dim:
    raise ConfigError(f"GGUF key_length {head_dim} != value_length {value_dim} is not supported.")
  rope_dims = field(f"{arch}.rope.dimension_count")
  if rope_dims is not None and int(rope_dims) != head_dim:
    raise ConfigError(f"GGUF rope.dimension_count {rope_dims} != head dim {head_dim}: partial "
                      "rotary embeddings are not implemented.")
  vocab = field(f"{arch}.vocab_size")
  if vocab is None:
    tokens = field("tokenizer.ggml.tokens")
    if tokens is None:
      raise ConfigError(f"GGUF has neither {arch}.vocab_size nor tokenizer.ggml.tokens.")
    vocab = len(tokens)
  rope_scaling = None
  scaling_type = field(f"{arch}.rope.scaling.type")
  if scaling_type not in (None, "none"):
    if scaling_type != "linear":
      raise ConfigError(f"GGUF rope.scaling.type {scaling_type!r} is not implemented (only "
                        "'linear').")
    rope_scaling = RopeScaling("linear", float(need("rope.scaling.factor")))
  if has_tensor("rope_freqs.weight"):
    raise ConfigError(
        "This GGUF stores Llama 3 RoPE frequency factors (rope_freqs.weight), which alm does not "
        "read from GGUF; load the HF safetensors directory of this model instead (its "
        "rope_scaling 'llama3' is supported).")
  bos = field("tokenizer.ggml.bos_token_id")
  eos = field("tokenizer.ggml.eos_token_id")
  pad = field("tokenizer.ggml.padding_token_id")
  common = dict(
      vocab_size=int(vocab), hidden_size=d, intermediate_size=int(need("feed_forward_length")),
      num_layers=n_layers, num_heads=n_heads, num_kv_heads=int(n_kv), head_dim=head_dim,
      # GGUF stores float32: 1e-5 reads as 9.9999997e-06; keep the decimal value.
      rms_norm_eps=float(str(np.float32(need("attention.layer_norm_rms_epsilon")))),
      max_position_embeddings=int(field(f"{arch}.context_length", 8192)),
      tie_embeddings=not has_tensor("output.weight"),
      bos_token_id=None if bos is None else int(bos),
      eos_token_id=None if eos is None else int(eos),
      pad_token_id=None if pad is None else int(pad),
      rope_scaling=rope_scaling,
  )
  if arch == "llama":
    return ModelConfig(
        family="llama", rope_theta=float(field("llama.rope.freq_base", 10000.0)),
        activation="silu", qkv_bias=has_tensor("blk.0.attn_q.bias"),
        out_bias=has_tensor("blk.0.attn_output.bias"),
        mlp_bias=has_tensor("blk.0.ffn_up.bias"), **common)
  # gemma3. GGUF files from llama.cpp's converter omit facts that llama.cpp
  # hard-codes; use the metadata where present and llama.cpp's constants
  # otherwise: every 6th layer global, local RoPE base 1e4, query scale
  # head_dim ** -0.5 except the 27B model (62 layers), which uses d / n_heads.
  pattern = int(field("gemma3.attention.sliding_window_pattern", 6))
  layer_types = tuple("sliding" if (i + 1) % pattern else "full" for i in range(n_layers))
  qpas = field("gemma3.attention.query_pre_attn_scalar")
  if qpas is None:
    qpas = d // n_heads if n_layers == 62 else head_dim
  attn_cap = field("gemma3.attn_logit_softcapping")
  final_cap = field("gemma3.final_logit_softcapping")
  return ModelConfig(
      family="gemma3",
      rope_theta=float(field("gemma3.rope.freq_base", 1_000_000.0)),
      rope_local_theta=float(field("gemma3.rope.freq_base_swa", 10_000.0)),
      norm_offset=1.0, activation="gelu_tanh", qk_norm=True, sandwich_norm=True,
      embed_scale=True, query_pre_attn_scalar=float(qpas),
      attn_logit_softcap=float(attn_cap) if attn_cap else None,
      final_logit_softcap=float(final_cap) if final_cap else None,
      sliding_window=int(need("attention.sliding_window")), layer_types=layer_types, **common)
