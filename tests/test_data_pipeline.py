"""Tests of the grain input pipeline: alignment across cuts and packing, order, state."""

from __future__ import annotations

import json

import hypothesis
import hypothesis.strategies as st
import numpy as np
import pytest

from alm.data import pipeline as pl
from alm.data import sources
from alm.testing.tokenizers import GreedyTokenizer


TEACHER = GreedyTokenizer(["the", "he", " the", "ing", " a", "an", "and", " and", "ion", "  ",
                           "é", "日本"], name="T")
STUDENT = GreedyTokenizer(["th", "e ", "the ", "in", "ng", " an", "and ", "io", "on", " t",
                           "語"], add_bos=False, name="S")
WORDS = ["the", "cat", "and", "thing", "an", "ion", " ", "  ", "\n", "é", "日本語", "🙂", "a"]
DOCS = ["the cat and the thing", "another one, and then the king sang",
        "and the king sang " * 6, "hello", "thin ice " * 3, "日本語 é the 🙂 and"]


def ref_chunks(t, s):
  """Brute-force alignment of non-special tokens: walk both token lists in a loop."""
  tb, sb = [], []
  ct, cs = [], []
  i = j = 0
  tt = [k for k in range(len(t)) if not t.special[k]]
  ss = [k for k in range(len(s)) if not s.special[k]]
  c = 0
  while i < len(tt) or j < len(ss):
    # Advance whichever side ends earlier until the ends coincide.
    ct.append([tt[i]])
    cs.append([ss[j]])
    et, es = t.ends[tt[i]], s.ends[ss[j]]
    i, j = i + 1, j + 1
    while et != es:
      if et < es:
        ct[-1].append(tt[i])
        et = t.ends[tt[i]]
        i += 1
      else:
        cs[-1].append(ss[j])
        es = s.ends[ss[j]]
        j += 1
    c += 1
  del tb, sb
  return ct, cs


def chunk_bytes(tok, ids, chunk_ids, c):
  return b"".join(tok.token_bytes[i] for i, k in zip(ids, chunk_ids) if k == c)


def check_row(row_t, row_s):
  """Invariants of one finalized row (dict of 1-D arrays)."""
  tc, sc = row_t["chunk_ids"], row_s["chunk_ids"]
  assert set(tc[tc >= 0]) == set(sc[sc >= 0])
  ids = tc[tc >= 0]
  if ids.size:
    # Contiguous and non-decreasing along the row on both sides.
    assert np.all(np.diff(ids) >= 0) and np.all(np.diff(sc[sc >= 0]) >= 0)
    assert set(ids) == set(range(ids.min(), ids.max() + 1))
  for c in set(ids.tolist()):
    # Each chunk is the same bytes on both sides and lies in one document.
    assert chunk_bytes(TEACHER, row_t["ids"], tc, c) == chunk_bytes(STUDENT, row_s["ids"], sc, c)
    assert len(set(row_t["segment_ids"][tc == c])) == 1
    assert len(set(row_s["segment_ids"][sc == c])) == 1
    assert row_t["segment_ids"][tc == c][0] == row_s["segment_ids"][sc == c][0]
  for r in (row_t, row_s):
    pad = r["segment_ids"] == 0
    assert not r["loss_mask"][pad].any() and (r["chunk_ids"][pad] == -1).all()
    assert not r["loss_mask"][r["positions"] == 0].any()


def rows(batch):
  for b in range(batch["teacher_ids"].shape[0]):
    yield ({k[8:]: v[b] for k, v in batch.items() if k.startswith("teacher_")},
           {k[8:]: v[b] for k, v in batch.items() if k.startswith("student_")})


def test_pipeline_alignment_agrees_with_brute_force():
  """`alm.align` as the pipeline calls it vs a loop over tokens (token-0 chunk dropped)."""
  cfg = pl.PipelineConfig(teacher_len=256, student_len=256)
  proc = pl.DocumentProcessor(TEACHER, STUDENT, cfg)
  for text in DOCS:
    (ex,) = proc({"text": text})
    t, s = TEACHER.encode(text), STUDENT.encode(text)
    assert (ex["teacher_ids"] == t.ids).all() and (ex["student_ids"] == s.ids).all()
    tc, sc = ex["teacher_chunk_ids"], ex["student_chunk_ids"]
    ct, cs = ref_chunks(t, s)
    assert (tc[t.special] == -1).all()  # BOS on the teacher side only: no chunk
    # The student has no BOS: its token 0 opens chunk 0, which is never predicted.
    assert (tc[ct[0]] == -1).all() and (sc[cs[0]] == -1).all()
    for c, (a, b) in enumerate(zip(ct[1:], cs[1:])):
      assert (tc[a] == c).all() and (sc[b] == c).all()


