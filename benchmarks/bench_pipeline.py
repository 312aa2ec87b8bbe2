"""Throughput of the input pipeline (batches/s and tokens/s) on the default corpus.

Both tokenizations, the alignment, the cut into rows and padding/packing, as a
training run would see them. Prints one JSON line per setting.

    .venv/bin/python -m benchmarks.bench_pipeline --teacher=smollm2-135m-instruct \
        --student=qwen3 --batches=50 --workers=0,2
"""

from __future__ import annotations

import json
import time

from absl import app, flags

import alm
from alm.data import pipeline as pl
from alm.data import sources

_TEACHER = flags.DEFINE_string("teacher", "smollm2-135m-instruct", "Teacher tokenizer spec.")
_STUDENT = flags.DEFINE_string("student", "qwen3", "Student tokenizer spec.")
_DATA = flags.DEFINE_string("data", "default", "Data spec (see alm.data.sources.open_source).")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Rows per batch.")
_LEN = flags.DEFINE_integer("length", 128, "Tokens per row, both sides.")
_BATCHES = flags.DEFINE_integer("batches", 50, "Batches timed (after 2 warm-up batches).")
_WORKERS = flags.DEFINE_list("workers", ["0"], "Worker counts to try.")
_MODES = flags.DEFINE_list("modes", ["pad", "pack"], "Modes to try.")


def main(argv):
  del argv
  teacher, student = alm.load_tokenizer(_TEACHER.value), alm.load_tokenizer(_STUDENT.value)
  src = sources.open_source(_DATA.value)
  for mode in _MODES.value:
    for w in map(int, _WORKERS.value):
      cfg = pl.PipelineConfig(batch_size=_BATCH.value, teacher_len=_LEN.value,
                              student_len=_LEN.value, mode=mode, long_documents="split",
                              num_workers=w, seed=0)
      pipe = pl.Pipeline(src, teacher, student, cfg)
      for _ in range(2):
        next(pipe)
      t0 = time.perf_counter()
      real = 0
      for _ in range(_BATCHES.value):
        b = next(pipe)
        real += int((b["student_segment_ids"] > 0).sum())
      dt = time.perf_counter() - t0
      pipe.close()
      print(json.dumps({
          "mode": mode, "workers": w, "batch_size": _BATCH.value, "length": _LEN.value,
          "batches_per_s": round(_BATCHES.value / dt, 2),
          "student_tokens_per_s": round(real / dt),
          "student_fill": round(real / (_BATCHES.value * _BATCH.value * _LEN.value), 3),
          "teacher": _TEACHER.value, "student": _STUDENT.value}), flush=True)


if __name__ == "__main__":
  app.run(main)
