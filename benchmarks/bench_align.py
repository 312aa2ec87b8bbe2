"""Aligned 512-token pairs per second on one core (only the alignment is timed).

  taskset -c 1 python -m benchmarks.bench_align [--teacher=gemma3-270m --student=qwen3 --n=2000]

Reports pairs per second of CPU time (time.process_time: less sensitive to
other jobs on a shared machine) and of wall time, best of `--repeats` rounds,
for `align` per pair and for `align_batch` on batches of `--batch_sizes`.
Pin to one core with `taskset -c N` (numpy here is single-threaded anyway).

Texts are Python standard-library sources, pre-tokenized by both tokenizers and
cut at the largest common token boundary that keeps both sides <= 512 tokens.
"""

from __future__ import annotations

import glob
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

import alm  # noqa: E402
from alm.tokenization.alignment import align, align_batch  # noqa: E402
from alm.tokenization.base import Encoding  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("teacher", "gemma3-270m", "Teacher tokenizer.")
flags.DEFINE_string("student", "qwen3", "Student tokenizer.")
flags.DEFINE_integer("n", 2000, "Number of pairs.")
flags.DEFINE_integer("length", 512, "Max tokens per side.")
flags.DEFINE_integer("repeats", 10, "Timing rounds (the best is reported).")
flags.DEFINE_list("batch_sizes", ["16", "64"], "Batch sizes for align_batch.")


def cut(enc: Encoding, nbytes: int) -> Encoding:
  keep = enc.ends <= nbytes
  keep &= ~enc.special | (enc.starts < nbytes) | (np.arange(len(enc)) == 0)
  return Encoding(enc.ids[keep], enc.starts[keep], enc.ends[keep], enc.special[keep],
                  enc.text[:nbytes])


def make_pairs(teacher, student, n, length):
  files = sorted(glob.glob(os.path.join(os.path.dirname(os.__file__), "*.py")))
  pairs = []
  for f in files:
    with open(f, encoding="utf-8", errors="replace") as fh:
      src = fh.read()
    for lo in range(0, len(src) - 4000, 4000):
      text = src[lo:lo + 4000]
      te, se = teacher.encode(text), student.encode(text)
      common = np.intersect1d(te.ends[~te.special], se.ends[~se.special])
      ok = [c for c in common
            if (te.ends <= c).sum() <= length and (se.ends <= c).sum() <= length]
      if not ok:
        continue
      pairs.append((cut(te, ok[-1]), cut(se, ok[-1])))
      if len(pairs) >= n:
        return pairs
  return pairs


def main(argv):
  del argv
  teacher, student = alm.load_tokenizer(FLAGS.teacher), alm.load_tokenizer(FLAGS.student)
  pairs = make_pairs(teacher, student, FLAGS.n, FLAGS.length)
  nt = np.mean([len(t) for t, _ in pairs])
  ns = np.mean([len(s) for _, s in pairs])
  kw = dict(teacher_tokenizer=teacher, student_tokenizer=student)

  def rate(fn, items, count):
    fn(items[:3])  # warm up
    best_wall = best_cpu = 0.0
    for _ in range(FLAGS.repeats):
      t0, c0 = time.perf_counter(), time.process_time()
      fn(items)
      best_wall = max(best_wall, count / (time.perf_counter() - t0))
      best_cpu = max(best_cpu, count / max(time.process_time() - c0, 1e-9))
    return best_cpu, best_wall

  print(f"{len(pairs)} pairs, mean {nt:.0f} teacher / {ns:.0f} student tokens "
        f"({FLAGS.teacher} -> {FLAGS.student}); load average {os.getloadavg()[0]:.1f}")

  def per_pair(ps):
    for t, s in ps:
      align(t, s, **kw)

  cpu, wall = rate(per_pair, pairs, len(pairs))
  print(f"align, per pair: {cpu:,.0f} pairs/s of CPU time, {wall:,.0f} pairs/s wall")
  for bs in map(int, FLAGS.batch_sizes):
    batches = [pairs[i:i + bs] for i in range(0, len(pairs) - bs + 1, bs)]

    def batched(bb):
      for b in bb:
        align_batch(b, pad_to=(FLAGS.length, FLAGS.length), **kw)

    cpu, wall = rate(batched, batches, bs * len(batches))
    print(f"align_batch, B={bs}: {cpu:,.0f} pairs/s of CPU time, {wall:,.0f} pairs/s wall")


if __name__ == "__main__":
  app.run(main)
