"""ALM divergence at its edges: precision near 0, guards, -inf, tau, gamma.

The reference is `losses_reference.divergence_exact` (stdlib `decimal` at 80
digits, on the exact values of the floats the loss saw), whose gradient is
itself checked here by finite differences in `decimal`.
"""

from __future__ import annotations

import functools
import itertools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import losses_reference as ref
from alm.losses import alm as alm_lib
from alm.losses import chunks as chunks_lib
from alm.tokenization import alignment
from alm.tokenization.base import Encoding
from alm.training.config import TrainConfig, TrainConfigError

DIVERGENCES = ("kl", "reverse_kl", "tv")

# |L / tau| from 1e-9 to 80 (the float32 floor is at 87.3), around log 2
# (where 1 - a crosses 1/2), plus near-equal pairs (second-order regime).
MAGS = (1e-9, 3e-9, 1e-8, 3e-8, 1e-7, 3e-7, 1e-6, 3e-6, 1e-5, 1e-4, 1e-3,
        1e-2, 0.1, 0.5, 0.69, 0.7, 1.0, 2.0, 5.0, 20.0, 80.0)


def grid(dtype):
  pairs = [(-u, -v) for u, v in itertools.product(MAGS, MAGS)]
  for v, e in itertools.product(MAGS, (1e-2, 1e-4, 1e-6)):
    pairs += [(-v, -v * (1 + e)), (-v * (1 + e), -v)]
  la, lb = np.array(pairs, dtype).T
  return la, lb


@functools.partial(jax.jit, static_argnames="div")
def _d_and_grads(la, lb, div):
  f = lambda a, b: alm_lib.binarised_divergence(a, b, div).sum()
  return (alm_lib.binarised_divergence(la, lb, div),
          *jax.grad(f, argnums=(0, 1))(la, lb))


