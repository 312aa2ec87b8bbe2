"""Ensembles of models that share a tokenizer (docs/method.md §12, SPEC §12).

  ens, tok = load_ensemble(["gemma2-to-qwen2", "llama-to-qwen2", "qwen2.5-1.5b"])
  score_tokens(ens, ids, mask)                     # combined log-probs
  ALMLM(model=ens, tokenizer=tok)                  # lm-eval: likelihoods and generation
  generate_ensemble(ens, ids, max_new_tokens=32)   # lockstep generation

The members' next-token distributions are combined at every position over the
tokenizer's `vocab_size` ids (a model's embedding table may have more rows:
padding rows never enter the combination):

- `mode="prob"` (the paper's default), the mean of the probabilities:
  `log Σ_m w_m softmax(z_m)`, computed as a log-sum-exp of
  `log w_m + log_softmax(z_m)`; the ensemble's `logits` are log-probs.
- `mode="logit"`, the mean of the logits: `Σ_m w_m z_m`; the ensemble's
  `logits` are logits (not normalised). The scoring core
  (`alm.eval.scoring.score_tokens`) takes a log-softmax of whatever it gets,
  so both modes score correctly (a log-softmax of log-probs is the identity).

Members may differ in their special tokens (SPEC §12): the ensemble's ids
are the first tokenizer's, and each member whose vocabulary differs gets an
id map (`member_id_map`): regular tokens by their bytes, BOS and EOS by role
(a member without BOS gets its EOS, the harness's prefix rule), other specials
by their text. Each member thus reads its own BOS and specials; the combined
distribution covers the ids every member has (the others get probability 0,
each member's distribution renormalised over the shared ids), so a member's
own end-of-turn token is read at the one shared EOS id. Regular tokens must be
identical: models that tokenize text differently are refused.

Everything is combined in float32, whatever the members' compute dtype.
Generation (`generate_ensemble`) keeps one KV cache per member, chooses one
token per step from the combined distribution and feeds it to every member.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Literal

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from alm._validation import check_choice
from alm.models.generate import (GenerationResult, SamplingConfig, check_generation_inputs,
                                 decode_loop)
from alm.models.transformer import KVCache, check_token_ids
from alm.tokenization.base import ByteTokenizer

EnsembleMode = Literal["prob", "logit"]

_TRANSFER_FIX = ("Transfer them to one tokenizer first (python -m experiments.transfer_tokenizer "
                 "--model=NAME --target_tokenizer=TOKENIZER for each) and ensemble the exported "
                 "students.")


class EnsembleError(ValueError):
  """Models that cannot be ensembled (different vocabularies, bad weights or mode)."""


@flax.struct.dataclass
class EnsembleOutput:
  """What `Ensemble.__call__` returns.

  Attributes:
    logits: float32 [B, T, V] with V = the tokenizer's vocab_size: log-probs
      (mode "prob") or weighted mean logits (mode "logit").
    cache: one KVCache per member, or None when no cache was passed.
  """

  logits: jax.Array
  cache: tuple[KVCache, ...] | None


class Ensemble(nnx.Module):
  """Several models over one tokenizer, seen as one model.

  Usable wherever the toolkit takes a scoring model (`score_tokens`, `ALMLM`,
  `bits_per_byte`): `ensemble(ids, attention_mask=mask).logits` is the
  combined distribution [B, T, V].

  Args:
    models: the members (`alm.Transformer`s, or any module with the same call
      signature and a `cfg.vocab_size`); each has >= tokenizer.vocab_size
      output rows.
    tokenizer: the tokenizer they share; its `vocab_size` ids are combined.
    mode: "prob" (mean of probabilities) or "logit" (mean of logits).
    weights: one positive weight per model (normalised to sum to 1 here);
      default equal weights.

  Raises:
    EnsembleError: no models, an unknown mode, bad weights, or a model with
      fewer output rows than the tokenizer has ids.
  """

  def __init__(self, models: Sequence[nnx.Module], tokenizer: ByteTokenizer, *,
               mode: EnsembleMode = "prob", weights: Sequence[float] | None = None,
               id_maps: Sequence[np.ndarray | None] | None = None):
    models = list(models)
    if not models:
      raise EnsembleError("An ensemble needs at least one model; got none.")
    check_choice("mode", mode, EnsembleMode, error=EnsembleError)
    vocab = int(tokenizer.vocab_size)
    id_maps = [None] * len(models) if id_maps is None else list(id_maps)
    if len(id_maps) != len(models):
      raise EnsembleError(f"Got {len(id_maps)} id maps for {len(models)} models; pass one per "
                          "model (None: the model uses the tokenizer's ids).")
    for i, m in enumerate(models):
      rows = getattr(getattr(m, "cfg", None), "vocab_size", None)
      if rows is None:
        raise EnsembleError(f"Model {i} ({type(m).__name__}) has no cfg.vocab_size; ensemble "
                            "alm.Transformer models (alm.load_model loads them).")
      if id_maps[i] is not None:
        id_maps[i] = np.asarray(id_maps[i], np.int32)
        if id_maps[i].shape != (vocab,) or id_maps[i].max() >= rows:
          raise EnsembleError(f"Model {i}'s id map must be int [{vocab}] with ids < {rows} "
                              f"(its output rows), -1 where it lacks the token; got shape "
                              f"{id_maps[i].shape}, largest id {id_maps[i].max()}.")
      elif rows < vocab:
        raise EnsembleError(
            f"Model {i} has {rows} output rows but the tokenizer {tokenizer.name!r} has {vocab} "
            f"ids: it was not made for this tokenizer. {_TRANSFER_FIX}")
    if weights is None:
      weights = [1.0] * len(models)
    weights = [float(w) for w in weights]
    if len(weights) != len(models):
      raise EnsembleError(f"Got {len(weights)} weights for {len(models)} models; pass one "
                          "weight per model.")
    if not all(math.isfinite(w) and w > 0 for w in weights):
      raise EnsembleError(f"Ensemble weights must be positive and finite, got {weights}.")
    total = sum(weights)
    self.models = nnx.List(models)
    self.mode = mode
    self.weights = tuple(w / total for w in weights)
    self.vocab_size = vocab
    # The member's id of every shared id (identity: None), and which ids every member has.
    self.id_maps = nnx.List([None if a is None else _IdTable(jnp.asarray(np.maximum(a, 0)))
                             for a in id_maps])
    missing = np.zeros(vocab, bool)
    for a in id_maps:
      if a is not None:
        missing |= a < 0
    self.shared = None if not missing.any() else _IdTable(jnp.asarray(~missing))
    self._member_missing = tuple(None if a is None else frozenset(np.flatnonzero(a < 0).tolist())
                                 for a in id_maps)

  def _member_ids(self, m: int, ids: jax.Array) -> jax.Array:
    """The shared ids `ids` as member m's ids."""
    table = self.id_maps[m]
    return ids if table is None else jnp.take(table[...], ids, axis=0)

  def check_ids(self, ids) -> None:
    """Raises EnsembleError when concrete `ids` hold an id some member lacks."""
    if isinstance(ids, jax.core.Tracer) or not any(self._member_missing):
      return
    present = set(np.unique(np.asarray(ids)).tolist())
    for m, lacks in enumerate(self._member_missing):
      bad = sorted(present & lacks) if lacks else []
      if bad:
        raise EnsembleError(
            f"Token id(s) {bad[:5]} of the shared tokenizer are special tokens that model {m} "
            "does not have, so it cannot read them; leave them out of the text (or chat "
            "template) or ensemble models that share those tokens.")

  def combine(self, logits: Sequence[jax.Array]) -> jax.Array:
    """Combines the members' logits [..., V_m] (one per member) -> float32 [..., V].

    Mode "prob": `log Σ_m w_m softmax(z_m[..., :V])`; mode "logit":
    `Σ_m w_m z_m[..., :V]`.
    """
    if len(logits) != len(self.weights):
      raise EnsembleError(f"combine got {len(logits)} logits for {len(self.weights)} models.")
    v = self.vocab_size
    out = None
    for m, (w, z) in enumerate(zip(self.weights, logits)):
      table = self.id_maps[m]
      z = (z[..., :v] if table is None else jnp.take(z, table[...], axis=-1)).astype(jnp.float32)
      if self.shared is not None:  # ids some member lacks: probability 0 for everyone
        z = jnp.where(self.shared[...], z, -jnp.inf)
      if self.mode == "prob":
        # A running log-add-exp: never M stacked [B, T, V] tensors at once.
        term = jax.nn.log_softmax(z, axis=-1) + math.log(w)
        out = term if out is None else jnp.logaddexp(out, term)
      else:
        term = z * w
        out = term if out is None else out + term
    return out

  def init_cache(self, batch_size: int, max_length: int) -> tuple[KVCache, ...]:
    """One empty KV cache per member (each in its own compute dtype)."""
    return tuple(m.init_cache(batch_size, max_length) for m in self.models)

  def __call__(self, input_ids: jax.Array, *, attention_mask: jax.Array | None = None,
               cache: tuple[KVCache, ...] | None = None, last_only: bool = False
               ) -> EnsembleOutput:
    """Runs every member on `input_ids` and combines their distributions.

    Args:
      input_ids: int [B, T] token ids of the shared tokenizer.
      attention_mask: bool/int [B, T], 1 for real tokens (see `alm.Transformer`).
      cache: one KVCache per member (from `init_cache`), or None.
      last_only: combine only the last position (logits [B, 1, V]); what
        generation needs after a prefill.

    Returns:
      EnsembleOutput with the combined float32 logits [B, T, V] (log-probs in
      mode "prob") and the members' updated caches (None without `cache`).

    Raises:
      InputError: ids out of the tokenizer's range (when concrete), bad shapes.
      EnsembleError: a cache with the wrong number of members.
    """
    check_token_ids(input_ids, self.vocab_size)
    self.check_ids(input_ids)
    if cache is not None and len(cache) != len(self.models):
      raise EnsembleError(f"Got {len(cache)} caches for {len(self.models)} models; use "
                          "Ensemble.init_cache.")
    caches = (None,) * len(self.models) if cache is None else cache
    logits, new = [], []
    for i, (m, c) in enumerate(zip(self.models, caches)):
      out = m(self._member_ids(i, input_ids), attention_mask=attention_mask, cache=c)
      logits.append(out.logits[:, -1:] if last_only else out.logits)  # [B, T | 1, V_m]
      new.append(out.cache)
    return EnsembleOutput(logits=self.combine(logits),
                          cache=None if cache is None else tuple(new))

  def logits_at(self, input_ids: jax.Array, *, attention_mask: jax.Array | None = None,
                at: jax.Array) -> jax.Array:
    """The combined logits [B, K, V] at positions `at` [B, K] (see `Transformer.logits_at`)."""
    return self.unembed_at(self.final_hidden(input_ids, attention_mask=attention_mask), at)

  def final_hidden(self, input_ids: jax.Array, *, attention_mask: jax.Array | None = None
                   ) -> tuple[jax.Array, ...]:
    """Every member's last residual stream [B, T, D_m] (see `Transformer.final_hidden`)."""
    check_token_ids(input_ids, self.vocab_size)
    self.check_ids(input_ids)
    return tuple(m.final_hidden(self._member_ids(i, input_ids), attention_mask=attention_mask)
                 for i, m in enumerate(self.models))

  def unembed_at(self, hidden: Sequence[jax.Array], at: jax.Array) -> jax.Array:
    """The combined logits [B, K, V] at positions `at` of the members' `hidden`."""
    return self.combine([m.unembed_at(h, at) for m, h in zip(self.models, hidden)])

  def generate(self, input_ids, **kwargs) -> GenerationResult:
    """`generate_ensemble(self, input_ids, **kwargs)` (the harness calls this)."""
    return generate_ensemble(self, input_ids, **kwargs)


