"""Token and chunk log-likelihoods without a [B, T, V] float32 tensor.

ALM compares the log-likelihoods of aligned chunks of tokens (docs/method.md
§3).
A chunk's log-likelihood needs only two numbers per position out of the whole
next-token distribution: the log-prob of the observed next token, and
(for outcome-chunk debiasing) the log-prob that the next token starts with a
pretoken-boundary byte. Both are log-sum-exps over the vocabulary, so this
module reduces logits to per-position scalars in a blockwise pass over the
positions (`vocab_logsumexps`: a loop over blocks of rows, each reduced over
the whole vocabulary) whose backward pass is written by hand and recomputes
block by block: the float32 temporaries never exceed one block, and the only
[B, T, V] array the loss creates is the gradient itself, in the logits' dtype
(see `_slice_block` for how the loop avoids XLA CPU's hoisted float32 copy).

Chunks are given as one int32 chunk id per token (-1 = in no chunk), as
produced by `alm.align`; per-chunk quantities are per-row segment sums.

Conventions used by every loss in `alm.losses`:
  * Token `t`'s log-prob is read from the logits at position `t - 1`; position
    0 is never predicted (its log-prob is 0 and it makes its chunk invalid).
  * The boundary log-prob at position `t` is
    `log sum_{v in mask} p(v | tokens <= t)`, i.e. it is read at a chunk's last
    token and concerns the token that follows the chunk.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

_LOG2 = math.log(2.0)


def log1mexp(x: jax.Array) -> jax.Array:
  """`log(1 - exp(x))` for `x <= 0`, accurate everywhere (Maechler, 2012).

  Uses `log(-expm1(x))` near 0 and `log1p(-exp(x))` below `-log 2`; each
  branch only ever sees inputs that are safe for it (the "double where"), so
  the gradient is finite for every `x < 0`. At `x = 0` the value is `-inf`:
  callers keep `x` strictly negative.

  Args:
    x: array of non-positive values.

  Returns:
    `log(1 - exp(x))`, same shape and dtype.
  """
  near_zero = x > -_LOG2
  x_near = jnp.where(near_zero, x, -1.0)
  x_far = jnp.where(near_zero, -1.0, x)
  return jnp.where(near_zero, jnp.log(-jnp.expm1(x_near)),
                   jnp.log1p(-jnp.exp(x_far)))


# ---------------------------------------------------------------------------
# Vocabulary reductions.
# ---------------------------------------------------------------------------


def _stats_dtype(dtype):
  """float32 for bf16/f16/f32 logits; float64 logits (tests) stay float64."""
  return jnp.promote_types(jnp.float32, dtype)


def _logp(picked, m, s_other):
  """`log p(target) = picked - lse`, to full relative precision near 0.

  `lse = m + log(exp(picked - m) + s_other)` with `s_other` the sum of
  `exp(x_v - m)` over the other tokens. `picked - lse` rounds to 0 in float32
  once `p(target) > 1 - 6e-8 * lse` (any near-certain token when logits are
  ~20); written as `(picked - m) - log1p(expm1(picked - m) + s_other)` it is
  `-log1p(s_other)` for a winning target: exact down to the smallest floats.
  """
  d = picked - m  # <= 0
  return d - jnp.log1p(jnp.expm1(d) + s_other)


def _stats_fwd_math(logits, targets, mask):
  """Returns (lse, masked_lse, logp) as float32 [...]; fused by XLA."""
  f32 = _stats_dtype(logits.dtype)
  m = jnp.max(logits, axis=-1).astype(f32)  # [B, T]
  picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  picked = picked.astype(f32)
  vocab = jnp.arange(logits.shape[-1], dtype=targets.dtype)
  other = vocab != targets[..., None]  # the target is summed apart (_logp)
  e_t = jnp.exp(picked - m)
  if mask is None:
    e = jnp.exp(logits.astype(f32) - m[..., None])
    s_other = jnp.sum(jnp.where(other, e, 0.0), axis=-1)
    lse = m + jnp.log(s_other + e_t)
    return lse, None, _logp(picked, m, s_other)
  # The masked maximum keeps the masked log-sum-exp exact even when every
  # masked logit is > 88 below the overall maximum (exp would underflow). One
  # exp per element: masked entries are shifted by their own maximum.
  neg_inf = jnp.array(-jnp.inf, logits.dtype)
  mm = jnp.max(jnp.where(mask, logits, neg_inf), axis=-1).astype(f32)
  mm = jnp.where(jnp.isfinite(mm), mm, m)  # an empty mask: any finite shift
  shift = jnp.where(mask, mm[..., None], m[..., None])
  e = jnp.exp(logits.astype(f32) - shift)  # never stored: fused into sums
  s_masked_o = jnp.sum(jnp.where(mask & other, e, 0.0), axis=-1)
  s_rest_o = jnp.sum(jnp.where(mask | ~other, 0.0, e), axis=-1)
  # Whether the target is masked, as a reduction (a gather from the [V] mask
  # by batch-sharded ids has no unambiguous sharding).
  t_masked = jnp.any(mask & ~other, axis=-1)
  s_masked = s_masked_o + jnp.where(t_masked, jnp.exp(picked - mm), 0.0)
  s_rest = s_rest_o + jnp.where(t_masked, 0.0, e_t)
  # log(S_rest * e^m + S_masked * e^mm), computed around the larger shift.
  big = jnp.maximum(m, mm)
  lse = big + jnp.log(s_rest * jnp.exp(m - big) + s_masked * jnp.exp(mm - big))
  masked_lse = mm + jnp.log(s_masked)  # -inf only for an empty mask
  s_other = s_rest_o + s_masked_o * jnp.exp(mm - m)  # mm <= m
  return lse, masked_lse, _logp(picked, m, s_other)


def _stats_bwd_math(logits, targets, mask, lse, masked_lse, logp, g_lse,
                    g_mlse, g_logp):
  """d(lse, masked_lse, logp) / d logits, in the logits' dtype."""
  f32 = _stats_dtype(logits.dtype)
  x = logits.astype(f32)
  vocab = jnp.arange(logits.shape[-1], dtype=targets.dtype)
  onehot = vocab == targets[..., None]
  # d lse = softmax, d masked_lse = masked softmax, d logp = onehot - softmax.
  # The target's `1 - p` is `-expm1(logp)`, not 1 minus a rounded p (which
  # is 0 for a near-certain target); every other token gets `-p g_logp`.
  g_soft = jnp.where(onehot, g_lse[..., None],
                     (g_lse - g_logp)[..., None])  # [B, T, V]
  grad = jnp.where(onehot, (-jnp.expm1(logp) * g_logp)[..., None], 0.0)
  if mask is not None:
    # One exp per element: masked entries use exp(x - masked_lse) and rescale
    # to exp(x - lse) by the (<= 1) per-row factor exp(masked_lse - lse).
    safe_mlse = jnp.where(jnp.isfinite(masked_lse), masked_lse, lse)
    shift = jnp.where(mask, safe_mlse[..., None], lse[..., None])
    e = jnp.exp(x - shift)
    ratio = jnp.exp(safe_mlse - lse)[..., None]
    grad = grad + jnp.where(
        mask, e * (g_mlse[..., None] + g_soft * ratio), e * g_soft)
  else:
    grad = grad + jnp.exp(x - lse[..., None]) * g_soft
  return grad.astype(logits.dtype)


