"""Byte students: the n-gram lookup's cost, and the step against a subword student's.

  python -m benchmarks.bench_bytes [--model=smollm2-135m-instruct --target=qwen3 \\
      --batch_size=2 --length=128 --repeats=3 --num_layers=0 --lora_rank=64]

At equal text per row (the byte row is `length` x the bytes per teacher token
measured on the batch's documents), one run reports:
  * the n-gram lookup inside the byte student's forward (`subword_ids`, jitted
    alone): seconds per batch and bytes/s, against the same bytes through the
    host reference `alm.bytes.SuffixLookup` (numpy, one core);
  * the train step (method `--method`, same adapters) of the subword student
    (tokenizer transfer to `--target`) and of the byte student, with and
    without the n-gram embeddings: wall / CPU time (median of `--repeats`
    after a warm-up), XLA FLOPs and peak memory (`memory_analysis`), and the
    byte / subword ratios; and the lookup's share of the byte step.
"""

from __future__ import annotations

import json
import math
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from alm.bytes.model import byte_tokenizer_for
from alm.bytes.ngram import SuffixLookup
from alm.bytes.student import ByteStudent
from benchmarks.steps import keep_layers, step_memory
from alm.data.pipeline import Pipeline, PipelineConfig
from alm.data.sources import open_source
from alm.models.loading import load_model
from alm.tokenization.loading import load_tokenizer
from alm.training.config import TrainConfig
from alm.training.optim import make_optimizer
from alm.training.step import Stepper, make_consts
from alm.training.students import build_model, build_transfer_model

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "smollm2-135m-instruct", "Teacher (base) model.")
flags.DEFINE_string("target", "qwen3", "The subword student's tokenizer.")
flags.DEFINE_string("method", "alm", "Method of both steps.")
flags.DEFINE_integer("batch_size", 2, "Rows per step.")
flags.DEFINE_integer("length", 128, "Teacher tokens per row (the subword student's too).")
flags.DEFINE_integer("repeats", 3, "Timed steps per configuration.")
flags.DEFINE_integer("num_layers", 0, "Keep only the first N blocks (0: all).")
flags.DEFINE_integer("lora_rank", 64, "LoRA rank of both students (0: full fine-tuning of the "
                     "byte student's copied body; the subword student then uses rank 64).")


def _teacher():
  model, tok = load_model(FLAGS.model)
  keep_layers(model, FLAGS.num_layers)
  return model, tok


def _time_step(model, cfg, tt, st, batch) -> dict:
  s = Stepper(model, cfg, make_consts(model, cfg, tt, st), make_optimizer(cfg))
  t0 = time.time()
  compiled = s.compile(batch)
  compile_s = time.time() - t0
  state, micro = s.state, s.put_batch(batch)
  wall, cpu = [], []
  for i in range(FLAGS.repeats + 1):
    w, c = time.perf_counter(), time.process_time()
    state.trainable, state.opt_state, metrics = compiled(state.trainable, state.opt_state,
                                                         state.frozen, micro, s.consts)
    jax.block_until_ready((state.trainable, metrics))
    if i:
      wall.append(time.perf_counter() - w)
      cpu.append(time.process_time() - c)
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return {"compile_s": compile_s, "step_wall_s": statistics.median(wall),
          "step_cpu_s": statistics.median(cpu), "flops": float(cost.get("flops", 0.0)),
          **step_memory(compiled)}


