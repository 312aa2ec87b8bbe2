"""Documents a tokenizer cannot spell: NFC normalization, the skip / error policies.

A run must survive its data: one document that a tokenizer cannot spell
exactly (non-NFC text for an NFC-normalizing tokenizer such as Qwen3's, a lone
surrogate, a byte the vocabulary lacks) is normalized when that makes both
sides spell the same bytes, and otherwise skipped (counted, the first reasons
logged) or, under `bad_documents="error"`, an error naming the document and the
fix, found before training when the data is small.
"""

from __future__ import annotations

import functools
import json
import logging
import unicodedata

import hypothesis
import hypothesis.strategies as st
import numpy as np
import pytest
import tokenizers
from tokenizers import normalizers

from alm.data import pipeline as pl
from alm.data import sources
from alm.testing.tokenizers import GreedyTokenizer, tiny_tokenizer
from alm.tokenization.hf import HFTokenizer

TEACHER = GreedyTokenizer(["the", "he", " the", "ing", " a", "an", "and", " and", "é"], name="T")
STUDENT = GreedyTokenizer(["th", "e ", "the ", "in", "ng", " an", "and "], add_bos=False,
                          name="S")
GOOD = ["the cat and the thing", "another one, and then the king sang", "hello there",
        "thin ice " * 3, "and the king sang " * 4, "a short one", "the end of it", "more text"]
SURROGATE = "lone \ud800 surrogate"  # no UTF-8 bytes: no tokenizer can encode it
DECOMPOSED = "cafe\u0301 and the"  # not NFC: "e" + combining acute accent


@functools.cache
def nfc_tokenizer() -> HFTokenizer:
  """A tiny byte-level BPE with an NFC normalizer (as Qwen3's tokenizer has)."""
  tok = tokenizers.Tokenizer.from_str(tiny_tokenizer("bpe", 300).hf_tokenizer.to_str())
  tok.normalizer = normalizers.NFC()
  return HFTokenizer(tok, name="tiny-nfc", bos_token="<bos>", eos_token="<eos>", add_bos=True)


class NoByte04(GreedyTokenizer):
  """Like SmolLM2's tokenizer: no token for byte 0x04, which its library silently drops."""

  def _encode_ids(self, text):
    return [i for i in super()._encode_ids(text) if self.token_bytes[i] != b"\x04"]


def _docs(texts):
  return [{"text": t, "origin": f"docs.jsonl:{i + 1}"} for i, t in enumerate(texts)]


def _spelled(tok, ids):
  return b"".join(tok.token_bytes[int(i)] for i in ids)


def test_nfc_normalization_when_either_tokenizer_normalizes():
  nfc = nfc_tokenizer()
  proc = pl.DocumentProcessor(TEACHER, nfc, pl.PipelineConfig(teacher_len=64, student_len=64))
  assert proc.normalization == "nfc"
  (ex,) = proc({"text": DECOMPOSED})
  want = unicodedata.normalize("NFC", DECOMPOSED).encode()
  # One text, both tokenizations of it: both sides spell the NFC bytes.
  assert _spelled(TEACHER, ex["teacher_ids"]) == _spelled(nfc, ex["student_ids"]) == want
  assert (ex["student_chunk_ids"] >= 0).any()
  # Chats are normalized the same way (message contents).
  (ex,) = proc({"messages": [{"role": "user", "content": DECOMPOSED}]})
  assert want in _spelled(nfc, ex["student_ids"])
  # Neither tokenizer normalizes: the text is left as it is ("auto" -> "none").
  plain = pl.DocumentProcessor(TEACHER, STUDENT, pl.PipelineConfig(teacher_len=64,
                                                                    student_len=64))
  assert plain.normalization == "none"
  (ex,) = plain({"text": DECOMPOSED})
  assert _spelled(STUDENT, ex["student_ids"]) == DECOMPOSED.encode()
  assert pl.resolve_text_normalization("nfc", TEACHER, STUDENT) == "nfc"
  assert pl.resolve_text_normalization("none", TEACHER, nfc) == "none"
  with pytest.raises(ValueError, match="choose one of: auto, nfc, none"):
    pl.PipelineConfig(text_normalization="nfkc")
  with pytest.raises(ValueError, match="choose one of: skip, error"):
    pl.PipelineConfig(bad_documents="ignore")


PIECES = ["e\u0301", "\u00e9", "A\u030a", "\u212b", "\ud800", "日本語", "🙂", " ", "  ", "\n",
          "the", "\x04", "and"]


