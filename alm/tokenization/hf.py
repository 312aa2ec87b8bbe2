"""HF `tokenizers` (tokenizer.json) at the byte level.

Ids come from the Rust tokenizer (batched, fast); byte spans come from the
vocabulary's byte strings (`VocabTokenizer.finish_encoding`), which is exact
by construction and independent of whether the library reports offsets in
characters or bytes. Special added tokens are never matched inside text
(`encode_special_tokens = True`): a literal "<|im_end|>" in user text stays
text, and specials only enter an encoding through BOS or chat rendering.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tokenizers

from alm.tokenization.base import Encoding, TokenizerError
from alm.tokenization.vocab import (VocabTokenizer, bytelevel_piece_to_bytes,
                                    sentencepiece_piece_to_bytes, to_text)

_BOS_NAMES = ("<|begin_of_text|>", "<bos>", "<s>", "<｜begin▁of▁sentence｜>", "<|startoftext|>")
_EOS_NAMES = ("<|end_of_text|>", "<|endoftext|>", "<eos>", "</s>", "<｜end▁of▁sentence｜>",
              "<|im_end|>")

# Normalizers that change text in ways the toolkit cannot undo at the byte level.
_LOSSY_NORMALIZERS = {
    "BertNormalizer": "BERT normalization (lowercasing, accent stripping, control-character "
                      "removal)",
    "Lowercase": "lowercasing",
    "NFD": "Unicode NFD decomposition",
    "NFKC": "Unicode NFKC compatibility folding",
    "NFKD": "Unicode NFKD compatibility folding",
    "StripAccents": "accent stripping",
    "Strip": "whitespace stripping",
    "Nmt": "NMT control-character removal",
    "Precompiled": "a precompiled SentencePiece normalization map (usually NFKC)",
}
_LOSSY_PRETOKENIZERS = {
    "BertPreTokenizer": "drops whitespace",
    "Whitespace": "drops whitespace",
    "WhitespaceSplit": "drops whitespace",
    "CharDelimiterSplit": "drops the delimiter",
}


def _walk(node: Any, key: str):
  """Yields every sub-config of a normalizer/pre-tokenizer/decoder (Sequences flattened)."""
  if node is None:
    return
  yield node
  for child in node.get(key, []) or []:
    yield from _walk(child, key)


def _analyse(cfg: dict, name: str) -> dict:
  """Reads what the toolkit needs from a tokenizer.json config, rejecting lossy ones."""
  model = cfg.get("model") or {}
  if model.get("type") == "WordPiece":
    raise TokenizerError(
        f"Tokenizer {name!r} is a WordPiece tokenizer: it drops whitespace (and usually "
        "lowercases), so its tokens cannot spell a text's bytes exactly. ALM needs a lossless "
        "tokenizer (byte-level BPE, SentencePiece with byte fallback, or 'bytes').")
  nfc = False
  dummy_prefix = b""
  for n in _walk(cfg.get("normalizer"), "normalizers"):
    t = n.get("type")
    if t in _LOSSY_NORMALIZERS or (t == "BertNormalizer"):
      raise TokenizerError(
          f"Tokenizer {name!r} has a lossy normalizer ({t}: "
          f"{_LOSSY_NORMALIZERS.get(t, 'changes text')}): its tokens cannot spell the "
          "original bytes, so chunks would be misaligned. Use a tokenizer without it "
          "(remove the normalizer from tokenizer.json only if the model was trained "
          "on text where it is a no-op).")
    if t == "NFC":
      nfc = True
    elif t == "Prepend" and n.get("prepend") == "\u2581":
      dummy_prefix = b" "
    elif t == "Replace":
      pat = n.get("pattern", {}).get("String")
      if not (pat == " " and n.get("content") == "\u2581"):
        raise TokenizerError(
            f"Tokenizer {name!r} has a Replace normalizer ({pat!r} -> {n.get('content')!r}) "
            "that changes text; only the SentencePiece space -> '▁' replacement is lossless.")
  for n in _walk(cfg.get("pre_tokenizer"), "pretokenizers"):
    t = n.get("type")
    if t in _LOSSY_PRETOKENIZERS:
      raise TokenizerError(
          f"Tokenizer {name!r} has a {t} pre-tokenizer, which {_LOSSY_PRETOKENIZERS[t]}: its "
          "tokens cannot spell the text's bytes. Use a lossless tokenizer.")
    if t == "Metaspace" and n.get("prepend_scheme", "always") in ("always", "first"):
      dummy_prefix = b" "
    if t == "ByteLevel" and n.get("add_prefix_space"):
      dummy_prefix = b" "
  bytelevel = any(n.get("type") == "ByteLevel"
                  for key, root in (("pretokenizers", cfg.get("pre_tokenizer")),
                                    ("decoders", cfg.get("decoder")))
                  for n in _walk(root, key))
  return {"nfc": nfc, "dummy_prefix": dummy_prefix, "bytelevel": bytelevel,
          "unk_token": model.get("unk_token")}


def _components(tok: tokenizers.Tokenizer) -> dict:
  """The normalizer/pre-tokenizer/decoder configs and model type, without
  serialising the whole vocabulary (`to_str` takes seconds on 262k pieces)."""

  def state(c):
    return None if c is None else json.loads(c.__getstate__())

  m = tok.model
  return {"normalizer": state(tok.normalizer), "pre_tokenizer": state(tok.pre_tokenizer),
          "decoder": state(tok.decoder),
          "model": {"type": type(m).__name__, "unk_token": getattr(m, "unk_token", None)}}


def _read_config(directory: Path) -> dict:
  p = directory / "tokenizer_config.json"
  if p.exists():
    with open(p, encoding="utf-8") as f:
      return json.load(f)
  return {}


def _token_content(v) -> str | None:
  if isinstance(v, dict):
    return v.get("content")
  return v


class HFTokenizer(VocabTokenizer):
  """A `tokenizers.Tokenizer` with exact byte spans.

  Args:
    tokenizer: the Rust tokenizer.
    name: a name for messages.
    bos_token / eos_token: override the BOS/EOS token strings (default: from
      tokenizer_config.json next to the file, else well-known names).
    add_bos: override whether BOS is prepended (default: tokenizer_config's
      `add_bos_token`, else whether the post-processor adds it).
    config: tokenizer_config.json contents, when available.
  """

  def __init__(self, tokenizer: tokenizers.Tokenizer, *, name: str = "hf",
               bos_token: str | None = None, eos_token: str | None = None,
               add_bos: bool | None = None, config: dict | None = None):
    self.name = name
    self._config = dict(config or {})
    info = _analyse(_components(tokenizer), name)
    self._nfc = info["nfc"]
    self._dummy_prefix = info["dummy_prefix"]
    self._spm_space = not info["bytelevel"]
    tok = tokenizer
    tok.encode_special_tokens = True
    tok.no_padding()
    tok.no_truncation()
    self._tok = tok

    vocab = tok.get_vocab(with_added_tokens=True)
    added = tok.get_added_tokens_decoder()
    size = max(max(vocab.values()) + 1, tok.get_vocab_size(with_added_tokens=True))
    conv = bytelevel_piece_to_bytes if info["bytelevel"] else sentencepiece_piece_to_bytes
    token_bytes = [b""] * size
    for piece, i in vocab.items():
      if i not in added:  # added tokens hold raw text, not vocabulary pieces
        token_bytes[i] = conv(piece)
    specials = set()
    for i, a in added.items():
      if a.special:
        token_bytes[i] = b""
        specials.add(i)
      elif a.normalized and not info["bytelevel"]:
        token_bytes[i] = sentencepiece_piece_to_bytes(a.content)
      else:
        token_bytes[i] = a.content.encode("utf-8")
    unk = info["unk_token"]
    self._unk_id = vocab.get(unk) if unk else None
    if self._unk_id is not None:
      token_bytes[self._unk_id] = b""
      specials.add(self._unk_id)
    self._token_bytes = token_bytes
    self._special_ids = frozenset(specials)

    def find(explicit, key, names):
      if explicit is not None:
        if explicit not in vocab:
          raise TokenizerError(f"Token {explicit!r} is not in tokenizer {name!r}.")
        return vocab[explicit]
      if key in self._config:
        c = _token_content(self._config[key])
        return vocab.get(c) if c else None
      return next((vocab[n] for n in names if n in vocab), None)

    self._bos_id = find(bos_token, "bos_token", _BOS_NAMES)
    self._eos_id = find(eos_token, "eos_token", _EOS_NAMES)
    if add_bos is None:
      if "add_bos_token" in self._config:
        add_bos = bool(self._config["add_bos_token"])
      else:
        probe = tok.encode("a", add_special_tokens=True).ids
        add_bos = bool(probe) and self._bos_id is not None and probe[0] == self._bos_id
    self._add_bos = bool(add_bos) and self._bos_id is not None

  @classmethod
  def from_file(cls, path: str | os.PathLike, *, name: str | None = None, **kwargs) -> "HFTokenizer":
    """Loads tokenizer.json (reading tokenizer_config.json beside it when present)."""
    path = Path(path)
    if path.is_dir():
      path = path / "tokenizer.json"
    if not path.exists():
      raise FileNotFoundError(f"No tokenizer.json at {path}.")
    try:
      tok = tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:  # the Rust error names the bad field
      raise TokenizerError(f"Could not read {path} as an HF tokenizer.json: {e}") from e
    kwargs.setdefault("config", _read_config(path.parent))
    return cls(tok, name=name or str(path), **kwargs)

  @property
  def hf_tokenizer(self) -> tokenizers.Tokenizer:
    """The underlying Rust tokenizer (special tokens are not matched inside text)."""
    return self._tok

  def _encode_ids(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts: Sequence[str | bytes], *,
                   add_special_tokens: bool = True) -> list[Encoding]:
    """Encodes many texts with one multi-threaded Rust call."""
    pairs = [to_text(t) for t in texts]
    nonempty = [s for s, _ in pairs if s]
    encs = iter(self._tok.encode_batch_fast(nonempty, add_special_tokens=False))
    return [self.finish_encoding(next(encs).ids if s else [], s, d,
                                 add_special_tokens=add_special_tokens) for s, d in pairs]

  def save_pretrained(self, directory: str | os.PathLike) -> None:
    """Writes tokenizer.json and a minimal tokenizer_config.json into `directory`."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    self._tok.encode_special_tokens = False  # the saved file behaves like the original
    try:
      self._tok.save(str(d / "tokenizer.json"))
    finally:
      self._tok.encode_special_tokens = True
    cfg = {k: v for k, v in self._config.items() if k != "added_tokens_decoder"}
    tb = self._tok.id_to_token
    cfg["bos_token"] = tb(self._bos_id) if self._bos_id is not None else None
    cfg["eos_token"] = tb(self._eos_id) if self._eos_id is not None else None
    cfg["add_bos_token"] = self._add_bos
    cfg.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
    with open(d / "tokenizer_config.json", "w", encoding="utf-8") as f:
      json.dump(cfg, f, indent=2, ensure_ascii=False)
