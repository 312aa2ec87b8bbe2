"""GradMag against a float64 numpy reference on a tiny model."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from alm.losses import gradmag


def test_gradmag_matches_reference_and_runs_teacher_once():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(5, 3))
  a0, b0 = rng.normal(size=(3, 2)), rng.normal(size=(2,))
  teacher_calls = []

  def teacher(x):
    teacher_calls.append(1)
    return jnp.tanh(x @ jnp.ones((3, 2)))

  def step(params):
    t = teacher(jnp.asarray(x, jnp.float32))  # once per step, outside losses
    def loss_fn(p):
      h = jnp.asarray(x, jnp.float32) @ p["a"] + p["b"]
      return {"l2": jnp.sum((h - t) ** 2), "lin": jnp.sum(h * 3.0)}
    return gradmag.gradmag_value_and_grad(
        loss_fn, params, lambda path, leaf: path[0].key == "a")

  params = {"a": jnp.asarray(a0, jnp.float32), "b": jnp.asarray(b0, jnp.float32)}
  total, grads, info = jax.jit(step)(params)
  assert len(teacher_calls) == 1
  t = np.tanh(x @ np.ones((3, 2)))
  h = x @ a0 + b0
  l = {"l2": np.sum((h - t) ** 2), "lin": np.sum(3 * h)}
  ga = {"l2": 2 * x.T @ (h - t), "lin": x.T @ np.full_like(h, 3.0)}
  gb = {"l2": 2 * (h - t).sum(0), "lin": np.full(2, 15.0)}
  w = {k: 1 / np.linalg.norm(ga[k]) for k in l}
  s = sum(w.values())
  np.testing.assert_allclose(total, sum(w[k] * l[k] for k in l) / s, rtol=1e-5)
  np.testing.assert_allclose(grads["a"], sum(w[k] * ga[k] for k in l) / s, rtol=1e-5)
  np.testing.assert_allclose(grads["b"], sum(w[k] * gb[k] for k in l) / s, rtol=1e-5)
  np.testing.assert_allclose(info.weights["l2"], w["l2"] / s, rtol=1e-5)
