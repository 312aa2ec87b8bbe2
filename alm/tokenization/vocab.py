"""Shared machinery of the concrete tokenizers: vocabulary bytes and exact spans.

Every wrapper (HF `tokenizers`, SentencePiece, tiktoken-style ranks, GGUF,
bytes) produces token ids with its own library and hands them to
`VocabTokenizer.finish_encoding`, which derives the byte spans from the
vocabulary's byte strings (a cumulative sum of token lengths) and checks, on
every encode, that the tokens spell the text exactly. A lossy normalizer, an
`<unk>` or a dropped character can therefore never produce a silently
misaligned `Encoding`: it raises `TokenizerError` instead.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Iterable, Sequence

import numpy as np

from alm.tokenization.base import ByteTokenizer, Encoding, TokenizerError

# Candidate pretoken-boundary bytes (ASCII whitespace); which of them really are
# boundaries is computed from each vocabulary (`compute_boundary_bytes`).
WHITESPACE_BYTES = frozenset(b" \t\n\r\x0b\x0c")
_BOUNDARY_CANDIDATES = frozenset(b" \t\n\r")

_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@functools.cache
def gpt2_bytes_to_unicode() -> dict[int, str]:
  """The GPT-2 table that maps every byte to a printable unicode character."""
  bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1)))
  cs = bs[:]
  n = 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return {b: chr(c) for b, c in zip(bs, cs)}


@functools.cache
def gpt2_unicode_to_bytes() -> dict[str, int]:
  """Inverse of `gpt2_bytes_to_unicode`."""
  return {c: b for b, c in gpt2_bytes_to_unicode().items()}


def bytelevel_piece_to_bytes(piece: str) -> bytes:
  """Raw bytes of a byte-level BPE piece ("Ġhello" -> b" hello").

  Raises:
    TokenizerError: the piece has a character outside the GPT-2 byte table.
  """
  try:
    # str.translate to code points 0..255 then latin-1: C speed for 262k-entry vocabularies.
    return piece.translate(_gpt2_translation()).encode("latin-1")
  except UnicodeEncodeError as e:
    raise TokenizerError(
        f"Byte-level piece {piece!r} has character {piece[e.start:e.end]!r} outside the GPT-2 "
        "byte table; the vocabulary is not byte-level (check the tokenizer type)."
    ) from None


@functools.cache
def _gpt2_translation() -> dict[int, int]:
  table = {c: 0xFFFF for c in range(256)}  # 0..255 outside the table must not pass through
  table.update({ord(c): b for c, b in gpt2_unicode_to_bytes().items()})
  return table


def sentencepiece_piece_to_bytes(piece: str) -> bytes:
  """Raw bytes of a SentencePiece piece ("▁the" -> b" the", "<0x0A>" -> b"\\n")."""
  m = _BYTE_PIECE.match(piece)
  if m:
    return bytes([int(m.group(1), 16)])
  return piece.replace("\u2581", " ").encode("utf-8")


def to_text(text: str | bytes) -> tuple[str, bytes]:
  """Returns (str, UTF-8 bytes) of `text`, rejecting invalid UTF-8.

  Raises:
    TokenizerError: `text` is bytes that are not valid UTF-8, or not text at all.
  """
  if isinstance(text, str):
    try:
      return text, text.encode("utf-8")
    except UnicodeEncodeError as e:
      raise TokenizerError(
          f"Text has a lone surrogate at character {e.start} ({text[e.start]!r}); it has "
          "no UTF-8 bytes. Fix the text (e.g. decode your source with errors='replace')."
      ) from None
  if isinstance(text, (bytes, bytearray, memoryview)):
    data = bytes(text)
    try:
      return data.decode("utf-8"), data
    except UnicodeDecodeError as e:
      raise TokenizerError(
          f"Text is not valid UTF-8: {e.reason} at byte {e.start} "
          f"({data[e.start:e.start + 4]!r}). Tokenizers work on UTF-8 text; decode your "
          "source with the right encoding (or errors='replace') first.") from None
  raise TokenizerError(f"Text must be str or bytes, got {type(text).__name__}.")


def compute_boundary_bytes(token_bytes: Sequence[bytes], special: Iterable[int], *,
                           tolerance: float = 1e-3) -> frozenset[int]:
  """The pretoken-boundary bytes of a vocabulary (docs/method.md §1).

  A candidate whitespace byte (space, tab, newline, carriage return) is a
  boundary byte when tokens do not contain it after a non-whitespace
  character: a token may start with it, and may be a run of (Unicode)
  whitespace ("\\n\\n"), but tokens like ".\\n" show that the tokenizer
  does not start a new pretoken at that byte. A handful of odd pieces does not
  disqualify a byte: it stays a boundary byte while the tokens containing it
  inside number at most `tolerance` times the tokens starting with it (Gemma 3
  has one piece "> </" among ~100k pieces starting with a space; Qwen3 has
  ~2,000 pieces like ";\\n", so "\\n" is not a boundary byte there).

  Args:
    token_bytes: bytes of every id.
    special: ids to ignore (specials carry no bytes).
    tolerance: allowed ratio of inside occurrences to starting occurrences.

  Returns:
    The boundary bytes.
  """
  special = set(special)
  inside = dict.fromkeys(_BOUNDARY_CANDIDATES, 0)
  starting = dict.fromkeys(_BOUNDARY_CANDIDATES, 0)
  for i, tb in enumerate(token_bytes):
    if not tb or i in special:
      continue
    if tb[0] in starting:
      starting[tb[0]] += 1
    if len(tb) < 2 or not any(c in tb[1:] for c in _BOUNDARY_CANDIDATES):
      continue
    # Skip the leading whitespace run (Unicode whitespace too: "\u00a0 \u00a0" is a run);
    # a candidate byte after the first non-whitespace character is "inside" a pretoken.
    s = tb.decode("utf-8", errors="surrogateescape")
    k = next((j for j, ch in enumerate(s) if not ch.isspace()), len(s))
    rest = s[k + 1:].encode("utf-8", errors="surrogateescape")
    for c in _BOUNDARY_CANDIDATES:
      if c in rest:
        inside[c] += 1
  return frozenset(c for c in _BOUNDARY_CANDIDATES if inside[c] <= tolerance * starting[c])


class VocabTokenizer(ByteTokenizer):
  """A `ByteTokenizer` backed by a table of token bytes.

  Subclasses set, in `__init__`, `name`, `_token_bytes` (list of bytes, b"" for
  specials), `_special_ids`, `_bos_id`, `_eos_id`, `_add_bos`, and optionally
  `_dummy_prefix` (b" " for SentencePiece models that prepend a space to the
  text), `_unk_id` and `_nfc` (the tokenizer NFC-normalizes its input); they
  implement `_encode_ids(text: str) -> list[int]` (ids of the text, no
  specials added) and `save_pretrained`.
  """

  name: str = "tokenizer"
  _token_bytes: list[bytes]
  _special_ids: frozenset[int]
  _bos_id: int | None = None
  _eos_id: int | None = None
  _add_bos: bool = False
  _dummy_prefix: bytes = b""
  _unk_id: int | None = None
  _nfc: bool = False
  _spm_space: bool = False  # "▁" in the vocabulary stands for a space (SentencePiece)

  # ---- ByteTokenizer contract ----------------------------------------------

  @property
  def vocab_size(self) -> int:
    return len(self._token_bytes)

  @property
  def token_bytes(self) -> list[bytes]:
    return self._token_bytes

  @property
  def special_ids(self) -> frozenset[int]:
    return self._special_ids

  @property
  def bos_id(self) -> int | None:
    return self._bos_id

  @property
  def eos_id(self) -> int | None:
    return self._eos_id

  @property
  def add_bos(self) -> bool:
    return self._add_bos

  @property
  def dummy_prefix(self) -> bytes:
    """Bytes the tokenizer prepends to non-empty text (SentencePiece's "▁")."""
    return self._dummy_prefix

  def __repr__(self) -> str:
    return (f"{type(self).__name__}(name={self.name!r}, vocab_size={self.vocab_size}, "
            f"bos_id={self.bos_id}, eos_id={self.eos_id}, add_bos={self.add_bos})")

  # ---- per-vocabulary tables, computed once ---------------------------------

  @functools.cached_property
  def token_lengths(self) -> np.ndarray:
    """int32 [vocab_size] byte length of every id (0 for specials)."""
    return np.fromiter((len(b) for b in self._token_bytes), np.int32, len(self._token_bytes))

  @functools.cached_property
  def special_mask(self) -> np.ndarray:
    """bool [vocab_size], True for special ids."""
    m = np.zeros(self.vocab_size, bool)
    m[list(self._special_ids)] = True
    return m

  @functools.cached_property
  def first_byte(self) -> np.ndarray:
    """int16 [vocab_size] first byte of every id, -1 for empty (special) ids."""
    return np.fromiter((b[0] if b else -1 for b in self._token_bytes), np.int16,
                       len(self._token_bytes))

  @functools.cached_property
  def boundary_bytes(self) -> frozenset[int]:
    """Pretoken-boundary bytes computed from the vocabulary (see `compute_boundary_bytes`)."""
    return compute_boundary_bytes(self._token_bytes, self._special_ids)

  def boundary_token_mask(self, boundary_bytes: Iterable[int] | None = None) -> np.ndarray:
    """bool [vocab_size]: ids whose first byte is a boundary byte, or EOS.

    Args:
      boundary_bytes: the boundary bytes to use (default: this vocabulary's
        own `boundary_bytes`). A teacher/student pair must use one shared set
        for outcome debiasing; see `shared_boundary_bytes`.
    """
    if boundary_bytes is None:
      return self._boundary_token_mask.copy()
    return self._mask_for(frozenset(boundary_bytes))

  def _mask_for(self, boundary_bytes: frozenset[int]) -> np.ndarray:
    table = np.zeros(257, bool)  # index 256 <- first_byte == -1
    table[list(boundary_bytes)] = True
    m = table[self.first_byte.astype(np.int32) % 257]
    if self._eos_id is not None:
      m[self._eos_id] = True
    return m

  @functools.cached_property
  def _boundary_token_mask(self) -> np.ndarray:
    return self._mask_for(self.boundary_bytes)

  @functools.cached_property
  def single_bytes(self) -> frozenset[int]:
    """Bytes that some token spells alone (a lossless vocabulary has all of 0x00-0xF4)."""
    return frozenset(b[0] for i, b in enumerate(self._token_bytes)
                     if len(b) == 1 and i not in self._special_ids)

  @functools.cached_property
  def piece_to_id(self) -> dict[bytes, int]:
    """Byte string -> id for non-special ids (the lowest id wins on duplicates)."""
    out: dict[bytes, int] = {}
    for i, b in enumerate(self._token_bytes):
      if b and i not in self._special_ids and b not in out:
        out[b] = i
    return out

  # ---- encoding ---------------------------------------------------------------

  def _encode_ids(self, text: str) -> list[int]:
    raise NotImplementedError

  def normalize(self, text: str) -> str:
    """Returns `text` in the form this tokenizer encodes exactly (NFC if it normalizes)."""
    return unicodedata.normalize("NFC", text) if self._nfc else text

  def encode(self, text: str | bytes, *, add_special_tokens: bool = True) -> Encoding:
    """Tokenizes `text` with exact byte spans (see `ByteTokenizer.encode`).

    Raises:
      TokenizerError: invalid UTF-8, or the tokens do not spell the text exactly
        (a lossy normalizer, an unknown character); the message names the fix.
    """
    s, data = to_text(text)
    ids = self._encode_ids(s) if s else []
    return self.finish_encoding(ids, s, data, add_special_tokens=add_special_tokens)

  def encode_batch(self, texts: Sequence[str | bytes], *,
                   add_special_tokens: bool = True) -> list[Encoding]:
    """Encodes several texts (subclasses batch the underlying library call)."""
    return [self.encode(t, add_special_tokens=add_special_tokens) for t in texts]

  def finish_encoding(self, ids: Sequence[int] | np.ndarray, s: str, data: bytes, *,
                      add_special_tokens: bool) -> Encoding:
    """Builds the `Encoding` of text ids: spans by cumulative length, exactness checked.

    Args:
      ids: the ids of the text (no BOS/EOS).
      s: the text.
      data: its UTF-8 bytes.
      add_special_tokens: prepend BOS when the tokenizer adds one.

    Returns:
      The encoding.

    Raises:
      TokenizerError: the tokens do not spell `data` exactly.
    """
    ids = np.asarray(ids, dtype=np.int32)
    tb = self._token_bytes
    spelled = b"".join([tb[i] for i in ids.tolist()])
    expected = self._dummy_prefix + data if data else data
    if spelled != expected:
      self._raise_mismatch(ids, s, data, spelled, expected)
    lens = self.token_lengths[ids]
    ends = np.cumsum(lens, dtype=np.int64) - len(self._dummy_prefix if data else b"")
    ends = np.maximum(ends, 0).astype(np.int32)
    starts = np.maximum(ends - lens, 0).astype(np.int32)
    special = self.special_mask[ids]
    if add_special_tokens and self._add_bos and self._bos_id is not None:
      ids = np.concatenate([np.array([self._bos_id], np.int32), ids])
      starts = np.concatenate([np.zeros(1, np.int32), starts])
      ends = np.concatenate([np.zeros(1, np.int32), ends])
      special = np.concatenate([np.ones(1, bool), special])
    return Encoding(ids=ids, starts=starts, ends=ends, special=special, text=data)

  def _raise_mismatch(self, ids, s: str, data: bytes, spelled: bytes, expected: bytes):
    if self._unk_id is not None and np.any(ids == self._unk_id):
      pos = int(np.argmax(ids == self._unk_id))
      raise TokenizerError(
          f"Tokenizer {self.name!r} produced its unknown token <unk> (token {pos}): the "
          "text has characters outside its vocabulary and cannot be represented "
          "exactly. Remove or replace those characters, or use a byte-level tokenizer.")
    missing = sorted(set(data) - self.single_bytes)
    if missing:
      raise TokenizerError(
          f"Tokenizer {self.name!r} has no token for byte(s) "
          f"{', '.join(f'0x{b:02X}' for b in missing[:5])} of this text (a rare character such as "
          f"{next(c for c in s if set(c.encode()) & set(missing))!r}), so the library drops "
          "it. Remove such characters or use a tokenizer with all 256 bytes.")
    if self._spm_space and "\u2581" in s:
      raise TokenizerError(
          f"Tokenizer {self.name!r} is SentencePiece-style: it writes spaces as '▁' (U+2581), so "
          "a literal '▁' in the text becomes a space and cannot be represented exactly. "
          "Replace U+2581 in the text (e.g. by '_') before encoding.")
    if self._nfc and not unicodedata.is_normalized("NFC", s):
      raise TokenizerError(
          f"Tokenizer {self.name!r} NFC-normalizes its input and this text is not in NFC "
          "(e.g. a combining mark after a base letter), so its tokens would not spell the "
          "text's bytes. Normalize first: `text = tokenizer.normalize(text)` "
          "(unicodedata.normalize('NFC', text)).")
    n = next((k for k in range(min(len(spelled), len(expected)))
              if spelled[k] != expected[k]), min(len(spelled), len(expected)))
    raise TokenizerError(
        f"Tokenizer {self.name!r} cannot represent this text exactly: its tokens spell "
        f"{spelled[max(0, n - 10):n + 10]!r} where the text has "
        f"{expected[max(0, n - 10):n + 10]!r} (byte {n}). The tokenizer changes text "
        "(a normalizer or unknown characters); use a lossless tokenizer or clean the text.")

  # ---- decoding ---------------------------------------------------------------

  def decode_bytes(self, ids) -> bytes:
    """Concatenated bytes of the non-special ids (the dummy prefix is removed)."""
    tb = self._token_bytes
    out = b"".join([tb[i] for i in np.asarray(ids, np.int64).tolist()])
    if self._dummy_prefix and out.startswith(self._dummy_prefix):
      out = out[len(self._dummy_prefix):]
    return out

  def decode(self, ids) -> str:
    """Decodes ids to text (invalid UTF-8 from partial tokens becomes U+FFFD)."""
    return self.decode_bytes(ids).decode("utf-8", errors="replace")

  def save_pretrained(self, directory) -> None:
    """Writes the tokenizer file(s) of an HF-format directory."""
    raise NotImplementedError


def shared_boundary_bytes(teacher: ByteTokenizer, student: ByteTokenizer) -> frozenset[int]:
  """The pretoken-boundary bytes of a tokenizer pair: those of both vocabularies.

  Outcome debiasing (docs/method.md §3) compares the teacher's and the student's
  probability of "this chunk, then a token starting with a boundary byte".
  The two are probabilities of the same event only when "boundary byte" is
  one set on both sides: with SmolLM2 (space, tab, newline, CR) and Qwen3
  (space, tab) the teacher's side would also count a following newline and
  the student's would not, biasing every chunk before a line break. The
  intersection is the set for which neither tokenizer can put the byte
  inside a token after its first byte, so on both sides the next token starts
  with such a byte exactly when the next text byte is one.

  Raises:
    ValueError: the two vocabularies share no boundary byte (debiasing is not
      defined; train with debias=False).
  """
  shared = frozenset(teacher.boundary_bytes) & frozenset(student.boundary_bytes)
  if not shared:
    raise ValueError(
        f"The teacher's boundary bytes {sorted(teacher.boundary_bytes)} and the student's "
        f"{sorted(student.boundary_bytes)} have none in common, so outcome-chunk debiasing "
        "has no shared event; train with debias=False (--nodebias).")
  return shared
