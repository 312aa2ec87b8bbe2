"""Throughput of the byte students' subword n-gram lookup vs the pipeline's other costs.

    .venv/bin/python -m benchmarks.bench_ngram [--teacher=smollm2-135m-instruct \\
        --docs=200 --repeats=3]

On the first `--docs` documents of the default corpus, one process (one
core's worth: numpy and the tokenizers run single-threaded here), the median
of `--repeats` passes of:
  * `SuffixLookup` (alm/bytes/ngram.py) over all documents at once
    (`lookup_segments`, no match crossing a document) and, for the per-call
    overhead, one call per document;
  * the teacher tokenizer's `encode` and the byte tokenizer's `encode`;
  * `alm.align` of the two encodings (the pipeline's alignment);
as MB/s of text, and the (all-at-once) lookup's share of their sum. Also the lookup's
build time for the teacher's vocabulary.
"""

from __future__ import annotations

import json
import statistics
import time

import numpy as np
from absl import app, flags

import alm
from alm.bytes.ngram import SuffixLookup
from alm.data import sources

_TEACHER = flags.DEFINE_string("teacher", "smollm2-135m-instruct", "Teacher tokenizer spec.")
_DOCS = flags.DEFINE_integer("docs", 200, "Documents of the default corpus.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed passes (median).")


def _median_s(fn, repeats):
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def main(argv):
  del argv
  teacher = alm.load_tokenizer(_TEACHER.value)
  byte_tok = alm.load_tokenizer("bytes")
  t0 = time.perf_counter()
  lookup = SuffixLookup(teacher)
  build_s = time.perf_counter() - t0
  src = sources.open_source("default")
  texts = [src[i]["text"] for i in range(min(_DOCS.value, len(src)))]
  data = [t.encode("utf-8") for t in texts]
  mb = sum(map(len, data)) / 1e6
  enc_t = [teacher.encode(t) for t in texts]
  enc_s = [byte_tok.encode(t) for t in texts]
  joined = b"".join(data)
  cuts = np.cumsum([len(d) for d in data])[:-1]
  costs = {
      "ngram_lookup": _median_s(lambda: lookup.lookup_segments(joined, cuts), _REPEATS.value),
      "ngram_lookup_per_doc": _median_s(lambda: [lookup(d) for d in data], _REPEATS.value),
      "teacher_encode": _median_s(lambda: [teacher.encode(t) for t in texts], _REPEATS.value),
      "bytes_encode": _median_s(lambda: [byte_tok.encode(t) for t in texts], _REPEATS.value),
      "align": _median_s(lambda: [alm.align(a, b) for a, b in zip(enc_t, enc_s)],
                         _REPEATS.value),
  }
  total = sum(v for k, v in costs.items() if k != "ngram_lookup_per_doc")
  print(json.dumps({
      "teacher": _TEACHER.value, "docs": len(texts), "mb": round(mb, 3),
      "lookup_build_s": round(build_s, 2),
      **{f"{k}_mb_per_s": round(mb / v, 2) for k, v in costs.items()},
      "lookup_share": round(costs["ngram_lookup"] / total, 3)}))


if __name__ == "__main__":
  app.run(main)
