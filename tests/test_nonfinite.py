"""A non-finite loss or gradient is never applied; persistent ones stop the run clearly."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alm.losses.reduce import LossSum
from alm.training import step as step_lib
from alm.training.config import TrainConfig
from alm.training.trainer import RunOptions

import training_utils as tu

T_LEN, S_LEN = 24, 48


def _cfg(**kw):
  base = dict(method="alm", steps=8, batch_size=2, teacher_len=T_LEN, student_len=S_LEN,
              lora_rank=2, lora_alpha=4.0, learning_rate=1e-2, warmup_steps=1)
  return TrainConfig.build(**{**base, **kw})


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  return tu.write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture
def poisonable(monkeypatch):
  """Makes every loss total `total * (1 + consts["poison"])`: NaN loss and gradient on demand.

  The poison is a step input (not a traced constant), so one compiled step
  serves both the healthy and the poisoned calls.
  """
  orig = step_lib.compute_losses

  def poisoned(model, batch, consts, objective, hidden=((), ())):
    out = orig(model, batch, consts, objective, hidden)
    p = consts["poison"]
    return {k: LossSum(v.total * (1.0 + p), v.count) for k, v in out.items()}

  monkeypatch.setattr(step_lib, "compute_losses", poisoned)

  def set_poison(stepper, value):
    stepper.consts = {**stepper.consts, "poison": jnp.float32(value)}

  return set_poison


def _trainer(corpus, out, cfg, **opts):
  return tu.tiny_trainer(corpus, out, cfg, **opts)


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_a_nonfinite_step_is_not_applied(corpus, tmp_path, poisonable):
  t = _trainer(corpus, tmp_path, _cfg())
  s = t.stepper
  batch = next(t.data)
  poisonable(s, 0.0)
  m = s.step(batch)
  assert float(m["skipped_nonfinite"]) == 0.0
  before_p, before_o = _leaves(s.state.trainable), _leaves(s.state.opt_state)
  poisonable(s, np.nan)
  m = s.step(batch)
  assert not np.isfinite(float(m["loss"])) and float(m["skipped_nonfinite"]) == 1.0
  for a, b in zip(before_p + before_o, _leaves(s.state.trainable) + _leaves(s.state.opt_state)):
    np.testing.assert_array_equal(a, b)
  poisonable(s, 0.0)  # healthy again: the step applies
  m = s.step(batch)
  assert float(m["skipped_nonfinite"]) == 0.0
  assert any(not np.array_equal(a, b) for a, b in zip(before_p, _leaves(s.state.trainable)))
  t.close()


def test_persistent_nonfinite_steps_stop_the_run_keeping_the_last_checkpoint(
    corpus, tmp_path, poisonable):
  from alm.training.trainer import NonFiniteTrainingError  # pylint: disable=import-outside-toplevel
  t = _trainer(corpus, tmp_path, _cfg(), checkpoint_every=2, max_nonfinite_steps=3, log_every=2)
  s = t.stepper
  poisonable(s, 0.0)
  real_step = s.step

  def step(batch):  # healthy for 2 steps, then NaN for good
    poisonable(s, 0.0 if s.state.step < 2 else np.nan)
    return real_step(batch)

  s.step = step
  with pytest.raises(NonFiniteTrainingError,
                     match=r"(?s)3 consecutive steps.*steps 3-5.*not applied.*step 2.*kept"):
    t.fit()
  recs = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  train = {r["step"]: r["skipped_nonfinite"] for r in recs if r["kind"] == "train"}
  assert train[1] == train[2] == 0 and train[3] == train[4] == train[5] == 1
  # No checkpoint was written after the trouble started (step 4's would be the bad stretch).
  assert t.checkpointer.steps() == [2]


def test_isolated_nonfinite_steps_are_counted_in_the_summary(corpus, tmp_path, poisonable):
  t = _trainer(corpus, tmp_path, _cfg(steps=4), checkpoint_dir="", max_nonfinite_steps=2)
  s = t.stepper
  real_step = s.step

  def step(batch):  # step 2 only is poisoned
    poisonable(s, np.nan if s.state.step == 1 else 0.0)
    return real_step(batch)

  s.step = step
  summary = t.fit()
  assert summary["skipped_nonfinite_steps"] == 1
  assert "| skipped_nonfinite_steps | 1 |" in (tmp_path / "report.md").read_text()


def test_max_nonfinite_steps_is_checked():
  with pytest.raises(ValueError, match="max_nonfinite_steps"):
    RunOptions(out_dir="x", max_nonfinite_steps=0)
