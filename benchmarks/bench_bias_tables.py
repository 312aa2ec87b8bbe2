"""Average chunk lengths of the `unbiased` constraint next to `unconstrained`.

  python -m benchmarks.bench_bias_tables --tables=/tmp/bias/gemma3-qwen3 \
      --teacher=gemma3-270m --student=qwen3

Text: the held-out split of the offline default corpus
(`alm.data.corpus.default_corpus("heldout")`), never used for counting when
the tables are built on the train split. Also reports how many of the
unconstrained chunk boundaries have a last-token pair missing from the tables
(those count as biased, i.e. are merged).
"""

from __future__ import annotations

import json

import numpy as np
from absl import app, flags

import alm
from alm.tokenization.alignment import align
from alm.data.corpus import default_corpus
from alm.tokenization.alignment import last_token_indices
from alm.tokenization.bias import BiasTables

FLAGS = flags.FLAGS
flags.DEFINE_string("tables", None, "Directory written by experiments/compute_bias_tables.py.",
                    required=True)
flags.DEFINE_string("teacher", "gemma3-270m", "Teacher tokenizer.")
flags.DEFINE_string("student", "qwen3", "Student tokenizer.")
flags.DEFINE_integer("max_bytes", 10_000_000, "At most this many bytes of held-out text.")
flags.DEFINE_list("gammas", ["1e-4", "1e-3", "1e-2", "0.1", "0.5"], "Bias thresholds.")


def main(argv):
  del argv
  teacher, student = alm.load_tokenizer(FLAGS.teacher), alm.load_tokenizer(FLAGS.student)
  tables = BiasTables.load(FLAGS.tables)
  docs, n = [], 0
  for f in default_corpus("heldout"):
    for line in open(f, encoding="utf-8"):
      if n < FLAGS.max_bytes and line.strip():
        docs.append(json.loads(line)["text"])
        n += len(docs[-1].encode("utf-8"))
  encs = [(teacher.encode(d), student.encode(d)) for d in docs]
  encs = [(t, s) for t, s in encs if t.text == s.text]
  # Coverage: last-token pairs of the unconstrained boundaries found in the tables.
  found = total = 0
  for t, s in encs:
    ti, si = align(t, s)
    lt, ls = last_token_indices(ti), last_token_indices(si)
    b1, _ = tables.lookup(t.ids[lt], s.ids[ls])
    found += int(np.isfinite(b1).sum())
    total += len(lt)
  print(f"boundary pairs found in the tables: {found}/{total} ({found / max(total, 1):.1%})")
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
