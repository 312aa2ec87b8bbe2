"""The trainer's baselines (DSKD, MinED, ULD) and the "unbiased" constraint, on tiny models."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from alm.data.pipeline import Pipeline, PipelineConfig
from alm.losses import alm as alm_lib
from alm.losses import baselines, dskd
from alm.losses.ntp import next_token_loss
from alm.models import lora as lora_lib
from alm.testing.tokenizers import GreedyTokenizer
from alm.tokenization.bias import compute_bias_tables, count_tokens
from alm.training import step as step_lib
from alm.training.config import TrainConfig
from alm.training.methods.alm import ALMTerm
from alm.training.methods.mined import cached_mined_map
from alm.training.students import build_transfer_model, trainable_filter
from alm.training.optim import make_optimizer
from alm.training.trainer import RunOptions
from alm.training.transfer import (BiasTablesError, TransferJob, bias_tables_align_fn,
                                   load_bias_tables, run_transfer)

import training_utils as tu

T_LEN, S_LEN = 24, 48
BASELINES = ("dskd", "mined", "uld")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def _cache(tmp_path_factory):
  # The MinED map is cached under $ALM_CACHE_DIR: keep the tests' maps out of ~/.cache.
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv("ALM_CACHE_DIR", str(tmp_path_factory.mktemp("alm-cache")))
    yield


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  return tu.write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def data(corpus):
  tt, st = tu.teacher_tokenizer(), tu.student_tokenizer()
  pipe = Pipeline(str(corpus), tt, st, PipelineConfig(batch_size=4, teacher_len=T_LEN,
                                                      student_len=S_LEN, seed=0))
  return tt, st, [next(pipe) for _ in range(2)]


def _cfg(**kw):
  base = dict(steps=4, batch_size=4, teacher_len=T_LEN, student_len=S_LEN, lora_rank=2,
              lora_alpha=4.0, learning_rate=1e-2, warmup_steps=1, grad_clip=0.0)
  return TrainConfig.build(**{**base, **kw})


def _stepper(cfg, tt, st, tx=None):
  model = build_transfer_model(tu.teacher_model(0), tt, st, cfg)
  return step_lib.Stepper(model, cfg, step_lib.make_consts(model, cfg, tt, st),
                          tx or make_optimizer(cfg))


def _forward(transformer, b, side):
  seg = b[f"{side}_segment_ids"]
  return transformer(b[f"{side}_ids"], attention_mask=seg > 0, segment_ids=seg,
                     positions=b[f"{side}_positions"], hidden_layers=(-1,))


def _library_loss(method, model, batch, tt, st):
  """The method's distillation loss and NTP, called directly (not through the step)."""
  vmap = baselines.mined_vocab_map(list(st.token_bytes), list(tt.token_bytes))
  vmap[st.bos_id], vmap[st.eos_id] = tt.bos_id, tt.eos_id
  graphdef, state = nnx.split(model)

  @jax.jit
  def f(state, b):
    model = nnx.merge(graphdef, state)
    tr_t, tr_s = model.teacher.transformer, model.student.transformer
    with lora_lib.lora_disabled(tr_t):
      t_out = _forward(tr_t, b, "teacher")
    s_out = _forward(tr_s, b, "student")
    ntp = next_token_loss(s_out.logits, b["student_ids"], b["student_loss_mask"])
    unembed_err = jnp.zeros(())
    if method == "dskd":
      sides = []
      for tr, out, side in ((tr_t, t_out, "teacher"), (tr_s, s_out, "student")):
        hidden = tr.final_norm(out.hidden_states[tr.cfg.num_layers])
        emb = tr.embedder.embedding[...]
        assert tr.lm_head is None  # tiny llama: tied, so the unembedding is emb.T
        # DSKD's hidden states are the ones the output matrix maps to the logits.
        unembed_err = jnp.maximum(unembed_err, jnp.max(jnp.abs(hidden @ emb.T - out.logits)))
        sides.append(dskd.DSKDSide(out.logits, hidden, b[f"{side}_ids"], emb, emb.T,
                                   b[f"{side}_loss_mask"]))
      loss = dskd.dskd_loss(*sides, model.heads["dskd"])
    elif method == "mined":
      loss = baselines.mined_loss(
          t_out.logits, b["teacher_ids"], b["teacher_chunk_ids"], s_out.logits,
          b["student_ids"], b["student_chunk_ids"], jnp.asarray(vmap),
          teacher_loss_mask=b["teacher_loss_mask"], student_loss_mask=b["student_loss_mask"])
    elif method == "alm":  # default ALMConfig: the chunks come merged from the pipeline
      loss = alm_lib.alm_loss(
          alm_lib.Side(t_out.logits, b["teacher_ids"], b["teacher_chunk_ids"],
                       b["teacher_loss_mask"], jnp.asarray(tt.boundary_token_mask())),
          alm_lib.Side(s_out.logits, b["student_ids"], b["student_chunk_ids"],
                       b["student_loss_mask"], jnp.asarray(st.boundary_token_mask())))
    else:
      loss = baselines.uld_loss(t_out.logits, b["teacher_ids"], b["teacher_loss_mask"],
                                s_out.logits, b["student_ids"], b["student_loss_mask"])
    return loss.mean(), loss.count, ntp.mean(), unembed_err

  loss, count, ntp, err = f(state, {k: jnp.asarray(v) for k, v in batch.items()})
  assert float(err) < 1e-4
  return float(loss), float(count), float(ntp)


