"""DSKD (cross-model attention) against a float64 numpy reference."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import losses_reference as ref
from alm.losses import dskd

DS, DT, VS, VT = 3, 4, 6, 7


def make_side(rng, b, t, v, d, lm_p):
  emb = rng.normal(size=(v, d))
  hid = rng.normal(size=(b, t, d))
  return dict(logits=rng.normal(size=(b, t, v)) * 2, hidden=hid,
              ids=rng.integers(0, v, (b, t)).astype(np.int32), embedding=emb,
              unembedding=rng.normal(size=(d, v)),
              loss_mask=rng.random((b, t)) < lm_p)


def to_side(d, dtype=jnp.float64):
  return dskd.DSKDSide(**{k: jnp.asarray(v, dtype) if v.dtype.kind == "f"
                          else jnp.asarray(v) for k, v in d.items()})


def params_of(proj):
  g = lambda m: (np.asarray(m.kernel[...], np.float64),
                 np.asarray(m.bias[...], np.float64))
  (qw, qb), (sw, sb), (tw, tb) = g(proj.query), g(proj.s2t), g(proj.t2s)
  return dict(q_w=qw, q_b=qb, s2t_w=sw, s2t_b=sb, t2s_w=tw, t2s_b=tb)


@pytest.fixture(scope="module")
def case():
  rng = np.random.default_rng(0)
  teacher = make_side(rng, 2, 6, VT, DT, 0.8)
  student = make_side(rng, 2, 5, VS, DS, 0.8)
  return teacher, student


def test_dskd_value_and_gradients_match_float64_reference(case):
  teacher, student = case
  with jax.enable_x64(True):
    proj = dskd.DSKDProjector(DS, DT, rngs=nnx.Rngs(0),
                              param_dtype=jnp.float64)
    # Biases are zero-initialised: make them random so they are tested too.
    rng = np.random.default_rng(1)
    for m in (proj.query, proj.s2t, proj.t2s):
      m.bias[...] = jnp.asarray(rng.normal(size=m.bias.shape) * 0.3)
      m.kernel[...] = m.kernel[...] * 2.0
    graph, state = nnx.split(proj)
    t = to_side(teacher)

    @jax.jit
    def f(state, logits, hidden):
      s = dskd.DSKDSide(logits, hidden, jnp.asarray(student["ids"]),
                        jnp.asarray(student["embedding"]),
                        jnp.asarray(student["unembedding"]),
                        jnp.asarray(student["loss_mask"]))
      out = dskd.dskd_loss(t, s, nnx.merge(graph, state), temperature=1.5)
      return out.total, out

    args = (state, jnp.asarray(student["logits"]), jnp.asarray(student["hidden"]))
    (total, out), grads = jax.value_and_grad(f, argnums=(0, 1, 2),
                                             has_aux=True)(*args)
    params = params_of(proj)
    r_total, r_count = ref.dskd(teacher, student, params, temperature=1.5)
    assert int(out.count) == r_count > 4
    np.testing.assert_allclose(total, r_total, rtol=1e-10)
    # The KL term masked by "t2s predicts the target" is active somewhere.
    assert float(ref.dskd(teacher, student, params, 1.5)[0]) != float(
        ref.dskd(teacher, dict(student, logits=student["logits"] * 0), params,
                 1.5)[0])
    # Gradient reference: central differences of the float64 reference, on
    # every coordinate of the student logits, hidden states and projector.
    g_state, g_logits, g_hidden = grads
    flat = {("logits",): (student["logits"], np.asarray(g_logits)),
            ("hidden",): (student["hidden"], np.asarray(g_hidden))}
    names = {"q_w": ("query", "kernel"), "q_b": ("query", "bias"),
             "s2t_w": ("s2t", "kernel"), "s2t_b": ("s2t", "bias"),
             "t2s_w": ("t2s", "kernel"), "t2s_b": ("t2s", "bias")}
    for key, (mod, leaf) in names.items():
      flat[(key,)] = (params[key], np.asarray(g_state[mod][leaf][...]))
    h = 1e-6
    for (key,), (x0, g) in flat.items():
      fd = np.zeros_like(x0, np.float64)
      for idx in np.ndindex(x0.shape):
        vals = []
        for sgn in (1, -1):
          x = np.array(x0, np.float64)
          x[idx] += sgn * h
          if key in ("logits", "hidden"):
            vals.append(ref.dskd(teacher, dict(student, **{key: x}), params,
                                 1.5)[0])
          else:
            vals.append(ref.dskd(teacher, student, dict(params, **{key: x}),
                                 1.5, kd_params=params)[0])
        fd[idx] = (vals[0] - vals[1]) / (2 * h)
      np.testing.assert_allclose(g, fd, rtol=1e-5, atol=1e-7, err_msg=key)


def test_dskd_padding_changes_nothing_and_float32_runs(case):
  teacher, student = case
  proj = dskd.DSKDProjector(DS, DT, rngs=nnx.Rngs(0))
  f = jax.jit(lambda t, s: dskd.dskd_loss(t, s, proj))
  base = f(to_side(teacher, jnp.float32), to_side(student, jnp.float32))

  def pad(side, n):
    out = {}
    for k, v in side.items():
      if k in ("embedding", "unembedding"):
        out[k] = v
      else:
        out[k] = np.pad(v, [(0, 0), (0, n)] + [(0, 0)] * (v.ndim - 2))
    return out

  padded = f(to_side(pad(teacher, 2), jnp.float32),
             to_side(pad(student, 3), jnp.float32))
  assert float(base.count) == float(padded.count) > 0
  np.testing.assert_allclose(padded.total, base.total, rtol=1e-5)
  assert np.isfinite(float(base.total)) and float(base.total) > 0


def test_dskd_bad_shapes_raise_clear_errors(case):
  teacher, student = case
  proj = dskd.DSKDProjector(DS, DT, rngs=nnx.Rngs(0))
  bad = dict(student, unembedding=student["unembedding"].T)
  with pytest.raises(ValueError, match="unembedding"):
    dskd.dskd_loss(to_side(teacher, jnp.float32), to_side(bad, jnp.float32), proj)
  with pytest.raises(ValueError, match="temperature"):
    dskd.dskd_loss(to_side(teacher, jnp.float32), to_side(student, jnp.float32),
                   proj, temperature=0.0)


def test_dskd_whole_batch_scales_make_micro_batches_add_up(case):
  # Split a batch in two: with the std's of the whole batch (merged moments),
  # the two halves' losses add up to the whole batch's loss exactly; with
  # each half's own std's they do not.
  teacher, student = case
  with jax.enable_x64(True):
    proj = dskd.DSKDProjector(DS, DT, rngs=nnx.Rngs(0), param_dtype=jnp.float64)
    t, s = to_side(teacher), to_side(student)
    def rows(side, i):
      return dataclasses.replace(side, **{k: getattr(side, k)[i:i + 1] for k in (
          "logits", "hidden", "ids", "loss_mask")})

    mom = [dskd.teacher_moments(t.ids[i:i + 1], t.hidden[i:i + 1], t.embedding,
                                t.loss_mask[i:i + 1]) for i in range(2)]
    merged = dskd.merge_moments(mom[0], mom[1])
    whole = dskd.teacher_moments(t.ids, t.hidden, t.embedding, t.loss_mask)
    np.testing.assert_allclose(merged, whole, rtol=1e-12)
    scales = dskd.scales_from_moments(merged)
    full = dskd.dskd_loss(t, s, proj)
    np.testing.assert_allclose(
        dskd.dskd_loss(t, s, proj, scales=scales).total, full.total, rtol=1e-12)
    halves = [dskd.dskd_loss(rows(t, i), rows(s, i), proj, scales=scales) for i in range(2)]
    np.testing.assert_allclose(sum(h.total for h in halves), full.total, rtol=1e-12)
    assert sum(float(h.count) for h in halves) == float(full.count)
    own = [dskd.dskd_loss(rows(t, i), rows(s, i), proj) for i in range(2)]
    assert abs(float(sum(h.total for h in own)) - float(full.total)) > 1e-6
