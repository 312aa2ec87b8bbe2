"""The offline default corpus: deterministic, disjoint splits, prose-like text."""

from __future__ import annotations

import json

import pytest

from alm.data import corpus


def test_split_is_a_pure_function_of_the_text():
  texts = [f"document number {i} " * 20 for i in range(2000)]
  held = [t for t in texts if corpus.heldout_of(t, 5.0)]
  assert 50 < len(held) < 150  # ~5%
  assert held == [t for t in texts if corpus.heldout_of(t, 5.0)]


def test_split_long_and_comment_blocks():
  text = "\n\n".join(["word " * 30] * 10)
  pieces = list(corpus._split_long(text, 400))
  assert all(len(p.encode()) <= 400 for p in pieces)
  assert "\n\n".join(pieces) == text
  src = "x = 1  # trailing\n# first line of a block\n# second line\n\ny = 2\n#!odd\n# other\n"
  assert list(corpus._comment_blocks(src)) == ["first line of a block second line", "other"]


def test_config_validation():
  with pytest.raises(ValueError, match="valid sources: stdlib, python-doc, fortunes"):
    corpus.CorpusConfig(sources=("wiki",))
  with pytest.raises(ValueError, match="valid splits: train, heldout"):
    corpus.default_corpus("test")


@pytest.mark.slow
def test_build_default_corpus(tmp_path, monkeypatch):
  monkeypatch.setenv("ALM_CACHE_DIR", str(tmp_path))
  train, held = corpus.default_corpus("train"), corpus.default_corpus("heldout")
  assert train and held
  read = lambda paths: [json.loads(l)["text"] for p in paths for l in open(p, encoding="utf-8")]
  tr, he = read(train), read(held)
  assert not set(tr) & set(he)  # held-out text is never in training
  assert all(corpus.heldout_of(t, 5.0) for t in he)
  assert sum(map(len, tr)) > 1_000_000 and len(he) > 50
  m = corpus.manifest()
  assert m["splits"]["train"]["documents"] == len(tr)
  # Built once: a second call reuses the shards.
  assert corpus.default_corpus("train") == train