class _IdTable(nnx.Variable):
  """A constant table of the ensemble (an id map or a mask): state, never trained."""


# Tokenizer checks and loading --------------------------------------------------------


def _special_text(tok: ByteTokenizer, i: int) -> str | None:
  """The text of special id i ("<|im_end|>"), when the tokenizer can tell."""
  for get in (lambda: tok.hf_tokenizer.id_to_token(i), lambda: tok.sp.id_to_piece(i),
              lambda: tok.special_names[i]):
    try:
      text = get()
    except (AttributeError, IndexError, KeyError, TypeError):
      continue
    if text:
      return text
  return None


def member_id_map(shared: ByteTokenizer, member: ByteTokenizer, name: str = "model",
                  first: str = "the first model") -> np.ndarray | None:
  """How a member whose vocabulary differs from the shared one reads the shared ids.

  Args:
    shared: the ensemble's tokenizer (its ids are the ensemble's).
    member: a member's own tokenizer.
    name: the member's name, for errors.
    first: the shared tokenizer's model, for errors.

  Returns:
    None when the vocabularies are identical; else int32 [shared.vocab_size]:
    the member's id of each shared id, -1 where it has none. Regular tokens
    map by their bytes (the same id when it holds the same bytes), BOS to the
    member's BOS (its EOS when it has none, the harness's prefix rule), EOS to
    its EOS, other specials to the member's special of the same text.

  Raises:
    EnsembleError: the regular (non-special) tokens differ: the models
      tokenize text differently (names the member, how, and the fix).
  """
  if not vocabulary_differences(shared, member):
    return None
  sb, mb = shared.token_bytes, member.token_bytes
  s_special, m_special = shared.special_ids, member.special_ids
  by_bytes: dict[bytes, int] = {}
  for j, b in enumerate(mb):
    if j not in m_special:
      by_bytes.setdefault(b, j)
  shared_regular = {b for i, b in enumerate(sb) if i not in s_special}
  only = shared_regular.symmetric_difference(by_bytes)
  if only:
    ex = sorted(only)[:3]
    raise EnsembleError(
        f"{name!r} and {first!r} differ in {len(only)} regular (non-special) tokens, "
        f"e.g. {ex}: they tokenize text differently, so they do not share a tokenizer. "
        + _TRANSFER_FIX)
  out = np.full(len(sb), -1, np.int32)
  for i, b in enumerate(sb):
    if i not in s_special:
      out[i] = i if i < len(mb) and i not in m_special and mb[i] == b else by_bytes[b]
  texts = {t: j for j in m_special if (t := _special_text(member, j)) is not None}
  for i in s_special:
    if i == shared.bos_id:
      j = member.bos_id if member.bos_id is not None else member.eos_id
    elif i == shared.eos_id:
      j = member.eos_id
    else:
      j = texts.get(_special_text(shared, i))
    out[i] = -1 if j is None else j
  return out


