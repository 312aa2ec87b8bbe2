"""The backtracked subword n-gram lookup against a brute-force longest-suffix search."""

from __future__ import annotations

import numpy as np
import pytest

import alm
from alm.bytes.ngram import SuffixLookup
from alm.testing.tokenizers import GreedyTokenizer, tiny_corpus, tiny_tokenizer
from alm.tokenization.base import TokenizerError


_TABLES: dict = {}


def _ids_by_bytes(tok, max_bytes: int) -> dict[bytes, set[int]]:
  key = (id(tok), max_bytes)
  if key not in _TABLES:
    by_bytes: dict[bytes, set[int]] = {}
    for i, b in enumerate(tok.token_bytes):
      if b and i not in tok.special_ids and len(b) <= max_bytes:
        by_bytes.setdefault(b, set()).add(i)
    _TABLES[key] = (tok, by_bytes)  # holds tok: its id stays unique while cached
  return _TABLES[key][1]


def _brute_force(tok, data: bytes, max_bytes: int = 16) -> list[set[int] | None]:
  """For each byte: every id whose bytes are the longest token suffix ending there."""
  by_bytes = _ids_by_bytes(tok, max_bytes)
  out = []
  for i in range(len(data)):
    found = None
    for length in range(min(max_bytes, i + 1), 0, -1):
      ids = by_bytes.get(data[i - length + 1:i + 1])
      if ids:
        found = ids
        break
    out.append(found)
  return out


def _check(tok, lookup, data: bytes):
  got = lookup(data)
  want = _brute_force(tok, data, lookup.max_bytes)
  assert got.shape == (len(data),) and got.dtype == np.int32
  for i, (g, w) in enumerate(zip(got, want)):
    if w is None:
      assert g == -1, (i, data[max(0, i - 16):i + 1])
    else:
      assert int(g) in w, (i, data[max(0, i - 16):i + 1], int(g), w)


def _texts():
  rng = np.random.default_rng(0)
  corpus = "\n\n".join(tiny_corpus()[:40])
  return [
      corpus[:3000],
      "naïve café — 東京 😀😀 ünïcödé\t\ttabs    spaces\n\n\n  x",
      " " * 40 + "\n" * 20 + "\t" * 9 + "end",
      "0123456789" * 5 + " 12345678901234567890 + 3.14159265358979",
      bytes(rng.integers(0, 256, 2000, dtype=np.uint8)).decode("utf-8", "replace"),
      "".join(chr(int(c)) for c in rng.integers(0x20, 0x3000, 400)),
  ]


@pytest.mark.parametrize("kind", ["bpe", "unigram"])
def test_tiny_tokenizers_match_brute_force(kind):
  tok = tiny_tokenizer(kind, 600)
  lookup = SuffixLookup(tok)
  for text in _texts():
    _check(tok, lookup, text.encode("utf-8"))
  rng = np.random.default_rng(1)
  _check(tok, lookup, bytes(rng.integers(0, 256, 5000, dtype=np.uint8)))  # any bytes


def test_long_tokens_and_the_cap():
  # Tokens of 9..20 bytes (two-part keys, and beyond the cap), overlapping prefixes.
  pieces = ["abcdefghi", "abcdefghij", "bcdefghijklmnop", "abcdefghijklmnopqrst",
            "xyz", "yz", "hello world!", " world!", "aaaaaaaaaaaaaaaa", "aaaaaaaa"]
  tok = GreedyTokenizer(pieces)
  data = ("abcdefghijklmnopqrst hello world! " + "a" * 40 + " xyz").encode()
  for cap in (16, 8, 12, 1):
    lookup = SuffixLookup(tok, max_bytes=cap)
    _check(tok, lookup, data)
  got = SuffixLookup(tok)(data)
  assert got[15] == tok.token_bytes.index(b"bcdefghijklmnop")  # 15 bytes, not "abcdefghij"
  assert got[19] == tok.token_bytes.index(b"t")  # the 20-byte token is over the cap
  ends = [i for i in range(len(data)) if data[:i + 1].endswith(b"aaaaaaaaaaaaaaaa")]
  assert all(got[i] == tok.token_bytes.index(b"a" * 16) for i in ends)


def test_segments_never_cross_a_special_and_incremental_equals_batch():
  tok = tiny_tokenizer("bpe", 600)
  lookup = SuffixLookup(tok)
  data = b"the return value of the function"
  cut = data.index(b"value")
  got = lookup.lookup_segments(data, [cut])
  np.testing.assert_array_equal(got[:cut], lookup(data[:cut]))
  np.testing.assert_array_equal(got[cut:], lookup(data[cut:]))
  full = lookup(data)
  assert [lookup.next_id(data[:i + 1]) for i in range(len(data))] == list(full)
  assert lookup.next_id(b"") == -1 and len(lookup(b"")) == 0


def test_duplicate_bytes_resolve_to_the_tokenizers_own_token():
  tok = alm.load_tokenizer("gemma3-270m")  # SentencePiece: "<0x41>" and "A" are both b"A"
  lookup = SuffixLookup(tok)
  a = [i for i, b in enumerate(tok.token_bytes) if b == b"A"]
  assert len(a) == 2
  want = int(tok.encode("A", add_special_tokens=False).ids[0])
  assert lookup(b"A")[0] == want
  # A lone continuation byte has only its byte-fallback token.
  (cont,) = [i for i, b in enumerate(tok.token_bytes) if b == b"\x80"]
  assert lookup(b"\x80")[0] == cont


@pytest.mark.parametrize("name", ["smollm2-135m-instruct", "qwen3", "llama3", "mistral-v3",
                                  "mistral-tekken", "gemma3-270m"])
def test_real_tokenizers_match_brute_force(name):
  tok = alm.load_tokenizer(name)
  lookup = SuffixLookup(tok)
  lookup.check_bytes()  # SmolLM2 lacks 21 byte values, none of ordinary text
  for text in _texts()[:5]:
    _check(tok, lookup, text.encode("utf-8"))


def test_a_vocabulary_without_every_byte_is_named():
  lookup = SuffixLookup(GreedyTokenizer(["ab"]))
  lookup.check_bytes()  # 256 byte symbols: fine
  from alm.tokenization.vocab import VocabTokenizer  # pylint: disable=import-outside-toplevel

  class NoBytes(VocabTokenizer):
    def __init__(self):
      self.name = "letters-only"
      self._token_bytes = [b""] + [bytes([c]) for c in range(ord("a"), ord("z") + 1)]
      self._special_ids = frozenset({0})

    def _encode_ids(self, text):
      return [self._token_bytes.index(bytes([c])) for c in text.encode()]

    def save_pretrained(self, directory):
      raise NotImplementedError

  with pytest.raises(TokenizerError, match=r"'letters-only' has no token for 183 byte values "
                                           r"of ordinary text \(0x09, 0x0a, 0x0d, 0x20.*byte "
                                           r"fallback"):
    SuffixLookup(NoBytes()).check_bytes()
  with pytest.raises(ValueError, match="max_bytes must be in 1..16"):
    SuffixLookup(GreedyTokenizer(["ab"]), max_bytes=17)