# Plain SGD: the update is the gradient itself, so comparing parameters compares
# gradients (Adam divides by sqrt(v) and blows rounding noise in near-zero
# gradients up to O(lr) differences).
SGD = optax.sgd(1.0)


@pytest.fixture(scope="module", params=BASELINES)
def trained(request, data):
  """One method: the library losses before training, 3 steps' metrics, parameters."""
  method = request.param
  tt, st, batches = data
  s = _stepper(_cfg(method=method, ntp_weight=0.5), tt, st, SGD)
  params = [jax.tree.map(np.asarray, s.state.trainable)]
  direct = _library_loss(method, s.model(), batches[0], tt, st)
  metrics = []
  for i in range(3):
    metrics.append({k: float(v) for k, v in s.step(batches[i % 2]).items()})
    params.append(jax.tree.map(np.asarray, s.state.trainable))
  return method, direct, metrics, params


def test_baseline_step_is_the_library_loss_plus_weighted_ntp(trained):
  method, (loss, count, ntp), metrics, _ = trained
  first = metrics[0]
  assert first[f"count_{method}"] == count > 0
  np.testing.assert_allclose(first[f"loss_{method}"], loss, rtol=1e-5)
  np.testing.assert_allclose(first["loss_ntp"], ntp, rtol=1e-5)
  np.testing.assert_allclose(first["loss"], loss + 0.5 * ntp, rtol=1e-5)


def test_baseline_trains(trained):
  _, _, metrics, params = trained
  losses = [m["loss"] for m in metrics]
  assert np.all(np.isfinite(losses)) and all(np.isfinite(m["grad_norm"]) for m in metrics)
  assert losses[2] < losses[0], losses  # steps 1 and 3 see the same batch
  moved = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params[0]),
                                                    jax.tree.leaves(params[-1]))]
  assert all(moved)  # every trainable array gets a gradient (incl. DSKD's projector)


def test_baseline_gradient_accumulation_equals_one_big_batch(data, trained):
  # One step's gradient (the update under SGD). Later steps are compared by
  # their losses only: ULD's L1 between sorted probabilities has kinks, so
  # rounding-level differences in the parameters can flip individual
  # gradient entries once the sorted probabilities meet.
  method, _, metrics, params = trained
  tt, st, batches = data
  s = _stepper(_cfg(method=method, ntp_weight=0.5, grad_accum=2), tt, st, SGD)
  losses = [float(s.step(batches[0])["loss"])]
  after_one = jax.tree.map(np.asarray, s.state.trainable)
  losses.append(float(s.step(batches[1])["loss"]))
  np.testing.assert_allclose(losses, [m["loss"] for m in metrics[:2]], rtol=1e-5)
  for p0, a, b in zip(*(jax.tree.leaves(p) for p in (params[0], params[1], after_one))):
    np.testing.assert_allclose(b - p0, a - p0, rtol=1e-4, atol=1e-7)


