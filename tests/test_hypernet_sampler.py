"""The hypernetwork's tokenizer sampler: deterministic, lossless, the base's specials."""

from __future__ import annotations

import pytest

from alm.data.sources import open_source
import numpy as np

from alm.hypernet import fvt
from alm.hypernet.hypernet import new_vocab_pieces
from alm.hypernet.sampler import SamplerConfig, sample_tokenizer, substring_counts
from alm.testing.tokenizers import GreedyTokenizer
from alm.tokenization.base import TokenizerError
from alm.tokenization.loading import load_tokenizer


@pytest.fixture(scope="module")
def base():
  return load_tokenizer("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def texts():
  src = open_source("default")
  return [src[i]["text"] for i in range(24)]


def test_substring_counts_match_brute_force(base):
  got = substring_counts(base, ["the then", "the"], max_piece_chars=3)
  # Pretokens: "the", "Ġthen", "the" (byte-level: a space is "Ġ").
  assert got["th"] == 3 and got["the"] == 3 and got["Ġth"] == 1 and got["en"] == 1
  assert "then" not in got and "t" not in got  # longer than 3; single symbols are the alphabet


def test_sampled_tokenizers_are_deterministic_lossless_and_keep_specials(base, texts):
  cfg = SamplerConfig(vocab_size=3000, noise_std=1.0)
  a = sample_tokenizer(base, texts, seed=0, cfg=cfg)
  b = sample_tokenizer(base, texts, seed=0, cfg=cfg)
  c = sample_tokenizer(base, texts, seed=1, cfg=cfg)
  assert a.token_bytes == b.token_bytes
  assert a.token_bytes != c.token_bytes  # the noise changes the pieces
  assert 256 < a.vocab_size <= 256 + 3000 + len(base.special_ids)
  assert len({x for i, x in enumerate(a.token_bytes) if i not in a.special_ids}) == \
      a.vocab_size - len(a.special_ids)  # no duplicate pieces
  # Every byte value is a token, so any text (multi-byte, control bytes) round-trips.
  singles = {x for x in a.token_bytes if len(x) == 1}
  assert len(singles) == 256
  for text in ["Hello wörld 🙂 a\tb\n\n  c", "\x00\x7f\u0600 ÿ", texts[3][:500]]:
    e = a.encode(text)
    assert b"".join(a.token_bytes[i] for i in e.ids if i not in a.special_ids) == \
        text.encode("utf-8")
  # The base's specials and roles: the same strings, BOS / EOS by role.
  names = lambda t: sorted(t.hf_tokenizer.id_to_token(i) for i in t.special_ids)
  assert names(a) == names(base)
  assert a.hf_tokenizer.id_to_token(a.eos_id) == base.hf_tokenizer.id_to_token(base.eos_id)
  assert a.add_bos == base.add_bos
  # The hypernetwork reads every regular token as base pieces, but for the 21 byte
  # values SmolLM2's vocabulary lacks (they keep FVT's fallback).
  d = fvt.decompose(base, a)
  assert d.counts()["mean_of_all"] == 21
  emb = np.zeros((base.vocab_size, 4), np.float32)
  p = new_vocab_pieces(base, a, emb, None, 8)
  assert (~p.predicted).sum() == 21 + len(a.special_ids)


def test_sentencepiece_style_bases_get_byte_fallback_tokenizers(texts):
  # Gemma 3: spaces as "▁", no pre-tokenizer, 256 <0xXX> byte-fallback tokens.
  base = load_tokenizer("gemma3-270m")
  got = substring_counts(base, ["the then", "the"], max_piece_chars=3)
  # Words "the", "▁then", "the": single characters count too (no byte alphabet here).
  assert got["t"] == 3 and got["the"] == 3 and got["▁th"] == 1 and got["▁"] == 1
  cfg = SamplerConfig(vocab_size=3000)
  a = sample_tokenizer(base, texts, seed=0, cfg=cfg)
  assert a.token_bytes == sample_tokenizer(base, texts, seed=0, cfg=cfg).token_bytes
  assert a.token_bytes != sample_tokenizer(base, texts, seed=1, cfg=cfg).token_bytes
  ids = [a.hf_tokenizer.token_to_id(f"<0x{b:02X}>") for b in range(256)]
  assert None not in ids and [a.token_bytes[i] for i in ids] == [bytes([b]) for b in range(256)]
  for text in ["Hello wörld 🙂 a\tb\n\n  c", "\x00\x7f\u0600 ÿ", " lead", "trail  ",
               texts[3][:500]]:
    e = a.encode(text)
    assert b"".join(a.token_bytes[i] for i in e.ids if i not in a.special_ids) == \
        text.encode("utf-8"), text
  assert a.bos_id is not None and a.add_bos == base.add_bos
  # Gemma's vocabulary spells every sampled token (it has every byte).
  assert fvt.decompose(base, a).counts()["mean_of_all"] == 0


def test_a_base_without_byte_level_pretokenizer_is_refused():
  with pytest.raises(TokenizerError, match="HF byte-level or SentencePiece-style base"):
    sample_tokenizer(GreedyTokenizer(["ab"]), ["x"], seed=0)
  with pytest.raises(ValueError, match="vocab_size must be >= 1"):
    SamplerConfig(vocab_size=0)
