"""Independent float64 numpy references for the losses in `alm.losses`.

Written with explicit Python loops over rows, chunks and tokens (no segment
sums, no shared code with the JAX implementation), so that a bug in one is
not repeated in the other. Gradients are analytic, derived by hand, and
themselves checked by finite differences in the tests.
"""

from __future__ import annotations

import decimal
import math

import numpy as np


def logsumexp(x, axis=-1):
  x = np.asarray(x, np.float64)
  m = np.max(x, axis=axis, keepdims=True)
  return np.squeeze(m, axis) + np.log(np.sum(np.exp(x - m), axis=axis))


def softmax(x):
  x = np.asarray(x, np.float64)
  return np.exp(x - logsumexp(x)[..., None])


def token_logprobs(logits, ids, mask=None):
  """path [B, T], boundary [B, T] (or None) in float64, by loops."""
  logits = np.asarray(logits, np.float64)
  b, t, _ = logits.shape
  path = np.zeros((b, t))
  boundary = None if mask is None else np.zeros((b, t))
  for i in range(b):
    for j in range(t):
      lse = logsumexp(logits[i, j])
      if j + 1 < t:
        path[i, j + 1] = logits[i, j, ids[i, j + 1]] - lse
      if mask is not None:
        boundary[i, j] = logsumexp(logits[i, j][np.asarray(mask, bool)]) - lse
  return path, boundary


# The loss's guards (`alm.losses.alm.binarised_divergence`): a chunk
# log-probability (already divided by tau) enters the divergence clipped into
# [LOG_PROB_FLOOR, -ceiling]; the gradient is that of the clipped point,
# passed through unchanged.
LOG_PROB_FLOOR = math.log(2.0**-126)
CEILING = {"float32": 2.0**-46, "float64": 2.0**-104}


def guard(l, ceiling=CEILING["float32"]):
  """The value the loss uses for a chunk log-prob `l` (scalar float)."""
  return min(max(float(l), LOG_PROB_FLOOR), -ceiling)


def _exact(la, lb, kind):
  """D from Decimal log-probs, by the textbook formula (no rearrangement)."""
  one = decimal.Decimal(1)
  a, b = la.exp(), lb.exp()
  if kind == "tv":
    return abs(a - b)
  if kind == "reverse_kl":
    la, lb, a, b = lb, la, b, a
  return a * (la - lb) + (one - a) * ((one - a).ln() - (one - b).ln())


def divergence_exact(la, lb, kind, digits=80):
  """(D, dD/dla, dD/dlb) at `digits` significant decimal digits.

  The float inputs are converted exactly (`Decimal(float)`), so the result is
  the true value at the very floats the loss saw, rounded once to float64.
  Derivatives are the hand-derived ones (KL: `dD/dla = a((la - lb) -
  (log(1-a) - log(1-b)))`, `dD/dlb = (b - a)/(1 - b)`; reverse KL swaps the
  roles; TV: `sign(a - b) a`, `sign(b - a) b`), checked against
  `divergence_fd` in the tests.

  Args:
    la, lb: floats < 0 (already guarded).
    kind: "kl", "reverse_kl" or "tv".
    digits: decimal precision.

  Returns:
    (D, dD/dla, dD/dlb) as Python floats.
  """
  with decimal.localcontext() as ctx:
    ctx.prec = digits
    one = decimal.Decimal(1)
    xa, xb = decimal.Decimal(float(la)), decimal.Decimal(float(lb))
    d = _exact(xa, xb, kind)
    a, b = xa.exp(), xb.exp()
    if kind == "tv":
      s = (a > b) - (a < b)
      return float(d), float(s * a), float(-s * b)
    p_log, q_log = (xa, xb) if kind == "kl" else (xb, xa)
    p, q = p_log.exp(), q_log.exp()
    d_p = p * ((p_log - q_log) - ((one - p).ln() - (one - q).ln()))
    d_q = (q - p) / (one - q)
    if kind == "kl":
      return float(d), float(d_p), float(d_q)
    if kind == "reverse_kl":
      return float(d), float(d_q), float(d_p)
    raise ValueError(kind)


def divergence_fd(la, lb, kind, digits=80):
  """(dD/dla, dD/dlb) by central differences in Decimal (step 1e-30 |l|)."""
  with decimal.localcontext() as ctx:
    ctx.prec = digits
    xa, xb = decimal.Decimal(float(la)), decimal.Decimal(float(lb))
    out = []
    for da, db in ((1, 0), (0, 1)):
      h = decimal.Decimal("1e-30") * (abs(xa) if da else abs(xb))
      hi = _exact(xa + da * h, xb + db * h, kind)
      lo = _exact(xa - da * h, xb - db * h, kind)
      out.append(float((hi - lo) / (2 * h)))
    return tuple(out)


