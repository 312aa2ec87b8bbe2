"""Text generation with the KV cache: greedy, temperature, top-k and top-p sampling.

The prompt is run once through the model to fill the cache (prefill), then one
token per step inside a single jitted `lax.fori_loop`, so a whole generation
compiles once per (batch, prompt length, max_new_tokens, sampling options).
Batched prompts of different lengths must be left-padded (pass their
`attention_mask`); padding never enters attention and positions count real
tokens only.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from alm.models.transformer import InputError, Transformer, check_token_ids


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How the next token is chosen.

  Attributes:
    temperature: 0 means greedy (argmax); otherwise logits are divided by it.
    top_k: keep only the k most likely tokens (None: all).
    top_p: keep the smallest set of tokens whose probability reaches p (None: all).
  """

  temperature: float = 0.0
  top_k: int | None = None
  top_p: float | None = None

  def __post_init__(self):
    if self.temperature < 0:
      raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}.")
    if self.top_k is not None and self.top_k < 1:
      raise ValueError(f"top_k must be >= 1 or None, got {self.top_k}.")
    if self.top_p is not None and not 0 < self.top_p <= 1:
      raise ValueError(f"top_p must be in (0, 1] or None, got {self.top_p}.")


@dataclasses.dataclass(frozen=True)
class GenerationResult:
  """Generated tokens.

  Attributes:
    tokens: int32 [B, max_new_tokens]; after a row's EOS the rest is `pad_id`.
    lengths: int32 [B], generated tokens per row up to and including EOS.
  """

  tokens: np.ndarray
  lengths: np.ndarray


def sample_logits(logits: jax.Array, key: jax.Array, sampling: SamplingConfig) -> jax.Array:
  """Chooses one token per row of `logits` [B, V] -> int32 [B]."""
  if sampling.temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / sampling.temperature
  neg = jnp.finfo(jnp.float32).min
  if sampling.top_k is not None and sampling.top_k < logits.shape[-1]:
    kth = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, neg, logits)
  if sampling.top_p is not None and sampling.top_p < 1:
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    # Keep a token if the mass before it is still below p (always keeps the top one).
    keep_sorted = (cum - jax.nn.softmax(sorted_logits, axis=-1)) < sampling.top_p
    keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(
        keep_sorted)
    logits = jnp.where(keep, logits, neg)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def decode_loop(step, cache, logits, key, eos_id, pad_id, *, max_new_tokens: int,
                sampling: SamplingConfig):
  """The token-by-token loop after the prefill (traced inside a jit).

  Args:
    step: `step(tok [B], cache) -> (cache, next logits [B, V])`, one token
      through the model(s) with the cache.
    cache: the cache after the prefill.
    logits: [B, V] logits of the prompt's last position.
    key: sampling key.
    eos_id: int32 scalar; -1 never stops a row.
    pad_id: int32 filler after a row's EOS.
    max_new_tokens: tokens per row.
    sampling: how tokens are chosen.

  Returns:
    (tokens [B, max_new_tokens], lengths [B]).
  """
  b = logits.shape[0]
  tokens = jnp.full((b, max_new_tokens), pad_id, jnp.int32)
  done = jnp.zeros((b,), bool)
  lengths = jnp.zeros((b,), jnp.int32)

  def body(i, carry):
    cache, logits, key, tokens, done, lengths = carry
    key, sub = jax.random.split(key)
    tok = sample_logits(logits, sub, sampling)
    tok = jnp.where(done, pad_id, tok)
    tokens = tokens.at[:, i].set(tok)
    lengths = lengths + (~done).astype(jnp.int32)
    done = done | (tok == eos_id)  # eos_id -1: never
    # Tokens after a row's EOS are fillers; what they attend to does not matter.
    cache, logits = step(tok, cache)
    return cache, logits, key, tokens, done, lengths

  carry = (cache, logits, key, tokens, done, lengths)
  # The last step's forward is wasted work, but keeps the loop body uniform.
  _, _, _, tokens, _, lengths = jax.lax.fori_loop(0, max_new_tokens, body, carry)
  return tokens, lengths


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "sampling"))
def _generate(graphdef, state, ids, mask, key, eos_id, pad_id, *, max_new_tokens: int,
              sampling: SamplingConfig):
  model = nnx.merge(graphdef, state)
  b, t = ids.shape
  out = model(ids, attention_mask=mask, cache=model.init_cache(b, t + max_new_tokens))

  def step(tok, cache):
    o = model(tok[:, None], cache=cache)
    return o.cache, o.logits[:, -1]

  return decode_loop(step, out.cache, out.logits[:, -1], key, eos_id, pad_id,
                     max_new_tokens=max_new_tokens, sampling=sampling)


def check_generation_inputs(input_ids, attention_mask, vocab_size: int,
                            max_new_tokens: int) -> tuple[np.ndarray, np.ndarray]:
  """Validated (ids, bool mask) of left-padded prompts (shared by every generator).

  Raises:
    InputError: bad shape/dtype, ids out of range, max_new_tokens < 1, a mask
      of another shape, or a prompt whose last token is padding.
  """
  ids = np.asarray(input_ids)
  check_token_ids(ids, vocab_size)
  if max_new_tokens < 1:
    raise InputError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
  if ids.shape[1] == 0:
    raise InputError("The prompts are empty: a prompt needs at least one token (encode the "
                     "text with add_special_tokens=True for a BOS, or give some text).")
  mask = np.ones(ids.shape, bool) if attention_mask is None else np.asarray(attention_mask, bool)
  if mask.shape != ids.shape:
    raise InputError(f"attention_mask shape {mask.shape} != input_ids shape {ids.shape}.")
  if not mask[:, -1].all():
    raise InputError("Every prompt's last token must be real: left-pad batched prompts.")
  return ids, mask


def generate(model: Transformer, input_ids, *, max_new_tokens: int, attention_mask=None,
             sampling: SamplingConfig | None = None, seed: int = 0, eos_id: int | None = None,
             pad_id: int = 0) -> GenerationResult:
  """Continues `input_ids` with the KV cache.

  Args:
    model: the model.
    input_ids: int [B, T] prompts (left-padded when their lengths differ).
    max_new_tokens: tokens to generate per row.
    attention_mask: [B, T], 1 for real prompt tokens (default all ones).
    sampling: greedy by default; see SamplingConfig.
    seed: sampling seed (unused when greedy).
    eos_id: stop a row after this token (None: never stop early).
    pad_id: filler written after a row's EOS.

  Returns:
    GenerationResult with tokens [B, max_new_tokens] and lengths [B].

  Raises:
    InputError: bad prompt shape/dtype or ids out of range.
  """
  sampling = sampling or SamplingConfig()
  ids, mask = check_generation_inputs(input_ids, attention_mask, model.cfg.vocab_size,
                                      max_new_tokens)
  graphdef, state = nnx.split(model)
  tokens, lengths = _generate(graphdef, state, jnp.asarray(ids, jnp.int32), jnp.asarray(mask),
                              jax.random.key(seed), jnp.int32(-1 if eos_id is None else eos_id),
                              jnp.int32(pad_id), max_new_tokens=max_new_tokens,
                              sampling=sampling)
  return GenerationResult(tokens=np.asarray(tokens), lengths=np.asarray(lengths))
