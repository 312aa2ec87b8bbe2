"""alm.training.metrics.write_report: the report's table and plot cover every held-out set."""

from __future__ import annotations

import json

from alm.training.metrics import write_report


def test_report_has_a_column_pair_per_heldout_set(tmp_path):
  recs = [{"step": 0, "kind": "eval", "teacher_bpb": 1.25, "student_bpb": 1.75,
           "teacher_bpb@teacher": 1.5, "student_bpb@teacher": 2.0},
          {"step": 1, "kind": "train", "loss": 0.5},
          {"step": 2, "kind": "eval", "teacher_bpb": 1.25, "student_bpb": 1.5,
           "teacher_bpb@teacher": 1.5, "student_bpb@teacher": 1.875}]
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
  md = write_report(tmp_path, {"method": "alm", "gap_closed": 0.5}).read_text()
  assert "| step | teacher | student | teacher@teacher | student@teacher |" in md
  assert "| 0 | 1.2500 | 1.7500 | 1.5000 | 2.0000 |" in md
  assert "| 2 | 1.2500 | 1.5000 | 1.5000 | 1.8750 |" in md
  assert "| gap_closed | 0.5000 |" in md
  assert (tmp_path / "report.png").stat().st_size > 0


def test_heldout_suffixes_and_summary_block():
  from alm.training.metrics import heldout_suffixes  # pylint: disable=import-outside-toplevel
  from alm.training.transfer import format_summary  # pylint: disable=import-outside-toplevel
  keys = ["student_bpb", "student_bpb@b", "student_bpb@a", "teacher_bpb@z", "gap_closed@q"]
  assert heldout_suffixes(keys) == ["", "@a", "@b"]
  assert heldout_suffixes(keys, "gap_closed") == ["", "@q"]
  s = {"method": "alm", "steps": 3, "teacher_bpb": 1.0, "gap_closed": 0.5,
       "teacher_bpb@t": 2.0, "gap_closed@t": 0.25, "total_wall_s": 9.0}
  lines = format_summary(s).splitlines()
  assert [l.split()[0] for l in lines] == ["method", "steps", "teacher_bpb", "gap_closed",
                                           "teacher_bpb@t", "gap_closed@t", "total_wall_s"]
  assert lines[5].split()[1] == "0.2500"
