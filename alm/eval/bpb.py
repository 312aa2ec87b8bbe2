"""Bits per byte: a likelihood measure comparable across tokenizers.

`bpb = -Σ log2 p(token_i | tokens_<i) / Σ bytes(token_i)` over the predicted
tokens of the texts. Tokens that are never predicted (the first token of a
sequence when the tokenizer adds no BOS) are left out of both sums, so the
number of bytes is exactly the bytes the model was asked to predict; special
tokens (BOS) are never targets.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

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


@nnx.jit
def _path_logprobs(model, ids, mask):
  logits = model(ids, attention_mask=mask).logits.astype(jnp.float32)  # [B, T, V]
  lp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
  return jnp.take_along_axis(lp, ids[:, 1:, None], axis=-1)[..., 0]


def _forward_logprobs(model, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """log p(ids[:, i] | ids[:, <i]) for i >= 1, [B, T-1], float32."""
  return np.asarray(_path_logprobs(model, jnp.asarray(ids), jnp.asarray(mask)))


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
    nb = np.zeros((len(group), n), np.int64)
    for r, e in enumerate(group):
      k = min(len(e), n)
      ids[r, :k] = e.ids[:k]
      mask[r, :k] = True
      target[r, 1:k] = ~e.special[1:k]
      nb[r, :k] = (e.ends - e.starts)[:k]
    lp = _forward_logprobs(model, ids, mask)  # [B, n-1]
    t = target[:, 1:]
    bits += float(-(lp[t]).astype(np.float64).sum() / math.log(2))
    nbytes += int(nb[:, 1:][t].sum())
    ntok += int(t.sum())
  return BpbResult(bits=bits, bytes=nbytes, tokens=ntok)
