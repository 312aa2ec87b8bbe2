"""The scoring core: every position vs chosen positions, against a float64 reference."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

from alm.eval import scoring
from alm.eval.ensemble import Ensemble
from alm.testing.models import tiny_model
from alm.testing.tokenizers import tiny_tokenizer


def _log_softmax64(x):
  x = np.asarray(x, np.float64)
  m = x.max(-1, keepdims=True)
  return x - (np.log(np.exp(x - m).sum(-1, keepdims=True)) + m)


class _FullLogitsOnly(nnx.Module):
  """A model with `__call__` only: scoring falls back to gathering the full logits."""

  def __init__(self, model):
    self.model = model

  def __call__(self, ids, *, attention_mask=None):
    return self.model(ids, attention_mask=attention_mask)


@pytest.fixture(scope="module")
def batch():
  rng = np.random.default_rng(0)
  ids = rng.integers(0, 90, size=(3, 20)).astype(np.int32)
  mask = np.ones_like(ids, bool)
  mask[1, 14:] = False  # right padding
  at = np.array([[1, 5, 19], [13, 13, 13], [2, 3, 4]], np.int32)
  return ids, mask, at


@pytest.mark.parametrize("family", ["llama", "gemma3"])  # gemma3: tied, soft-capped logits
def test_score_positions_equals_a_float64_reference(batch, family):
  ids, mask, at = batch
  model = tiny_model(family, 90, seed=1)
  full = np.asarray(model(ids, attention_mask=mask).logits)
  ref = _log_softmax64(full)
  sc = scoring.score_positions(model, ids, mask, at, greedy=True)
  lp, gr = np.asarray(sc.logprobs), np.asarray(sc.greedy)
  assert lp.shape == gr.shape == at.shape
  for b in range(3):
    for k, t in enumerate(at[b]):
      assert lp[b, k] == pytest.approx(ref[b, t - 1, ids[b, t]], rel=1e-5, abs=1e-5)
      assert gr[b, k] == (np.argmax(full[b, t - 1]) == ids[b, t])
  # The same numbers as scoring every position, and as a model without logits_at.
  every = scoring.score_tokens(model, ids, mask, greedy=True)
  np.testing.assert_allclose(lp, np.take_along_axis(np.asarray(every.logprobs), at, 1),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(gr, np.take_along_axis(np.asarray(every.greedy), at, 1))
  plain = scoring.score_positions(_FullLogitsOnly(model), ids, mask, at)
  np.testing.assert_allclose(np.asarray(plain.logprobs), lp, rtol=1e-5, atol=1e-6)


def test_ensemble_scores_positions_like_every_position(batch):
  ids, mask, at = batch
  tok = tiny_tokenizer("bpe", 300)
  members = [tiny_model("llama", tok.vocab_size, seed=s) for s in (1, 2)]
  for mode in ("prob", "logit"):
    ens = Ensemble(members, tok, mode=mode)
    got = scoring.score_positions(ens, ids % tok.vocab_size, mask, at, greedy=True)
    every = scoring.score_tokens(ens, ids % tok.vocab_size, mask, greedy=True)
    np.testing.assert_allclose(np.asarray(got.logprobs),
                               np.take_along_axis(np.asarray(every.logprobs), at, 1),
                               rtol=1e-5, atol=1e-6)


def test_output_layer_runs_on_the_scored_positions_only():
  # A big vocabulary makes the output layer most of the forward: scoring 4 of
  # 64 positions must cost a fraction of scoring all of them (XLA's count).
  model = tiny_model("llama", 4096, seed=0)
  graphdef, state = nnx.split(model)
  ids = jax.ShapeDtypeStruct((2, 64), np.int32)
  mask = jax.ShapeDtypeStruct((2, 64), np.bool_)
  at = jax.ShapeDtypeStruct((2, 4), np.int32)

  def flops(fn, *args):
    cost = jax.jit(fn).lower(state, *args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return cost["flops"]

  every = flops(lambda s, i, m: scoring.logit_scores(
      nnx.merge(graphdef, s)(i, attention_mask=m).logits, i).logprobs, ids, mask)
  some = flops(lambda s, i, m, a: scoring.logits_at(nnx.merge(graphdef, s), i, m, a), ids, mask,
               at)
  assert some < 0.25 * every, (some, every)


def test_bad_positions_are_named(batch):
  ids, mask, _ = batch
  model = tiny_model("llama", 90, seed=1)
  with pytest.raises(ValueError, match=r"Positions must be in 1\.\.19"):
    scoring.score_positions(model, ids, mask, np.zeros((3, 1), np.int32))
  with pytest.raises(ValueError, match="at must be"):
    scoring.score_positions(model, ids, mask, np.ones((2, 1), np.int32))


@pytest.mark.parametrize("what", ["model", "ensemble"])
def test_blocks_of_positions_give_the_same_scores(batch, what, monkeypatch):
  # Rolling windows score every position; the output layer then runs on blocks
  # of positions under LOGIT_BLOCK_BYTES. Shrinking the bound to a few positions
  # per block (with a ragged last block) must not change a score or a flag.
  ids, mask, _ = batch
  tok = tiny_tokenizer("bpe", 300)
  ids = ids % tok.vocab_size
  members = [tiny_model("llama", tok.vocab_size, seed=s) for s in (1, 2)]
  model = members[0] if what == "model" else Ensemble(members, tok, mode="logit")
  at = np.tile(np.arange(1, 20, dtype=np.int32), (3, 1))  # K = 19: every position
  whole = scoring.score_positions(model, ids, mask, at, greedy=True)
  monkeypatch.setattr(scoring, "LOGIT_BLOCK_BYTES", 3 * tok.vocab_size * 4 * 4)  # 4 per block
  assert scoring._block_positions(3, 19, tok.vocab_size) == 4
  jax.clear_caches()  # a fresh trace, under the new bound
  blocked = scoring.score_positions(model, ids, mask, at, greedy=True)
  np.testing.assert_allclose(np.asarray(blocked.logprobs), np.asarray(whole.logprobs),
                             rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(blocked.greedy), np.asarray(whole.greedy))
