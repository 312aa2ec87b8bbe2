"""Hypernetwork training batches: the pipeline's rows, a local vocabulary, negatives."""

from __future__ import annotations

import numpy as np
import pytest

from alm.data.pipeline import Pipeline, PipelineConfig
from alm.hypernet.batches import HypernetBatchConfig, hypernet_batch
from alm.hypernet.hypernet import HypernetError, new_vocab_pieces
from alm.testing.tokenizers import GreedyTokenizer, tiny_tokenizer
from tests import training_utils as tu


@pytest.fixture(scope="module")
def setup():
  base = tiny_tokenizer("bpe", 300)
  sampled = GreedyTokenizer(["th", "the", " the", "ing", "an", " a", "er", "in", " t", "ou",
                             " s", "es", "or", "chunk"], name="sampled")
  emb = np.random.default_rng(0).standard_normal((base.vocab_size, 8)).astype(np.float32)
  return base, sampled, new_vocab_pieces(base, sampled, emb, emb * 2, 4)


def test_batch_rows_are_the_pipelines_with_local_ids(setup, tmp_path):
  base, sampled, pieces = setup
  docs = [{"text": t} for t in tu.TEXTS]
  cfg = HypernetBatchConfig(batch_size=3, teacher_len=24, student_len=32, vocab_rows=300)
  b = hypernet_batch(docs, base, sampled, pieces, cfg, np.random.default_rng(0))
  # The same rows as the data pipeline's (documents in order, one row each).
  pipe = Pipeline(str(tu.write_corpus(tmp_path)), base, sampled, PipelineConfig(
      batch_size=3, teacher_len=24, student_len=32, shuffle=False, num_epochs=1))
  ref = next(pipe)
  for k in ref:
    if k != "student_ids":
      np.testing.assert_array_equal(b[k], ref[k], err_msg=k)
  # Local ids map back to the sampled tokenizer's ids through the vocabulary rows.
  np.testing.assert_array_equal(b["student_vocab_ids"][b["student_ids"]], ref["student_ids"])
  k = cfg.vocab_rows
  assert b["student_vocab_ids"].shape == (k,) and b["student_vocab_pieces"].shape == (k, 4)
  used = np.unique(ref["student_ids"])
  vocab = b["student_vocab_ids"][b["student_vocab_valid"]]
  assert len(set(vocab.tolist())) == len(vocab)  # each token once
  assert set(used.tolist()) <= set(vocab.tolist())
  negatives = vocab[len(used):]
  assert len(negatives) and not (set(negatives.tolist()) & set(sampled.special_ids))
  np.testing.assert_array_equal(b["student_vocab_fvt_out"], pieces.fvt_out[b["student_vocab_ids"]])
  assert not b["student_vocab_predict"][~b["student_vocab_valid"]].any()


def test_too_small_a_local_vocabulary_is_named(setup):
  base, sampled, pieces = setup
  docs = [{"text": t} for t in tu.TEXTS]
  with pytest.raises(HypernetError, match="more than vocab_rows=4; raise vocab_rows"):
    hypernet_batch(docs, base, sampled, pieces, HypernetBatchConfig(
        batch_size=2, teacher_len=24, student_len=32, vocab_rows=4), np.random.default_rng(0))
  with pytest.raises(HypernetError, match="Only 2 of 2 documents are usable"):
    hypernet_batch(docs[:2], base, sampled, pieces, HypernetBatchConfig(batch_size=3),
                   np.random.default_rng(0))
