"""Load and save models: HF safetensors directories and GGUF files.

`load_model(name_or_path)` accepts an asset name (`alm.assets`), a `.gguf`
file or an HF-format directory (config.json + *.safetensors + tokenizer), and
returns `(model, tokenizer)`. `save_model(model, directory, tokenizer)` writes
an HF-format directory that `transformers` and `alm.load_model` both read.

GGUF tensors are dequantized to float32 with `gguf.quants.dequantize`; two
llama.cpp conventions are undone on the way in: llama's Q/K rows are permuted
for interleaved RoPE (we use rotate-half RoPE, like HF), and Gemma's norm
weights carry the `+1` that HF applies at run time.

A truncated or corrupt weights file (an interrupted download or copy) raises
`ModelFileError` naming the file and what is wrong (for safetensors: the
header is read and every tensor's byte range checked against the file size
before any tensor is read), not a `struct.error` or reshape traceback.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from alm.models.config import ConfigError, ModelConfig
# ModelFileError is raised here too (truncated safetensors); GGUFFormatError is one.
from alm.models.gguf_file import GGUFFile, ModelFileError  # pylint: disable=unused-import
from alm.models.transformer import Transformer, abstract_transformer

PathKey = tuple[Any, ...]


class CheckpointError(ValueError):
  """A checkpoint's tensors do not match its config (missing, unexpected, wrong shape)."""


# Internal parameter paths <-> HF / GGUF tensor names ------------------------------


def _param_paths(model: nnx.Module) -> dict[PathKey, nnx.Param]:
  return {tuple(p): v for p, v in nnx.iter_graph(model) if isinstance(v, nnx.Param)}


def hf_name(path: PathKey, cfg: ModelConfig) -> tuple[str, bool]:
  """HF tensor name of an internal parameter path, and whether it is transposed.

  Args:
    path: e.g. ("layers", 3, "attn", "q_proj", "kernel").
    cfg: the model config (the norm names differ between families).

  Returns:
    (name, transposed): kernels are stored [in, out] here and [out, in] in HF.
  """
  gemma = cfg.sandwich_norm
  if path == ("embedder", "embedding"):
    return "model.embed_tokens.weight", False
  if path == ("final_norm", "scale"):
    return "model.norm.weight", False
  if path == ("lm_head", "kernel"):
    return "lm_head.weight", True
  if path[0] != "layers":
    raise KeyError(path)
  i, rest = path[1], path[2:]
  pre = f"model.layers.{i}."
  norms = {
      "attn_norm": "input_layernorm",
      "mlp_norm": "pre_feedforward_layernorm" if gemma else "post_attention_layernorm",
      "post_attn_norm": "post_attention_layernorm",
      "post_mlp_norm": "post_feedforward_layernorm",
  }
  if rest[0] in norms:
    return pre + norms[rest[0]] + ".weight", False
  if rest[0] == "attn":
    if rest[1] in ("q_norm", "k_norm"):
      return pre + f"self_attn.{rest[1]}.weight", False
    kind = "weight" if rest[2] == "kernel" else "bias"
    return pre + f"self_attn.{rest[1]}.{kind}", kind == "weight"
  if rest[0] == "mlp":
    kind = "weight" if rest[2] == "kernel" else "bias"
    return pre + f"mlp.{rest[1]}.{kind}", kind == "weight"
  raise KeyError(path)


_GGUF_BLOCK = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "post_feedforward_layernorm.weight": "post_ffw_norm.weight",
    "pre_feedforward_layernorm.weight": "ffn_norm.weight",
}


def gguf_name(hf: str, cfg: ModelConfig) -> str:
  """GGUF (llama.cpp) tensor name of an HF tensor name."""
  top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
         "lm_head.weight": "output.weight"}
  if hf in top:
    return top[hf]
  m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", hf)
  if not m:
    raise KeyError(hf)
  i, rest = m.groups()
  if rest == "post_attention_layernorm.weight":
    # The same HF name is the pre-MLP norm in Llama and the post-attention norm in Gemma.
    return f"blk.{i}." + ("post_attention_norm.weight" if cfg.sandwich_norm else "ffn_norm.weight")
  return f"blk.{i}." + _GGUF_BLOCK[rest]


