"""Hidden-state loss against a float64 numpy reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from alm.losses import hidden


def test_hidden_loss_matches_reference_and_identity_is_zero():
  rng = np.random.default_rng(0)
  ht = [rng.normal(size=(2, 6, 4)).astype(np.float32) for _ in range(2)]
  hs = [rng.normal(size=(2, 5, 3)).astype(np.float32) for _ in range(2)]
  ct = np.array([[0, 1, 1, 2, -1, -1], [0, 0, 1, 2, 3, 3]], np.int32)
  cs = np.array([[0, 1, 2, 2, -1], [0, 1, 2, 3, 3]], np.int32)
  proj = hidden.HiddenProjector(3, 4, rngs=nnx.Rngs(0))
  out = jax.jit(lambda a, b: hidden.hidden_state_loss(
      a, b, jnp.asarray(ct), jnp.asarray(cs), proj))(
          [jnp.asarray(h) for h in ht], [jnp.asarray(h) for h in hs])
  w = np.asarray(proj.kernel[...], np.float64)
  ends = []  # (row, teacher last, student last) of valid chunks
  for i in range(2):
    for c in range(4):
      tp, sp = np.flatnonzero(ct[i] == c), np.flatnonzero(cs[i] == c)
      if len(tp) and len(sp) and tp[0] > 0 and sp[0] > 0:
        ends.append((i, tp[-1], sp[-1]))
  total = 0.0
  for t_l, s_l in zip(ht, hs):
    et = np.array([t_l[i, a] for i, a, _ in ends], np.float64)
    es = np.array([s_l[i, b] for i, _, b in ends], np.float64) @ w
    ms = (et**2).mean(0)
    # docs/method.md §6: the squared norm over channels, each channel divided by
    # the teacher's mean square (a sum over channels, not a mean).
    total += ((et - es) ** 2 / ms).sum(-1).sum()
  assert int(out.count) == len(ends) == 5
  np.testing.assert_allclose(out.total, total / 2, rtol=1e-5)
  # Same states, identity projector: exactly 0.
  ident = hidden.HiddenProjector(4, 4, rngs=nnx.Rngs(0))
  same = jax.jit(lambda h: hidden.hidden_state_loss(
      [h], [h], jnp.asarray(ct), jnp.asarray(ct), ident))(jnp.asarray(ht[0]))
  assert float(same.total) == 0.0


def test_hidden_loss_of_a_zero_student_is_the_teacher_width():
  # sum_d mean_c(h_T[c, d]^2) / ms[d] = D_T exactly when ms is this batch's.
  rng = np.random.default_rng(1)
  ht = jnp.asarray(rng.normal(size=(2, 6, 5)) * rng.uniform(0.1, 10, 5),
                   jnp.float32)
  ct = jnp.asarray(np.tile(np.arange(6, dtype=np.int32), (2, 1)))
  out = hidden.hidden_state_loss(
      [ht], [jnp.zeros_like(ht)], ct, ct,
      hidden.HiddenProjector(5, 5, rngs=nnx.Rngs(0)))
  np.testing.assert_allclose(out.mean(), 5.0, rtol=1e-5)
