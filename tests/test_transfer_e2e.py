"""experiments/transfer_tokenizer.py end to end: bad input fails clearly; a short real run helps."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from alm.data.sources import DataError, open_source
from alm.tokenization.base import TokenizerError
from alm.training.config import TrainConfig
from alm.training.trainer import RunOptions
from alm.training.transfer import TransferJob, run_transfer

ROOT = Path(__file__).resolve().parents[1]


def _binary(*flags: str, timeout: int = 300) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "experiments.transfer_tokenizer", *flags],
                        cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})


def test_mistyped_flag_lists_the_valid_values(tmp_path):
  r = _binary("--method=alms", f"--out_dir={tmp_path / 'out'}")
  assert r.returncode != 0
  # Methods are plug-ins (alm/training/methods/): the flag names the registered ones.
  assert "--method=alms" in r.stderr and "<alm|alm+sft|dskd|mined|sft|uld>" in r.stderr, (
      r.stderr[-2000:])
  r = _binary("--batch_size=3", "--grad_accum=2", f"--out_dir={tmp_path / 'out'}")
  assert r.returncode != 0 and "batch_size=3 must be a multiple of grad_accum=2" in r.stderr
  assert not (tmp_path / "out").exists()
  r = _binary("--extra_heldout=prose.jsonl", f"--out_dir={tmp_path / 'out'}")
  assert r.returncode != 0 and "write LABEL=SPEC" in r.stderr
  assert not (tmp_path / "out").exists()
  r = _binary("--extra_heldout=teacher=t.jsonl", f"--out_dir={tmp_path / 'out'}")
  assert r.returncode != 0 and "'teacher' is taken by --teacher_samples" in r.stderr
  assert not (tmp_path / "out").exists()


def test_lossy_target_tokenizer_is_rejected_before_any_work(tmp_path):
  r = _binary("--target_tokenizer=bert", f"--out_dir={tmp_path / 'out'}")
  assert r.returncode == 2, r.stderr[-2000:]
  assert "error: Tokenizer 'bert' is a WordPiece tokenizer" in r.stderr
  assert "lossless" in r.stderr and "Traceback" not in r.stderr
  assert not (tmp_path / "out").exists()  # no run directory, no checkpoint


def test_invalid_utf8_data_names_file_and_line(tmp_path):
  bad = tmp_path / "bad.txt"
  bad.write_bytes(b"fine first line\n\nsecond paragraph caf\xe9 latin-1\n")
  out = tmp_path / "out"
  r = _binary(f"--data={bad}", f"--out_dir={out}")
  assert r.returncode == 2, r.stderr[-2000:]
  assert f"{bad}:3: invalid UTF-8" in r.stderr and "iconv" in r.stderr
  assert "Traceback" not in r.stderr and not out.exists()
  with pytest.raises(DataError, match="bad.txt:3"):
    run_transfer(TransferJob(data=str(bad)), TrainConfig.build(), RunOptions(out_dir=str(out)))


def test_empty_lines_are_skipped_and_empty_files_rejected(tmp_path):
  p = tmp_path / "gaps.jsonl"
  p.write_text('{"text": "one document"}\n\n   \n{"text": "another one"}\n\n')
  src = open_source(str(p))
  assert len(src) == 2 and src.num_skipped == 3
  assert [src[i]["text"] for i in range(2)] == ["one document", "another one"]
  empty = tmp_path / "empty.txt"
  empty.write_text("\n\n  \n")
  with pytest.raises(DataError, match="no documents"):
    open_source(str(empty))


def test_teacher_samples_options_are_checked():
  with pytest.raises(ValueError, match="label 'teacher' is taken"):
    TransferJob(teacher_samples=8, extra_heldout=(("teacher", "t.jsonl"),))
  with pytest.raises(ValueError, match="teacher_samples must be >= 0"):
    TransferJob(teacher_samples=-1)
  TransferJob(teacher_samples=0, extra_heldout=(("teacher", "t.jsonl"),))  # off: label is free


def test_lossy_tokenizer_error_type():
  with pytest.raises(TokenizerError, match="WordPiece"):
    run_transfer(TransferJob(target_tokenizer="bert"), TrainConfig.build(),
                 RunOptions(out_dir="/nonexistent/never-created"))


@pytest.mark.slow
def test_short_real_transfer_improves_heldout_bits_per_byte(tmp_path):
  # SmolLM2-135M -> Qwen3 tokenizer, ALM, 3 steps on 2 x 64-token rows.
  cfg = TrainConfig.build(method="alm", steps=3, batch_size=2, teacher_len=64, student_len=64,
                          learning_rate=1e-3, warmup_steps=1, lora_rank=8, lora_alpha=8.0)
  job = TransferJob(eval_batches=1, eval_batch_size=4)
  opts = RunOptions(out_dir=str(tmp_path / "run"), checkpoint_dir="", progress=False,
                    tensorboard=False)
  s = run_transfer(job, cfg, opts)
  assert s["steps"] == 3
  assert s["teacher_bpb"] < s["init_student_bpb"]  # FVT is a worse start than the teacher
  assert s["final_student_bpb"] < s["init_student_bpb"], s  # ... and ALM training helps
  report = (tmp_path / "run" / "report.md").read_text()
  assert "final_student_bpb" in report and (tmp_path / "run" / "report.png").stat().st_size > 0
  recs = [json.loads(l) for l in open(tmp_path / "run" / "metrics.jsonl")]
  assert [r["step"] for r in recs if r["kind"] == "train"] == [1, 2, 3]
