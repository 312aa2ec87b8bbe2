"""ALM on real model outputs (SmolLM2-135M) against the float64 reference.

Teacher: SmolLM2 on its own tokenization of a short real sentence. Student:
the same model on a byte-by-byte tokenization of the same text (every byte
is a token of SmolLM2's byte-level vocabulary), so the two sides disagree on
every chunk boundary that is not a token boundary of both, as in a real
cross-tokenizer pair, and the logits are real model outputs.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import alm
import losses_reference as ref
from alm.losses import alm as alm_lib

TEXT = ("The capital of France is Paris. It lies on the Seine, and about two "
        "million people live in the city itself.")


@pytest.fixture(scope="module")
def real_batch():
  model, tok = alm.load_model("smollm2-135m-instruct")
  t_enc = tok.encode(TEXT, add_special_tokens=False)
  b_enc = alm.load_tokenizer("bytes").encode(TEXT, add_special_tokens=False)
  byte_id = {}
  for i, piece in enumerate(tok.token_bytes):
    if len(piece) == 1 and i not in tok.special_ids:
      byte_id.setdefault(piece[0], i)
  s_ids = np.array([byte_id[b] for b in TEXT.encode()], np.int32)
  s_enc = dataclasses.replace(b_enc, ids=s_ids)
  ct, cs = alm.align(t_enc, s_enc)
  mask = np.asarray(tok.boundary_token_mask(), bool)
  # One forward of both rows (the teacher's padded at the end, which a causal
  # model cannot see): one compile.
  n_t = len(t_enc.ids)
  rows = np.zeros((2, len(s_ids)), np.int32)
  rows[0, :n_t], rows[1] = t_enc.ids, s_ids
  out = np.asarray(jax.jit(lambda ids: model(ids).logits)(jnp.asarray(rows)),
                   np.float32)
  t_logits, s_logits = out[:1, :n_t], out[1:]
  teacher = dict(logits=t_logits, ids=t_enc.ids[None].astype(np.int32),
                 chunk_ids=ct[None].astype(np.int32), boundary_mask=mask)
  student = dict(logits=s_logits, ids=s_ids[None], chunk_ids=cs[None],
                 boundary_mask=mask)
  return teacher, student


@pytest.mark.slow
def test_alm_on_real_logits_matches_float64_reference(real_batch):
  teacher, student = real_batch
  assert 20 <= teacher["ids"].shape[1] <= 40 < student["ids"].shape[1]
  configs = (alm_lib.ALMConfig(),  # kl, tau 100, debiased, unconstrained
             alm_lib.ALMConfig(divergence="tv", tau=10.0,
                               constraint="boundary_prob", gamma=0.3,
                               block_rows=16))
  kws = (dict(tau=100.0), dict(divergence_kind="tv", tau=10.0,
                               constraint="boundary_prob", gamma=0.3))
  t = alm_lib.Side(**{k: jnp.asarray(v) for k, v in teacher.items()})

  @jax.jit
  def run(x):
    outs = []
    for config in configs:
      def f(x):
        s = alm_lib.Side(x, jnp.asarray(student["ids"]),
                         jnp.asarray(student["chunk_ids"]),
                         boundary_mask=jnp.asarray(student["boundary_mask"]))
        out = alm_lib.alm_loss(t, s, config)
        return out.mean(), out
      outs.append(jax.value_and_grad(f, has_aux=True)(x))
    return outs

  results = run(jnp.asarray(student["logits"]))
  for config, kw, ((loss, out), grad) in zip(configs, kws, results):
    r_loss, _, r_count, r_grad = ref.alm(teacher, student, **kw)
    assert int(out.count) == r_count > 10, config
    assert r_loss > 0
    np.testing.assert_allclose(loss, r_loss, rtol=1e-4, err_msg=str(config))
    scale = np.abs(r_grad).max()
    np.testing.assert_allclose(grad, r_grad, rtol=1e-3, atol=1e-4 * scale,
                               err_msg=str(config))
