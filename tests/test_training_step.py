"""The train step: what trains, exact losses, gradient accumulation, schedule, optimizer."""

from __future__ import annotations

import numpy as np
import optax
import pytest
import jax
import jax.numpy as jnp
from flax import nnx

from alm.data.pipeline import Pipeline, PipelineConfig
from alm.losses import alm as alm_lib
from alm.losses.ntp import next_token_loss
from alm.training import step as step_lib
from alm.training.config import TrainConfig, TrainConfigError
from alm.training.students import build_transfer_model, trainable_filter
from alm.training.terms import BuildContext
from alm.training.optim import learning_rate_schedule, make_optimizer

import training_utils as tu

T_LEN, S_LEN = 24, 48


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  p = tu.write_corpus(tmp_path_factory.mktemp("corpus"))
  tt, st = tu.teacher_tokenizer(), tu.student_tokenizer()
  pipe = Pipeline(str(p), tt, st, PipelineConfig(batch_size=4, teacher_len=T_LEN,
                                                 student_len=S_LEN, seed=0))
  return tt, st, [next(pipe) for _ in range(2)]


def _consts(tt, st):
  return {"alm": {"teacher_boundary": tt.boundary_token_mask(),
                  "student_boundary": st.boundary_token_mask()}}


def _cfg(**kw):
  base = dict(steps=4, batch_size=4, teacher_len=T_LEN, student_len=S_LEN, lora_rank=2,
              lora_alpha=4.0, learning_rate=1e-2, warmup_steps=1, grad_clip=0.0)
  return TrainConfig.build(**{**base, **kw})


def _stepper(cfg, tt, st, seed=0):
  model = build_transfer_model(tu.teacher_model(seed), tt, st, cfg)
  return step_lib.Stepper(model, cfg, _consts(tt, st), make_optimizer(cfg))


def test_config_rejects_typos_naming_valid_values():
  with pytest.raises(TrainConfigError, match="alm, alm\\+sft, dskd, mined, sft, uld"):
    TrainConfig.build(method="alms")
  with pytest.raises(TrainConfigError, match="kl, tv, reverse_kl"):
    TrainConfig.build(divergence="KL")
  with pytest.raises(TrainConfigError, match="multiple of grad_accum"):
    TrainConfig.build(batch_size=3, grad_accum=2)
  with pytest.raises(TrainConfigError, match="Nothing to train"):
    TrainConfig.build(train_embeddings=False, lora_rank=0)
  cfg = TrainConfig.build(method="alm+sft", steps=7)
  assert TrainConfig.from_dict(cfg.to_dict()) == cfg


def test_schedule_is_linear_warmup_then_linear_decay():
  cfg = TrainConfig.build(steps=10, warmup_steps=4, learning_rate=1.0, decay_to=0.0)
  lr = np.array([float(learning_rate_schedule(cfg)(s)) for s in range(10)])
  np.testing.assert_allclose(lr[:4], [0.25, 0.5, 0.75, 1.0], rtol=1e-6)
  np.testing.assert_allclose(lr[4:], 1.0 - np.arange(6) / 6, rtol=1e-6, atol=1e-7)


def test_optimizer_is_adam_without_weight_decay():
  cfg = TrainConfig.build(steps=3, warmup_steps=0, learning_rate=0.1, grad_clip=0.0, decay_to=1.0)
  tx = make_optimizer(cfg)
  p = jnp.array([1.0, -2.0, 3.0])
  s = tx.init(p)
  m = v = np.zeros(3)
  ref = np.array(p, np.float64)
  for t in range(1, 4):
    g = np.array([0.5, -1.0, 2.0]) * t
    u, s = tx.update(jnp.asarray(g, jnp.float32), s, p)
    p = optax.apply_updates(p, u)
    m = 0.9 * m + 0.1 * g
    v = 0.999 * v + 0.001 * g * g
    ref -= 0.1 * (m / (1 - 0.9**t)) / (np.sqrt(v / (1 - 0.999**t)) + 1e-8)  # no decay term
  np.testing.assert_allclose(np.asarray(p), ref, rtol=1e-5)


def test_trainable_filter_selects_new_embeddings_lora_and_projector_only(data):
  tt, st, _ = data
  cfg = _cfg(projector=True, projector_heads=4, projector_layers=1)
  model = build_transfer_model(tu.teacher_model(), tt, st, cfg)
  _, trainable, frozen = nnx.split(model, trainable_filter(model, cfg), ...)
  paths = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(trainable)}
  assert "student/transformer/embedder/embedding" in paths
  assert any(p.startswith("student/projector/") for p in paths)
  lora = [p for p in paths if p.endswith(("lora_a", "lora_b"))]
  assert len(lora) == 2 * 7 * model.teacher.transformer.cfg.num_layers
  others = paths - set(lora) - {"student/transformer/embedder/embedding"}
  assert all(p.startswith("student/projector/") for p in others), others
  frozen_paths = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(frozen)}
  assert "teacher/transformer/embedder/embedding" in frozen_paths
  assert not any("lora" in p for p in frozen_paths)
  # One body in memory: the student's blocks are the teacher's Variables.
  t_q = model.teacher.transformer.layers[0].attn.q_proj.kernel
  assert model.student.transformer.layers[0].attn.q_proj.kernel is t_q
  n_body = sum(1 for p in frozen_paths if "/layers/" in p)
  n_layer_vars = sum(1 for p, _ in nnx.iter_graph(model.teacher.transformer.layers)
                     if isinstance(_, nnx.Param) and not isinstance(_, nnx.LoRAParam))
  assert n_body == n_layer_vars  # stored once, not once per side