# Building a model from arrays ------------------------------------------------------


def model_from_hf_arrays(cfg: ModelConfig, get: Callable[[str], np.ndarray], names: set[str], *,
                         dtype=jnp.float32, param_dtype=jnp.float32,
                         source: str = "checkpoint") -> Transformer:
  """Builds a Transformer whose parameters come from HF-named arrays.

  Args:
    cfg: the config.
    get: HF tensor name -> array (HF layout, [out, in] for kernels).
    names: every tensor name the checkpoint holds.
    dtype: compute dtype.
    param_dtype: parameter dtype.
    source: used in error messages.

  Returns:
    The model (no random initialisation is run: parameters are created
    abstractly, then filled).

  Raises:
    CheckpointError: a tensor is missing, unexpected, or has the wrong shape.
  """
  model = abstract_transformer(cfg, dtype=dtype, param_dtype=param_dtype)
  params = _param_paths(model)
  wanted = {hf_name(p, cfg)[0]: p for p in params}
  missing = sorted(set(wanted) - names)
  # HF checkpoints of tied models sometimes still carry lm_head.weight.
  ignorable = {"lm_head.weight"} if cfg.tie_embeddings else set()
  unexpected = sorted(n for n in names - set(wanted) - ignorable
                      if not n.endswith("rotary_emb.inv_freq"))
  if missing or unexpected:
    raise CheckpointError(
        f"{source} does not match its config ({cfg.family}, {cfg.num_layers} layers): "
        + (f"missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}; " if missing else "")
        + (f"unexpected tensors {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}"
           if unexpected else ""))
  for name, path in wanted.items():
    _, transposed = hf_name(path, cfg)
    arr = np.asarray(get(name))
    if transposed:
      arr = arr.T
    var = params[path]
    shape = tuple(var.get_value().shape)
    if tuple(arr.shape) != shape:
      raise CheckpointError(f"{source}: tensor {name} has shape {arr.shape}"
                            f"{' (transposed)' if transposed else ''}, expected {shape}.")
    var.set_value(jnp.asarray(arr.astype(np.float32), param_dtype))
  return model


def model_to_hf_arrays(model: Transformer) -> dict[str, np.ndarray]:
  """The parameters of `model` as HF-named numpy arrays (kernels [out, in])."""
  out = {}
  for path, var in _param_paths(model).items():
    name, transposed = hf_name(path, model.cfg)
    arr = np.asarray(jax.device_get(var[...]))
    out[name] = np.ascontiguousarray(arr.T if transposed else arr)
  return out


# GGUF ------------------------------------------------------------------------------


