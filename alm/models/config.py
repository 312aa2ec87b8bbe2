"""`ModelConfig`: one typed description of every decoder-only family we run.

Llama (incl. Llama 3.x RoPE scaling; SmolLM2 is a Llama), Qwen2/Qwen3 and
Gemma2/Gemma3 differ only in a handful of switches (biases, q/k norms,
sandwich norms, soft-capping, embedding scaling, local/global layers), so they
share one config and one implementation (`alm.models.transformer`).

Two constructors read foreign formats and fail loudly on anything they do not
understand, instead of silently computing something else (penzai's habit):
`ModelConfig.from_hf_config(config_json_dict)` and
`ModelConfig.from_gguf(path_or_reader)` (in `hf_config.py` and
`gguf_config.py`). `to_hf_config()` writes the HF form back.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, get_args

from alm._validation import check_choice


Family = Literal["llama", "qwen2", "qwen3", "gemma2", "gemma3"]
Activation = Literal["silu", "gelu_tanh"]
LayerType = Literal["full", "sliding"]
RopeType = Literal["llama3", "linear"]

FAMILIES: tuple[str, ...] = get_args(Family)
GGUF_ARCHITECTURES = ("llama", "gemma3")


class ConfigError(ValueError):
  """A model configuration is invalid or uses a feature alm does not implement."""


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
    check_choice("rope_scaling.rope_type", self.rope_type, RopeType, error=ConfigError)
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
    check_choice("family", self.family, Family, error=ConfigError)
    check_choice("activation", self.activation, Activation, error=ConfigError)
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
    for i, t in enumerate(self.layer_types):
      check_choice(f"layer_types[{i}]", t, LayerType, error=ConfigError)
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
    from alm.models.hf_config import from_hf  # pylint: disable=import-outside-toplevel
    return from_hf(dict(hf))

  def to_hf_config(self) -> dict[str, Any]:
    """Returns the HF `config.json` dict of this config (transformers >= 4.50 names).

    `ModelConfig.from_hf_config(cfg.to_hf_config()) == cfg` holds for every
    config of a supported family.
    """
    from alm.models.hf_config import to_hf  # pylint: disable=import-outside-toplevel
    return to_hf(self)

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
    from alm.models.gguf_config import from_gguf  # pylint: disable=import-outside-toplevel
    return from_gguf(source)
