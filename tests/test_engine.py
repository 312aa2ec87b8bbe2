"""The distillation engine's seams: the composed config, the method registry, plug-in terms,
the hidden-state term under GradMag and exact gradient accumulation."""

from __future__ import annotations

import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest

from alm.data.pipeline import Pipeline, PipelineConfig
from alm.losses.reduce import LossSum
from alm.training import step as step_lib
from alm.training import terms as terms_lib
from alm.training.config import (PRESETS, ObjectiveConfig, TrainConfig, TrainConfigError,
                                 flat_fields)
from alm.training.methods.hidden import HiddenTerm
from alm.training.optim import make_optimizer
from alm.training.students import build_transfer_model

import training_utils as tu

T_LEN, S_LEN = 24, 48
METHODS = ("alm", "alm+sft", "dskd", "mined", "sft", "uld")


def _cfg(**kw):
  base = dict(steps=2, batch_size=4, teacher_len=T_LEN, student_len=S_LEN, lora_rank=2,
              lora_alpha=4.0, learning_rate=1e-2, warmup_steps=1, grad_clip=0.0)
  return TrainConfig.build(**{**base, **kw})


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  return tu.write_corpus(tmp_path_factory.mktemp("corpus"))


def _train_records(out):
  return [r for r in map(json.loads, open(out / "metrics.jsonl")) if r["kind"] == "train"]


# ---------------------------------------------------------------------------
# 1. The composed config.


def test_flat_build_and_dict_round_trips():
  cfg = TrainConfig.build(method="alm+sft", add_terms="hidden=0.5", combine="gradmag",
                          ntp_weight=0.25, steps=7, learning_rate=3e-4, lora_rank=4,
                          projector=True, batch_size=6, grad_accum=3, dtype="bfloat16",
                          mesh_data=2, seed=5)
  assert cfg.objective.method == "alm+sft" and cfg.optimizer.steps == 7
  assert cfg.adapters.lora_rank == 4 and cfg.shapes.grad_accum == 3
  assert cfg.mesh.mesh_data == 2 and cfg.seed == 5 and cfg.micro_batch == 2
  assert TrainConfig.build(**cfg.flat()) == cfg
  assert TrainConfig.from_dict(cfg.to_dict()) == cfg
  assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
  assert set(cfg.flat()) == set(flat_fields())
  # `replace` changes one option and keeps the rest.
  other = cfg.replace(steps=9)
  assert other.optimizer.steps == 9 and other.replace(steps=7) == cfg
  assert TrainConfig.build() == TrainConfig()


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds(name):
  cfg = TrainConfig.build(preset=name)
  flat = cfg.flat()
  for k, v in PRESETS[name].items():
    if k in flat:  # the rest (teacher_samples) are options of the binaries' jobs
      assert flat[k] == v, k
  # Flat options override the preset.
  assert TrainConfig.build(preset=name, steps=3).optimizer.steps == 3


def test_unknown_option_or_preset_names_the_known_ones():
  with pytest.raises(TrainConfigError, match=r"Unknown option\(s\) \['stepz'\]; known: .*'steps'"):
    TrainConfig.build(steps=1, stepz=2)
  with pytest.raises(TrainConfigError,
                     match="preset='dmo' is not valid; choose one of: " + ", ".join(PRESETS)):
    TrainConfig.build(preset="dmo")
  with pytest.raises(TrainConfigError, match=r"Unknown TrainConfig field\(s\) \['optimiser'\]"):
    TrainConfig.from_dict({"optimiser": {"steps": 1}})


def test_flat_option_names_are_unique_across_parts():
  names = []
  for part in dataclasses.fields(TrainConfig):
    if part.name != "seed":
      names += [f.name for f in dataclasses.fields(getattr(TrainConfig(), part.name))]
  names.append("seed")
  assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)
  fields = flat_fields()
  assert set(fields) == set(names)
  for name, (part, field, _) in fields.items():
    assert field.name == name
    if part is not None:
      assert name in {f.name for f in dataclasses.fields(getattr(TrainConfig(), part))}
  assert fields["seed"][0] is None


