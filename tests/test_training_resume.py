"""Checkpoints: exact resume, atomic saves, refusal of another run's checkpoint, export."""

from __future__ import annotations

import json
import pathlib

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import alm
from alm.data.pipeline import Pipeline, PipelineConfig
from alm.training.checkpoint import Checkpointer, CheckpointMismatchError
from alm.training.config import TrainConfig
from alm.training.students import build_transfer_model, export_student
from alm.training.metrics import read_history
from alm.training.trainer import RunOptions, Trainer, take_batches

import training_utils as tu

T_LEN, S_LEN = 24, 48


def _cfg(**kw):
  base = dict(method="alm+sft", steps=4, batch_size=2, teacher_len=T_LEN, student_len=S_LEN,
              lora_rank=2, lora_alpha=4.0, learning_rate=1e-2, warmup_steps=1)
  return TrainConfig.build(**{**base, **kw})


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  return tu.write_corpus(tmp_path_factory.mktemp("corpus"))


def _trainer(corpus, out, cfg, *, model_overrides=None, extra_eval_label=None, **opts):
  tt, st = tu.teacher_tokenizer(), tu.student_tokenizer()
  model = build_transfer_model(tu.teacher_model(0, **(model_overrides or {})), tt, st, cfg)
  pipe = Pipeline(str(corpus), tt, st, PipelineConfig(
      batch_size=cfg.shapes.batch_size, teacher_len=T_LEN, student_len=S_LEN, seed=cfg.seed))
  heldout = take_batches(Pipeline(str(corpus), tt, st, PipelineConfig(
      batch_size=2, teacher_len=T_LEN, student_len=S_LEN, shuffle=False, num_epochs=1)), 1)
  run = RunOptions(out_dir=str(out), progress=False, tensorboard=False, **opts)
  extra = {extra_eval_label: heldout} if extra_eval_label is not None else None
  return Trainer(model, tt, st, cfg, pipe, heldout, run, extra_eval=extra,
                 fingerprint_extra={"data": "tiny"})


def _entries(directory):
  """What a directory holds besides its run lock (`.lock`, see alm.training.rundir)."""
  return sorted(p.name for p in directory.iterdir() if p.name != ".lock")


def _params(trainer):
  return [np.asarray(x) for x in jax.tree.leaves(trainer.stepper.state.trainable)]


@pytest.fixture(scope="module")
def runs(corpus, tmp_path_factory):
  """An uninterrupted 4-step run, and one stopped after 2 steps then resumed."""
  cfg = _cfg()
  full_dir = tmp_path_factory.mktemp("full")
  # A second held-out set (here the same rows under another label) rides along.
  full = _trainer(corpus, full_dir, cfg, checkpoint_every=2, extra_eval_label="again")
  full_summary = full.fit()
  part_dir = tmp_path_factory.mktemp("part")
  stopped = _trainer(corpus, part_dir, cfg, checkpoint_every=2, stop_after=3,
                     extra_eval_label="again")
  assert stopped.fit() == {"stopped_at": 3}  # step 3 was never saved: resume redoes it
  resumed = _trainer(corpus, part_dir, cfg, checkpoint_every=2, extra_eval_label="again")
  resumed_summary = resumed.fit()
  return full, full_summary, resumed, resumed_summary, part_dir


def test_resumed_run_reaches_the_same_parameters(runs):
  full, full_summary, resumed, resumed_summary, part_dir = runs
  assert resumed.stepper.state.step == full.stepper.state.step == 4
  for a, b in zip(_params(full), _params(resumed)):
    np.testing.assert_array_equal(a, b)
  assert resumed_summary["final_student_bpb"] == full_summary["final_student_bpb"]
  assert resumed_summary["init_student_bpb"] == full_summary["init_student_bpb"]
  for s in (full_summary, resumed_summary):  # the extra held-out set, reported per key
    for k in ("teacher_bpb", "init_student_bpb", "final_student_bpb", "gap_closed"):
      assert s[f"{k}@again"] == s[k], k
  assert s["final_student_bpb"] != s["init_student_bpb"]
  # The training losses of the steps after the resume are the same too.
  def losses(d):
    return {r["step"]: r["loss"] for r in map(json.loads, open(d / "metrics.jsonl"))
            if r["kind"] == "train"}
  assert losses(pathlib.Path(full.opts.out_dir)) == losses(part_dir)
  assert _entries(part_dir / "checkpoints") == [
      "step_00000002", "step_00000004"]


