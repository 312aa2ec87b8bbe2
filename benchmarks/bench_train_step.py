"""Train-step time and memory of every method against SFT, for both kinds of student.

  python -m benchmarks.bench_train_step [--model=smollm2-135m-instruct --target=qwen3 \\
      --batch_size=2 --length=128 --repeats=3 --num_layers=0]
  python -m benchmarks.bench_train_step --model=gemma3-270m --student=smollm2-135m-instruct

Without --student the student shares the teacher's body (tokenizer transfer:
FVT embeddings for --target + LoRA); with --student it is that separate model
with its own tokenizer (large-to-small distillation; LoRA with --lora_rank > 0,
else full fine-tuning). Every method trains the same parameters on the same
batch; the distillation methods also run the teacher's forward pass and their
loss, SFT only the student's next-token loss. Reported per method:
  * step time: median over `--repeats` timed steps after one warm-up step,
    wall clock and process CPU time (CPU time is steadier on a shared machine);
  * FLOPs: XLA's cost analysis of the compiled step;
  * memory: XLA's buffer assignment of the compiled step
    (`memory_analysis()`: arguments + outputs + temporaries - donated aliases),
    i.e. the step's peak device memory, deterministic and separable per method
    (process RSS is neither on CPU);
and the ALM / SFT ratios (the paper reports +25% compute, +5% memory).
`--num_layers=N` keeps only the first N blocks of each model (quicker to compile).
`--methods=sft,alm,dskd,mined,uld` adds the baselines (each reported over SFT
too; MinED computes or reads its cached vocabulary map first);
`--methods=sft,alm@cache,alm` measures ALM from a teacher cache (the teacher's
path and boundary log-probs read with the batch, SPEC §15) against SFT and
against ALM with the live teacher. With --student, a step that never runs the
separate teacher (SFT, ALM from a cache) does not hold its weights either
(`AbsentTransformer`, as `run_transfer` builds a cached run), so its memory is
the student's alone.
"""

from __future__ import annotations

import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from benchmarks.steps import keep_layers, step_memory
from alm.data.pipeline import Pipeline, PipelineConfig
from alm.models.loading import load_model
from alm.tokenization.loading import load_tokenizer
from alm.training.config import TrainConfig
from alm.training.optim import make_optimizer
from alm.training.students import AbsentTransformer, build_distill_model, build_transfer_model
from alm.tokenization.vocab import shared_boundary_bytes
from alm.training.step import (BATCH_KEYS, Objective, Stepper, make_consts,
                               teacher_cache_arrays)

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "smollm2-135m-instruct", "Teacher model.")
flags.DEFINE_string("target", "qwen3", "Target tokenizer (shared-body student).")
flags.DEFINE_string("student", "", "A separate student model (large-to-small); '' : the "
                    "shared-body student of tokenizer transfer.")
flags.DEFINE_enum("teacher_param_dtype", "float32", ["float32", "bfloat16"],
                  "Storage dtype of a separate student's frozen teacher.")
flags.DEFINE_integer("uld_top_k", 4096, "ULD's top-K (0: the exact full sort).")
flags.DEFINE_integer("batch_size", 2, "Rows per step.")
flags.DEFINE_integer("length", 128, "Tokens per row (both sides).")
flags.DEFINE_integer("repeats", 3, "Timed steps per method.")
flags.DEFINE_integer("num_layers", 0, "Keep only the first N blocks (0: all).")
flags.DEFINE_integer("lora_rank", 64, "LoRA rank.")
flags.DEFINE_list("methods", ["sft", "alm"], "Methods to measure (the first is the baseline of "
                  "the ratios).")


def _load(name: str, param_dtype=jnp.float32):
  model, tok = load_model(name, param_dtype=param_dtype)
  keep_layers(model, FLAGS.num_layers)
  return model, tok