@hypothesis.settings(max_examples=40, deadline=None)
@hypothesis.given(st.lists(st.sampled_from(PIECES), min_size=1, max_size=12).map("".join))
def test_a_document_is_normalized_then_spelled_by_both_sides_or_skipped(text):
  proc = pl.DocumentProcessor(TEACHER, nfc_tokenizer(), pl.PipelineConfig(
      teacher_len=256, student_len=256))
  out = proc({"text": text, "origin": "p:1"})
  if "\ud800" in text:  # nothing can spell a lone surrogate
    assert isinstance(out, pl._Skipped) and out.reason.startswith("p:1: cannot tokenize")  # pylint: disable=protected-access
    return
  want = unicodedata.normalize("NFC", text).encode()
  assert _spelled(TEACHER, out[0]["teacher_ids"]) == _spelled(proc.student,
                                                              out[0]["student_ids"]) == want


def test_skip_is_the_default_and_counts_and_logs_the_first_reasons(caplog):
  bad = [SURROGATE + f" {i}" for i in range(pl.LOGGED_BAD_DOCUMENTS + 3)]
  texts = [t for pair in zip(GOOD, bad) for t in pair] + bad[len(GOOD):]
  cfg = pl.PipelineConfig(batch_size=2, teacher_len=32, student_len=32, shuffle=False,
                          num_epochs=1)
  assert cfg.bad_documents == "skip"
  with caplog.at_level(logging.WARNING):
    pipe = pl.Pipeline(_docs(texts), TEACHER, STUDENT, cfg)
    got = list(pipe)
  assert pipe.num_skipped == len(bad)
  # The same batches as the good documents alone (no shuffle: same order).
  ref = list(pl.Pipeline(_docs(GOOD), TEACHER, STUDENT, cfg))
  assert len(got) == len(ref) == len(GOOD) // 2
  assert all(np.array_equal(a[k], b[k]) for a, b in zip(got, ref) for k in a)
  msgs = [r.getMessage() for r in caplog.records if "Skipped document" in r.getMessage()]
  assert len(msgs) == pl.LOGGED_BAD_DOCUMENTS  # the first few, not every one
  assert "docs.jsonl:2" in msgs[0] and "lone surrogate" in msgs[0] and "'T'" in msgs[0]


def test_bytes_a_tokenizer_lacks_and_non_nfc_text_without_normalization_are_skipped():
  nfc = nfc_tokenizer()
  no04 = NoByte04(["th", "e ", "the "], add_bos=False, name="no-0x04")
  cfg = pl.PipelineConfig(batch_size=1, teacher_len=32, student_len=32, shuffle=False,
                          num_epochs=1, text_normalization="none")
  pipe = pl.Pipeline(_docs(["the cat", DECOMPOSED, "the dog"]), TEACHER, nfc, cfg)
  assert len(list(pipe)) == 2 and pipe.num_skipped == 1
  pipe = pl.Pipeline(_docs(["the cat", "ctrl \x04 byte", "the dog"]), TEACHER, no04, cfg)
  assert len(list(pipe)) == 2 and pipe.num_skipped == 1


@pytest.mark.parametrize("mode", ["pad", "pack"])
def test_skipping_is_deterministic_and_the_count_survives_restore(mode):
  texts = []
  for i in range(5):
    texts += [f"{g} {i}" for g in GOOD[:4]] + [f"{SURROGATE} {i}"] + [
        f"{g} {i}" for g in GOOD[4:]] + [f"{DECOMPOSED}\ud801 {i}"]
  cfg = pl.PipelineConfig(batch_size=3, teacher_len=16, student_len=14, mode=mode,
                          long_documents="split", seed=3, num_epochs=2)

  def run(pipe, n):
    out = []
    for _ in range(n):
      out.append((next(pipe), pipe.num_skipped))
    return out

  a = pl.Pipeline(_docs(texts), TEACHER, STUDENT, cfg)
  first = run(a, 6)
  state = json.loads(json.dumps(a.state()))  # must survive a JSON checkpoint
  after = run(a, 12)
  assert after[-1][1] > first[-1][1] > 0
  again = run(pl.Pipeline(_docs(texts), TEACHER, STUDENT, cfg), 18)  # same seed, same batches
  b = pl.Pipeline(_docs(texts), TEACHER, STUDENT, cfg)
  b.restore(state)
  resumed = run(b, 12)
  for (x, nx), (y, ny) in zip(first + after, again):
    assert nx == ny and all(np.array_equal(x[k], y[k]) for k in x)
  for (x, nx), (y, ny) in zip(after, resumed):
    assert nx == ny and all(np.array_equal(x[k], y[k]) for k in x)


