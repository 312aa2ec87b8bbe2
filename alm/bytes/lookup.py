"""The backtracked n-gram lookup inside the model: byte ids -> original token ids, in JAX.

`alm.bytes.ngram.SuffixLookup` computes `s_i` (the longest original token
ending exactly at byte i, SPEC §10) with numpy on the host. A byte student
needs it wherever it reads bytes: the training step, held-out evaluation, the
lm-eval backend, generation one byte at a time. Computing it inside the
model's forward makes the student an ordinary model of byte ids that every
one of those paths calls unchanged, and generation incremental for free (the
last `max_bytes - 1` bytes ride in the cache). It costs a few gathers per
byte on the accelerator (`benchmarks/bench_ngram.py` measures it against the
step). `SuffixLookup` stays the reference it is tested against.

The table (`TokenTable`, built once per tokenizer in numpy):

- each token of at most `max_bytes` bytes is packed into 4 uint32 words, the
  byte at distance k from its end in word k // 4 at bits 8 (k % 4), so a
  window grows by one byte at its start with one shift-or;
- a 32-bit hash of (length, words) picks a home slot; `slots` holds token ids
  by open addressing with linear probing (`probes` = the longest run any
  token walks), built without a Python loop like `SuffixLookup`'s;
- a probe's id is checked exactly against the window (its length and its
  four words), so the lookup is exact whatever the hash does.

`ngram_ids` then tries every length 1..max_bytes at every position (a fixed
number of probes each: no data-dependent loop under jit) and keeps the
longest hit the position's run of usable bytes allows.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from alm.bytes.ngram import token_choices
from alm.tokenization.base import ByteTokenizer

_GOLD = 0x9E3779B1
_C1, _C2 = 0x85EBCA6B, 0xC2B2AE35


def _fmix(x, xp):
  """murmur3's 32-bit finaliser (a bijection) for numpy or jax.numpy uint32 arrays."""
  u = xp.uint32
  x = x ^ (x >> u(16))
  x = x * u(_C1)
  x = x ^ (x >> u(13))
  x = x * u(_C2)
  return x ^ (x >> u(16))


def _hash(length, words, xp):
  """uint32 hash of a window: its length (array or scalar) and its 4 packed words."""
  u = xp.uint32
  h = xp.asarray(length).astype(u) * u(_GOLD)
  for w in words:
    h = _fmix(h ^ w, xp)
  return h


