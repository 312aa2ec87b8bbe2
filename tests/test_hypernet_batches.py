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


def test_the_piece_bucket_layout(setup):
  from alm.hypernet.batches import bucket_capacities, piece_counts  # pylint: disable=import-outside-toplevel
  base, sampled, pieces = setup
  docs = [{"text": t} for t in tu.TEXTS]
  caps = bucket_capacities(pieces, 300, min_rows=8)
  assert len(caps) == 3 and sum(caps) == 300 and min(caps) >= 8  # buckets of 1, 2, 4 slots
  cfg = HypernetBatchConfig(batch_size=3, teacher_len=24, student_len=32, vocab_rows=300)
  flat = hypernet_batch(docs, base, sampled, pieces, cfg, np.random.default_rng(0))
  b = hypernet_batch(docs, base, sampled, pieces, HypernetBatchConfig(
      batch_size=3, teacher_len=24, student_len=32, vocab_rows=300, bucket_rows=caps),
      np.random.default_rng(0))
  # The same text rows; local ids still map to the sampled ids.
  for k in flat:
    if not k.startswith("student_vocab") and k != "student_ids":
      np.testing.assert_array_equal(b[k], flat[k], err_msg=k)
  vocab_ids, valid = b["student_vocab_ids"], b["student_vocab_valid"]
  np.testing.assert_array_equal(vocab_ids[b["student_ids"]],
                                flat["student_vocab_ids"][flat["student_ids"]])
  assert valid[b["student_ids"]].all()
  real = vocab_ids[valid]
  assert len(set(real.tolist())) == len(real)  # each token once
  # Every row sits in a bucket with enough slots, its pieces those of all M slots.
  assert "student_vocab_pieces" not in b
  need = piece_counts(pieces)
  lo = 0
  for m, cap in zip((1, 2, 4), caps):
    ids, msk = b[f"student_vocab_pieces_{m}"], b[f"student_vocab_mask_{m}"]
    assert ids.shape == msk.shape == (cap, m)
    rows = vocab_ids[lo:lo + cap]
    ok = valid[lo:lo + cap]
    assert (need[rows[ok]] <= m).all()
    np.testing.assert_array_equal(ids[ok] * msk[ok], pieces.ids[rows[ok], :m] * msk[ok])
    np.testing.assert_array_equal(msk[ok & pieces.predicted[rows]],
                                  pieces.mask[rows[ok & pieces.predicted[rows]], :m])
    lo += cap
  # The shapes are fixed by the capacities whatever the batch (one compilation).
  other = hypernet_batch(docs[3:] + docs[:3], base, sampled, pieces, HypernetBatchConfig(
      batch_size=3, teacher_len=24, student_len=32, vocab_rows=300, bucket_rows=caps),
      np.random.default_rng(1))
  assert {k: v.shape for k, v in other.items()} == {k: v.shape for k, v in b.items()}
  with pytest.raises(ValueError, match="sum to vocab_rows"):
    HypernetBatchConfig(vocab_rows=300, bucket_rows=(100, 100))


@pytest.mark.parametrize("bucketed", [False, True])
def test_copy_shared_rows_are_not_predicted_but_still_negatives(setup, bucketed):
  from alm.hypernet.batches import bucket_capacities  # pylint: disable=import-outside-toplevel
  base, sampled, _ = setup
  emb = np.random.default_rng(0).standard_normal((base.vocab_size, 8)).astype(np.float32)
  pieces = new_vocab_pieces(base, sampled, emb, emb * 2, 4, copy_shared=True)
  docs = [{"text": t} for t in tu.TEXTS]
  k = sampled.vocab_size  # room for every token
  caps = bucket_capacities(pieces, k, min_rows=8) if bucketed else ()
  b = hypernet_batch(docs, base, sampled, pieces, HypernetBatchConfig(
      batch_size=3, teacher_len=24, student_len=32, vocab_rows=k, bucket_rows=caps),
      np.random.default_rng(0))
  ids, valid = b["student_vocab_ids"], b["student_vocab_valid"]
  regular = pieces.predicted | pieces.shared
  # Every regular token is a row (shared ones too, as negatives); only new ones predicted.
  assert set(np.flatnonzero(regular).tolist()) <= set(ids[valid].tolist())
  np.testing.assert_array_equal(b["student_vocab_predict"], pieces.predicted[ids] & valid)
  assert b["student_vocab_shared"][valid].any() and not (
      b["student_vocab_predict"] & b["student_vocab_shared"]).any()
