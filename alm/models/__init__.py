"""Decoder-only transformers (Llama, Qwen2/3, Gemma2/3) in Flax NNX: config, model,
loading/saving (HF safetensors, GGUF), generation, sharding.

  cfg = ModelConfig.from_hf_config(json.load(open("config.json")))
  model, tokenizer = load_model("smollm2-135m-instruct")   # or a .gguf / HF directory
  out = model(ids, hidden_layers=(-1,))                    # out.logits, out.hidden_states
  generate(model, ids, max_new_tokens=20)
  shard_model(model, make_mesh(data=2, fsdp=2, tensor=2))

Bits per byte of a model on texts: `alm.eval.bpb.bits_per_byte`.
"""

from alm.models.config import ConfigError, ModelConfig, RopeScaling
from alm.models.generate import GenerationResult, SamplingConfig, generate
from alm.models.loading import (CheckpointError, load_gguf, load_hf, load_model, load_weights,
                                save_model)
from alm.models.sharding import ShardingRules, make_mesh, shard_model
from alm.models.transformer import (InputError, KVCache, ModelOutput, Transformer,
                                    abstract_transformer, check_token_ids)

__all__ = [
    "CheckpointError", "ConfigError", "GenerationResult", "InputError", "KVCache", "ModelConfig",
    "ModelOutput", "RopeScaling", "SamplingConfig", "ShardingRules", "Transformer",
    "abstract_transformer", "check_token_ids", "generate", "load_gguf", "load_hf", "load_model",
    "load_weights", "make_mesh", "save_model", "shard_model",
]