def _unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
  """Undoes llama.cpp's Q/K row permutation (interleaved -> rotate-half RoPE)."""
  out, inp = w.shape
  return w.reshape(n_head, out // n_head // 2, 2, inp).swapaxes(1, 2).reshape(out, inp)


def load_gguf(path: str | Path, *, dtype=jnp.float32, param_dtype=jnp.float32) -> Transformer:
  """Loads the weights of a GGUF file (dequantized to float32) into a Transformer.

  Args:
    path: the .gguf file.
    dtype: compute dtype.
    param_dtype: parameter dtype.

  Returns:
    The model.

  Raises:
    FileNotFoundError: no such file.
    ConfigError: an architecture alm does not load from GGUF.
    GGUFFormatError (a `ModelFileError`): not a GGUF file, or truncated or
      corrupt.
  """
  path = Path(path)
  gf = GGUFFile(path)
  cfg = ModelConfig.from_gguf(gf)
  if cfg.family == "llama" and (cfg.qkv_bias or cfg.out_bias or cfg.mlp_bias):
    raise ConfigError("Llama GGUF files with attention/MLP biases are not supported; load the HF "
                      "safetensors directory instead.")
  hf_to_gguf = {}
  for p in _param_paths(abstract_transformer(cfg)):
    name = hf_name(p, cfg)[0]
    hf_to_gguf[name] = gguf_name(name, cfg)
  extra = sorted(set(gf.tensors) - set(hf_to_gguf.values()))
  if extra:
    raise CheckpointError(f"GGUF {path.name}: tensors alm does not know: {extra[:5]}.")
  present = {h for h, g in hf_to_gguf.items() if g in gf.tensors}

  def get(hf: str) -> np.ndarray:
    w = gf.tensor(hf_to_gguf[hf])
    if cfg.family == "llama" and hf.endswith("self_attn.q_proj.weight"):
      w = _unpermute_qk(w, cfg.num_heads)
    elif cfg.family == "llama" and hf.endswith("self_attn.k_proj.weight"):
      w = _unpermute_qk(w, cfg.num_kv_heads)
    if cfg.norm_offset and hf.endswith("norm.weight"):
      # llama.cpp's converter stores Gemma's (1 + w); we keep HF's w.
      w = w - np.float32(cfg.norm_offset)
    return w

  return model_from_hf_arrays(cfg, get, present, dtype=dtype, param_dtype=param_dtype,
                              source=f"GGUF {path.name}")


# HF directories --------------------------------------------------------------------

_FIX = "re-download or re-convert it"
_ST_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2,
                   "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8,
                   "F64": 8}


def check_safetensors_file(path: str | Path) -> None:
  """Checks a .safetensors file's header and that every tensor's bytes lie inside the file.

  Raises:
    ModelFileError: truncated (names the expected and the actual size) or a
      corrupt header / tensor record.
  """
  f = Path(path)
  size = f.stat().st_size
  if size < 8:
    raise ModelFileError(f"{f}: truncated: {size} bytes, shorter than a safetensors header; "
                         f"{_FIX}.")
  with open(f, "rb") as fh:
    n, = struct.unpack("<Q", fh.read(8))
    if 8 + n > size:
      raise ModelFileError(f"{f}: truncated: expected at least {8 + n} bytes (its header alone "
                           f"is {n}), file has {size}; {_FIX}.")
    try:
      header = json.loads(fh.read(n))
    except (UnicodeDecodeError, ValueError) as e:
      raise ModelFileError(f"{f}: corrupt safetensors header (not JSON: {e}); {_FIX}.") from None
  if not isinstance(header, dict):
    raise ModelFileError(f"{f}: corrupt safetensors header (not a JSON object); {_FIX}.")
  end = 0
  for name, rec in header.items():
    if name == "__metadata__":
      continue
    try:
      start, stop = (int(x) for x in rec["data_offsets"])
      want = math.prod(int(d) for d in rec["shape"]) * _ST_DTYPE_BYTES.get(rec["dtype"], 0)
    except (KeyError, TypeError, ValueError):
      raise ModelFileError(f"{f}: corrupt safetensors header (bad record of tensor "
                           f"{name!r}); {_FIX}.") from None
    if stop < start or (rec["dtype"] in _ST_DTYPE_BYTES and stop - start != want):
      raise ModelFileError(f"{f}: corrupt safetensors header: tensor {name!r} spans "
                           f"{stop - start} bytes, its shape and dtype need {want}; {_FIX}.")
    end = max(end, stop)
  if 8 + n + end > size:
    raise ModelFileError(f"{f}: truncated: expected {8 + n + end} bytes, file has {size}; "
                         f"{_FIX}.")


