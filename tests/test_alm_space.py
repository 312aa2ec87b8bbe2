"""The loss's "space" constraint (the byte recipe's `alm_space` term) against `alm.align`'s.

Two implementations of one rule: `alm.align(..., constraint="space")` merges
chunks on the host; `ALMConfig(constraint="space")` merges unconstrained
chunks on the device from the next tokens' boundary masks. Where both sides'
boundary bytes are the shared set, the losses must be equal.
"""

from __future__ import annotations

import numpy as np
import pytest

import jax.numpy as jnp

from alm.losses import alm as alm_loss_lib
from alm.tokenization.alignment import align
from alm.tokenization.bytes_tok import BytesTokenizer
from alm.tokenization.vocab import shared_boundary_bytes
from alm.testing.tokenizers import GreedyTokenizer
from alm.training import terms as terms_lib
from alm.training.config import TrainConfig

TEXTS = ["the thing there: thinking and thanking in the thaw.",
         "  two  spaces\tand a tab\nnewline then the end",
         "Numbers 12345, symbols #$%, and café 東京 too."]


def _pair(bos=True):
  teacher = GreedyTokenizer(["th", "the", " the", "ing", "an", " a", "er", "he", "in", " t",
                             "ou", "en", " s", "ch", "es", "or", " thing", "  "], name="t",
                            add_bos=bos)
  return teacher, BytesTokenizer(add_bos=bos)


def _side(tok, enc, chunk_ids, logits, mask):
  n = len(enc.ids)
  return alm_loss_lib.Side(logits=jnp.asarray(logits), ids=jnp.asarray(enc.ids)[None],
                           chunk_ids=jnp.asarray(chunk_ids)[None],
                           loss_mask=jnp.asarray(~enc.special)[None],
                           boundary_mask=jnp.asarray(mask), segment_ids=None,
                           text_continues=jnp.zeros((1, n), bool))


@pytest.mark.parametrize("bos", [True, False])  # without: token 0 is text, unpredicted
@pytest.mark.parametrize("debias", [True, False])
@pytest.mark.parametrize("text", TEXTS)
def test_loss_space_equals_host_space(text, debias, bos):
  tt, st = _pair(bos)
  shared = shared_boundary_bytes(tt, st)
  assert set(tt.boundary_bytes) == set(st.boundary_bytes) == set(shared)  # the premise
  te, se = tt.encode(text), st.encode(text)
  rng = np.random.default_rng(len(text))
  lt = rng.normal(size=(1, len(te.ids), tt.vocab_size)).astype(np.float32) * 3
  ls = rng.normal(size=(1, len(se.ids), st.vocab_size)).astype(np.float32) * 3
  mt, ms = tt.boundary_token_mask(shared), st.boundary_token_mask(shared)
  host_t, host_s = align(te, se, constraint="space", teacher_tokenizer=tt, student_tokenizer=st)
  un_t, un_s = align(te, se)
  assert len(set(host_t[host_t >= 0])) < len(set(un_t[un_t >= 0]))  # space merged some
  host = alm_loss_lib.alm_loss(_side(tt, te, host_t, lt, mt), _side(st, se, host_s, ls, ms),
                               alm_loss_lib.ALMConfig(debias=debias, tau=1.0))
  dev = alm_loss_lib.alm_loss(_side(tt, te, un_t, lt, mt), _side(st, se, un_s, ls, ms),
                              alm_loss_lib.ALMConfig(constraint="space", debias=debias, tau=1.0))
  assert float(host.count) == float(dev.count) > 0
  np.testing.assert_allclose(float(dev.total), float(host.total), rtol=1e-5)


def test_space_needs_both_boundary_masks():
  tt, st = _pair()
  te, se = tt.encode(TEXTS[0]), st.encode(TEXTS[0])
  ct, cs = align(te, se)
  lt = np.zeros((1, len(te.ids), tt.vocab_size), np.float32)
  ls = np.zeros((1, len(se.ids), st.vocab_size), np.float32)
  side_t = _side(tt, te, ct, lt, tt.boundary_token_mask())
  side_s = alm_loss_lib.Side(logits=jnp.asarray(ls), ids=jnp.asarray(se.ids)[None],
                             chunk_ids=jnp.asarray(cs)[None])
  with pytest.raises(ValueError, match="constraint='space' needs both boundary masks"):
    alm_loss_lib.alm_loss(side_t, side_s, alm_loss_lib.ALMConfig(constraint="space",
                                                                 debias=False))


def test_alm_space_term_joins_any_method():
  cfg = TrainConfig.build(method="alm", add_terms="alm_space=1,hidden=1", combine="gradmag")
  names = [t.name for t, _ in terms_lib.objective_terms(cfg.objective)]
  assert names == ["alm", "alm_space", "hidden"]
  # It reads whatever chunks the main term asked for (one pipeline alignment).
  cfg = TrainConfig.build(method="alm", add_terms="alm_space=1", constraint="space")
  assert terms_lib.data_constraint(terms_lib.objective_terms(cfg.objective)) == "space"