def vocabulary_differences(a: ByteTokenizer, b: ByteTokenizer) -> list[str]:
  """How the vocabularies of `a` and `b` differ (empty when they are identical).

  Compared: vocab_size, every id's bytes, the special ids, BOS and EOS.
  """
  diffs = []
  if a.vocab_size != b.vocab_size:
    diffs.append(f"vocab_size {a.vocab_size} vs {b.vocab_size}")
  ta, tb = a.token_bytes, b.token_bytes
  bad = [i for i in range(min(len(ta), len(tb))) if ta[i] != tb[i]]
  if bad:
    i = bad[0]
    diffs.append(f"{len(bad)} ids have different bytes (first: id {i} is {ta[i]!r} vs "
                 f"{tb[i]!r})")
  sa, sb = frozenset(a.special_ids), frozenset(b.special_ids)
  if sa != sb:
    diffs.append(f"special ids differ ({sorted(sa ^ sb)[:8]} in only one)")
  for what in ("bos_id", "eos_id"):
    if getattr(a, what) != getattr(b, what):
      diffs.append(f"{what} {getattr(a, what)} vs {getattr(b, what)}")
  return diffs


def check_same_vocabulary(tokenizers: Sequence[tuple[str, ByteTokenizer]]) -> None:
  """Raises EnsembleError unless every tokenizer has the first one's vocabulary.

  Args:
    tokenizers: (model name, its tokenizer) pairs.

  Raises:
    EnsembleError: naming each model whose vocabulary differs from the first
      model's, how it differs, and the fix.
  """
  if not tokenizers:
    return
  name0, tok0 = tokenizers[0]
  problems = []
  for name, tok in tokenizers[1:]:
    diffs = vocabulary_differences(tok0, tok)
    if diffs:
      problems.append(f"{name!r} vs {name0!r}: {'; '.join(diffs)}")
  if problems:
    raise EnsembleError("Only models that share one tokenizer can be ensembled; these do not: "
                        + " | ".join(problems) + ". " + _TRANSFER_FIX)


