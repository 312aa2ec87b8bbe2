"""The backtracked subword n-gram lookup of byte-level students (SPEC §10).

A byte student's input at byte `i` adds the embedding of `s_i`: the id, in
the original (teacher) vocabulary, of the **longest original token whose
bytes end exactly at byte i** — a greedy longest-suffix match of the text's
bytes up to `i`, at most `max_bytes` long (the reference caps it at 16); not
the original tokenizer's segmentation. `SuffixLookup` computes it for a whole
byte string with a few vectorised numpy passes, no Python loop per byte:

- for each length `L = 1..max_bytes`, the exact `L`-byte window ending at
  every position is packed into integers: the last `min(L, 8)` bytes into one
  uint64 (`key_L[i] = b[i-L+1] << 8(L-1) | key_{L-1}[i]`, one shift-or per
  length), and for `L > 8` the first `L - 8` bytes into a second uint64
  (`key_{L-8}[i - 8]`, already computed);
- each length's tokens sit in a sorted array of the same keys (for `L > 8`
  a 64-bit mix of the two, unique per length, checked at build time, and the
  candidate's two keys compared exactly), so one `searchsorted` per length
  finds every window that is a token;
- lengths are visited from short to long, so the longest match wins.

Duplicate byte strings (SentencePiece's `<0x41>` byte-fallback piece and the
piece `A`) resolve to the id the tokenizer itself gives those bytes when they
encode as one token, else the lowest id. Special tokens have no bytes and
never match; `lookup_segments` runs the lookup inside each segment of a text
cut at its specials, so no match crosses one.

`next_id(tail)` is the incremental form for generation: the longest token
that is a suffix of the last `max_bytes` bytes.
"""

from __future__ import annotations

import numpy as np

from alm.tokenization.base import ByteTokenizer, TokenizerError

_MIX = np.uint64(0x9E3779B97F4A7C15)  # Fibonacci hashing constant (odd: a bijection)

# Bytes of ordinary text: \t \n \r, printable ASCII, UTF-8 continuation bytes and the
# lead bytes of planes 0-3 (0xC2-0xF0; 0xF1-0xF4 start planes 4-16: unassigned, tags,
# private use).
TEXT_BYTES = np.array([0x09, 0x0A, 0x0D, *range(0x20, 0x7F), *range(0x80, 0xC0),
                       *range(0xC2, 0xF1)], np.int64)


def _pack(data: np.ndarray, max_len: int) -> list[np.ndarray]:
  """keys[L][i] = the last min(L, 8) bytes of the L-byte window ending at i, packed.

  keys[L] (L = 1..min(max_len, 8)) has one uint64 per position; windows that
  start before the data are garbage, masked by the callers.
  """
  b = data.astype(np.uint64)
  keys = [np.zeros(0, np.uint64), b.copy()]
  for length in range(2, min(max_len, 8, len(b)) + 1):
    prev = keys[-1]
    cur = prev.copy()
    shift = np.uint64(8 * (length - 1))
    cur[length - 1:] |= b[:len(b) - length + 1] << shift
    keys.append(cur)
  return keys


