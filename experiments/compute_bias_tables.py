"""Computes the tokenization-bias tables of a (teacher, student) tokenizer pair.

  python -m experiments.compute_bias_tables --teacher=gemma3-270m --student=qwen3 \
      --out=/tmp/bias/gemma3-qwen3

Writes `tables.npz` (unigram counts of both tokenizers and the sparse b1/b2
tables) and `meta.json` (both tokenizer names, the corpus, timings and peak
memory) into `--out`; load them with `alm.tokenization.bias.BiasTables.load`.
Without `--corpus`, the corpus is the train split of the offline default corpus
(`alm.data.corpus.default_corpus("train")`, ~1.9 MB): the text the toolkit
trains on by default, so every last-token pair that occurs in it is in the
tables (pairs are stored for all tokens seen in the corpus).
"""

from __future__ import annotations

import glob
import json
import resource
import time

from absl import app, flags
from tqdm import tqdm

import alm
from alm.tokenization.bias import compute_bias_tables, count_tokens

FLAGS = flags.FLAGS
flags.DEFINE_string("teacher", None, "Teacher tokenizer: asset name or path.", required=True)
flags.DEFINE_string("student", None, "Student tokenizer: asset name or path.", required=True)
flags.DEFINE_list("corpus", [], "Text files or JSONL files with a 'text' field (globs allowed) "
                  "to count unigrams on; default: alm.data.corpus.default_corpus('train').")
flags.DEFINE_string("out", None, "Output directory.", required=True)
flags.DEFINE_integer("max_bytes", 50_000_000, "Stop reading the corpus after this many bytes.")
flags.DEFINE_float("smoothing", 0.0, "Additive smoothing of unigram probabilities (0 = exact "
                   "counts; > 0 is only feasible for small vocabularies).")
flags.DEFINE_bool("observed_only", True, "Store only pairs of tokens seen in the corpus.")


def read_corpus(patterns: list[str], max_bytes: int) -> list[str]:
  """Reads text or JSONL files (globs) up to `max_bytes` in all, as a list of documents.

  Args:
    patterns: file globs; `.jsonl` files hold one `{"text": ...}` per line.
      Empty: the train split of the offline default corpus.
    max_bytes: stop after this many UTF-8 bytes.

  Returns:
    The documents.

  Raises:
    FileNotFoundError: the patterns match no file.
  """
  if patterns:
    files = sorted(f for p in patterns for f in glob.glob(p))
  else:
    from alm.data.corpus import default_corpus  # pylint: disable=g-import-not-at-top
    files = [str(f) for f in default_corpus("train")]
  if not files:
    raise FileNotFoundError(f"--corpus matched no files: {patterns}")
  docs, n = [], 0
  for f in files:
    with open(f, encoding="utf-8", errors="replace") as fh:
      texts = ([json.loads(line)["text"] for line in fh if line.strip()] if f.endswith(".jsonl")
               else [fh.read()])
    for t in texts:
      t = t.encode("utf-8")[:max(max_bytes - n, 0)].decode("utf-8", "ignore")
      if t:
        docs.append(t)
        n += len(t.encode("utf-8"))
      if n >= max_bytes:
        return docs
  return docs


def main(argv):
  del argv
  t0 = time.time()
  teacher = alm.load_tokenizer(FLAGS.teacher)
  student = alm.load_tokenizer(FLAGS.student)
  docs = read_corpus(FLAGS.corpus, FLAGS.max_bytes)
  total = sum(len(d.encode("utf-8")) for d in docs)
  counts = []
  for name, tok in (("teacher", teacher), ("student", student)):
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"counting {name}") as bar:
      counts.append(count_tokens(tok, docs, progress=bar.update))
  bars: dict[str, tqdm] = {}

  def progress(stage, done, tot):
    bar = bars.get(stage)
    if bar is None:
      bar = bars[stage] = tqdm(total=tot, desc=stage)
    bar.update(done - bar.n)

  tables = compute_bias_tables(
      teacher, student, counts[0], counts[1], smoothing=FLAGS.smoothing,
      observed_only=FLAGS.observed_only, progress=progress,
      meta={"corpus": FLAGS.corpus or ["alm.data.corpus.default_corpus('train')"],
            "corpus_bytes": total})
  for bar in bars.values():
    bar.close()
  tables.meta["total_seconds"] = round(time.time() - t0, 1)
  tables.meta["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
  tables.save(FLAGS.out)
  print(f"{len(tables.keys)} pairs -> {FLAGS.out}  ({tables.meta['total_seconds']} s, "
        f"peak RSS {tables.meta['peak_rss_mb']} MB)")


if __name__ == "__main__":
  app.run(main)
