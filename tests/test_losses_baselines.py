"""Baselines (ULD, MinED, SFT) against float64 numpy references."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import losses_reference as ref
import mined_reference
from alm.losses import baselines


def levenshtein(a: bytes, b: bytes) -> int:
  d = list(range(len(b) + 1))
  for i, ca in enumerate(a, 1):
    prev, d[0] = d[0], i
    for j, cb in enumerate(b, 1):
      prev, d[j] = d[j], min(d[j] + 1, d[j - 1] + 1, prev + (ca != cb))
  return d[-1]


def test_mined_map_matches_brute_force_and_is_saved(tmp_path):
  rng = np.random.default_rng(0)
  alphabet = b"ab c"
  def rand_tokens(n):
    return [bytes(rng.choice(list(alphabet), size=rng.integers(1, 7)))
            for _ in range(n)]
  teacher, student = rand_tokens(40), rand_tokens(30) + [b"zzzzzzzz"]
  got = baselines.mined_vocab_map(student, teacher)
  for s, t in zip(student, got):
    dists = [levenshtein(s, x) for x in teacher]
    assert t == int(np.argmin(dists)), (s, teacher[t], dists[t], min(dists))
  path = tmp_path / "map.npz"
  m1 = baselines.load_or_compute_mined_map(path, student, teacher)
  assert path.exists()
  np.testing.assert_array_equal(m1, got)
  m2 = baselines.load_or_compute_mined_map(path, student[:5], teacher)
  np.testing.assert_array_equal(m2, got[:5])  # other pair: recomputed


def _brute_force_map(student, teacher):
  """Smallest teacher id of minimal Levenshtein distance, per student token."""
  return np.array([int(np.argmin([levenshtein(s, t) for t in teacher]))
                   for s in student], np.int32)


@pytest.mark.parametrize("seed", range(4))
def test_mined_map_matches_brute_force_with_ties_and_raw_bytes(seed, monkeypatch):
  rng = np.random.default_rng(seed)
  def rand_tokens(n, alphabet, max_len):
    return [bytes(rng.choice(alphabet, size=rng.integers(0, max_len + 1)).astype(np.uint8))
            for _ in range(n)]
  small = np.array(list(b"ab"))            # tiny alphabet: many equal distances
  raw = np.array([0, 0x7f, 0x80, 0xc3, 0xff])  # NUL and bytes that are not UTF-8
  teacher = (rand_tokens(40, small, 4) + rand_tokens(20, raw, 3)
             + [bytes([b]) for b in rng.choice(256, 10)]      # 1-byte tokens
             + rand_tokens(3, np.arange(256), 90))           # longer than 64 bytes
  teacher += [teacher[3], teacher[41]]    # duplicates: the first id must win
  student = (rand_tokens(40, small, 5) + rand_tokens(20, raw, 4) + [b""]
             + [bytes([b]) for b in rng.choice(256, 10)]
             + rand_tokens(3, np.arange(256), 100) + [teacher[-3] + b"x"])
  want = _brute_force_map(student, teacher)
  dists = np.array([[levenshtein(s, t) for t in teacher] for s in student])
  assert ((dists == dists.min(1, keepdims=True)).sum(1) > 1).sum() > 10  # ties
  np.testing.assert_array_equal(baselines.mined_vocab_map(student, teacher), want)
  np.testing.assert_array_equal(mined_reference.mined_vocab_map_python(student, teacher),
                                want)
  # Many small chunks of student tokens give the same map.
  monkeypatch.setattr(baselines, "_MINED_CHUNK_BYTES", 4 * len(teacher) * 7)
  np.testing.assert_array_equal(baselines.mined_vocab_map(student, teacher), want)
  # Without an empty teacher token, b"" goes to the first shortest one.
  assert baselines.mined_vocab_map([b""], [b"ab", b"c", b"d"]).tolist() == [1]


def test_mined_map_needs_teacher_tokens():
  with pytest.raises(ValueError, match="at least one teacher token"):
    baselines.mined_vocab_map([b"a"], [])


@pytest.mark.slow
def test_mined_map_matches_python_reference_on_real_tokens():
  import alm  # pylint: disable=import-outside-toplevel
  from alm import assets  # pylint: disable=import-outside-toplevel
  names = ("qwen3", "smollm2-135m-instruct")
  if not all(assets.is_installed(n) for n in names):
    pytest.skip("qwen3/smollm2 tokenizers not installed")
  qwen = list(alm.load_tokenizer("qwen3").token_bytes)
  smol = list(alm.load_tokenizer("smollm2-135m-instruct").token_bytes)
  rng = np.random.default_rng(0)
  # SmolLM2 -> Qwen3 transfer: Qwen3 ids are the student, SmolLM2 the teacher.
  student = [qwen[i] for i in rng.choice(len(qwen), 300, replace=False)]
  np.testing.assert_array_equal(baselines.mined_vocab_map(student, smol),
                                mined_reference.mined_vocab_map_python(student, smol))
  # The other direction, against a sample of Qwen3 tokens as the teacher.
  student = [smol[i] for i in rng.choice(len(smol), 200, replace=False)]
  teacher = [qwen[i] for i in np.sort(rng.choice(len(qwen), 5000, replace=False))]
  np.testing.assert_array_equal(baselines.mined_vocab_map(student, teacher),
                                mined_reference.mined_vocab_map_python(student, teacher))


def test_uld_matches_reference():
  rng = np.random.default_rng(1)
  lt = rng.normal(size=(2, 6, 7)).astype(np.float32) * 2
  ls = rng.normal(size=(2, 5, 4)).astype(np.float32) * 2
  ids_t, ids_s = np.zeros((2, 6), np.int32), np.zeros((2, 5), np.int32)
  mt = rng.random((2, 6)) < 0.7
  ms = rng.random((2, 5)) < 0.8
  f = lambda x: baselines.uld_loss(jnp.asarray(lt), jnp.asarray(ids_t), jnp.asarray(mt),
                                   x, jnp.asarray(ids_s), jnp.asarray(ms), top_k=None)
  (_, out), grad = jax.jit(jax.value_and_grad(
      lambda x: (f(x).mean(), f(x)), has_aux=True))(jnp.asarray(ls))
  total, count, g = 0.0, 0, np.zeros_like(ls, np.float64)
  for i in range(2):
    pt = [t - 1 for t in range(1, 6) if mt[i, t]]
    ps = [t - 1 for t in range(1, 5) if ms[i, t]]
    for a, b in zip(pt, ps):
      p, q = ref.softmax(lt[i, a]), ref.softmax(ls[i, b])
      sp, order = np.sort(p)[::-1], np.argsort(-q)
      sq = q[order]
      padded = np.concatenate([sq, np.zeros(len(sp) - len(sq))])
      total += np.abs(sp - padded).sum()
      count += 1
      # d/dq_sorted of |sp - sq| is sign(sq - sp); then through softmax.
      dq = np.zeros_like(q)
      dq[order] = np.sign(sq - sp[:len(sq)])
      g[i, b] += q * (dq - (dq * q).sum())
  assert int(out.count) == count > 2
  np.testing.assert_allclose(out.total, total, rtol=1e-5)
  np.testing.assert_allclose(grad, g / count, rtol=1e-4, atol=1e-7)


def _uld_top_k_reference(lt, ls, mt, ms, top_k):
  """float64 ULD with `top_k` (None: exact), its gradient and the tail masses.

  Returns:
    (total, count, grad w.r.t. `ls`, per pair (teacher tail, student tail),
    per pair its student (row, position)).
  """
  total, count, g, tails, pairs = 0.0, 0, np.zeros_like(ls, np.float64), [], []
  width = max(lt.shape[-1], ls.shape[-1])
  width = width if top_k is None else min(top_k, width)
  for i in range(lt.shape[0]):
    pt = [t - 1 for t in range(1, lt.shape[1]) if mt[i, t]]
    ps = [t - 1 for t in range(1, ls.shape[1]) if ms[i, t]]
    for a, b in zip(pt, ps):
      p, q = ref.softmax(lt[i, a]), ref.softmax(ls[i, b])
      sp, order = np.sort(p)[::-1], np.argsort(-q)
      sq = q[order]
      hp, hq = (np.pad(x[:width], (0, width - len(x[:width]))) for x in (sp, sq))
      rp, rq = sp[width:].sum(), sq[width:].sum()
      total += np.abs(hp - hq).sum() + abs(rp - rq)
      count += 1
      tails.append((rp, rq))
      pairs.append((i, b))
      dq = np.full_like(q, np.sign(rq - rp))  # the tail entries
      top = order[:width]
      dq[top] = np.sign(hq - hp)[:len(top)]
      g[i, b] += q * (dq - (dq * q).sum())
  return total, count, g, np.array(tails), pairs


def _uld_value_and_grad(lt, ls, mt, ms, top_k):
  ids_t = jnp.zeros(lt.shape[:2], jnp.int32)
  ids_s = jnp.zeros(ls.shape[:2], jnp.int32)
  f = lambda x: baselines.uld_loss(jnp.asarray(lt), ids_t, jnp.asarray(mt), x, ids_s,
                                   jnp.asarray(ms), top_k=top_k)
  (_, out), grad = jax.jit(jax.value_and_grad(
      lambda x: (f(x).mean(), f(x)), has_aux=True))(jnp.asarray(ls))
  return float(out.total), int(out.count), np.asarray(grad, np.float64)


@pytest.mark.parametrize("top_k", [3, 5, 7, 100])
def test_uld_top_k_matches_reference_and_is_exact_when_k_covers_vocab(top_k):
  rng = np.random.default_rng(3)
  lt = rng.normal(size=(2, 6, 7)).astype(np.float32) * 2
  ls = rng.normal(size=(2, 5, 4)).astype(np.float32) * 2
  mt, ms = rng.random((2, 6)) < 0.8, rng.random((2, 5)) < 0.9
  total, count, grad = _uld_value_and_grad(lt, ls, mt, ms, top_k)
  want, want_count, want_g, _, _ = _uld_top_k_reference(lt, ls, mt, ms, top_k)
  assert count == want_count > 2
  np.testing.assert_allclose(total, want, rtol=1e-5)
  np.testing.assert_allclose(grad, want_g / count, rtol=1e-4, atol=1e-6)
  if top_k >= 7:  # K covers both vocabularies: the exact loss
    exact, _, exact_g, _, _ = _uld_top_k_reference(lt, ls, mt, ms, None)
    np.testing.assert_allclose(total, exact, rtol=1e-5)
    np.testing.assert_allclose(grad, exact_g / count, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("seed,scale", [(0, 0.5), (1, 1.5), (2, 3.0)])
def test_uld_top_k_within_its_bound_of_exact(seed, scale):
  """Top-K ULD is at most 2 * min(tail masses) below the exact value per pair,
  and its logit gradient on each student position's top K entries is within
  2 * q_j * (student tail mass) of the exact one."""
  rng = np.random.default_rng(seed)
  k = 16
  lt = (rng.normal(size=(2, 9, 300)) * scale).astype(np.float32)
  ls = (rng.normal(size=(2, 8, 200)) * scale).astype(np.float32)
  mt, ms = rng.random((2, 9)) < 0.9, rng.random((2, 8)) < 0.9
  exact, count, exact_g = _uld_value_and_grad(lt, ls, mt, ms, None)
  approx, count_k, approx_g = _uld_value_and_grad(lt, ls, mt, ms, k)
  _, _, _, tails, pairs = _uld_top_k_reference(lt, ls, mt, ms, k)
  assert count == count_k == len(tails) > 8
  slack = 2 * np.minimum(tails[:, 0], tails[:, 1]).sum()
  assert slack > 1e-2  # the tails matter here
  assert exact - slack - 1e-5 <= approx <= exact + 1e-5, (exact, approx, slack)
  q = np.asarray(jax.nn.softmax(jnp.asarray(ls), axis=-1), np.float64)
  top = np.argsort(-q, axis=-1)[..., :k]
  err = np.take_along_axis(np.abs(approx_g - exact_g), top, -1)
  bound = np.zeros(err.shape)  # unpaired positions: gradient 0 in both
  for (i, b), (_, rs) in zip(pairs, tails):
    bound[i, b] = 2 * np.take(q[i, b], top[i, b]) * rs / count
  assert np.all(err <= bound + 1e-6), (err - bound).max()
  assert approx < exact - 1e-4  # the estimate is not the exact value here


def test_uld_top_k_rejects_non_positive():
  x = jnp.zeros((1, 3, 5))
  ids = jnp.zeros((1, 3), jnp.int32)
  with pytest.raises(ValueError, match="top_k"):
    baselines.uld_loss(x, ids, None, x, ids, None, top_k=0)


def test_mined_loss_matches_reference():
  rng = np.random.default_rng(2)
  lt = rng.normal(size=(2, 6, 7)).astype(np.float32) * 2
  ls = rng.normal(size=(2, 6, 5)).astype(np.float32) * 2
  ids_t = rng.integers(0, 7, (2, 6)).astype(np.int32)
  ids_s = rng.integers(0, 5, (2, 6)).astype(np.int32)
  ct = np.array([[0, 1, 1, 2, 3, -1], [0, 1, 2, 3, 4, 5]], np.int32)
  cs = np.array([[0, 1, 2, 2, 3, 3], [0, 1, 2, 2, 3, 4]], np.int32)
  vmap = rng.integers(0, 7, 5).astype(np.int32)
  f = lambda x: baselines.mined_loss(jnp.asarray(lt), jnp.asarray(ids_t), jnp.asarray(ct),
                                     x, jnp.asarray(ids_s), jnp.asarray(cs),
                                     jnp.asarray(vmap))
  (_, out), grad = jax.jit(jax.value_and_grad(
      lambda x: (f(x).mean(), f(x)), has_aux=True))(jnp.asarray(ls))
  total, count, g = 0.0, 0, np.zeros_like(ls, np.float64)
  for i, c in itertools.product(range(2), range(6)):
    tp, sp = np.flatnonzero(ct[i] == c), np.flatnonzero(cs[i] == c)
    if len(tp) != 1 or len(sp) != 1 or tp[0] == 0 or sp[0] == 0:
      continue
    q = ref.softmax(lt[i, tp[0] - 1][vmap])
    p = ref.softmax(ls[i, sp[0] - 1])
    total += np.sum(q * (np.log(q) - np.log(p)))
    count += 1
    g[i, sp[0] - 1] += p - q
  assert int(out.count) == count == 3
  np.testing.assert_allclose(out.total, total, rtol=1e-5)
  np.testing.assert_allclose(grad, g / count, rtol=1e-4, atol=1e-7)
