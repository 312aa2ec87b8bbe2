"""Average chunk lengths of the `unbiased` constraint next to `unconstrained`.

  python -m benchmarks.bench_bias_tables --tables=/tmp/bias/gemma3-qwen3 \
      --teacher=gemma3-270m --student=qwen3 --max_bytes=300000

Text: Python standard-library sources *not* used for counting (read from the
end of the file list), cut into 4,000-character documents.
"""

from __future__ import annotations

import glob
import os

import numpy as np
from absl import app, flags

import alm
from alm.tokenization.alignment import align
from alm.tokenization.bias import BiasTables

FLAGS = flags.FLAGS
flags.DEFINE_string("tables", None, "Directory written by experiments/compute_bias_tables.py.",
                    required=True)
flags.DEFINE_string("teacher", "gemma3-270m", "Teacher tokenizer.")
flags.DEFINE_string("student", "qwen3", "Student tokenizer.")
flags.DEFINE_integer("max_bytes", 300_000, "Bytes of text to align.")
flags.DEFINE_list("gammas", ["1e-4", "1e-3", "1e-2", "0.1", "0.5"], "Bias thresholds.")


def main(argv):
  del argv
  teacher, student = alm.load_tokenizer(FLAGS.teacher), alm.load_tokenizer(FLAGS.student)
  tables = BiasTables.load(FLAGS.tables)
  files = sorted(glob.glob(os.path.join(os.path.dirname(os.__file__), "*.py")))[::-1]
  docs, n = [], 0
  for f in files:
    with open(f, encoding="utf-8", errors="replace") as fh:
      src = fh.read()
    for lo in range(0, len(src), 4000):
      docs.append(src[lo:lo + 4000])
      n += len(docs[-1].encode())
    if n >= FLAGS.max_bytes:
      break
  encs = [(teacher.encode(d), student.encode(d)) for d in docs]
  encs = [(t, s) for t, s in encs if t.text == s.text]
  settings = [("unconstrained", None)] + [("unbiased", float(g)) for g in FLAGS.gammas]
  print(f"{len(encs)} documents, {n} bytes; {FLAGS.teacher} -> {FLAGS.student}; "
        f"tables: {len(tables.keys)} pairs")
  print("| constraint | gamma | chunks | teacher tokens / chunk | student tokens / chunk | "
        "tokens in a chunk (teacher) |")
  print("|---|---|---|---|---|---|")
  for constraint, g in settings:
    chunks = tt = ts = tot_t = 0
    for t, s in encs:
      kw = dict(constraint=constraint, teacher_tokenizer=teacher, student_tokenizer=student)
      if g is not None:
        kw.update(bias_tables=tables, gamma=g)
      ti, si = align(t, s, **kw)
      chunks += int(ti.max(initial=-1)) + 1
      tt += int((ti >= 0).sum())
      ts += int((si >= 0).sum())
      tot_t += len(ti)
    print(f"| {constraint} | {g if g is not None else '-'} | {chunks} | {tt / max(chunks, 1):.2f} |"
          f" {ts / max(chunks, 1):.2f} | {tt / tot_t:.1%} |")


if __name__ == "__main__":
  app.run(main)
