"""The hypernetwork zoo (names, build from a recipe, load) and the zero-shot table."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

from alm.hypernet import zoo
from alm.hypernet.evaluate import format_table, zero_shot_table
from alm.hypernet.hypernet import HypernetConfig, HypernetError, Hypernetwork
from alm.hypernet.student import save_hypernet
from alm.models.loading import save_model
from alm.testing.models import tiny_model
from alm.testing.tokenizers import tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def test_unknown_and_unbuilt_names_are_named(tmp_path, monkeypatch):
  monkeypatch.setenv("ALM_ZOO_DIR", str(tmp_path / "zoo"))
  with pytest.raises(HypernetError,
                     match="no-such.*the zoo has: gemma3-270m-unigram, smollm2-135m-unigram"):
    zoo.load("no-such")
  with pytest.raises(HypernetError, match=r"not built.*experiments\.hypernet_zoo "
                     r"--build=smollm2-135m-unigram"):
    zoo.load("smollm2-135m-unigram")
  r = subprocess.run([sys.executable, "-m", "experiments.hypernet_zoo", "--build=no-such"],
                     cwd=ROOT, capture_output=True, text=True, timeout=120,
                     env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert r.returncode == 2 and "smollm2-135m-unigram" in r.stderr, r.stderr[-1000:]


def test_an_entry_builds_from_its_recipe_loads_and_is_measured(tmp_path, monkeypatch):
  base_tok = tiny_tokenizer("bpe", 300)
  base = tiny_model("llama", base_tok.vocab_size, seed=0)
  save_model(base, tmp_path / "base", base_tok)
  other = tiny_tokenizer("unigram", 280)
  other.save_pretrained(tmp_path / "other")
  monkeypatch.setenv("ALM_ZOO_DIR", str(tmp_path / "zoo"))
  monkeypatch.setitem(zoo.ENTRIES, "tiny", zoo.ZooEntry(
      name="tiny", model=str(tmp_path / "base"), distribution="tiny sampled Unigram",
      flags=("--preset=hypernet-demo", "--steps=2", "--batch_size=2", "--teacher_len=32",
             "--student_len=32", "--max_pieces=4", "--hypernet_heads=4",
             "--sampler_vocab_size=200", "--vocab_rows=256", "--sample_docs=8",
             f"--eval_tokenizers={tmp_path / 'other'}", "--eval_batches=1",
             "--learning_rate=1e-2", "--noprogress"), note="a test"))
  assert not zoo.is_built("tiny")
  d = zoo.build("tiny")
  assert d == tmp_path / "zoo" / "tiny" and zoo.is_built("tiny")
  assert (d / "checkpoints").is_dir() and (d / "summary.json").exists()
  hn = zoo.load("tiny")
  assert hn.cfg.max_pieces == 4
  assert zoo.load(str(d)).cfg.max_pieces == 4  # by directory too
  assert "tiny  [built]" in zoo.describe()
  # The zero-shot table: the trained hypernetwork moves off FVT; at init it is FVT exactly.
  from alm.data.sources import open_source  # pylint: disable=import-outside-toplevel
  sets = {"corpus": open_source("default:heldout")}
  rows = zero_shot_table(base, base_tok, hn, {"other": other}, sets, length=32, n_batches=1)
  init = Hypernetwork.for_model(base, base_tok, HypernetConfig(num_heads=4, max_pieces=4),
                                rngs=nnx.Rngs(0))
  rows0 = zero_shot_table(base, base_tok, init, {"other": other}, sets, length=32, n_batches=1)
  assert rows0[0]["hypernet_bpb"] == rows0[0]["fvt_bpb"] and rows0[0]["gap_closed"] == 0.0
  assert rows[0]["fvt_bpb"] == rows0[0]["fvt_bpb"]
  assert rows[0]["original_bpb"] == rows0[0]["original_bpb"] > 0
  assert rows[0]["hypernet_bpb"] != rows[0]["fvt_bpb"] and np.isfinite(rows[0]["gap_closed"])
  assert "| corpus | other (280) |" in format_table(rows)


def test_a_hypernetwork_directory_loads_by_path(tmp_path):
  tok = tiny_tokenizer("bpe", 300)
  base = tiny_model("llama", tok.vocab_size, seed=0)
  hn = Hypernetwork.for_model(base, tok, HypernetConfig(num_heads=4), name="b",
                              rngs=nnx.Rngs(0))
  save_hypernet(hn, tmp_path / "hn")
  assert zoo.load(str(tmp_path / "hn")).base == hn.base


def test_tokenizer_transfer_can_start_from_a_hypernetwork(tmp_path):
  # pylint: disable=import-outside-toplevel
  import jax
  from alm.training.config import TrainConfig
  from alm.training.trainer import RunOptions
  from alm.training.transfer import TransferJob, run_transfer
  tok = tiny_tokenizer("bpe", 300)
  base = tiny_model("llama", tok.vocab_size, seed=0)
  save_model(base, tmp_path / "base", tok)
  tiny_tokenizer("unigram", 280).save_pretrained(tmp_path / "target")
  hn = Hypernetwork.for_model(base, tok, HypernetConfig(num_heads=4), rngs=nnx.Rngs(0))
  save_hypernet(hn, tmp_path / "fvt-like")  # untrained: FVT exactly
  k = hn.out_proj.kernel
  k.set_value(0.05 * jax.random.normal(jax.random.key(3), k.shape, k.dtype))
  save_hypernet(hn, tmp_path / "trained-like")
  cfg = TrainConfig.build(method="alm", steps=0, batch_size=2, teacher_len=32, student_len=32,
                          lora_rank=4, lora_alpha=4.0)

  def init_bpb(init):
    job = TransferJob(model=str(tmp_path / "base"), target_tokenizer=str(tmp_path / "target"),
                      eval_batches=1, eval_batch_size=2, export_dir="", init_hypernet=init)
    return run_transfer(job, cfg, RunOptions(out_dir=str(tmp_path / f"run-{init or 'fvt'}"),
                                             checkpoint_dir="", progress=False,
                                             tensorboard=False))["init_student_bpb"]

  fvt = init_bpb("")
  assert init_bpb(str(tmp_path / "fvt-like")) == fvt
  assert init_bpb(str(tmp_path / "trained-like")) != fvt
  # Another base's hypernetwork is refused, naming the fingerprints.
  other = tiny_model("llama", tok.vocab_size, seed=5)
  save_hypernet(Hypernetwork.for_model(other, tok, HypernetConfig(num_heads=4),
                                       rngs=nnx.Rngs(0)), tmp_path / "other-base")
  with pytest.raises(HypernetError, match="was trained for base model"):
    init_bpb(str(tmp_path / "other-base"))
  with pytest.raises(ValueError, match="init_hypernet"):
    TransferJob(student_model="x", init_hypernet="y")


def test_rebuild_starts_over_and_drops_the_stale_table(tmp_path, monkeypatch):
  monkeypatch.setenv("ALM_ZOO_DIR", str(tmp_path / "zoo"))
  calls = []
  monkeypatch.setattr(zoo.subprocess, "run", lambda cmd, **kw: calls.append(cmd))
  name = zoo.names()[0]
  d = zoo.entry_dir(name)
  d.mkdir(parents=True)
  (d / "zero_shot.md").write_text("a table of the old build")
  zoo.build(name)  # resumes: the old table stays until a new one is measured
  assert "--noresume" not in calls[-1] and (d / "zero_shot.md").exists()
  zoo.build(name, rebuild=True)
  assert "--noresume" in calls[-1] and not (d / "zero_shot.md").exists()
  assert calls[-1][:len(zoo.entry(name).command())] == zoo.entry(name).command()


def test_the_base_models_own_tokenizer_is_dropped_or_refused():
  from alm.hypernet.evaluate import (  # pylint: disable=import-outside-toplevel
      DEFAULT_TOKENIZERS, held_out_tokenizers, same_tokenizer)
  base_tok = tiny_tokenizer("bpe", 300)
  again = tiny_tokenizer("bpe", 300)  # built anew: the same vocabulary, another object
  other = tiny_tokenizer("unigram", 280)
  assert same_tokenizer(base_tok, again) and not same_tokenizer(base_tok, other)
  toks = {"own": again, "other": other}
  assert list(held_out_tokenizers(base_tok, toks, explicit=False)) == ["other"]
  with pytest.raises(HypernetError, match="own is the base model's own tokenizer.*--tokenizers"):
    held_out_tokenizers(base_tok, toks, explicit=True)
  with pytest.raises(HypernetError, match="No tokenizer to transfer to"):
    held_out_tokenizers(base_tok, {"own": again}, explicit=False)
  assert held_out_tokenizers(base_tok, {"other": other}, explicit=True) == {"other": other}
  assert len(DEFAULT_TOKENIZERS) == 5 and "gemma3-270m" in DEFAULT_TOKENIZERS


def test_a_hypernetwork_measured_worse_than_fvt_warns_when_loaded(tmp_path, monkeypatch, caplog):
  import json  # pylint: disable=import-outside-toplevel
  monkeypatch.setenv("ALM_ZOO_DIR", str(tmp_path / "zoo"))
  d = zoo.entry_dir("gemma3-270m-unigram")
  base_tok = tiny_tokenizer("bpe", 300)
  hn = Hypernetwork.for_model(tiny_model("llama", base_tok.vocab_size, seed=0), base_tok,
                              HypernetConfig(num_heads=4, max_pieces=4), rngs=nnx.Rngs(0))
  save_hypernet(hn, d / "hypernet")
  with caplog.at_level("WARNING"):
    zoo.load("gemma3-270m-unigram")  # not measured yet: nothing to say
  assert zoo.worse_than_fvt(d) == [] and "worse than FVT" not in caplog.text
  row = {"set": "corpus", "tokenizer": "qwen3", "vocab_size": 9, "original_bpb": 1.0,
         "fvt_bpb": 2.0, "hypernet_bpb": 1.5, "gap_closed": 0.5}
  (d / "zero_shot.json").write_text(json.dumps({"rows": [
      row, {**row, "tokenizer": "llama3", "hypernet_bpb": 2.5, "gap_closed": -0.5}]}))
  (d / "zero_shot.md").write_text(format_table([row]))
  assert zoo.worse_than_fvt(d) == ["corpus/llama3"]
  with caplog.at_level("WARNING"):
    zoo.load("gemma3-270m-unigram")
    zoo.load(str(d))
  assert caplog.text.count("worse than FVT zero-shot on corpus/llama3") == 2
  assert "worse than FVT on: corpus/llama3" in zoo.describe()
  (d / "zero_shot.json").write_text('{"rows": [')  # a cut-off write: the entry still loads
  with caplog.at_level("WARNING"):
    assert zoo.load("gemma3-270m-unigram") is not None
  assert "unreadable zero-shot table" in caplog.text
