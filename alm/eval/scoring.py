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
  lp = chunks_lib.token_logprobs(logits, ids).path.astype(jnp.float32)  # [B, T], 0 at t = 0
  if not greedy:
    return TokenScores(logprobs=lp)
  best = jnp.argmax(logits[:, :-1], axis=-1)  # [B, T - 1]
  g = jnp.pad(best == ids[:, 1:], ((0, 0), (1, 0)))
  return TokenScores(logprobs=lp, greedy=g)


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
