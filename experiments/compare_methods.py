"""Compare distillation methods on the same models, data, seed and steps.

Runs `experiments.transfer_tokenizer` (or, with `--binary=distill`,
`experiments.distill`) once per method (each in its own process, exactly as a
user would run it), with every other flag passed through unchanged, then
writes one comparison:

  python -m experiments.compare_methods --methods=alm,sft --out_dir=runs/compare \
      -- --steps=30 --eval_every=10
  python -m experiments.compare_methods --binary=distill \
      --methods=alm,alm+sft,sft,dskd,mined,uld --out_dir=runs/distill-compare

Outputs in --out_dir: one sub-directory per method (the transfer binary's own
outputs: metrics.jsonl, report.md/png, summary.json, checkpoints), and
`comparison.md` (held-out bits per byte of the teacher, the FVT-initialised
student and every trained student, with the share of the gap to the teacher
each closed), `comparison.json` and `comparison.png` (held-out bits per byte
against steps, one line per method).

A run that already finished (its summary.json exists) is not run again, so an
interrupted comparison continues where it stopped.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence

from absl import app, flags

from alm.training.metrics import heldout_suffixes

FLAGS = flags.FLAGS

flags.DEFINE_list("methods", ["alm", "sft"], "Methods to compare (the binary's --method).")
flags.DEFINE_enum("binary", "transfer_tokenizer", ["transfer_tokenizer", "distill"],
                  "The experiment to run per method (experiments/<binary>.py).")
flags.DEFINE_multi_string("variant", [], "LABEL=FLAGS: one more run, under LABEL, with these "
                          "space-separated flags (repeatable), e.g. "
                          "'alm+sft+gradmag=--method=alm+sft --combine=gradmag'.")
flags.DEFINE_string("out_dir", "runs/compare", "One sub-directory per method, plus the comparison.")
flags.DEFINE_bool("rerun", False, "Run every method again even if it already finished.")


def run_one(method: str, out_dir: Path, passthrough: Sequence[str], rerun: bool,
            run_flags: Sequence[str] | None = None) -> dict[str, Any]:
  """Runs (or reuses) one method's (or variant's) run; returns its summary.json."""
  summary_path = out_dir / "summary.json"
  if summary_path.exists() and not rerun:
    print(f"[compare] {method}: already done ({summary_path})", flush=True)
    return json.loads(summary_path.read_text())
  run_flags = [f"--method={method}"] if run_flags is None else list(run_flags)
  cmd = [sys.executable, "-m", f"experiments.{FLAGS.binary}", *run_flags,
         f"--out_dir={out_dir}", *passthrough]
  if rerun:
    cmd.append("--noresume")
  print(f"[compare] {method}: {' '.join(cmd[1:])}", flush=True)
  r = subprocess.run(cmd, check=False)
  if r.returncode != 0:
    raise SystemExit(f"error: the {method} run failed (exit {r.returncode}); its output is above "
                     f"and in {out_dir}.")
  return json.loads(summary_path.read_text())


def _eval_history(out_dir: Path, sfx: str = "") -> list[tuple[int, float]]:
  from alm.training.metrics import read_history  # pylint: disable=import-outside-toplevel
  key = f"student_bpb{sfx}"
  return [(r["step"], r[key]) for r in read_history(out_dir) if r["kind"] == "eval" and key in r]


def write_comparison(out_dir: Path, summaries: dict[str, dict[str, Any]]) -> Path:
  """Writes comparison.md / .json / .png from the per-method summaries.

  Args:
    out_dir: the comparison directory (method runs in its sub-directories).
    summaries: {method: summary.json of its run}.

  Returns:
    The path of comparison.md.
  """
  first = next(iter(summaries.values()))
  sfxs = heldout_suffixes(first, "gap_closed")
  for m, s in summaries.items():
    # Same model, data and held-out rows: the starting point must be identical.
    for sfx in sfxs:
      if (abs(s[f"teacher_bpb{sfx}"] - first[f"teacher_bpb{sfx}"]) > 1e-6 or
          abs(s[f"init_student_bpb{sfx}"] - first[f"init_student_bpb{sfx}"]) > 1e-6):
        raise ValueError(
            f"The {m} run started from a different teacher / initial student on held-out set "
            f"{sfx or 'main'} ({s[f'teacher_bpb{sfx}']:.4f} / {s[f'init_student_bpb{sfx}']:.4f} "
            f"vs {first[f'teacher_bpb{sfx}']:.4f} / {first[f'init_student_bpb{sfx}']:.4f}); were "
            "its flags different? Re-run with --rerun.")
  teacher, init = first["teacher_bpb"], first["init_student_bpb"]
  steps = {s["steps"] for s in summaries.values()}
  distill = "student_model" in first
  pair = (f"Teacher {first.get('model', '?')} -> student {first['student_model']}" if distill
          else f"Model {first.get('model', '?')} -> tokenizer "
               f"{first.get('target_tokenizer', '?')}")
  lines = [f"# {'Distillation' if distill else 'Tokenizer-transfer'} methods compared", "",
           f"{pair}, "
           f"data {first.get('data', '?')}, {'/'.join(map(str, sorted(steps)))} steps, seed "
           f"{first.get('seed', '?')}; held-out bits per byte "
           f"({first.get('heldout_rows', '?')} rows per held-out set)."]
  for sfx in sfxs:
    name = (f"{sfx[1:]} (`{first.get('heldout' + sfx, sfx[1:])}`)" if sfx else
            f"main (`{first.get('heldout', 'default:heldout')}`)")
    below = first[f"init_student_bpb{sfx}"] <= first[f"teacher_bpb{sfx}"]
    lines += ["", f"Held-out set: {name}", ""]
    if below:
      lines += ["The student starts at or below the teacher's bits per byte here, so there is "
                "no gap to close: lower is better, the gap column is not defined.", ""]
    lines += ["| model | bits/byte | gap to teacher closed |", "|---|---|---|"]
    rows = [("teacher (own tokenizer)", first[f"teacher_bpb{sfx}"], None),
            ("student before training" if "student_model" in first else
             "FVT-initialised student", first[f"init_student_bpb{sfx}"], None if below else 0.0)]
    rows += [(f"{m} student", s[f"final_student_bpb{sfx}"], None if below else
              s[f"gap_closed{sfx}"]) for m, s in summaries.items()]
    for row, bpb, gap in rows:
      lines.append(f"| {row} | {bpb:.4f} | {'—' if gap is None else f'{100 * gap:.0f} %'} |")
    best = min(summaries, key=lambda m, sfx=sfx: summaries[m][f"final_student_bpb{sfx}"])
    lines += ["", f"{'Lowest bits per byte' if below else 'Closest to the teacher'} here: "
                  f"**{best}**."]
  lines += ["", "![held-out bits per byte](comparison.png)", ""]
  for m, s in summaries.items():
    if "command" in s:
      lines.append(f"- {m}: `{s['command']}`")
  _plot(out_dir, summaries, sfxs)
  md = out_dir / "comparison.md"
  md.write_text("\n".join(lines) + "\n")
  (out_dir / "comparison.json").write_text(json.dumps(
      {"teacher_bpb": teacher, "init_student_bpb": init,
       "methods": {m: {k: v for k, v in s.items()
                       if k.startswith(("final_student_bpb", "gap_closed")) or k in
                       ("steps", "wall_s")} for m, s in summaries.items()}}, indent=1))
  return md


def _plot(out_dir: Path, summaries: dict[str, dict[str, Any]], sfxs: list[str]) -> None:
  """One panel per held-out set: each student's bits per byte against steps."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  first = next(iter(summaries.values()))
  fig, axes = plt.subplots(1, len(sfxs), figsize=(5 * len(sfxs), 4), squeeze=False)
  for ax, sfx in zip(axes[0], sfxs):
    for m in summaries:
      pts = _eval_history(out_dir / m, sfx)
      if pts:
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"{m} student")
    ax.axhline(first[f"teacher_bpb{sfx}"], color="k", ls="--", label="teacher")
    ax.set_title(f"held-out: {sfx[1:] or 'main'}")
    ax.set_xlabel("step")
    ax.set_ylabel("bits per byte")
    ax.legend()
  fig.tight_layout()
  fig.savefig(out_dir / "comparison.png", dpi=100)
  plt.close(fig)


