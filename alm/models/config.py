"""`ModelConfig`: one typed description of every decoder-only family we run.

Llama (incl. Llama 3.x RoPE scaling; SmolLM2 is a Llama), Qwen2/Qwen3 and
Gemma2/Gemma3 differ only in a handful of switches (biases, q/k norms,
sandwich norms, soft-capping, embedding scaling, local/global layers), so they
share one config and one implementation (`alm.models.transformer`).

Two constructors read foreign formats and fail loudly on anything they do not
understand, instead of silently computing something else (penzai's habit):
`ModelConfig.from_hf_config(config_json_dict)` and
`ModelConfig.from_gguf(gguf_reader)`. `to_hf_config()` writes the HF form back.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, get_args

import numpy as np

Family = Literal["llama", "qwen2", "qwen3", "gemma2", "gemma3"]
Activation = Literal["silu", "gelu_tanh"]
LayerType = Literal["full", "sliding"]
RopeType = Literal["llama3", "linear"]

FAMILIES: tuple[str, ...] = get_args(Family)
GGUF_ARCHITECTURES = ("llama", "gemma3")


class ConfigError(ValueError):
  """A model configuration is invalid or uses a feature alm does not implement."""


def _check_literal(name: str, value: Any, literal: Any) -> None:
  valid = get_args(literal)
  if value not in valid:
    raise ConfigError(f"{name}={value!r} is not valid; valid values: {', '.join(map(repr, valid))}.")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """RoPE frequency scaling (HF `rope_scaling`).

  Attributes:
    rope_type: "llama3" (Llama 3.1+ smooth long-context scaling) or "linear"
      (positions divided by `factor`; Gemma 3 global layers of the larger
      models).
    factor: the scaling factor.
    low_freq_factor: llama3 only.
    high_freq_factor: llama3 only.
    original_max_position_embeddings: llama3 only.
  """

  rope_type: RopeType
  factor: float
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192

  def __post_init__(self):
    _check_literal("rope_scaling.rope_type", self.rope_type, RopeType)
    if self.factor <= 0:
      raise ConfigError(f"rope_scaling.factor must be > 0, got {self.factor}.")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture of a decoder-only transformer.

  Attributes:
    family: which HF family the checkpoint comes from (decides the HF tensor
      and config names; the math is fully described by the fields below).
    vocab_size: rows of the embedding table.
    hidden_size: residual stream width D.
    intermediate_size: gated-MLP width F.
    num_layers: number of blocks L.
    num_heads: query heads H.
    num_kv_heads: key/value heads K (H % K == 0; grouped-query attention).
    head_dim: per-head width.
    rope_theta: RoPE base of full-attention layers.
    rope_local_theta: RoPE base of sliding-window layers (Gemma 3); None means
      `rope_theta`.
    rope_scaling: RoPE scaling of full-attention layers (sliding layers never
      scale, as in HF Gemma 3).
    rms_norm_eps: epsilon of every RMSNorm.
    norm_offset: RMSNorm multiplies by `offset + scale`; 1.0 for Gemma (whose
      checkpoints store `scale` around 0), 0.0 otherwise.
    activation: "silu" (Llama/Qwen) or "gelu_tanh" (Gemma).
    tie_embeddings: the output projection is the transposed input embedding.
    qkv_bias: biases on q/k/v projections (Qwen2; Llama `attention_bias`).
    out_bias: bias on the attention output projection (Llama `attention_bias`).
    mlp_bias: biases on the MLP projections (Llama `mlp_bias`).
    qk_norm: RMSNorm over head_dim on queries and keys before RoPE (Qwen3,
      Gemma 3).
    sandwich_norm: extra RMSNorms on the attention and MLP outputs before the
      residual add (Gemma 2/3).
    embed_scale: multiply input embeddings by sqrt(hidden_size) (Gemma).
    query_pre_attn_scalar: attention logits are scaled by this ** -0.5; None
      means head_dim.
    attn_logit_softcap: `c * tanh(logits / c)` on attention logits (Gemma 2).
    final_logit_softcap: the same on output logits (Gemma 2).
    sliding_window: window W of sliding layers: query i sees keys j with
      i - W < j <= i.
    layer_types: "full" or "sliding" per layer (length num_layers).
    max_position_embeddings: informational (the context length trained for).
    bos_token_id, eos_token_id, pad_token_id: informational, written back to
      HF configs.
  """

  family: Family
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rope_theta: float = 10000.0
  rope_local_theta: float | None = None
  rope_scaling: RopeScaling | None = None
  rms_norm_eps: float = 1e-6
  norm_offset: float = 0.0
  activation: Activation = "silu"
  tie_embeddings: bool = True
  qkv_bias: bool = False
  out_bias: bool = False
  mlp_bias: bool = False
  qk_norm: bool = False
  sandwich_norm: bool = False
  embed_scale: bool = False
  query_pre_attn_scalar: float | None = None
  attn_logit_softcap: float | None = None
  final_logit_softcap: float | None = None
  sliding_window: int | None = None
  layer_types: tuple[LayerType, ...] = ()
  max_position_embeddings: int = 8192
  bos_token_id: int | None = None
  eos_token_id: int | tuple[int, ...] | None = None
  pad_token_id: int | None = None

  def __post_init__(self):
    _check_literal("family", self.family, Family)
    _check_literal("activation", self.activation, Activation)
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                 "num_kv_heads", "head_dim"):
      v = getattr(self, name)
      if not isinstance(v, int) or v <= 0:
        raise ConfigError(f"{name} must be a positive int, got {v!r}.")
    if self.num_heads % self.num_kv_heads:
      raise ConfigError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                        f"({self.num_kv_heads}).")
    if self.head_dim % 2:
      raise ConfigError(f"head_dim must be even for RoPE, got {self.head_dim}.")
    if not self.layer_types:
      object.__setattr__(self, "layer_types", ("full",) * self.num_layers)
    object.__setattr__(self, "layer_types", tuple(self.layer_types))
    if isinstance(self.eos_token_id, list):
      object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
    if len(self.layer_types) != self.num_layers:
      raise ConfigError(f"layer_types has {len(self.layer_types)} entries but num_layers is "
                        f"{self.num_layers}.")
    for t in self.layer_types:
      _check_literal("layer_types[i]", t, LayerType)
    if "sliding" in self.layer_types and not self.sliding_window:
      raise ConfigError("Some layer_types are 'sliding' but sliding_window is not set.")
    if isinstance(self.rope_scaling, dict):
      object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))

  # Derived quantities -------------------------------------------------------

  @property
  def attn_scale(self) -> float:
    """The factor applied to q.k logits."""
    return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

  def layer_rope_theta(self, layer: int) -> float:
    """RoPE base of `layer` (sliding layers may use a local base)."""
    if self.layer_types[layer] == "sliding" and self.rope_local_theta is not None:
      return self.rope_local_theta
    return self.rope_theta

  def layer_rope_scaling(self, layer: int) -> RopeScaling | None:
    """RoPE scaling of `layer` (Gemma 3 scales global layers only)."""
    if self.family == "gemma3" and self.layer_types[layer] == "sliding":
      return None
    return self.rope_scaling

  def replace(self, **changes) -> ModelConfig:
    """Returns a copy with `changes` applied (validated again)."""
    return dataclasses.replace(self, **changes)

  # HF config.json -------------------------------------------------------------

  @classmethod
  def from_hf_config(cls, hf: dict[str, Any]) -> ModelConfig:
    """Builds a config from an HF `config.json` dict.

    Every attribute is either used, checked to have a value we implement, or
    on an explicit allow-list of attributes that do not change the forward
    (dtype, architectures, token ids, ...). Anything else raises.

    Args:
      hf: the parsed `config.json`.

    Returns:
      The config.

    Raises:
      ConfigError: unknown `model_type`, an attribute alm does not handle
        (the message names it), or a value of a known attribute alm does not
        implement.
    """
    return _from_hf(dict(hf))

  def to_hf_config(self) -> dict[str, Any]:
    """Returns the HF `config.json` dict of this config (transformers >= 4.50 names).

    `ModelConfig.from_hf_config(cfg.to_hf_config()) == cfg` holds for every
    config of a supported family.
    """
    return _to_hf(self)

  # GGUF -----------------------------------------------------------------------

  @classmethod
  def from_gguf(cls, source) -> ModelConfig:
    """Builds a config from the metadata of a GGUF file.

    Args:
      source: a path, an `alm.models.gguf_file.GGUFFile` or a `gguf.GGUFReader`.

    Returns:
      The config.

    Raises:
      ConfigError: the architecture is not one of `GGUF_ARCHITECTURES`, or the
        metadata asks for a feature alm does not implement.
    """
    return _from_gguf(source)


