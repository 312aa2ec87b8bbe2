"""Scoring text with a model: per-token log-probabilities and bits per byte."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from alm.models.transformer import Transformer, check_token_ids


@nnx.jit
def _next_token_logprobs(model: Transformer, ids: jax.Array, mask: jax.Array) -> jax.Array:
  logits = model(ids, attention_mask=mask).logits[:, :-1].astype(jnp.float32)  # [B,T-1,V]
  # log p(target) = logit[target] - logsumexp(logits): no [B, T, V] probabilities.
  target = jnp.take_along_axis(logits, ids[:, 1:, None], axis=-1)[..., 0]
  return target - jax.nn.logsumexp(logits, axis=-1)


def token_logprobs(model: Transformer, input_ids, attention_mask=None) -> np.ndarray:
  """log p(ids[:, t] | ids[:, :t]) for t >= 1.

  Args:
    model: the model.
    input_ids: int [B, T].
    attention_mask: optional [B, T] (1 = real token).

  Returns:
    float32 [B, T - 1]; entries whose target is padding are meaningless.
  """
  ids = np.asarray(input_ids)
  check_token_ids(ids, model.cfg.vocab_size)
  mask = np.ones(ids.shape, bool) if attention_mask is None else np.asarray(attention_mask, bool)
  return np.asarray(_next_token_logprobs(model, jnp.asarray(ids, jnp.int32), jnp.asarray(mask)))


def bits_per_byte(model: Transformer, tokenizer, text: str) -> float:
  """Bits per UTF-8 byte of `text` under the model (tokenizer-independent).

  Every token after the first is scored; the bytes counted are those of the
  scored non-special tokens (with a BOS, that is the whole text).

  Args:
    model: the model.
    tokenizer: its tokenizer (`alm.load_tokenizer` object with byte spans).
    text: the text.

  Returns:
    -sum log2 p(token) / bytes.
  """
  enc = tokenizer.encode(text)
  lp = token_logprobs(model, enc.ids[None])[0]
  scored = ~np.asarray(enc.special[1:], bool)
  nbytes = int((enc.ends[1:] - enc.starts[1:])[scored].sum())
  if nbytes == 0:
    raise ValueError("The text has no scored bytes (it needs at least two tokens).")
  return float(-lp[scored].sum() / math.log(2) / nbytes)