def _rel_err(got, want, dtype):
  """Relative error; results under the dtype's normal range (float32 flushes
  them to 0) may be off by that smallest normal number."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  err = np.maximum(np.abs(got - want) - np.finfo(dtype).tiny, 0.0)
  err = err / np.maximum(np.abs(want), 1e-300)
  return np.where(want == 0, np.where(got == 0, 0.0, np.inf), err)


def _check_against_exact(dtype, bound, min_mag):
  la, lb = grid(dtype)
  out = [np.asarray(o, np.float64) for div in DIVERGENCES
         for o in _d_and_grads(jnp.asarray(la), jnp.asarray(lb), div)]
  worst = {}
  for k, div in enumerate(DIVERGENCES):
    want = np.array([ref.divergence_exact(a, b, div) for a, b in zip(la, lb)])
    sel = (np.abs(la) >= min_mag) & (np.abs(lb) >= min_mag)
    for j, name in enumerate(("D", "dD/dla", "dD/dlb")):
      err = _rel_err(out[3 * k + j], want[:, j], dtype)[sel]
      i = int(np.argmax(err))
      worst[div, name] = (err[i], la[sel][i], lb[sel][i])
  bad = {k: v for k, v in worst.items() if not v[0] <= bound}
  assert not bad, bad
  return worst


def test_reference_gradient_matches_decimal_finite_differences():
  pts = [(-1e-9, -3e-9), (-1e-8, -1e-5), (-0.7, -0.69), (-5.0, -1e-6),
         (-80.0, -1e-9), (-1e-6, -1e-6 * (1 + 1e-6)), (-2.0, -0.1)]
  for (la, lb), div in itertools.product(pts, DIVERGENCES):
    _, da, db = ref.divergence_exact(la, lb, div)
    fa, fb = ref.divergence_fd(la, lb, div)
    np.testing.assert_allclose([da, db], [fa, fb], rtol=1e-12, atol=0,
                               err_msg=f"{div} {la} {lb}")


def test_float64_value_and_gradient_within_1e6_of_exact_everywhere():
  with jax.enable_x64(True):
    worst = _check_against_exact(np.float64, 1e-6, 0.0)
  print("float64 worst relative errors", worst)


def test_float32_value_and_gradient_within_1e2_of_exact():
  # Promised wherever |L / tau| >= 1e-7 on both sides; in fact everywhere on
  # the grid (down to 1e-9), since no form differences two numbers near 1.
  worst = _check_against_exact(np.float32, 1e-2, 0.0)
  print("float32 worst relative errors", worst)


def test_identical_likelihoods_give_exactly_zero_for_every_divergence():
  ls = [0.0, -0.0, -1e-45, -1e-38, -1e-30, -1e-12, -1e-7, -0.5, -0.6931,
        -0.7, -3.0, -87.0, -88.0, -200.0, -1e30, -np.inf]
  for dtype in (np.float32, np.float64):
    with jax.enable_x64(dtype == np.float64):
      x = jnp.asarray(np.array(ls, dtype))
      for div in DIVERGENCES:
        d, ga, gb = map(np.asarray, _d_and_grads(x, x, div))
        assert not np.any(d) and not np.any(ga) and not np.any(gb), (
            dtype, div, d, ga, gb)


def test_guards_never_cut_the_gradient_and_keep_it_finite():
  # A near-certain student on a chunk the teacher finds unlikely.
  la = jnp.asarray([-100.0, -100.0, -3.0, -1e-9], jnp.float32)
  lb = jnp.asarray([-1e-8, 0.0, 0.0, 0.0], jnp.float32)
  for div in DIVERGENCES:
    d, _, gb = map(np.asarray, _d_and_grads(la, lb, div))
    want = [ref.divergence_exact(ref.guard(a), ref.guard(b), div)
            for a, b in zip(np.asarray(la), np.asarray(lb))]
    np.testing.assert_allclose(d, [w[0] for w in want], rtol=1e-4,
                               err_msg=div)
    np.testing.assert_allclose(gb, [w[2] for w in want], rtol=1e-4,
                               err_msg=div)
    assert np.all(gb != 0), (div, gb)
    # A million such chunks still square-sum finitely in a float32 global norm.
    assert np.isfinite(np.float32(np.sum(np.float32(gb) ** 2) * 1e6)), div
  _, _, gb = _d_and_grads(la, lb, "kl")
  assert float(gb[0]) > 9e7  # (b - a) / (1 - b) ~ 1 / 1e-8


def one_chunk_sides(student_target_logit, teacher_target_logit=0.0,
                    teacher_boundary_logit=0.0, v=4):
  """Two rows of 3 tokens; chunks 1 and 2 valid, the first one tunable."""
  ids = np.array([[0, 1, 2], [0, 2, 1]], np.int32)
  cids = np.tile(np.arange(3, dtype=np.int32), (2, 1))
  rng = np.random.default_rng(0)
  logits_s = rng.normal(size=(2, 3, v)).astype(np.float32)
  logits_t = rng.normal(size=(2, 3, v)).astype(np.float32)
  logits_s[0, 0] = 0.0
  logits_s[0, 0, 1] = student_target_logit
  logits_t[0, 0, 1] = teacher_target_logit
  mask = np.array([True, False, True, False])
  logits_t[0, 1, mask] = teacher_boundary_logit  # read at chunk 1's end
  side = lambda x: alm_lib.Side(jnp.asarray(x), jnp.asarray(ids),
                                jnp.asarray(cids),
                                boundary_mask=jnp.asarray(mask))
  return side(logits_t), side(logits_s)


@functools.partial(jax.jit, static_argnames="config")
def _loss_grad(teacher, student, config):
  def f(x):
    s = alm_lib.Side(x, student.ids, student.chunk_ids,
                     boundary_mask=student.boundary_mask)
    return alm_lib.alm_loss(teacher, s, config).mean()
  return jax.value_and_grad(f)(student.logits)


def test_near_certain_student_gets_the_formula_gradient_end_to_end():
  tau = 100.0
  for margin, name in ((14.9, "L_S/tau ~ -1e-8"), (40.0, "L_S == 0")):
    teacher, student = one_chunk_sides(margin, teacher_target_logit=-1e4)
    config = alm_lib.ALMConfig(tau=tau, debias=False)
    ch = alm_lib.aligned_chunk_logprobs(teacher, student, config)
    la = float(ch.teacher[0, 1]) / tau
    lb = float(ch.student[0, 1]) / tau
    assert -1e-7 < lb <= 0.0, lb
    _, grad = _loss_grad(teacher, student, config)
    g = np.asarray(grad, np.float64)[0, 0]
    # d loss / d logits = r / (tau * count) * (onehot - softmax), r = dD/dlb.
    r = ref.divergence_exact(ref.guard(la), ref.guard(lb), "kl")[2]
    p = ref.softmax(np.asarray(student.logits, np.float64)[0, 0])
    count = int(np.sum(np.asarray(ch.valid)))
    want = r / (tau * count) * -p
    others = [0, 2, 3]  # 1 - p_target itself rounds in float32
    np.testing.assert_allclose(g[others], want[others], rtol=2e-2, err_msg=name)
    assert np.all(np.isfinite(g)) and np.all(g[others] < 0), name


@pytest.mark.parametrize("where", ["target", "boundary", "student_target"])
def test_minus_inf_logits_give_a_finite_defined_loss(where):
  kw = dict(target=dict(teacher_target_logit=-np.inf),
            boundary=dict(teacher_boundary_logit=-np.inf),
            student_target=dict())[where]
  teacher, student = one_chunk_sides(1.0, **kw)
  if where == "student_target":
    x = np.array(student.logits)
    x[0, 0, 1] = -np.inf
    student = alm_lib.Side(jnp.asarray(x), student.ids, student.chunk_ids,
                           boundary_mask=student.boundary_mask)
  for div in DIVERGENCES:
    config = alm_lib.ALMConfig(divergence=div, tau=1.0)
    loss, grad = _loss_grad(teacher, student, config)
    assert np.isfinite(float(loss)) and np.all(np.isfinite(grad)), (div, loss)
    # The defined value: the chunk log-prob floored at LOG_PROB_FLOOR.
    ch = alm_lib.aligned_chunk_logprobs(teacher, student, config)
    lt = np.asarray(ch.teacher, np.float64)
    ls = np.asarray(ch.student, np.float64)
    assert np.isneginf(lt[0, 1] if where != "student_target" else ls[0, 1])
    valid = np.asarray(ch.valid)
    assert valid.sum() == 4
    want = np.mean([ref.divergence_exact(ref.guard(lt[i, c]),
                                         ref.guard(ls[i, c]), div)[0]
                    for i, c in zip(*np.nonzero(valid))])
    np.testing.assert_allclose(float(loss), want, rtol=1e-4, err_msg=div)


def test_tau_too_small_is_refused_and_underflow_warns():
  with pytest.raises(ValueError, match=r"tau=0\.001.*underflow"):
    alm_lib.ALMConfig(tau=1e-3)
  # The training config refuses it too, before JAX is imported, at the same bound.
  from alm.training.config import MIN_TAU, TrainConfig, TrainConfigError
  assert MIN_TAU == pytest.approx(alm_lib.MIN_TAU, rel=1e-12)
  with pytest.raises(TrainConfigError, match=r"tau=0\.001.*underflow"):
    TrainConfig.build(tau=1e-3)
  teacher, student = one_chunk_sides(1.0)
  # Allowed, but every chunk here is below e^-87 on both sides: the loss
  # would silently be 0; a real training run must hear about it.
  config = alm_lib.ALMConfig(tau=0.0081)
  with pytest.warns(UserWarning, match=r"tau=0\.0081"):
    loss, _ = _loss_grad(teacher, student, config)
    jax.effects_barrier()
  # A sane tau does not warn.
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    _loss_grad(teacher, student, alm_lib.ALMConfig(tau=1.0))
    jax.effects_barrier()


def _enc(pieces):
  ends = np.cumsum([len(p) for p in pieces]).astype(np.int32)
  starts = ends - np.array([len(p) for p in pieces], np.int32)
  return Encoding(np.arange(len(pieces), dtype=np.int32) + 300, starts, ends,
                  np.zeros(len(pieces), bool), b"".join(pieces))


@pytest.mark.parametrize("gamma", [0.0, 1.0, 1.5, float("nan"), -0.1])
def test_gamma_must_be_a_probability_everywhere(gamma):
  with pytest.raises(ValueError, match=r"gamma.*\(0, 1\)"):
    alm_lib.ALMConfig(gamma=gamma)
  with pytest.raises(TrainConfigError, match=r"gamma.*\(0, 1\)"):
    TrainConfig.build(gamma=gamma)
  t, s = _enc([b"ab", b"c"]), _enc([b"a", b"bc"])
  with pytest.raises(ValueError, match=r"gamma.*\(0, 1\)"):
    alignment.align(t, s, gamma=gamma)
  with pytest.raises(ValueError, match=r"gamma.*\(0, 1\)"):
    alignment.align_batch([(t, s)], pad_to=(4, 4), gamma=gamma)


@pytest.mark.parametrize("with_mask", [False, True])
def test_near_certain_token_logprobs_keep_relative_precision(with_mask):
  # float32 logits around 25 whose target wins by 8..40 nats: log p(target)
  # from -1e-3 down to -1e-17 (and the other token of the row a near tie).
  gaps = np.array([8.0, 12.0, 16.0, 20.0, 25.0, 30.0, 40.0, 0.5])
  v = 5
  x = np.full((1, len(gaps) + 1, v), 25.0, np.float32)
  x[0, :-1, 1:] -= gaps[:, None].astype(np.float32)
  x[0, :-1, 2] -= 1.0  # unequal others
  ids = np.zeros((1, len(gaps) + 1), np.int32)  # target 0 at every step
  mask = jnp.asarray([False, True, True, False, False]) if with_mask else None
  w = np.linspace(1.0, 2.0, len(gaps) + 1)[None]

  @jax.jit
  def f(x):
    def s(x):
      tok = chunks_lib.token_logprobs(x, jnp.asarray(ids), mask)
      return jnp.sum(tok.path * w), tok.path
    return jax.value_and_grad(s, has_aux=True)(x)

  (_, path), g = f(jnp.asarray(x))
  xd = x.astype(np.float64)[0, :-1]
  rest = np.exp(xd[:, 1:] - xd[:, :1])  # p_v / p_target
  s_other = rest.sum(-1)
  want = -np.log1p(s_other)
  np.testing.assert_allclose(np.asarray(path)[0, 1:], want, rtol=1e-5)
  # d sum(w path) / d x: w (1 - p_t) = w s/(1+s) on the target, -w p_v else.
  wt = w[0, 1:][:, None]
  gw = np.concatenate([wt * (s_other / (1 + s_other))[:, None],
                       -wt * rest / (1 + s_other)[:, None]], axis=1)
  np.testing.assert_allclose(np.asarray(g)[0, :-1], gw, rtol=1e-4)