@pytest.mark.parametrize("mode", ["pad", "pack"])
@pytest.mark.parametrize("long_docs", ["truncate", "split"])
def test_rows_keep_chunks_whole_and_documents_apart(mode, long_docs):
  cfg = pl.PipelineConfig(batch_size=2, teacher_len=24, student_len=20, mode=mode,
                          long_documents=long_docs, num_epochs=1, shuffle=False)
  docs = [{"text": d} for d in DOCS]
  n_rows = 0
  seen_bytes = b""
  for batch in pl.Pipeline(docs, TEACHER, STUDENT, cfg):
    assert batch["teacher_ids"].shape == (2, 24) and batch["student_ids"].shape == (2, 20)
    assert batch["teacher_ids"].dtype == np.int32 and batch["teacher_loss_mask"].dtype == bool
    for rt, rs in rows(batch):
      check_row(rt, rs)
      n_rows += 1
      seen_bytes += b"".join(STUDENT.token_bytes[i] for i in rs["ids"])
  assert n_rows >= 2
  if mode == "pack":
    short = [{"text": d} for d in ["the cat", "and", "thing", "an ion"] * 3]
    packed = list(pl.Pipeline(short, TEACHER, STUDENT, cfg))
    assert any((b["teacher_segment_ids"] == 2).any() for b in packed)
    for batch in packed:
      for rt, rs in rows(batch):
        check_row(rt, rs)


def test_split_pieces_cover_the_document_at_common_boundaries():
  cfg = pl.PipelineConfig(teacher_len=8, student_len=7, long_documents="split")
  proc = pl.DocumentProcessor(TEACHER, STUDENT, cfg)
  for text in DOCS:
    pieces = proc({"text": text})
    t_text = b"".join(TEACHER.token_bytes[i] for p in pieces for i in p["teacher_ids"])
    s_text = b"".join(STUDENT.token_bytes[i] for p in pieces for i in p["student_ids"])
    assert t_text == s_text == text.encode()
    for p in pieces:
      assert len(p["teacher_ids"]) <= 8 and len(p["student_ids"]) <= 7
      # Where every chunk survived, both sides of the piece hold the same bytes.
      if (p["teacher_chunk_ids"][p["teacher_ids"] > 2] >= 0).all():
        assert (b"".join(TEACHER.token_bytes[i] for i in p["teacher_ids"]) ==
                b"".join(STUDENT.token_bytes[i] for i in p["student_ids"]))
    if len(pieces) > 1:  # continuation pieces start with BOS on the teacher side
      assert all(p["teacher_ids"][0] == TEACHER.bos_id for p in pieces)


@hypothesis.settings(max_examples=30, deadline=None)
@hypothesis.given(st.lists(st.lists(st.sampled_from(WORDS), min_size=1, max_size=15).map("".join),
                           min_size=1, max_size=5))
def test_pack_invariants_property(texts):
  texts = [t for t in texts if t.strip()] or ["x"]
  cfg = pl.PipelineConfig(batch_size=1, teacher_len=9, student_len=11, mode="pack",
                          long_documents="split", num_epochs=1, shuffle=False)
  for batch in pl.Pipeline([{"text": t} for t in texts], TEACHER, STUDENT, cfg):
    for rt, rs in rows(batch):
      check_row(rt, rs)


def test_chat_loss_mask_covers_assistant_only():
  msgs = [{"role": "user", "content": "the thing?"},
          {"role": "assistant", "content": "and the king"}]
  proc = pl.DocumentProcessor(TEACHER, STUDENT, pl.PipelineConfig(teacher_len=64,
                                                                  student_len=64))
  (ex,) = proc({"messages": msgs})
  for side, tok in (("teacher", TEACHER), ("student", STUDENT)):
    target = b"".join(tok.token_bytes[i]
                      for i, m in zip(ex[f"{side}_ids"], ex[f"{side}_loss_mask"]) if m)
    # A token straddling the header/content border (" an") counts as a target.
    assert target in (b"and the king", b" and the king"), target
    # Chunks (the ALM loss) only cover target tokens.
    assert not (ex[f"{side}_chunk_ids"][~ex[f"{side}_loss_mask"]] >= 0).any()
  assert (ex["student_chunk_ids"] >= 0).sum() > 0
  with pytest.raises(sources.DataError, match=r"x\.jsonl:3: .*no special token .<\|im_start\|>"):
    pl.DocumentProcessor(TEACHER, STUDENT, pl.PipelineConfig(chat_family="chatml"))(
        {"messages": msgs, "origin": "x.jsonl:3"})
  with pytest.raises(ValueError, match="chat_family='chatlm' is not valid; choose one of: chatml"):
    pl.PipelineConfig(chat_family="chatlm")