def main(argv):
  passthrough = argv[1:]
  for a in passthrough:
    if a.startswith(("--method=", "--out_dir=")) or a in ("--method", "--out_dir"):
      raise app.UsageError(f"{a} is set by compare_methods itself (use --methods / --out_dir "
                           "before the `--`).")
  from alm.training.terms import methods  # pylint: disable=import-outside-toplevel
  known = sorted(methods())
  bad = [m for m in FLAGS.methods if m not in known]
  if bad or not FLAGS.methods:
    raise app.UsageError(f"--methods={','.join(FLAGS.methods)}: unknown {bad}; choose from "
                         f"{', '.join(known)}.")
  if len(set(FLAGS.methods)) != len(FLAGS.methods):
    raise app.UsageError("--methods lists a method twice.")
  out = Path(FLAGS.out_dir).resolve()
  out.mkdir(parents=True, exist_ok=True)
  variants = {}
  for v in FLAGS.variant:
    label, sep, run_flags = v.partition("=")
    if not sep or not label or "/" in label or label in FLAGS.methods or label in variants:
      raise app.UsageError(f"--variant={v!r}: write LABEL=FLAGS with a new label (no '/').")
    variants[label] = run_flags.split()
  summaries = {m: run_one(m, out / m, passthrough, FLAGS.rerun) for m in FLAGS.methods}
  summaries.update({label: run_one(label, out / label, passthrough, FLAGS.rerun, run_flags)
                    for label, run_flags in variants.items()})
  md = write_comparison(out, summaries)
  print()
  print(md.read_text())


if __name__ == "__main__":
  app.run(main)
