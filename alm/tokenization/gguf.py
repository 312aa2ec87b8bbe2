"""Rebuilds a GGUF file's tokenizer as an HF `tokenizers.Tokenizer`.

GGUF stores the vocabulary (pieces, scores, token types, merges) in its
metadata; llama.cpp tokenizes with it. We rebuild the same tokenizer with the
Rust `tokenizers` library, id for id equal to llama.cpp (tested against an
independent pure-Python implementation of llama.cpp's algorithms in
tests/test_gguf_tokenizer.py):

- `tokenizer.ggml.model == "gpt2"` (SmolLM2 and other byte-level BPEs): BPE
  with the stored merges, the pre-tokenizer named by `tokenizer.ggml.pre`
  (SmolLM2's "smollm": digits split one by one, then the GPT-2 regex), and the
  GPT-2 byte table.
- `tokenizer.ggml.model == "llama"` (SentencePiece models such as Gemma 3):
  llama.cpp merges the adjacent pair whose concatenation has the highest piece
  score, then falls back to `<0xNN>` bytes. That is a BPE whose merges are
  every split of every normal piece, ranked by the merged piece's score;
  spaces become "▁" (normalizer, and a "▁" prefix when
  `add_space_prefix`). llama.cpp first cuts user-defined pieces (Gemma's runs
  of spaces, newlines and tabs, "<h1>", ...) out of the text as atomic
  tokens: they become non-special added tokens, matched before BPE. A naive
  SentencePiece rebuild without them splits whitespace runs differently.

The GGUF metadata is read with a small reader of the key-value section
(`read_gguf_metadata`): `gguf.GGUFReader` builds one numpy array per string
and takes ~40 s on Gemma's 262k pieces; this takes about a second. The rebuilt
tokenizer.json is cached under `alm.assets.cache_dir()`.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np
import tokenizers

from alm import assets
from alm.tokenization.base import TokenizerError
from alm.tokenization.hf import HFTokenizer

# GGUF value types (gguf spec).
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
           10: "<Q", 11: "<q", 12: "<d"}
_NP = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32,
       6: np.float32, 7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
_STRING, _ARRAY = 8, 9

# llama.cpp token types.
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = (
    1, 2, 3, 4, 5, 6)

# Pre-tokenizer regexes of llama.cpp's `tokenizer.ggml.pre` values we support
# (llama-vocab.cpp). Each is applied in order with "Isolated" splitting.
GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_PRE_REGEXES = {
    "smollm": [r"\p{N}", GPT2_REGEX],
    "starcoder": [r"\p{N}", GPT2_REGEX],
    "refact": [r"\p{N}", GPT2_REGEX],
    "gpt-2": [GPT2_REGEX],
    "default": [GPT2_REGEX],
    "llama3": [r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?"
               r"\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"],
    "llama-bpe": [r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?"
                  r"\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"],
    "qwen2": [r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?"
              r"\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"],
}


def read_gguf_metadata(path: str | os.PathLike, prefix: str = "") -> dict[str, Any]:
  """Reads the key-value metadata of a GGUF file (not the tensors).

  Args:
    path: the .gguf file.
    prefix: only keys starting with it are decoded (others are skipped fast).

  Returns:
    key -> value; arrays of numbers are numpy arrays, arrays of strings are
    lists of str (bytes where a string is not valid UTF-8).

  Raises:
    TokenizerError: the file is not a GGUF file.
  """
  with open(path, "rb") as f:
    data = f.read(16)
    if data[:4] != b"GGUF":
      raise TokenizerError(f"{path} is not a GGUF file (magic {data[:4]!r}, expected b'GGUF').")
    version, = struct.unpack_from("<I", data, 4)
    if version < 2:
      raise TokenizerError(f"{path}: GGUF version {version} is not supported (need >= 2).")
  buf = np.memmap(path, dtype=np.uint8, mode="r")
  mv = memoryview(buf)
  n_kv, = struct.unpack_from("<Q", mv, 16)
  pos = 24
  out: dict[str, Any] = {}

  def read_str(p):
    n, = struct.unpack_from("<Q", mv, p)
    return bytes(mv[p + 8:p + 8 + n]), p + 8 + n

  def read_value(t, p, keep):
    if t in _SCALAR:
      fmt = _SCALAR[t]
      return struct.unpack_from(fmt, mv, p)[0], p + struct.calcsize(fmt)
    if t == _STRING:
      s, p = read_str(p)
      return s.decode("utf-8", errors="surrogateescape"), p
    if t == _ARRAY:
      et, n = struct.unpack_from("<IQ", mv, p)
      p += 12
      if et in _NP:
        size = np.dtype(_NP[et]).itemsize * n
        arr = np.frombuffer(buf[p:p + size].tobytes(), dtype=_NP[et]) if keep else None
        return arr, p + size
      if et == _STRING:
        items = []
        for _ in range(n):
          ln, = struct.unpack_from("<Q", mv, p)
          if keep:
            items.append(bytes(mv[p + 8:p + 8 + ln]))
          p += 8 + ln
        if keep:
          items = [_decode(b) for b in items]
        return items, p
      vals = []
      for _ in range(n):
        v, p = read_value(et, p, keep)
        vals.append(v)
      return vals, p
    raise TokenizerError(f"{path}: unknown GGUF value type {t} (corrupt file?).")

  for _ in range(n_kv):
    kb, pos = read_str(pos)
    key = kb.decode("utf-8")
    t, = struct.unpack_from("<I", mv, pos)
    pos += 4
    keep = key.startswith(prefix)
    val, pos = read_value(t, pos, keep)
    if keep:
      out[key] = val
  del mv
  return out


def _decode(b: bytes):
  try:
    return b.decode("utf-8")
  except UnicodeDecodeError:
    return b


def _cache_path(path: Path) -> Path:
  st = path.stat()
  h = hashlib.sha1(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}:v1".encode()).hexdigest()[:16]
  d = assets.cache_dir() / "gguf_tokenizers"
  d.mkdir(parents=True, exist_ok=True)
  return d / f"{path.stem}-{h}.json"


def _added(content: str, i: int, special: bool) -> dict:
  return {"id": int(i), "content": content, "single_word": False, "lstrip": False,
          "rstrip": False, "normalized": False, "special": special}


def _spm_merges(tokens: list[str], scores: np.ndarray, types: np.ndarray) -> list[list[str]]:
  """BPE merges equivalent to llama.cpp's SentencePiece resegmentation.

  Every split `left + right` of a normal piece whose halves are themselves
  pieces is a merge; merges are ranked by the merged piece's score (highest
  first), as llama.cpp pops the bigram of highest score.
  """
  vocab = {t: i for i, t in enumerate(tokens) if types[i] in (TOKEN_NORMAL, TOKEN_USER_DEFINED)
           and isinstance(t, str)}
  merges = []
  for piece, i in vocab.items():
    if types[i] != TOKEN_NORMAL or len(piece) < 2:
      continue
    s = float(scores[i])
    for k in range(1, len(piece)):
      left, right = piece[:k], piece[k:]
      li, ri = vocab.get(left), vocab.get(right)
      if li is not None and ri is not None:
        merges.append((-s, i, li, ri, left, right))
  merges.sort()
  return [[m[4], m[5]] for m in merges]


def gguf_tokenizer_json(meta: dict[str, Any], *, source: str = "gguf") -> dict:
  """The HF tokenizer.json (as a dict) equivalent to a GGUF file's tokenizer.

  Args:
    meta: GGUF metadata (`read_gguf_metadata(path, "tokenizer.")`).
    source: file name for messages.

  Returns:
    tokenizer.json contents.

  Raises:
    TokenizerError: an unsupported tokenizer model or pre-tokenizer.
  """
  model = meta.get("tokenizer.ggml.model")
  tokens = meta.get("tokenizer.ggml.tokens")
  if model is None or tokens is None:
    raise TokenizerError(f"{source} has no tokenizer metadata (tokenizer.ggml.model/tokens).")
  n = len(tokens)
  types = np.asarray(meta.get("tokenizer.ggml.token_type", np.full(n, TOKEN_NORMAL)), np.int32)
  bad = [i for i, t in enumerate(tokens) if isinstance(t, bytes)]
  if bad:
    raise TokenizerError(f"{source}: tokens {bad[:5]} are not valid UTF-8 strings.")
  added = []
  for i, (t, ty) in enumerate(zip(tokens, types)):
    if ty in (TOKEN_CONTROL, TOKEN_UNKNOWN, TOKEN_UNUSED):
      added.append(_added(t, i, True))
    elif ty == TOKEN_USER_DEFINED:
      # llama.cpp always cuts user-defined pieces out of the raw text first.
      added.append(_added(t, i, False))
  unk_id = meta.get("tokenizer.ggml.unknown_token_id")
  if model == "gpt2":
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in _PRE_REGEXES:
      raise TokenizerError(
          f"{source}: GGUF pre-tokenizer {pre!r} is not supported; supported: "
          f"{', '.join(sorted(_PRE_REGEXES))}. Convert the model's original tokenizer.json "
          "instead (alm.load_tokenizer('path/to/tokenizer.json')).")
    merges = meta.get("tokenizer.ggml.merges")
    if merges is None:
      raise TokenizerError(f"{source}: a gpt2 GGUF tokenizer needs tokenizer.ggml.merges.")
    splits = [{"type": "Split", "pattern": {"Regex": r}, "behavior": "Isolated",
               "invert": False} for r in _PRE_REGEXES[pre]]
    bl = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
          "use_regex": False}
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": splits + [bl]},
        "post_processor": None, "decoder": bl,
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {t: i for i, t in enumerate(tokens)},
                  "merges": [m.split(" ", 1) for m in merges]},
    }
  if model == "llama":
    scores = np.asarray(meta.get("tokenizer.ggml.scores"), np.float32)
    if scores.shape != (n,):
      raise TokenizerError(f"{source}: a SentencePiece GGUF tokenizer needs piece scores.")
    normalizers = []
    if meta.get("tokenizer.ggml.add_space_prefix", True):
      normalizers.append({"type": "Prepend", "prepend": "\u2581"})
    normalizers.append({"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"})
    vocab = {}
    for i, t in enumerate(tokens):
      vocab.setdefault(t, i)
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": {"type": "Sequence", "normalizers": normalizers},
        "pre_tokenizer": None, "post_processor": None,
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"}]},
        "model": {"type": "BPE", "dropout": None,
                  "unk_token": tokens[unk_id] if unk_id is not None else None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
                  "vocab": vocab, "merges": _spm_merges(tokens, scores, types)},
    }
  raise TokenizerError(
      f"{source}: GGUF tokenizer model {model!r} is not supported (supported: 'gpt2' byte-level "
      "BPE, 'llama' SentencePiece). Load the model's original tokenizer.json instead.")


def load_gguf_tokenizer(path: str | os.PathLike, *, name: str | None = None,
                        add_bos: bool | None = None, use_cache: bool = True) -> HFTokenizer:
  """Rebuilds the tokenizer stored in a GGUF file.

  Args:
    path: the .gguf file.
    name: a name for messages.
    add_bos: override `tokenizer.ggml.add_bos_token`.
    use_cache: reuse/write the rebuilt tokenizer.json under `alm.assets.cache_dir()`.

  Returns:
    An `HFTokenizer` whose ids equal llama.cpp's (special tokens not parsed in text).
  """
  path = Path(path)
  if not path.exists():
    raise FileNotFoundError(f"No GGUF file at {path}.")
  meta = read_gguf_metadata(path, prefix="tokenizer.")
  cache = _cache_path(path) if use_cache else None
  if cache is not None and cache.exists():
    tok = tokenizers.Tokenizer.from_file(str(cache))
  else:
    cfg = gguf_tokenizer_json(meta, source=str(path))
    s = json.dumps(cfg, ensure_ascii=False)
    tok = tokenizers.Tokenizer.from_str(s)
    if cache is not None:
      tmp = cache.with_suffix(f".tmp{os.getpid()}")
      tmp.write_text(s, encoding="utf-8")
      os.replace(tmp, cache)  # atomic: parallel test processes may race here
  tokens = meta["tokenizer.ggml.tokens"]

  def tok_at(key):
    i = meta.get(key)
    return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

  config = {"bos_token": tok_at("tokenizer.ggml.bos_token_id"),
            "eos_token": tok_at("tokenizer.ggml.eos_token_id"),
            "pad_token": tok_at("tokenizer.ggml.padding_token_id"),
            "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
            "tokenizer_class": "PreTrainedTokenizerFast"}
  if "tokenizer.chat_template" in meta:
    config["chat_template"] = meta["tokenizer.chat_template"]
  return HFTokenizer(tok, name=name or str(path), add_bos=add_bos, config=config)
