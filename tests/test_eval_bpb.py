"""Bits per byte: `sequence_bits` against float64 numpy, `bits_per_byte` against a plain loop."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from alm.eval.bpb import BpbResult, bits_per_byte, sequence_bits
from alm.testing.models import tiny_model
from alm.testing.tokenizers import GreedyTokenizer
from alm.tokenization.bytes_tok import BytesTokenizer


def reference_bits(logits, ids, target_mask, num_bytes):
  """Float64 numpy: -Σ log2 p(ids[t] | <t) over targets t >= 1, their bytes and count."""
  x = np.asarray(logits, np.float64)
  lse = np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1)) + x.max(-1)  # [B, T]
  bits = nbytes = tokens = 0
  for b in range(ids.shape[0]):
    for t in range(1, ids.shape[1]):
      if target_mask[b, t]:
        bits -= (x[b, t - 1, ids[b, t]] - lse[b, t - 1]) / math.log(2)
        nbytes += int(num_bytes[b, t])
        tokens += 1
  return bits, nbytes, tokens


def _random_batch(seed, b=3, t=17, v=50, scale=3.0):
  rng = np.random.default_rng(seed)
  logits = (scale * rng.normal(size=(b, t, v))).astype(np.float32)
  ids = rng.integers(0, v, (b, t)).astype(np.int32)
  target = rng.random((b, t)) < 0.7
  target[:, 0] = True  # position 0 is never a target, whatever the mask says
  num_bytes = rng.integers(0, 5, (b, t)).astype(np.int32)
  return logits, ids, target, num_bytes


@pytest.mark.parametrize("seed", [0, 1])
def test_sequence_bits_matches_float64_reference(seed):
  logits, ids, target, num_bytes = _random_batch(seed)
  got = jax.jit(sequence_bits)(*map(jnp.asarray, (logits, ids, target, num_bytes)))
  assert all(g.dtype == jnp.float32 and g.shape == () for g in got)
  bits, nbytes, tokens = reference_bits(logits, ids, target, num_bytes)
  np.testing.assert_allclose(float(got[0]), bits, rtol=1e-5)
  assert (float(got[1]), float(got[2])) == (nbytes, tokens)


def test_sequence_bits_is_precise_for_near_certain_tokens():
  # Every target has p ~ 1 - 1e-9: float32 `x - logsumexp(x)` rounds each
  # log-prob to 0 (or to +-ulp(25)); the path log-probs keep them.
  logits, ids, target, num_bytes = _random_batch(2, scale=1.0)
  b, t, _ = logits.shape
  nxt = np.concatenate([ids[:, 1:], ids[:, :1]], axis=1)  # token predicted at each position
  logits[np.arange(b)[:, None], np.arange(t)[None], nxt] = 25.0
  bits, _, _ = reference_bits(logits, ids, target, num_bytes)
  assert 0 < bits < 1e-6
  got = sequence_bits(*map(jnp.asarray, (logits, ids, target, num_bytes)))
  np.testing.assert_allclose(float(got[0]), bits, rtol=1e-4)


def test_sequence_bits_bfloat16_logits_and_shapes():
  logits, ids, target, num_bytes = _random_batch(3)
  lb = jnp.asarray(logits, jnp.bfloat16)
  got = sequence_bits(lb, jnp.asarray(ids), jnp.asarray(target), jnp.asarray(num_bytes))
  want, _, _ = reference_bits(np.asarray(lb.astype(jnp.float32)), ids, target, num_bytes)
  assert got[0].dtype == jnp.float32
  np.testing.assert_allclose(float(got[0]), want, rtol=1e-5)
  with pytest.raises(ValueError, match=r"logits \[B, T, V\]"):
    sequence_bits(jnp.asarray(logits), jnp.asarray(ids[:, :-1]), jnp.asarray(target),
                  jnp.asarray(num_bytes))


@nnx.jit
def _logits(model, ids):
  return model(ids).logits


def brute_force(model, tok, texts, max_tokens, length=32):
  """One forward per text, then a Python loop over its tokens.

  Each text is followed by filler tokens up to `length` (one compilation for
  all texts) and no attention mask: the model is causal, so the logits of the
  text's positions do not see the filler.
  """
  bits = nbytes = tokens = 0
  for text in texts:
    e = tok.encode(text)
    k = min(len(e), max_tokens)
    ids = np.full((1, length), 7, np.int32)
    ids[0, :k] = e.ids[:k]
    logits = np.asarray(_logits(model, jnp.asarray(ids))[0, :k], np.float64)
    for t in range(1, k):
      if e.special[t]:
        continue
      row = logits[t - 1]
      lse = np.log(np.exp(row - row.max()).sum()) + row.max()
      bits -= (row[e.ids[t]] - lse) / math.log(2)
      nbytes += int(e.ends[t] - e.starts[t])
      tokens += 1
  return bits, nbytes, tokens


TEXTS = ["héllo wörld", "the cat sat on the mat.", "日本", "a"]


@pytest.mark.parametrize("tok, max_tokens", [
    (BytesTokenizer(), 512),  # BOS: every byte of every text is predicted
    (BytesTokenizer(), 9),  # truncation
    (GreedyTokenizer(["the", " cat", "at", "ö"], add_bos=False), 512),  # first token unpredicted
])
def test_bits_per_byte_matches_brute_force(tok, max_tokens):
  model = tiny_model("llama", tok.vocab_size, seed=4)
  got = bits_per_byte(model, tok, TEXTS, max_tokens=max_tokens, batch_size=3)  # ragged batches
  assert isinstance(got, BpbResult)
  bits, nbytes, tokens = brute_force(model, tok, TEXTS, max_tokens)
  assert (got.bytes, got.tokens) == (nbytes, tokens)
  np.testing.assert_allclose(got.bits, bits, rtol=1e-5)
  np.testing.assert_allclose(got.bpb, bits / nbytes, rtol=1e-5)
  if max_tokens == 512 and tok.bos_id is not None and isinstance(tok, BytesTokenizer):
    assert nbytes == sum(len(t.encode()) for t in TEXTS)
  one = bits_per_byte(model, tok, TEXTS[:1])
  want = brute_force(model, tok, TEXTS[:1], 512)
  np.testing.assert_allclose(one.bpb, want[0] / want[1], rtol=1e-5)


def test_bits_per_byte_needs_a_text():
  tok = BytesTokenizer()
  with pytest.raises(ValueError, match="at least one text"):
    bits_per_byte(tiny_model("llama", tok.vocab_size), tok, [])