# HF conversion ------------------------------------------------------------------

_HF_MODEL_TYPES: dict[str, Family] = {
    "llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma2": "gemma2",
    "gemma3_text": "gemma3",
}
_HF_ARCHITECTURES: dict[Family, str] = {
    "llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
    "gemma2": "Gemma2ForCausalLM", "gemma3": "Gemma3ForCausalLM",
}
_FAMILY_MODEL_TYPE = {v: k for k, v in _HF_MODEL_TYPES.items()}

# Attributes that never change the forward pass.
_HF_HARMLESS = frozenset({
    "architectures", "model_type", "torch_dtype", "dtype", "transformers_version",
    "_name_or_path", "use_cache", "initializer_range", "bos_token_id", "eos_token_id",
    "pad_token_id", "tokenizer_class", "cache_implementation", "max_position_embeddings",
    "return_dict", "output_hidden_states", "output_attentions", "torchscript",
    "is_encoder_decoder", "tie_encoder_decoder", "chunk_size_feed_forward", "id2label",
    "label2id", "problem_type", "finetuning_task", "prefix", "task_specific_params",
    "unsloth_fixed", "attn_implementation", "_attn_implementation_autoset",
    "is_llama_config",  # a marker in SmolLM2's config.json
})

# HF class defaults that matter when a config.json omits the key.
_HF_DEFAULTS: dict[Family, dict[str, Any]] = {
    "llama": dict(tie_word_embeddings=False, rms_norm_eps=1e-6, rope_theta=10000.0,
                  hidden_act="silu"),
    "qwen2": dict(tie_word_embeddings=False, rms_norm_eps=1e-6, rope_theta=10000.0,
                  hidden_act="silu"),
    "qwen3": dict(tie_word_embeddings=False, rms_norm_eps=1e-6, rope_theta=10000.0,
                  hidden_act="silu"),
    "gemma2": dict(tie_word_embeddings=True, rms_norm_eps=1e-6, rope_theta=10000.0,
                   hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=256,
                   sliding_window=4096, final_logit_softcapping=30.0,
                   attn_logit_softcapping=50.0),
    "gemma3": dict(tie_word_embeddings=True, rms_norm_eps=1e-6, rope_theta=1_000_000.0,
                   rope_local_base_freq=10_000.0, hidden_activation="gelu_pytorch_tanh",
                   query_pre_attn_scalar=256, sliding_window=4096,
                   final_logit_softcapping=None, attn_logit_softcapping=None),
}

