"""Hypernetworks: time and memory to predict a whole vocabulary, and the training step.

  python -m benchmarks.bench_hypernet [--model=smollm2-135m-instruct --target=qwen3 \\
      --batch_size=4096 --hypernet_dim=0 --steps=3 --vocab_rows=4096 --nopredict]

Reports, in one run:
  * the decomposition of the target vocabulary by the base tokenizer (host),
  * `predict_embeddings` of every target token (each once, bucketed by piece
    count, in batches of --batch_size): wall time (after a warm-up batch compiles), tokens/s, and
    the peak resident memory of the process (`ru_maxrss`) before and after;
  * the train step of `experiments.train_hypernet` (the hypernet-demo shapes),
    with the local vocabulary flat (every row read with M piece slots) and in
    piece buckets (`alm.hypernet.batches`), on the same text rows: median wall
    time over --steps after one compiling step, their ratio, and the host
    time to sample a tokenizer and build a batch.
"""

from __future__ import annotations

import json
import resource
import statistics
import time

import numpy as np
from absl import app, flags
from flax import nnx

from alm.data.sources import open_source
from alm.hypernet import fvt
from alm.hypernet.hypernet import (HypernetConfig, Hypernetwork, base_tables, new_vocab_pieces,
                                   num_params, predict_embeddings)
from alm.hypernet.batches import HypernetBatchConfig, bucket_capacities
from alm.hypernet.sampler import sample_tokenizer
from alm.hypernet.train import HELDOUT_SEED, HypernetBatches, HypernetJob
from alm.hypernet.student import HypernetKind
from alm.models.loading import load_model
from alm.tokenization.loading import load_tokenizer
from alm.training.config import TrainConfig
from alm.training.optim import make_optimizer
from alm.training.step import Stepper, make_consts
from alm.training.students import build_model

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "smollm2-135m-instruct", "Base model.")
flags.DEFINE_string("target", "qwen3", "The vocabulary to predict.")
flags.DEFINE_integer("batch_size", 4096, "Tokens per hypernetwork call.")
flags.DEFINE_integer("hypernet_dim", 0, "Hypernetwork width (0: the base's).")
flags.DEFINE_integer("steps", 3, "Timed training steps.")
flags.DEFINE_bool("predict", True, "Also time predicting the --target vocabulary.")
flags.DEFINE_integer("vocab_rows", HypernetJob.vocab_rows, "K: rows of each training batch's "
                     "vocabulary (its tokens + negatives).")


def _rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _predict(out, hn, base, base_tok, target, hcfg):
  t = time.time()
  d = fvt.decompose(base_tok, target)
  out["decompose_s"] = time.time() - t
  emb_in, emb_out = base_tables(base)
  t = time.time()
  pieces = new_vocab_pieces(base_tok, target, emb_in, emb_out, hcfg.max_pieces, decomposition=d)
  out["pieces_s"] = time.time() - t
  rss0 = _rss_mb()
  small = new_vocab_pieces(base_tok, target, emb_in, emb_out, hcfg.max_pieces, decomposition=d)
  # Warm-up: compile the batch shape on a first full vocabulary pass.
  t = time.time()
  predict_embeddings(hn, base, base_tok, target, batch_size=FLAGS.batch_size, pieces=small)
  out["predict_first_s"] = time.time() - t
  t = time.time()
  predict_embeddings(hn, base, base_tok, target, batch_size=FLAGS.batch_size, pieces=pieces)
  out["predict_s"] = time.time() - t
  out["predict_tokens_per_s"] = int(pieces.predicted.sum()) / out["predict_s"]
  out["rss_mb_before_predict"], out["rss_mb_peak"] = rss0, _rss_mb()


def main(argv):
  del argv
  base, base_tok = load_model(FLAGS.model)
  target = load_tokenizer(FLAGS.target)
  hcfg = HypernetConfig(dim=FLAGS.hypernet_dim)
  hn = Hypernetwork.for_model(base, base_tok, hcfg, rngs=nnx.Rngs(0))
  out = {"model": FLAGS.model, "target": FLAGS.target, "target_vocab": target.vocab_size,
         "hypernet_params": num_params(hn), "batch_size": FLAGS.batch_size}
  if FLAGS.predict:
    _predict(out, hn, base, base_tok, target, hcfg)
  # The training step at the hypernet-demo shapes, flat and bucketed, on the same text rows.
  cfg = TrainConfig.build(preset="hypernet-demo")
  job = HypernetJob(model=FLAGS.model, hypernet=hcfg, vocab_rows=FLAGS.vocab_rows)
  src = open_source("default")
  fixed = sample_tokenizer(base_tok, [src[i]["text"] for i in range(64)], seed=HELDOUT_SEED,
                           cfg=job.sampler)
  caps = bucket_capacities(new_vocab_pieces(base_tok, fixed, *base_tables(base),
                                            hcfg.max_pieces, log=False), job.vocab_rows)
  out["bucket_rows"] = list(caps)
  for layout, buckets in (("flat", ()), ("buckets", caps)):
    # A fresh hypernetwork each time: a Stepper donates its trainable arrays.
    hn = Hypernetwork.for_model(base, base_tok, hcfg, rngs=nnx.Rngs(0))
    model = build_model(HypernetKind(hn), base, base_tok, base_tok, cfg)
    s = Stepper(model, cfg, make_consts(model, cfg, base_tok, base_tok), make_optimizer(cfg))
    data = HypernetBatches(src, base, base_tok, HypernetBatchConfig(
        batch_size=cfg.shapes.batch_size, teacher_len=cfg.shapes.teacher_len,
        student_len=cfg.shapes.student_len, vocab_rows=job.vocab_rows, bucket_rows=buckets),
        job, seed=0)
    walls = []
    for i in range(FLAGS.steps + 1):
      b = next(data)
      t = time.time()
      m = s.step(b)
      float(m["loss"])
      if i:
        walls.append(time.time() - t)
    out[f"train_step_s_{layout}"] = statistics.median(walls)
    out[f"host_batch_s_{layout}"] = data.host_s / data.step
  out["train_step_flat_over_buckets"] = out["train_step_s_flat"] / out["train_step_s_buckets"]
  print(json.dumps(out, indent=1))


if __name__ == "__main__":
  app.run(main)
