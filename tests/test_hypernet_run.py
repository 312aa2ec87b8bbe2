"""experiments.train_hypernet's run, end to end on a tiny base model."""

from __future__ import annotations

import json

import numpy as np

from alm.hypernet.hypernet import HypernetConfig
from alm.hypernet.sampler import SamplerConfig
from alm.hypernet.student import load_hypernet
from alm.hypernet.train import HypernetJob, run_hypernet
from alm.models.loading import save_model
from alm.testing.models import tiny_model
from alm.testing.tokenizers import tiny_tokenizer
from alm.training.config import TrainConfig
from alm.training.trainer import RunOptions


def test_a_short_run_trains_evaluates_zero_shot_and_exports(tmp_path):
  base_tok = tiny_tokenizer("bpe", 300)
  save_model(tiny_model("llama", base_tok.vocab_size, seed=0, tie_embeddings=False),
             tmp_path / "base", base_tok)
  other = tiny_tokenizer("unigram", 280)  # a tokenizer never sampled: zero-shot
  other.save_pretrained(tmp_path / "other")
  job = HypernetJob(model=str(tmp_path / "base"),
                    hypernet=HypernetConfig(num_heads=4, max_pieces=4),
                    sampler=SamplerConfig(vocab_size=200, min_count=1), vocab_rows=256,
                    sample_docs=8, eval_tokenizers=(str(tmp_path / "other"),),
                    eval_batches=1, export_dir=str(tmp_path / "hn"))
  cfg = TrainConfig.build(preset="hypernet-demo", steps=3, batch_size=2, teacher_len=32,
                          student_len=32)
  s = run_hypernet(job, cfg, RunOptions(out_dir=str(tmp_path / "run"), progress=False,
                                        tensorboard=False, checkpoint_every=2))
  assert s["steps"] == 3 and np.isfinite(s["final_student_bpb"])
  label = "@other"
  assert np.isfinite(s[f"final_student_bpb{label}"]) and s[f"teacher_bpb{label}"] > 0
  # At init the hypernetwork is FVT: the zero-shot start is FVT's start.
  assert s[f"init_student_bpb{label}"] > s[f"teacher_bpb{label}"]
  assert load_hypernet(tmp_path / "hn").cfg.max_pieces == 4
  recs = [json.loads(l) for l in open(tmp_path / "run" / "metrics.jsonl")]
  assert [r["step"] for r in recs if r["kind"] == "train"] == [1, 2, 3]


def test_every_steps_tokenizer_is_sampled_from_sample_docs_documents(monkeypatch):
  from alm.hypernet import train as train_lib  # pylint: disable=import-outside-toplevel
  from alm.hypernet.batches import HypernetBatchConfig  # pylint: disable=import-outside-toplevel
  from tests import training_utils as tu  # pylint: disable=import-outside-toplevel
  base_tok = tiny_tokenizer("bpe", 300)
  base = tiny_model("llama", base_tok.vocab_size, seed=0)
  seen = []
  real = train_lib.sample_tokenizer
  monkeypatch.setattr(train_lib, "sample_tokenizer",
                      lambda tok, texts, **kw: seen.append(list(texts)) or real(tok, texts, **kw))
  docs = [{"text": t} for t in tu.TEXTS]
  job = HypernetJob(sampler=SamplerConfig(vocab_size=50, min_count=1), vocab_rows=256,
                    sample_docs=5)
  batches = train_lib.HypernetBatches(docs, base, base_tok, HypernetBatchConfig(
      batch_size=2, teacher_len=24, student_len=32, vocab_rows=256), job, seed=0)
  next(batches)
  next(batches)
  order = [docs[i]["text"] for i in batches.order]
  n = len(order)
  # Step 0's window wraps to the permutation's end; step 1's ends at its own documents.
  assert seen[0] == [order[i % n] for i in range(-3, 2)]
  assert seen[1] == [order[i % n] for i in range(-1, 4)]


def test_the_lexical_term_with_copy_shared_is_refused_before_anything_loads(tmp_path):
  import pytest  # pylint: disable=import-outside-toplevel
  from alm.hypernet.hypernet import HypernetError  # pylint: disable=import-outside-toplevel
  job = HypernetJob(model=str(tmp_path / "no-such-model"),
                    hypernet=HypernetConfig(copy_shared=True))
  cfg = TrainConfig.build(preset="hypernet-demo", add_terms="lexical=1")
  with pytest.raises(HypernetError, match="always 0; use one of the two"):
    run_hypernet(job, cfg, RunOptions(out_dir=str(tmp_path / "run"), progress=False))