def divergence(la, lb, kind):
  """(D, dD/dla, dD/dlb) as floats for scalars la, lb < 0 (exact, rounded)."""
  return divergence_exact(la, lb, kind)


def _chunk_positions(cids_row):
  out = {}
  for pos, c in enumerate(cids_row):
    if c >= 0:
      out.setdefault(int(c), []).append(pos)
  return out


def alm(teacher, student, *, divergence_kind="kl", tau=100.0,
        constraint="unconstrained", gamma=0.1, debias=True,
        ceiling=CEILING["float32"], bias=None):
  """ALM loss (mean over valid chunk groups) and d loss / d student logits.

  Args:
    teacher, student: dicts with logits [B,T,V], ids, chunk_ids, and optional
      loss_mask [B,T], boundary_mask [V].
    bias: unused (the loss has no "unbiased" path: alm.align merges those
      chunks); accepted so callers can pass one argument list.

  Returns:
    (loss, total, count, grad_student_logits float64 [B, T, V]).
  """
  sides = []
  for s in (teacher, student):
    mask = s.get("boundary_mask")
    need = debias or constraint == "boundary_prob"
    path, bnd = token_logprobs(s["logits"], s["ids"], mask if need else None)
    sides.append((path, bnd))
  xs = np.asarray(student["logits"], np.float64)
  grad = np.zeros_like(xs)
  b_size = xs.shape[0]
  groups = []  # (row, teacher positions, student positions, last chunk)
  for i in range(b_size):
    ct = _chunk_positions(teacher["chunk_ids"][i])
    cs = _chunk_positions(student["chunk_ids"][i])
    n = max(list(ct) + list(cs) + [-1]) + 1
    current, members_valid = [], True
    for c in range(n):
      tp, sp = ct.get(c, []), cs.get(c, [])
      present = bool(tp) or bool(sp)
      if not present:
        continue
      valid = bool(tp) and bool(sp)
      for pos_list, s in ((tp, teacher), (sp, student)):
        lm = s.get("loss_mask")
        for p in pos_list:
          if p == 0 or (lm is not None and not lm[i][p]):
            valid = False
      current.append((c, tp, sp))
      members_valid &= valid
      if not valid:
        keep = True
      elif constraint == "unconstrained":
        keep = True
      elif constraint == "boundary_prob":
        keep = sides[0][1][i, tp[-1]] > math.log(gamma)
      else:
        raise ValueError(f"the loss has no constraint {constraint!r}")
      if keep:
        groups.append((i, current, members_valid))
        current, members_valid = [], True
    if current:
      groups.append((i, current, members_valid))
  terms = []
  for i, members, valid in groups:
    if not valid:
      continue
    tpos = [p for _, tp, _ in members for p in tp]
    spos = [p for _, _, sp in members for p in sp]
    lt = sum(sides[0][0][i, p] for p in tpos)
    ls = sum(sides[1][0][i, p] for p in spos)
    t_last, s_last = members[-1][1][-1], members[-1][2][-1]
    if debias:
      lt += sides[0][1][i, t_last]
      ls += sides[1][1][i, s_last]
    terms.append((i, lt, ls, spos, s_last))
  count = len(terms)
  total = 0.0
  smask = student.get("boundary_mask")
  for i, lt, ls, spos, s_last in terms:
    la, lb = guard(lt / tau, ceiling), guard(ls / tau, ceiling)
    d, _, db = divergence(la, lb, divergence_kind)
    total += d
    g = db / tau / max(count, 1)  # the guards pass the gradient through
    for p in spos:
      row = softmax(xs[i, p - 1])
      row[student["ids"][i][p]] -= 1.0
      grad[i, p - 1] -= g * row
    if debias:
      x = xs[i, s_last]
      m = np.asarray(smask, bool)
      masked = np.where(m, np.exp(x - logsumexp(x[m])), 0.0)
      grad[i, s_last] += g * (masked - softmax(x))
  return total / max(count, 1), total, count, grad


