"""SentencePiece `.model` files (Mistral v1/v3, Llama 2, ...) at the byte level.

Piece bytes: "▁" is a space, `<0xNN>` byte-fallback pieces are the byte NN,
control and unknown pieces are specials without bytes. SentencePiece's dummy
prefix (`add_dummy_prefix`: "Hello" is encoded as "▁Hello") is a space the
text does not have: it is exposed as `dummy_prefix == b" "` and the first
token's span starts at byte 0 of the text (its leading space is not part of
the text). Any other normalization that changes text is caught by the
exactness check of every encode.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

from alm.tokenization.base import Encoding, TokenizerError
from alm.tokenization.vocab import VocabTokenizer, sentencepiece_piece_to_bytes, to_text


class SentencePieceTokenizer(VocabTokenizer):
  """A SentencePiece model with exact byte spans.

  Args:
    model_file: path of the `.model` file.
    name: a name for messages.
    add_bos: prepend BOS (default True when the model has a BOS piece, as
      Llama/Mistral do).
  """

  def __init__(self, model_file: str | os.PathLike, *, name: str | None = None,
               add_bos: bool | None = None):
    self.model_file = Path(model_file)
    self.name = name or str(model_file)
    proto = sp_pb2.ModelProto()
    try:
      proto.ParseFromString(self.model_file.read_bytes())
      self._sp = spm.SentencePieceProcessor(model_file=str(self.model_file))
    except Exception as e:  # protobuf/sentencepiece errors name little
      raise TokenizerError(f"Could not read {model_file} as a SentencePiece model: {e}") from e
    norm = proto.normalizer_spec
    if norm.name not in ("identity", "") or norm.remove_extra_whitespaces:
      # nmt_nfkc folds compatibility characters, remove_extra_whitespaces collapses runs:
      # both change text; a text they change fails the exactness check with this hint.
      self._lossy_hint = (f"normalizer {norm.name!r}, remove_extra_whitespaces="
                          f"{norm.remove_extra_whitespaces}")
    else:
      self._lossy_hint = ""
    self._dummy_prefix = b" " if norm.add_dummy_prefix else b""
    self._spm_space = True
    sp = self._sp
    n = sp.get_piece_size()
    token_bytes, specials = [], set()
    for i in range(n):
      if sp.is_control(i) or sp.is_unknown(i):
        token_bytes.append(b"")
        specials.add(i)
      elif sp.is_byte(i):
        token_bytes.append(sentencepiece_piece_to_bytes(sp.id_to_piece(i)))
      else:
        token_bytes.append(sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8"))
    self._token_bytes = token_bytes
    self._special_ids = frozenset(specials)
    self._bos_id = sp.bos_id() if sp.bos_id() >= 0 else None
    self._eos_id = sp.eos_id() if sp.eos_id() >= 0 else None
    self._unk_id = sp.unk_id() if sp.unk_id() >= 0 else None
    self._add_bos = (self._bos_id is not None) if add_bos is None else bool(add_bos)

  @classmethod
  def from_file(cls, path: str | os.PathLike, **kwargs) -> "SentencePieceTokenizer":
    """Loads a `.model` file (reading tokenizer_config.json beside it for add_bos)."""
    path = Path(path)
    cfg_path = path.parent / "tokenizer_config.json"
    if "add_bos" not in kwargs and cfg_path.exists():
      cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
      if "add_bos_token" in cfg:
        kwargs["add_bos"] = bool(cfg["add_bos_token"])
    return cls(path, **kwargs)

  @property
  def sp(self) -> spm.SentencePieceProcessor:
    """The underlying SentencePiece processor."""
    return self._sp

  def _encode_ids(self, text: str) -> list[int]:
    return self._sp.encode(text)

  def _raise_mismatch(self, ids, s, data, spelled, expected):
    if self._lossy_hint and "\u2581" not in s and not (self._unk_id is not None and (ids == self._unk_id).any()):
      raise TokenizerError(
          f"SentencePiece model {self.name!r} changes this text ({self._lossy_hint}), so its "
          "tokens do not spell the text's bytes. Use a model with the identity normalizer, or "
          "normalize the text the same way first.")
    super()._raise_mismatch(ids, s, data, spelled, expected)

  def encode_batch(self, texts: Sequence[str | bytes], *,
                   add_special_tokens: bool = True) -> list[Encoding]:
    """Encodes many texts with one multi-threaded SentencePiece call."""
    pairs = [to_text(t) for t in texts]
    ids = self._sp.encode([s for s, _ in pairs])
    return [self.finish_encoding(i if s else [], s, d, add_special_tokens=add_special_tokens)
            for i, (s, d) in zip(ids, pairs)]

  def save_pretrained(self, directory: str | os.PathLike) -> None:
    """Writes tokenizer.model and tokenizer_config.json into `directory`."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    if (d / "tokenizer.model").resolve() != self.model_file.resolve():
      shutil.copyfile(self.model_file, d / "tokenizer.model")
    sp = self._sp
    cfg = {"bos_token": sp.id_to_piece(self._bos_id) if self._bos_id is not None else None,
           "eos_token": sp.id_to_piece(self._eos_id) if self._eos_id is not None else None,
           "unk_token": sp.id_to_piece(self._unk_id) if self._unk_id is not None else None,
           "add_bos_token": self._add_bos, "tokenizer_class": "LlamaTokenizer"}
    with open(d / "tokenizer_config.json", "w", encoding="utf-8") as f:
      json.dump(cfg, f, indent=2)
