"""Distillation runs end to end: load, build, train, evaluate, export.

`run_transfer(job, cfg, opts)` is what `experiments/transfer_tokenizer.py` and
`experiments/distill.py` call after parsing their flags. Without
`job.student_model` it is tokenizer transfer (the teacher's body with new
embeddings for `job.target_tokenizer`, `alm.training.students.SharedBody`);
with it, large-to-small distillation into that separate model and its own
tokenizer (`Separate`). A library user calls it directly:

    summary = run_transfer(
        TransferJob(model="smollm2-135m-instruct", target_tokenizer="qwen3"),
        TrainConfig.build(preset="demo", method="alm", steps=100),
        RunOptions(out_dir="runs/demo"))

Every input is checked before the slow work starts (the target tokenizer is
loaded and checked to be lossless, the data files are indexed and validated,
the objective must be buildable), so bad input fails in seconds with a message
naming the problem.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from alm.training.config import TrainConfig
from alm.training.metrics import heldout_suffixes
from alm.training.trainer import RunOptions, Trainer, take_batches


# Label of the teacher-sampled held-out set (`TransferJob.teacher_samples`).
TEACHER_LABEL = "teacher"


@dataclasses.dataclass(frozen=True)
class TransferJob:
  """What to transfer, on which data.

  Attributes:
    model: asset name, .gguf file or HF directory of the teacher.
    target_tokenizer: the new tokenizer (asset name or path; see
      `alm.load_tokenizer`); ignored when `student_model` is given.
    student_model: a separate student model (asset name, .gguf file or HF
      directory) distilled from `model` with its own tokenizer; "" for
      tokenizer transfer of `model` itself.
    data: training documents (`alm.data.sources.open_source` spec; "default"
      is the offline default corpus's training split).
    heldout_data: held-out documents for bits per byte ("default:heldout").
    extra_heldout: more held-out sets, `{label: spec}` (e.g. another domain
      than the training data); reported as `<key>@<label>`.
    eval_batches: held-out batches (fixed, the first ones in file order).
    eval_batch_size: rows per held-out batch.
    pack: pack several documents per row (else one document per row).
    num_workers: grain worker processes for tokenisation and alignment.
    export_dir: where to write the trained student as an HF directory
      ("" : no export).
    export_subword: a byte student's frozen subword table in the export:
      "copy" or "reference" (`alm.bytes.model.save_byte_student`).
    bias_tables: directory of tokenization-bias tables of this tokenizer pair
      (written by `python -m experiments.compute_bias_tables`); required by
      constraint "unbiased".
    teacher_samples: also evaluate on this many texts sampled from the
      teacher (label "teacher"; see `alm.eval.teacher_samples`: the gap there
      is the student's divergence from the teacher, not domain fit); 0: off.
      Sampled once, then read from the cache.
    teacher_sample_tokens: tokens sampled per teacher text.
    text_field: the JSONL key / parquet column of the text, in the training
      and every held-out set.
    bad_documents: a document a tokenizer cannot spell exactly: "skip" it
      (counted in the metrics and the summary, the first reasons logged; a
      long run finishes) or "error" (raise naming it; data small enough to
      scan, see `alm.data.pipeline.check_documents`, is checked before the
      model loads).
    text_normalization: "auto" (NFC when either tokenizer NFC-normalizes),
      "nfc" or "none"; see `alm.data.pipeline.PipelineConfig`.
    init_hypernet: a hypernetwork (zoo name or directory, `alm.hypernet.load`)
      that predicts the student's initial embeddings instead of FVT (tokenizer
      transfer only; "" : FVT).
    teacher_cache: a teacher cache directory (`build_teacher_cache`,
      `python -m experiments.cache_teacher`): training reads its rows and the
      teacher's outputs instead of running the data pipeline and the teacher
      in the step ("" : the live teacher).
  """

  model: str = "smollm2-135m-instruct"
  target_tokenizer: str = "qwen3"
  student_model: str = ""
  data: str = "default"
  heldout_data: str = "default:heldout"
  extra_heldout: tuple[tuple[str, str], ...] = ()
  eval_batches: int = 4
  eval_batch_size: int = 4
  pack: bool = False
  num_workers: int = 0
  export_dir: str = ""
  export_subword: str = "copy"
  bias_tables: str = ""
  teacher_samples: int = 0
  teacher_sample_tokens: int = 128
  text_field: str = "text"
  bad_documents: str = "skip"
  text_normalization: str = "auto"
  teacher_cache: str = ""
  init_hypernet: str = ""

  def __post_init__(self):
    # pylint: disable=import-outside-toplevel
    from alm._validation import check_choice
    from alm.data import pipeline
    check_choice("bad_documents", self.bad_documents, pipeline.BAD_DOCUMENTS)
    check_choice("export_subword", self.export_subword, ("copy", "reference"))
    check_choice("text_normalization", self.text_normalization, pipeline.TEXT_NORMALIZATIONS)
    if not self.text_field:
      raise ValueError("text_field must be a non-empty field name.")
    for name, low in (("eval_batches", 1), ("eval_batch_size", 1), ("num_workers", 0)):
      if getattr(self, name) < low:
        raise ValueError(f"TransferJob.{name} must be >= {low}, got {getattr(self, name)}.")
    if self.teacher_samples < 0 or self.teacher_sample_tokens < 8:
      raise ValueError(f"teacher_samples must be >= 0 and teacher_sample_tokens >= 8, got "
                       f"{self.teacher_samples} and {self.teacher_sample_tokens}.")
    if self.init_hypernet and (self.student_model or self.target_tokenizer == "bytes"):
      raise ValueError("init_hypernet initialises a tokenizer-transfer student's embeddings; "
                       "it does not apply to a separate student or a byte student.")
    if self.teacher_samples and TEACHER_LABEL in dict(self.extra_heldout):
      raise ValueError(f"The held-out label {TEACHER_LABEL!r} is taken by teacher_samples; "
                       "rename that extra held-out set.")


class BiasTablesError(ValueError):
  """The bias tables are missing or belong to another tokenizer pair; says how to build them."""


def _build_command(job: TransferJob, directory: str) -> str:
  return (f"python -m experiments.compute_bias_tables --teacher={job.model} "
          f"--student={_student_spec(job)} --out={directory or 'DIR'}")


def _student_spec(job: TransferJob) -> str:
  """What names the student's tokenizer: the separate student model, or the target tokenizer."""
  return job.student_model or job.target_tokenizer


def check_bias_tables_dir(job: TransferJob) -> Path:
  """Checks (cheaply, before anything is loaded) that `job.bias_tables` holds tables.

  Raises:
    BiasTablesError: no directory given, or it lacks tables.npz / meta.json;
      the message names the command that builds them.
  """
  d = job.bias_tables
  if not d:
    raise BiasTablesError(
        "constraint='unbiased' needs the tokenization-bias tables of the tokenizer pair: pass "
        "--bias_tables=DIR (TransferJob.bias_tables), after building them with: "
        + _build_command(job, "DIR"))
  p = Path(d)
  if not ((p / "tables.npz").is_file() and (p / "meta.json").is_file()):
    raise BiasTablesError(
        f"--bias_tables={d}: no bias tables there (tables.npz + meta.json). Build them with: "
        + _build_command(job, d))
  return p


def load_bias_tables(job: TransferJob, teacher_tok, student_tok):
  """Loads `job.bias_tables` and checks that they belong to this tokenizer pair.

  Checks the vocabulary sizes and that every stored (teacher, student) pair
  is a suffix pair under these two vocabularies (the only pairs the tables
  hold), so tables of another pair are refused even when the sizes agree.

  Args:
    job: the job (its `bias_tables`, `model`, `target_tokenizer`).
    teacher_tok: the teacher tokenizer.
    student_tok: the student tokenizer.

  Returns:
    The `alm.tokenization.bias.BiasTables`.

  Raises:
    BiasTablesError: missing, unreadable or of another pair (names the fix).
  """
  from alm.tokenization.bias import BiasTables  # pylint: disable=import-outside-toplevel
  d = check_bias_tables_dir(job)
  try:
    tables = BiasTables.load(d)
  except (OSError, ValueError, KeyError) as e:
    raise BiasTablesError(f"--bias_tables={d}: unreadable bias tables ({e}). Rebuild them "
                          "with: " + _build_command(job, str(d))) from e
  vt, vs = len(tables.teacher_counts), len(tables.student_counts)
  problem = None
  if (vt, vs) != (teacher_tok.vocab_size, student_tok.vocab_size):
    problem = (f"their vocabularies have {vt} (teacher) and {vs} (student) ids, this pair's "
               f"{teacher_tok.vocab_size} and {student_tok.vocab_size}")
  else:
    tb, sb = teacher_tok.token_bytes, student_tok.token_bytes
    keys = np.asarray(tables.keys, np.int64)
    bad = sum(1 for t, s in zip((keys // vs).tolist(), (keys % vs).tolist())
              if not (tb[t] and sb[s] and (tb[t].endswith(sb[s]) or sb[s].endswith(tb[t]))))
    if bad:
      problem = (f"{bad} of their {len(keys)} token pairs are not suffix pairs of this pair's "
                 "vocabularies")
  if problem:
    raise BiasTablesError(
        f"--bias_tables={d} holds tables of {tables.teacher!r} -> {tables.student!r}, not of "
        f"this pair ({getattr(teacher_tok, 'name', job.model)!r} -> "
        f"{getattr(student_tok, 'name', _student_spec(job))!r}): {problem}. Build tables "
        "for this pair with: " + _build_command(job, "NEW_DIR"))
  return tables


def bias_tables_align_fn(tables, gamma: float):
  """The pipeline's `align_fn` for constraint "unbiased": `alm.align` with the tables bound.

  A `functools.partial` (picklable, so grain worker processes can use it).
  """
  from alm.tokenization.alignment import align  # pylint: disable=import-outside-toplevel
  return functools.partial(align, bias_tables=tables, gamma=gamma)


def _tables_digest(tables) -> str:
  h = hashlib.sha256()
  for a in (tables.keys, tables.b1, tables.b2):
    h.update(np.ascontiguousarray(a).tobytes())
  return h.hexdigest()[:16]


def _pipeline_config(cfg: TrainConfig, job: TransferJob, *, eval_: bool = False):
  from alm.data.pipeline import PipelineConfig  # pylint: disable=import-outside-toplevel
  from alm.training.step import Objective  # pylint: disable=import-outside-toplevel
  align = Objective(cfg).data_constraint
  shapes = cfg.shapes
  if eval_:
    return PipelineConfig(batch_size=job.eval_batch_size, teacher_len=shapes.teacher_len,
                          student_len=shapes.student_len, mode="pad", shuffle=False, num_epochs=1,
                          seed=0, align_constraint="unconstrained",
                          bad_documents=job.bad_documents,
                          text_normalization=job.text_normalization)
  import jax  # pylint: disable=import-outside-toplevel
  n_proc = jax.process_count()
  if shapes.batch_size % n_proc:
    raise ValueError(f"batch_size={shapes.batch_size} must be divisible by the number of "
                     f"processes ({n_proc}).")
  # Multi-host: every process reads its own shard and its share of the batch.
  return PipelineConfig(batch_size=shapes.batch_size // n_proc, teacher_len=shapes.teacher_len,
                        student_len=shapes.student_len, mode="pack" if job.pack else "pad",
                        seed=cfg.seed, num_workers=job.num_workers, align_constraint=align,
                        shard_index=jax.process_index(), shard_count=n_proc,
                        bad_documents=job.bad_documents,
                        text_normalization=job.text_normalization)


def _check_documents_early(job: TransferJob, cfg: TrainConfig, student_tok,
                           sources: dict[str, Any]) -> None:
  """Under bad_documents="error": finds a bad document in seconds, before the model loads.

  Only data small enough to scan quickly is checked (`check_documents`); larger
  data raises when the document is reached.
  """
  # pylint: disable=import-outside-toplevel
  from alm.data.pipeline import check_documents
  from alm.tokenization.loading import load_tokenizer
  teacher_tok = load_tokenizer(job.model)  # the model's own tokenizer, without its weights
  pcfg = _pipeline_config(cfg, job, eval_=True)
  for what, src in sources.items():
    t0 = time.time()
    n = check_documents(src, teacher_tok, student_tok, pcfg)
    if n is None:
      logging.info("%s: too large to check before training; a document that cannot be "
                   "tokenized stops the run when it is reached.", what)
    else:
      logging.info("%s: all %d documents tokenize (%.1fs).", what, n, time.time() - t0)


def check_byte_row_length(src, teacher_tok, cfg: TrainConfig, text_field: str = "text",
                          docs: int = 64) -> float | None:
  """Measures bytes per teacher token on the first documents; checks the byte row length.

  A byte student's row must hold about as much text as the teacher's: student_len
  ~= bytes per teacher token x teacher_len (the paper: 2048 bytes for 512
  tokens). Rows are cut where both sides fit, so a short byte row leaves the
  teacher's rows mostly padding and a long one pads the student's.

  Returns:
    The measured bytes per teacher token (None when no document has text).

  Raises:
    TrainConfigError: the byte rows hold less than half the text of the
      teacher's rows (names the student_len to use).
  """
  from alm.training.config import TrainConfigError  # pylint: disable=import-outside-toplevel
  n_bytes = n_tokens = 0
  for i in range(min(docs, len(src))):
    text = src[i].get(text_field)
    if isinstance(text, str) and text:
      n_bytes += len(text.encode("utf-8"))
      n_tokens += len(teacher_tok.encode(text, add_special_tokens=False))
  if not n_tokens:
    return None
  ratio = n_bytes / n_tokens
  want = int(round(ratio * cfg.shapes.teacher_len))
  have = cfg.shapes.student_len
  msg = (f"student_len={have} bytes against teacher_len={cfg.shapes.teacher_len} tokens: the "
         f"data has {ratio:.2f} bytes per teacher token (first {min(docs, len(src))} "
         f"documents), so rows of equal text need student_len ~= {want}")
  if have < want / 2:
    raise TrainConfigError(msg + f"; the teacher's rows would be less than half full. Pass "
                           f"--student_len={want} (or a smaller --teacher_len).")
  if not 0.8 * want <= have <= 1.25 * want:
    logging.warning("%s; the %s rows will be partly padding.", msg,
                    "teacher's" if have < want else "student's")
  else:
    logging.info("Byte rows: %s (set: %d).", msg, have)
  return ratio


def _hold_output_dirs(job: TransferJob, opts: RunOptions, command: str | None,
                      held: list) -> None:
  """Checks that every output can be written, then takes the run's directory locks.

  Done before the model loads: an unwritable --export_dir used to be found
  only after training, and a second run on a live directory only after
  loading. The locks taken are appended to `held` (the caller releases them).
  """
  from alm.training.rundir import RunLock, check_writable  # pylint: disable=import-outside-toplevel
  ckdir = opts.checkpoint_dir
  if ckdir is None:
    ckdir = str(Path(opts.out_dir) / "checkpoints")
  for flag, d in (("--out_dir", opts.out_dir), ("--checkpoint_dir", ckdir),
                  ("--export_dir", job.export_dir)):
    if d:
      check_writable(d, flag)
  import jax  # pylint: disable=import-outside-toplevel
  if jax.process_index() != 0:
    return  # multi-host: process 0 holds the run's locks (the directories may be shared)
  for what, d in (("out_dir", opts.out_dir), ("checkpoint_dir", ckdir)):
    if d:
      held.append(RunLock(d, what=what, command=command).acquire())


def run_transfer(job: TransferJob, cfg: TrainConfig, opts: RunOptions, *,
                 command: str | None = None) -> dict[str, Any]:
  """Loads the teacher, builds the FVT student, trains it, evaluates and exports.

  Args:
    job: model, target tokenizer, data and export options.
    cfg: the training config.
    opts: output / checkpoint / evaluation options.
    command: the command line, recorded in the report.

  Returns:
    The run's summary (see `Trainer.fit`), plus "export_dir" when exported.

  Raises:
    alm.TokenizerError: the target tokenizer is lossy or malformed.
    alm.data.sources.DataError: a data file is not usable (names file and line).
    BiasTablesError: constraint "unbiased" without usable bias tables of
      this tokenizer pair.
    alm.training.checkpoint.CheckpointMismatchError: `resume` found a
      checkpoint of another run.
    alm.training.rundir.OutputDirError: an output directory is held by
      another live run (`RunDirectoryLockedError`), cannot be written, or the
      disk filled up while saving a checkpoint or the export.
    alm.models.loading.ModelFileError: the model file is truncated or corrupt.
    alm.training.trainer.NonFiniteTrainingError: the loss or gradient stayed
      non-finite for `opts.max_nonfinite_steps` steps.
  """
  held: list = []  # the run's directory locks, released however the run ends
  try:
    return _run_transfer(job, cfg, opts, command, held)
  finally:
    for lock in reversed(held):
      lock.release()


def _run_transfer(job: TransferJob, cfg: TrainConfig, opts: RunOptions, command: str | None,
                  held: list) -> dict[str, Any]:
  # pylint: disable=import-outside-toplevel
  from alm.data.pipeline import Pipeline, resolve_text_normalization
  from alm.data.sources import open_source
  from alm.models.loading import load_model
  from alm.tokenization.loading import load_tokenizer
  from alm.training.step import Objective
  from alm.training.config import TrainConfigError
  from alm.training.students import (DTYPES, build_distill_model, build_transfer_model,
                                     export_student)

  t0 = time.time()
  needs_bias_tables = Objective(cfg).needs_bias_tables
  if needs_bias_tables:
    check_bias_tables_dir(job)  # fail in a second, before the model loads
  elif job.bias_tables:
    logging.warning("Ignoring bias_tables=%s: only constraint='unbiased' with an ALM term "
                    "uses them.", job.bias_tables)
  separate = bool(job.student_model)
  to_bytes = not separate and job.target_tokenizer == "bytes"
  hn = None
  if job.init_hypernet:  # read (and checked) before the model loads
    from alm.hypernet import load as load_hypernet
    hn = load_hypernet(job.init_hypernet)
  # The student's tokenizer (a separate student's own, read without its weights; a byte
  # student's: the bytes + the teacher's specials).
  if to_bytes:
    from alm.bytes.model import byte_tokenizer_for
    student_tok = byte_tokenizer_for(load_tokenizer(job.model))
  else:
    student_tok = load_tokenizer(_student_spec(job))
  if not separate and cfg.shapes.teacher_param_dtype != "float32":
    raise TrainConfigError("teacher_param_dtype applies to a separate teacher (large-to-small "
                           "distillation); in tokenizer transfer the student shares the "
                           "teacher's body, which stays float32.")
  train_src = open_source(job.data, text_field=job.text_field)
  heldout_src = open_source(job.heldout_data, text_field=job.text_field)
  extra_srcs = {label: open_source(spec, text_field=job.text_field)
                for label, spec in job.extra_heldout}
  if job.bad_documents == "error":
    _check_documents_early(job, cfg, student_tok,
                           {"--data": train_src, "--heldout_data": heldout_src,
                            **{f"--extra_heldout={k}": v for k, v in extra_srcs.items()}})
  bytes_per_token = None
  if to_bytes:  # before the model loads: a row shape that wastes the teacher fails fast
    bytes_per_token = check_byte_row_length(train_src, load_tokenizer(job.model), cfg,
                                            job.text_field)
  _hold_output_dirs(job, opts, command, held)
  dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[cfg.shapes.dtype]
  t_param_dtype = DTYPES[cfg.shapes.teacher_param_dtype] if separate else jnp.float32
  if separate and job.teacher_cache:
    # Every teacher output comes from the cache: the teacher's weights are never loaded.
    from alm.models.loading import load_config
    from alm.training.students import AbsentTransformer
    teacher = AbsentTransformer(load_config(job.model), t_param_dtype)
    teacher_tok = load_tokenizer(job.model)
    logging.info("The teacher %s stays out of memory: its outputs come from the teacher "
                 "cache (%.1fs)", job.model, time.time() - t0)
  else:
    teacher, teacher_tok = load_model(job.model, dtype=dtype, param_dtype=t_param_dtype)
    logging.info("Loaded %s (%.1fs)", job.model, time.time() - t0)
  student = None
  if separate:
    student, student_tok = load_model(job.student_model, dtype=dtype)
    logging.info("Loaded the student %s (%.1fs)", job.student_model, time.time() - t0)
  extra_specs = dict(job.extra_heldout)
  if job.teacher_samples and not job.teacher_cache:
    # Sampled before the student exists: the untouched teacher, its own distribution.
    from alm.eval.teacher_samples import teacher_samples_file
    path = teacher_samples_file(job.model, teacher, teacher_tok, num=job.teacher_samples,
                                max_new_tokens=job.teacher_sample_tokens, seed=0)
    extra_specs[TEACHER_LABEL] = str(path)
    extra_srcs[TEACHER_LABEL] = open_source(str(path))
    logging.info("Teacher-sampled held-out set: %s", path)
  fingerprint, align_fn = _data_fingerprint(job, cfg, teacher_tok, student_tok)
  cache = cached_sets = None
  if job.teacher_cache:
    from alm.data.teacher_cache import TeacherCache, TeacherCacheError
    from alm.training.step import cache_hidden_layers, check_cacheable
    check_cacheable(cfg)
    build = cache_build_command(job, cfg, job.teacher_cache)
    identity = _cache_identity(job, cfg, teacher_tok, student_tok)
    cache = TeacherCache(job.teacher_cache,
                         teacher_cache_fingerprint(job, cfg, teacher.cfg, identity,
                                                   fingerprint),
                         build_command=build, process_index=jax.process_index())
    # The held-out sets too: their teacher side is read, never run.
    cached_sets = cached_heldout(job, cfg, identity, build)
    need = cache_hidden_layers(cfg, teacher.cfg)
    if not set(need) <= set(cache.hidden_layers):
      raise TeacherCacheError(
          f"This run's hidden-state term reads teacher layers {list(need)}; the teacher cache "
          f"at {job.teacher_cache} holds hidden states of {list(cache.hidden_layers)}. Build a "
          f"cache with them: {build}")
    fingerprint["teacher_cache"] = cache.manifest["digest"]
    logging.info("Teacher cache: %s (%d rows)", job.teacher_cache, len(cache))
  if separate:
    fingerprint["student_model"] = job.student_model
    model = build_distill_model(teacher, teacher_tok, student, student_tok, cfg)
  elif to_bytes:
    from alm.bytes.student import ByteStudent
    from alm.training.students import build_model
    model = build_model(ByteStudent(subword_storage=job.export_subword), teacher, teacher_tok,
                        student_tok, cfg)
    logging.info("Built the byte student (n-gram embeddings: %s; body: %s) (%.1fs)",
                 cfg.adapters.ngram_embeddings, "copied" if cfg.adapters.train_body else
                 "shared + LoRA", time.time() - t0)
  elif job.init_hypernet:
    from alm.hypernet import transfer as hypernet_transfer
    model = build_transfer_model(
        teacher, teacher_tok, student_tok, cfg,
        init=lambda t, tt, st: hypernet_transfer(t, tt, st, hn))
    fingerprint["init_hypernet"] = job.init_hypernet
    logging.info("Built the student for %s with embeddings predicted by the hypernetwork "
                 "%s (%.1fs)", job.target_tokenizer, job.init_hypernet, time.time() - t0)
  else:
    model = build_transfer_model(teacher, teacher_tok, student_tok, cfg)
    logging.info("Built the FVT student for %s (%.1fs)", job.target_tokenizer,
                 time.time() - t0)
  if cache is not None:  # rows and the teacher's outputs from the cache, in the pipeline's order
    train = cache.batches(_pipeline_config(cfg, job).batch_size, steps=cfg.optimizer.steps)
  else:
    train = Pipeline(train_src, teacher_tok, student_tok, _pipeline_config(cfg, job),
                     align_fn=align_fn)
  skipped_heldout = {}

  def heldout_batches(src, n, suffix):
    # Held-out batches are the first ones in file order, so the skipped ones are fixed too.
    pipe = Pipeline(src, teacher_tok, student_tok, _pipeline_config(cfg, job, eval_=True))
    batches = take_batches(pipe, n)
    skipped_heldout[f"skipped_heldout_documents{suffix}"] = pipe.num_skipped
    return batches

  if cached_sets is not None:
    for label, (_, stats) in cached_sets.items():
      skipped_heldout[f"skipped_heldout_documents{'@' + label if label else ''}"] = int(
          stats.get("skipped_documents", 0))
      if label:
        extra_specs[label] = stats.get("spec", extra_specs.get(label))
    heldout = cached_sets[""][0]
    extra_eval = {label: b for label, (b, _) in cached_sets.items() if label}
  else:
    n_batches = {label: n for label, (_, n) in heldout_sets(job).items()}
    heldout = heldout_batches(heldout_src, n_batches[""], "")
    extra_eval = {label: heldout_batches(src, n_batches[label], f"@{label}")
                  for label, src in extra_srcs.items()}
  extra = {"model": job.model, **({"student_model": job.student_model} if separate else
                                   {"target_tokenizer": job.target_tokenizer}),
           "data": job.data,
           "heldout": job.heldout_data, "heldout_rows": len(heldout) * job.eval_batch_size,
           # The main set's count always; another set's only when it skipped any.
           **{k: v for k, v in skipped_heldout.items() if v or "@" not in k}}
  for label, spec in extra_specs.items():
    extra[f"heldout@{label}"] = spec
  if bytes_per_token:
    extra["bytes_per_teacher_token"] = round(bytes_per_token, 3)
  if command:
    extra["command"] = command
  trainer = Trainer(model, teacher_tok, student_tok, cfg, train, heldout, opts,
                    extra_eval=extra_eval, fingerprint_extra=fingerprint, summary_extra=extra,
                    title="Distillation" if separate else "Tokenizer transfer")
  try:
    summary = trainer.fit()
  finally:
    train.close()
  if job.export_dir and "stopped_at" not in summary:
    from alm.training.rundir import atomic_directory  # pylint: disable=import-outside-toplevel
    # Written aside and renamed into place: a half-written export never looks valid.
    with atomic_directory(job.export_dir, "--export_dir") as tmp:
      export_student(trainer.model(), tmp, student_tok)
    d = Path(job.export_dir)
    summary["export_dir"] = str(d)
    logging.info("Exported the student to %s", d)
  summary["total_wall_s"] = time.time() - t0
  return summary


def _data_fingerprint(job: TransferJob, cfg: TrainConfig, teacher_tok, student_tok):
  """(what a resumed run's data must match, the alignment function) of a job."""
  from alm.data.pipeline import resolve_text_normalization  # pylint: disable=import-outside-toplevel
  from alm.training.step import Objective  # pylint: disable=import-outside-toplevel
  # The normalization changes the text of some documents, so a resume must use the same.
  fingerprint = {"model": job.model, "target_tokenizer": _student_spec(job),
                 "data": job.data, "pack": job.pack,
                 "text_normalization": resolve_text_normalization(job.text_normalization,
                                                                  teacher_tok, student_tok)}
  if job.text_field != "text":
    fingerprint["text_field"] = job.text_field
  align_fn = None
  if Objective(cfg).needs_bias_tables:
    tables = load_bias_tables(job, teacher_tok, student_tok)
    align_fn = bias_tables_align_fn(tables, cfg.objective.gamma)
    fingerprint["bias_tables"] = _tables_digest(tables)
    logging.info("Bias tables: %d pairs from %s", len(tables.keys), job.bias_tables)
  return fingerprint, align_fn


def _files_digest(spec: str, text_field: str) -> Any:
  """Names, sizes and the first MiB's sha256 of a data spec's files (the spec if none)."""
  from alm.data.sources import open_source  # pylint: disable=import-outside-toplevel
  src = open_source(spec, text_field=text_field)
  paths = getattr(src, "paths", None)
  if not paths:
    return {"spec": spec, "documents": len(src)}
  out = []
  for p in paths:
    p = Path(p)
    with open(p, "rb") as f:
      head = hashlib.sha256(f.read(1 << 20)).hexdigest()[:16]
    out.append([p.name, p.stat().st_size, head])
  return {"spec": spec, "documents": len(src), "files": out}


def _cache_identity(job: TransferJob, cfg: TrainConfig, teacher_tok, student_tok
                    ) -> dict[str, Any]:
  """What every part of a teacher cache depends on: the teacher (name and a hash of
  its files: `alm.models.loading.model_files_digest`, read without loading it),
  both vocabularies, the compute dtype and the teacher's parameter dtype."""
  # pylint: disable=import-outside-toplevel
  from alm.data.teacher_cache import FORMAT_VERSION
  from alm.models.loading import model_files_digest
  from alm.training.students import hash_vocab

  def vocab(tok):
    h = hashlib.sha256()
    hash_vocab(h, tok)
    return h.hexdigest()[:20]

  return {"version": FORMAT_VERSION, "teacher": job.model,
          "teacher_files": model_files_digest(job.model), "teacher_vocab": vocab(teacher_tok),
          "student": _student_spec(job), "student_vocab": vocab(student_tok),
          "dtype": cfg.shapes.dtype, "teacher_param_dtype": cfg.shapes.teacher_param_dtype}


def teacher_cache_fingerprint(job: TransferJob, cfg: TrainConfig, teacher_cfg, identity,
                              data_fingerprint: dict[str, Any],
                              hidden_dtype: str = "bfloat16") -> dict[str, Any]:
  """Everything the training rows of a teacher cache depend on (SPEC §15).

  `identity` (`_cache_identity`: the teacher, both vocabularies, dtypes), the
  data (spec, files), the pipeline's options (lengths, batch size, seed,
  packing, chunk constraint, normalization, ...), the bias tables and the
  vocabulary pass's block size; and ("hidden") the teacher layers whose
  hidden states the run's terms read, with their storage dtype.
  """
  from alm.training.step import cache_hidden_layers  # pylint: disable=import-outside-toplevel
  from alm.losses.chunks import DEFAULT_BLOCK_ROWS  # pylint: disable=import-outside-toplevel
  pc = dataclasses.asdict(_pipeline_config(cfg, job))
  pc.pop("num_workers", None)  # the rows do not depend on it
  return {**identity, "data": data_fingerprint,
          "data_files": _files_digest(job.data, job.text_field), "pipeline": pc,
          "block_rows": DEFAULT_BLOCK_ROWS,
          "hidden": {"layers": list(cache_hidden_layers(cfg, teacher_cfg)),
                     "dtype": hidden_dtype}}


def heldout_sets(job: TransferJob) -> dict[str, tuple[str | None, int]]:
  """{label: (data spec, batches)} of a job's held-out sets: "" is the main one; the
  teacher's samples (`teacher_samples`) have spec None (sampled from the teacher)."""
  sets: dict[str, tuple[str | None, int]] = {"": (job.heldout_data, job.eval_batches)}
  for label, spec in job.extra_heldout:
    sets[label] = (spec, job.eval_batches)
  if job.teacher_samples:  # scored whole
    sets[TEACHER_LABEL] = (None, -(-job.teacher_samples // job.eval_batch_size))
  return sets


def heldout_cache_fingerprint(job: TransferJob, cfg: TrainConfig, label: str,
                              identity: dict[str, Any]) -> dict[str, Any]:
  """What a teacher cache's held-out set `label` depends on: `identity`, the set's
  data (its files, or the teacher-sampling settings), batches and the evaluation
  pipeline's options."""
  spec, n = heldout_sets(job)[label]
  data = ({"teacher_samples": job.teacher_samples, "tokens": job.teacher_sample_tokens,
           "seed": 0} if spec is None else
          {"spec": spec, "files": _files_digest(spec, job.text_field)})
  return {**identity, "set": label, "data": data, "batches": n,
          "pipeline": dataclasses.asdict(_pipeline_config(cfg, job, eval_=True))}


def cached_heldout(job: TransferJob, cfg: TrainConfig, identity: dict[str, Any],
                   build_command: str) -> dict[str, tuple[list, dict[str, Any]]]:
  """{label: (batches, the set's build stats)} of every held-out set of a job, read
  from its teacher cache (rows with the teacher's bits: no teacher run).

  Raises:
    TeacherCacheError: a set missing from the cache, another run's, or damaged
      (the message holds the command that builds it).
  """
  # pylint: disable=import-outside-toplevel
  from alm.data.teacher_cache import TeacherCache, TeacherCacheError, heldout_dir
  out = {}
  for label in heldout_sets(job):
    d = heldout_dir(job.teacher_cache, label)
    what = f"held-out set {label!r}" if label else "main held-out set"
    if not d.exists():
      raise TeacherCacheError(f"The teacher cache at {job.teacher_cache} has no {what} of this "
                              f"run. Add it (the cached training rows are kept): {build_command}")
    c = TeacherCache(d, heldout_cache_fingerprint(job, cfg, label, identity),
                     build_command=build_command, process_index=jax.process_index())
    out[label] = (c.all_batches(job.eval_batch_size), c.stats)
  return out


def cache_build_command(job: TransferJob, cfg: TrainConfig, directory: str) -> str:
  """The `experiments.cache_teacher` command that builds the cache this job reads."""
  import shlex  # pylint: disable=import-outside-toplevel
  a = [f"--model={job.model}"]
  a.append(f"--student_model={job.student_model}" if job.student_model
           else f"--target_tokenizer={job.target_tokenizer}")
  a += [f"--data={job.data}", f"--teacher_len={cfg.shapes.teacher_len}",
        f"--student_len={cfg.shapes.student_len}", f"--batch_size={cfg.shapes.batch_size}",
        f"--seed={cfg.seed}", f"--steps={cfg.optimizer.steps}",
        f"--constraint={cfg.objective.constraint}", f"--dtype={cfg.shapes.dtype}"]
  # The objective decides which hidden states the cache holds: always spelled out.
  a += [f"--method={cfg.objective.method}", f"--add_terms={cfg.objective.add_terms}",
        f"--hidden_layers={cfg.objective.hidden_layers}"]
  if cfg.shapes.teacher_param_dtype != "float32":
    a.append(f"--teacher_param_dtype={cfg.shapes.teacher_param_dtype}")
  if job.pack:
    a.append("--pack")
  if job.text_field != "text":
    a.append(f"--text_field={job.text_field}")
  if job.text_normalization != "auto":
    a.append(f"--text_normalization={job.text_normalization}")
  if job.bad_documents != "skip":
    a.append(f"--bad_documents={job.bad_documents}")
  if job.bias_tables:
    a.append(f"--bias_tables={job.bias_tables}")
  # The held-out sets (each cached with the teacher's bits).
  d = TransferJob()
  for name in ("heldout_data", "eval_batches", "eval_batch_size", "teacher_samples",
               "teacher_sample_tokens"):
    if getattr(job, name) != getattr(d, name):
      a.append(f"--{name}={getattr(job, name)}")
  a += [f"--extra_heldout={label}={spec}" for label, spec in job.extra_heldout]
  a.append(f"--out_dir={directory}")
  return "python -m experiments.cache_teacher " + " ".join(shlex.quote(x) for x in a)


def build_teacher_cache(job: TransferJob, cfg: TrainConfig, out_dir: str, *,
                        command: str | None = None, rows_per_shard: int | None = None,
                        progress: bool = True, hidden_dtype: str = "bfloat16"
                        ) -> dict[str, Any]:
  """Writes the teacher cache of a job: `cfg.optimizer.steps` batches of aligned rows
  with the teacher's path and boundary log-probs, and every held-out set of the job
  with the teacher's bits per row (`alm.data.teacher_cache`).

  Resumable: an interrupted build continues after its last complete shard
  (the rows before it are re-read from the data pipeline, not recomputed); a
  complete cache gains the held-out sets it lacks.

  Args:
    job: model, target tokenizer (or student model), data and held-out sets,
      as for `run_transfer`.
    cfg: the training config of the run that will read the cache (lengths,
      batch size, seed, steps, chunk constraint, dtype).
    out_dir: the cache directory.
    command: the command line (recorded in the manifest).
    rows_per_shard: rows per shard (default: 64 batches).
    progress: show a progress bar.
    hidden_dtype: storage dtype of the hidden states ("bfloat16" or
      "float32"), when the run's terms read them (the hidden-state term).

  Returns:
    The manifest of the training rows (rows, shards, fingerprint, stats:
    seconds, tokens/s, bytes), with "heldout": {label: rows}.

  Raises:
    TeacherCacheError: `out_dir` holds another run's cache.
  """
  # pylint: disable=import-outside-toplevel
  from flax import nnx
  from alm.data.pipeline import Pipeline
  from alm.data.sources import open_source
  from alm.data.teacher_cache import CacheWriter, heldout_dir, split_rows, log_manifest
  from alm.models.loading import load_model
  from alm.tokenization.loading import load_tokenizer
  from alm.tokenization.vocab import shared_boundary_bytes
  from alm.training.step import (BATCH_KEYS, HELDOUT_BITS_KEY, cache_hidden_layers, path_bits,
                                 teacher_cache_arrays)
  from alm.training.students import DTYPES
  from tqdm.auto import tqdm

  t0 = time.time()
  separate = bool(job.student_model)
  if not separate and job.target_tokenizer == "bytes":
    from alm.bytes.model import byte_tokenizer_for
    student_tok = byte_tokenizer_for(load_tokenizer(job.model))
  else:
    student_tok = load_tokenizer(_student_spec(job))
  dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[cfg.shapes.dtype]
  teacher, teacher_tok = load_model(
      job.model, dtype=dtype,
      param_dtype=DTYPES[cfg.shapes.teacher_param_dtype] if separate else jnp.float32)
  data_fp, align_fn = _data_fingerprint(job, cfg, teacher_tok, student_tok)
  if hidden_dtype not in ("bfloat16", "float32"):
    raise ValueError(f"hidden_dtype must be 'bfloat16' or 'float32', got {hidden_dtype!r}.")
  identity = _cache_identity(job, cfg, teacher_tok, student_tok)
  fp = teacher_cache_fingerprint(job, cfg, teacher.cfg, identity, data_fp, hidden_dtype)
  layers = cache_hidden_layers(cfg, teacher.cfg)
  pcfg = _pipeline_config(cfg, job)
  b, steps = pcfg.batch_size, cfg.optimizer.steps
  command = command or cache_build_command(job, cfg, out_dir)
  proc = jax.process_index()
  writer = CacheWriter(out_dir, fp, rows_per_shard=rows_per_shard or 64 * b, command=command,
                       process_index=proc)
  if writer.complete:
    logging.info("The training rows of the teacher cache at %s are complete already.",
                 out_dir)
  elif writer.rows_done % b:
    raise ValueError(f"{out_dir}: {writer.rows_done} rows done is not a whole number of "
                     f"batches of {b}; delete it and build again.")
  else:
    # The boundary log-probs with the shared boundary bytes of the pair: the mask of
    # every run that reads them (debiasing, "boundary_prob").
    mask = jnp.asarray(teacher_tok.boundary_token_mask(
        shared_boundary_bytes(teacher_tok, student_tok)))
    fn = nnx.jit(teacher_cache_arrays, static_argnames=("hidden_layers", "hidden_dtype"))
    h_dtype = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}[hidden_dtype]
    pipe = Pipeline(open_source(job.data, text_field=job.text_field), teacher_tok, student_tok,
                    pcfg, align_fn=align_fn)
    done = writer.rows_done // b
    tokens = 0
    t1 = time.time()
    bar = tqdm(total=steps, initial=done, desc="teacher cache", unit="batch",
               disable=not progress)
    try:
      for k in range(steps):
        batch = next(pipe)
        if k < done:  # a resumed build: these rows are in the cache already
          continue
        arrays = {key: jnp.asarray(batch[key]) for key in BATCH_KEYS}
        got = fn(teacher, arrays, mask, hidden_layers=layers, hidden_dtype=h_dtype)
        rows = {key: batch[key] for key in BATCH_KEYS}
        rows.update({key: np.asarray(v) for key, v in got.items()})
        writer.add(split_rows(rows))
        tokens += int((batch["teacher_segment_ids"] > 0).sum())
        bar.update(1)
        bar.set_postfix(tok_s=f"{tokens / max(time.time() - t1, 1e-9):.0f}")
    finally:
      bar.close()
      pipe.close()
    secs = time.time() - t1
    writer.finish({"skipped_documents": pipe.num_skipped, "build_s": round(secs, 2),
                   "teacher_tokens": tokens,
                   "tokens_per_s": round(tokens / max(secs, 1e-9), 1),
                   "total_s": round(time.time() - t0, 2)})
  m = dict(writer.manifest)
  log_manifest(m)
  # The held-out sets: the evaluation pipeline's rows with the teacher's bits per row.
  row_bits = nnx.jit(lambda t, batch: jnp.stack(path_bits(t, batch, "teacher", per_row=True),
                                                axis=-1))
  m["heldout"] = {}
  for label, (spec, n) in heldout_sets(job).items():
    d = heldout_dir(out_dir, label)
    hfp = heldout_cache_fingerprint(job, cfg, label, identity)
    hw = CacheWriter(d, hfp, command=command, rows_per_shard=n * job.eval_batch_size,
                     process_index=proc)
    if not hw.complete and hw.rows_done:  # interrupted while finishing: small, so redone
      shutil.rmtree(d)
      hw = CacheWriter(d, hfp, command=command, rows_per_shard=n * job.eval_batch_size,
                       process_index=proc)
    if not hw.complete:
      if spec is None:  # the teacher's own samples (a file the live run samples too)
        from alm.eval.teacher_samples import teacher_samples_file
        spec = str(teacher_samples_file(job.model, teacher, teacher_tok,
                                        num=job.teacher_samples,
                                        max_new_tokens=job.teacher_sample_tokens, seed=0))
      pipe = Pipeline(open_source(spec, text_field=job.text_field), teacher_tok, student_tok,
                      _pipeline_config(cfg, job, eval_=True))
      # A held-out set is one shard, written whole (rows_done is 0 or all of it).
      for batch in take_batches(pipe, n):
        bits = np.asarray(row_bits(teacher, {key: jnp.asarray(batch[key])
                                             for key in BATCH_KEYS}))
        hw.add(split_rows({**{key: batch[key] for key in BATCH_KEYS},
                           HELDOUT_BITS_KEY: bits}))
      hw.finish({"skipped_documents": pipe.num_skipped, "spec": spec})
      pipe.close()
      logging.info("Cached held-out set %r: %d rows", label, hw.rows_done)
    m["heldout"][label] = hw.rows_done
  return m


def format_summary(summary: dict[str, Any]) -> str:
  """A short human-readable result block for the end of a run."""
  keys = ["method", "steps", "seed"]
  for sfx in heldout_suffixes(summary, "gap_closed"):
    keys += [f"{k}{sfx}" for k in ("teacher_bpb", "init_student_bpb", "final_student_bpb",
                                   "gap_closed")]
  keys += ["skipped_documents", "skipped_heldout_documents", "total_wall_s", "export_dir"]
  lines = []
  for k in keys:
    if k in summary:
      v = summary[k]
      lines.append(f"  {k:28s} {v:.4f}" if isinstance(v, float) else f"  {k:28s} {v}")
  return "\n".join(lines)


def report_path(opts: RunOptions) -> Path:
  """Where the run's markdown report is written."""
  return Path(opts.out_dir) / "report.md"
