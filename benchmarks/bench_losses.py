"""Time and peak memory of each loss on given logits (no model forwards).

Each measurement runs in its own subprocess so that its peak resident memory
(`resource.getrusage(RUSAGE_SELF).ru_maxrss`) belongs to that loss alone. The
logits come from an elementwise hash that XLA writes straight into their
dtype (no [B, T, V] temporary), and the resident memory just before the step
is compiled (VmRSS: the logits, ids and runtime) is recorded, so the table
shows the step's own increase, peak minus before. It also shows XLA's
compiled `memory_analysis()` temporary bytes (buffers beyond arguments and
outputs). Every loss is timed as value-and-gradient with
respect to the student logits (the teacher is frozen); "ce_teacher" is the
teacher's own plain cross-entropy, value and gradient. "uld" runs ULD with
its default `top_k`; "uld_exact" sorts the whole vocabularies and
"uld_top<K>" (e.g. uld_top1024) sorts the K largest probabilities per side;
their times are also shown as ratios to uld_exact's.

  .venv/bin/python -m benchmarks.bench_losses --batch 8 --seq 512 \
      --teacher-vocab 262144 --student-vocab 262144
  .venv/bin/python -m benchmarks.bench_losses --batch 2 --seq 128 \
      --teacher-vocab 49152 --student-vocab 151936 \
      --losses ce_both,uld_exact,uld_top1024,uld_top4096
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import jax
import jax.numpy as jnp

LOSSES = ("ce_teacher", "ce_student", "ce_both", "alm", "alm_boundary_prob", "ntp",
          "uld", "mined")
OPTIONAL = ("alm_tv", "uld_exact", "uld_top<K>")


def _hash_logits(seed, shape, dtype, spread=6.0):
  """Pseudo-random logits, uniform in [-spread, spread], at no memory cost.

  An integer hash (the "lowbias32" finalizer) of each element's flat index,
  computed elementwise from iotas: XLA fuses it into one loop that writes the
  output in `dtype` directly, so no [B, T, V] uint32/float32 temporary exists
  (`jax.random.normal` needs two, which set the process's peak resident
  memory instead of the loss). Needs B * T * V < 2**32.
  """
  b, t, v = shape
  if b * t * v >= 2**32:
    raise ValueError(f"{shape} has >= 2**32 elements; the uint32 index wraps")
  u32 = jnp.uint32
  iota = lambda d: jax.lax.broadcasted_iota(u32, shape, d)
  x = iota(0) * u32(t * v) + iota(1) * u32(v) + iota(2)
  x = x + u32(seed) * u32(0x9E3779B9)
  x = (x ^ (x >> 16)) * u32(0x7FEB352D)
  x = (x ^ (x >> 15)) * u32(0x846CA68B)
  x = x ^ (x >> 16)
  uniform = (x >> 8).astype(jnp.float32) * 2.0**-24  # [0, 1)
  return ((2 * uniform - 1) * spread).astype(dtype)


def _vm_rss_gib():
  """Current resident memory (VmRSS of /proc/self/status) in GiB."""
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmRSS:"):
        return int(line.split()[1]) / 2**20
  return float("nan")


def _max_rss_gib():
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _run_one(name, b, t, vt, vs, dtype, repeats):
  import numpy as np
  import optax

  from alm.losses import alm as alm_lib
  from alm.losses import baselines
  from alm.losses import ntp

  try:  # On a shared machine, let the kernel's OOM killer pick this first.
    with open("/proc/self/oom_score_adj", "w") as f:
      f.write("1000")
  except OSError:
    pass
  dt = jnp.dtype(dtype)
  make = jax.jit(_hash_logits, static_argnums=(0, 1, 2))
  gen_temp = make.lower(0, (b, t, vt), dt).compile().memory_analysis()
  gen_temp = getattr(gen_temp, "temp_size_in_bytes", None)
  rng = np.random.default_rng(0)
  ids_t = jnp.asarray(rng.integers(0, vt, (b, t)), jnp.int32)
  ids_s = jnp.asarray(rng.integers(0, vs, (b, t)), jnp.int32)
  # Chunks of ~2 teacher and ~2 student tokens (realistic density).
  cid = jnp.asarray(np.tile(np.arange(t) // 2, (b, 1)), jnp.int32)
  mask_t = jnp.asarray(rng.random(vt) < 0.3)
  mask_s = jnp.asarray(rng.random(vs) < 0.3)
  vmap_ = jnp.asarray(rng.integers(0, vt, vs), jnp.int32)

  def plain_ce(logits, ids):
    return optax.softmax_cross_entropy_with_integer_labels(
        logits[:, :-1].astype(jnp.float32), ids[:, 1:]).mean()

  # Every array is an argument of the step (nothing is closed over, so
  # nothing can be embedded in the executable as a constant); the gradient is
  # taken w.r.t. argument 0 only.
  lt = make(0, (b, t, vt), dt) if name not in ("ce_student", "ntp") else None
  ls = make(1, (b, t, vs), dt) if name != "ce_teacher" else None
  if name == "ce_teacher":
    fn = lambda x, aux: plain_ce(x, aux)
    args = (lt, ids_t)
  elif name == "ce_student":
    fn = lambda x, aux: plain_ce(x, aux)
    args = (ls, ids_s)
  elif name == "ce_both":
    # Both models' plain cross-entropies, value and gradient w.r.t. both
    # logits in one step: the baseline the ALM target refers to.
    fn = lambda xs, aux: plain_ce(xs[0], aux[0]) + plain_ce(xs[1], aux[1])
    args = ((lt, ls), (ids_t, ids_s))
  elif name == "ntp":
    fn = lambda x, aux: ntp.next_token_loss(x, aux).mean()
    args = (ls, ids_s)
  elif name.startswith("alm"):
    config = alm_lib.ALMConfig(
        divergence="tv" if name == "alm_tv" else "kl",
        constraint="boundary_prob" if name == "alm_boundary_prob"
        else "unconstrained")

    def fn(x, aux):
      lt_, ids_t_, ids_s_, cid_, mask_t_, mask_s_ = aux
      teacher = alm_lib.Side(lt_, ids_t_, cid_, boundary_mask=mask_t_)
      student = alm_lib.Side(x, ids_s_, cid_, boundary_mask=mask_s_)
      return alm_lib.alm_loss(teacher, student, config).mean()

    args = (ls, (lt, ids_t, ids_s, cid, mask_t, mask_s))
  elif name == "uld" or name.startswith("uld_"):
    kw = {}
    if name == "uld_exact":
      kw["top_k"] = None
    elif name.startswith("uld_top"):
      kw["top_k"] = int(name[len("uld_top"):])
    elif name != "uld":
      raise ValueError(name)
    fn = lambda x, aux: baselines.uld_loss(aux[0], aux[1], None, x, aux[2],
                                           None, **kw).mean()
    args = (ls, (lt, ids_t, ids_s))
  elif name == "mined":
    fn = lambda x, aux: baselines.mined_loss(aux[0], aux[1], aux[3], x,
                                             aux[2], aux[3], aux[4]).mean()
    args = (ls, (lt, ids_t, ids_s, cid, vmap_))
  else:
    raise ValueError(name)
  jax.block_until_ready(args)
  rss_before = _vm_rss_gib()
  maxrss_before = _max_rss_gib()
  step = jax.jit(jax.value_and_grad(fn))
  compiled = step.lower(*args).compile()
  mem = compiled.memory_analysis()
  temp = getattr(mem, "temp_size_in_bytes", None)
  out = compiled(*args)
  jax.block_until_ready(out)
  del out
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    res = compiled(*args)
    jax.block_until_ready(res)
    times.append(time.perf_counter() - t0)
    value = float(res[0])
    del res
  maxrss = _max_rss_gib()
  gib = lambda n: None if n is None else n / 2**30
  return dict(loss=name, time_s=float(np.median(times)), maxrss_gib=maxrss,
              rss_before_gib=rss_before, maxrss_before_gib=maxrss_before,
              step_rss_gib=maxrss - rss_before, xla_temp_gib=gib(temp),
              xla_out_gib=gib(getattr(mem, "output_size_in_bytes", None)),
              gen_temp_gib=gib(gen_temp), value=value)


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
  p.add_argument("--table-from", default=None,
                 help="print the table of a previous run's JSON lines")
  a = p.parse_args()
  if a.table_from:
    rows = []
    with open(a.table_from) as f:
      for line in f:
        if line.startswith("{"):
          rows.append(json.loads(line))
        elif ": FAILED (exit code " in line or ": no result within" in line:
          name, why = line.strip().split(": ", 1)
          why = why.replace("FAILED (", "failed, ").rstrip(")")
          rows.append(dict(loss=f"{name} ({why})"))
    _print_table(rows)
    return
  if a.one:
    print(json.dumps(_run_one(a.one, a.batch, a.seq, a.teacher_vocab,
                              a.student_vocab, a.dtype, a.repeats)))
    return
  load0 = os.getloadavg()
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
      rows.append(dict(loss=f"{name} (> {a.timeout} s, not measured)"))
      continue
    if proc.returncode != 0:
      # A negative code is a signal: -9 is usually the kernel's OOM killer.
      print(f"{name}: FAILED (exit code {proc.returncode})\n"
            f"{proc.stderr[-2000:]}", file=sys.stderr)
      rows.append(dict(loss=f"{name} (failed, exit code {proc.returncode})"))
      continue
    rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(json.dumps(rows[-1]), file=sys.stderr)
  load = os.getloadavg()
  print(f"B={a.batch} T={a.seq} V_T={a.teacher_vocab} V_S={a.student_vocab} "
        f"logits {a.dtype}; value+grad w.r.t. the logits, median of "
        f"{a.repeats}; {os.cpu_count()} CPUs, load average (1 / 5 / 15 min) "
        f"at the start {load0[0]:.1f} / {load0[1]:.1f} / {load0[2]:.1f}, at "
        f"the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}")
  _print_table(rows)


def _print_table(rows):
  """Markdown table of the rows; ratios are to ce_both (or, if it has no
  result, to ce_teacher + ce_student for time and to the larger of their
  peaks for memory, a lower bound on ce_both's peak)."""
  by_name = {r["loss"]: r for r in rows if "time_s" in r}
  if "ce_both" in by_name:
    base = "ce_both"
    ce_time = by_name["ce_both"]["time_s"]
    ce_rss = by_name["ce_both"]["maxrss_gib"]
  elif "ce_teacher" in by_name and "ce_student" in by_name:
    base = "ce_teacher + ce_student (time), max of their peaks (memory)"
    ce_time = by_name["ce_teacher"]["time_s"] + by_name["ce_student"]["time_s"]
    ce_rss = max(by_name["ce_teacher"]["maxrss_gib"],
                 by_name["ce_student"]["maxrss_gib"])
  else:
    base = ce_time = ce_rss = None
  print("| loss | time (s) | peak RSS (GiB) | RSS before step (GiB) | "
        "step's RSS increase (GiB) | XLA temp (GiB) |")
  print("|---|---|---|---|---|---|")
  fmt = lambda x: "-" if x is None else f"{x:.2f}"
  for r in rows:
    if "time_s" not in r:
      print(f"| {r['loss']} | - | - | - | - | - |")
      continue
    time_s, peak = f"{r['time_s']:.2f}", fmt(r["maxrss_gib"])
    if base and r["loss"].startswith(("alm", "uld", "mined", "ntp")):
      time_s += f" ({r['time_s'] / ce_time:.2f}x)"
      peak += f" ({r['maxrss_gib'] / ce_rss:.2f}x)"
    print(f"| {r['loss']} | {time_s} | {peak} | {fmt(r['rss_before_gib'])} | "
          f"{fmt(r['step_rss_gib'])} | {fmt(r['xla_temp_gib'])} |")
  gen = next((r["gen_temp_gib"] for r in rows if "gen_temp_gib" in r), None)
  print(f"(ratios to {base}; logits generator's XLA temp: {fmt(gen)} GiB)")
  if "uld_exact" in by_name:
    exact = by_name["uld_exact"]
    print("ULD time / uld_exact's (value: relative difference to uld_exact's):")
    for r in rows:
      if r["loss"].startswith("uld") and r["loss"] in by_name:
        rel = (r["value"] - exact["value"]) / exact["value"]
        print(f"  {r['loss']}: {r['time_s'] / exact['time_s']:.3f}x "
              f"(value {rel:+.1e})")


if __name__ == "__main__":
  main()