def test_dskd_projector_is_in_the_trainable_filter(data):
  tt, st, _ = data
  cfg = _cfg(method="dskd")
  model = build_transfer_model(tu.teacher_model(), tt, st, cfg)
  _, trainable, _ = nnx.split(model, trainable_filter(model, cfg), ...)
  paths = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(trainable)}
  assert {f"heads/dskd/{m}/{w}" for m in ("query", "s2t", "t2s")
          for w in ("kernel", "bias")} <= paths
  # Other methods have no DSKD projector at all.
  assert "dskd" not in build_transfer_model(tu.teacher_model(), tt, st, _cfg()).heads


def test_mined_map_is_cached_per_pair(data, tmp_path, monkeypatch):
  tt, st, _ = data
  monkeypatch.setenv("ALM_CACHE_DIR", str(tmp_path))
  m = cached_mined_map(tt, st)
  files = list((tmp_path / "mined").glob("*.npz"))
  assert len(files) == 1
  # Bytes map to the identical teacher byte token; specials to their counterparts.
  for sid, b in enumerate(st.token_bytes):
    if b:
      assert tt.token_bytes[m[sid]] == b
  assert m[st.bos_id] == tt.bos_id and m[st.eos_id] == tt.eos_id
  # The second call reads the file: an edited map (same fingerprint) comes back.
  with np.load(files[0]) as z:
    saved = dict(z)
  np.savez(files[0], **dict(saved, map=np.zeros_like(saved["map"])))
  again = cached_mined_map(tt, st)
  assert again[st.bos_id] == tt.bos_id and int(np.sum(again != 0)) <= 2


# ---------------------------------------------------------------------------
# Checkpoint / resume with the DSKD projector in the state.


def _trainer(corpus, out, cfg, **opts):
  return tu.tiny_trainer(corpus, out, cfg, **opts)


def _projector(trainer):
  flat = nnx.to_flat_state(trainer.stepper.state.trainable)
  return {"/".join(map(str, p)): np.asarray(v.get_value()) for p, v in flat
          if tuple(p[:2]) == ("heads", "dskd")}


def test_dskd_resume_restores_the_projector(corpus, tmp_path):
  # A 2-step run saving after each step; then, as if it had died before its
  # last save, a new run resumes from step 1 and must end where the first did.
  cfg = _cfg(method="dskd", steps=2, batch_size=2)
  full = _trainer(corpus, tmp_path / "run", cfg, checkpoint_every=1)
  full.fit()
  final = jax.tree.map(np.asarray, full.stepper.state.trainable)
  ckdir = tmp_path / "run" / "checkpoints"
  assert sorted(p.name for p in ckdir.iterdir() if p.name != ".lock") == [  # .lock: run lock
      "step_00000001", "step_00000002"]
  shutil.rmtree(ckdir / "step_00000002")
  resumed = _trainer(corpus, tmp_path / "run", cfg, checkpoint_every=1)
  init = _projector(resumed)
  assert len(init) == 6  # query / s2t / t2s kernels and biases
  assert all(not np.array_equal(init[k], _projector(full)[k]) for k in init)  # it trained
  resumed.fit()
  assert resumed.stepper.state.step == 2
  for a, b in zip(jax.tree.leaves(final),
                  jax.tree.leaves(jax.tree.map(np.asarray, resumed.stepper.state.trainable))):
    np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------
# The "unbiased" constraint: chunks merged by the pipeline with the bias tables.

GAMMA = 0.01


def _tables(teacher, student):
  return compute_bias_tables(teacher, student, count_tokens(teacher, tu.TEXTS),
                             count_tokens(student, tu.TEXTS))


@pytest.fixture(scope="module")
def bias_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("bias")
  _tables(tu.teacher_tokenizer(), tu.student_tokenizer()).save(d)
  return d


def _job(bias_tables):
  return TransferJob(model="tiny-teacher", target_tokenizer="bytes", bias_tables=str(bias_tables))