# Rows (batch x positions) per block of the vocabulary pass. A block's float32
# temporaries are at most `rows x V x 4` bytes (64 MiB at V = 262,144), so the
# loss's memory no longer depends on which elementwise ops XLA decides to fuse.
DEFAULT_BLOCK_ROWS = 64


def _block_len(b, t, block_rows):
  """Positions per block: blocks span the whole batch axis (so a batch-sharded
  input stays sharded inside the loop) and `block_rows // b` positions."""
  return max(1, min(t, block_rows // max(b, 1)))


def _slice_block(a, s, tb):
  """`a[:, s:s + tb]` of a loop-invariant array, inside a loop body.

  XLA's CPU backend upcasts bf16 data movement to float32, and its
  loop-invariant code motion then hoists the convert of the whole [B, T, V]
  logits out of the loop, rebuilding exactly the tensor the loop exists to
  avoid. Passing the array through an `optimization_barrier` together with
  the (loop-variant) offset makes it loop-variant, so nothing is hoisted and
  only the block is converted. (Slicing the raw bits instead also prevents
  the hoist, but XLA materialises the whole-array bitcast as a copy.)
  """
  if jnp.issubdtype(a.dtype, jnp.floating):
    a, s = jax.lax.optimization_barrier((a, s))
  return jax.lax.dynamic_slice_in_dim(a, s, tb, axis=1)


def _blockwise(fn, arrays, outs_init, tb, t):
  """Runs `fn` on position blocks [:, s:s + tb] and writes its outputs back.

  The last block starts at `t - tb` (clamped) and so may overlap the one
  before it: overlapping positions are recomputed and rewritten with the
  same values, which keeps every block the same static shape for any `t`.

  Args:
    fn: block arrays -> tuple of [B, tb, ...] outputs.
    arrays: inputs, each [B, T, ...] (sliced) or None/[V] (passed whole).
    outs_init: tuple of [B, T, ...] output buffers (updated in place).
    tb: static block length.
    t: static T.

  Returns:
    The filled output buffers.
  """
  nb = -(-t // tb)
  if nb == 1:
    return fn(*arrays)

  def body(i, outs):
    s = jnp.minimum(i * tb, t - tb)
    blk = [a if (a is None or a.ndim < 2) else _slice_block(a, s, tb)
           for a in arrays]
    new = fn(*blk)
    return tuple(jax.lax.dynamic_update_slice_in_dim(o, n, s, axis=1)
                 for o, n in zip(outs, new))

  return jax.lax.fori_loop(0, nb, body, tuple(outs_init))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _vocab_stats(logits, targets, mask, has_mask, block_rows):
  b, t, _ = logits.shape
  tb = _block_len(b, t, block_rows)
  # zeros_like keeps the ids' sharding (a batch-sharded input under explicit
  # sharding needs buffers sharded like the blocks written into them).
  zeros = jnp.zeros_like(targets, dtype=_stats_dtype(logits.dtype))
  if has_mask:
    fn = lambda x, tg: _stats_fwd_math(x, tg, mask)
    return _blockwise(fn, (logits, targets), (zeros,) * 3, tb, t)
  fn = lambda x, tg: (lambda r: (r[0], r[2]))(_stats_fwd_math(x, tg, None))
  lse, logp = _blockwise(fn, (logits, targets), (zeros,) * 2, tb, t)
  return lse, None, logp


def _vocab_stats_fwd(logits, targets, mask, has_mask, block_rows):
  out = _vocab_stats(logits, targets, mask, has_mask, block_rows)
  lse, masked_lse, logp = out
  # Residuals are the logits (alive anyway) and [B, T] scalars only.
  return out, (logits, targets, mask, lse, masked_lse, logp)


def _vocab_stats_bwd(has_mask, block_rows, res, g):
  logits, targets, mask, lse, masked_lse, logp = res
  g_lse, g_mlse, g_logp = g
  b, t, _ = logits.shape
  tb = _block_len(b, t, block_rows)
  if has_mask:
    fn = lambda *a: (_stats_bwd_math(a[0], a[1], mask, *a[2:]),)
    arrays = (logits, targets, lse, masked_lse, logp, g_lse, g_mlse, g_logp)
  else:
    fn = lambda x, tg, l, lp, gl, gp: (_stats_bwd_math(
        x, tg, None, l, None, lp, gl, None, gp),)
    arrays = (logits, targets, lse, logp, g_lse, g_logp)
  # The gradient buffer is the only [B, T, V] array: the blocks' gradients are
  # written into it in place.
  (grad,) = _blockwise(fn, arrays, (jnp.zeros_like(logits),), tb, t)
  return grad, None, None


_vocab_stats.defvjp(_vocab_stats_fwd, _vocab_stats_bwd)


def vocab_logsumexps(
    logits: jax.Array,
    targets: jax.Array,
    mask: jax.Array | None = None,
    *,
    block_rows: int = DEFAULT_BLOCK_ROWS,
) -> tuple[jax.Array, jax.Array | None, jax.Array]:
  """Log-sum-exps and target log-probs of every position, block by block.

  `lse[b, t] = log sum_v exp(logits[b, t, v])`,
  `masked_lse[b, t] = log sum_{v : mask[v]} exp(logits[b, t, v])`,
  `logp[b, t] = logits[b, t, targets[b, t]] - lse[b, t]`, all in float32
  (float64 for float64 logits); `logp` keeps full relative precision for a
  near-certain target (`_logp`), where the plain difference rounds to 0.

  The positions are processed in blocks of about `block_rows` rows (the whole
  batch times `block_rows // B` positions) in a `fori_loop`, both forward and
  backward (a custom VJP that recomputes each block from the logits), so the
  float32 temporaries never exceed one block whatever XLA fuses. The backward
  pass writes `g_lse * softmax + g_mlse * masked_softmax
  + g_logp * (onehot - softmax)`
  block by block into one gradient buffer in the logits' dtype (bf16 logits
  get a bf16 gradient): the only [B, T, V] array the loss creates, as for
  plain cross-entropy.

  Args:
    logits: [B, T, V] (any float dtype).
    targets: int [B, T] vocabulary ids (read only by `logp`).
    mask: optional bool [V].
    block_rows: rows (batch x positions) per block; >= 1.

  Returns:
    (lse, masked_lse or None, logp), each float32 [B, T].
  """
  if logits.ndim != 3:
    raise ValueError(f"logits must be [B, T, V], got shape {logits.shape}")
  if targets.shape != logits.shape[:2]:
    raise ValueError(
        f"ids must be [B, T] = {logits.shape[:2]} to match the logits, got "
        f"{targets.shape}")
  if mask is not None and mask.shape != logits.shape[-1:]:
    raise ValueError(
        f"boundary mask must be bool [V] = [{logits.shape[-1]}] (one entry per "
        f"vocabulary id of this model), got shape {mask.shape}")
  if not (isinstance(block_rows, int) and block_rows >= 1):
    raise ValueError(f"block_rows must be a positive int, got {block_rows!r}")
  targets = jnp.clip(targets.astype(jnp.int32), 0, logits.shape[-1] - 1)
  has_mask = mask is not None
  mask_arg = mask.astype(bool) if has_mask else jnp.zeros((0,), bool)
  return _vocab_stats(logits, targets, mask_arg, has_mask, block_rows)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TokenLogProbs:
  """Per-position log-probs of one model on its own tokens.

  Attributes:
    path: float32 [B, T]; `path[b, t] = log p(ids[b, t] | ids[b, <t])` for
      `t >= 1`, and 0 at `t = 0` (never predicted).
    boundary: float32 [B, T] or None; `log sum_{v in mask} p(v | ids[b, <=t])`,
      the probability that the token after position t starts with a
      pretoken-boundary byte (or is EOS).
  """

  path: jax.Array
  boundary: jax.Array | None


def token_logprobs(
    logits: jax.Array,
    ids: jax.Array,
    boundary_mask: jax.Array | None = None,
    *,
    block_rows: int = DEFAULT_BLOCK_ROWS,
) -> TokenLogProbs:
  """Next-token log-probs along the observed path, and boundary log-probs.

  `path[b, t] = logits[b, t-1, ids[b, t]] - logsumexp(logits[b, t-1])`
  (`path[:, 0] = 0`), and, with a mask,
  `boundary[b, t] = logsumexp(logits[b, t, mask]) - logsumexp(logits[b, t])`
  (docs/method.md §3).

  Args:
    logits: [B, T, V] logits of the model on `ids` (any float dtype).
    ids: int [B, T] token ids.
    boundary_mask: optional bool [V]: tokens whose first byte is a
      pretoken-boundary byte, or EOS (`tokenizer.boundary_token_mask()`).
    block_rows: rows per block of the vocabulary pass (`vocab_logsumexps`).

  Returns:
    A `TokenLogProbs`.
  """
  targets = jnp.concatenate(
      [ids[:, 1:], jnp.zeros_like(ids[:, :1])], axis=1)  # next token
  lse, masked_lse, logp = vocab_logsumexps(logits, targets, boundary_mask,
                                           block_rows=block_rows)
  path = jnp.pad(logp[:, :-1], ((0, 0), (1, 0)))
  boundary = None if masked_lse is None else masked_lse - lse
  return TokenLogProbs(path=path, boundary=boundary)


# ---------------------------------------------------------------------------
# Per-chunk reductions.
# ---------------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ChunkLogProbs:
  """Per-chunk quantities of one side (teacher or student), [B, C] each.

  Attributes:
    path: sum of the path log-probs of the chunk's tokens (float32).
    boundary: boundary log-prob read at the chunk's last token, or None.
    present: the chunk has at least one token on this side.
    valid: present, and every token is predicted (not position 0) and inside
      the loss mask: only then is `path` the chunk's full log-likelihood.
    last: position of the chunk's last token (0 where not present).
  """

  path: jax.Array
  boundary: jax.Array | None
  present: jax.Array
  valid: jax.Array
  last: jax.Array


def _row_segment_sum(values, seg, num):
  return jax.vmap(
      lambda v, s: jax.ops.segment_sum(v, s, num_segments=num))(values, seg)


def _row_segment_max(values, seg, num):
  return jax.vmap(
      lambda v, s: jax.ops.segment_max(v, s, num_segments=num))(values, seg)


def check_chunk_ids(chunk_ids: jax.Array, ids: jax.Array, name: str) -> None:
  """Raises a clear error when chunk ids do not match their token ids."""
  if chunk_ids.shape != ids.shape:
    raise ValueError(
        f"{name} chunk ids must have one entry per token, shape {ids.shape}; got "
        f"{chunk_ids.shape}. Pass the arrays returned by alm.align/align_batch.")
  if not jnp.issubdtype(chunk_ids.dtype, jnp.integer):
    raise ValueError(f"{name} chunk ids must be integers, got {chunk_ids.dtype}")


def chunk_logprobs(
    tok: TokenLogProbs,
    chunk_ids: jax.Array,
    num_chunks: int,
    loss_mask: jax.Array | None = None,
) -> ChunkLogProbs:
  """Chunk log-likelihoods `L_c = sum_{i in c} l_i` as per-row segment sums.

  Args:
    tok: the side's `TokenLogProbs` ([B, T]).
    chunk_ids: int [B, T]; chunk id per token, -1 for tokens in no chunk.
    num_chunks: static C; ids >= C are ignored (use max tokens per row).
    loss_mask: optional bool [B, T]; a chunk with any token outside the mask
      is invalid (its likelihood would mix trained and untrained text).

  Returns:
    A `ChunkLogProbs` with [B, C] arrays.
  """
  b, t = chunk_ids.shape
  cid = chunk_ids.astype(jnp.int32)
  inside = (cid >= 0) & (cid < num_chunks)
  seg = jnp.where(inside, cid, num_chunks)  # an overflow bucket, dropped
  pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  bad = pos == 0
  if loss_mask is not None:
    bad = bad | ~loss_mask.astype(bool)
  n_tok = _row_segment_sum(inside.astype(jnp.int32), seg, num_chunks + 1)
  n_bad = _row_segment_sum((inside & bad).astype(jnp.int32), seg,
                           num_chunks + 1)
  path = _row_segment_sum(jnp.where(inside, tok.path, 0.0), seg,
                          num_chunks + 1)
  last = _row_segment_max(jnp.where(inside, pos, -1), seg, num_chunks + 1)
  present = n_tok[:, :-1] > 0
  last = jnp.where(present, last[:, :-1], 0)
  boundary = None
  if tok.boundary is not None:
    boundary = jnp.take_along_axis(tok.boundary, last, axis=1)
  return ChunkLogProbs(
      path=path[:, :-1], boundary=boundary, present=present,
      valid=present & (n_bad[:, :-1] == 0), last=last)
