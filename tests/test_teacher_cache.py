"""The teacher cache (SPEC §15): format, checks, and training from it equals the live teacher."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from alm.data import teacher_cache as tc
from alm.data.pipeline import Pipeline, PipelineConfig
from alm.tokenization.vocab import shared_boundary_bytes
from alm.training.config import TrainConfig
from alm.training.optim import make_optimizer
from alm.training.step import (BATCH_KEYS, CACHE_KEYS, Stepper, cache_hidden_layers,
                               check_cacheable, make_consts, teacher_cache_arrays)
from alm.training.students import build_transfer_model
from tests import training_utils as tu


def _rows(n, t=6, seed=0):
  rng = np.random.default_rng(seed)
  return [{"teacher_ids": rng.integers(0, 50, t).astype(np.int32),
           "teacher_loss_mask": rng.random(t) < 0.5,
           CACHE_KEYS[0]: rng.standard_normal(t).astype(np.float32)} for _ in range(n)]


def test_rows_round_trip():
  import ml_dtypes  # pylint: disable=import-outside-toplevel
  rows = _rows(3)
  rows[0]["teacher_hidden@2"] = np.random.default_rng(1).standard_normal((6, 4)).astype(
      ml_dtypes.bfloat16)
  for row in rows:
    back = tc.decode_row(tc.encode_row(row))
    assert set(back) == set(row)
    for k in row:
      assert back[k].dtype == row[k].dtype
      np.testing.assert_array_equal(back[k], row[k])


def _write(path, rows, fp=None, per_shard=4):
  w = tc.CacheWriter(path, fp or {"run": 1}, rows_per_shard=per_shard, command="BUILD-IT")
  w.add(rows)
  return w.finish({"skipped_documents": 2})


def test_cache_batches_in_order_with_state(tmp_path):
  rows = _rows(10)
  m = _write(tmp_path / "c", rows)
  assert m["rows"] == 10 and len(m["shards"]) == 3 and m["complete"]
  cache = tc.TeacherCache(tmp_path / "c", {"run": 1})
  it = cache.batches(3, steps=3)
  assert it.num_skipped == 2 and it.teacher_cache
  first = next(it)
  np.testing.assert_array_equal(first["teacher_ids"], np.stack([r["teacher_ids"]
                                                                for r in rows[:3]]))
  state = it.state()
  second = next(it)
  again = cache.batches(3)
  again.restore(json.loads(json.dumps(state)))
  np.testing.assert_array_equal(next(again)[CACHE_KEYS[0]], second[CACHE_KEYS[0]])
  next(it)
  with pytest.raises(tc.TeacherCacheError, match="ran out after 9 rows"):
    next(it)
  with pytest.raises(tc.TeacherCacheError, match=r"holds 10 rows = 3 steps of batch 3; this "
                     r"run needs 4\. Build a larger cache \(--steps=4\)"):
    cache.batches(3, steps=4)


def test_bad_caches_are_refused_with_the_fix(tmp_path):
  d = tmp_path / "c"
  with pytest.raises(tc.TeacherCacheError, match="No teacher cache at .*Build it with: CMD"):
    tc.TeacherCache(d, {"run": 1}, build_command="CMD")
  # Unfinished: a build that stopped after its first shard.
  w = tc.CacheWriter(d, {"run": 1}, rows_per_shard=4, command="BUILD-IT")
  w.add(_rows(6))
  with pytest.raises(tc.TeacherCacheError, match="unfinished .4 rows so far.*BUILD-IT"):
    tc.TeacherCache(d, {"run": 1})
  # Resumed by a writer of the same run; refused for another run's fingerprint.
  with pytest.raises(tc.TeacherCacheError, match=r"another run \(run: cache 1 vs run 2\)"):
    tc.CacheWriter(d, {"run": 2})
  w2 = tc.CacheWriter(d, {"run": 1}, rows_per_shard=4)
  assert w2.rows_done == 4 and not w2.complete
  w2.add(_rows(6)[4:])
  w2.finish()
  assert len(tc.TeacherCache(d, {"run": 1})) == 6
  # Another run.
  with pytest.raises(tc.TeacherCacheError, match=r"built for another run: model: cache 'a' "
                     r"vs run 'b'.*Build it with: CMD"):
    _write(tmp_path / "o", _rows(2), fp={"model": "a"})
    tc.TeacherCache(tmp_path / "o", {"model": "b"}, build_command="CMD")
  # A corrupt shard (same size), a truncated one, a missing one.
  shard = d / json.loads((d / "cache.json").read_text())["shards"][0]["file"]
  raw = bytearray(shard.read_bytes())
  raw[len(raw) // 2] ^= 0xFF
  shard.write_bytes(bytes(raw))
  with pytest.raises(tc.TeacherCacheError, match="is corrupt"):
    tc.TeacherCache(d, {"run": 1})
  shard.write_bytes(bytes(raw[:-100]))
  with pytest.raises(tc.TeacherCacheError, match="is truncated"):
    tc.TeacherCache(d, {"run": 1})
  shard.unlink()
  with pytest.raises(tc.TeacherCacheError, match="is missing"):
    tc.TeacherCache(d, {"run": 1})


@pytest.mark.parametrize("method,add_terms,constraint,accum,hidden_dtype", [
    ("alm", "", "boundary_prob", 1, None),  # the boundary log-probs decide the chunks
    ("alm+sft", "alm_space=1", "unconstrained", 1, None),  # debiased, two chunkings, NTP
    # The hidden-state term (its whole-batch pre-pass under accumulation) from cached
    # float32 hidden states, GradMag.
    ("alm", "hidden=1", "unconstrained", 2, "float32"),
])
def test_training_from_the_cache_equals_the_live_teacher(tmp_path, method, add_terms,
                                                         constraint, accum, hidden_dtype):
  corpus = tu.write_corpus(tmp_path)
  tt, st = tu.teacher_tokenizer(), tu.student_tokenizer()
  cfg = TrainConfig.build(**{"method": method, "add_terms": add_terms,
                             "constraint": constraint, "batch_size": 2, "teacher_len": 24,
                             "student_len": 48, "lora_rank": 4, "learning_rate": 1e-2,
                             "warmup_steps": 0, "steps": 3, "grad_accum": accum,
                             "combine": "gradmag" if hidden_dtype else "fixed"})
  pipe = Pipeline(str(corpus), tt, st, PipelineConfig(batch_size=2, teacher_len=24,
                                                      student_len=48, seed=0))
  batches = [next(pipe) for _ in range(3)]
  # The cache: the teacher's outputs through the file format.
  teacher = tu.teacher_model(0)
  layers = cache_hidden_layers(cfg, teacher.cfg)
  assert layers == ((teacher.cfg.num_layers,) if hidden_dtype else ())
  mask = jnp.asarray(tt.boundary_token_mask(shared_boundary_bytes(tt, st)))
  fn = nnx.jit(teacher_cache_arrays, static_argnames=("hidden_layers", "hidden_dtype"))
  w = tc.CacheWriter(tmp_path / "cache", {"test": 1}, rows_per_shard=3)
  for b in batches:
    got = fn(teacher, {k: jnp.asarray(b[k]) for k in BATCH_KEYS}, mask, hidden_layers=layers,
             hidden_dtype=jnp.float32)
    w.add(tc.split_rows({**{k: b[k] for k in BATCH_KEYS},
                         **{k: np.asarray(v) for k, v in got.items()}}))
  w.finish()
  it = tc.TeacherCache(tmp_path / "cache", {"test": 1}).batches(2, steps=3)
  cached = [next(it) for _ in range(3)]

  def train(data, cache):
    model = build_transfer_model(tu.teacher_model(0), tt, st, cfg)
    s = Stepper(model, cfg, make_consts(model, cfg, tt, st), make_optimizer(cfg),
                teacher_cache=cache)
    losses = [float(s.step(b)["loss"]) for b in data]
    return losses, jax.tree.leaves(s.state.trainable)

  live_losses, live = train(batches, False)
  cache_losses, from_cache = train(cached, True)
  worst = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
              for a, b in zip(live, from_cache))
  if not hidden_dtype:
    # Bit-identical (measured on CPU): the cache stores what the step computes from the
    # live teacher's logits, by the same function.
    assert cache_losses == live_losses
    assert worst == 0.0, worst
  else:
    # The cached hidden states come from the teacher's forward compiled on its own, the
    # live ones from the step's program, which XLA fuses differently: they differ in the
    # last bits, and so do the gradients. Measured: |loss diff| 2.5e-8, |param diff|
    # 2.5e-6 after 3 Adam steps at lr 1e-2 (a step moves a parameter by ~1e-2).
    # Step 0 too: seen 4e-9 apart on a clean-clone CI run (no exact equality to claim).
    np.testing.assert_allclose(cache_losses, live_losses, rtol=1e-6, atol=1e-7)
    assert worst <= 2e-5, worst
  assert live_losses[0] != live_losses[-1]  # it trained
  if hidden_dtype:  # a cache without the hidden states is refused, naming them
    bare = {k: v for k, v in cached[0].items() if not k.startswith("teacher_hidden")}
    model = build_transfer_model(tu.teacher_model(0), tt, st, cfg)
    s = Stepper(model, cfg, make_consts(model, cfg, tt, st), make_optimizer(cfg),
                teacher_cache=True)
    with pytest.raises(tc.TeacherCacheError, match="holds no hidden states"):
      s.step(bare)


def test_methods_that_need_the_teacher_distribution_are_refused():
  for flat, what in ((dict(method="dskd"), "dskd"), (dict(method="uld"), "uld"),
                     (dict(method="sft"), "does not read the teacher")):
    with pytest.raises(tc.TeacherCacheError, match=what):
      check_cacheable(TrainConfig.build(**flat))
  check_cacheable(TrainConfig.build(**dict(method="alm+sft", add_terms="alm_space=1,hidden=1")))


def _tiny_job_files(tmp_path):
  # pylint: disable=import-outside-toplevel
  from alm.models.loading import save_model
  from alm.testing.models import tiny_model
  from alm.testing.tokenizers import tiny_tokenizer
  tok = tiny_tokenizer("bpe", 300)
  save_model(tiny_model("llama", tok.vocab_size, seed=0), tmp_path / "teacher", tok)
  target = tiny_tokenizer("unigram", 280)
  target.save_pretrained(tmp_path / "target")
  save_model(tiny_model("llama", target.vocab_size, seed=1), tmp_path / "student", target)
  texts = ["A second domain: numbers 12 34 56 and café.", "Another line of held-out text."]
  (tmp_path / "other.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))


def _opts(tmp_path, name):
  from alm.training.trainer import RunOptions  # pylint: disable=import-outside-toplevel
  return RunOptions(out_dir=str(tmp_path / name), checkpoint_dir="", progress=False,
                    tensorboard=False)


def _train_losses(run_dir):
  return [r["loss"] for r in map(json.loads, open(run_dir / "metrics.jsonl"))
          if r["kind"] == "train"]


def test_transfer_trains_and_evaluates_from_a_cache_built_by_the_job(tmp_path):
  # run_transfer end to end on a tiny HF-directory teacher: training and every held-out
  # set (the main one, another domain, the teacher's samples) read the cache.
  from alm.training.transfer import TransferJob, build_teacher_cache, run_transfer  # pylint: disable=import-outside-toplevel
  _tiny_job_files(tmp_path)
  cfg = TrainConfig.build(method="alm", steps=2, batch_size=2, teacher_len=32, student_len=32,
                          learning_rate=1e-3, warmup_steps=1, lora_rank=4, lora_alpha=4.0)
  live_job = TransferJob(model=str(tmp_path / "teacher"),
                         target_tokenizer=str(tmp_path / "target"), eval_batches=1,
                         eval_batch_size=2, export_dir="", teacher_samples=2,
                         teacher_sample_tokens=48,
                         extra_heldout=(("other", str(tmp_path / "other.jsonl")),))
  job = dataclasses.replace(live_job, teacher_cache=str(tmp_path / "cache"))
  m = build_teacher_cache(job, cfg, str(tmp_path / "cache"), progress=False)
  assert m["rows"] == 4 and m["complete"] and m["stats"]["teacher_tokens"] > 0
  assert m["heldout"] == {"": 2, "other": 2, "teacher": 2}
  assert build_teacher_cache(job, cfg, str(tmp_path / "cache"), progress=False) == m  # done

  cached = run_transfer(job, cfg, _opts(tmp_path, "cached"))
  live = run_transfer(live_job, cfg, _opts(tmp_path, "live"))
  assert cached["steps"] == live["steps"] == 2
  assert _train_losses(tmp_path / "cached") == _train_losses(tmp_path / "live")
  for sfx in ("", "@other", "@teacher"):
    # The teacher's bits: the same per-row sums, computed once at build time.
    assert cached[f"teacher_bpb{sfx}"] == live[f"teacher_bpb{sfx}"], sfx
    assert cached[f"final_student_bpb{sfx}"] == live[f"final_student_bpb{sfx}"], sfx
  # A run that differs from the cache's (another seed) is refused, with the command.
  with pytest.raises(tc.TeacherCacheError, match=r"pipeline\.seed: cache 0 vs run 1.*"
                     r"python -m experiments\.cache_teacher .*--seed=1"):
    run_transfer(job, cfg.replace(seed=1), _opts(tmp_path, "other-seed"))
  # A held-out set the cache lacks is refused with the command that adds it, which keeps
  # the training rows and adds just that set.
  more = dataclasses.replace(job, extra_heldout=job.extra_heldout + (
      ("again", str(tmp_path / "other.jsonl")),))
  with pytest.raises(tc.TeacherCacheError, match=r"no held-out set 'again'.*"
                     r"--extra_heldout=again="):
    run_transfer(more, cfg, _opts(tmp_path, "more"))
  shards = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "cache").glob("rows-*")}
  m2 = build_teacher_cache(more, cfg, str(tmp_path / "cache"), progress=False)
  assert m2["heldout"]["again"] == 2
  assert shards == {p.name: p.stat().st_mtime_ns for p in (tmp_path / "cache").glob("rows-*")}


def test_distillation_from_a_cache_never_loads_the_teacher(tmp_path, monkeypatch):
  # A separate teacher stays on disk: its config and tokenizer are read, its weights are
  # not; the run equals the live teacher's.
  # pylint: disable=import-outside-toplevel
  from alm.models import loading
  from alm.training.transfer import TransferJob, build_teacher_cache, run_transfer
  _tiny_job_files(tmp_path)
  cfg = TrainConfig.build(method="alm", steps=2, batch_size=2, teacher_len=32, student_len=32,
                          learning_rate=1e-3, warmup_steps=1, train_embeddings=True)
  live_job = TransferJob(model=str(tmp_path / "teacher"), student_model=str(tmp_path / "student"),
                         eval_batches=1, eval_batch_size=2, export_dir="")
  job = dataclasses.replace(live_job, teacher_cache=str(tmp_path / "cache"))
  build_teacher_cache(job, cfg, str(tmp_path / "cache"), progress=False)
  live = run_transfer(live_job, cfg, _opts(tmp_path, "live"))
  real = loading.load_weights
  teacher_dir = str(tmp_path / "teacher")

  def student_only(path, **kw):
    assert str(path) != teacher_dir, "the teacher's weights were loaded"
    return real(path, **kw)

  monkeypatch.setattr(loading, "load_weights", student_only)
  cached = run_transfer(job, cfg, _opts(tmp_path, "cached"))
  assert _train_losses(tmp_path / "cached") == _train_losses(tmp_path / "live")
  for k in ("teacher_bpb", "init_student_bpb", "final_student_bpb"):
    assert cached[k] == live[k], k
  # Replacing the teacher's weights on disk invalidates the cache (its files' hash).
  w = next((tmp_path / "teacher").glob("*.safetensors"))
  w.write_bytes(w.read_bytes()[:-1] + b"\x00")
  with pytest.raises(tc.TeacherCacheError, match="teacher_files"):
    run_transfer(job, cfg, _opts(tmp_path, "changed"))


def test_the_binary_refuses_a_method_that_needs_the_live_teacher(tmp_path):
  import os  # pylint: disable=import-outside-toplevel
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  from pathlib import Path  # pylint: disable=import-outside-toplevel
  r = subprocess.run([sys.executable, "-m", "experiments.cache_teacher", "--method=dskd",
                      f"--out_dir={tmp_path / 'c'}"], cwd=Path(__file__).resolve().parents[1],
                     capture_output=True, text=True, timeout=300,
                     env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert r.returncode == 2, r.stderr[-2000:]
  assert "full distribution" in r.stderr and "dskd" in r.stderr
  assert not (tmp_path / "c").exists()


def test_each_process_writes_and_reads_its_own_shards(tmp_path, monkeypatch):
  # Multi-host, simulated: process 1 of 2 builds from its own data shard (half the batch)
  # into cache-p1.json + rows-p1-*, next to process 0's, and reads back exactly those rows.
  # pylint: disable=import-outside-toplevel
  from alm.data.sources import open_source
  from alm.tokenization.loading import load_tokenizer
  from alm.training.transfer import TransferJob, _pipeline_config, build_teacher_cache
  _tiny_job_files(tmp_path)
  cfg = TrainConfig.build(method="alm", steps=2, batch_size=4, teacher_len=32, student_len=32)
  job = TransferJob(model=str(tmp_path / "teacher"), target_tokenizer=str(tmp_path / "target"),
                    eval_batches=1, eval_batch_size=2)
  out = tmp_path / "cache"
  rows = {}
  for proc in (0, 1):
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "process_index", lambda proc=proc: proc)
    m = build_teacher_cache(job, cfg, str(out), progress=False)
    assert m["rows"] == 4  # 2 steps x 2 rows: this process's half of each batch
    assert {s["file"].split("-")[1] for s in m["shards"]} == {f"p{proc}"}
    pipe = Pipeline(open_source(job.data), load_tokenizer(job.model),
                    load_tokenizer(job.target_tokenizer), _pipeline_config(cfg, job))
    want = [next(pipe) for _ in range(2)]
    pipe.close()
    it = tc.TeacherCache(out, process_index=proc).batches(2, steps=2)
    got = [next(it) for _ in range(2)]
    for w, g in zip(want, got):
      for k in BATCH_KEYS:
        np.testing.assert_array_equal(w[k], g[k])
    rows[proc] = got
    assert (out / tc.manifest_name(proc)).exists()
  assert tc.manifest_name(1) == "cache-p1.json"
  assert not np.array_equal(rows[0][0]["teacher_ids"], rows[1][0]["teacher_ids"])
  # Each process's held-out sets too (the same rows on every process).
  assert (tc.heldout_dir(out, "") / "cache-p1.json").exists()
