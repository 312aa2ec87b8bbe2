"""Hypernetwork training through the engine: the student kind, per-batch vocabularies."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from alm.hypernet import fvt
from alm.hypernet.batches import HypernetBatchConfig, bucket_capacities, hypernet_batch
from alm.hypernet.hypernet import (HypernetConfig, Hypernetwork, base_tables, new_vocab_pieces,
                                   num_params, predict_embeddings)
from alm.hypernet.sampler import SamplerConfig, sample_tokenizer
from alm.hypernet.student import HypernetKind, load_hypernet, save_hypernet
from alm.testing.models import tiny_model
from alm.testing.tokenizers import tiny_tokenizer
from alm.training.config import TrainConfig, TrainConfigError
from alm.training.optim import make_optimizer
from alm.training.step import Stepper, make_consts, vocab_inputs
from alm.training.students import build_model
from tests import training_utils as tu


@pytest.fixture(scope="module")
def setup():
  base_tok = tiny_tokenizer("bpe", 300)
  base = tiny_model("llama", base_tok.vocab_size, seed=0, tie_embeddings=False)
  docs = [{"text": t} for t in tu.TEXTS]
  return base_tok, base, docs


def _batch(base_tok, base, docs, seed, m=4, buckets=False):
  sampled = sample_tokenizer(base_tok, [d["text"] for d in docs], seed=seed,
                             cfg=SamplerConfig(vocab_size=120, min_count=1))
  emb_in, emb_out = base_tables(base)
  pieces = new_vocab_pieces(base_tok, sampled, emb_in, emb_out, m)
  cfg = HypernetBatchConfig(batch_size=2, teacher_len=24, student_len=32, vocab_rows=160,
                            bucket_rows=bucket_capacities(pieces, 160, min_rows=8) if buckets
                            else ())
  return sampled, hypernet_batch(docs, base_tok, sampled, pieces, cfg,
                                 np.random.default_rng(seed))


def test_at_init_the_student_is_fvt_on_the_batch_vocabulary(setup):
  base_tok, base, docs = setup
  sampled, b = _batch(base_tok, base, docs, seed=0)
  hn = Hypernetwork.for_model(base, base_tok, HypernetConfig(num_heads=4, max_pieces=4),
                              rngs=nnx.Rngs(0))
  cfg = TrainConfig.build(method="alm", lora_rank=0, batch_size=2, teacher_len=24,
                          student_len=32)
  model = build_model(HypernetKind(hn), base, base_tok, base_tok, cfg)
  ours = np.asarray(model.student(jnp.asarray(b["student_ids"]),
                                  **vocab_inputs(b)).logits)
  ref = fvt.fvt_transformer(base, base_tok, sampled)
  full = np.asarray(ref(jnp.asarray(b["student_vocab_ids"][b["student_ids"]])).logits)
  valid = b["student_vocab_valid"]
  np.testing.assert_allclose(ours[..., valid], full[..., b["student_vocab_ids"][valid]],
                             rtol=1e-5, atol=1e-5)
  assert np.isneginf(ours[..., ~valid]).all()


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("buckets", [False, True])
def test_a_trained_student_is_what_transfer_gives(setup, tied, buckets):
  # What training optimises (the batch's local vocabulary) is the model `transfer` builds
  # for evaluation, restricted to those rows: with a trained (non-zero) output projection,
  # the rows read with all M piece slots or in piece buckets (only the slots they need).
  base_tok, _, docs = setup
  base = tiny_model("llama", base_tok.vocab_size, seed=0, tie_embeddings=tied)
  sampled, b = _batch(base_tok, base, docs, seed=0, buckets=buckets)
  assert ("student_vocab_pieces_1" in b) == buckets
  hn = Hypernetwork.for_model(base, base_tok, HypernetConfig(num_heads=4, max_pieces=4),
                              rngs=nnx.Rngs(0))
  k = hn.out_proj.kernel
  k.set_value(0.05 * jax.random.normal(jax.random.key(3), k.shape, k.dtype))
  cfg = TrainConfig.build(method="alm", lora_rank=0, batch_size=2, teacher_len=24,
                          student_len=32)
  model = build_model(HypernetKind(hn), base, base_tok, base_tok, cfg)
  ours = np.asarray(model.student(jnp.asarray(b["student_ids"]), **vocab_inputs(b)).logits)
  from alm.hypernet.hypernet import transfer  # pylint: disable=import-outside-toplevel
  ref = transfer(base, base_tok, sampled, hn)
  full = np.asarray(ref(jnp.asarray(b["student_vocab_ids"][b["student_ids"]])).logits)
  valid = b["student_vocab_valid"]
  np.testing.assert_allclose(ours[..., valid], full[..., b["student_vocab_ids"][valid]],
                             rtol=1e-4, atol=1e-4)
  assert np.isneginf(ours[..., ~valid]).all()


def test_training_moves_only_the_hypernetwork_and_saves(setup, tmp_path):
  base_tok, base, docs = setup
  hn = Hypernetwork.for_model(base, base_tok, HypernetConfig(num_heads=4, max_pieces=4),
                              name="tiny", rngs=nnx.Rngs(0))
  cfg = TrainConfig.build(method="alm", lora_rank=0, batch_size=2, teacher_len=24,
                          student_len=32, learning_rate=3e-3, warmup_steps=0, steps=4)
  model = build_model(HypernetKind(hn), base, base_tok, base_tok, cfg)
  s = Stepper(model, cfg, make_consts(model, cfg, base_tok, base_tok), make_optimizer(cfg))
  assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(s.state.trainable)) == \
      num_params(hn)
  body = [np.asarray(x).copy() for x in jax.tree.leaves(nnx.state(base, nnx.Param))]
  # A new sampled tokenizer every step, the same shapes: one compilation.
  batches = [_batch(base_tok, base, docs, seed=k)[1] for k in range(4)]
  losses = [float(s.step(b)["loss"]) for b in batches]
  assert all(np.isfinite(losses))
  again = [float(s.step(b)["loss"]) for b in batches]
  assert np.mean(again) < np.mean(losses), (losses, again)  # it learns
  for a, b in zip(body, jax.tree.leaves(nnx.state(base, nnx.Param))):
    np.testing.assert_array_equal(a, np.asarray(b))  # the base never moves
  trained = s.model().student.hypernet
  save_hypernet(trained, tmp_path / "hn")
  back = load_hypernet(tmp_path / "hn")
  sampled, _ = _batch(base_tok, base, docs, seed=9)
  np.testing.assert_array_equal(predict_embeddings(back, base, base_tok, sampled)[0],
                                predict_embeddings(trained, base, base_tok, sampled)[0])


def test_bad_options_are_refused(setup):
  base_tok, base, _ = setup
  hn = Hypernetwork.for_model(base, base_tok, HypernetConfig(num_heads=4), rngs=nnx.Rngs(0))
  with pytest.raises(TrainConfigError, match="trains the hypernetwork only"):
    build_model(HypernetKind(hn), base, base_tok, base_tok, TrainConfig.build(lora_rank=8))
  with pytest.raises(FileNotFoundError, match="No hypernetwork at"):
    load_hypernet("/nonexistent/hn")


@pytest.mark.parametrize("tied", [True, False])
def test_the_lexical_term_against_numpy(setup, tied):
  # ZeTT's lexical loss: 0 at init (FVT copies shared tokens), and with a trained
  # projection the mean over shared rows of |pred - base|^2 / |base|^2, in float64.
  from alm.training.methods.lexical import LexicalTerm  # pylint: disable=import-outside-toplevel
  from alm.training.terms import Forward  # pylint: disable=import-outside-toplevel
  base_tok, _, docs = setup
  base = tiny_model("llama", base_tok.vocab_size, seed=0, tie_embeddings=tied)
  sampled, b = _batch(base_tok, base, docs, seed=1)
  shared = b["student_vocab_shared"]
  assert 0 < shared.sum() < b["student_vocab_valid"].sum()
  # The shared rows are base tokens of the same bytes, their FVT rows the base's rows.
  emb_in, emb_out = base_tables(base)
  vocab_ids = b["student_vocab_ids"][shared]
  base_ids = [base_tok.token_bytes.index(sampled.token_bytes[i]) for i in vocab_ids]
  np.testing.assert_array_equal(b["student_vocab_fvt_in"][shared], emb_in[base_ids])
  hn = Hypernetwork.for_model(base, base_tok, HypernetConfig(num_heads=4, max_pieces=4),
                              rngs=nnx.Rngs(0))
  cfg = TrainConfig.build(method="alm", add_terms="lexical=1", lora_rank=0, batch_size=2,
                          teacher_len=24, student_len=32)
  model = build_model(HypernetKind(hn), base, base_tok, base_tok, cfg)
  batch = {k: jnp.asarray(v) for k, v in b.items()}

  def term():
    out = model.student(batch["student_ids"], **vocab_inputs(batch))
    got = LexicalTerm()(Forward(batch=batch, teacher=None, student=out, model=model, consts={}))
    return float(got.total), float(got.count), np.asarray(out.rows, np.float64)

  total, count, _ = term()
  assert total == 0.0 and count == shared.sum()
  k = hn.out_proj.kernel
  k.set_value(0.05 * jax.random.normal(jax.random.key(3), k.shape, k.dtype))
  total, count, rows = term()
  target = np.asarray(b["student_vocab_fvt_in"], np.float64)
  if not tied:
    target = np.concatenate([target, np.asarray(b["student_vocab_fvt_out"], np.float64)], 1)
  ref = (((rows - target) ** 2).sum(1) / (target ** 2).sum(1))[shared].sum()
  assert count == shared.sum()
  np.testing.assert_allclose(total, ref, rtol=1e-5)
  assert total > 0


def test_the_lexical_term_trains_with_alm_and_is_refused_elsewhere(setup):
  base_tok, base, docs = setup
  hn = Hypernetwork.for_model(base, base_tok, HypernetConfig(num_heads=4, max_pieces=4),
                              rngs=nnx.Rngs(0))
  cfg = TrainConfig.build(method="alm", add_terms="lexical=1", lora_rank=0, batch_size=2,
                          teacher_len=24, student_len=32, learning_rate=3e-3, warmup_steps=0,
                          steps=3)
  model = build_model(HypernetKind(hn), base, base_tok, base_tok, cfg)
  s = Stepper(model, cfg, make_consts(model, cfg, base_tok, base_tok), make_optimizer(cfg))
  metrics = [s.step(_batch(base_tok, base, docs, seed=k)[1]) for k in range(3)]
  assert float(metrics[0]["loss_lexical"]) == 0.0  # at init
  assert float(metrics[2]["loss_lexical"]) > 0.0  # the prediction has moved
  assert all(np.isfinite(float(m["loss"])) for m in metrics)
  # Not a hypernetwork student: a clear error, not a crash inside JAX.
  from alm.training.methods.lexical import LexicalTerm  # pylint: disable=import-outside-toplevel
  from alm.training.terms import Forward  # pylint: disable=import-outside-toplevel
  out = base(jnp.zeros((1, 4), jnp.int32))
  with pytest.raises(TrainConfigError, match="hypernetwork training only"):
    LexicalTerm()(Forward(batch={"student_ids": jnp.zeros((1, 4), jnp.int32)}, teacher=None,
                          student=out, model=None, consts={}))

  # ... and a run with another student kind is refused when it is built, before any step.
  from alm.training.students import build_transfer_model  # pylint: disable=import-outside-toplevel
  with pytest.raises(TrainConfigError, match="hypernetwork training only"):
    build_transfer_model(base, base_tok, base_tok, cfg)