def load_ensemble(names_or_paths: Sequence[str], *, mode: EnsembleMode = "prob",
                  weights: Sequence[float] | None = None, dtype=jnp.float32,
                  param_dtype=jnp.float32) -> tuple[Ensemble, ByteTokenizer]:
  """Loads models with `alm.load_model` and ensembles them.

  Each model's tokenizer is checked against the first one's as soon as it is
  loaded, so a mismatch fails before the rest are loaded.

  Args:
    names_or_paths: what `alm.load_model` reads (asset names, HF directories,
      .gguf files, exported students), one per member.
    mode: "prob" or "logit" (see `Ensemble`).
    weights: one positive weight per model (default equal).
    dtype: compute dtype of every member.
    param_dtype: parameter storage dtype of every member.

  Returns:
    (ensemble, the shared tokenizer).

  Raises:
    EnsembleError: no models, models whose regular (non-special) tokens
      differ (names them and the fix), bad mode or weights. Vocabularies that
      differ only in their special tokens are ensembled through id maps
      (`member_id_map`).
  """
  from alm.models.loading import load_model  # pylint: disable=import-outside-toplevel

  names = [str(n) for n in names_or_paths]
  if not names:
    raise EnsembleError("load_ensemble needs at least one model name or path.")
  check_choice("mode", mode, EnsembleMode, error=EnsembleError)
  models, maps, tokenizer = [], [], None
  for name in names:
    model, tok = load_model(name, dtype=dtype, param_dtype=param_dtype)
    if tokenizer is None:
      tokenizer = tok
    # Checked as each loads: a model that tokenizes differently fails before the rest load.
    maps.append(member_id_map(tokenizer, tok, name, names[0]))
    models.append(model)
  return Ensemble(models, tokenizer, mode=mode, weights=weights, id_maps=maps), tokenizer