def _take(pipe, n):
  return [next(pipe) for _ in range(n)]


def _same(a, b):
  return all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in x)


@pytest.mark.parametrize("mode", ["pad", "pack"])
def test_state_restore_mid_epoch_gives_same_batches(mode):
  docs = [{"text": f"{d} {i}"} for i in range(6) for d in DOCS]
  cfg = pl.PipelineConfig(batch_size=3, teacher_len=16, student_len=14, mode=mode,
                          long_documents="split", seed=3, num_epochs=2)
  a = pl.Pipeline(docs, TEACHER, STUDENT, cfg)
  _take(a, 4)
  state = json.loads(json.dumps(a.state()))  # must survive a JSON checkpoint
  after = _take(a, 5)
  b = pl.Pipeline(docs, TEACHER, STUDENT, cfg)
  b.restore(state)
  assert _same(after, _take(b, 5))


def test_order_is_deterministic_from_the_seed():
  docs = [{"text": f"{d} {i}"} for i in range(5) for d in DOCS]
  mk = lambda seed: _take(pl.Pipeline(docs, TEACHER, STUDENT, pl.PipelineConfig(
      batch_size=2, teacher_len=16, student_len=16, seed=seed)), 3)
  assert _same(mk(1), mk(1))
  assert not _same(mk(1), mk(2))


def test_sources_and_bad_input(tmp_path):
  good = tmp_path / "a.jsonl"
  good.write_text('{"text": "the cat"}\n\n{"text": "and the thing"}\n'
                  '{"messages": [{"role": "user", "content": "hi"}]}\n')
  src = sources.open_source(good)
  assert len(src) == 3 and src.num_skipped == 1
  assert src[1] == {"text": "and the thing", "origin": f"{good}:3"}
  assert "messages" in src[2]

  bad = tmp_path / "bad.jsonl"
  bad.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
  with pytest.raises(sources.DataError, match=r"bad\.jsonl:2: invalid UTF-8"):
    sources.open_source(bad)
  nofield = tmp_path / "nofield.jsonl"
  nofield.write_text('{"body": "x"}\n')
  with pytest.raises(sources.DataError, match=r"nofield\.jsonl:1: .*'text'.*\['body'\]"):
    sources.open_source(nofield)
  notjson = tmp_path / "nj.jsonl"
  notjson.write_text('{"text": "x"}\n{"text": \n')
  with pytest.raises(sources.DataError, match=r"nj\.jsonl:2: not valid JSON"):
    sources.open_source(notjson)

  txt = tmp_path / "b.txt"
  txt.write_text("para one\nline two\n\n\npara two\n")
  tsrc = sources.open_source(txt)
  assert [tsrc[i]["text"] for i in range(len(tsrc))] == ["para one\nline two", "para two"]
  assert tsrc[1]["origin"].endswith("b.txt:5")
  btxt = tmp_path / "c.txt"
  btxt.write_bytes(b"fine\n\nnot \xff fine\n")
  with pytest.raises(sources.DataError, match=r"c\.txt:3: invalid UTF-8"):
    sources.open_source(btxt)

  import pyarrow as pa  # pylint: disable=import-outside-toplevel
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  pqf = tmp_path / "d.parquet"
  pq.write_table(pa.table({"text": ["the cat", "", "and"]}), pqf)
  psrc = sources.open_source(pqf)
  assert len(psrc) == 2 and psrc[1]["text"] == "and" and psrc.num_skipped == 1

  with pytest.raises(ValueError, match="mode='packed' is not valid; choose one of: pad, pack"):
    pl.PipelineConfig(mode="packed")


@pytest.mark.slow
def test_workers_give_the_same_batches_and_restore():
  docs = [{"text": f"{d} {i}"} for i in range(4) for d in DOCS]
  mk = lambda w: pl.Pipeline(docs, TEACHER, STUDENT, pl.PipelineConfig(
      batch_size=3, teacher_len=16, student_len=14, mode="pack", long_documents="split",
      num_workers=w, num_epochs=1))
  ref = list(mk(0))
  p = mk(2)
  got = _take(p, 3)
  state = json.loads(json.dumps(p.state()))
  got += list(p)
  p.close()
  assert len(got) == len(ref) and _same(ref, got)
  q = mk(2)
  q.restore(state)
  rest = list(q)
  q.close()
  assert _same(ref[3:], rest) and len(rest) == len(ref) - 3
