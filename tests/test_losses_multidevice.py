"""ALM loss and gradients over 8 CPU devices equal the one-device values."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

SCRIPT = textwrap.dedent("""
  import sys
  sys.path.insert(0, {tests!r})
  import jax, jax.numpy as jnp, numpy as np
  from jax.sharding import NamedSharding, PartitionSpec as P
  from alm.losses import alm as alm_lib
  from alm.losses import reduce as reduce_lib
  from test_losses_alm import random_batch, to_side
  assert jax.device_count() == 8, jax.devices()
  teacher, student, bias = random_batch(11, b=8, tt=14, ts=13)
  t, s = to_side(teacher), to_side(student)
  config = alm_lib.ALMConfig(tau=5.0, constraint="boundary_prob", gamma=0.35)

  def mean_loss(logits, t, s):
    s2 = alm_lib.Side(logits, s.ids, s.chunk_ids, s.loss_mask, s.boundary_mask)
    return alm_lib.alm_loss(t, s2, config).mean()

  ref_loss, ref_grad = jax.jit(jax.value_and_grad(mean_loss))(s.logits, t, s)

  mesh = jax.make_mesh((8,), ("data",))
  def spec(side):
    return alm_lib.Side(P("data"), P("data"), P("data"), P("data"), P())

  def shard_loss(logits, t, s):
    s2 = alm_lib.Side(logits, s.ids, s.chunk_ids, s.loss_mask, s.boundary_mask)
    return reduce_lib.global_mean(alm_lib.alm_loss(t, s2, config), "data")

  put = lambda side: jax.tree.map(
      lambda a: jax.device_put(a, NamedSharding(mesh, P("data") if a.ndim > 1
                                                 else P())), side)
  ts, ss = put(t), put(s)
  sm = jax.shard_map(shard_loss, mesh=mesh,
                     in_specs=(P("data"), spec(t), spec(s)), out_specs=P())
  loss, grad = jax.jit(jax.value_and_grad(sm))(ss.logits, ts, ss)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  np.testing.assert_allclose(grad, ref_grad, rtol=1e-5, atol=1e-10)

  # Plain jit on batch-sharded inputs (GSPMD): the mean is already global.
  assert len(ss.logits.sharding.device_set) == 8
  loss2, grad2 = jax.jit(jax.value_and_grad(mean_loss))(ss.logits, ts, ss)
  np.testing.assert_allclose(loss2, ref_loss, rtol=1e-6)
  np.testing.assert_allclose(grad2, ref_grad, rtol=1e-5, atol=1e-10)
  print("OK", float(ref_loss), float(loss), float(loss2))
""")


def test_eight_cpu_devices_shard_map_and_sharded_jit():
  tests = str(Path(__file__).parent)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", SCRIPT.format(tests=tests)],
                        env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
  assert "OK" in proc.stdout