# Lockstep generation -----------------------------------------------------------------


# `alm.models.generate`'s jitted generation, specialised to an ensemble: the
# prefill combines only the last position's distributions (not all T of them)
# and the cache is one KVCache per member; the loop is `decode_loop`.
@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "sampling"))
def _generate_ensemble(graphdef, state, ids, mask, key, eos_id, pad_id, *, max_new_tokens: int,
                       sampling: SamplingConfig):
  ens = nnx.merge(graphdef, state)
  b, t = ids.shape
  out = ens(ids, attention_mask=mask, cache=ens.init_cache(b, t + max_new_tokens),
            last_only=True)

  def step(tok, caches):  # one shared token per row, fed to every member
    o = ens(tok[:, None], cache=caches)
    return o.cache, o.logits[:, -1]

  return decode_loop(step, out.cache, out.logits[:, -1], key, eos_id, pad_id,
                     max_new_tokens=max_new_tokens, sampling=sampling)


def generate_ensemble(ensemble: Ensemble, input_ids, *, max_new_tokens: int,
                      attention_mask=None, sampling: SamplingConfig | None = None,
                      seed: int = 0, eos_id: int | None = None,
                      pad_id: int = 0) -> GenerationResult:
  """Continues `input_ids` with every member in lockstep (`alm.generate`'s contract).

  Each member keeps its own KV cache; at every step the members' next-token
  distributions are combined (per the ensemble's mode), one token is chosen
  from the combination (`sample_logits`: greedy takes its argmax, sampling
  divides it by the temperature) and fed to every member. Compiles once per
  (batch, prompt length, max_new_tokens, sampling).

  Args:
    ensemble: the ensemble; the other arguments are those of
      `alm.models.generate.generate` (left-padded prompts, greedy by default).

  Returns:
    GenerationResult with tokens [B, max_new_tokens] (ids < the tokenizer's
    vocab_size) and lengths [B].

  Raises:
    InputError: bad prompt shape/dtype, ids out of range, right padding.
  """
  if not isinstance(ensemble, Ensemble):
    raise TypeError(f"generate_ensemble needs an Ensemble, got {type(ensemble).__name__}; "
                    "for one model use alm.models.generate.generate.")
  sampling = sampling or SamplingConfig()
  ids, mask = check_generation_inputs(input_ids, attention_mask, ensemble.vocab_size,
                                      max_new_tokens)
  ensemble.check_ids(ids)
  graphdef, state = nnx.split(ensemble)
  tokens, lengths = _generate_ensemble(
      graphdef, state, jnp.asarray(ids, jnp.int32), jnp.asarray(mask), jax.random.key(seed),
      jnp.int32(-1 if eos_id is None else eos_id), jnp.int32(pad_id),
      max_new_tokens=max_new_tokens, sampling=sampling)
  return GenerationResult(tokens=np.asarray(tokens), lengths=np.asarray(lengths))
