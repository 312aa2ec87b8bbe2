"""Random tokenizers for training hypernetworks (SPEC §11, ZeTT's sampler).

`sample_tokenizer(base, texts, seed)` builds a Unigram tokenizer from the
substrings of `texts` (recent training batches): every substring of up to
`max_piece_chars` characters of every pretoken (the base tokenizer's own
normalizer and pre-tokenizer, so a byte-level base gives byte-level pieces) is
counted, scored `count × length`, multiplied by log-normal noise
`exp(N(0, noise_std))`, and the top `vocab_size` pieces are kept next to the
256 byte symbols (so every text stays encodable, losslessly), with Unigram
log-probabilities `log(score / total)`. The base's special tokens are added
with the same roles. Deterministic from the seed; built with the `tokenizers`
library (the Unigram model, no training loop).

Two kinds of base are supported. Byte-level bases (SmolLM2, Qwen3, Llama 3: a
`ByteLevel` pre-tokenizer): pieces are byte-level strings and the 256 byte
symbols are the alphabet. SentencePiece-style bases with byte fallback
(Gemma 3: spaces as "▁", `<0x00>`..`<0xFF>` byte tokens): pieces are
substrings of the "▁"-normalised words (a word starts at a "▁"), single
characters included, and the 256 byte-fallback tokens stand in for any
character that is not a piece, so every text stays encodable losslessly.
Any other base is refused with a clear error.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import re
from typing import Iterable

import numpy as np
import tokenizers
from tokenizers import models, pre_tokenizers

from alm.tokenization.base import TokenizerError


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
  """Options of the tokenizer sampler.

  Attributes:
    vocab_size: pieces kept besides the 256 byte symbols (ZeTT: 32,768).
    max_piece_chars: the longest piece, in (byte-level) characters (ZeTT: 16).
    noise_std: sigma of the multiplicative log-normal noise on the scores.
    min_count: a substring seen fewer times is never a piece.
  """

  vocab_size: int = 32768
  max_piece_chars: int = 16
  noise_std: float = 1.0
  min_count: int = 2

  def __post_init__(self):
    for name, low in (("vocab_size", 1), ("max_piece_chars", 1), ("min_count", 1)):
      if getattr(self, name) < low:
        raise ValueError(f"SamplerConfig.{name} must be >= {low}, got {getattr(self, name)}.")
    if not (self.noise_std >= 0 and math.isfinite(self.noise_std)):
      raise ValueError(f"SamplerConfig.noise_std must be finite and >= 0, got {self.noise_std}.")


def _state(component):
  return None if component is None else json.loads(component.__getstate__())


_SPM_BYTES = [f"<0x{b:02X}>" for b in range(256)]
_SPM_WORD = re.compile("\u2581[^\u2581]*|[^\u2581]+")


def _check_base(base) -> tuple[tokenizers.Tokenizer, str]:
  """(the base's HF tokenizer, "bytelevel" or "sentencepiece")."""
  hf = getattr(base, "hf_tokenizer", None)
  if hf is None:
    raise TokenizerError(f"The tokenizer sampler needs an HF byte-level or SentencePiece-style "
                         f"base tokenizer; {getattr(base, 'name', base)!r} is a "
                         f"{type(base).__name__}.")
  pre = json.dumps(_state(hf.pre_tokenizer) or {})
  if '"ByteLevel"' in pre:
    return hf, "bytelevel"
  if all(hf.token_to_id(b) is not None for b in _SPM_BYTES):
    return hf, "sentencepiece"
  raise TokenizerError(
      f"The tokenizer sampler supports byte-level bases (a ByteLevel pre-tokenizer: SmolLM2, "
      f"Qwen3, Llama 3) and SentencePiece-style bases with the 256 byte-fallback tokens "
      f"(Gemma 3); {getattr(base, 'name', 'this base')!r} is neither.")


def _words(hf, kind: str, text: str) -> list[str]:
  if hf.normalizer is not None:
    text = hf.normalizer.normalize_str(text)
  if hf.pre_tokenizer is not None:
    return [w for w, _ in hf.pre_tokenizer.pre_tokenize_str(text)]
  if kind == "sentencepiece":  # no pre-tokenizer (Gemma): a word starts at a "▁"
    return _SPM_WORD.findall(text.replace(" ", "\u2581"))
  return [text]


def substring_counts(base, texts: Iterable[str], max_piece_chars: int) -> collections.Counter:
  """Counts of every substring (<= max_piece_chars) of every pretoken of `texts`
  (byte-level bases: of 2 symbols or more, the single ones being the alphabet)."""
  hf, kind = _check_base(base)
  shortest = 2 if kind == "bytelevel" else 1
  words: collections.Counter = collections.Counter()
  for text in texts:
    words.update(_words(hf, kind, text))
  counts: collections.Counter = collections.Counter()
  for w, c in words.items():
    n = len(w)
    for i in range(n):
      for j in range(i + shortest, min(n, i + max_piece_chars) + 1):
        counts[w[i:j]] += c
  return counts


def sample_tokenizer(base, texts: Iterable[str], seed: int,
                     cfg: SamplerConfig | None = None, *, name: str | None = None):
  """A random Unigram tokenizer from the substrings of `texts` (see the module docstring).

  Args:
    base: the base model's tokenizer (an `alm` HF byte-level tokenizer).
    texts: recent training texts.
    seed: the noise's seed (same texts and seed: the same tokenizer).
    cfg: sampler options.
    name: the new tokenizer's name (default: "sampled-<seed>").

  Returns:
    An `alm.tokenization.hf.HFTokenizer` (lossless: every text is encodable
    from the 256 byte symbols or byte-fallback tokens) with the base's
    specials, BOS/EOS roles and `add_bos`.

  Raises:
    TokenizerError: a base that is neither an HF byte-level tokenizer nor a
      SentencePiece-style one with byte fallback.
  """
  from alm.tokenization.hf import HFTokenizer  # pylint: disable=import-outside-toplevel
  cfg = cfg or SamplerConfig()
  hf, kind = _check_base(base)
  counts = substring_counts(base, texts, cfg.max_piece_chars)
  alphabet = (sorted(pre_tokenizers.ByteLevel.alphabet()) if kind == "bytelevel"
              else _SPM_BYTES)
  items = sorted((p, c) for p, c in counts.items()
                 if c >= cfg.min_count and p not in _SPM_BYTES)
  rng = np.random.default_rng(seed)
  pieces = np.array([p for p, _ in items], dtype=object)
  scores = np.array([c * len(p) for p, c in items], np.float64)
  if len(scores):
    scores = scores * np.exp(rng.normal(0.0, cfg.noise_std, len(scores)))
  keep = np.argsort(-scores, kind="stable")[:cfg.vocab_size]
  chosen = [(str(pieces[i]), float(scores[i])) for i in keep]
  total = sum(s for _, s in chosen) or 1.0
  floor = min((s for _, s in chosen), default=1.0)
  # The byte symbols: always present, scored below every other piece.
  vocab = [(ch, math.log(floor / total) - 10.0) for ch in alphabet]
  vocab += [(p, math.log(s / total)) for p, s in chosen]
  if kind == "sentencepiece":  # the byte-fallback tokens replace what no piece spells
    unk = getattr(hf.model, "unk_token", None) or "<unk>"
    vocab = [(unk, 0.0)] + vocab
    model = models.Unigram(vocab, unk_id=0, byte_fallback=True)
  else:
    model = models.Unigram(vocab, unk_id=None, byte_fallback=False)
  tok = tokenizers.Tokenizer(model)
  tok.normalizer = hf.normalizer
  tok.pre_tokenizer = hf.pre_tokenizer
  tok.decoder = hf.decoder
  specials = [base.hf_tokenizer.id_to_token(i) for i in sorted(base.special_ids)]
  tok.add_special_tokens([tokenizers.AddedToken(s, special=True, normalized=False)
                          for s in specials if s is not None])
  bos = None if base.bos_id is None else hf.id_to_token(base.bos_id)
  eos = None if base.eos_id is None else hf.id_to_token(base.eos_id)
  return HFTokenizer(tok, name=name or f"sampled-{seed}", bos_token=bos, eos_token=eos,
                     add_bos=base.add_bos)