def ntp(logits, ids, loss_mask=None):
  """Mean next-token cross-entropy over predicted, masked-in tokens + grad."""
  logits = np.asarray(logits, np.float64)
  b, t, _ = logits.shape
  grad = np.zeros_like(logits)
  items = [(i, j) for i in range(b) for j in range(1, t)
           if loss_mask is None or loss_mask[i][j]]
  total = 0.0
  for i, j in items:
    total -= logits[i, j - 1, ids[i][j]] - logsumexp(logits[i, j - 1])
    row = softmax(logits[i, j - 1])
    row[ids[i][j]] -= 1
    grad[i, j - 1] += row / max(len(items), 1)
  return total / max(len(items), 1), grad


def dskd(teacher, student, params, temperature=1.0, kd_params=None):
  """DSKD (cross-model attention) loss total and count, float64, by loops.

  Args:
    teacher, student: dicts with logits [B,T,V], hidden [B,T,D], ids,
      embedding [V,D], unembedding [D,V], optional loss_mask [B,T].
    params: dict of float64 arrays q_w [2Ds,2Dt], q_b, s2t_w [Ds,Dt], s2t_b,
      t2s_w [Dt,Ds], t2s_b (x @ w + b).
    kd_params: the parameters that make the (stop-gradient) t2s distribution
      of the student-space KL term, default `params`; finite differences
      with respect to the projector hold them at the base point.

  Returns:
    (total, count).
  """
  f = lambda a: np.asarray(a, np.float64)
  b_size = len(student["ids"])

  def positions(side):
    ids = side["ids"]
    lm = side.get("loss_mask")
    return [[j for j in range(len(ids[i]) - 1)
             if lm is None or lm[i][j + 1]] for i in range(b_size)]

  ps, pt = positions(student), positions(teacher)
  es, et = f(student["embedding"]), f(teacher["embedding"])

  def std(vectors):
    x = np.concatenate([np.ravel(v) for v in vectors])
    return math.sqrt(np.mean((x - x.mean()) ** 2))

  tid, sid = teacher["ids"], student["ids"]
  k_all = [np.concatenate([et[tid[i][j]], et[tid[i][j + 1]]])
           for i in range(b_size) for j in pt[i]]
  tg_all = [et[tid[i][j + 1]] for i in range(b_size) for j in pt[i]]
  h_all = [f(teacher["hidden"])[i, j] for i in range(b_size) for j in pt[i]]
  k_std, tg_std, h_std = std(k_all), std(tg_all), std(h_all)
  d_t = et.shape[1]
  total, count = 0.0, 0

  def log_softmax(x):
    return x - logsumexp(x)

  def kl(p, q):
    lp, lq = log_softmax(p / temperature), log_softmax(q / temperature)
    return float(np.sum(np.exp(lp) * (lp - lq)))

  kd_params = params if kd_params is None else kd_params

  def t2s(i, a, p):
    q = np.concatenate([es[sid[i][a]], es[sid[i][a + 1]]]) @ p["q_w"] + p["q_b"]
    score = [q @ (np.concatenate([et[tid[i][j]], et[tid[i][j + 1]]]) / k_std)
             / math.sqrt(2 * d_t) for j in pt[i]]
    vt = [(f(teacher["hidden"])[i, j] / h_std + et[tid[i][j + 1]] / tg_std)
          @ p["t2s_w"] + p["t2s_b"] for j in pt[i]]
    h = sum(wj * v for wj, v in zip(softmax(np.array(score)), vt))
    return h @ f(student["unembedding"])

  for i in range(b_size):
    q = {j: np.concatenate([es[sid[i][j]], es[sid[i][j + 1]]]) @ params["q_w"]
         + params["q_b"] for j in ps[i]}
    k = {j: np.concatenate([et[tid[i][j]], et[tid[i][j + 1]]]) / k_std
         for j in pt[i]}
    vs = {a: f(student["hidden"])[i, a] @ params["s2t_w"] + params["s2t_b"]
          for a in ps[i]}
    score = {(a, j): q[a] @ k[j] / math.sqrt(2 * d_t) for a in ps[i]
             for j in pt[i]}
    for a in ps[i]:  # teacher -> student space
      target = sid[i][a + 1]
      total -= log_softmax(t2s(i, a, params))[target]
      z = t2s(i, a, kd_params)
      if int(np.argmax(z)) == target:
        total += kl(z, f(student["logits"])[i, a])
      count += 1
    for j in pt[i]:  # student -> teacher space
      w = softmax(np.array([score[a, j] for a in ps[i]]))
      h = sum(wa * vs[a] for wa, a in zip(w, ps[i]))
      total += kl(f(teacher["logits"])[i, j], h @ f(teacher["unembedding"]))
  return total, count
