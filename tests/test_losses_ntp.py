"""Next-token loss and ALM + lambda * NTP against float64 references."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import losses_reference as ref
from alm.losses import ntp


def test_next_token_loss_and_grad_match_reference():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 6, 7)).astype(np.float32) * 3
  ids = rng.integers(0, 7, (2, 6)).astype(np.int32)
  lm = rng.random((2, 6)) < 0.7
  f = jax.jit(lambda x: ntp.next_token_loss(x, jnp.asarray(ids), jnp.asarray(lm)).mean())
  loss, grad = jax.value_and_grad(f)(jnp.asarray(x))
  r_loss, r_grad = ref.ntp(x, ids, lm)
  np.testing.assert_allclose(loss, r_loss, rtol=1e-5)
  np.testing.assert_allclose(grad, r_grad, rtol=1e-4, atol=1e-7)
  # Matches optax-style plain cross-entropy too.
  lp = jax.nn.log_softmax(jnp.asarray(x[:, :-1], jnp.float32))
  plain = -jnp.take_along_axis(lp, jnp.asarray(ids[:, 1:, None]), -1)[..., 0]
  np.testing.assert_allclose(loss, (plain * lm[:, 1:]).sum() / lm[:, 1:].sum(), rtol=1e-5)


def test_bf16_gradient_is_bf16_and_finite():
  x = jnp.asarray(np.random.default_rng(1).normal(size=(1, 5, 9)) * 50, jnp.bfloat16)
  ids = jnp.arange(5)[None] % 9
  g = jax.jit(jax.grad(lambda x: ntp.next_token_loss(x, ids).mean()))(x)
  assert g.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(g)))


def test_combined_mean_uses_each_losses_own_count():
  a = ntp.LossSum(jnp.float32(6.0), jnp.float32(3.0))
  b = ntp.LossSum(jnp.float32(10.0), jnp.float32(5.0))
  assert float(ntp.combined_mean({"alm": a, "ntp": b}, {"alm": 1.0, "ntp": 0.5})) == 3.0
  got = ntp.combined_mean({"alm": a}, {"alm": 1.0}, {"alm": jnp.float32(6.0)})
  assert float(got) == 1.0


def test_without_loss_mask_every_predicted_token_of_every_row_counts():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(3, 5, 6)).astype(np.float32)
  ids = rng.integers(0, 6, (3, 5)).astype(np.int32)
  out = jax.jit(ntp.next_token_loss)(jnp.asarray(x), jnp.asarray(ids))
  assert int(out.count) == 3 * 4
  np.testing.assert_allclose(out.mean(), ref.ntp(x, ids)[0], rtol=1e-5)