class SuffixLookup:
  """For each byte of a text, the longest original token ending exactly there.

  Args:
    tokenizer: the original (teacher) tokenizer; its `token_bytes` define the
      tokens (specials, with no bytes, never match).
    max_bytes: the longest match considered (the reference's 16); tokens
      longer than this are never matched.

  Raises:
    ValueError: max_bytes outside 1..16.

  `check_bytes` raises TokenizerError when the vocabulary cannot spell a byte
  of ordinary text.
  """

  def __init__(self, tokenizer: ByteTokenizer, max_bytes: int = 16):
    if not 1 <= max_bytes <= 16:
      raise ValueError(f"max_bytes must be in 1..16, got {max_bytes}.")
    self.tokenizer_name = getattr(tokenizer, "name", "tokenizer")
    self.max_bytes = max_bytes
    token_bytes = tokenizer.token_bytes
    specials = tokenizer.special_ids
    by_bytes: dict[bytes, list[int]] = {}
    for i, b in enumerate(token_bytes):
      if b and i not in specials and len(b) <= max_bytes:
        by_bytes.setdefault(b, []).append(i)
    by_length: list[list[tuple[bytes, int]]] = [[] for _ in range(max_bytes + 1)]
    for b, ids in by_bytes.items():
      by_length[len(b)].append((b, ids[0] if len(ids) == 1 else _preferred(tokenizer, b, ids)))
    self._tables = [None]  # per length L (index L): (sorted keys, ids, (hi, lo) keys or None)
    for length in range(1, max_bytes + 1):
      items = by_length[length]
      if not items:
        self._tables.append(None)
        continue
      raw = np.frombuffer(b"".join(b for b, _ in items), np.uint8).reshape(len(items), length)
      ids = np.fromiter((i for _, i in items), np.int32, len(items))
      lo_len = min(length, 8)
      lo = _pack_rows(raw[:, length - lo_len:])
      if length <= 8:
        key, hi = lo, None
      else:
        hi = _pack_rows(raw[:, :length - 8])
        key = _mix(hi, lo)
      order = np.argsort(key, kind="stable")
      key, ids = key[order], ids[order]
      if length > 8:
        hi, lo = hi[order], lo[order]
        if np.any(key[1:] == key[:-1]):  # never seen; exactness depends on it
          raise RuntimeError(f"Two {length}-byte tokens of {self.tokenizer_name!r} share a "
                             "lookup key; report this.")
      self._tables.append((key, ids, None if hi is None else (hi, lo)))
    # Byte values without a one-byte token: a byte student cannot give them an n-gram id.
    one = self._tables[1]
    have = np.zeros(256, bool)
    if one is not None:
      have[one[0].astype(np.int64)] = True
    self.missing_bytes = np.flatnonzero(~have)

  def check_bytes(self) -> None:
    """Raises TokenizerError unless every byte of ordinary text has a one-byte token.

    Ordinary text: tab, newline, carriage return, printable ASCII and the
    bytes of UTF-8 characters outside the private-use and unassigned planes
    (`TEXT_BYTES`). Other bytes a vocabulary may lack (SmolLM2's lacks six
    control characters and the lead bytes 0xC0, 0xC1, 0xF1, 0xF2, 0xF5–0xFF)
    get n-gram id -1 (no subword term); the teacher cannot encode text
    holding them either, so training never meets them.
    """
    lacking = np.intersect1d(self.missing_bytes, TEXT_BYTES)
    if len(lacking):
      shown = ", ".join(f"0x{b:02x}" for b in lacking[:8])
      raise TokenizerError(
          f"Tokenizer {self.tokenizer_name!r} has no token for {len(lacking)} byte values of "
          f"ordinary text ({shown}{', ...' if len(lacking) > 8 else ''}), so those bytes would "
          "get no subword n-gram id. A byte student needs a teacher whose vocabulary spells "
          "every byte (byte-level BPE, or SentencePiece with byte fallback).")

  def __call__(self, data: bytes | bytearray | np.ndarray) -> np.ndarray:
    """int32 [len(data)]: the longest token id ending at each byte (-1: none)."""
    arr = np.frombuffer(bytes(data), np.uint8) if not isinstance(data, np.ndarray) else data
    n = len(arr)
    out = np.full(n, -1, np.int32)
    if n == 0:
      return out
    keys = _pack(arr, self.max_bytes)
    for length in range(1, min(self.max_bytes, n) + 1):
      table = self._tables[length]
      if table is None:
        continue
      tkey, tids, parts = table
      if length <= 8:
        q = keys[length][length - 1:]
      else:
        lo = keys[8][length - 1:]
        hi = keys[length - 8][length - 9:n - 8]  # the first L - 8 bytes end 8 before i
        q = _mix(hi, lo)
      pos = np.searchsorted(tkey, q)
      pos_c = np.minimum(pos, len(tkey) - 1)
      hit = tkey[pos_c] == q
      if parts is not None:
        hit &= (parts[0][pos_c] == hi) & (parts[1][pos_c] == lo)
      idx = np.flatnonzero(hit)
      out[idx + length - 1] = tids[pos_c[idx]]
    return out

  def lookup_segments(self, data: bytes, cuts: np.ndarray | list[int]) -> np.ndarray:
    """Like `__call__`, with no match crossing a cut (byte offsets where a special sits)."""
    bounds = [0, *sorted(int(c) for c in cuts if 0 < c < len(data)), len(data)]
    parts = [self(data[a:b]) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    return np.concatenate(parts) if parts else np.zeros(0, np.int32)

  def next_id(self, tail: bytes) -> int:
    """The longest token that is a suffix of `tail` (the bytes so far), or -1."""
    tail = bytes(tail[-self.max_bytes:])
    return int(self(tail)[-1]) if tail else -1


def _pack_rows(rows: np.ndarray) -> np.ndarray:
  """uint64 [N]: each row of up to 8 bytes packed big-endian."""
  out = np.zeros(len(rows), np.uint64)
  for k in range(rows.shape[1]):
    out = (out << np.uint64(8)) | rows[:, k].astype(np.uint64)
  return out


def _mix(hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
  """A 64-bit key of a 9..16-byte window (its two packed halves), for sorting."""
  with np.errstate(over="ignore"):
    return lo ^ (hi * _MIX + (hi >> np.uint64(29)))


def _preferred(tokenizer: ByteTokenizer, b: bytes, ids: list[int]) -> int:
  """Of several ids with the same bytes, the one the tokenizer gives them alone."""
  try:
    enc = tokenizer.encode(b.decode("utf-8"), add_special_tokens=False)
  except (UnicodeDecodeError, TokenizerError):
    return min(ids)
  if len(enc) == 1 and int(enc.ids[0]) in ids:
    return int(enc.ids[0])
  return min(ids)