# ---------------------------------------------------------------------------
# 2. The method registry.


def _weighted(**objective):
  return [(t.name, w) for t, w in terms_lib.objective_terms(ObjectiveConfig(**objective))]


def test_registered_methods():
  assert set(terms_lib.methods()) == set(METHODS)
  assert {"alm", "ntp", "hidden", "dskd", "mined", "uld"} <= set(terms_lib.term_names())
  assert _weighted(method="alm+sft", ntp_weight=0.3) == [("alm", 1.0), ("ntp", 0.3)]
  assert _weighted(method="alm+sft", ntp_weight=0.3, add_terms="hidden=0.5") == [
      ("alm", 1.0), ("ntp", 0.3), ("hidden", 0.5)]
  # A term named twice adds up.
  assert _weighted(method="alm+sft", ntp_weight=0.3, add_terms="ntp=0.2") == [
      ("alm", 1.0), ("ntp", pytest.approx(0.5))]
  for method, teacher in (("sft", False), ("alm", True), ("dskd", True), ("uld", True)):
    assert step_lib.Objective(TrainConfig.build(method=method)).needs_teacher is teacher, method
  obj = step_lib.Objective(TrainConfig.build(method="mined", ntp_weight=0.5))
  assert obj.names == ("mined", "ntp") and obj.weights == (1.0, 0.5)
  assert obj.data_constraint == "unconstrained" and not obj.needs_bias_tables
  obj = step_lib.Objective(TrainConfig.build(constraint="unbiased"))
  assert obj.data_constraint == "unbiased" and obj.needs_bias_tables


def test_unknown_term_names_the_known_terms():
  known = ", ".join(terms_lib.term_names())
  with pytest.raises(TrainConfigError, match=f"unknown term 'hiden'; known terms: {known}"):
    TrainConfig.build(add_terms="hiden=0.5")
  with pytest.raises(TrainConfigError, match="add_terms.*TERM=WEIGHT"):
    TrainConfig.build(add_terms="hidden=-1")


def test_terms_needing_differently_aligned_data_are_refused():
  with pytest.raises(TrainConfigError, match=r"(?s)differently aligned data.*'mined': "
                     r"'unconstrained'.*'alm': 'space'"):
    TrainConfig.build(method="mined", add_terms="alm=1", constraint="space")
  # The same terms agree on unconstrained chunks (boundary_prob is applied in the loss).
  for constraint in ("unconstrained", "boundary_prob"):
    cfg = TrainConfig.build(method="mined", add_terms="alm=1", constraint=constraint)
    assert step_lib.Objective(cfg).data_constraint == "unconstrained"


# ---------------------------------------------------------------------------
# 3. A new method is one Term subclass and one Method.

LOGIT_WEIGHT = 1e-3


class LogitNormTerm(terms_lib.Term):
  """A constant weight times the squared norm of the student's logits, per trained token."""

  name = "logit_norm_test"
  needs_teacher = False

  def __call__(self, fwd: terms_lib.Forward) -> LossSum:
    mask = fwd.batch["student_loss_mask"].astype(jnp.float32)
    sq = jnp.sum(jnp.square(fwd.student.logits.astype(jnp.float32)), axis=-1)
    return LossSum(LOGIT_WEIGHT * jnp.sum(sq * mask), jnp.sum(mask))


@pytest.fixture
def logit_norm_method():
  terms_lib.methods()  # load the built-in plug-ins first
  terms_lib.register_term(LogitNormTerm)
  method = terms_lib.register_method(terms_lib.Method(
      "logit_norm_test", "test: shrink the student's logits.", (("logit_norm_test", 1.0),)))
  try:
    yield method
  finally:
    terms_lib._TERMS.pop(LogitNormTerm.name, None)  # pylint: disable=protected-access
    terms_lib._METHODS.pop(method.name, None)  # pylint: disable=protected-access
  assert set(terms_lib.methods()) == set(METHODS)


