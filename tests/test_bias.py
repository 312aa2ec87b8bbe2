"""Bias tables against a brute-force enumeration of covers on tiny trained tokenizers."""

from __future__ import annotations

import glob
import os

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from alm.tokenization.alignment import align
from alm.tokenization.bias import BiasTables, compute_bias_tables, count_tokens, unigram_probs
from alm.tokenization.hf import HFTokenizer


def _corpus(max_bytes=60_000):
  """Docstring-rich text from the Python standard library (always present)."""
  out, n = [], 0
  root = os.path.dirname(os.__file__)
  for p in sorted(glob.glob(os.path.join(root, "*.py")))[:40]:
    with open(p, encoding="utf-8", errors="ignore") as f:
      t = f.read()
    out.append(t)
    n += len(t)
    if n > max_bytes:
      break
  return out


def _train(kind: str, vocab: int, texts) -> HFTokenizer:
  if kind == "bpe":
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tr = trainers.BpeTrainer(vocab_size=vocab, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                             show_progress=False)
  else:
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="never")
    alphabet = sorted(set("".join(texts)))
    tr = trainers.UnigramTrainer(vocab_size=vocab, initial_alphabet=alphabet, show_progress=False,
                                 unk_token="<unk>", special_tokens=["<unk>"])
  tok.train_from_iterator(texts, tr)
  return HFTokenizer(tok, name=f"tiny-{kind}-{vocab}")


@pytest.fixture(scope="module")
def tiny():
  texts = [t.encode("ascii", "ignore").decode() for t in _corpus()]
  bpe = _train("bpe", 300, texts)
  uni = _train("unigram", 200, texts)
  small = texts[:6]
  return bpe, uni, small


def brute_force(ta, tb, counts_a, counts_b, smoothing):
  """b1/b2 straight from the definition: every (v, i, w), re-tokenized one by one."""
  pa_, pb_ = unigram_probs(counts_a, smoothing), unigram_probs(counts_b, smoothing)

  def ids_of(text: bytes, tok):
    try:
      s = text.decode("utf-8")
    except UnicodeDecodeError:
      return None
    try:
      e = tok.encode(s, add_special_tokens=False)
    except ValueError:
      return None
    return e.ids.tolist()

  def covers(tok):
    tbs = tok.token_bytes
    out = {}
    for v, vb in enumerate(tbs):
      if not vb or v in tok.special_ids:
        continue
      lst = []
      for i in range(len(vb)):
        for w, wb in enumerate(tbs):
          if w in tok.special_ids or len(wb) <= len(vb) - i or not wb.startswith(vb[i:]):
            continue
          r = ids_of(vb[:i] + wb, tok)
          if r and r[-1] == w:
            lst.append((wb[len(vb) - i:], w))
      out[v] = lst
    return out

  ca, cb = covers(ta), covers(tb)
  res = {}
  for v, vb in enumerate(ta.token_bytes):
    if v not in ca:
      continue
    for u, ub in enumerate(tb.token_bytes):
      if u not in cb or not (vb.endswith(ub) or ub.endswith(vb)):
        continue
      ea = {y for y, _ in ca[v]}
      eb = {y for y, _ in cb[u]}
      b1 = sum(pa_[w] for y, w in ca[v] if y not in eb)
      b2 = sum(pb_[w] for y, w in cb[u] if y not in ea)
      res[(v, u)] = (b1, b2)
  return res


@pytest.mark.parametrize("smoothing,observed_only", [(0.0, False), (1e-4, False), (0.0, True)])
def test_tables_equal_brute_force(tiny, smoothing, observed_only):
  bpe, uni, small = tiny
  ca = count_tokens(bpe, small)
  cb = count_tokens(uni, small)
  tables = compute_bias_tables(bpe, uni, ca, cb, smoothing=smoothing, observed_only=observed_only)
  ref = brute_force(bpe, uni, ca, cb, smoothing)
  if observed_only:
    ref = {k: v for k, v in ref.items() if ca[k[0]] > 0 and cb[k[1]] > 0}
  keys = tables.keys
  got = {(int(k // uni.vocab_size), int(k % uni.vocab_size)): (float(a), float(b))
         for k, a, b in zip(keys, tables.b1, tables.b2)}
  assert set(got) == set(ref)
  assert len(ref) > 50
  arr_got = np.array([got[k] for k in sorted(ref)])
  arr_ref = np.array([ref[k] for k in sorted(ref)])
  np.testing.assert_allclose(arr_got, arr_ref, rtol=1e-5, atol=1e-7)
  # Not trivial: some pairs are biased, some are not.
  assert (arr_ref > 1e-3).any() and (arr_ref < 1e-9).any()


def test_save_load_and_unbiased_alignment(tiny, tmp_path):
  bpe, uni, small = tiny
  ca = count_tokens(bpe, small)
  cb = count_tokens(uni, small)
  tables = compute_bias_tables(bpe, uni, ca, cb, meta={"corpus": "stdlib"})
  tables.save(tmp_path / "pair")
  back = BiasTables.load(tmp_path / "pair")
  assert back.teacher == bpe.name and back.meta["corpus"] == "stdlib"
  np.testing.assert_array_equal(back.keys, tables.keys)
  np.testing.assert_array_equal(back.b1, tables.b1)
  text = small[0][:2000]
  te, se = bpe.encode(text), uni.encode(text)
  n_free = align(te, se)[0].max() + 1
  counts = [align(te, se, constraint="unbiased", bias_tables=back, gamma=g)[0].max() + 1
            for g in (1e-6, 0.01, 0.1, 0.5, 1 - 1e-6)]
  # A larger gamma keeps more boundaries (gamma is a probability in (0, 1)).
  assert all(a <= b for a, b in zip(counts, counts[1:]))
  assert counts[-1] <= n_free
  with pytest.raises(FileNotFoundError, match="compute_bias_tables"):
    BiasTables.load(tmp_path / "nothing")