def main(argv):
  del argv
  _, tt = _teacher()
  bt = byte_tokenizer_for(tt)
  src = open_source("default")
  texts = [src[i]["text"] for i in range(64)]
  ratio = sum(len(t.encode()) for t in texts) / sum(
      len(tt.encode(t, add_special_tokens=False)) for t in texts)
  byte_len = int(math.ceil(ratio * FLAGS.length / 64) * 64)
  full_ft = FLAGS.lora_rank == 0
  rank = FLAGS.lora_rank or 64
  common = dict(method=FLAGS.method, steps=100, batch_size=FLAGS.batch_size,
                teacher_len=FLAGS.length)
  res = {}
  # The subword student (tokenizer transfer to --target).
  sub_tok = load_tokenizer(FLAGS.target)
  cfg = TrainConfig.build(student_len=FLAGS.length, lora_rank=rank, lora_alpha=float(rank),
                          **common)
  batch = next(Pipeline("default", tt, sub_tok, PipelineConfig(
      batch_size=FLAGS.batch_size, teacher_len=FLAGS.length, student_len=FLAGS.length, seed=0)))
  teacher, _ = _teacher()
  res["subword"] = _time_step(build_transfer_model(teacher, tt, sub_tok, cfg), cfg, tt, sub_tok,
                              batch)
  # The byte student at equal text, with and without the n-gram embeddings.
  bbatch = next(Pipeline("default", tt, bt, PipelineConfig(
      batch_size=FLAGS.batch_size, teacher_len=FLAGS.length, student_len=byte_len, seed=0)))
  for ngram in (True, False):
    cfg = TrainConfig.build(student_len=byte_len, lora_rank=0 if full_ft else rank,
                            lora_alpha=float(rank), train_body=full_ft,
                            ngram_embeddings=ngram, **common)
    teacher, _ = _teacher()
    model = build_model(ByteStudent(), teacher, tt, bt, cfg)
    key = "bytes" if ngram else "bytes_no_ngram"
    if ngram:  # before the step, which donates the model's trained arrays
      st = model.student.transformer
      ids = jnp.asarray(bbatch["student_ids"])
      valid = jnp.asarray(bbatch["student_loss_mask"]) | (ids < 256)
      seg = jnp.asarray(bbatch["student_segment_ids"]) if "student_segment_ids" in bbatch \
          else None
      f = nnx.jit(lambda m, i, v, s: m.subword_ids(i, v, s))
      jax.block_until_ready(f(st, ids, valid, seg))
      times = []
      for _ in range(max(FLAGS.repeats, 3)):
        t0 = time.perf_counter()
        jax.block_until_ready(f(st, ids, valid, seg))
        times.append(time.perf_counter() - t0)
      n_bytes = int(np.asarray(ids < 256).sum())
      lookup_s = statistics.median(times)
      host = SuffixLookup(tt)
      data = np.asarray(bbatch["student_ids"]).ravel()
      data = data[data < 256].astype(np.uint8).tobytes()
      t0 = time.perf_counter()
      host(data)
      host_s = time.perf_counter() - t0
      res["lookup"] = {"bytes": n_bytes, "device_s": lookup_s,
                       "device_bytes_per_s": n_bytes / lookup_s,
                       "host_numpy_s": host_s, "host_bytes_per_s": len(data) / host_s}
    res[key] = _time_step(model, cfg, tt, bt, bbatch)
  s, b, b0 = res["subword"], res["bytes"], res["bytes_no_ngram"]
  ratios = {k: {"step_wall": r["step_wall_s"] / s["step_wall_s"],
                "step_cpu": r["step_cpu_s"] / s["step_cpu_s"],
                "flops": r["flops"] / max(s["flops"], 1.0),
                "peak_memory": r["peak_bytes"] / s["peak_bytes"]}
            for k, r in (("bytes", b), ("bytes_no_ngram", b0))}
  out = {"config": {k: FLAGS[k].value for k in ("model", "target", "method", "batch_size",
                                                "length", "repeats", "num_layers",
                                                "lora_rank")},
         "bytes_per_teacher_token": ratio, "byte_len": byte_len, "results": res,
         "over_subword": ratios,
         "lookup_share_of_byte_step": res["lookup"]["device_s"] / b["step_wall_s"]}
  print(json.dumps(out, indent=1))
  print(f"\nbyte row {byte_len} bytes for {FLAGS.length} teacher tokens "
        f"({ratio:.2f} bytes/token)\n")
  print("| student | step wall s | step CPU s | GFLOPs | peak MiB |\n|---|---|---|---|---|")
  for k in ("subword", "bytes", "bytes_no_ngram"):
    r = res[k]
    print(f"| {k} | {r['step_wall_s']:.2f} | {r['step_cpu_s']:.2f} | {r['flops'] / 1e9:.0f} | "
          f"{r['peak_bytes'] / 2**20:.0f} |")
  lk = res["lookup"]
  print(f"\nlookup: {lk['device_s'] * 1e3:.1f} ms per batch in the model "
        f"({lk['device_bytes_per_s'] / 1e6:.3g} MB/s, "
        f"{100 * out['lookup_share_of_byte_step']:.1f} % of the byte step); host numpy "
        f"{lk['host_bytes_per_s'] / 1e6:.3g} MB/s")


if __name__ == "__main__":
  app.run(main)
