"""experiments/compare_methods.py: the comparison table, plot and flag errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from experiments import compare_methods

ROOT = Path(__file__).resolve().parents[1]


def _fake_run(d: Path, method: str, final: float, teacher=1.25, init=1.75, evals=(1.75, 1.5)):
  d.mkdir(parents=True)
  summary = {"method": method, "steps": 10, "seed": 0, "teacher_bpb": teacher,
             "init_student_bpb": init, "final_student_bpb": final,
             "gap_closed": (init - final) / (init - teacher), "wall_s": 1.0,
             "model": "m", "target_tokenizer": "t", "data": "default", "heldout_rows": 16,
             "command": f"python -m experiments.transfer_tokenizer --method={method}"}
  (d / "summary.json").write_text(json.dumps(summary))
  recs = [{"step": 5 * i, "kind": "eval", "teacher_bpb": teacher, "student_bpb": v}
          for i, v in enumerate((*evals, final))]
  (d / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
  return summary


def test_comparison_table_and_plot(tmp_path):
  s = {"alm": _fake_run(tmp_path / "alm", "alm", 1.375),
       "sft": _fake_run(tmp_path / "sft", "sft", 1.5)}
  md = compare_methods.write_comparison(tmp_path, s).read_text()
  assert "| teacher (own tokenizer) | 1.2500 | — |" in md
  assert "| FVT-initialised student | 1.7500 | 0 % |" in md
  assert "| alm student | 1.3750 | 75 % |" in md
  assert "| sft student | 1.5000 | 50 % |" in md
  assert "Closest to the teacher here: **alm**" in md and "--method=sft" in md
  assert (tmp_path / "comparison.png").stat().st_size > 1000
  js = json.loads((tmp_path / "comparison.json").read_text())
  assert js["methods"]["sft"]["final_student_bpb"] == 1.5


def test_runs_from_different_starting_points_are_refused(tmp_path):
  s = {"alm": _fake_run(tmp_path / "alm", "alm", 1.375),
       "sft": _fake_run(tmp_path / "sft", "sft", 1.5, init=1.8)}
  with pytest.raises(ValueError, match="different teacher / initial student"):
    compare_methods.write_comparison(tmp_path, s)


def _cli(*args):
  return subprocess.run([sys.executable, "-m", "experiments.compare_methods", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=120,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})


def test_flag_errors_are_clear(tmp_path):
  r = _cli("--methods=alm,sfft", f"--out_dir={tmp_path / 'c'}")
  assert r.returncode != 0 and "unknown ['sfft']" in r.stderr
  r = _cli("--methods=alm", f"--out_dir={tmp_path / 'c'}", "--", "--method=sft")
  assert r.returncode != 0 and "--method=sft is set by compare_methods" in r.stderr
  assert not (tmp_path / "c").exists()


def test_finished_runs_are_reused(tmp_path):
  # Both summaries exist: nothing is run again, the comparison is rebuilt.
  _fake_run(tmp_path / "alm", "alm", 1.375)
  _fake_run(tmp_path / "sft", "sft", 1.5)
  r = _cli("--methods=alm,sft", f"--out_dir={tmp_path}")
  assert r.returncode == 0, r.stderr[-2000:]
  assert "already done" in r.stdout and "| alm student | 1.3750 | 75 % |" in r.stdout


def test_extra_heldout_sets_get_their_own_table(tmp_path):
  s = {}
  for m, final, ood in (("alm", 1.375, 2.0), ("sft", 1.5, 2.5)):
    s[m] = _fake_run(tmp_path / m, m, final)
    s[m].update({"teacher_bpb@prose": 1.5, "init_student_bpb@prose": 3.0,
                 "final_student_bpb@prose": ood, "gap_closed@prose": (3.0 - ood) / 1.5,
                 "heldout@prose": "prose.jsonl"})
  md = compare_methods.write_comparison(tmp_path, s).read_text()
  assert "Held-out set: prose (`prose.jsonl`)" in md
  assert md.count("Closest to the teacher here: **alm**") == 2
  assert "| alm student | 2.0000 | 67 % |" in md and "| sft student | 2.5000 | 33 % |" in md
  s["sft"]["init_student_bpb@prose"] = 2.9
  with pytest.raises(ValueError, match="held-out set @prose"):
    compare_methods.write_comparison(tmp_path, s)


def test_distillation_comparison_with_a_student_below_its_teacher(tmp_path):
  # Large-to-small: the student can start below its teacher on a held-out set.
  s = {m: _fake_run(tmp_path / m, m, f, teacher=1.3, init=1.27) for m, f in
       (("alm+sft", 1.17), ("sft", 1.16))}
  for v in s.values():
    v["student_model"] = "small"
  md = compare_methods.write_comparison(tmp_path, s).read_text()
  assert md.startswith("# Distillation methods compared") and "-> student small" in md
  assert "no gap to close" in md and "| student before training | 1.2700 | 0 % |" not in md
  assert "| sft student | 1.1600 | — |" in md and "Lowest bits per byte here: **sft**" in md
