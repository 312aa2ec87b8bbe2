"""The ALM objective: binarised f-divergences between aligned chunk likelihoods.

Source: Minixhofer, Vulic, Ponti, "Universal Cross-Tokenizer Distillation via
Approximate Likelihood Matching" (the paper in shared/seeds; SPEC sections
3-4). For aligned chunk c with teacher and student chunk log-likelihoods
`L^T_c`, `L^S_c` (path log-probs summed over the chunk, plus the
outcome-debiasing boundary log-prob), temperature `tau`,
`a_c = exp(L^T_c / tau)`, `b_c = exp(L^S_c / tau)`, the loss is

  mean over valid chunks c of the global batch of
  D(a_c, b_c) = f(a_c, b_c) + f(1 - a_c, 1 - b_c)

with `f(p, q) = p log(p / q)` (KL, default), `|p - q| / 2` (total variation,
so `D = |a - b|`) or `q log(q / p)` (reverse KL). Everything is computed in
log space with `log(1 - a) = log1mexp(L / tau)`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Literal, get_args

import jax
import jax.numpy as jnp

from alm.losses import chunks as chunks_lib
from alm.losses.reduce import LossSum

Divergence = Literal["kl", "tv", "reverse_kl"]
Constraint = Literal["unconstrained", "space", "unbiased", "boundary_prob"]


def _check_choice(name, value, literal):
  valid = get_args(literal)
  if value not in valid:
    raise ValueError(f"{name}={value!r} is not valid; choose one of {valid}")


@dataclasses.dataclass(frozen=True)
class ALMConfig:
  """Options of the ALM loss (SPEC section 4).

  Attributes:
    divergence: "kl" (default), "tv" or "reverse_kl".
    tau: temperature (> 0); `a = exp(L / tau)`. Paper default 100.
    constraint: which chunk boundaries to keep: "unconstrained", "space",
      "unbiased" (needs `chunk_bias`) or "boundary_prob" (on device, from
      the teacher's boundary probability; needs the teacher boundary mask).
    gamma: threshold of the "unbiased" and "boundary_prob" constraints.
    debias: add the outcome-chunk boundary log-prob to each chunk (needs
      both boundary masks).
    eps: `L / tau` is capped at `-eps`, i.e. chunk probabilities at
      `exp(-eps) < 1`, so that `log(1 - a)` and the gradients stay finite for
      chunks whose float32 log-likelihood is exactly 0. Both sides are capped
      identically, so identical likelihoods still give exactly 0.
    block_rows: rows (batch x positions) per block of the vocabulary pass
      (`alm.losses.chunks.vocab_logsumexps`); bounds the float32 temporaries
      at `block_rows x V x 4` bytes.
  """

  divergence: Divergence = "kl"
  tau: float = 100.0
  constraint: Constraint = "unconstrained"
  gamma: float = 0.1
  debias: bool = True
  eps: float = 1e-7
  block_rows: int = chunks_lib.DEFAULT_BLOCK_ROWS

  def __post_init__(self):
    _check_choice("divergence", self.divergence, Divergence)
    _check_choice("constraint", self.constraint, Constraint)
    if not (self.tau > 0 and math.isfinite(self.tau)):
      raise ValueError(f"tau must be a finite positive number, got {self.tau}")
    if not self.gamma > 0:
      raise ValueError(f"gamma must be positive, got {self.gamma}")
    if not 0 < self.eps < 1:
      raise ValueError(f"eps must be in (0, 1), got {self.eps}")
    if not (isinstance(self.block_rows, int) and self.block_rows >= 1):
      raise ValueError(f"block_rows must be a positive int, got "
                       f"{self.block_rows!r}")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Side:
  """One model's view of a batch (teacher or student).

  Attributes:
    logits: [B, T, V] logits of the model on `ids` (any float dtype).
    ids: int [B, T] token ids.
    chunk_ids: int [B, T] chunk id per token (-1 = in no chunk), from
      `alm.align`; chunk c is the same chunk on both sides of a row.
    loss_mask: optional bool [B, T]; chunks with a token outside it are not
      trained on.
    boundary_mask: optional bool [V], `tokenizer.boundary_token_mask(b)` with
      one boundary-byte set `b` for both sides,
      `alm.tokenization.vocab.shared_boundary_bytes(teacher_tok,
      student_tok)` (else the debiasing events differ between the sides);
      needed for debiasing and the "space"/"boundary_prob" constraints.
  """

  logits: jax.Array
  ids: jax.Array
  chunk_ids: jax.Array
  loss_mask: jax.Array | None = None
  boundary_mask: jax.Array | None = None


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ChunkBias:
  """Tokenization-bias differences of each chunk's last-token pair (SPEC 5).

  Looked up on the host from the precomputed sparse tables with the pairs of
  `last_token_pairs`; [B, C] float arrays.

  Attributes:
    b1: teacher-side bias `b1(v_T, v_S)` of chunk c's last tokens.
    b2: student-side bias `b2(v_T, v_S)`.
  """

  b1: jax.Array
  b2: jax.Array


# ---------------------------------------------------------------------------
# Binarised divergences with exact-zero gradients at a == b.
# ---------------------------------------------------------------------------


def _parts(la, lb):
  a, b = jnp.exp(la), jnp.exp(lb)
  return a, b, chunks_lib.log1mexp(la), chunks_lib.log1mexp(lb)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def binarised_divergence(log_a: jax.Array, log_b: jax.Array,
                         divergence: Divergence = "kl") -> jax.Array:
  """`D(a, b) = f(a, b) + f(1 - a, 1 - b)` from `log a`, `log b` (< 0).

  KL: `a log(a/b) + (1-a) log((1-a)/(1-b))`; reverse KL: the same with a and b
  swapped; TV: `|a - b|`. The derivatives are written in a form that is
  exactly 0 when `log_a == log_b` (e.g. KL: `dD/dlog b = (b - a) / (1 - b)`),
  so a student identical to its teacher gets gradient 0, not rounding noise.

  Args:
    log_a: teacher chunk log-probs (already divided by tau), strictly < 0.
    log_b: student chunk log-probs, same shape, strictly < 0.
    divergence: "kl", "tv" or "reverse_kl".

  Returns:
    D, elementwise.
  """
  a, b, l1a, l1b = _parts(log_a, log_b)
  if divergence == "kl":
    return a * (log_a - log_b) + (1 - a) * (l1a - l1b)
  if divergence == "reverse_kl":
    return b * (log_b - log_a) + (1 - b) * (l1b - l1a)
  if divergence == "tv":
    return jnp.abs(a - b)
  raise ValueError(f"divergence={divergence!r}; choose one of "
                   f"{get_args(Divergence)}")


@binarised_divergence.defjvp
def _binarised_divergence_jvp(divergence, primals, tangents):
  la, lb = primals
  ta, tb = tangents
  a, b, l1a, l1b = _parts(la, lb)
  out = binarised_divergence(la, lb, divergence)
  if divergence == "kl":
    da = a * ((la - lb) - (l1a - l1b))
    db = (b - a) * jnp.exp(-l1b)
  elif divergence == "reverse_kl":
    da = (a - b) * jnp.exp(-l1a)
    db = b * ((lb - la) - (l1b - l1a))
  else:
    da = jnp.sign(a - b) * a
    db = jnp.sign(b - a) * b
  return out, da * ta + db * tb


# ---------------------------------------------------------------------------
# Chunk constraints and the loss.
# ---------------------------------------------------------------------------


def _exclusive_cumsum(x):
  return jnp.cumsum(x, axis=1) - x


def last_token_pairs(
    teacher_ids: jax.Array, teacher_chunk_ids: jax.Array,
    student_ids: jax.Array, student_chunk_ids: jax.Array,
    num_chunks: int | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The (teacher, student) last-token pair of every chunk, for bias lookups.

  Args:
    teacher_ids, teacher_chunk_ids: int [B, T_T].
    student_ids, student_chunk_ids: int [B, T_S].
    num_chunks: static C (default `min(T_T, T_S)`).

  Returns:
    (v_T, v_S, present): int32 [B, C] token ids (0 where absent) and a bool
    [B, C] mask of chunks present on both sides.
  """
  c = num_chunks or min(teacher_ids.shape[1], student_ids.shape[1])
  out = []
  for ids, cids in ((teacher_ids, teacher_chunk_ids),
                    (student_ids, student_chunk_ids)):
    zero = chunks_lib.TokenLogProbs(
        path=jnp.zeros(ids.shape, jnp.float32), boundary=None)
    ch = chunks_lib.chunk_logprobs(zero, jnp.asarray(cids), c)
    out.append((jnp.take_along_axis(jnp.asarray(ids), ch.last, axis=1),
                ch.present))
  (vt, pt), (vs, ps) = out
  return vt.astype(jnp.int32), vs.astype(jnp.int32), pt & ps


def _next_starts_with_boundary(side: Side, ch: chunks_lib.ChunkLogProbs):
  t = side.ids.shape[1]
  nxt = jnp.minimum(ch.last + 1, t - 1)
  nxt_ids = jnp.take_along_axis(side.ids, nxt, axis=1)
  starts = side.boundary_mask[jnp.clip(nxt_ids, 0, side.boundary_mask.shape[0]
                                       - 1)]
  # A chunk ending the row has no next token: its boundary is the row's end.
  return starts | (ch.last + 1 >= t)


def _keep_boundaries(config, teacher, student, ct, cs, chunk_bias):
  """bool [B, C]: keep the boundary after chunk c (else merge into c + 1)."""
  if config.constraint == "unconstrained":
    return jnp.ones(ct.present.shape, bool)
  if config.constraint == "space":
    return (_next_starts_with_boundary(teacher, ct)
            & _next_starts_with_boundary(student, cs))
  if config.constraint == "boundary_prob":
    return ct.boundary > math.log(config.gamma)
  # "unbiased"
  return (chunk_bias.b1 <= config.gamma) & (chunk_bias.b2 <= config.gamma)


def _validate(config, teacher, student, chunk_bias):
  for name, side in (("teacher", teacher), ("student", student)):
    chunks_lib.check_chunk_ids(side.chunk_ids, side.ids, name)
    needs_mask = config.debias or config.constraint == "space"
    if needs_mask and side.boundary_mask is None:
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
  if config.constraint == "unbiased" and chunk_bias is None:
    raise ValueError(
        "constraint='unbiased' needs chunk_bias=ChunkBias(b1, b2) looked up "
        "from the bias tables with last_token_pairs(...)")


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
    chunk_bias: ChunkBias | None = None, num_chunks: int | None = None,
) -> AlignedChunks:
  """Chunk log-likelihoods of both sides after the chunk constraint.

  The teacher's logits are wrapped in `stop_gradient` (the teacher is frozen).

  Args:
    teacher: the teacher's `Side`.
    student: the student's `Side`.
    config: an `ALMConfig`.
    chunk_bias: per-chunk bias differences (constraint "unbiased" only).
    num_chunks: static number of chunk slots C (default `min(T_T, T_S)`).

  Returns:
    `AlignedChunks` ([B, C]); merged group g occupies slot g (groups are
    numbered in order), unused slots are invalid.
  """
  _validate(config, teacher, student, chunk_bias)
  c = num_chunks or min(teacher.ids.shape[1], student.ids.shape[1])
  sides = []
  for side, frozen in ((teacher, True), (student, False)):
    logits = jax.lax.stop_gradient(side.logits) if frozen else side.logits
    need_boundary = (config.debias or (frozen and
                                       config.constraint == "boundary_prob"))
    tok = chunks_lib.token_logprobs(
        logits, side.ids, side.boundary_mask if need_boundary else None,
        block_rows=config.block_rows)
    sides.append(chunks_lib.chunk_logprobs(tok, side.chunk_ids, c,
                                           side.loss_mask))
  ct, cs = sides
  present = ct.present | cs.present
  bad = present & ~(ct.valid & cs.valid)
  # An invalid chunk always ends its group, so it only spoils the group it
  # would have joined, never the one after it.
  keep = _keep_boundaries(config, teacher, student, ct, cs, chunk_bias) | bad
  group = _exclusive_cumsum(keep.astype(jnp.int32))  # [B, C]
  seg_sum = functools.partial(chunks_lib._row_segment_sum, seg=group, num=c)
  g_present = seg_sum(present.astype(jnp.int32)) > 0
  g_bad = seg_sum(bad.astype(jnp.int32)) > 0
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
    chunk_bias: ChunkBias | None = None, num_chunks: int | None = None,
) -> LossSum:
  """The ALM loss as (sum over valid chunks of D, number of valid chunks).

  `D(a_c, b_c)` with `a_c = exp(min(L^T_c / tau, -eps))`,
  `b_c = exp(min(L^S_c / tau, -eps))` (module docstring; Minixhofer et al.,
  "Universal Cross-Tokenizer Distillation via Approximate Likelihood
  Matching"). Take `.mean()` for one global batch, or see
  `alm.losses.reduce` for accumulation and multi-device means.

  Args:
    teacher: the teacher's `Side` (gradients are stopped).
    student: the student's `Side`.
    config: an `ALMConfig`.
    chunk_bias: `ChunkBias` for constraint "unbiased".
    num_chunks: static chunk slots C (default `min(T_T, T_S)`).

  Returns:
    A `LossSum`.
  """
  ch = aligned_chunk_logprobs(teacher, student, config, chunk_bias=chunk_bias,
                              num_chunks=num_chunks)
  la = jnp.minimum(ch.teacher / config.tau, -config.eps)
  lb = jnp.minimum(ch.student / config.tau, -config.eps)
  # Invalid slots get a harmless value so no NaN leaks into the gradient.
  la = jnp.where(ch.valid, la, -1.0)
  lb = jnp.where(ch.valid, lb, -1.0)
  d = binarised_divergence(la, lb, config.divergence)
  total = jnp.sum(jnp.where(ch.valid, d, 0.0))
  return LossSum(total=total, count=jnp.sum(ch.valid).astype(jnp.float32))