def test_checkpoint_of_another_model_or_config_is_refused(runs, corpus, tmp_path):
  _, _, _, _, part_dir = runs
  other = _trainer(corpus, part_dir, _cfg(lora_rank=4))
  with pytest.raises(CheckpointMismatchError, match=r"lora_rank: checkpoint has 2, this run has 4"):
    other.fit()
  other_model = _trainer(corpus, part_dir, _cfg(), model_overrides={"hidden_size": 48})
  with pytest.raises(CheckpointMismatchError,
                     match=r"(?s)hidden_size: checkpoint has 32, this run has 48.*--checkpoint_dir"):
    other_model.fit()
  # Nothing was written or removed by the refused attempts.
  assert _entries(part_dir / "checkpoints") == [
      "step_00000002", "step_00000004"]


def test_failed_save_leaves_no_half_written_checkpoint(runs, tmp_path, monkeypatch):
  full = runs[0]
  st = full.stepper.state
  monkeypatch.chdir(tmp_path)
  ck = Checkpointer("ck", {"run": 1})  # relative paths work too
  ck.save(1, st.trainable, st.opt_state, {"pos": 1})

  def boom(*a, **k):
    raise KeyboardInterrupt  # e.g. Ctrl-C in the middle of writing the arrays

  monkeypatch.setattr(ocp.StandardCheckpointer, "save", boom)
  with pytest.raises(KeyboardInterrupt):
    ck.save(2, st.trainable, st.opt_state, {"pos": 2})
  assert _entries(tmp_path / "ck") == ["step_00000001"]
  assert ck.latest_step() == 1
  # A crash that killed the process leaves a .tmp dir; the next open removes it.
  (tmp_path / "ck" / ".tmp-step_00000003-1-1").mkdir()
  Checkpointer(tmp_path / "ck", {"run": 1})
  assert _entries(tmp_path / "ck") == ["step_00000001"]


def test_export_is_loadable_by_alm_load_model(runs, tmp_path):
  full = runs[0]
  model = full.model()
  ids = np.asarray(full.eval_batches[0]["student_ids"])
  mask = np.asarray(full.eval_batches[0]["student_segment_ids"]) > 0
  want = np.asarray(model.student(ids, attention_mask=mask).logits)
  d = export_student(model, tmp_path / "export", tu.student_tokenizer())
  loaded, tok = alm.load_model(d)
  assert tok.vocab_size == tu.student_tokenizer().vocab_size
  got = np.asarray(loaded(ids, attention_mask=mask).logits)
  np.testing.assert_allclose(got[mask], want[mask], rtol=2e-4, atol=2e-4)


def test_extra_heldout_labels_are_checked(corpus, tmp_path):
  with pytest.raises(ValueError, match="without '@'"):
    _trainer(corpus, tmp_path, _cfg(), extra_eval_label="a@b")


def test_zero_steps_evaluates_once_and_trains_nothing(corpus, tmp_path):
  # --steps=0 exports the initialised (FVT) student: the baseline of every table.
  tr = _trainer(corpus, tmp_path / "zero", _cfg(steps=0, warmup_steps=0))
  before = _params(tr)
  summary = tr.fit()
  assert summary["steps"] == 0
  assert summary["final_student_bpb"] == summary["init_student_bpb"]
  assert summary["gap_closed"] == 0.0
  for a, b in zip(before, _params(tr)):
    np.testing.assert_array_equal(a, b)
  assert [r["kind"] for r in read_history(tmp_path / "zero")] == ["eval"]
  ck = tmp_path / "zero" / "checkpoints"
  assert not ck.exists() or _entries(ck) == []
