"""Time of the vocabulary pass (`token_logprobs`, value + gradient) at one size.

    python benchmarks/bench_vocab_pass.py                       # B=4, T=128, V=151,669
    PYTHONPATH=OTHER_CHECKOUT python benchmarks/bench_vocab_pass.py   # another version of alm

Prints the median wall time of 5 jitted calls of the gradient of
`sum(path) + sum(boundary)` (a 30 % boundary mask), after one warm-up call.
Compare two versions by alternating them in one session (machines are noisy).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from alm.losses import chunks

FLAGS = flags.FLAGS
flags.DEFINE_integer("batch_size", 4, "Rows.")
flags.DEFINE_integer("length", 128, "Positions per row.")
flags.DEFINE_integer("vocab", 151_669, "Vocabulary size (Qwen3's by default).")
flags.DEFINE_integer("repeats", 5, "Timed calls.")


def main(argv):
  del argv
  b, t, v = FLAGS.batch_size, FLAGS.length, FLAGS.vocab
  key = jax.random.PRNGKey(0)
  logits = jax.random.normal(key, (b, t, v), jnp.float32) * 3
  ids = jax.random.randint(key, (b, t), 0, v)
  mask = jnp.asarray(np.random.default_rng(0).random(v) < 0.3)

  def f(x):
    tok = chunks.token_logprobs(x, ids, mask)
    return jnp.sum(tok.path) + jnp.sum(tok.boundary)

  g = jax.jit(jax.value_and_grad(f))
  jax.block_until_ready(g(logits))
  times = []
  for _ in range(FLAGS.repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(g(logits))
    times.append(time.perf_counter() - t0)
  print(f"{chunks.__file__}: B={b} T={t} V={v}: median {sorted(times)[len(times) // 2]:.3f} s")


if __name__ == "__main__":
  app.run(main)