def test_every_document_bad_is_an_error_not_an_endless_loop(monkeypatch):
  monkeypatch.setattr(pl, "MAX_SKIPPED_IN_A_ROW", 20)  # 1000 by default
  cfg = pl.PipelineConfig(batch_size=2, teacher_len=16, student_len=16)  # repeats forever
  pipe = pl.Pipeline(_docs([SURROGATE, SURROGATE + "!"]), TEACHER, STUDENT, cfg)
  with pytest.raises(sources.DataError, match=r"(?s)in a row.*lone surrogate"):
    next(pipe)


def test_error_policy_names_the_document_and_the_fix(tmp_path):
  cfg = pl.PipelineConfig(batch_size=2, teacher_len=32, student_len=32, shuffle=False,
                          bad_documents="error")
  docs = _docs(GOOD[:5] + [SURROGATE] + GOOD[5:])
  pipe = pl.Pipeline(docs, TEACHER, STUDENT, cfg)
  with pytest.raises(sources.DataError,
                     match=r"(?s)docs\.jsonl:6: cannot tokenize.*lone surrogate.*"
                           r"--bad_documents=skip"):
    for _ in range(10):
      next(pipe)
  # ... and before any training when the data is small enough to check: in one pass.
  with pytest.raises(sources.DataError, match=r"(?s)docs\.jsonl:6: .*--bad_documents=skip"):
    pl.check_documents(docs, TEACHER, STUDENT, cfg)
  nfc = nfc_tokenizer()
  none = pl.PipelineConfig(bad_documents="error", text_normalization="none")
  with pytest.raises(sources.DataError, match=r"(?s)docs\.jsonl:1: .*NFC.*text_normalization"):
    pl.check_documents(_docs([DECOMPOSED]), TEACHER, nfc, none)
  # Clean data, or normalization that fixes it: no error; the number of checked documents.
  assert pl.check_documents(_docs(GOOD), TEACHER, STUDENT, cfg) == len(GOOD)
  assert pl.check_documents(_docs([DECOMPOSED]), TEACHER, nfc,
                            pl.PipelineConfig(bad_documents="error")) == 1
  # Too large to check quickly: not checked (None); the error comes when the document is reached.
  assert pl.check_documents(docs, TEACHER, STUDENT, cfg, max_bytes=20) is None
  assert pl.check_documents(docs, TEACHER, STUDENT, cfg, max_documents=3) is None
  f = tmp_path / "good.jsonl"
  f.write_text("".join(json.dumps({"text": t}) + "\n" for t in GOOD))
  src = sources.open_source(f)  # a file source's size is known without reading it
  assert src.num_bytes == f.stat().st_size
  assert pl.check_documents(src, TEACHER, STUDENT, cfg, max_bytes=src.num_bytes) == len(GOOD)
  assert pl.check_documents(src, TEACHER, STUDENT, cfg, max_bytes=src.num_bytes - 1) is None


def test_missing_text_field_names_the_flag(tmp_path):
  p = tmp_path / "body.jsonl"
  p.write_text('{"body": "the cat"}\n')
  with pytest.raises(sources.DataError, match=r"--text_field=body|--text_field=\.\.\."):
    sources.open_source(p)
  assert sources.open_source(p, text_field="body")[0]["text"] == "the cat"
  import pyarrow as pa  # pylint: disable=import-outside-toplevel
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  q = tmp_path / "body.parquet"
  pq.write_table(pa.table({"body": ["the cat"]}), q)
  with pytest.raises(sources.DataError, match=r"--text_field="):
    sources.open_source(q)
  assert sources.open_source(q, text_field="body")[0]["text"] == "the cat"


def test_a_state_saved_before_documents_were_counted_still_restores():
  cfg = pl.PipelineConfig(batch_size=2, teacher_len=16, student_len=14, seed=1)
  a = pl.Pipeline(_docs(GOOD), TEACHER, STUDENT, cfg)
  for _ in range(3):
    next(a)

  def strip(state):  # the state as it was before the counting stage existed
    if isinstance(state, dict):
      if "skipped_documents" in state:
        return state["parent"]
      return {k: strip(v) for k, v in state.items()}
    return state

  old = strip(a.state())
  assert "skipped_documents" not in json.dumps(old)
  b = pl.Pipeline(_docs(GOOD), TEACHER, STUDENT, cfg)
  b.restore(old)
  assert b.num_skipped == 0
  for _ in range(3):
    x, y = next(a), next(b)
    assert all(np.array_equal(x[k], y[k]) for k in x)