def load_hf(directory: str | Path, *, dtype=jnp.float32, param_dtype=jnp.float32) -> Transformer:
  """Loads an HF-format directory (config.json + *.safetensors) into a Transformer.

  Args:
    directory: the directory.
    dtype: compute dtype.
    param_dtype: parameter dtype.

  Returns:
    The model.

  Raises:
    FileNotFoundError: no config.json or no safetensors file.
    ConfigError: the config has a field or value alm does not handle.
    CheckpointError: tensors do not match the config.
    ModelFileError: a weights file is truncated or corrupt.
  """
  from safetensors import SafetensorError, safe_open  # pylint: disable=import-outside-toplevel

  d = Path(directory)
  cfg_path = d / "config.json"
  if not cfg_path.is_file():
    raise FileNotFoundError(f"{str(d)!r} has no config.json; an HF model directory needs "
                            "config.json, *.safetensors and a tokenizer file.")
  cfg = ModelConfig.from_hf_config(json.loads(cfg_path.read_text()))
  index = d / "model.safetensors.index.json"
  if index.is_file():
    files = sorted({d / f for f in json.loads(index.read_text())["weight_map"].values()})
  else:
    files = sorted(d.glob("*.safetensors"))
  if not files:
    raise FileNotFoundError(f"{str(d)!r} has no *.safetensors weights (PyTorch .bin files are "
                            "not read; convert them to safetensors first).")
  where: dict[str, Path] = {}
  for f in files:
    if not f.is_file():
      raise FileNotFoundError(f"Weights file {str(f)!r} listed in the index does not exist.")
    check_safetensors_file(f)
    try:
      with safe_open(str(f), framework="numpy") as sf:
        for k in sf.keys():
          where[k] = f
    except SafetensorError as e:
      raise ModelFileError(f"{f}: unreadable safetensors file ({e}); {_FIX}.") from None
  handles: dict[Path, Any] = {}

  def get(name: str) -> np.ndarray:
    f = where[name]
    try:
      if f not in handles:
        handles[f] = safe_open(str(f), framework="numpy")
      return handles[f].get_tensor(name)
    except SafetensorError as e:
      raise ModelFileError(f"{f}: unreadable tensor {name!r} ({e}); {_FIX}.") from None

  return model_from_hf_arrays(cfg, get, set(where), dtype=dtype, param_dtype=param_dtype,
                              source=f"HF directory {d.name}")


