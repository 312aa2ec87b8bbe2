"""Shared fixtures of the training tests: tiny tokenizers, tiny teacher, tiny corpus."""

from __future__ import annotations

import json
from pathlib import Path

from alm.testing.models import tiny_model
from alm.tokenization.bytes_tok import BytesTokenizer
from alm.tokenization.vocab import VocabTokenizer

TEXTS = [
    "The quick brown fox jumps over the lazy dog. " * 2,
    "Tokenizer transfer keeps the model and changes the vocabulary.",
    "A chunk is the finest common segmentation of two tokenizations.",
    "the theory of the thing: thinking and thanking in the thaw.",
    "Hello world, hello there; then the end of the text arrives.",
    "Numbers 12345 and symbols #$% still need to round-trip exactly.",
    "Students learn from teachers by matching chunk likelihoods.",
    "In the beginning the embeddings are initialised by averaging.",
]


class GreedyTokenizer(VocabTokenizer):
  """Tiny lossless tokenizer: <bos>/<eos>/<pad>, 256 bytes, then `pieces` (greedy)."""

  def __init__(self, pieces, name="greedy"):
    self.name = name
    self.specials = ("<bos>", "<eos>", "<pad>")
    self._token_bytes = [b""] * 3 + [bytes([i]) for i in range(256)] + [p.encode() for p in pieces]
    self._special_ids = frozenset(range(3))
    self._bos_id, self._eos_id, self.pad_id = 0, 1, 2
    self._add_bos = True
    self._p2i = {}
    for i, b in enumerate(self._token_bytes):
      if b and b not in self._p2i:
        self._p2i[b] = i

  def id_to_token(self, i):
    return self.specials[i]

  def _encode_ids(self, text):
    data, out, i = text.encode(), [], 0
    while i < len(data):
      for n in range(min(8, len(data) - i), 0, -1):
        j = self._p2i.get(data[i:i + n])
        if j is not None:
          out.append(j)
          i += n
          break
    return out


def teacher_tokenizer() -> GreedyTokenizer:
  """A subword teacher tokenizer over a few English pieces."""
  return GreedyTokenizer(["th", "the", " the", "ing", "an", " a", "er", "he", "in", " t", "ou",
                          "en", " s", "ch", "es", "or"], name="tiny-teacher")


def student_tokenizer() -> BytesTokenizer:
  """The byte tokenizer (saves to an HF directory, so export can be tested)."""
  return BytesTokenizer()


def teacher_model(seed: int = 0, **overrides):
  """A tiny random llama teacher sized for `teacher_tokenizer()`."""
  return tiny_model("llama", vocab_size=teacher_tokenizer().vocab_size, seed=seed, **overrides)


def write_corpus(directory: Path, texts=TEXTS, name: str = "train.jsonl") -> Path:
  """Writes `texts` as a JSONL file and returns its path."""
  directory.mkdir(parents=True, exist_ok=True)
  p = directory / name
  p.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
  return p
