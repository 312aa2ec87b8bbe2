"""The ALM objective: binarised f-divergences between aligned chunk likelihoods.

Source: Minixhofer, Vulic, Ponti, "Universal Cross-Tokenizer Distillation via
Approximate Likelihood Matching"; restated, with the code's refinements, in
docs/method.md §3-§4. For aligned chunk c with teacher and student chunk
log-likelihoods `L^T_c`, `L^S_c` (path log-probs summed over the chunk, plus the
outcome-debiasing boundary log-prob), temperature `tau`,
`a_c = exp(L^T_c / tau)`, `b_c = exp(L^S_c / tau)`, the loss is

  mean over valid chunks c of the global batch of
  D(a_c, b_c) = f(a_c, b_c) + f(1 - a_c, 1 - b_c)

with `f(p, q) = p log(p / q)` (KL, default), `|p - q| / 2` (total variation,
so `D = |a - b|`) or `q log(q / p)` (reverse KL). Everything is computed
from `L / tau` in forms that never subtract two numbers near 1
(`binarised_divergence`), with straight-through guards for chunk
log-likelihoods of exactly 0 or -inf.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from typing import Literal, get_args

import jax
import jax.numpy as jnp

from alm._validation import check_choice
from alm.losses import chunks as chunks_lib
from alm.losses.reduce import LossSum

Divergence = Literal["kl", "tv", "reverse_kl"]
Constraint = Literal["unconstrained", "boundary_prob", "space"]
# Needs the bias tables: applied where the chunks are made, by `alm.align`, never here.
HOST_CONSTRAINTS = ("unbiased",)


def check_gamma(gamma: float) -> None:
  """Raises ValueError unless `gamma` is a probability threshold in (0, 1).

  Both constraints that read it compare a probability against it: under
  "boundary_prob" `gamma >= 1` keeps no boundary (every row collapses into
  one chunk) and `gamma <= 0` keeps all; under "unbiased" (a bias mass
  `<= gamma`, applied by `alm.align`) `gamma >= 1` keeps all and `gamma < 0`
  none.
  """
  if not 0.0 < gamma < 1.0:  # also rejects NaN
    raise ValueError(f"gamma must be a probability threshold in (0, 1), got "
                     f"{gamma}")


@dataclasses.dataclass(frozen=True)
class ALMConfig:
  """Options of the ALM loss (docs/method.md §4).

  Attributes:
    divergence: "kl" (default), "tv" or "reverse_kl".
    tau: temperature, >= `MIN_TAU` (~0.008, below which even a chunk of
      probability 1/2 underflows float32); `a = exp(L / tau)`. Paper
      default 100.
    constraint: which chunk boundaries the loss keeps: "unconstrained" (those
      of the given chunk ids), "boundary_prob" (from the teacher's boundary
      probability; needs the teacher boundary mask) or "space" (where the next
      token on both sides is a boundary token, or is in no chunk, e.g. a
      special; needs both boundary masks): the rule of `alm.align(...,
      constraint="space")` read from the tokens on the device, so one batch
      serves two chunkings (the byte recipe's second ALM term; with shared
      boundary bytes the two agree, tests/test_alm_space.py). "unbiased"
      needs bias tables, so `alm.align` applies it where the chunks are made;
      pass its chunk ids with "unconstrained".
    gamma: threshold of "boundary_prob", a probability in (0, 1).
    debias: add the outcome-chunk boundary log-prob to each chunk (needs
      both boundary masks).
    block_rows: rows (batch x positions) per block of the vocabulary pass
      (`alm.losses.chunks.vocab_logsumexps`); bounds the float32 temporaries
      at `block_rows x V x 4` bytes.
  """

  divergence: Divergence = "kl"
  tau: float = 100.0
  constraint: Constraint = "unconstrained"
  gamma: float = 0.1
  debias: bool = True
  block_rows: int = chunks_lib.DEFAULT_BLOCK_ROWS

  def __post_init__(self):
    check_choice("divergence", self.divergence, Divergence)
    if self.constraint in HOST_CONSTRAINTS:
      raise ValueError(
          f"constraint={self.constraint!r} is applied where the chunks are made: "
          f"align with alm.align(teacher_enc, student_enc, "
          f"constraint={self.constraint!r}, ...) (the data pipeline's "
          f"align_constraint), then use ALMConfig(constraint='unconstrained') "
          f"on those chunk ids")
    check_choice("constraint", self.constraint, Constraint)
    if not (self.tau > 0 and math.isfinite(self.tau)):
      raise ValueError(f"tau must be a finite positive number, got {self.tau}")
    if self.tau < MIN_TAU:
      raise ValueError(
          f"tau={self.tau} is too small: exp(L / tau) would underflow float32 "
          f"(below e^{LOG_PROB_FLOOR:.1f}) even for a chunk of probability "
          f"1/2, so nearly every chunk would have a = b = 0 and the loss "
          f"would be silently 0; use tau >= {MIN_TAU:.4f} (paper default 100)")
    check_gamma(self.gamma)
    if not (isinstance(self.block_rows, int) and self.block_rows >= 1):
      raise ValueError(f"block_rows must be a positive int, got "
                       f"{self.block_rows!r}")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Side:
  """One model's view of a batch (teacher or student).

  Attributes:
    logits: [B, T, V] logits of the model on `ids` (any float dtype); None
      when `token_logprobs` is given.
    ids: int [B, T] token ids.
    chunk_ids: int [B, T] chunk id per token (-1 = in no chunk), from
      `alm.align`; chunk c is the same chunk on both sides of a row.
    loss_mask: optional bool [B, T]; chunks with a token outside it are not
      trained on.
    boundary_mask: optional bool [V], `tokenizer.boundary_token_mask(b)` with
      one boundary-byte set `b` for both sides,
      `alm.tokenization.vocab.shared_boundary_bytes(teacher_tok,
      student_tok)` (else the debiasing events differ between the sides);
      needed for debiasing and the "boundary_prob" constraint.
    segment_ids: optional int [B, T] document of each token in a packed row
      (1, 2, ... ; 0 = padding), as from the data pipeline; None: each row
      holds one document. A constraint never merges a chunk across a
      document's end (the end of a document always ends a chunk).
    text_continues: optional bool [B, T], True on the tokens of a row piece
      cut from a longer document (the pipeline's `*_text_continues`): the
      boundary after such a piece's last chunk is a cut, not the end of the
      text, so a merged chunk reaching it whose boundary the constraint
      rejects is incomplete and is not trained. None: no row was cut.
    token_logprobs: optional precomputed `chunks.token_logprobs(logits, ids,
      boundary_mask)` (a teacher cache's, SPEC §15): everything the loss reads
      from the logits, so `logits` may be None. Its `boundary` must be there
      when the config needs it (debiasing, "boundary_prob").
  """

  logits: jax.Array | None
  ids: jax.Array
  chunk_ids: jax.Array
  loss_mask: jax.Array | None = None
  boundary_mask: jax.Array | None = None
  segment_ids: jax.Array | None = None
  text_continues: jax.Array | None = None
  token_logprobs: chunks_lib.TokenLogProbs | None = None

# ---------------------------------------------------------------------------
# Binarised divergences: precise near 0, guarded, exact-zero at a == b.
# ---------------------------------------------------------------------------

# Chunk log-probabilities (`L / tau`) enter the divergence clipped into
# [LOG_PROB_FLOOR, -ceiling], in value only: the derivative is the one at the
# clipped point, passed through unchanged (a straight-through guard), so no
# guard ever zeroes a gradient.
#
# The floor is the log of float32's smallest normal number, 2**-126: below
# it `exp(L / tau)` is 0 (or a flushed denormal) in the training dtype anyway,
# so KL and TV change by < 1.2e-38. It is what makes a teacher chunk of
# probability 0 (a -inf logit on an observed token, or on every boundary
# token under debiasing) well defined: KL against a = 0 is finite anyway
# (0 log 0 = 0) and gets the value and gradient of a = 2**-126; reverse KL
# against a = 0 is infinite for any b > 0, and is instead charged as if the
# teacher gave the chunk probability 2**-126, i.e. `b (lb + 87.3) + ...`,
# a large but finite penalty with a finite gradient. A -inf student chunk is
# floored the same way (both sides alike, so equal inputs stay equal). The
# one gradient the floor does remove is where both sides are below it: D = 0
# there, where the exact gradient is below 2**-126 (KL, TV) or
# 2**-126 |L/tau| (reverse KL), noise even in float32; `alm_loss` warns when
# most chunks of a batch are in that state (tau too small).
LOG_PROB_FLOOR = math.log(2.0**-126)  # -87.3365...

# The smallest tau `ALMConfig` accepts: below it even a chunk of probability
# 1/2 has `exp(L / tau)` under the floor (tau = 1e-3 would zero nearly every
# chunk). Larger but still too small taus are caught on the data by
# `alm_loss`'s underflow warning.
MIN_TAU = math.log(2.0) / -LOG_PROB_FLOOR  # 0.0079...


def _ceiling(dtype) -> float:
  """`eps**2` of the dtype (2**-46 in float32, 2**-104 in float64).

  Only a log-probability that rounds to exactly 0 (or above) needs it: the
  forms below are accurate for any negative float. At the ceiling
  `dD/dlb ~ (1 - a) / (1 - b) ~ 1 / eps**2` (7e13 in float32), as large as
  is safe: 2**36 such entries still square-sum below float32's 2**128 in a
  global gradient norm.
  """
  return float(jnp.finfo(dtype).eps) ** 2


def _guard(l):
  dtype = jnp.promote_types(jnp.asarray(l).dtype, jnp.float32)
  return jnp.clip(jnp.asarray(l, dtype), LOG_PROB_FLOOR, -_ceiling(dtype))


# g(x) = (x - 1) e^x + 1 = sum_{n >= 2} (n - 1) x^n / n!, for |x| < 1/4 (the
# direct form loses 1/x**2 to cancellation there); 14 terms reach float64.
_G_COEFFS = tuple((k + 1) / math.factorial(k + 2) for k in range(14))
_SERIES_MAX = 0.25


def _g_series(x):
  acc = jnp.zeros_like(x)
  for c in reversed(_G_COEFFS):
    acc = acc * x + c
  return x * x * acc


def _bernoulli_kl(lp, lq):
  """KL(Bern(p) || Bern(q)) and its partials from guarded `log p`, `log q`.

  `D = p log(p/q) + (1-p) log((1-p)/(1-q)) = q g(x) + (1-q) g(y)` with
  `x = log(p/q)`, `y = log((1-p)/(1-q))` and `g(x) = (x-1) e^x + 1 >= 0`:
  two non-negative terms, each computed without cancellation (a series for
  small |x|, where D is second order in p - q, else `p (x-1) + q`). Nothing is
  ever a difference of two numbers near 1: `1 - p = -expm1(lp)`,
  `q - p = -q expm1(x)` (or `p expm1(-x)`, whichever cannot overflow), and
  `y = log1p((q - p)/(1 - q))` unless that ratio is far from 0.

  Returns:
    (D, dD/dlog p = p (x - y), dD/dlog q = (q - p)/(1 - q)); all three are
    exactly 0 when `lp == lq`.
  """
  p, q = jnp.exp(lp), jnp.exp(lq)
  mp, mq = -jnp.expm1(lp), -jnp.expm1(lq)  # 1 - p, 1 - q
  x = lp - lq
  em = jnp.expm1(-jnp.abs(x))  # in (-1, 0]: never overflows
  q_minus_p = jnp.where(x < 0, -q * em, p * em)
  r = q_minus_p / mq  # (1-p)/(1-q) - 1, >= -1
  near = jnp.abs(r) < 0.5
  y = jnp.where(near, jnp.log1p(jnp.where(near, r, 0.0)),
                jnp.log(mp) - jnp.log(mq))
  t1 = jnp.where(jnp.abs(x) < _SERIES_MAX, q * _g_series(x), p * (x - 1) + q)
  t2 = jnp.where(jnp.abs(y) < _SERIES_MAX, mq * _g_series(y),
                 mp * (y - 1) + mq)
  return t1 + t2, p * (x - y), r


def _divergence_and_partials(la, lb, divergence):
  la, lb = _guard(la), _guard(lb)
  if divergence == "kl":
    return _bernoulli_kl(la, lb)
  if divergence == "reverse_kl":
    d, d_lb, d_la = _bernoulli_kl(lb, la)
    return d, d_la, d_lb
  if divergence == "tv":
    a, b = jnp.exp(la), jnp.exp(lb)
    x = la - lb
    em = jnp.expm1(-jnp.abs(x))
    b_minus_a = jnp.where(x < 0, -b * em, a * em)
    # The sign from x, not from b - a: that may be flushed to 0 where a and
    # b themselves (the derivatives) are still normal floats.
    s = jnp.sign(-x)  # exactly 0 iff la == lb
    return jnp.abs(b_minus_a), -s * a, s * b
  raise ValueError(f"divergence={divergence!r}; choose one of "
                   f"{get_args(Divergence)}")


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def binarised_divergence(log_a: jax.Array, log_b: jax.Array,
                         divergence: Divergence = "kl") -> jax.Array:
  """`D(a, b) = f(a, b) + f(1 - a, 1 - b)` from `log a`, `log b` (<= 0).

  KL: `a log(a/b) + (1-a) log((1-a)/(1-b))`; reverse KL: the same with a and b
  swapped; TV: `|a - b|`. Computed in float32 (float64 for float64 inputs)
  in forms that keep full relative precision for chunk log-probs anywhere
  in [-87, 0), including |log a|, |log b| down to 1e-9 and below and the
  second-order regime a ~ b (`_bernoulli_kl`). Tested against an 80-digit
  reference: relative error of D and both partials <= 1e-6 in float64 and
  <= 1e-2 in float32 on a grid from 1e-9 to 80 (in practice ~1e-15 and
  ~1e-6). The derivatives are exactly 0 when `log_a == log_b`, so a student
  identical to its teacher gets gradient 0, not rounding noise.

  Guards (straight-through, see `LOG_PROB_FLOOR`, `_ceiling`): inputs are
  clipped into `[LOG_PROB_FLOOR, -eps**2]` for the value, and the derivative
  at the clipped point is passed through unchanged. So `log_b == 0` (a chunk
  float32 rounds to probability 1) gets the large, finite gradient of
  `log_b = -eps**2`, and `-inf` (a zero-probability chunk) gets that of
  `LOG_PROB_FLOOR`: the loss and its gradient are finite for every input
  in [-inf, 0] (NaN stays NaN).

  Args:
    log_a: teacher chunk log-probs (already divided by tau).
    log_b: student chunk log-probs, same shape.
    divergence: "kl", "tv" or "reverse_kl".

  Returns:
    D, elementwise.
  """
  return _divergence_and_partials(log_a, log_b, divergence)[0]


@binarised_divergence.defjvp
def _binarised_divergence_jvp(divergence, primals, tangents):
  la, lb = primals
  ta, tb = tangents
  d, da, db = _divergence_and_partials(la, lb, divergence)
  return d, (da * jnp.asarray(ta, da.dtype) + db * jnp.asarray(tb, db.dtype))


# ---------------------------------------------------------------------------
# Chunk constraints and the loss.
# ---------------------------------------------------------------------------


def _exclusive_cumsum(x):
  return jnp.cumsum(x, axis=1) - x


def _keep_boundaries(config, ct, cs, teacher, student):
  """bool [B, C]: keep the boundary after chunk c (else merge into c + 1)."""
  if config.constraint == "boundary_prob":
    return ct.boundary > math.log(config.gamma)
  if config.constraint == "space":
    keep = jnp.ones(ct.present.shape, bool)
    for side, ch in ((teacher, ct), (student, cs)):
      t = side.ids.shape[1]
      nxt = jnp.minimum(ch.last + 1, t - 1)
      nid = jnp.take_along_axis(side.ids, nxt, axis=1)
      in_chunk = jnp.take_along_axis(side.chunk_ids, nxt, axis=1) >= 0
      keep = keep & (side.boundary_mask[nid] | ~in_chunk | (ch.last + 1 >= t) | ~ch.present)
    return keep
  return jnp.ones(ct.present.shape, bool)


def _chunk_stops(side: Side, ch: chunks_lib.ChunkLogProbs):
  """Where a group of merged chunks must stop, per chunk slot, from one side.

  Returns:
    (stop, text_ends), bool [B, C]: `stop` when chunk c is the last chunk of
    its document in the row (the row ends, padding or another document
    follows, or no later chunk of the document is in the row), so merging it
    into c + 1 would join two documents or run past the row; `text_ends`
    when, in addition, the document's text is known to end right after
    chunk c (the row was not cut from a longer document there).
  """
  ids = side.chunk_ids.astype(jnp.int32)
  b, t = ids.shape
  if side.segment_ids is None:
    # One document per row, ending at the row's last chunked token.
    pos = jnp.arange(t, dtype=jnp.int32)
    last_tok = jnp.max(jnp.where(ids >= 0, pos, -1), axis=1, keepdims=True)
    seg = (pos <= last_tok).astype(jnp.int32)
  else:
    seg = side.segment_ids.astype(jnp.int32)
  cont = (jnp.zeros((b, t), bool) if side.text_continues is None
          else side.text_continues.astype(bool))
  nxt = jnp.minimum(ch.last + 1, t - 1)
  own_seg = jnp.take_along_axis(seg, ch.last, axis=1)
  # The document goes on after the chunk's last token (tokens in no chunk,
  # e.g. a special of this side only, carry no text and do not interrupt it).
  goes_on = (ch.last + 1 < t) & (jnp.take_along_axis(seg, nxt, axis=1) == own_seg)
  shift = lambda x, fill: jnp.concatenate(
      [x[:, 1:], jnp.full((x.shape[0], 1), fill, x.dtype)], axis=1)
  next_in_doc = shift(ch.present, False) & (shift(own_seg, -1) == own_seg)
  stop = ~(goes_on & next_in_doc)
  text_ends = ~goes_on & ~jnp.take_along_axis(cont, ch.last, axis=1)
  return stop & ch.present, text_ends & ch.present


def _after_unchunked_text(side: Side, c: int) -> tuple[jax.Array, jax.Array]:
  """bool [B, C] each: (the token just before chunk c's first token is text in no
  chunk, chunk c's first token is a boundary token: it starts a word).

  Text is a loss-mask token (all tokens without a mask) of the same segment.
  """
  ids = side.chunk_ids.astype(jnp.int32)
  b, t = ids.shape
  pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  slot = jnp.where(ids >= 0, ids, c)  # slot c: tokens in no chunk
  first = -chunks_lib._row_segment_max(jnp.where(ids >= 0, -pos, -t), slot, c + 1)[:, :c]
  prev = jnp.clip(first - 1, 0, t - 1)
  text = (jnp.ones((b, t), bool) if side.loss_mask is None
          else side.loss_mask.astype(bool))
  seg = jnp.zeros((b, t), jnp.int32) if side.segment_ids is None else side.segment_ids
  take = lambda x, i: jnp.take_along_axis(x, i, axis=1)
  at = jnp.clip(first, 0, t - 1)
  after = ((first >= 1) & (first < t) & (take(ids, prev) < 0) & take(text, prev)
           & (take(seg, prev) == take(seg, at)))
  return after, side.boundary_mask[take(side.ids, at)]


def _validate(config, teacher, student):
  for name, side in (("teacher", teacher), ("student", student)):
    chunks_lib.check_chunk_ids(side.chunk_ids, side.ids, name)
    if config.debias and side.boundary_mask is None:
      raise ValueError(
          f"{name}.boundary_mask is required with debias={config.debias}, "
          f"constraint={config.constraint!r}: pass "
          f"tokenizer.boundary_token_mask(shared_boundary_bytes(teacher_tok, student_tok)), "
          f"or set debias=False")
  if teacher.ids.shape[0] != student.ids.shape[0]:
    raise ValueError(f"teacher and student batch sizes differ: "
                     f"{teacher.ids.shape[0]} vs {student.ids.shape[0]}")
  if config.constraint == "boundary_prob" and teacher.boundary_mask is None:
    raise ValueError("constraint='boundary_prob' needs teacher.boundary_mask")
  if config.constraint == "space" and (teacher.boundary_mask is None or
                                       student.boundary_mask is None):
    raise ValueError("constraint='space' needs both boundary masks (tokenizer."
                     "boundary_token_mask(shared_boundary_bytes(teacher_tok, student_tok)))")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AlignedChunks:
  """Merged chunk log-likelihoods of both sides, [B, C] each.

  Attributes:
    teacher: teacher chunk log-likelihoods `L^T_c` (debiased if configured).
    student: student chunk log-likelihoods `L^S_c`.
    valid: the chunk enters the loss.
  """

  teacher: jax.Array
  student: jax.Array
  valid: jax.Array


def aligned_chunk_logprobs(
    teacher: Side, student: Side, config: ALMConfig = ALMConfig(), *,
    num_chunks: int | None = None,
) -> AlignedChunks:
  """Chunk log-likelihoods of both sides after the chunk constraint.

  The teacher's logits are wrapped in `stop_gradient` (the teacher is frozen).

  Args:
    teacher: the teacher's `Side`.
    student: the student's `Side`.
    config: an `ALMConfig`.
    num_chunks: static number of chunk slots C (default `min(T_T, T_S)`).

  Returns:
    `AlignedChunks` ([B, C]); merged group g occupies slot g (groups are
    numbered in order), unused slots are invalid.
  """
  _validate(config, teacher, student)
  c = num_chunks or min(teacher.ids.shape[1], student.ids.shape[1])
  sides = []
  for name, side, frozen in (("teacher", teacher, True), ("student", student, False)):
    need_boundary = (config.debias or (frozen and
                                       config.constraint == "boundary_prob"))
    if side.token_logprobs is not None:
      tok = side.token_logprobs
      if need_boundary and tok.boundary is None:
        raise ValueError(f"{name}.token_logprobs has no boundary log-probs, which "
                         f"debias={config.debias}, constraint={config.constraint!r} need.")
      if not need_boundary:
        tok = chunks_lib.TokenLogProbs(path=tok.path, boundary=None)
      if frozen:
        tok = jax.lax.stop_gradient(tok)
    elif side.logits is None:
      raise ValueError(f"{name} has neither logits nor token_logprobs.")
    else:
      logits = jax.lax.stop_gradient(side.logits) if frozen else side.logits
      tok = chunks_lib.token_logprobs(
          logits, side.ids, side.boundary_mask if need_boundary else None,
          block_rows=config.block_rows)
    sides.append(chunks_lib.chunk_logprobs(tok, side.chunk_ids, c,
                                           side.loss_mask))
  ct, cs = sides
  present = ct.present | cs.present
  bad = present & ~(ct.valid & cs.valid)
  rule = _keep_boundaries(config, ct, cs, teacher, student)
  # Never merge across a document's end or past the row's last chunk. Where
  # the text provably ends the chunk is complete whatever the rule says; at a
  # cut a chunk the rule would merge onward is incomplete: its group
  # is not trained rather than trained as if it were whole.
  (stop_t, ends_t), (stop_s, ends_s) = (_chunk_stops(teacher, ct),
                                        _chunk_stops(student, cs))
  stop, text_ends = stop_t | stop_s, ends_t | ends_s
  incomplete = stop & ~text_ends & ~rule
  # An invalid chunk always ends its group, so it only spoils the group it
  # would have joined, never the one after it. Under "space" a group is a word
  # fixed by the tokens alone (as alm.align's), so an invalid chunk spoils its
  # whole word, and so does text in no chunk just before it (a row without BOS:
  # alm.align drops the chunk of the unpredicted token 0, and its "space" rule
  # the rest of that first word).
  if config.constraint == "space":
    keep = rule | stop
    (after_t, word_t), (after_s, word_s) = (_after_unchunked_text(teacher, c),
                                            _after_unchunked_text(student, c))
    bad = bad | ((after_t | after_s) & ~(word_t & word_s))
  else:
    keep = rule | stop | bad
  group = _exclusive_cumsum(keep.astype(jnp.int32))  # [B, C]
  seg_sum = functools.partial(chunks_lib._row_segment_sum, seg=group, num=c)
  g_present = seg_sum(present.astype(jnp.int32)) > 0
  g_bad = seg_sum((bad | incomplete).astype(jnp.int32)) > 0
  lt, ls = seg_sum(ct.path), seg_sum(cs.path)
  if config.debias:
    idx = jnp.broadcast_to(jnp.arange(c, dtype=jnp.int32), present.shape)
    last_member = chunks_lib._row_segment_max(
        jnp.where(present, idx, -1), group, c)
    last_member = jnp.maximum(last_member, 0)
    lt = lt + jnp.take_along_axis(ct.boundary, last_member, axis=1)
    ls = ls + jnp.take_along_axis(cs.boundary, last_member, axis=1)
  return AlignedChunks(teacher=lt, student=ls, valid=g_present & ~g_bad)


def alm_loss(
    teacher: Side, student: Side, config: ALMConfig = ALMConfig(), *,
    num_chunks: int | None = None,
) -> LossSum:
  """The ALM loss as (sum over valid chunks of D, number of valid chunks).

  `D(a_c, b_c)` with `a_c = exp(L^T_c / tau)`, `b_c = exp(L^S_c / tau)`
  (module docstring; Minixhofer et al., "Universal Cross-Tokenizer
  Distillation via Approximate Likelihood Matching"), computed by
  `binarised_divergence`, whose straight-through guards define chunks of
  log-likelihood 0 or -inf (e.g. a -inf teacher logit) without ever cutting a
  gradient. Take `.mean()` for one global batch, or see `alm.losses.reduce`
  for accumulation and multi-device means.

  When more than half the valid chunks of a batch have both `L / tau` below
  `LOG_PROB_FLOOR` (both probabilities underflow float32: D = 0 and no
  gradient), a `UserWarning` naming tau is raised on the host (through
  `jax.debug.callback`, only on such batches): tau is too small for these
  likelihoods.

  Args:
    teacher: the teacher's `Side` (gradients are stopped).
    student: the student's `Side`.
    config: an `ALMConfig`.
    num_chunks: static chunk slots C (default `min(T_T, T_S)`).

  Returns:
    A `LossSum`.
  """
  ch = aligned_chunk_logprobs(teacher, student, config, num_chunks=num_chunks)
  # Invalid slots get a harmless value so no NaN leaks into the gradient.
  la = jnp.where(ch.valid, ch.teacher / config.tau, -1.0)
  lb = jnp.where(ch.valid, ch.student / config.tau, -1.0)
  d = binarised_divergence(la, lb, config.divergence)
  total = jnp.sum(jnp.where(ch.valid, d, 0.0))
  count = jnp.sum(ch.valid).astype(jnp.float32)
  _warn_on_underflow(ch.valid & (la <= LOG_PROB_FLOOR) & (lb <= LOG_PROB_FLOOR),
                     count, config.tau)
  return LossSum(total=total, count=count)


def _underflow_warning(n_under, count, tau):
  warnings.warn(
      f"ALM loss: {int(n_under)} of {int(count)} chunks have exp(L / tau) "
      f"below e^{LOG_PROB_FLOOR:.1f} on both sides at tau={tau}: they give "
      f"D = 0 and no gradient, so the loss is near 0 whatever the student "
      f"does. tau is too small for these chunk log-likelihoods (paper "
      f"default 100).", UserWarning, stacklevel=2)


def _warn_on_underflow(under, count, tau):
  """Warns on the host when most chunks underflowed (see `alm_loss`).

  A data-dependent check (a config check cannot know the likelihoods); the
  callback runs only on such batches, so a healthy run pays one reduction
  and a predicate per step, no host round trip.
  """
  n_under = jnp.sum(under).astype(jnp.float32)
  jax.lax.cond(
      2 * n_under > count,
      lambda n, c: jax.debug.callback(
          functools.partial(_underflow_warning, tau=tau), n, c),
      lambda n, c: None, n_under, count)
