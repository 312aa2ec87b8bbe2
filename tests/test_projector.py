"""The embedding projector is exactly the identity at step 0, and trainable after."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from alm.hypernet.projector import EmbeddingProjector, ProjectorConfig


def test_identity_at_init_and_per_token():
  p = EmbeddingProjector(24, ProjectorConfig(num_layers=2, num_heads=4), rngs=nnx.Rngs(0))
  x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 5, 24)), jnp.float32)
  fwd = nnx.jit(lambda m, v: m(v))
  np.testing.assert_array_equal(np.asarray(fwd(p, x)), np.asarray(x))
  # After a change to the last layer, tokens are still mapped independently.
  p.out.kernel.set_value(jnp.asarray(np.random.default_rng(1).normal(size=(24, 24)) * 0.1,
                                     jnp.float32))
  y = np.asarray(fwd(p, x))
  assert not np.allclose(y, np.asarray(x))
  np.testing.assert_allclose(np.asarray(fwd(p, x[1:2, 2:3])), y[1:2, 2:3], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(fwd(p, x.reshape(15, 24))), y.reshape(15, 24), rtol=1e-5,
                             atol=1e-6)


def test_gradients_reach_every_layer_after_a_step():
  p = EmbeddingProjector(12, ProjectorConfig(num_layers=1, num_heads=3), rngs=nnx.Rngs(0))
  x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 12)), jnp.float32)
  target = x + 1.0
  loss = lambda m: jnp.mean((m(x) - target) ** 2)
  grad = nnx.jit(nnx.grad(loss))
  g = grad(p)
  assert float(jnp.abs(g.out.kernel[...]).max()) > 0  # the zero layer learns first
  p.out.kernel.set_value(p.out.kernel[...] - 0.1 * g.out.kernel[...])
  g2 = grad(p)
  assert float(jnp.abs(g2.blocks[0].up.kernel[...]).max()) > 0


def test_bad_heads():
  with pytest.raises(ValueError, match="must divide the embedding width 10"):
    EmbeddingProjector(10, ProjectorConfig(num_heads=3), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="num_layers must be >= 1"):
    ProjectorConfig(num_layers=0)
