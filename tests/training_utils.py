"""Shared fixtures of the training tests: tiny tokenizers, tiny teacher, tiny corpus."""

from __future__ import annotations

import json
from pathlib import Path

from alm.testing.models import tiny_model
from alm.tokenization.bytes_tok import BytesTokenizer
from alm.testing.tokenizers import GreedyTokenizer

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
