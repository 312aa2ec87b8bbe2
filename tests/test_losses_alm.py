"""ALM loss: values and gradients against the float64 numpy reference."""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import losses_reference as ref
from alm.losses import alm as alm_lib
from alm.losses import chunks as chunks_lib

DIVERGENCES = ("kl", "tv", "reverse_kl")
# "unbiased" is a host constraint (alm.align), tested in test_alignment; "space" is both
# (alm.align's and the loss's, equal: test_alm_space.py).
CONSTRAINTS = ("unconstrained", "boundary_prob")


def random_chunk_ids(rng, b, tt, ts, specials=True):
  """Chunk ids for both sides: contiguous 0..C-1, padding and lone specials."""
  out_t = -np.ones((b, tt), np.int32)
  out_s = -np.ones((b, ts), np.int32)
  for i in range(b):
    c = rng.integers(2, (min(tt, ts) + 1) // 3 + 1)
    for out, t in ((out_t, tt), (out_s, ts)):
      sizes = rng.integers(1, 3, size=c)
      pos = 0
      for k, n in enumerate(sizes):
        if specials and k and rng.random() < 0.3 and pos + n < t:
          pos += 1  # an unmatched special token: chunk id -1
        out[i, pos:pos + n] = k
        pos += n
      assert pos <= t
  return out_t, out_s


def random_side(rng, b, t, v, chunk_ids, scale=2.0):
  return dict(
      logits=rng.normal(size=(b, t, v)).astype(np.float32) * scale,
      ids=rng.integers(0, v, size=(b, t)).astype(np.int32),
      chunk_ids=chunk_ids,
      loss_mask=rng.random((b, t)) < 0.9,
      boundary_mask=rng.random(v) < 0.4,
  )


def random_batch(seed, b=4, tt=12, ts=11, vt=13, vs=9):
  rng = np.random.default_rng(seed)
  ct, cs = random_chunk_ids(rng, b, tt, ts)
  teacher = random_side(rng, b, tt, vt, ct)
  student = random_side(rng, b, ts, vs, cs)
  bias = (rng.random((b, min(tt, ts))) * 0.5, rng.random((b, min(tt, ts))) * 0.5)
  return teacher, student, bias


def to_side(d, dtype=jnp.float32):
  return alm_lib.Side(
      logits=jnp.asarray(d["logits"], dtype), ids=jnp.asarray(d["ids"]),
      chunk_ids=jnp.asarray(d["chunk_ids"]),
      loss_mask=None if d.get("loss_mask") is None else jnp.asarray(d["loss_mask"]),
      boundary_mask=(None if d.get("boundary_mask") is None
                     else jnp.asarray(d["boundary_mask"])))


@functools.partial(jax.jit, static_argnames=("configs",))
def _multi_loss_and_grad(t, s, cb, configs):
  """Losses and student-logit gradients for several configs in one compile."""
  outs = []
  for config in configs:
    def f(logits):
      s2 = alm_lib.Side(logits, s.ids, s.chunk_ids, s.loss_mask, s.boundary_mask)
      out = alm_lib.alm_loss(t, s2, config)
      return out.mean(), out
    outs.append(jax.value_and_grad(f, has_aux=True)(s.logits))
  return outs


def jax_losses_and_grads(teacher, student, configs, bias=None,
                         dtype=jnp.float32):
  t, s = to_side(teacher, dtype), to_side(student, dtype)
  del bias  # the loss takes no bias: "unbiased" chunks come merged from alm.align
  return [(loss, out, grad) for (loss, out), grad in
          _multi_loss_and_grad(t, s, None, tuple(configs))]


def jax_loss_and_grad(teacher, student, config, bias=None, dtype=jnp.float32):
  return jax_losses_and_grads(teacher, student, [config], bias, dtype)[0]


# One config per divergence x constraint (tau small enough that chunk
# probabilities are far from 0 and 1), the defaults with and without
# debiasing, and a blockwise vocabulary pass with several (overlapping)
# blocks. Tests at the standard shapes share this one compiled function.
COMBOS = list(itertools.product(DIVERGENCES, CONSTRAINTS))
CONFIGS = tuple(
    [alm_lib.ALMConfig(divergence=d, tau=3.0, constraint=c, gamma=0.35)
     for d, c in COMBOS]
    + [alm_lib.ALMConfig(), alm_lib.ALMConfig(debias=False),
       alm_lib.ALMConfig(tau=3.0, constraint="boundary_prob", gamma=0.35,
                         block_rows=8)])
REF_KW = ([dict(divergence_kind=d, tau=3.0, constraint=c, gamma=0.35)
           for d, c in COMBOS]
          + [dict(tau=100.0), dict(tau=100.0, debias=False),
             dict(tau=3.0, constraint="boundary_prob", gamma=0.35)])


def test_vocab_logsumexps_match_reference_for_every_block_size():
  teacher, _, _ = random_batch(0)
  x, ids = jnp.asarray(teacher["logits"]), jnp.asarray(teacher["ids"])
  mask = jnp.asarray(teacher["boundary_mask"])
  path, bnd = ref.token_logprobs(teacher["logits"], teacher["ids"],
                                 teacher["boundary_mask"])
  w = np.random.default_rng(1).normal(size=(2,) + ids.shape)

  @functools.partial(jax.jit, static_argnames="block_rows")
  def f(x, block_rows):
    def s(x):
      tok = chunks_lib.token_logprobs(x, ids, mask, block_rows=block_rows)
      return jnp.sum(tok.path * w[0]) + jnp.sum(tok.boundary * w[1]), tok
    return jax.value_and_grad(s, has_aux=True)(x)

  grads = []
  # 1 row: 12 blocks; 9 rows -> 2 positions: 6 blocks; 20 -> 5: 3 blocks,
  # the last one overlapping; 64: one block.
  for block_rows in (1, 9, 20, 64):
    (_, tok), g = f(x, block_rows)
    np.testing.assert_allclose(tok.path, path, atol=2e-5)
    np.testing.assert_allclose(tok.boundary, bnd, atol=2e-5)
    grads.append(np.asarray(g))
  # d/dx of sum(w0 * path + w1 * boundary), by hand in float64.
  xs = teacher["logits"].astype(np.float64)
  r_grad = np.zeros_like(xs)
  m = teacher["boundary_mask"]
  for i, j in np.ndindex(ids.shape):
    p = ref.softmax(xs[i, j])
    if j + 1 < ids.shape[1]:
      onehot = np.eye(xs.shape[-1])[teacher["ids"][i, j + 1]]
      r_grad[i, j] += w[0, i, j + 1] * (onehot - p)
    pm = np.where(m, np.exp(xs[i, j] - ref.logsumexp(xs[i, j][m])), 0.0)
    r_grad[i, j] += w[1, i, j] * (pm - p)
  for g in grads:
    np.testing.assert_allclose(g, r_grad, rtol=1e-4, atol=1e-6)


def test_masked_logsumexp_exact_when_masked_logits_are_far_below():
  x = np.zeros((1, 2, 6), np.float32)
  x[..., 3:] = -400.0  # exp underflows in float32 relative to the max
  mask = np.array([0, 0, 0, 1, 1, 1], bool)
  lse, mlse, _ = chunks_lib.vocab_logsumexps(
      jnp.asarray(x), jnp.zeros((1, 2), jnp.int32), jnp.asarray(mask))
  np.testing.assert_allclose(mlse, -400.0 + np.log(3.0), rtol=1e-6)
  np.testing.assert_allclose(lse, np.log(3.0), rtol=1e-6)


def test_loss_and_grad_match_reference():
  teacher, student, bias = random_batch(6)
  results = jax_losses_and_grads(teacher, student, CONFIGS, bias)
  counts = set()
  for config, kw, (loss, out, grad) in zip(CONFIGS, REF_KW, results):
    r_loss, _, r_count, r_grad = ref.alm(teacher, student, bias=bias, **kw)
    assert int(out.count) == r_count and r_count > 2, config
    counts.add(r_count)
    np.testing.assert_allclose(loss, r_loss, rtol=5e-5, atol=1e-7,
                               err_msg=str(config))
    np.testing.assert_allclose(grad, r_grad, rtol=1e-3, atol=2e-7,
                               err_msg=str(config))
  assert len(counts) >= 2  # the two constraints really merged differently


def test_reference_gradient_matches_finite_differences():
  """The hand-derived reference gradient itself, in float64."""
  teacher, student, _ = random_batch(3, b=2, tt=7, ts=6, vt=5, vs=4)
  for div in DIVERGENCES:
    kw = dict(divergence_kind=div, tau=2.0)
    _, _, _, g = ref.alm(teacher, student, **kw)
    rng = np.random.default_rng(0)
    coords = [tuple(rng.integers(0, n) for n in g.shape) for _ in range(6)]
    coords.append(tuple(np.unravel_index(np.argmax(np.abs(g)), g.shape)))
    for idx in coords:
      h = 1e-6
      sp = dict(student, logits=student["logits"].astype(np.float64).copy())
      sm = dict(student, logits=student["logits"].astype(np.float64).copy())
      sp["logits"][idx] += h
      sm["logits"][idx] -= h
      fd = (ref.alm(teacher, sp, **kw)[0] - ref.alm(teacher, sm, **kw)[0]) / (2 * h)
      assert abs(fd - g[idx]) < 1e-6 + 1e-5 * abs(g[idx]), (div, idx, fd, g[idx])


def test_jax_gradient_matches_finite_differences_in_float64():
  teacher, student, bias = random_batch(4, b=2, tt=8, ts=7, vt=6, vs=5)
  configs = tuple(alm_lib.ALMConfig(divergence=div, tau=4.0, constraint=con)
                  for div, con in [("kl", "boundary_prob"),
                                   ("reverse_kl", "unconstrained"),
                                   ("tv", "unconstrained")])
  bias = tuple(b[:2, :7] for b in bias)
  with jax.enable_x64(True):
    # One compiled function gives all three configs.
    f = lambda x: jax_losses_and_grads(teacher, dict(student, logits=x),
                                       configs, bias, dtype=jnp.float64)
    x = student["logits"].astype(np.float64)
    base = f(x)
    rng = np.random.default_rng(1)
    h = 1e-5
    for _ in range(4):
      idx = tuple(rng.integers(0, n) for n in x.shape)
      xp, xm = x.copy(), x.copy()
      xp[idx] += h
      xm[idx] -= h
      for k, (plus, minus) in enumerate(zip(f(xp), f(xm))):
        g = base[k][2]
        assert g.dtype == jnp.float64
        fd = (plus[0] - minus[0]) / (2 * h)
        np.testing.assert_allclose(g[idx], fd, rtol=1e-5, atol=1e-9,
                                   err_msg=str(configs[k]))


def identical_side(dtype_name):
  teacher, _, _ = random_batch(5, tt=10, ts=10, vt=9, vs=9)
  # Same model, same tokenizer: every token is its own chunk on both sides.
  cids = np.where(np.arange(10)[None] < np.array([[10], [7], [9], [10]]),
                  np.arange(10)[None], -1).astype(np.int32)
  del dtype_name
  return dict(teacher, chunk_ids=cids, logits=teacher["logits"] * 8)


def test_identical_student_has_zero_loss_and_gradient():
  side = identical_side("float32")
  _, _, bias = random_batch(5, tt=10, ts=10)
  # Every divergence x constraint in float32 (tau 3 and 100), and one config
  # per divergence in bf16.
  checks = [(CONFIGS, jnp.float32),
            ((alm_lib.ALMConfig(divergence="kl", tau=1.0),
              alm_lib.ALMConfig(divergence="tv", tau=100.0,
                                constraint="boundary_prob"),
              alm_lib.ALMConfig(divergence="reverse_kl", tau=1e4,
                                constraint="boundary_prob")), jnp.bfloat16)]
  for configs, dtype in checks:
    results = jax_losses_and_grads(side, side, configs, bias, dtype)
    for config, (loss, out, grad) in zip(configs, results):
      assert out.count > 0
      assert float(loss) == 0.0, (config, dtype)
      assert not np.any(np.asarray(grad, np.float32)), (config, dtype)


def _insert_special(side, pos, pad_at_end):
  # A token in no chunk at `pos`. Row pos-1 (the last token before it) still
  # gives the boundary probability; a copy of it, now at row pos, predicts
  # the old token at pos: the context a real model would see differs only
  # by the special token itself.
  logits = np.insert(side["logits"], pos, side["logits"][:, pos - 1], axis=1)
  ids = np.insert(side["ids"], pos, 1, axis=1)
  cids = np.insert(side["chunk_ids"], pos, -1, axis=1)
  lm = np.insert(side["loss_mask"], pos, True, axis=1)
  out = dict(side, logits=logits, ids=ids, chunk_ids=cids, loss_mask=lm)
  if pad_at_end:
    out = _pad(out, 3)
  return out


def _pad(side, n):
  return dict(side, logits=np.pad(side["logits"], ((0, 0), (0, n), (0, 0))),
              ids=np.pad(side["ids"], ((0, 0), (0, n))),
              chunk_ids=np.pad(side["chunk_ids"], ((0, 0), (0, n)),
                               constant_values=-1),
              loss_mask=np.pad(side["loss_mask"], ((0, 0), (0, n))))


def test_padding_specials_and_empty_chunk_slots_change_nothing():
  teacher, student, bias = random_batch(6)
  # Every config of CONFIGS (already compiled by the reference test).
  base = jax_losses_and_grads(teacher, student, CONFIGS, bias)
  # The special goes between two chunks (or into padding) in every row.
  cs = student["chunk_ids"]
  pos = None
  for p in range(2, cs.shape[1]):
    if all(cs[i, p] != cs[i, p - 1] or cs[i, p] == -1 for i in range(cs.shape[0])):
      pos = p
      break
  assert pos is not None
  s2 = _insert_special(student, pos, pad_at_end=True)
  t2 = _pad(teacher, 2)  # teacher: padding only
  # The chunk bias is per chunk slot; more slots than chunks change nothing.
  bias2 = tuple(np.pad(b, ((0, 0), (0, 3)), constant_values=5.0)
                for b in bias)
  configs = CONFIGS[:4] + CONFIGS[-1:]  # every constraint, several blocks
  padded = jax_losses_and_grads(t2, s2, configs, bias2)
  for config, (loss, out, grad), (loss2, out2, grad2) in zip(
      configs, base[:4] + base[-1:], padded):
    assert int(out.count) == int(out2.count), config
    np.testing.assert_allclose(loss2, loss, rtol=1e-6, err_msg=str(config))
    g2 = np.asarray(grad2)[:, :-3].copy()
    g2[:, pos - 1] += g2[:, pos]  # the two copies of row pos-1
    np.testing.assert_allclose(np.delete(g2, pos, axis=1), grad, rtol=1e-5,
                               atol=1e-8, err_msg=str(config))


def test_micro_batches_give_the_full_batch_loss_and_gradient():
  teacher, student, bias = random_batch(6)
  full = jax_losses_and_grads(teacher, student, CONFIGS, bias)
  config = CONFIGS[1]  # kl, boundary_prob
  loss, out, grad = full[1]
  totals, grads, counts = 0.0, [], 0.0
  for sl in (slice(0, 2), slice(2, 4)):  # equal halves: one compile
    part = lambda d: {k: (v[sl] if k != "boundary_mask" else v) for k, v in d.items()}
    _, o, g = jax_loss_and_grad(part(teacher), part(student), config)
    # jax_loss_and_grad returns grad of the micro-batch mean: undo it.
    totals += float(o.total)
    counts += float(o.count)
    grads.append(np.asarray(g) * max(float(o.count), 1.0))
  assert counts == float(out.count)
  np.testing.assert_allclose(totals / counts, loss, rtol=1e-6)
  np.testing.assert_allclose(np.concatenate(grads) / counts, grad, rtol=1e-5,
                             atol=1e-10)


def test_no_nan_or_inf_at_extreme_likelihoods_and_temperatures():
  # Chunk log-likelihoods from exactly 0 to about -1e4, tau from 1 to 1e4.
  rng = np.random.default_rng(8)
  b, t, v = 2, 10, 7
  cids = np.tile(np.arange(t, dtype=np.int32) // 2, (b, 1))
  ids = rng.integers(0, v, (b, t)).astype(np.int32)
  scale = np.array([0.0, 1.0, 30.0, 300.0, 5000.0])[:, None]
  logits_t = np.zeros((b, t, v), np.float32)
  logits_s = np.zeros((b, t, v), np.float32)
  for i in range(b):
    for j in range(t - 1):
      sgn = 1.0 if (i + j) % 2 else -1.0
      logits_t[i, j, ids[i, j + 1]] = sgn * scale[j % 5, 0]
      logits_s[i, j, ids[i, j + 1]] = -sgn * scale[(j + 2) % 5, 0]
  mask = np.arange(v) < 2
  teacher = dict(logits=logits_t, ids=ids, chunk_ids=cids, boundary_mask=mask)
  student = dict(logits=logits_s, ids=ids, chunk_ids=cids, boundary_mask=mask)
  taus = (1.0, 100.0, 1e4)
  checks = [  # every divergence x tau in float32; each tau once in bf16
      (tuple(alm_lib.ALMConfig(divergence=div, tau=tau)
             for div, tau in itertools.product(DIVERGENCES, taus)),
       jnp.float32),
      (tuple(alm_lib.ALMConfig(divergence=div, tau=tau)
             for div, tau in zip(DIVERGENCES, taus)), jnp.bfloat16)]
  for configs, dtype in checks:
    results = jax_losses_and_grads(teacher, student, configs, dtype=dtype)
    for config, (loss, out, grad) in zip(configs, results):
      assert np.isfinite(float(loss)) and out.count > 0
      assert np.all(np.isfinite(np.asarray(grad, np.float32))), (config, dtype)


@functools.partial(jax.jit, static_argnames="div")
def _divergence_and_grads(la, lb, div):
  f = lambda a, b: alm_lib.binarised_divergence(a, b, div).sum()
  return (alm_lib.binarised_divergence(la, lb, div),
          *jax.grad(f, argnums=(0, 1))(la, lb))


def test_divergence_is_finite_on_a_grid():
  # Raw values, exactly 0 and -inf included: the guards are the function's.
  ls = -np.concatenate([[0.0, 1e-38, 1e-30, 1e-12], np.logspace(-8, 4, 13),
                        [np.inf]])
  taus = np.array([1.0, 100.0, 1e4])[:, None, None]
  la, lb = np.meshgrid(ls, ls)
  la = jnp.asarray(la[None] / taus, jnp.float32)
  lb = jnp.asarray(lb[None] / taus, jnp.float32)
  diag = np.arange(len(ls))
  for div in DIVERGENCES:
    d, ga, gb = map(np.asarray, _divergence_and_grads(la, lb, div))
    assert np.all(np.isfinite(d)) and np.all(d >= 0)
    assert np.all(np.isfinite(ga)) and np.all(np.isfinite(gb))
    assert np.isfinite(np.sum(gb.astype(np.float32) ** 2))  # a global norm
    assert not np.any(d[:, diag, diag])
    assert not np.any(gb[:, diag, diag])


def test_bad_options_and_inputs_raise_clear_errors():
  with pytest.raises(ValueError, match="choose one of"):
    alm_lib.ALMConfig(divergence="kld")
  with pytest.raises(ValueError, match="choose one of"):
    alm_lib.ALMConfig(constraint="unbiassed")
  with pytest.raises(ValueError, match="tau"):
    alm_lib.ALMConfig(tau=0.0)
  with pytest.raises(ValueError, match="block_rows"):
    alm_lib.ALMConfig(block_rows=0)
  teacher, student, _ = random_batch(0)
  t, s = to_side(teacher), to_side(student)
  with pytest.raises(ValueError, match="boundary_mask"):
    alm_lib.alm_loss(t, alm_lib.Side(s.logits, s.ids, s.chunk_ids))
  # "unbiased" needs bias tables: alm.align's only ("space" has a device form too,
  # checked against alm.align's in test_alm_space.py).
  with pytest.raises(ValueError, match=r"alm\.align\(.*constraint='unconstrained'"):
    alm_lib.ALMConfig(constraint="unbiased")
  with pytest.raises(ValueError, match="one entry per token"):
    alm_lib.alm_loss(t, alm_lib.Side(s.logits, s.ids, s.chunk_ids[:, :-1],
                                     boundary_mask=s.boundary_mask))
