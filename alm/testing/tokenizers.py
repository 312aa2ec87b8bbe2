"""Tiny real tokenizers, trained in-process, for tests (ours and users').

`tiny_tokenizer("bpe", vocab_size=300)` trains a byte-level BPE, and
`tiny_tokenizer("unigram", ...)` a byte-level Unigram LM, with the Rust
`tokenizers` library on a small corpus of Python standard-library docstrings
(always present, deterministic). Both are lossless (every text encodes
exactly: the 256 byte symbols are in the vocabulary) and are returned as
`HFTokenizer`s, so they behave like the real ones: exact byte spans,
`token_bytes`, boundary bytes, BOS/EOS specials. Training takes well under a
second; results are cached per arguments.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Sequence
from typing import Literal

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from alm.tokenization.hf import HFTokenizer
from alm.tokenization.vocab import VocabTokenizer

TinyKind = Literal["bpe", "unigram"]
_KINDS = ("bpe", "unigram")
SPECIALS = ("<pad>", "<bos>", "<eos>")


@functools.cache
def tiny_corpus(n_chars: int = 50_000) -> tuple[str, ...]:
  """Docstrings of a fixed list of standard-library modules (deterministic, ~n_chars)."""
  import argparse, collections, difflib, email.message, json, textwrap  # pylint: disable=import-outside-toplevel,multiple-imports
  import pathlib, string, typing, unittest  # pylint: disable=import-outside-toplevel,multiple-imports
  texts, total = [], 0
  for mod in (argparse, collections, difflib, email.message, json, textwrap, pathlib, string,
              typing, unittest):
    for _, obj in sorted(vars(mod).items()):
      doc = inspect.getdoc(obj) if (inspect.isclass(obj) or inspect.isfunction(obj)) else None
      if doc and total < n_chars:
        texts.append(doc)
        total += len(doc)
  return tuple(texts)


def tiny_tokenizer(kind: TinyKind = "bpe", vocab_size: int = 300, *,
                   corpus: Sequence[str] | None = None, add_bos: bool = True,
                   pretokenize: bool = True) -> HFTokenizer:
  """Trains a tiny lossless byte-level tokenizer.

  Args:
    kind: "bpe" or "unigram".
    vocab_size: total ids, including the 256 byte symbols and 3 specials
      (<pad>, <bos>, <eos>); at least 260.
    corpus: training texts (default: `tiny_corpus()`).
    add_bos: prepend <bos> in `encode`.
    pretokenize: split on the GPT-2 regex first (False: tokens may span
      spaces, useful for cross-word cover tokens in bias tests).

  Returns:
    The tokenizer (cached when `corpus` is None).
  """
  if kind not in _KINDS:
    raise ValueError(f"Unknown tiny tokenizer kind {kind!r}; valid kinds: {', '.join(_KINDS)}.")
  if vocab_size < 256 + len(SPECIALS) + 1:
    raise ValueError(f"vocab_size must be at least {256 + len(SPECIALS) + 1} (256 bytes + "
                     f"{len(SPECIALS)} specials + 1), got {vocab_size}.")
  if corpus is None:
    # Unigram's EM over unsplit text is slow: a smaller corpus keeps it ~1 s.
    return _cached(kind, vocab_size, add_bos, pretokenize)
  return _train(kind, vocab_size, tuple(corpus), add_bos, pretokenize)


@functools.cache
def _cached(kind, vocab_size, add_bos, pretokenize) -> HFTokenizer:
  corpus = tiny_corpus(50_000 if pretokenize or kind == "bpe" else 10_000)
  return _train(kind, vocab_size, corpus, add_bos, pretokenize)


def _train(kind, vocab_size, corpus, add_bos, pretokenize) -> HFTokenizer:
  alphabet = pre_tokenizers.ByteLevel.alphabet()
  if kind == "bpe":
    tok = tokenizers.Tokenizer(models.BPE())
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS),
                                  initial_alphabet=alphabet, show_progress=False)
  else:
    tok = tokenizers.Tokenizer(models.Unigram())
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS),
                                      initial_alphabet=alphabet, show_progress=False,
                                      max_piece_length=8)
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=pretokenize)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(corpus, trainer=trainer)
  missing = [c for c in alphabet if tok.token_to_id(c) is None]
  if missing:  # the trainer may drop unseen bytes; add them back so any text encodes
    raise RuntimeError(f"tiny {kind} tokenizer lacks byte symbols {missing[:5]}")
  return HFTokenizer(tok, name=f"tiny-{kind}-{vocab_size}", bos_token="<bos>",
                     eos_token="<eos>", add_bos=add_bos)


class GreedyTokenizer(VocabTokenizer):
  """Tiny lossless tokenizer for tests: specials, the 256 bytes, then `pieces`.

  Encoding is greedy longest match, so two instances with different pieces
  disagree on token boundaries in interesting ways (useful for alignment,
  FVT and training tests). It has no file form (`save_pretrained` raises).

  Args:
    pieces: extra vocabulary entries (str or raw bytes) after the 256 bytes.
    specials: special-token strings, ids 0..len-1; "<bos>", "<eos>" and
      "<pad>" take those roles when present.
    add_bos: whether `encode` prepends BOS.
    name: the tokenizer's name.
  """

  def __init__(self, pieces: Sequence[str | bytes],
               specials: Sequence[str] = ("<bos>", "<eos>", "<pad>"), *,
               add_bos: bool = True, name: str = "greedy"):
    self.name = name
    self.specials = tuple(specials)
    self._token_bytes = [b""] * len(self.specials) + [bytes([i]) for i in range(256)] + [
        p if isinstance(p, bytes) else p.encode() for p in pieces]
    self._special_ids = frozenset(range(len(self.specials)))
    role = {s: i for i, s in enumerate(self.specials)}
    self._bos_id, self._eos_id = role.get("<bos>"), role.get("<eos>")
    self.pad_id = role.get("<pad>")
    self._add_bos = add_bos and self._bos_id is not None
    self._maxlen = max(len(b) for b in self._token_bytes)
    self._p2i: dict[bytes, int] = {}
    for i, b in enumerate(self._token_bytes):
      if b and b not in self._p2i:
        self._p2i[b] = i

  def id_to_token(self, i: int) -> str:
    return self.specials[i]

  def _encode_ids(self, text: str) -> list[int]:
    data, out, i = text.encode(), [], 0
    while i < len(data):
      for n in range(min(self._maxlen, len(data) - i), 0, -1):
        j = self._p2i.get(data[i:i + n])
        if j is not None:
          out.append(j)
          i += n
          break
    return out

  def save_pretrained(self, directory):
    raise NotImplementedError("GreedyTokenizer is a test tokenizer with no file form.")
