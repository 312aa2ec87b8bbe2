"""ModelConfig from HF config.json / GGUF metadata, the GGUF reader, loader errors."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest

import alm
from alm import assets
from alm.models import loading
from alm.models.config import ConfigError, ModelConfig, RopeScaling
from alm.models.gguf_file import GGUFFile
from alm.testing.models import TINY_FAMILIES, tiny_config, tiny_model

# config.json files of published checkpoints (as on the hub).
SMOLLM2_135M = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 576,
    "initializer_range": 0.041666666666666664, "intermediate_size": 1536,
    "is_llama_config": True, "max_position_embeddings": 8192, "mlp_bias": False,
    "model_type": "llama", "num_attention_heads": 9, "num_hidden_layers": 30,
    "num_key_value_heads": 3, "pad_token_id": 2, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
    "rope_interleaved": False, "rope_scaling": None, "rope_theta": 100000,
    "tie_word_embeddings": True, "torch_dtype": "bfloat16", "transformers_version": "4.42.3",
    "use_cache": True, "vocab_size": 49152}
LLAMA32_1B = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 128000, "eos_token_id": 128001, "head_dim": 64, "hidden_act": "silu",
    "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 8192,
    "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama",
    "num_attention_heads": 32, "num_hidden_layers": 16, "num_key_value_heads": 8,
    "pretraining_tp": 1, "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    "transformers_version": "4.45.0.dev0", "use_cache": True, "vocab_size": 128256}
QWEN25_05B = {
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 896, "initializer_range": 0.02,
    "intermediate_size": 4864, "max_position_embeddings": 32768, "max_window_layers": 24,
    "model_type": "qwen2", "num_attention_heads": 14, "num_hidden_layers": 24,
    "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
    "sliding_window": 32768, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    "transformers_version": "4.40.1", "use_cache": True, "use_sliding_window": False,
    "vocab_size": 151936}
QWEN3_06B = {
    "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 151643, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu",
    "hidden_size": 1024, "initializer_range": 0.02, "intermediate_size": 3072,
    "max_position_embeddings": 40960, "max_window_layers": 28, "model_type": "qwen3",
    "num_attention_heads": 16, "num_hidden_layers": 28, "num_key_value_heads": 8,
    "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000, "sliding_window": None,
    "tie_word_embeddings": True, "torch_dtype": "bfloat16", "transformers_version": "4.51.0",
    "use_cache": True, "use_sliding_window": False, "vocab_size": 151936}
GEMMA2_2B = {
    "architectures": ["Gemma2ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "attn_logit_softcapping": 50.0, "bos_token_id": 2, "cache_implementation": "hybrid",
    "eos_token_id": 1, "final_logit_softcapping": 30.0, "head_dim": 256,
    "hidden_act": "gelu_pytorch_tanh", "hidden_activation": "gelu_pytorch_tanh",
    "hidden_size": 2304, "initializer_range": 0.02, "intermediate_size": 9216,
    "max_position_embeddings": 8192, "model_type": "gemma2", "num_attention_heads": 8,
    "num_hidden_layers": 26, "num_key_value_heads": 4, "pad_token_id": 0,
    "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06, "rope_theta": 10000.0,
    "sliding_window": 4096, "torch_dtype": "float32", "transformers_version": "4.42.4",
    "vocab_size": 256000}
GEMMA3_270M = {
    "_sliding_window_pattern": 6, "architectures": ["Gemma3ForCausalLM"], "attention_bias": False,
    "attention_dropout": 0.0, "attn_logit_softcapping": None, "bos_token_id": 2,
    "eos_token_id": 1, "final_logit_softcapping": None, "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 640, "initializer_range": 0.02,
    "intermediate_size": 2048,
    "layer_types": (["sliding_attention"] * 5 + ["full_attention"]) * 3,
    "max_position_embeddings": 32768, "model_type": "gemma3_text", "num_attention_heads": 4,
    "num_hidden_layers": 18, "num_key_value_heads": 1, "pad_token_id": 0,
    "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06, "rope_local_base_freq": 10000.0,
    "rope_scaling": None, "rope_theta": 1000000.0, "sliding_window": 512,
    "torch_dtype": "bfloat16", "transformers_version": "4.55.0.dev0",
    "use_bidirectional_attention": False, "use_cache": True, "vocab_size": 262144}
PUBLISHED = {"smollm2": SMOLLM2_135M, "llama3.2": LLAMA32_1B, "qwen2.5": QWEN25_05B,
             "qwen3": QWEN3_06B, "gemma2": GEMMA2_2B, "gemma3": GEMMA3_270M}


def test_published_configs():
  c = ModelConfig.from_hf_config(LLAMA32_1B)
  assert c.rope_scaling == RopeScaling("llama3", 32.0, 1.0, 4.0, 8192)
  assert (c.head_dim, c.num_kv_heads, c.tie_embeddings) == (64, 8, True)
  q2 = ModelConfig.from_hf_config(QWEN25_05B)
  assert q2.qkv_bias and not q2.out_bias and not q2.qk_norm
  assert q2.layer_types == ("full",) * 24 and q2.sliding_window is None
  q3 = ModelConfig.from_hf_config(QWEN3_06B)
  assert q3.qk_norm and not q3.qkv_bias and q3.head_dim == 128
  g2 = ModelConfig.from_hf_config(GEMMA2_2B)
  assert (g2.attn_logit_softcap, g2.final_logit_softcap, g2.norm_offset) == (50.0, 30.0, 1.0)
  assert g2.layer_types[:3] == ("sliding", "full", "sliding") and g2.sliding_window == 4096
  assert g2.sandwich_norm and g2.embed_scale and not g2.qk_norm
  g3 = ModelConfig.from_hf_config(GEMMA3_270M)
  assert g3.qk_norm and g3.rope_local_theta == 1e4 and g3.layer_types[5] == "full"
  assert g3.layer_rope_theta(0) == 1e4 and g3.layer_rope_theta(5) == 1e6
  # Older Gemma 3 configs have no layer_types, only the pattern.
  old = {k: v for k, v in GEMMA3_270M.items() if k != "layer_types"}
  assert ModelConfig.from_hf_config(old) == g3


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_hf_config_round_trip(name):
  c = ModelConfig.from_hf_config(PUBLISHED[name])
  assert ModelConfig.from_hf_config(json.loads(json.dumps(c.to_hf_config()))) == c


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_tiny_config_round_trip(family):
  c = tiny_config(family)
  assert ModelConfig.from_hf_config(c.to_hf_config()) == c


def test_transformers_v5_rope_parameters():
  hf = {k: v for k, v in GEMMA3_270M.items()
        if k not in ("rope_theta", "rope_local_base_freq", "rope_scaling")}
  hf["rope_parameters"] = {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                           "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}
  assert ModelConfig.from_hf_config(hf) == ModelConfig.from_hf_config(GEMMA3_270M)


@pytest.mark.parametrize("change, message", [
    ({"foo_bar": 1}, r"attribute 'foo_bar'"),
    ({"quantization_config": {"bits": 4}}, r"'quantization_config'"),
    ({"model_type": "mixtral"}, r"model_type 'mixtral'.*gemma2, gemma3_text, llama, qwen2, qwen3"),
    ({"hidden_act": "relu"}, r"hidden_act='relu'.*gelu_pytorch_tanh"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, r"rope_type 'yarn'"),
    ({"attention_dropout": 0.1}, r"attention_dropout"),
    ({"rope_interleaved": True}, r"rope_interleaved"),
    ({"num_key_value_heads": 4}, r"multiple of num_kv_heads"),
])
def test_bad_hf_configs_name_the_problem(change, message):
  with pytest.raises(ConfigError, match=message):
    ModelConfig.from_hf_config({**SMOLLM2_135M, **change})


def test_config_validation():
  with pytest.raises(ConfigError, match="family='gpt2' is not valid; choose one of: llama"):
    tiny_config("llama").replace(family="gpt2")
  with pytest.raises(ConfigError, match="sliding_window"):
    tiny_config("llama", layer_types=("sliding", "full"))
  with pytest.raises(ConfigError, match="activation"):
    tiny_config("llama", activation="relu")


def test_gguf_metadata_gives_the_hf_config():
  for name, hf in (("smollm2-135m-instruct", SMOLLM2_135M), ("gemma3-270m", GEMMA3_270M)):
    from_gguf = ModelConfig.from_gguf(assets.locate(name))
    assert from_gguf == ModelConfig.from_hf_config(hf), name


def _write_gguf(path, arch, tensors, extra=None):
  w = gguf.GGUFWriter(str(path), arch)
  w.add_block_count(1)
  w.add_embedding_length(64)
  w.add_feed_forward_length(64)
  w.add_head_count(2)
  w.add_layer_norm_rms_eps(1e-5)
  w.add_token_list([f"t{i}" for i in range(2000)])  # a long string array to skip
  for k, v in (extra or {}).items():
    w.add_string(k, v)
  for name, (arr, qtype) in tensors.items():
    if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
      w.add_tensor(name, arr.astype(np.float32 if qtype == gguf.GGMLQuantizationType.F32
                                    else np.float16))
    else:
      q = gguf.quants.quantize(arr, qtype)
      w.add_tensor(name, q, raw_dtype=qtype)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


def test_gguf_file_reads_like_gguf_reader(tmp_path):
  rng = np.random.default_rng(0)
  Q = gguf.GGMLQuantizationType
  tensors = {f"t_{q.name}": (rng.normal(size=(8, 64)).astype(np.float32), q)
             for q in (Q.F32, Q.F16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.BF16)}
  path = tmp_path / "x.gguf"
  _write_gguf(path, "llama", tensors, {"general.note": "hello"})
  mine = GGUFFile(path)
  theirs = gguf.GGUFReader(str(path))
  assert mine.get("general.note") == "hello" and len(mine.get("tokenizer.ggml.tokens")) == 2000
  assert mine.get("llama.block_count") == 1
  for t in theirs.tensors:
    want = gguf.quants.dequantize(t.data, t.tensor_type)
    got = mine.tensor(t.name)
    assert got.shape == (8, 64)
    np.testing.assert_array_equal(got, want.reshape(8, 64).astype(np.float32))
    # Quantization error is small: the tensors really are the ones written.
    assert np.abs(got - tensors[t.name][0]).max() < 0.3


def test_unsupported_gguf_architecture(tmp_path):
  path = tmp_path / "falcon.gguf"
  _write_gguf(path, "falcon", {"token_embd.weight": (np.zeros((4, 64), np.float32),
                                                     gguf.GGMLQuantizationType.F32)})
  with pytest.raises(ConfigError, match=r"architecture 'falcon'.*llama, gemma3"):
    ModelConfig.from_gguf(path)
  with pytest.raises(ConfigError, match=r"architecture 'falcon'"):
    alm.load_model(path)


def test_missing_files_and_bad_checkpoints(tmp_path):
  with pytest.raises(FileNotFoundError, match="not found.*smollm2-135m-instruct"):
    alm.load_model(tmp_path / "nope.gguf")
  with pytest.raises(FileNotFoundError, match="config.json"):
    alm.load_model(tmp_path)
  (tmp_path / "config.json").write_text(json.dumps(tiny_config("llama").to_hf_config()))
  with pytest.raises(FileNotFoundError, match="safetensors"):
    loading.load_hf(tmp_path)
  model = tiny_model("llama")
  loading.save_model(model, tmp_path)
  from safetensors.numpy import load_file, save_file
  arrays = load_file(str(tmp_path / "model.safetensors"))
  bad = dict(arrays)
  del bad["model.layers.1.mlp.up_proj.weight"]
  save_file(bad, str(tmp_path / "model.safetensors"))
  with pytest.raises(loading.CheckpointError, match=r"missing tensors.*layers\.1\.mlp\.up_proj"):
    loading.load_hf(tmp_path)
  bad = dict(arrays)
  bad["model.norm.weight"] = np.zeros(5, np.float32)
  save_file(bad, str(tmp_path / "model.safetensors"))
  with pytest.raises(loading.CheckpointError, match=r"model\.norm\.weight has shape \(5,\)"):
    loading.load_hf(tmp_path)
  cfg = json.loads((tmp_path / "config.json").read_text())
  cfg["frobnicate"] = True
  (tmp_path / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(ConfigError, match="'frobnicate'"):
    loading.load_hf(tmp_path)
  with pytest.raises(ValueError, match="tokenizer, not a model"):
    alm.load_model("qwen3")