def test_identical_student_gets_zero_loss_and_zero_gradient(tmp_path):
  # Same tokenizer on both sides: FVT copies every embedding and LoRA's B is 0,
  # so the student *is* the teacher: ALM must be exactly 0 with a 0 gradient.
  tt = tu.teacher_tokenizer()
  p = tu.write_corpus(tmp_path)
  batch = next(Pipeline(str(p), tt, tt, PipelineConfig(batch_size=2, teacher_len=T_LEN,
                                                       student_len=T_LEN)))
  cfg = _cfg(batch_size=2, student_len=T_LEN)
  s = _stepper(cfg, tt, tt)
  before = jax.tree.map(np.asarray, s.state.trainable)
  out = s.step(batch)
  assert float(out["loss"]) == 0.0 and float(out["count_alm"]) > 0
  assert float(out["grad_norm"]) == 0.0
  after = jax.tree.map(np.asarray, s.state.trainable)
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)))


def test_step_loss_matches_the_losses_computed_directly(data):
  tt, st, batches = data
  cfg = _cfg(method="alm+sft", ntp_weight=0.5)
  s = _stepper(cfg, tt, st)
  model = s.model()
  b = {k: jnp.asarray(v) for k, v in batches[0].items()}
  seg_t, seg_s = b["teacher_segment_ids"], b["student_segment_ids"]
  t_out = model.teacher.transformer(b["teacher_ids"], attention_mask=seg_t > 0,
                                    segment_ids=seg_t, positions=b["teacher_positions"])
  s_out = model.student.transformer(b["student_ids"], attention_mask=seg_s > 0,
                                    segment_ids=seg_s, positions=b["student_positions"])
  alm = alm_lib.alm_loss(
      alm_lib.Side(t_out.logits, b["teacher_ids"], b["teacher_chunk_ids"], b["teacher_loss_mask"],
                   jnp.asarray(tt.boundary_token_mask())),
      alm_lib.Side(s_out.logits, b["student_ids"], b["student_chunk_ids"], b["student_loss_mask"],
                   jnp.asarray(st.boundary_token_mask()))).mean()
  ntp = next_token_loss(s_out.logits, b["student_ids"], b["student_loss_mask"]).mean()
  out = s.step(batches[0])
  np.testing.assert_allclose(float(out["loss_alm"]), float(alm), rtol=1e-5)
  np.testing.assert_allclose(float(out["loss_ntp"]), float(ntp), rtol=1e-5)
  np.testing.assert_allclose(float(out["loss"]), float(alm) + 0.5 * float(ntp), rtol=1e-5)


def test_gradient_accumulation_equals_one_big_batch(data):
  # alm+sft has two loss terms with their own global counts: the hard case.
  tt, st, batches = data
  results = []
  for accum in (1, 2):
    s = _stepper(_cfg(method="alm+sft", grad_accum=accum), tt, st)
    p0 = jax.tree.map(np.asarray, s.state.trainable)
    losses = [float(s.step(b)["loss"]) for b in batches]
    results.append((losses, jax.tree.map(np.asarray, s.state.trainable)))
  (l1, p1), (l2, p2) = results
  np.testing.assert_allclose(l1, l2, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6)
  # ... and training moved the parameters (the comparison is not vacuous).
  assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(p0), jax.tree.leaves(p1)))


def _pair_consts(cfg, teacher_tok, student_tok):
  """What `make_consts` computes for a tokenizer pair (the ALM term reads no model)."""
  ctx = BuildContext(teacher_tok=teacher_tok, student_tok=student_tok, teacher_cfg=None,
                     student_cfg=None, objective=cfg.objective)
  return step_lib.Objective(cfg).consts(ctx)


def test_debiasing_uses_one_boundary_byte_set_for_both_sides():
  from alm.testing.tokenizers import GreedyTokenizer  # pylint: disable=import-outside-toplevel
  student = tu.student_tokenizer()  # bytes: space, tab, newline, CR are boundaries
  teacher = GreedyTokenizer(["a\n", "b\r", "cd", " e"])  # newline / CR inside tokens
  assert {10, 13} <= set(student.boundary_bytes)
  assert 10 not in teacher.boundary_bytes and 13 not in teacher.boundary_bytes
  shared = teacher.boundary_bytes & student.boundary_bytes
  assert shared == {9, 32}
  c = _pair_consts(TrainConfig.build(), teacher, student)["alm"]
  for tok, key in ((teacher, "teacher_boundary"), (student, "student_boundary")):
    np.testing.assert_array_equal(c[key], tok.boundary_token_mask(shared))
  # The student's own mask would count a following newline; the shared one does not.
  own = student.boundary_token_mask()
  assert own.sum() > c["student_boundary"].sum()
  nl = student.encode("\n").ids[-1]
  assert own[nl] and not c["student_boundary"][nl]
  # No shared boundary byte: debiasing is undefined and says how to go on.
  no_ws = GreedyTokenizer(["a ", "a\t", "a\n", "a\r"])
  assert not (no_ws.boundary_bytes & student.boundary_bytes)
  with pytest.raises(ValueError, match="--nodebias"):
    _pair_consts(TrainConfig.build(), no_ws, student)
  _pair_consts(TrainConfig.build(debias=False), no_ws, student)  # nothing to share: fine
