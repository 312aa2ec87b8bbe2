"""The backtracked subword n-gram lookup of byte-level students (SPEC §10).

A byte student's input at byte `i` adds the embedding of `s_i`: the id, in
the original (teacher) vocabulary, of the **longest original token whose
bytes end exactly at byte i** — a greedy longest-suffix match of the text's
bytes up to `i`, at most `max_bytes` long (the reference caps it at 16); not
the original tokenizer's segmentation. `SuffixLookup` computes it for a whole
byte string with a few vectorised numpy passes, no Python loop per byte:

- the windows ending at every position are packed into integers: the last
  `min(L, 8)` bytes into one uint64 (`key_L[i] = b[i-L+1] << 8(L-1) |
  key_{L-1}[i]`, one shift-or per length), and for `L > 8` the first `L - 8`
  bytes into a second uint64 (`key_{L-8}[i - 8]`, already computed);
- one hash table (open addressing, linear probing, built without a Python
  loop) holds every suffix of every token, keyed by a 64-bit mix of (length,
  both halves); a found entry's three are compared exactly, so the lookup is
  exact;
- lengths are tried from 1 up, only at positions whose previous window was
  some token's suffix (a window that is no token's suffix cannot grow into a
  token), and a longer hit overwrites a shorter one.

Throughput (benchmarks/bench_ngram.py, BUILD_NOTES): ~0.8 MB/s per core on a
shared machine, about the speed of the teacher's own tokenizer; a call costs ~3 ms of numpy
overhead, so call it on many documents at once (`lookup_segments`).

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
_BLOCK = 1 << 15  # positions per vectorised block

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
    chosen = token_choices(tokenizer, max_bytes)
    # The table holds every suffix of every token (id -1 when the suffix is not itself a
    # token): a window that is no token's suffix cannot grow into a token, so the search
    # stops extending there. Each entry: (length, first L-8 bytes, last <= 8 bytes).
    suffixes = {b[-k:] for b in chosen for k in range(1, len(b) + 1)}
    items = [(b, chosen.get(b, -1)) for b in suffixes]
    lens = np.fromiter((len(b) for b, _ in items), np.int64, len(items))
    ids = np.fromiter((i for _, i in items), np.int32, len(items))
    lo = np.zeros(len(items), np.uint64)
    hi = np.zeros(len(items), np.uint64)
    for length in range(1, max_bytes + 1):
      sel = np.flatnonzero(lens == length)
      if not len(sel):
        continue
      raw = np.frombuffer(b"".join(items[k][0] for k in sel), np.uint8).reshape(len(sel), length)
      lo[sel] = _pack_rows(raw[:, max(0, length - 8):])
      if length > 8:
        hi[sel] = _pack_rows(raw[:, :length - 8])
    key = _mix(lens.astype(np.uint64), hi, lo)
    # Open addressing with linear probing, built without a loop: entries sorted by home
    # slot take the first free slot at or after it (slot_i = max(home_i, slot_{i-1} + 1),
    # a running maximum), so each home's entries sit in one run after it, in home order.
    bits = max(10, int(np.ceil(np.log2(max(1, 2 * len(key))))))
    self._shift = np.uint64(64 - bits)
    home = (key >> self._shift).astype(np.int64)
    order = np.lexsort((key, home))
    home, key = home[order], key[order]
    if np.any((key[1:] == key[:-1])):  # never seen; exactness depends on it
      raise RuntimeError(f"Two tokens of {self.tokenizer_name!r} share a lookup key; report "
                         "this.")
    idx = np.arange(len(key))
    slot = np.maximum.accumulate(home - idx) + idx if len(key) else idx
    size = (1 << bits) + len(key) + 1  # room after the last home: no wrap-around
    self._probes = int((slot - home).max(initial=0)) + 1  # the longest run a query walks
    self._t_key = np.zeros(size, np.uint64)
    self._t_home = np.full(size, np.iinfo(np.int64).max)
    self._t_key[slot], self._t_home[slot] = key, home  # empty slots: home = max
    self._t_ids = np.full(size, -1, np.int32)
    self._t_len = np.zeros(size, np.int64)
    self._t_hi = np.zeros(size, np.uint64)
    self._t_lo = np.zeros(size, np.uint64)
    self._t_ids[slot], self._t_len[slot] = ids[order], lens[order]
    self._t_hi[slot], self._t_lo[slot] = hi[order], lo[order]
    self._len1 = lo[(lens == 1) & (ids >= 0)]
    # Byte values without a one-byte token: a byte student cannot give them an n-gram id.
    have = np.zeros(256, bool)
    have[self._len1.astype(np.int64)] = True
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
    return self._lookup(arr, np.arange(1, len(arr) + 1))

  def lookup_segments(self, data: bytes, cuts: np.ndarray | list[int]) -> np.ndarray:
    """Like `__call__`, with no match crossing a cut (byte offsets where a special sits)."""
    arr = np.frombuffer(bytes(data), np.uint8)
    start = np.zeros(len(arr), np.int64)
    cuts = np.asarray([c for c in np.asarray(cuts, np.int64).ravel() if 0 < c < len(arr)],
                      np.int64)
    start[cuts] = cuts
    start = np.maximum.accumulate(start) if len(arr) else start
    return self._lookup(arr, np.arange(len(arr)) - start + 1)

  def _lookup(self, arr: np.ndarray, avail: np.ndarray) -> np.ndarray:
    """The lookup, with at most `avail[i]` bytes ending at i usable (its segment's)."""
    n = len(arr)
    out = np.full(n, -1, np.int32)
    span = self.max_bytes - 1
    for s in range(0, n, _BLOCK):  # blocks bound the [max_bytes, block] temporaries
      e = min(n, s + _BLOCK)
      lo_s = max(0, s - span)
      out[s:e] = self._block(arr[lo_s:e], np.minimum(avail[s:e], self.max_bytes), s - lo_s)
    return out

  def _block(self, arr: np.ndarray, avail: np.ndarray, skip: int) -> np.ndarray:
    """Ids for positions skip.. of arr (earlier bytes are context only)."""
    n, m = len(arr), self.max_bytes
    keys = _pack(arr, min(m, 8))  # keys[l][i]: the last l bytes ending at i
    out = np.full(n - skip, -1, np.int32)
    act = np.flatnonzero(avail >= 1)  # positions (relative to skip) still extending
    for length in range(1, min(m, n) + 1):
      if not len(act):
        break
      pos = act + skip
      lo = keys[min(length, 8)][pos]
      hi = keys[length - 8][pos - 8] if length > 8 else np.zeros_like(lo)
      ln = np.uint64(length)
      q = _mix(ln, hi, lo)
      k = self._find(q)
      kc = np.maximum(k, 0)
      hit = ((k >= 0) & (self._t_len[kc] == length) & (self._t_hi[kc] == hi)
             & (self._t_lo[kc] == lo))
      tid = np.where(hit, self._t_ids[kc], -1)
      is_token = tid >= 0
      out[act[is_token]] = tid[is_token]  # longer lengths come later and overwrite
      act = act[hit & (avail[act] > length)]
    return out

  def _find(self, q: np.ndarray) -> np.ndarray:
    """Table slots of the keys q (-1: absent): linear probing from each home slot until
    the key, an empty slot or an entry of a later home."""
    home = (q >> self._shift).astype(np.int64)
    k = np.full(len(q), -1, np.int64)
    active = np.arange(len(q))
    for step in range(self._probes):
      sl = home[active] + step
      done = self._t_key[sl] == q[active]
      k[active[done]] = sl[done]
      active = active[~done & (self._t_home[sl] <= home[active])]
      if not len(active):
        break
    return k

  def next_id(self, tail: bytes) -> int:
    """The longest token that is a suffix of `tail` (the bytes so far), or -1."""
    tail = bytes(tail[-self.max_bytes:])
    return int(self(tail)[-1]) if tail else -1


def token_choices(tokenizer: ByteTokenizer, max_bytes: int) -> dict[bytes, int]:
  """{token bytes: the id a match returns} for every non-special token of <= max_bytes.

  Several ids with the same bytes resolve to the id the tokenizer gives those
  bytes alone, else the lowest.
  """
  specials = tokenizer.special_ids
  by_bytes: dict[bytes, list[int]] = {}
  for i, b in enumerate(tokenizer.token_bytes):
    if b and i not in specials and len(b) <= max_bytes:
      by_bytes.setdefault(b, []).append(i)
  return {b: (ids[0] if len(ids) == 1 else _preferred(tokenizer, b, ids))
          for b, ids in by_bytes.items()}


def _pack_rows(rows: np.ndarray) -> np.ndarray:
  """uint64 [N]: each row of up to 8 bytes packed big-endian."""
  out = np.zeros(len(rows), np.uint64)
  for k in range(rows.shape[1]):
    out = (out << np.uint64(8)) | rows[:, k].astype(np.uint64)
  return out


def _mix(length: np.ndarray, hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
  """A 64-bit key of a window: its length and its two packed halves, mixed, for sorting."""
  with np.errstate(over="ignore"):
    x = lo ^ ((hi + length * np.uint64(0x100000001B3)) * _MIX)
    # splitmix64's finaliser (a bijection): every bit of the key, the top ones
    # included (they pick the hash slot), depends on every input bit.
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _preferred(tokenizer: ByteTokenizer, b: bytes, ids: list[int]) -> int:
  """Of several ids with the same bytes, the one the tokenizer gives them alone."""
  try:
    enc = tokenizer.encode(b.decode("utf-8"), add_special_tokens=False)
  except (UnicodeDecodeError, TokenizerError):
    return min(ids)
  if len(enc) == 1 and int(enc.ids[0]) in ids:
    return int(enc.ids[0])
  return min(ids)
