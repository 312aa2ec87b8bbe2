"""ZeTT-style hypernetworks: the heuristic at init, masking, batching, specials, bad input."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from alm.hypernet import fvt
from alm.hypernet.hypernet import (HypernetConfig, HypernetError, Hypernetwork, base_tables,
                                   new_vocab_pieces, predict_embeddings, transfer)
from alm.testing.models import tiny_model
from alm.testing.tokenizers import GreedyTokenizer, tiny_tokenizer
from alm.tokenization.bytes_tok import BytesTokenizer


@pytest.fixture(scope="module")
def pair():
  base_tok = tiny_tokenizer("bpe", 300)
  new_tok = GreedyTokenizer(["th", "the", " the", "ing", "an", " a", "er", "he", "in", " t",
                             "ou", "en", " s", "ch", "es", "or", "thing", "anch"], name="new")
  return base_tok, new_tok


@pytest.mark.parametrize("untied", [True, False])
@pytest.mark.parametrize("residual", ["mean", "first"])
def test_at_init_it_is_the_heuristic_exactly(pair, untied, residual):
  base_tok, new_tok = pair
  model = tiny_model("llama", base_tok.vocab_size, seed=0, tie_embeddings=not untied)
  hn = Hypernetwork.for_model(model, base_tok, HypernetConfig(num_heads=4, residual=residual,
                                                              max_pieces=3), rngs=nnx.Rngs(0))
  got_in, got_out = predict_embeddings(hn, model, base_tok, new_tok, batch_size=7)
  emb_in, emb_out = base_tables(model)
  want_in, want_out = fvt.fvt_embeddings(emb_in, emb_out, base_tok, new_tok)
  d = fvt.decompose(base_tok, new_tok)
  if residual == "first":  # regular tokens: the first piece's embedding; specials: FVT's
    first = d.flat[d.offsets[:-1].clip(max=len(d.flat) - 1)]
    regular = np.array([i not in new_tok.special_ids for i in range(new_tok.vocab_size)])
    want_in = np.where(regular[:, None], emb_in[first], want_in)
    if emb_out is not None:
      want_out = np.where(regular[:, None], emb_out[first], want_out)
  np.testing.assert_array_equal(got_in, want_in)
  assert (got_out is None) == (emb_out is None)
  if emb_out is not None:
    np.testing.assert_array_equal(got_out, want_out)


def _trained_like(hn):
  """The hypernetwork with a random (non-zero) output projection, as after training."""
  k = hn.out_proj.kernel
  k.set_value(0.05 * jax.random.normal(jax.random.key(3), k.shape, k.dtype))
  return hn


def test_predictions_ignore_padding_and_batching_and_keep_specials(pair):
  base_tok, new_tok = pair
  model = tiny_model("llama", base_tok.vocab_size, seed=0, tie_embeddings=False)
  hn = _trained_like(Hypernetwork.for_model(model, base_tok, HypernetConfig(num_heads=4,
                                                                            max_pieces=4),
                                            rngs=nnx.Rngs(0)))
  a_in, a_out = predict_embeddings(hn, model, base_tok, new_tok, batch_size=5)
  b_in, b_out = predict_embeddings(hn, model, base_tok, new_tok, batch_size=1000)
  np.testing.assert_allclose(a_in, b_in, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(a_out, b_out, rtol=1e-5, atol=1e-6)
  # The prediction moved the regular tokens, never the specials (FVT's, by role).
  emb_in, emb_out = base_tables(model)
  fvt_in, _ = fvt.fvt_embeddings(emb_in, emb_out, base_tok, new_tok)
  special = sorted(new_tok.special_ids)
  np.testing.assert_array_equal(a_in[special], fvt_in[special])
  regular = [i for i in range(new_tok.vocab_size) if i not in new_tok.special_ids]
  assert np.abs(a_in[regular] - fvt_in[regular]).max() > 1e-3
  # Padding pieces are masked out: garbage in the pad slots changes nothing.
  p = new_vocab_pieces(base_tok, new_tok, emb_in, emb_out, 4)
  table = jnp.concatenate([jnp.asarray(emb_in), jnp.asarray(emb_out)], 1)
  rows = np.flatnonzero(p.predicted & (p.mask.sum(1) < 4))[:6]
  assert rows.size
  pieces = table[p.ids[rows]] * p.mask[rows][..., None]
  noisy = jnp.where(p.mask[rows][..., None], pieces, 7.0)
  heur = jnp.concatenate([p.fvt_in[rows], p.fvt_out[rows]], 1)
  np.testing.assert_allclose(np.asarray(hn(noisy, jnp.asarray(p.mask[rows]), heur)),
                             np.asarray(hn(pieces, jnp.asarray(p.mask[rows]), heur)),
                             rtol=1e-5, atol=1e-6)
  # predict_embeddings reads each piece-count bucket with only that many slots: the same
  # as every token read with all M slots.
  rows = np.flatnonzero(p.predicted)
  assert len(set(p.mask[rows].sum(1).tolist())) >= 3  # several buckets in use
  full = np.asarray(hn(table[p.ids[rows]] * p.mask[rows][..., None], jnp.asarray(p.mask[rows]),
                       jnp.concatenate([p.fvt_in[rows], p.fvt_out[rows]], 1)))
  d = emb_in.shape[1]
  np.testing.assert_allclose(a_in[rows], full[:, :d], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(a_out[rows], full[:, d:], rtol=1e-5, atol=1e-6)


def test_transfer_gives_a_model_of_the_new_tokenizer(pair):
  base_tok, new_tok = pair
  model = tiny_model("llama", base_tok.vocab_size, seed=0)
  hn = Hypernetwork.for_model(model, base_tok, HypernetConfig(num_heads=4), rngs=nnx.Rngs(0))
  student = transfer(model, base_tok, new_tok, hn)
  fvt_student = fvt.fvt_transformer(model, base_tok, new_tok)
  ids = jnp.asarray(new_tok.encode("the thing and the other thing").ids[None].astype(np.int32))
  assert student.cfg.vocab_size == new_tok.vocab_size
  # At init the hypernetwork is FVT: the same logits as the FVT student.
  np.testing.assert_array_equal(np.asarray(student(ids).logits),
                                np.asarray(fvt_student(ids).logits))
  assert student.layers is model.layers  # the body is shared, not copied


def test_bad_input_is_named(pair):
  base_tok, new_tok = pair
  model = tiny_model("llama", base_tok.vocab_size, seed=0)
  hn = Hypernetwork.for_model(model, base_tok, HypernetConfig(num_heads=4), name="tiny-llama",
                              rngs=nnx.Rngs(0))
  other = tiny_model("llama", base_tok.vocab_size, seed=1)  # same shapes, other weights
  with pytest.raises(HypernetError, match="trained for base model tiny-llama"):
    predict_embeddings(hn, other, base_tok, new_tok)
  untied = tiny_model("llama", base_tok.vocab_size, seed=0, tie_embeddings=False)
  with pytest.raises(HypernetError, match="tied embeddings of width"):
    predict_embeddings(hn, untied, base_tok, new_tok)
  with pytest.raises(HypernetError, match="must divide"):
    Hypernetwork(10, tied=True, cfg=HypernetConfig(num_heads=4), rngs=nnx.Rngs(0))


def test_a_token_the_base_tokenizer_cannot_spell_is_named():
  # SmolLM2's vocabulary lacks 21 byte values (e.g. 0xF5-0xFF): a byte tokenizer's
  # tokens for them have no pieces.
  from alm.tokenization.loading import load_tokenizer  # pylint: disable=import-outside-toplevel
  smol = load_tokenizer("smollm2-135m-instruct")
  model = tiny_model("llama", smol.vocab_size, seed=0)
  hn = Hypernetwork.for_model(model, smol, HypernetConfig(num_heads=4), rngs=nnx.Rngs(0))
  with pytest.raises(HypernetError, match=r"regular token\(s\) of .* cannot be spelled with "
                     r"the base tokenizer's tokens"):
    predict_embeddings(hn, model, smol, BytesTokenizer())


def test_copy_shared_keeps_the_base_rows_of_shared_tokens(pair):
  base_tok, new_tok = pair
  model = tiny_model("llama", base_tok.vocab_size, seed=0, tie_embeddings=False)
  cfg = HypernetConfig(num_heads=4, max_pieces=4, copy_shared=True)
  hn = _trained_like(Hypernetwork.for_model(model, base_tok, cfg, rngs=nnx.Rngs(0)))
  got_in, got_out = predict_embeddings(hn, model, base_tok, new_tok, batch_size=5)
  emb_in, emb_out = base_tables(model)
  p = new_vocab_pieces(base_tok, new_tok, emb_in, emb_out, 4, copy_shared=True)
  assert p.shared.any() and (p.predicted & ~p.shared).any()
  assert not (p.predicted & p.shared).any()
  # Shared tokens are the base's own rows, bit for bit; only the new tokens move.
  tb, base_id = new_tok.token_bytes, {b: i for i, b in enumerate(base_tok.token_bytes)}
  shared = np.flatnonzero(p.shared)
  np.testing.assert_array_equal(got_in[shared], emb_in[[base_id[tb[i]] for i in shared]])
  np.testing.assert_array_equal(got_out[shared], emb_out[[base_id[tb[i]] for i in shared]])
  new = np.flatnonzero(p.predicted)
  assert np.abs(got_in[new] - p.fvt_in[new]).min(axis=1).max() > 0
  assert np.abs(got_in[new] - p.fvt_in[new]).max() > 1e-3
  # Without the option every regular token is predicted, the shared ones too.
  all_in, _ = predict_embeddings(hn.__class__.for_model(model, base_tok, HypernetConfig(
      num_heads=4, max_pieces=4), rngs=nnx.Rngs(0)), model, base_tok, new_tok)
  np.testing.assert_array_equal(all_in[shared], got_in[shared])  # (zero projection: FVT)
  default = new_vocab_pieces(base_tok, new_tok, emb_in, emb_out, 4)
  np.testing.assert_array_equal(default.predicted, p.predicted | p.shared)