_HF_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh",
                   "gelu_tanh": "gelu_tanh"}

# Attributes each family reads (beyond the harmless ones).
_COMMON_KEYS = {"vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "head_dim", "rope_theta",
                "rope_scaling", "rope_parameters", "rms_norm_eps", "tie_word_embeddings",
                "attention_dropout", "layer_types", "hidden_act"}
_FAMILY_KEYS: dict[Family, set[str]] = {
    "llama": _COMMON_KEYS | {"attention_bias", "mlp_bias", "pretraining_tp", "rope_interleaved"},
    "qwen2": _COMMON_KEYS | {"use_sliding_window", "sliding_window", "max_window_layers",
                             "use_mrope"},
    "qwen3": _COMMON_KEYS | {"attention_bias", "use_sliding_window", "sliding_window",
                             "max_window_layers"},
    "gemma2": _COMMON_KEYS | {"hidden_activation", "query_pre_attn_scalar", "sliding_window",
                              "final_logit_softcapping", "attn_logit_softcapping",
                              "attention_bias"},
    "gemma3": _COMMON_KEYS | {"hidden_activation", "query_pre_attn_scalar", "sliding_window",
                              "final_logit_softcapping", "attn_logit_softcapping",
                              "attention_bias", "rope_local_base_freq", "sliding_window_pattern",
                              "_sliding_window_pattern", "use_bidirectional_attention"},
}


