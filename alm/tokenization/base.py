"""The one byte-level interface every tokenizer of the toolkit implements.

ALM works on bytes: every token maps to the exact UTF-8 bytes it stands for,
and every encoded token carries its byte span in the text (docs/method.md §1).
Special tokens (BOS, EOS, chat markers) carry no text bytes: their span is
empty (`start == end`, placed where they occur) and `special` is True.
"""

from __future__ import annotations

import abc
import dataclasses

import numpy as np


class TokenizerError(ValueError):
  """A tokenizer or a text cannot be handled exactly (lossy, <unk>, bad input)."""


@dataclasses.dataclass(frozen=True)
class Encoding:
  """A tokenized text.

  Attributes:
    ids: int32 [n] token ids.
    starts: int32 [n] byte offset where each token starts in `text`.
    ends: int32 [n] byte offset where each token ends (exclusive). For special
      tokens `starts == ends` (they cover no bytes).
    special: bool [n] True for special tokens (BOS/EOS/chat markers).
    text: the UTF-8 bytes that were encoded (specials excluded).
    loss_mask: optional bool [n]; True where the token is a training target
      (chat data: assistant turns only). None means every token.
  """

  ids: np.ndarray
  starts: np.ndarray
  ends: np.ndarray
  special: np.ndarray
  text: bytes
  loss_mask: np.ndarray | None = None

  def __len__(self) -> int:
    return int(self.ids.shape[0])


class ByteTokenizer(abc.ABC):
  """A tokenizer seen as a function of bytes (docs/method.md §1).

  Subclasses wrap HF `tokenizers`, SentencePiece, tiktoken-style rank files,
  GGUF metadata, and the toolkit's own byte tokenizer.
  """

  name: str

  @property
  @abc.abstractmethod
  def vocab_size(self) -> int:
    """Number of ids (the embedding rows a model needs), specials included."""

  @property
  @abc.abstractmethod
  def token_bytes(self) -> list[bytes]:
    """The raw bytes of every vocabulary entry, indexed by id (b"" for specials)."""

  @property
  @abc.abstractmethod
  def special_ids(self) -> frozenset[int]:
    """Ids of special tokens (no text bytes)."""

  @property
  @abc.abstractmethod
  def bos_id(self) -> int | None:
    """BOS id, or None when the tokenizer has none."""

  @property
  @abc.abstractmethod
  def eos_id(self) -> int | None:
    """EOS id, or None when the tokenizer has none."""

  @property
  @abc.abstractmethod
  def add_bos(self) -> bool:
    """Whether `encode(..., add_special_tokens=True)` prepends BOS."""

  @abc.abstractmethod
  def encode(self, text: str | bytes, *, add_special_tokens: bool = True) -> Encoding:
    """Tokenizes `text` with exact byte spans.

    Raises:
      TokenizerError: the text is not valid UTF-8, or the tokenizer cannot
        represent it exactly (the spans would not give back its bytes).
    """

  def decode(self, ids) -> str:
    """Concatenates the bytes of non-special ids and decodes them as UTF-8."""
    tb = self.token_bytes
    return b"".join(tb[int(i)] for i in ids if int(i) not in self.special_ids).decode(
        "utf-8", errors="replace")