def save_model(model: Transformer, directory: str | Path, tokenizer=None) -> Path:
  """Writes `model` (and `tokenizer`) as an HF-format directory.

  Args:
    model: the model.
    directory: created if needed; config.json and model.safetensors are
      (over)written.
    tokenizer: optional; its `save_pretrained(directory)` writes the tokenizer
      file when it has that method.

  Returns:
    The directory.
  """
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel

  d = Path(directory)
  d.mkdir(parents=True, exist_ok=True)
  hf = model.cfg.to_hf_config()
  arrays = model_to_hf_arrays(model)
  dtypes = {str(a.dtype) for a in arrays.values()}
  hf["torch_dtype"] = "bfloat16" if dtypes == {"bfloat16"} else (
      "float16" if dtypes == {"float16"} else "float32")
  (d / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
  save_file(arrays, str(d / "model.safetensors"), metadata={"format": "pt"})
  if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
    tokenizer.save_pretrained(d)
  return d


# Public entry point ----------------------------------------------------------------


def resolve_model_path(name_or_path: str | Path) -> Path:
  """An asset name or a path -> an existing .gguf file or HF directory.

  Raises:
    FileNotFoundError: neither a known asset nor an existing file/directory.
    alm.assets.AssetNotInstalledError: a known asset that is not installed.
  """
  from alm import assets  # pylint: disable=import-outside-toplevel

  s = str(name_or_path)
  if s in assets.ASSETS:
    if assets.ASSETS[s].kind != "model":
      raise ValueError(f"Asset {s!r} is a tokenizer, not a model; models: "
                       f"{', '.join(assets.MODEL_NAMES)}.")
    return assets.locate(s)
  p = Path(s).expanduser()
  if p.is_dir() or (p.is_file() and p.suffix == ".gguf"):
    return p
  if p.is_file():
    raise ValueError(f"{s!r} is a file but not a .gguf; pass a .gguf file or an HF directory.")
  raise FileNotFoundError(
      f"Model {s!r} not found: it is neither an existing .gguf file or HF directory (config.json "
      f"+ *.safetensors + tokenizer) nor a known model asset ({', '.join(assets.MODEL_NAMES)}).")


def load_config(name_or_path: str | Path) -> ModelConfig:
  """A model's `ModelConfig` without its weights (config.json or the GGUF metadata).

  Raises:
    FileNotFoundError / ValueError: as `resolve_model_path`; an HF directory
      without config.json.
    ConfigError: a config alm does not handle.
  """
  p = resolve_model_path(name_or_path)
  if p.is_dir():
    cfg_path = p / "config.json"
    if not cfg_path.is_file():
      raise FileNotFoundError(f"{str(p)!r} has no config.json; an HF model directory needs "
                              "config.json, *.safetensors and a tokenizer file.")
    return ModelConfig.from_hf_config(json.loads(cfg_path.read_text()))
  return ModelConfig.from_gguf(GGUFFile(p))


def model_files_digest(name_or_path: str | Path) -> str:
  """A hash of the files that hold a model's weights and config, read without loading it.

  The names and bytes of config.json, the safetensors index and every
  *.safetensors / *.npy file of an HF directory (or the bytes of a .gguf file):
  what a teacher cache records of its teacher (`alm.training.transfer.
  teacher_cache_fingerprint`), so a run that never loads the teacher can
  still check that the cache was built from the same one.
  """
  p = resolve_model_path(name_or_path)
  files = ([f for f in sorted(p.iterdir()) if f.is_file() and (
      f.suffix in (".safetensors", ".npy") or f.name in ("config.json",
                                                          "model.safetensors.index.json"))]
           if p.is_dir() else [p])
  h = hashlib.blake2b(digest_size=16)
  for f in files:
    h.update(f"{f.name}|{f.stat().st_size}|".encode())
    with open(f, "rb") as fh:
      for block in iter(lambda: fh.read(1 << 22), b""):
        h.update(block)
  return h.hexdigest()


def load_weights(name_or_path: str | Path, *, dtype=jnp.float32,
                 param_dtype=jnp.float32) -> Transformer:
  """Like `load_model` but returns only the model (no tokenizer)."""
  p = resolve_model_path(name_or_path)
  from alm.bytes.model import is_byte_student_dir  # pylint: disable=import-outside-toplevel
  if is_byte_student_dir(p):  # a byte student: the body + its n-gram files
    from alm.bytes.model import load_byte_student  # pylint: disable=import-outside-toplevel
    return load_byte_student(p, dtype=dtype, param_dtype=param_dtype)
  if p.is_dir():
    return load_hf(p, dtype=dtype, param_dtype=param_dtype)
  return load_gguf(p, dtype=dtype, param_dtype=param_dtype)


def load_model(name_or_path: str | Path, *, dtype=jnp.float32, param_dtype=jnp.float32):
  """Loads a model and its tokenizer.

  Args:
    name_or_path: an asset name ("smollm2-135m-instruct", "gemma3-270m"), a
      .gguf file (tokenizer rebuilt from its metadata) or an HF directory
      (config.json + *.safetensors + tokenizer.json / tokenizer.model).
    dtype: compute dtype (jnp.bfloat16 for speed).
    param_dtype: parameter storage dtype.

  Returns:
    (model, tokenizer).

  Raises:
    FileNotFoundError: missing file or directory contents.
    ConfigError: unsupported GGUF architecture or unknown HF config field.
    ModelFileError: a weights file is truncated or corrupt (names the file).
  """
  from alm.tokenization.loading import load_tokenizer  # pylint: disable=import-outside-toplevel

  p = resolve_model_path(name_or_path)
  model = load_weights(p, dtype=dtype, param_dtype=param_dtype)
  tokenizer = load_tokenizer(str(p))
  if tokenizer.vocab_size > model.cfg.vocab_size:
    raise CheckpointError(f"The tokenizer of {str(p)!r} has {tokenizer.vocab_size} ids but the "
                          f"model only {model.cfg.vocab_size} embedding rows.")
  return model, tokenizer
