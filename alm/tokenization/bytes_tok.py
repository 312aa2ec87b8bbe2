"""The toolkit's own byte tokenizer: ids 0..255 are the bytes, then specials.

Used by byte-level students (docs/method.md §8). Encoding is a `np.frombuffer`;
spans are `arange`. `save_pretrained` writes an equivalent HF tokenizer.json
(byte-level BPE without merges), so saved byte-level models load elsewhere.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from alm.tokenization.base import Encoding
from alm.tokenization.vocab import VocabTokenizer, gpt2_bytes_to_unicode, to_text

DEFAULT_SPECIALS = ("<pad>", "<bos>", "<eos>", "<|im_start|>", "<|im_end|>")


class BytesTokenizer(VocabTokenizer):
  """256 byte ids followed by special tokens.

  Args:
    specials: special token strings, given ids 256, 257, ... in order; must
      contain `bos` and `eos`.
    add_bos: prepend the BOS token in `encode(..., add_special_tokens=True)`.
    bos: the special that is BOS.
    eos: the special that is EOS.
    pad: the special that is padding (None: "<pad>" when it is a special).
  """

  def __init__(self, specials: Sequence[str] = DEFAULT_SPECIALS, *, add_bos: bool = True,
               bos: str = "<bos>", eos: str = "<eos>", pad: str | None = None):
    specials = tuple(specials)
    if len(set(specials)) != len(specials):
      raise ValueError(f"Duplicate special tokens in {specials}.")
    for role, s in (("BOS", bos), ("EOS", eos)) + ((("pad", pad),) if pad else ()):
      if s not in specials:
        raise ValueError(f"The byte tokenizer's {role} token {s!r} is not among its specials "
                         f"{specials}.")
    self.name = "bytes"
    self.specials = specials
    self.bos_token, self.eos_token = bos, eos
    self._token_bytes = [bytes([b]) for b in range(256)] + [b""] * len(specials)
    self._special_ids = frozenset(range(256, 256 + len(specials)))
    self._special_to_id = {s: 256 + i for i, s in enumerate(specials)}
    self.special_names = {i: s for s, i in self._special_to_id.items()}
    self._bos_id = self._special_to_id[bos]
    self._eos_id = self._special_to_id[eos]
    self.pad_token = pad or ("<pad>" if "<pad>" in specials else None)
    self.pad_id = self._special_to_id.get(self.pad_token) if self.pad_token else None
    self._add_bos = add_bos

  def token_to_id(self, token: str) -> int:
    """Id of a special token string, e.g. "<|im_start|>"."""
    if token not in self._special_to_id:
      raise KeyError(f"{token!r} is not a special token of the byte tokenizer; "
                     f"specials are {self.specials}.")
    return self._special_to_id[token]

  def _encode_ids(self, text: str) -> list[int]:
    return list(text.encode("utf-8"))

  def encode(self, text: str | bytes, *, add_special_tokens: bool = True) -> Encoding:
    """Encodes text as one token per UTF-8 byte (BOS first when `add_bos`)."""
    _, data = to_text(text)
    ids = np.frombuffer(data, np.uint8).astype(np.int32)
    pos = np.arange(len(data), dtype=np.int32)
    starts, ends = pos, pos + 1
    special = np.zeros(len(data), bool)
    if add_special_tokens and self._add_bos:
      ids = np.concatenate([np.array([self._bos_id], np.int32), ids])
      starts = np.concatenate([np.zeros(1, np.int32), starts])
      ends = np.concatenate([np.zeros(1, np.int32), ends])
      special = np.concatenate([np.ones(1, bool), special])
    return Encoding(ids=ids, starts=starts, ends=ends, special=special, text=data)

  def hf_json(self) -> dict:
    """An equivalent HF tokenizer.json (byte-level BPE, no merges, specials added)."""
    b2u = gpt2_bytes_to_unicode()
    vocab = {b2u[b]: b for b in range(256)}
    bl = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
          "use_regex": False}
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": i, "content": s, "single_word": False, "lstrip": False,
                          "rstrip": False, "normalized": False, "special": True}
                         for s, i in self._special_to_id.items()],
        "normalizer": None, "pre_tokenizer": bl, "post_processor": None, "decoder": bl,
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": []},
    }

  def save_pretrained(self, directory: str | os.PathLike) -> None:
    """Writes tokenizer.json and tokenizer_config.json (HF-readable)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    with open(d / "tokenizer.json", "w", encoding="utf-8") as f:
      json.dump(self.hf_json(), f, ensure_ascii=False)
    with open(d / "tokenizer_config.json", "w", encoding="utf-8") as f:
      json.dump({"bos_token": self.bos_token, "eos_token": self.eos_token,
                 "pad_token": self.pad_token or self.eos_token,
                 "add_bos_token": self._add_bos, "alm_tokenizer": "bytes",
                 "alm_specials": list(self.specials),
                 **({"alm_pad_token": self.pad_token} if self.pad_token else {}),
                 "tokenizer_class": "PreTrainedTokenizerFast"}, f, indent=2)
