"""The one scoring core: per-token log-probs (and greedy flags) of token ids.

Everything that scores text goes through `logit_scores` (on logits, jittable)
or `score_tokens` (model forward + `logit_scores`): bits per byte
(`alm.eval.bpb`), the trainer's held-out evaluation (via `sequence_bits`), the
lm-eval backend (`alm.eval.harness`) and ensembles (`alm.eval.ensemble`, whose
"logits" are the combined log-probs). There is no second copy.

`logprobs[b, t] = log p(ids[b, t] | ids[b, <t])` with the blockwise
log-softmax of `alm.losses.chunks.token_logprobs` (precise for near-certain
tokens), and `greedy[b, t] = argmax logits[b, t - 1] == ids[b, t]` (the
harness's `is_greedy`, ties broken toward the lowest id as `argmax` does).
Position 0 is never predicted: `logprobs[:, 0] = 0`, `greedy[:, 0] = False`.

`score_positions` scores only chosen positions (the continuation of an lm-eval
request): the model's output layer runs on those K positions alone (a model's
`logits_at`), not on all T — the output layer is 20–65 % of a small model's
forward (a 49k–262k vocabulary), and a multiple-choice request scores a few
tokens after a long context. Same numbers as `score_tokens` at those positions
(`target_scores` is the arithmetic of both). A model with `final_hidden` and
`unembed_at` (`alm.Transformer`, byte students, ensembles) runs its body once
and the output layer on blocks of positions whose logits stay under
`LOGIT_BLOCK_BYTES`, so a rolling window of 8 x 1024 tokens over a 262k
vocabulary never holds its 9 GB of logits at once.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from alm.losses import chunks as chunks_lib


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TokenScores:
  """Per-token scores of a batch.

  Attributes:
    logprobs: float32 [B, T], log p(ids[t] | ids[<t]) (natural log); 0 at t = 0.
    greedy: bool [B, T], whether ids[t] is the argmax after ids[<t]; False at
      t = 0 (None when not asked for).
  """

  logprobs: jax.Array
  greedy: jax.Array | None = None


def logit_scores(logits: jax.Array, ids: jax.Array, *, greedy: bool = False) -> TokenScores:
  """Scores `ids` under `logits` (position t - 1 predicts token t).

  Args:
    logits: [B, T, V] logits (or log-probs) of a model on `ids`; any float dtype.
    ids: int [B, T] token ids.
    greedy: also compute the greedy flags (an argmax over the vocabulary).

  Returns:
    A `TokenScores`.
  """
  if not (logits.ndim == 3 and ids.shape == logits.shape[:2]):
    raise ValueError(f"logit_scores needs logits [B, T, V] and ids [B, T]; got shapes "
                     f"{logits.shape} and {ids.shape}.")
  if ids.shape[1] < 2:  # one token: nothing is predicted
    zeros = jnp.zeros(ids.shape, jnp.float32)
    return TokenScores(logprobs=zeros, greedy=jnp.zeros(ids.shape, bool) if greedy else None)
  sc = target_scores(logits[:, :-1], ids[:, 1:], greedy=greedy)  # position t - 1 -> token t
  pad = lambda x: jnp.pad(x, ((0, 0), (1, 0)))  # nothing predicts position 0
  return TokenScores(logprobs=pad(sc.logprobs), greedy=None if sc.greedy is None
                     else pad(sc.greedy))


def target_scores(logits: jax.Array, targets: jax.Array, *, greedy: bool = False
                  ) -> TokenScores:
  """Scores `targets[b, k]` under the distribution `logits[b, k]` (no shift).

  Args:
    logits: [B, K, V] logits (or log-probs); any float dtype.
    targets: int [B, K] token ids.
    greedy: also compute whether each target is the argmax.

  Returns:
    A `TokenScores` of shape [B, K].
  """
  if not (logits.ndim == 3 and targets.shape == logits.shape[:2]):
    raise ValueError(f"target_scores needs logits [B, K, V] and targets [B, K]; got shapes "
                     f"{logits.shape} and {targets.shape}.")
  _, _, lp = chunks_lib.vocab_logsumexps(logits, targets)
  lp = lp.astype(jnp.float32)
  if not greedy:
    return TokenScores(logprobs=lp)
  return TokenScores(logprobs=lp, greedy=jnp.argmax(logits, axis=-1) == targets)


@nnx.jit(static_argnames=("greedy",))
def _score(model, ids, attention_mask, greedy):
  logits = model(ids, attention_mask=attention_mask).logits  # [B, T, V]
  return logit_scores(logits, ids, greedy=greedy)


def score_tokens(model, ids, attention_mask=None, *, greedy: bool = False) -> TokenScores:
  """Runs `model` on right-padded `ids` and scores every token.

  Args:
    model: a callable `model(ids, attention_mask=mask) -> out` with
      `out.logits` [B, T, V] (an `alm.Transformer`, an `alm.eval.Ensemble`).
    ids: int [B, T] token ids, right-padded (padding only after a row's last
      real token, so it never changes the scores of the real ones).
    attention_mask: bool [B, T], True on real tokens (default: all).
    greedy: also compute the greedy flags.

  Returns:
    A `TokenScores` (jax arrays); scores at padded positions are meaningless.
  """
  ids = jnp.asarray(ids, jnp.int32)
  mask = jnp.ones(ids.shape, bool) if attention_mask is None else jnp.asarray(attention_mask, bool)
  return _score(model, ids, mask, greedy)


def logits_at(model, ids: jax.Array, attention_mask: jax.Array, at: jax.Array) -> jax.Array:
  """The model's logits [B, K, V] at positions `at` [B, K] of a forward over `ids`.

  Uses `model.logits_at` (an `alm.Transformer`, an `alm.eval.Ensemble`: the
  output layer runs on the K positions only, when traced under `jit`), else
  the full logits gathered.
  """
  if hasattr(model, "logits_at"):
    return model.logits_at(ids, attention_mask=attention_mask, at=at)
  full = model(ids, attention_mask=attention_mask).logits
  return jnp.take_along_axis(full, at[..., None], axis=1)


# The most bytes of float32 logits one block of scored positions may hold (per
# model): a rolling window scores every position of 8 rows x 1024 tokens, whose
# logits over a 151k-262k vocabulary would be 5-9 GB at once (x members, for an
# ensemble). Blocks of positions keep it to this bound at the same arithmetic.
LOGIT_BLOCK_BYTES = 1 << 28


def _block_positions(batch: int, positions: int, vocab: int) -> int:
  """How many positions per block keep [batch, block, vocab] float32 under the bound."""
  per = max(1, LOGIT_BLOCK_BYTES // max(1, batch * vocab * 4))
  return positions if per >= positions else max(1, 1 << (per.bit_length() - 1))


@nnx.jit(static_argnames=("greedy",))
def _score_at(model, ids, attention_mask, at, greedy):
  targets = jnp.take_along_axis(ids, at, axis=1)
  src = at - 1  # position t - 1 predicts token t
  if not (hasattr(model, "final_hidden") and hasattr(model, "unembed_at")):
    return target_scores(logits_at(model, ids, attention_mask, src), targets, greedy=greedy)
  # The body once, the output layer on blocks of positions (bounded logits memory).
  hidden = model.final_hidden(ids, attention_mask=attention_mask)
  b, k = at.shape
  vocab = jax.eval_shape(lambda h, a: model.unembed_at(h, a), hidden, src[:, :1]).shape[-1]
  block = _block_positions(b, k, vocab)
  if block >= k:
    return target_scores(model.unembed_at(hidden, src), targets, greedy=greedy)
  n = -(-k // block)
  pad = n * block - k  # padding repeats the last position; its scores are dropped
  src = jnp.pad(src, ((0, 0), (0, pad)), mode="edge")
  targets = jnp.pad(targets, ((0, 0), (0, pad)), mode="edge")
  blocks = lambda x: x.reshape(b, n, block).swapaxes(0, 1)  # [n, B, block]

  def one(args):
    s, t = args
    sc = target_scores(model.unembed_at(hidden, s), t, greedy=greedy)
    return sc.logprobs, sc.greedy

  lp, gr = jax.lax.map(one, (blocks(src), blocks(targets)))
  unblock = lambda x: x.swapaxes(0, 1).reshape(b, n * block)[:, :k]
  return TokenScores(logprobs=unblock(lp), greedy=None if gr is None else unblock(gr))


def score_positions(model, ids, attention_mask, at, *, greedy: bool = False) -> TokenScores:
  """Scores the tokens at positions `at` only: `score_tokens(...)[b, at[b, k]]`.

  Args:
    model: as for `score_tokens`.
    ids: int [B, T] token ids, right-padded.
    attention_mask: bool [B, T], True on real tokens.
    at: int [B, K] positions to score, each in 1..T-1 (position 0 has no
      prediction); repeat a position to pad a row.
    greedy: also compute the greedy flags.

  Returns:
    A `TokenScores` of shape [B, K].

  Raises:
    ValueError: a position outside 1..T-1 (checked on concrete values).
  """
  ids = jnp.asarray(ids, jnp.int32)
  at = jnp.asarray(at, jnp.int32)
  if at.ndim != 2 or at.shape[0] != ids.shape[0]:
    raise ValueError(f"at must be [B, K] with B = {ids.shape[0]}; got shape {at.shape}.")
  if not isinstance(at, jax.core.Tracer) and at.size and (int(at.min()) < 1
                                                         or int(at.max()) >= ids.shape[1]):
    raise ValueError(f"Positions must be in 1..{ids.shape[1] - 1} (position 0 is never "
                     f"predicted); got {int(at.min())}..{int(at.max())}.")
  mask = jnp.ones(ids.shape, bool) if attention_mask is None else jnp.asarray(attention_mask, bool)
  return _score_at(model, ids, mask, at, greedy)