def _require_value(hf: dict, key: str, ok, what: str) -> None:
  if key in hf and hf[key] is not None and not ok(hf[key]):
    raise ConfigError(f"HF config attribute {key!r}={hf[key]!r} is not supported by alm: {what}.")


def _parse_rope_scaling(d: dict | None, key: str) -> RopeScaling | None:
  if not d:
    return None
  d = dict(d)
  rope_type = d.pop("rope_type", d.pop("type", "default"))
  d.pop("rope_theta", None)
  if rope_type == "default":
    if d:
      raise ConfigError(f"HF config {key} has unknown fields {sorted(d)} for rope_type 'default'.")
    return None
  if rope_type == "linear":
    factor = d.pop("factor")
  elif rope_type == "llama3":
    factor = d.pop("factor")
    extra = {k: d.pop(k) for k in ("low_freq_factor", "high_freq_factor",
                                   "original_max_position_embeddings") if k in d}
    if d:
      raise ConfigError(f"HF config {key} has unknown fields {sorted(d)}.")
    return RopeScaling("llama3", float(factor), **extra)
  else:
    raise ConfigError(f"HF config {key} has rope_type {rope_type!r}; alm implements 'default', "
                      "'linear' and 'llama3'.")
  if d:
    raise ConfigError(f"HF config {key} has unknown fields {sorted(d)}.")
  return RopeScaling("linear", float(factor))


