"""A transfer run survives its data: bad documents skipped and reported, or found before training.

A tiny teacher saved as an HF directory (so `run_transfer` and the binary load it
like a real one) and the byte tokenizer as the target; the data names its text
field "body" (`--text_field`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from alm.data.pipeline import BadDocumentError, Pipeline
from alm.data.sources import open_source
from alm.models.loading import save_model
from alm.testing.models import tiny_model
from alm.testing.tokenizers import tiny_tokenizer
from alm.tokenization.loading import load_tokenizer
from alm.training import transfer
from alm.training.config import TrainConfig
from alm.training.trainer import RunOptions
from alm.training.transfer import TransferJob, run_transfer

import training_utils as tu

ROOT = Path(__file__).resolve().parents[1]
BAD = "a lone \ud800 surrogate"  # no UTF-8 bytes: no tokenizer can spell it


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
  tok = tiny_tokenizer("bpe", 300)
  return save_model(tiny_model("llama", vocab_size=tok.vocab_size, seed=0),
                    tmp_path_factory.mktemp("teacher"), tok)


def _write(path: Path, texts) -> Path:
  path.write_text("".join(json.dumps({"body": t}) + "\n" for t in texts))
  return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  d = tmp_path_factory.mktemp("data")
  # Every other training document is bad: any step reads some.
  train = _write(d / "train.jsonl", [t for g in tu.TEXTS for t in (g, f"{BAD} {g[:5]}")])
  heldout = _write(d / "heldout.jsonl", [BAD] + tu.TEXTS[:4])
  return train, heldout


def _cfg():
  return TrainConfig.build(method="alm+sft", steps=4, batch_size=2, teacher_len=24,
                          student_len=48, lora_rank=2, lora_alpha=4.0, learning_rate=1e-2,
                          warmup_steps=1)


def _job(teacher_dir, data, **kw):
  return TransferJob(model=str(teacher_dir), target_tokenizer="bytes", data=str(data[0]),
                     heldout_data=str(data[1]), eval_batches=1, eval_batch_size=2,
                     text_field="body", **kw)


def test_run_with_bad_documents_finishes_and_reports_them_across_a_resume(teacher_dir, data,
                                                                           tmp_path):
  cfg, job = _cfg(), _job(teacher_dir, data)
  assert job.bad_documents == "skip"  # the default: a long run finishes
  out = tmp_path / "run"
  opts = dict(out_dir=str(out), checkpoint_every=1, progress=False, tensorboard=False)
  assert run_transfer(job, cfg, RunOptions(**opts, stop_after=2))["stopped_at"] == 2
  s = run_transfer(job, cfg, RunOptions(**opts))  # resumed from step 2
  assert s["steps"] == 4
  # The count of the uninterrupted pipeline after 4 batches: cumulative across the resume.
  pipe = Pipeline(open_source(str(data[0]), text_field="body"), tiny_tokenizer("bpe", 300),
                  load_tokenizer("bytes"), transfer._pipeline_config(cfg, job))  # pylint: disable=protected-access
  for _ in range(4):
    next(pipe)
  assert s["skipped_documents"] == pipe.num_skipped > 0
  assert s["skipped_heldout_documents"] == 1
  recs = [json.loads(l) for l in open(out / "metrics.jsonl")]
  train = {r["step"]: r["skipped_documents"] for r in recs if r["kind"] == "train"}
  assert sorted(train) == [1, 2, 3, 4] and train[4] == s["skipped_documents"]
  assert all(train[k] <= train[k + 1] for k in (1, 2, 3))
  assert "| skipped_documents |" in (out / "report.md").read_text()
  assert json.loads((out / "summary.json").read_text())["skipped_documents"] == train[4]
  assert "skipped_documents" in transfer.format_summary(s)


def test_error_policy_fails_before_the_model_loads(teacher_dir, data, tmp_path, monkeypatch):
  import alm.models.loading  # pylint: disable=import-outside-toplevel

  def no_model(*a, **k):
    raise AssertionError("the model was loaded before the data was checked")

  monkeypatch.setattr(alm.models.loading, "load_model", no_model)
  out = tmp_path / "run"
  with pytest.raises(BadDocumentError,
                     match=r"(?s)train\.jsonl:2: cannot tokenize .*lone surrogate.*"
                           r"--bad_documents=skip"):
    run_transfer(_job(teacher_dir, data, bad_documents="error"), _cfg(),
                 RunOptions(out_dir=str(out)))
  assert not out.exists()
  with pytest.raises(ValueError, match="choose one of: skip, error"):
    _job(teacher_dir, data, bad_documents="ignore")


def _binary(*flags: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "experiments.transfer_tokenizer", *flags],
                        cwd=ROOT, capture_output=True, text=True, timeout=300,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})


def test_binary_text_field_and_bad_documents_flags(teacher_dir, data, tmp_path):
  out = tmp_path / "out"
  common = [f"--model={teacher_dir}", "--target_tokenizer=bytes", f"--data={data[0]}",
            f"--heldout_data={data[1]}", "--teacher_samples=0", f"--out_dir={out}"]
  r = _binary(*common)
  assert r.returncode == 2, r.stderr[-2000:]
  assert "train.jsonl:1: no string field 'text'" in r.stderr and "--text_field=body" in r.stderr
  # With the field named, the data is read; under --bad_documents=error its bad document is
  # found before any training, with the fix.
  r = _binary(*common, "--text_field=body", "--bad_documents=error")
  assert r.returncode == 2, r.stderr[-2000:]
  assert "error: " in r.stderr and "train.jsonl:2: cannot tokenize" in r.stderr
  assert "--bad_documents=skip" in r.stderr and "Traceback" not in r.stderr
  assert not out.exists()