def _pack_tokens(items: list[bytes]) -> np.ndarray:
  """uint32 [N, 4]: each token's bytes packed from its end (see the module docstring)."""
  out = np.zeros((len(items), 4), np.uint32)
  for n, b in enumerate(items):
    for k, byte in enumerate(reversed(b)):
      out[n, k // 4] |= np.uint32(byte) << np.uint32(8 * (k % 4))
  return out


@dataclasses.dataclass(frozen=True)
class TokenTable:
  """The lookup's arrays (numpy; a model holds them as non-trainable Variables).

  Attributes:
    slots: int32 [S]: a token id per slot, -1 where empty.
    words: uint32 [V, 4]: each table token's bytes, packed; zeros elsewhere.
    lengths: int32 [V]: each table token's length; 0 for ids not in the table
      (specials, tokens longer than `max_bytes`, duplicates not chosen).
    bits: home slots are the top `bits` bits of the hash.
    probes: slots tried from each home (the longest run in the table).
    max_bytes: the longest window looked up.
  """

  slots: np.ndarray
  words: np.ndarray
  lengths: np.ndarray
  bits: int
  probes: int
  max_bytes: int

  @classmethod
  def build(cls, tokenizer: ByteTokenizer, max_bytes: int = 16) -> "TokenTable":
    """The table of `tokenizer`'s tokens of at most `max_bytes` bytes (ties as `SuffixLookup`)."""
    if not 1 <= max_bytes <= 16:
      raise ValueError(f"max_bytes must be in 1..16, got {max_bytes}.")
    chosen = token_choices(tokenizer, max_bytes)
    items = list(chosen)
    ids = np.fromiter((chosen[b] for b in items), np.int32, len(items))
    packed = _pack_tokens(items)
    lens = np.fromiter((len(b) for b in items), np.int32, len(items))
    with np.errstate(over="ignore"):
      h = _hash(lens, [packed[:, j] for j in range(4)], np)
    bits = max(8, int(np.ceil(np.log2(max(1, 4 * len(items))))))  # load <= 1/4
    home = (h >> np.uint32(32 - bits)).astype(np.int64)
    order = np.argsort(home, kind="stable")
    home_s = home[order]
    idx = np.arange(len(items))
    slot = np.maximum.accumulate(home_s - idx) + idx if len(items) else idx
    size = (1 << bits) + len(items) + 1  # room after the last home: no wrap-around
    slots = np.full(size, -1, np.int32)
    slots[slot] = ids[order]
    vocab = tokenizer.vocab_size
    words = np.zeros((vocab, 4), np.uint32)
    lengths = np.zeros(vocab, np.int32)
    words[ids], lengths[ids] = packed, lens
    probes = int((slot - home_s).max(initial=0)) + 1
    return cls(slots=slots, words=words, lengths=lengths, bits=bits, probes=probes,
               max_bytes=max_bytes)


@functools.partial(jax.jit, static_argnames=("max_bytes",))
def usable_run(breaks: jax.Array, segment_ids: jax.Array | None, max_bytes: int) -> jax.Array:
  """int32 [B, N]: how many bytes ending at each position a window may use.

  A window never covers a break (a special token, padding) and never crosses
  into another segment (packed documents); capped at `max_bytes`.
  """
  n = breaks.shape[1]
  pos = jnp.arange(n, dtype=jnp.int32)[None, :]
  last = jnp.where(breaks, pos, -1)
  if segment_ids is not None:
    new_seg = jnp.concatenate([jnp.zeros_like(segment_ids[:, :1], bool),
                               segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    last = jnp.maximum(last, jnp.where(new_seg, pos - 1, -1))
  last = jax.lax.cummax(last, axis=1)
  return jnp.minimum(pos - last, max_bytes).astype(jnp.int32)


# Jitted on their own too, so an eager forward (a notebook) runs them as one computation
# each rather than op by op; under an outer jit they are inlined.
@functools.partial(jax.jit, static_argnames=("bits", "probes", "max_bytes"))
def ngram_ids(table: dict[str, jax.Array], byte_ids: jax.Array, run: jax.Array, *,
              bits: int, probes: int, max_bytes: int) -> jax.Array:
  """int32 [B, N]: the longest table token ending at each position, -1 where none.

  Args:
    table: {"slots", "words", "lengths"} of a `TokenTable` (device arrays).
    byte_ids: int [B, N]; values outside 0..255 must have run 0 (see `usable_run`).
    run: int [B, N] from `usable_run`: the window lengths allowed at each position.
    bits: `TokenTable.bits`.
    probes: `TokenTable.probes`.
    max_bytes: `TokenTable.max_bytes`.
  """
  u = jnp.uint32
  b = (byte_ids & 0xFF).astype(u)
  slots, words_t, lengths_t = table["slots"], table["words"], table["lengths"]
  pos = jnp.arange(b.shape[1], dtype=jnp.int32)

  # Loops, not unrolled Python: one compiled body per loop keeps compilation short.
  def one_length(length, carry):
    words, out = carry  # words [4, B, N]: the window of this length ending at each position
    k = length - 1
    src = pos - k
    shifted = jnp.where(src >= 0, jnp.take(b, jnp.maximum(src, 0), axis=1), u(0))  # b[i - k]
    words = words.at[k // 4].set(words[k // 4] | (shifted << (8 * (k % 4)).astype(u)))
    home = (_hash(length, [words[j] for j in range(4)], jnp) >> u(32 - bits)).astype(jnp.int32)

    def probe(p, hit):
      cand = slots[home + p]
      c = jnp.maximum(cand, 0)
      ok = (cand >= 0) & (lengths_t[c] == length) & jnp.all(
          words_t[c] == jnp.moveaxis(words, 0, -1), axis=-1)
      return jnp.where(ok, cand, hit)

    hit = jax.lax.fori_loop(0, probes, probe, jnp.full(b.shape, -1, jnp.int32))
    return words, jnp.where((run >= length) & (hit >= 0), hit, out)

  init = (jnp.zeros((4,) + b.shape, u), jnp.full(b.shape, -1, jnp.int32))
  return jax.lax.fori_loop(1, max_bytes + 1, one_length, init)[1]
