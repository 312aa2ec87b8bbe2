"""Forward throughput (tokens/s) of the offline real models.

Usage:
  .venv/bin/python benchmarks/bench_forward.py                 # both models, f32, 8 x 128
  .venv/bin/python benchmarks/bench_forward.py --dtype bfloat16 --batch 8 --length 128
  .venv/bin/python benchmarks/bench_forward.py --random        # random weights, same shapes

The forward is `jax.jit` of the model's logits over (graphdef, state) split
once; the first call (compilation) and one more warm-up call are excluded,
then `--repeats` calls are timed and the median is reported, as wall-clock
tokens/s and as tokens per CPU-second of this process (a number that other
processes sharing the cores disturb much less).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from alm.models.config import ModelConfig
from alm.models.loading import load_weights
from alm.models.transformer import Transformer

MODELS = ("smollm2-135m-instruct", "gemma3-270m")


def build(name: str, dtype, random: bool) -> Transformer:
  if not random:
    return load_weights(name, dtype=dtype)
  from alm import assets  # pylint: disable=import-outside-toplevel
  cfg = ModelConfig.from_gguf(assets.locate(name))
  return Transformer(cfg, rngs=nnx.Rngs(0), dtype=dtype)


def bench(model: Transformer, batch: int, length: int, repeats: int) -> dict:
  graphdef, state = nnx.split(model)

  @jax.jit
  def fwd(state, ids):
    return nnx.merge(graphdef, state)(ids).logits

  ids = jnp.asarray(np.random.RandomState(0).randint(0, model.cfg.vocab_size, (batch, length)),
                    jnp.int32)
  t0 = time.perf_counter()
  fwd(state, ids).block_until_ready()
  compile_s = time.perf_counter() - t0
  fwd(state, ids).block_until_ready()
  times, cpu = [], []
  for _ in range(repeats):
    t0, c0 = time.perf_counter(), time.process_time()
    fwd(state, ids).block_until_ready()
    times.append(time.perf_counter() - t0)
    cpu.append(time.process_time() - c0)
  med = statistics.median(times)
  # CPU seconds per step: less sensitive than wall time when other processes
  # share the cores (tokens per CPU-second x cores ~ tokens/s on an idle host).
  return dict(compile_s=compile_s, step_s=med, tokens_per_s=batch * length / med,
              tokens_per_cpu_s=batch * length / statistics.median(cpu))


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--length", type=int, default=128)
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--random", action="store_true",
                 help="random weights of the same shapes (no checkpoint needed, e.g. on a GPU host)")
  a = p.parse_args()
  dtype = jnp.dtype(a.dtype)
  print(f"backend {jax.default_backend()}, {jax.device_count()} device(s), "
        f"{os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f}; "
        f"batch {a.batch} x {a.length}, compute {a.dtype}")
  print(f"{'model':24s} {'compile s':>10s} {'step s':>8s} {'tokens/s':>10s} "
        f"{'tokens/CPU-s':>13s}")
  for name in a.models:
    r = bench(build(name, dtype, a.random), a.batch, a.length, a.repeats)
    print(f"{name:24s} {r['compile_s']:10.1f} {r['step_s']:8.3f} {r['tokens_per_s']:10.0f} "
          f"{r['tokens_per_cpu_s']:13.0f}", flush=True)


if __name__ == "__main__":
  main()
