"""Aligned 512-token pairs per second on one core (only the alignment is timed).

  python -m benchmarks.bench_align [--teacher=gemma3-270m --student=qwen3 --n=2000]

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
  for _ in range(2):  # warm up
    for t, s in pairs[:100]:
      align(t, s, teacher_tokenizer=teacher, student_tokenizer=student)
  best = best_cpu = 0.0
  for _ in range(5):
    t0, c0 = time.perf_counter(), time.process_time()
    for t, s in pairs:
      align(t, s, teacher_tokenizer=teacher, student_tokenizer=student)
    best = max(best, len(pairs) / (time.perf_counter() - t0))
    best_cpu = max(best_cpu, len(pairs) / max(time.process_time() - c0, 1e-9))
  t0 = time.perf_counter()
  align_batch(pairs, pad_to=(FLAGS.length, FLAGS.length), teacher_tokenizer=teacher,
              student_tokenizer=student)
  batch_rate = len(pairs) / (time.perf_counter() - t0)
  print(f"{len(pairs)} pairs, mean {nt:.0f} teacher / {ns:.0f} student tokens "
        f"({FLAGS.teacher} -> {FLAGS.student})")
  print(f"align: {best:,.0f} pairs/s wall, {best_cpu:,.0f} pairs/s of CPU time, one core; "
        f"load average {os.getloadavg()[0]:.1f}")
  print(f"align_batch (padded [B,{FLAGS.length}]): "
        f"{batch_rate:,.0f} pairs/s")


if __name__ == "__main__":
  app.run(main)
