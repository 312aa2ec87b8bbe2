"""An lm-eval backend for every model the toolkit loads (no fork of lm-eval).

  from alm.eval.harness import ALMLM
  import lm_eval
  lm = ALMLM("smollm2-135m-instruct")            # asset, HF dir, .gguf, exported student
  lm = ALMLM(model=model, tokenizer=tok)         # or objects already in memory
  lm_eval.simple_evaluate(model=lm, tasks=[...], task_manager=...)

or from lm-eval's own command line, once this module is imported
(`--model alm --model_args pretrained=NAME,batch_size=8`).

Conventions (docs/method.md §12), chosen so the numbers compare with the
harness's published ones:
- `loglikelihood(context, continuation)`: trailing whitespace of the context
  moves to the continuation; context + continuation are encoded jointly and
  the continuation's tokens are those holding any of its bytes (a token that
  straddles the boundary counts, as in lm-eval's HF model where the joint
  encoding is split after the context's own tokens). A continuation token that
  nothing precedes is conditioned on the prefix token: BOS when the tokenizer
  has one, else EOS (lm-eval's `prefix_token_id`). `is_greedy` is True when
  every continuation token is the argmax.
- `loglikelihood_rolling(text)`: lm-eval's rolling windows of `max_length`
  tokens (`get_rolling_token_windows`, context 1), every token predicted, the
  first from the prefix token; the sum of log-probs.
- `generate_until(context, gen_kwargs)`: greedy unless `do_sample`, at most
  `max_gen_toks` tokens, cut at the first `until` string; stops at EOS.
- Long inputs keep their last `max_length` input tokens (the last token of a
  scored sequence is a target only, as in lm-eval's HF model).

Scoring goes through `alm.eval.scoring.score_positions` (the one scoring core, at the
continuation's positions).
Requests are sorted by length and padded to a few fixed lengths (powers of two
and their midpoints) with a fixed number of rows per length, so a run compiles
once per length bucket, never per request.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

try:
  from lm_eval.api.model import LM
  from lm_eval.api.registry import register_model
  from lm_eval import utils as lm_utils
except ImportError as e:  # pragma: no cover - depends on the install
  raise ImportError("The lm-eval backend needs lm-eval: pip install -e '.[eval]' "
                    "(or `make setup`, which installs it).") from e

from alm.eval import scoring
from alm.tokenization import chat as chat_lib
from alm.tokenization.base import ByteTokenizer, Encoding, TokenizerError

log = logging.getLogger(__name__)

_MIN_BUCKET = 16


def _bucket(n: int, cap: int) -> int:
  """The padded length of an n-token row: the smallest of 16, 24, 32, 48, 64,
  96, ... (powers of two and their midpoints) that holds n, capped at `cap`.
  At most a third of a row is padding; a run compiles about twice per doubling
  of the length."""
  b = _MIN_BUCKET
  while b < n:
    b = b * 3 // 2 if (b & (b - 1)) == 0 else b * 4 // 3
  return min(b, cap)


# Scored positions per row (the continuation's tokens) are padded to one of these;
# a group whose longest continuation needs more than half its row scores all T - 1
# predicted positions. Each (row length, K) pair compiles once.
_SCORED_BUCKETS = (4, 16, 64)


def _scored_bucket(n: int, t: int) -> int | None:
  """K positions to score for continuations of up to n tokens in rows of t (None: all t - 1)."""
  for k in _SCORED_BUCKETS:
    if n <= k and 2 * k <= t:
      return k
  return None


def _progress(total: int, desc: str, disable: bool):
  from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
  return tqdm(total=total, desc=desc, disable=disable, leave=False)


@register_model("alm")
class ALMLM(LM):
  """lm-eval's `LM` over an `alm` model and its tokenizer.

  Args:
    pretrained: what `alm.load_model` loads (asset name, HF directory, .gguf,
      an exported student); or None with `model` and `tokenizer`.
    model: a model object, `model(ids, attention_mask=mask).logits` [B, T, V]
      (an `alm.Transformer`, an `alm.eval.Ensemble`).
    tokenizer: its `ByteTokenizer`.
    batch_size: rows per forward (at most; see `max_batch_tokens`).
    max_length: the longest input, in tokens (longer ones keep their end).
    max_batch_tokens: rows × length per forward; bounds the [B, T, V] logits.
    max_gen_toks: default generation budget when a task gives none.
    dtype: compute dtype when loading by name ("float32" or "bfloat16").
    chat_family: the chat template for `apply_chat_template` (default: the
      family detected from the tokenizer's markers).
    name: the label of this model in results (default: `pretrained`).
    device, max_batch_size: accepted for lm-eval's command line; unused (JAX
      places arrays on its default device).
  """

  def __init__(self, pretrained: str | None = None, *, model=None,
               tokenizer: ByteTokenizer | None = None, batch_size: int | str = 8,
               max_length: int = 1024, max_batch_tokens: int = 8192, max_gen_toks: int = 256,
               dtype: str = "float32", chat_family: str | None = None, name: str | None = None,
               device: str | None = None, max_batch_size: int | None = None):
    super().__init__()
    del device, max_batch_size
    if (pretrained is None) == (model is None):
      raise ValueError("Pass either `pretrained` (a name or path alm.load_model reads) or "
                       "`model` and `tokenizer`, not both and not neither.")
    if pretrained is not None:
      import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
      from alm.models.loading import load_model  # pylint: disable=import-outside-toplevel
      dtypes = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
      if dtype not in dtypes:
        raise ValueError(f"Unknown dtype {dtype!r}; valid: {', '.join(dtypes)}.")
      model, tokenizer = load_model(pretrained, dtype=dtypes[dtype])
    if tokenizer is None:
      raise ValueError("`model` needs its `tokenizer`.")
    if str(batch_size).startswith("auto"):
      batch_size = 8
    self.model = model
    self.tokenizer = tokenizer
    self.batch_size = int(batch_size)
    self.max_length = int(max_length)
    self.max_batch_tokens = int(max_batch_tokens)
    self.max_gen_toks = int(max_gen_toks)
    self.name = name or str(pretrained or getattr(tokenizer, "name", "model"))
    if self.batch_size < 1 or self.max_length < 2 or self.max_gen_toks < 1:
      raise ValueError(f"batch_size >= 1, max_length >= 2 and max_gen_toks >= 1 are needed; got "
                       f"{self.batch_size}, {self.max_length}, {self.max_gen_toks}.")
    prefix = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
    if prefix is None:
      raise TokenizerError(f"Tokenizer {tokenizer.name!r} has neither BOS nor EOS: the first "
                           "token of a text has nothing to be conditioned on.")
    self.prefix_token_id = int(prefix)
    self._chat_family = chat_family
    self._markers: tuple[str, ...] = ()
    try:
      fam = chat_family or chat_lib.detect_family(tokenizer)
      self._markers = chat_lib.chat_text(fam, [])[1] if fam != "plain" else ()
      self._chat_family = fam
    except (TokenizerError, ValueError, AttributeError):
      pass

  # -- encoding ---------------------------------------------------------------

  def _encode(self, text: str, add_special_tokens: bool = True) -> Encoding:
    if self._markers:
      return chat_lib.encode_with_markers(self.tokenizer, text, self._markers,
                                          add_special_tokens=add_special_tokens)
    return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

  def encode_pair(self, context: str, continuation: str) -> tuple[np.ndarray, int]:
    """Token ids of context + continuation and how many end ids are the continuation's."""
    if not continuation:
      raise ValueError(f"An empty continuation cannot be scored (context {context[-40:]!r}).")
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
      continuation = context[-n_spaces:] + continuation
      context = context[:-n_spaces]
    enc = self._encode(context + continuation)
    boundary = len(context.encode("utf-8"))
    holds = (enc.ends > boundary) & ~enc.special
    if not holds.any():
      raise TokenizerError(f"No token of {continuation!r} was found after its context.")
    first = int(np.argmax(holds))
    ids = enc.ids.astype(np.int32)
    if first == 0:  # nothing precedes the continuation: condition on the prefix token
      ids = np.concatenate([[self.prefix_token_id], ids]).astype(np.int32)
      first = 1
    return ids, len(ids) - first

  # -- scoring ----------------------------------------------------------------

  def score_requests(self, requests: Sequence[tuple[np.ndarray, int]], *,
                     desc: str = "scoring", disable_tqdm: bool = False
                     ) -> list[tuple[float, bool]]:
    """(sum of log-probs, all greedy) of the last n ids of each (ids, n) request."""
    out: list[tuple[float, bool] | None] = [None] * len(requests)
    trimmed = []
    for ids, n in requests:
      if n < 1 or n >= len(ids) + 1 or len(ids) < 2:
        raise ValueError(f"A request needs >= 2 ids and 1 <= n < len(ids); got {len(ids)}, {n}.")
      # The inputs are ids[:-1]: at most max_length of them (lm-eval's HF rule).
      keep = min(len(ids), self.max_length + 1)
      trimmed.append((np.asarray(ids[-keep:], np.int32), min(n, keep - 1)))
    order = sorted(range(len(trimmed)), key=lambda i: -len(trimmed[i][0]))
    bar = _progress(len(order), desc, disable_tqdm)
    pos = 0
    while pos < len(order):
      t = _bucket(len(trimmed[order[pos]][0]), self.max_length + 1)
      rows = max(1, min(self.batch_size, self.max_batch_tokens // t))
      group = order[pos:pos + rows]
      ids = np.zeros((rows, t), np.int32)
      mask = np.zeros((rows, t), bool)
      mask[:, 0] = True  # filler rows: one real token, never read
      for r, i in enumerate(group):
        seq = trimmed[i][0]
        ids[r, :len(seq)] = seq
        mask[r, :len(seq)] = True
      # The continuation's positions, padded to a bucket of K (the whole row when a
      # continuation is long, e.g. rolling windows); the output layer runs on those alone.
      k = _scored_bucket(max(trimmed[i][1] for i in group), t) or t - 1
      at = np.ones((rows, k), np.int32)  # filler rows score position 1, never read
      for r, i in enumerate(group):
        length, n = len(trimmed[i][0]), trimmed[i][1]
        at[r] = length - 1  # padding repeats the last position, never summed
        at[r, :n] = np.arange(length - n, length)
      sc = scoring.score_positions(self.model, ids, mask, at, greedy=True)
      lp, gr = np.asarray(sc.logprobs, np.float64), np.asarray(sc.greedy)
      for r, i in enumerate(group):
        n = trimmed[i][1]
        out[i] = (float(lp[r, :n].sum()), bool(gr[r, :n].all()))
      pos += len(group)
      bar.update(len(group))
    bar.close()
    return out  # type: ignore[return-value]

  def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
    pairs = [self.encode_pair(*req.args) for req in requests]
    res = self.score_requests(pairs, desc="loglikelihood", disable_tqdm=disable_tqdm)
    for req, r in zip(requests, res):
      self.cache_hook.add_partial("loglikelihood", req.args, r)
    return res

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    windows, owner = [], []
    for k, req in enumerate(requests):
      (text,) = req.args[:1]
      toks = self._encode(text, add_special_tokens=False).ids.astype(np.int32).tolist()
      for ctx, cont in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
          token_list=toks, prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
          context_len=1)):
        windows.append((np.asarray(ctx + cont, np.int32), len(cont)))
        owner.append(k)
    scores = self.score_requests(windows, desc="loglikelihood_rolling",
                                 disable_tqdm=disable_tqdm)
    totals = [0.0] * len(requests)
    for k, (lp, _) in zip(owner, scores):
      totals[k] += lp
    for req, r in zip(requests, totals):
      self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), r)
    return totals

  # -- generation -------------------------------------------------------------

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    from alm.models.generate import SamplingConfig, generate  # pylint: disable=import-outside-toplevel
    out: list[str | None] = [None] * len(requests)
    groups: dict[str, list[int]] = {}
    for i, req in enumerate(requests):
      groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
    bar = _progress(len(requests), "generate_until", disable_tqdm)
    for key, idx in groups.items():
      kw = dict(json.loads(key))
      until = kw.pop("until", None) or []
      until = [until] if isinstance(until, str) else list(until)
      max_new = int(kw.pop("max_gen_toks", self.max_gen_toks))
      do_sample = bool(kw.pop("do_sample", False))
      temperature = float(kw.pop("temperature", 0.0) or 0.0)
      sampling = SamplingConfig(temperature=temperature if do_sample else 0.0)
      budget = max(1, self.max_length - max_new)
      encs = {i: self._encode(requests[i].args[0]).ids.astype(np.int32)[-budget:] for i in idx}
      idx = sorted(idx, key=lambda i: -len(encs[i]))
      pos = 0
      while pos < len(idx):
        t = _bucket(len(encs[idx[pos]]), budget)
        rows = max(1, min(self.batch_size, self.max_batch_tokens // (t + max_new)))
        group = idx[pos:pos + rows]
        ids = np.zeros((rows, t), np.int32)
        mask = np.zeros((rows, t), bool)
        for r in range(rows):  # left-padded; filler rows repeat the first prompt
          seq = encs[group[min(r, len(group) - 1)]]
          ids[r, t - len(seq):] = seq
          mask[r, t - len(seq):] = True
        gen = getattr(self.model, "generate", None)  # an alm.eval.Ensemble's: lockstep
        args = (ids,) if gen is not None else (self.model, ids)
        res = (gen or generate)(*args, attention_mask=mask, max_new_tokens=max_new,
                                sampling=sampling, eos_id=self.tokenizer.eos_id)
        for r, i in enumerate(group):
          toks = res.tokens[r, :res.lengths[r]]
          text = self.tokenizer.decode(toks)
          for u in until:
            if u and u in text:
              text = text[:text.index(u)]
          out[i] = text
          self.cache_hook.add_partial("generate_until", requests[i].args, text)
        pos += len(group)
        bar.update(len(group))
    bar.close()
    return out  # type: ignore[return-value]

  # -- chat -------------------------------------------------------------------

  @property
  def tokenizer_name(self) -> str:
    return str(getattr(self.tokenizer, "name", "tokenizer")).replace("/", "__")

  def chat_template(self, chat_template: bool | str = False) -> str | None:
    return self._chat_family or ""

  def apply_chat_template(self, chat_history: list[dict[str, str]],
                          add_generation_prompt: bool = True) -> str:
    if not self._chat_family:
      raise TokenizerError(f"Tokenizer {self.tokenizer.name!r} has no chat markers this toolkit "
                           "knows; pass chat_family= (chatml, llama3, gemma, mistral, plain).")
    # The markers it may contain are those `_encode` already turns into ids.
    return chat_lib.chat_text(self._chat_family, chat_history,
                              add_generation_prompt=add_generation_prompt)[0]

  def summary(self) -> dict[str, Any]:
    """The settings that shape the numbers (for result files)."""
    # A file path (a GGUF's tokenizer) is shown by its file name.
    tok_name = str(getattr(self.tokenizer, "name", "tokenizer")).rstrip("/").rsplit("/", 1)[-1]
    return dict(name=self.name, tokenizer=tok_name, max_length=self.max_length,
                prefix_token_id=self.prefix_token_id, chat_family=self._chat_family)