def test_a_registered_method_trains(corpus, tmp_path, logit_norm_method):
  cfg = _cfg(method=logit_norm_method.name, batch_size=2)
  assert logit_norm_method.name in terms_lib.methods()
  obj = step_lib.Objective(cfg)
  assert obj.names == ("logit_norm_test",) and not obj.needs_teacher
  summary = tu.tiny_trainer(corpus, tmp_path, cfg, checkpoint_dir="").fit()
  assert summary["steps"] == 2
  recs = _train_records(tmp_path)
  assert [r["step"] for r in recs] == [1, 2]
  for r in recs:
    assert np.isfinite(r["loss_logit_norm_test"]) and r["loss_logit_norm_test"] > 0
    assert r["count_logit_norm_test"] > 0
    assert r["loss"] == pytest.approx(r["loss_logit_norm_test"], rel=1e-6)
    assert np.isfinite(r["grad_norm"]) and r["grad_norm"] > 0


# ---------------------------------------------------------------------------
# 4. The hidden-state term with GradMag; exact accumulation through its prepass.


def test_hidden_term_with_gradmag_trains(corpus, tmp_path):
  cfg = _cfg(method="alm", add_terms="hidden=1", combine="gradmag", batch_size=2)
  tu.tiny_trainer(corpus, tmp_path, cfg, checkpoint_dir="").fit()
  recs = _train_records(tmp_path)
  assert [r["step"] for r in recs] == [1, 2]
  for r in recs:
    for k in ("loss", "loss_alm", "loss_hidden", "grad_norm", "weight_alm", "weight_hidden"):
      assert np.isfinite(r[k]), (k, r)
    assert r["loss_hidden"] > 0 and r["count_hidden"] > 0
    assert 0 < r["weight_alm"] < 1 and 0 < r["weight_hidden"] < 1
    assert r["weight_alm"] + r["weight_hidden"] == pytest.approx(1.0, abs=1e-6)
    assert r["loss"] == pytest.approx(r["weight_alm"] * r["loss_alm"]
                                      + r["weight_hidden"] * r["loss_hidden"], rel=1e-5)


@pytest.fixture(scope="module")
def batch(corpus):
  tt, st = tu.teacher_tokenizer(), tu.student_tokenizer()
  return next(Pipeline(str(corpus), tt, st, PipelineConfig(batch_size=4, teacher_len=T_LEN,
                                                           student_len=S_LEN, seed=0)))


def _first_step(cfg, batch):
  tt, st = tu.teacher_tokenizer(), tu.student_tokenizer()
  model = build_transfer_model(tu.teacher_model(0), tt, st, cfg)
  s = step_lib.Stepper(model, cfg, step_lib.make_consts(model, cfg, tt, st), make_optimizer(cfg))
  return {k: float(v) for k, v in s.step(batch).items()}


def test_hidden_gradmag_accumulation_is_exact(batch, monkeypatch):
  kw = dict(method="alm", add_terms="hidden=1", combine="gradmag")
  one = _first_step(_cfg(**kw, grad_accum=1), batch)
  two = _first_step(_cfg(**kw, grad_accum=2), batch)
  for k in ("loss", "loss_alm", "loss_hidden", "count_alm", "count_hidden", "weight_alm",
            "weight_hidden"):
    np.testing.assert_allclose(two[k], one[k], rtol=1e-5, err_msg=k)
  # Not vacuous: the micro-batches' own mean squares (no prepass) give another loss.
  monkeypatch.setattr(HiddenTerm, "prepass", terms_lib.Term.prepass)
  own = _first_step(_cfg(**kw, grad_accum=2), batch)
  assert abs(own["loss_hidden"] - one["loss_hidden"]) > 1e-4 * abs(one["loss_hidden"])