def test_unbiased_trains_on_the_merged_chunks_of_the_pipeline(corpus, bias_dir):
  tt, st = tu.teacher_tokenizer(), tu.student_tokenizer()
  tables = load_bias_tables(_job(bias_dir), tt, st)
  cfg = _cfg(constraint="unbiased", gamma=GAMMA)
  assert step_lib.Objective(cfg).data_constraint == "unbiased"
  assert ALMTerm.from_config(cfg.objective).cfg.constraint == "unconstrained"
  pcfg = dict(batch_size=4, teacher_len=T_LEN, student_len=S_LEN, seed=0)
  fine = next(Pipeline(str(corpus), tt, st, PipelineConfig(**pcfg)))
  batch = next(Pipeline(str(corpus), tt, st, PipelineConfig(**pcfg, align_constraint="unbiased"),
                        align_fn=bias_tables_align_fn(tables, GAMMA)))
  np.testing.assert_array_equal(batch["teacher_ids"], fine["teacher_ids"])  # same rows
  n_chunks = lambda b: int(sum(len(np.unique(r[r >= 0])) for r in b["teacher_chunk_ids"]))
  assert 0 < n_chunks(batch) < n_chunks(fine)  # biased boundaries were merged away
  s = _stepper(cfg, tt, st)
  want, count, _ = _library_loss("alm", s.model(), batch, tt, st)
  losses = []
  for _ in range(3):
    out = s.step(batch)
    losses.append(float(out["loss"]))
    if len(losses) == 1:
      assert float(out["count_alm"]) == count
      np.testing.assert_allclose(losses[0], want, rtol=1e-5)
  assert np.all(np.isfinite(losses)) and losses[-1] < losses[0], losses


def test_trainer_refuses_unbiased_without_the_pipelines_merged_chunks(corpus):
  cfg = _cfg(constraint="unbiased", gamma=GAMMA, batch_size=2)
  with pytest.raises(ValueError, match=r"align_constraint='unbiased'.*bias_tables_align_fn"):
    _trainer(corpus, "/nonexistent/never-created", cfg)


def test_missing_or_foreign_bias_tables_fail_naming_the_command(bias_dir, tmp_path):
  tt, st = tu.teacher_tokenizer(), tu.student_tokenizer()
  cmd = ("python -m experiments.compute_bias_tables --teacher=tiny-teacher --student=bytes "
         "--out=")
  opts = RunOptions(out_dir=str(tmp_path / "out"))
  for d in ("", tmp_path / "empty"):
    with pytest.raises(BiasTablesError, match=cmd):
      run_transfer(_job(d), TrainConfig.build(constraint="unbiased"), opts)
  assert not (tmp_path / "out").exists()
  # Tables of another pair: other vocabulary sizes, or the same sizes but other tokens.
  with pytest.raises(BiasTablesError, match=r"(?s)not of this pair.*vocabularies have.*" + cmd):
    load_bias_tables(_job(bias_dir), st, tt)
  other = GreedyTokenizer(["xq", "qz", "zzq", "qq", "wq", "xw", "wz", "zx", "yq", "qy", "yz",
                           "zy", "yw", "wy", "yx", "xy"])
  assert other.vocab_size == tt.vocab_size
  _tables(other, st).save(tmp_path / "other")
  with pytest.raises(BiasTablesError, match=r"(?s)not suffix pairs.*" + cmd):
    load_bias_tables(_job(tmp_path / "other"), tt, st)
  assert len(load_bias_tables(_job(bias_dir), tt, st).keys) > 0


def test_binary_reports_missing_bias_tables_without_a_traceback(tmp_path):
  r = subprocess.run(
      [sys.executable, "-m", "experiments.transfer_tokenizer", "--constraint=unbiased",
       f"--bias_tables={tmp_path / 'none'}", f"--out_dir={tmp_path / 'out'}"],
      cwd=ROOT, capture_output=True, text=True, timeout=300,
      env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert r.returncode == 2, r.stderr[-2000:]
  assert "python -m experiments.compute_bias_tables --teacher=smollm2-135m-instruct " \
      f"--student=qwen3 --out={tmp_path / 'none'}" in r.stderr
  assert "Traceback" not in r.stderr and not (tmp_path / "out").exists()