def _from_hf(hf: dict[str, Any]) -> ModelConfig:
  model_type = hf.get("model_type")
  if model_type not in _HF_MODEL_TYPES:
    raise ConfigError(
        f"HF config model_type {model_type!r} is not supported; alm implements "
        f"{', '.join(sorted(_HF_MODEL_TYPES))}.")
  family = _HF_MODEL_TYPES[model_type]
  known = _FAMILY_KEYS[family] | _HF_HARMLESS
  unknown = sorted(k for k in hf if k not in known)
  if unknown:
    raise ConfigError(
        f"HF config attribute {unknown[0]!r} (value {hf[unknown[0]]!r}) is not handled by alm's "
        f"ModelConfig for model_type {model_type!r}"
        + (f" (other unhandled attributes: {unknown[1:]})" if unknown[1:] else "")
        + ". alm refuses to guess what it means; if it does not change the forward pass, "
        "remove it from config.json.")
  g = {**_HF_DEFAULTS[family], **{k: v for k, v in hf.items()}}

  _require_value(hf, "attention_dropout", lambda v: v == 0, "only 0 (alm has no dropout)")
  _require_value(hf, "pretraining_tp", lambda v: v == 1, "only 1")
  _require_value(hf, "rope_interleaved", lambda v: not v,
                 "HF Llama uses rotate-half RoPE; interleaved RoPE weights must be permuted first")
  _require_value(hf, "use_mrope", lambda v: not v, "multimodal RoPE is not implemented")
  _require_value(hf, "use_bidirectional_attention", lambda v: not v,
                 "only causal attention is implemented")
  act_key = "hidden_activation" if family.startswith("gemma") else "hidden_act"
  act = g.get(act_key) or g.get("hidden_act")
  if act not in _HF_ACTIVATIONS:
    raise ConfigError(f"HF config {act_key}={act!r} is not supported; alm implements "
                      f"{sorted(_HF_ACTIVATIONS)}.")
  if family.startswith("gemma") and "hidden_act" in hf and "hidden_activation" in hf:
    pass  # Gemma configs carry both; HF Gemma uses hidden_activation.

  n_layers = int(g["num_hidden_layers"])
  n_heads = int(g["num_attention_heads"])
  n_kv = int(g.get("num_key_value_heads") or n_heads)
  head_dim = int(g.get("head_dim") or g["hidden_size"] // n_heads)

  # RoPE: transformers >= 5 writes `rope_parameters` (possibly per layer type).
  rope_theta = float(g["rope_theta"])
  rope_local_theta = g.get("rope_local_base_freq") if family == "gemma3" else None
  rope_scaling = _parse_rope_scaling(g.get("rope_scaling"), "rope_scaling")
  rp = g.get("rope_parameters")
  if rp:
    if "full_attention" in rp or "sliding_attention" in rp:
      unknown_rp = set(rp) - {"full_attention", "sliding_attention"}
      if unknown_rp:
        raise ConfigError(f"HF config rope_parameters has unknown layer types {sorted(unknown_rp)}.")
      full = rp.get("full_attention", {})
      rope_theta = float(full.get("rope_theta", rope_theta))
      rope_scaling = _parse_rope_scaling(full, "rope_parameters.full_attention")
      if "sliding_attention" in rp:
        sl = rp["sliding_attention"]
        if _parse_rope_scaling(sl, "rope_parameters.sliding_attention") is not None:
          raise ConfigError("RoPE scaling on sliding layers is not implemented.")
        rope_local_theta = float(sl.get("rope_theta", rope_local_theta or rope_theta))
    else:
      rope_theta = float(rp.get("rope_theta", rope_theta))
      rope_scaling = _parse_rope_scaling(rp, "rope_parameters")
  if rope_local_theta is not None:
    rope_local_theta = float(rope_local_theta)

  # Layer types.
  sliding_window = g.get("sliding_window")
  if hf.get("layer_types"):
    names = {"full_attention": "full", "sliding_attention": "sliding"}
    bad = [t for t in hf["layer_types"] if t not in names]
    if bad:
      raise ConfigError(f"HF config layer_types has {bad[0]!r}; alm implements {sorted(names)}.")
    layer_types = tuple(names[t] for t in hf["layer_types"])
  elif family == "gemma2":
    layer_types = tuple("sliding" if (i + 1) % 2 else "full" for i in range(n_layers))
  elif family == "gemma3":
    pattern = int(g.get("sliding_window_pattern") or g.get("_sliding_window_pattern") or 6)
    layer_types = tuple("sliding" if (i + 1) % pattern else "full" for i in range(n_layers))
  elif family in ("qwen2", "qwen3") and g.get("use_sliding_window"):
    mwl = int(g.get("max_window_layers", n_layers))
    layer_types = tuple("sliding" if i >= mwl else "full" for i in range(n_layers))
  else:
    layer_types = ("full",) * n_layers
  if "sliding" not in layer_types:
    sliding_window = None

  attention_bias = bool(g.get("attention_bias", False))
  is_gemma = family.startswith("gemma")
  return ModelConfig(
      family=family,
      vocab_size=int(g["vocab_size"]),
      hidden_size=int(g["hidden_size"]),
      intermediate_size=int(g["intermediate_size"]),
      num_layers=n_layers,
      num_heads=n_heads,
      num_kv_heads=n_kv,
      head_dim=head_dim,
      rope_theta=rope_theta,
      rope_local_theta=rope_local_theta,
      rope_scaling=rope_scaling,
      rms_norm_eps=float(g["rms_norm_eps"]),
      norm_offset=1.0 if is_gemma else 0.0,
      activation=_HF_ACTIVATIONS[act],
      tie_embeddings=bool(g["tie_word_embeddings"]),
      qkv_bias=family == "qwen2" or attention_bias,
      out_bias=attention_bias and family != "qwen2",
      mlp_bias=bool(g.get("mlp_bias", False)),
      qk_norm=family in ("qwen3", "gemma3"),
      sandwich_norm=is_gemma,
      embed_scale=is_gemma,
      query_pre_attn_scalar=(float(g["query_pre_attn_scalar"])
                             if is_gemma and g.get("query_pre_attn_scalar") else None),
      attn_logit_softcap=(float(g["attn_logit_softcapping"])
                          if is_gemma and g.get("attn_logit_softcapping") else None),
      final_logit_softcap=(float(g["final_logit_softcapping"])
                           if is_gemma and g.get("final_logit_softcapping") else None),
      sliding_window=int(sliding_window) if sliding_window else None,
      layer_types=layer_types,
      max_position_embeddings=int(g.get("max_position_embeddings") or 8192),
      bos_token_id=g.get("bos_token_id"),
      eos_token_id=g.get("eos_token_id"),
      pad_token_id=g.get("pad_token_id"),
  )


def _rope_scaling_hf(rs: RopeScaling | None) -> dict | None:
  if rs is None:
    return None
  if rs.rope_type == "linear":
    return {"rope_type": "linear", "factor": rs.factor}
  return {"rope_type": "llama3", "factor": rs.factor, "low_freq_factor": rs.low_freq_factor,
          "high_freq_factor": rs.high_freq_factor,
          "original_max_position_embeddings": rs.original_max_position_embeddings}


def _to_hf(c: ModelConfig) -> dict[str, Any]:
  fam = c.family
  # Switches that a family's HF config cannot express must be at its default.
  expect = {
      "norm_offset": 1.0 if fam.startswith("gemma") else 0.0,
      "sandwich_norm": fam.startswith("gemma"),
      "embed_scale": fam.startswith("gemma"),
      "qk_norm": fam in ("qwen3", "gemma3"),
  }
  if fam == "qwen2":
    expect.update(qkv_bias=True, out_bias=False)
  if fam != "llama":
    expect["mlp_bias"] = False
  for k, v in expect.items():
    if getattr(c, k) != v:
      raise ConfigError(f"A {fam} HF config cannot express {k}={getattr(c, k)!r} (expected {v!r}).")
  if c.out_bias != c.qkv_bias and fam != "qwen2":
    raise ConfigError(f"A {fam} HF config has one attention_bias for q/k/v/o; got "
                      f"qkv_bias={c.qkv_bias}, out_bias={c.out_bias}.")
  if c.rope_local_theta is not None and fam != "gemma3":
    raise ConfigError(f"A {fam} HF config cannot express rope_local_theta.")
  hf: dict[str, Any] = {
      "architectures": [_HF_ARCHITECTURES[fam]],
      "model_type": _FAMILY_MODEL_TYPE[fam],
      "vocab_size": c.vocab_size,
      "hidden_size": c.hidden_size,
      "intermediate_size": c.intermediate_size,
      "num_hidden_layers": c.num_layers,
      "num_attention_heads": c.num_heads,
      "num_key_value_heads": c.num_kv_heads,
      "head_dim": c.head_dim,
      "rope_theta": c.rope_theta,
      "rope_scaling": _rope_scaling_hf(c.rope_scaling),
      "rms_norm_eps": c.rms_norm_eps,
      "tie_word_embeddings": c.tie_embeddings,
      "max_position_embeddings": c.max_position_embeddings,
      "attention_dropout": 0.0,
      "bos_token_id": c.bos_token_id,
      "eos_token_id": list(c.eos_token_id) if isinstance(c.eos_token_id, tuple) else c.eos_token_id,
      "pad_token_id": c.pad_token_id,
      "layer_types": [t + "_attention" for t in c.layer_types],
      "torch_dtype": "float32",
  }
  if fam.startswith("gemma"):
    hf["hidden_activation"] = {"gelu_tanh": "gelu_pytorch_tanh", "silu": "silu"}[c.activation]
    hf["query_pre_attn_scalar"] = c.query_pre_attn_scalar or c.head_dim
    hf["attn_logit_softcapping"] = c.attn_logit_softcap
    hf["final_logit_softcapping"] = c.final_logit_softcap
    hf["sliding_window"] = c.sliding_window
    hf["attention_bias"] = c.qkv_bias
    if fam == "gemma3":
      hf["rope_local_base_freq"] = c.rope_local_theta or c.rope_theta
  else:
    hf["hidden_act"] = c.activation
  if fam == "llama":
    hf["attention_bias"] = c.qkv_bias
    hf["mlp_bias"] = c.mlp_bias
  if fam in ("qwen2", "qwen3"):
    hf["use_sliding_window"] = "sliding" in c.layer_types
    hf["sliding_window"] = c.sliding_window
    if fam == "qwen3":
      hf["attention_bias"] = c.qkv_bias
  if fam == "llama" and "sliding" in c.layer_types:
    raise ConfigError("A llama HF config cannot express sliding-window layers.")
  return hf


# GGUF conversion ----------------------------------------------------------------


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


def _from_gguf(source) -> ModelConfig:
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