def bench(name: str, batch: dict, teacher_tok, student_tok) -> dict:
  """Compiles and times one method's step; returns its numbers.

  `name` is a method, or `METHOD@cache`: the step reads the teacher's outputs from
  the batch as a teacher cache gives them (alm.data.teacher_cache) and never runs
  the teacher.
  """
  method, _, variant = name.partition("@")
  if variant not in ("", "cache"):
    raise app.UsageError(f"--methods: {name!r}: write METHOD or METHOD@cache.")
  rank = FLAGS.lora_rank
  cfg = TrainConfig.build(method=method, steps=100, batch_size=FLAGS.batch_size,
                          teacher_len=FLAGS.length, student_len=FLAGS.length, lora_rank=rank,
                          lora_alpha=float(max(rank, 1)), uld_top_k=FLAGS.uld_top_k,
                          train_body=bool(FLAGS.student) and rank == 0,
                          **({"teacher_param_dtype": FLAGS.teacher_param_dtype}
                             if FLAGS.student else {}))
  t_dtype = (jnp.bfloat16 if FLAGS.student and FLAGS.teacher_param_dtype == "bfloat16"
             else jnp.float32)
  teacher, _ = _load(FLAGS.model, t_dtype)
  if FLAGS.student:
    # A separate teacher that the step never runs (SFT; ALM from a cache) is not in
    # memory at all: its config only, as `run_transfer` builds it with a cache.
    view = (AbsentTransformer(teacher.cfg, t_dtype)
            if variant == "cache" or not Objective(cfg).needs_teacher else teacher)
    model = build_distill_model(view, teacher_tok, _load(FLAGS.student)[0], student_tok, cfg)
  else:
    model = build_transfer_model(teacher, teacher_tok, student_tok, cfg)
  consts = make_consts(model, cfg, teacher_tok, student_tok)
  if variant == "cache":
    mask = jnp.asarray(teacher_tok.boundary_token_mask(shared_boundary_bytes(teacher_tok,
                                                                             student_tok)))
    got = nnx.jit(teacher_cache_arrays)(teacher, {k: jnp.asarray(batch[k])
                                                  for k in BATCH_KEYS}, mask)
    batch = {**batch, **{k: np.asarray(v) for k, v in got.items()}}
  s = Stepper(model, cfg, consts, make_optimizer(cfg), teacher_cache=variant == "cache")
  t0 = time.time()
  compiled = s.compile(batch)
  compile_s = time.time() - t0
  st = s.state
  micro = s.put_batch(batch)
  wall, cpu = [], []
  for i in range(FLAGS.repeats + 1):
    w, c = time.perf_counter(), time.process_time()
    st.trainable, st.opt_state, metrics = compiled(st.trainable, st.opt_state, st.frozen, micro,
                                                   s.consts)
    jax.block_until_ready((st.trainable, metrics))
    if i:  # the first call warms caches
      wall.append(time.perf_counter() - w)
      cpu.append(time.process_time() - c)
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return {"method": name, "compile_s": compile_s, "flops": float(cost.get("flops", 0.0)), "step_wall_s": statistics.median(wall),
          "step_cpu_s": statistics.median(cpu), "loss": float(metrics["loss"]),
          **step_memory(compiled)}


def main(argv):
  del argv
  teacher_tok = load_model(FLAGS.model)[1]
  student_tok = load_tokenizer(FLAGS.student or FLAGS.target)
  pipe = Pipeline("default", teacher_tok, student_tok, PipelineConfig(
      batch_size=FLAGS.batch_size, teacher_len=FLAGS.length, student_len=FLAGS.length, seed=0))
  batch = next(pipe)
  res = {m: bench(m, batch, teacher_tok, student_tok) for m in FLAGS.methods}
  base = FLAGS.methods[0]
  s = res[base]
  ratios = {m: {"step_wall": a["step_wall_s"] / s["step_wall_s"],
                "step_cpu": a["step_cpu_s"] / s["step_cpu_s"],
                "flops": a["flops"] / max(s["flops"], 1.0),
                "peak_memory": a["peak_bytes"] / s["peak_bytes"],
                "temp_memory": a["temp_size_in_bytes"] / s["temp_size_in_bytes"]}
            for m, a in res.items() if m != base}
  print(json.dumps({"config": {k: FLAGS[k].value for k in (
      "model", "target", "student", "batch_size", "length", "repeats", "num_layers",
      "lora_rank", "uld_top_k", "methods")},
                    "results": res, f"over_{base}": ratios}, indent=1))
  print("\n| method | step wall s | step CPU s | peak MiB | temp MiB |\n|---|---|---|---|---|")
  for m, r in res.items():
    print(f"| {m} | {r['step_wall_s']:.2f} | {r['step_cpu_s']:.2f} | "
          f"{r['peak_bytes'] / 2**20:.0f} | {r['temp_size_in_bytes'] / 2**20:.0f} |")
  print(f"\n| ratio over {base} | step wall | step CPU | XLA FLOPs | peak memory | temp memory |"
        "\n|---|---|---|---|---|---|")
  for m, r in ratios.items():
    print(f"| {m} / {base} | {r['step_wall']:.2f} | {r['step_cpu']:.2f} | {r['flops']:.2f} | "
          f"{r['peak_memory']:.2f} | {r['temp_memory']:.2f} |")


if __name__ == "__main__":
  app.run(main)
