"""HF `config.json` <-> `ModelConfig`.

`from_hf` reads every attribute it knows, checks that attributes it does not
implement have their harmless value, allows an explicit list of attributes that
never change the forward (dtype, architectures, token ids, ...), and raises a
`ConfigError` naming any other attribute (penzai's habit), instead of silently
computing something else. `to_hf` writes transformers >= 4.50 names back.
"""

from __future__ import annotations

from typing import Any

from alm.models.config import ConfigError, Family, ModelConfig, RopeScaling

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


def from_hf(hf: dict[str, Any]) -> ModelConfig:
  """`ModelConfig.from_hf_config`: see there."""
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


def to_hf(c: ModelConfig) -> dict[str, Any]:
  """`ModelConfig.to_hf_config`: see there."""
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
