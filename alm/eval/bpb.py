"""Bits per byte: a likelihood measure comparable across tokenizers.

`bpb = -Σ log2 p(token_i | tokens_<i) / Σ bytes(token_i)` over the predicted
tokens of the texts. Tokens that are never predicted (the first token of a
sequence when the tokenizer adds no BOS) are left out of both sums, so the
number of bytes is exactly the bytes the model was asked to predict; special
tokens (BOS) are never targets.

`sequence_bits` is the one implementation of the sums (on logits, jittable,
over the log-probs of the scoring core `alm.eval.scoring`); `bits_per_byte`
runs it over texts, and the trainer's held-out evaluation over pipeline
batches.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from alm.eval import scoring
from alm.tokenization.base import ByteTokenizer


@dataclasses.dataclass(frozen=True)
class BpbResult:
  """Aggregate of a bits-per-byte evaluation."""

  bits: float
  bytes: int
  tokens: int

  @property
  def bpb(self) -> float:
    return self.bits / max(self.bytes, 1)

  @property
  def bits_per_token(self) -> float:
    return self.bits / max(self.tokens, 1)


def sequence_bits(logits: jax.Array, ids: jax.Array, target_mask: jax.Array,
                  num_bytes: jax.Array, *, per_row: bool = False
                  ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Bits, target bytes and target tokens of a batch of sequences.

  `bits = -Σ_{targets} log p(ids[b, t] | ids[b, <t]) / ln 2`, with the
  log-probs of the scoring core (`alm.eval.scoring.logit_scores`). Position
  0 is never a target (nothing predicts it), whatever `target_mask` says there.

  Args:
    logits: [B, T, V] logits of the model on `ids` (position t predicts
      token t + 1); any float dtype.
    ids: int [B, T] token ids.
    target_mask: bool [B, T], True on the tokens to score (e.g. not special,
      not padding; a pipeline batch's `loss_mask & (num_bytes > 0)`).
    num_bytes: int [B, T] text bytes of each token.
    per_row: sum each row on its own ([B] arrays) instead of the whole batch.

  Returns:
    (bits, bytes, tokens): float32 scalars summed over the targets ([B] with
    `per_row`); `bits / bytes` is bits per byte.
  """
  if not (logits.ndim == 3 and ids.shape == logits.shape[:2] == target_mask.shape
          == num_bytes.shape):
    raise ValueError(f"sequence_bits needs logits [B, T, V] and ids, target_mask, num_bytes "
                     f"[B, T]; got shapes {logits.shape}, {ids.shape}, {target_mask.shape}, "
                     f"{num_bytes.shape}.")
  lp = scoring.logit_scores(logits, ids).logprobs  # [B, T], 0 at t = 0
  m = jnp.asarray(target_mask, bool).at[:, 0].set(False)
  axis = 1 if per_row else None
  bits = (-jnp.sum(jnp.where(m, lp, 0.0), axis=axis) / jnp.log(2.0)).astype(jnp.float32)
  nbytes = jnp.sum(jnp.where(m, num_bytes, 0), axis=axis).astype(jnp.float32)
  return bits, nbytes, jnp.sum(m, axis=axis).astype(jnp.float32)


def bits_per_byte(model, tokenizer: ByteTokenizer, texts: Sequence[str], *,
                  max_tokens: int = 512, batch_size: int = 4) -> BpbResult:
  """Bits per byte of `model` on `texts` (each truncated to `max_tokens` tokens).

  Args:
    model: a callable `model(ids, attention_mask=mask) -> out` with `out.logits`
      [B, T, V] (an `alm.Transformer`).
    tokenizer: the model's tokenizer.
    texts: the texts; each is scored independently (no packing).
    max_tokens: truncation length per text, in tokens.
    batch_size: texts per forward.

  Returns:
    A `BpbResult` with the total bits, predicted bytes and predicted tokens.
  """
  if not texts:
    raise ValueError("bits_per_byte needs at least one text.")
  encs = [tokenizer.encode(t) for t in texts]
  bits, nbytes, ntok = 0.0, 0, 0
  for s in range(0, len(encs), batch_size):
    group = encs[s:s + batch_size]
    n = min(max(len(e) for e in group), max_tokens)
    ids = np.zeros((len(group), n), np.int32)
    mask = np.zeros((len(group), n), bool)
    target = np.zeros((len(group), n), bool)
    nb = np.zeros((len(group), n), np.int32)
    for r, e in enumerate(group):
      k = min(len(e), n)
      ids[r, :k] = e.ids[:k]
      mask[r, :k] = True
      target[r, 1:k] = ~e.special[1:k]
      nb[r, :k] = (e.ends - e.starts)[:k]
    lp = np.asarray(scoring.score_tokens(model, ids, mask).logprobs, np.float64)
    bits -= float(np.sum(lp[target])) / np.log(2.0)
    nbytes += int(np.sum(nb[target]))
    ntok += int(np.sum(target))
  return BpbResult(bits=bits, bytes=nbytes, tokens=ntok)
