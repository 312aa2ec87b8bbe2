"""Time and peak memory of each loss on given logits (no model forwards).

Each measurement runs in its own subprocess so that its peak resident memory
(`resource.getrusage(RUSAGE_SELF).ru_maxrss`) belongs to that loss alone; the
table also shows XLA's compiled `memory_analysis()` (temporary buffers beyond
arguments and outputs). Every loss is timed as value-and-gradient with
respect to the student logits (the teacher is frozen); "ce_teacher" is the
teacher's own plain cross-entropy, value and gradient.

  .venv/bin/python -m benchmarks.bench_losses --batch 8 --seq 512 \
      --teacher-vocab 262144 --student-vocab 262144
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

LOSSES = ("ce_teacher", "ce_student", "ce_both", "alm", "alm_boundary_prob", "ntp",
          "uld", "mined")
OPTIONAL = ("alm_tv",)


def _run_one(name, b, t, vt, vs, dtype, repeats):
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax

  from alm.losses import alm as alm_lib
  from alm.losses import ntp
  if name in ("uld", "mined"):
    from alm.losses import baselines

  dt = jnp.dtype(dtype)
  key_t, key_s = jax.random.split(jax.random.key(0))
  # Drawn directly in the logits' dtype: no float32 [B, T, V] copy inflates
  # the peak resident memory of the process.
  make = jax.jit(lambda k, v: 3 * jax.random.normal(k, (b, t, v), dt),
                 static_argnums=1)
  rng = np.random.default_rng(0)
  ids_t = jnp.asarray(rng.integers(0, vt, (b, t)), jnp.int32)
  ids_s = jnp.asarray(rng.integers(0, vs, (b, t)), jnp.int32)
  # Chunks of ~2 teacher and ~2 student tokens (realistic density).
  cid = jnp.asarray(np.tile(np.arange(t) // 2, (b, 1)), jnp.int32)
  mask_t = jnp.asarray(rng.random(vt) < 0.3)
  mask_s = jnp.asarray(rng.random(vs) < 0.3)

  def plain_ce(logits, ids):
    return optax.softmax_cross_entropy_with_integer_labels(
        logits[:, :-1].astype(jnp.float32), ids[:, 1:]).mean()

  needs_teacher = name not in ("ce_student", "ntp")
  lt = make(key_t, vt) if name not in ("ce_student", "ntp") else None
  ls = make(key_s, vs) if name != "ce_teacher" else None
  if name == "ce_teacher":
    fn = lambda x: plain_ce(x, ids_t)
    x = lt
  elif name == "ce_student":
    fn = lambda x: plain_ce(x, ids_s)
    x = ls
  elif name == "ce_both":
    # Both models' plain cross-entropies, value and gradient w.r.t. both
    # logits in one step: the baseline the ALM target refers to.
    fn = lambda xs: plain_ce(xs[0], ids_t) + plain_ce(xs[1], ids_s)
    x = (lt, ls)
  elif name == "ntp":
    fn = lambda x: ntp.next_token_loss(x, ids_s).mean()
    x = ls
  elif name.startswith("alm"):
    config = alm_lib.ALMConfig(
        divergence="tv" if name == "alm_tv" else "kl",
        constraint="boundary_prob" if name == "alm_boundary_prob"
        else "unconstrained")
    teacher = alm_lib.Side(lt, ids_t, cid, boundary_mask=mask_t)
    fn = lambda x: alm_lib.alm_loss(
        teacher, alm_lib.Side(x, ids_s, cid, boundary_mask=mask_s),
        config).mean()
    x = ls
  elif name == "uld":
    fn = lambda x: baselines.uld_loss(lt, ids_t, None, x, ids_s, None).mean()
    x = ls
  elif name == "mined":
    vmap_ = jnp.asarray(rng.integers(0, vt, vs), jnp.int32)
    fn = lambda x: baselines.mined_loss(lt, ids_t, cid, x, ids_s, cid,
                                        vmap_).mean()
    x = ls
  else:
    raise ValueError(name)
  del needs_teacher
  step = jax.jit(jax.value_and_grad(fn))
  compiled = step.lower(x).compile()
  mem = compiled.memory_analysis()
  temp = getattr(mem, "temp_size_in_bytes", None)
  out = compiled(x)
  jax.block_until_ready(out)
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(x))
    times.append(time.perf_counter() - t0)
  return dict(loss=name, time_s=float(np.median(times)),
              maxrss_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
              / 2**20, xla_temp_gib=None if temp is None else temp / 2**30,
              value=float(out[0]))


def main():
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--seq", type=int, default=512)
  p.add_argument("--teacher-vocab", type=int, default=262144)
  p.add_argument("--student-vocab", type=int, default=262144)
  p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--losses", default=",".join(LOSSES))
  p.add_argument("--timeout", type=int, default=900,
                 help="seconds per loss (compile + runs)")
  p.add_argument("--one", default=None, help=argparse.SUPPRESS)
  a = p.parse_args()
  if a.one:
    print(json.dumps(_run_one(a.one, a.batch, a.seq, a.teacher_vocab,
                              a.student_vocab, a.dtype, a.repeats)))
    return
  rows = []
  for name in a.losses.split(","):
    cmd = [sys.executable, "-m", "benchmarks.bench_losses", "--one", name,
           "--batch", str(a.batch), "--seq", str(a.seq),
           "--teacher-vocab", str(a.teacher_vocab),
           "--student-vocab", str(a.student_vocab), "--dtype", a.dtype,
           "--repeats", str(a.repeats)]
    try:
      proc = subprocess.run(cmd, capture_output=True, text=True,
                            timeout=a.timeout)
    except subprocess.TimeoutExpired:
      print(f"{name}: no result within {a.timeout} s", file=sys.stderr)
      rows.append(dict(loss=f"{name} (> {a.timeout} s, not measured)",
                       time_s=float("nan"), maxrss_gib=float("nan"),
                       xla_temp_gib=None))
      continue
    if proc.returncode != 0:
      print(f"{name}: FAILED\n{proc.stderr[-2000:]}", file=sys.stderr)
      continue
    rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(json.dumps(rows[-1]), file=sys.stderr)
  load = os.getloadavg()
  print(f"B={a.batch} T={a.seq} V_T={a.teacher_vocab} V_S={a.student_vocab} "
        f"logits {a.dtype}; value+grad w.r.t. the logits, median of "
        f"{a.repeats}; {os.cpu_count()} CPUs, load average at the end "
        f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1 / 5 / 15 min)")
  print("| loss | time (s) | peak RSS (GiB) | XLA temp (GiB) |")
  print("|---|---|---|---|")
  ce = sum(r["time_s"] for r in rows if r["loss"] in ("ce_teacher",
                                                          "ce_student"))
  ce = next((r["time_s"] for r in rows if r["loss"] == "ce_both"), ce)
  for r in rows:
    if ce and r["loss"].startswith("alm"):
      r["loss"] += f" ({r['time_s'] / ce:.2f}x ce_both)"
    temp = "-" if r["xla_temp_gib"] is None else f"{r['xla_temp_gib']:.2f}"
    print(f"| {r['loss']} | {r['time_s']:.3f} | {r['maxrss_gib']:.2f} | "
          f"{temp} |")


if __name__ == "__main__":
  main()
