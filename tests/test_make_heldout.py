"""Held-out sets: texts sampled from the teacher (alm.eval.teacher_samples), arithmetic."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from alm.data.sources import JsonlSource
from alm.testing.models import tiny_model
from alm.testing.tokenizers import tiny_tokenizer
from alm.eval import teacher_samples
from experiments import make_heldout


def test_arithmetic_lines_are_true_and_deterministic():
  texts = make_heldout.arithmetic_texts(20, 5, seed=3)
  assert texts == make_heldout.arithmetic_texts(20, 5, seed=3)
  assert texts != make_heldout.arithmetic_texts(20, 5, seed=4)
  for t in texts:
    lines = t.split("\n")
    assert len(lines) == 5
    for line in lines:
      m = re.fullmatch(r"(\d+) ([+*]) (\d+) = (\d+)", line)
      assert m, line
      a, op, b, c = int(m[1]), m[2], int(m[3]), int(m[4])
      assert (a + b if op == "+" else a * b) == c


def test_cut_at_special():
  assert teacher_samples.cut_at_special([5, 6, 2, 7], {2}) == [5, 6]
  assert teacher_samples.cut_at_special(np.array([5, 6]), {2}) == [5, 6]
  assert teacher_samples.cut_at_special([2, 5], {2}) == []


def test_teacher_samples_are_deterministic_text_without_specials():
  tok = tiny_tokenizer()
  model = tiny_model("llama", tok.vocab_size, seed=1)
  kw = dict(num=5, max_new_tokens=24, batch_size=4, temperature=1.0, min_chars=1)
  a = teacher_samples.sample_texts(model, tok, seed=0, **kw)
  assert len(a) == 5
  assert a == teacher_samples.sample_texts(model, tok, seed=0, **kw)
  assert a != teacher_samples.sample_texts(model, tok, seed=1, **kw)
  for t in a:
    assert t.strip()
    assert "<bos>" not in t and "<eos>" not in t


def test_teacher_samples_unreachable_min_chars_is_a_clear_error():
  tok = tiny_tokenizer()
  model = tiny_model("llama", tok.vocab_size, seed=1)
  with pytest.raises(ValueError, match="min_chars"):
    teacher_samples.sample_texts(model, tok, num=2, max_new_tokens=8, batch_size=2,
                                 temperature=1.0, min_chars=10_000, seed=0)


def test_written_file_is_a_valid_heldout_source(tmp_path):
  path = tmp_path / "sub" / "arith.jsonl"
  texts = make_heldout.arithmetic_texts(4, 2, seed=0)
  teacher_samples.write_jsonl(path, texts, "arithmetic-seed0")
  lines = path.read_text(encoding="utf-8").splitlines()
  assert [json.loads(l)["text"] for l in lines] == texts
  src = JsonlSource([path])
  assert [src[i]["text"] for i in range(len(src))] == texts
  assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temp file left


def test_teacher_samples_file_is_cached_and_keyed_by_settings(tmp_path, monkeypatch):
  tok = tiny_tokenizer()
  model = tiny_model("llama", tok.vocab_size, seed=1)
  kw = dict(num=3, max_new_tokens=16, cache_dir=tmp_path)
  monkeypatch.setattr(teacher_samples, "sample_texts",
                      lambda *a, **k: ["sampled text number one!"] * k["num"])
  p = teacher_samples.teacher_samples_file("tiny", model, tok, **kw)
  assert len(p.read_text().splitlines()) == 3
  calls = []
  monkeypatch.setattr(teacher_samples, "sample_texts", lambda *a, **k: calls.append(1) or [])
  assert teacher_samples.teacher_samples_file("tiny", model, tok, **kw) == p  # from the cache
  assert not calls
  monkeypatch.setattr(teacher_samples, "sample_texts", lambda *a, **k: ["other"] * k["num"])
  q = teacher_samples.teacher_samples_file("tiny", model, tok, **{**kw, "seed": 1})
  assert q != p and q.read_text().count("other") == 3


def _binary(*flags):
  import os  # pylint: disable=import-outside-toplevel
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  from pathlib import Path  # pylint: disable=import-outside-toplevel
  return subprocess.run([sys.executable, "-m", "experiments.make_heldout", *flags],
                        cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True,
                        timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})


def test_binary_checks_the_output_path_before_any_work(tmp_path):
  r = _binary("--kind=arithmetic", f"--out={tmp_path}")
  assert r.returncode == 2 and "not a writable file path" in r.stderr, r.stderr[-1000:]
  r = _binary("--kind=arithmetic", "--num=3", f"--out={tmp_path / 'new' / 'a.jsonl'}")
  assert r.returncode == 0, r.stderr[-1000:]
  assert len((tmp_path / "new" / "a.jsonl").read_text().splitlines()) == 3
  r = _binary("--kind=arith", f"--out={tmp_path / 'b.jsonl'}")
  assert r.returncode != 0 and "<teacher_samples|arithmetic>" in r.stderr
