"""Large-to-small distillation: a separate student of another family and width.

The tiny teacher (llama, width 32, a subword vocabulary) teaches a tiny
student (qwen2: qkv biases, untied head; width 24, the byte vocabulary). Every method and the
hidden-state term with GradMag train on this pair; the teacher never changes;
full fine-tuning trains every student parameter, LoRA only the adapters;
resume is bit-identical; the exported student reproduces the trained one.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

import alm
from alm.data.pipeline import Pipeline, PipelineConfig
from alm.testing.models import tiny_model
from alm.training.config import TrainConfig
from alm.training.optim import make_optimizer
from alm.training.step import Stepper, make_consts
from alm.training.students import build_distill_model, export_student
from alm.training.trainer import RunOptions, Trainer, take_batches

import training_utils as tu

T_LEN, S_LEN = 24, 48


def _cfg(**kw):
  base = dict(method="alm+sft", steps=2, batch_size=2, teacher_len=T_LEN, student_len=S_LEN,
              lora_rank=0, train_body=True, learning_rate=1e-2, warmup_steps=1)
  return TrainConfig.build(**{**base, **kw})


def _teacher():
  return tu.teacher_model(0)


def _student():
  return tiny_model("qwen2", vocab_size=tu.student_tokenizer().vocab_size, seed=1,
                    hidden_size=24, num_heads=3, num_kv_heads=1, head_dim=8,
                    intermediate_size=40)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  return tu.write_corpus(tmp_path_factory.mktemp("corpus"))


def _trainer(corpus, out, cfg, **opts):
  tt, st = tu.teacher_tokenizer(), tu.student_tokenizer()
  model = build_distill_model(_teacher(), tt, _student(), st, cfg)
  lens = dict(teacher_len=T_LEN, student_len=S_LEN)
  pipe = Pipeline(str(corpus), tt, st, PipelineConfig(batch_size=cfg.shapes.batch_size,
                                                      seed=cfg.seed, **lens))
  heldout = take_batches(Pipeline(str(corpus), tt, st, PipelineConfig(
      batch_size=2, shuffle=False, num_epochs=1, **lens)), 1)
  run = RunOptions(out_dir=str(out), progress=False, tensorboard=False, **opts)
  return Trainer(model, tt, st, cfg, pipe, heldout, run, fingerprint_extra={"data": "tiny"})


def _state(module) -> dict:
  return {"/".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(
      nnx.state(module, nnx.Param))}


@pytest.fixture(scope="module")
def batch(corpus):
  tt, st = tu.teacher_tokenizer(), tu.student_tokenizer()
  return next(Pipeline(str(corpus), tt, st, PipelineConfig(
      batch_size=2, seed=0, teacher_len=T_LEN, student_len=S_LEN)))


@pytest.mark.parametrize("kw", [dict(method="alm+sft"), dict(method="sft"), dict(method="dskd"),
                                dict(method="mined"), dict(method="uld"),
                                dict(method="alm", add_terms="hidden=1", combine="gradmag",
                                     hidden_layers="-1,2:1")],
                         ids=lambda kw: "-".join(str(v) for v in kw.values()))
def test_every_method_trains_the_separate_student_and_never_the_teacher(batch, kw):
  cfg = _cfg(**kw)
  tt, st = tu.teacher_tokenizer(), tu.student_tokenizer()
  model = build_distill_model(_teacher(), tt, _student(), st, cfg)
  teacher0, student0 = _state(model.teacher), _state(model.student)
  stepper = Stepper(model, cfg, make_consts(model, cfg, tt, st), make_optimizer(cfg))
  metrics = {k: float(v) for k, v in stepper.step(batch).items()}
  assert np.isfinite(metrics["loss"]) and metrics["skipped_nonfinite"] == 0
  model = stepper.model()
  for k, v in _state(model.teacher).items():
    np.testing.assert_array_equal(v, teacher0[k], err_msg=k)
  changed = [k for k, v in _state(model.student).items() if not np.array_equal(v, student0[k])]
  # Full fine-tuning: the body's kernels train too, not only the embeddings.
  assert any("layers" in k for k in changed) and any("embed" in k for k in changed)
  if kw["method"] == "dskd":
    assert set(model.heads) == {"dskd"}  # the projector maps width 24 <-> 32
  if "hidden" in kw.get("add_terms", ""):
    assert model.heads["hidden"].kernel.shape == (24, 32)
    assert abs(metrics["weight_alm"] + metrics["weight_hidden"] - 1.0) < 1e-5


def test_lora_trains_only_the_adapters_of_a_separate_student(corpus, tmp_path):
  tr = _trainer(corpus, tmp_path, _cfg(lora_rank=4, lora_alpha=4.0, train_body=False,
                                       train_embeddings=False))
  paths = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(tr.stepper.state.trainable)}
  assert paths and all("lora" in p and p.startswith("student/") for p in paths), paths


def test_train_body_with_a_shared_body_is_refused():
  from alm.training.students import build_transfer_model  # pylint: disable=import-outside-toplevel
  with pytest.raises(ValueError, match="train_body is not possible with a shared-body"):
    build_transfer_model(tu.teacher_model(), tu.teacher_tokenizer(), tu.student_tokenizer(),
                         _cfg())


def test_a_student_without_rows_for_its_tokenizer_is_refused():
  small = tiny_model("qwen2", vocab_size=64)
  with pytest.raises(ValueError, match="pass the student model's own tokenizer"):
    build_distill_model(_teacher(), tu.teacher_tokenizer(), small, tu.student_tokenizer(),
                        _cfg())


def test_separate_student_resumes_bit_identically_and_exports(corpus, tmp_path):
  cfg = _cfg(steps=2)
  full = _trainer(corpus, tmp_path / "full", cfg, checkpoint_every=1)
  full.fit()
  part = _trainer(corpus, tmp_path / "part", cfg, checkpoint_every=1, stop_after=1)
  assert part.fit() == {"stopped_at": 1}
  resumed = _trainer(corpus, tmp_path / "part", cfg, checkpoint_every=1)
  resumed.fit()
  for a, b in zip(jax.tree.leaves(full.stepper.state.trainable),
                  jax.tree.leaves(resumed.stepper.state.trainable)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # The export is the trained student, loadable as a plain model.
  model = full.model()
  ids = np.array([[1, 5, 9, 33, 70]], np.int32)
  want = np.asarray(model.student(ids).logits)
  d = export_student(model, tmp_path / "export", tu.student_tokenizer())
  loaded, _ = alm.load_model(d)
  np.testing.assert_allclose(np.asarray(loaded(ids).logits), want, rtol=1e-5, atol=1e-5)
