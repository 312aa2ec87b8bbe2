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


def tiny_trainer(corpus: Path, out: Path, cfg, *, kind=None, **opts):
  """A `Trainer` of the tiny teacher -> byte-vocabulary student on `corpus`.

  `kind`: a student kind (default: `SharedBody`; `alm.bytes.student.ByteStudent()`
  builds a byte student with the n-gram embeddings, its byte tokenizer from the teacher's).

  The training pipeline is shuffled by `cfg.seed`; the held-out set is the
  corpus's first batch of 2 rows. `opts` go to `RunOptions` (no progress bar,
  no TensorBoard).
  """
  # pylint: disable=import-outside-toplevel
  from alm.data.pipeline import Pipeline, PipelineConfig
  from alm.training.students import build_transfer_model
  from alm.training.trainer import RunOptions, Trainer, take_batches
  from alm.training.students import build_model  # pylint: disable=import-outside-toplevel
  tt, st = teacher_tokenizer(), student_tokenizer()
  if kind is not None and kind.name == "bytes":
    from alm.bytes.model import byte_tokenizer_for  # pylint: disable=import-outside-toplevel
    st = byte_tokenizer_for(tt)
  lens = dict(teacher_len=cfg.shapes.teacher_len, student_len=cfg.shapes.student_len)
  model = (build_transfer_model(teacher_model(0), tt, st, cfg) if kind is None else
           build_model(kind, teacher_model(0), tt, st, cfg))
  pipe = Pipeline(str(corpus), tt, st, PipelineConfig(batch_size=cfg.shapes.batch_size,
                                                      seed=cfg.seed, **lens))
  heldout = take_batches(Pipeline(str(corpus), tt, st, PipelineConfig(
      batch_size=2, shuffle=False, num_epochs=1, **lens)), 1)
  run = RunOptions(out_dir=str(out), progress=False, tensorboard=False, **opts)
  return Trainer(model, tt, st, cfg, pipe, heldout, run, fingerprint_extra={"data": "tiny"})
