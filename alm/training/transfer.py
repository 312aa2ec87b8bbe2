"""Tokenizer transfer end to end: load, build, train, evaluate, export.

`run_transfer(job, cfg, opts)` is what `experiments/transfer_tokenizer.py`
calls after parsing its flags; a library user calls it directly:

    summary = run_transfer(
        TransferJob(model="smollm2-135m-instruct", target_tokenizer="qwen3"),
        TrainConfig(method="alm", steps=100), RunOptions(out_dir="runs/demo"))

Every input is checked before the slow work starts (the target tokenizer is
loaded and checked to be lossless, the data files are indexed and validated,
the method's loss must exist), so bad input fails in seconds with a message
naming the problem.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import jax.numpy as jnp

from alm.training.config import TrainConfig
from alm.training.trainer import RunOptions, Trainer, take_batches


@dataclasses.dataclass(frozen=True)
class TransferJob:
  """What to transfer, on which data.

  Attributes:
    model: asset name, .gguf file or HF directory of the teacher.
    target_tokenizer: the new tokenizer (asset name or path; see
      `alm.load_tokenizer`).
    data: training documents (`alm.data.sources.open_source` spec; "default"
      is the offline default corpus's training split).
    heldout_data: held-out documents for bits per byte ("default:heldout").
    eval_batches: held-out batches (fixed, the first ones in file order).
    eval_batch_size: rows per held-out batch.
    pack: pack several documents per row (else one document per row).
    num_workers: grain worker processes for tokenisation and alignment.
    export_dir: where to write the trained student as an HF directory
      ("" : no export).
  """

  model: str = "smollm2-135m-instruct"
  target_tokenizer: str = "qwen3"
  data: str = "default"
  heldout_data: str = "default:heldout"
  eval_batches: int = 4
  eval_batch_size: int = 4
  pack: bool = False
  num_workers: int = 0
  export_dir: str = ""


def _pipeline_config(cfg: TrainConfig, job: TransferJob, *, eval_: bool = False):
  from alm.data.pipeline import PipelineConfig  # pylint: disable=import-outside-toplevel
  align = cfg.constraint if cfg.constraint in ("unconstrained", "space") else "unconstrained"
  if eval_:
    return PipelineConfig(batch_size=job.eval_batch_size, teacher_len=cfg.teacher_len,
                          student_len=cfg.student_len, mode="pad", shuffle=False, num_epochs=1,
                          seed=0, align_constraint="unconstrained")
  import jax  # pylint: disable=import-outside-toplevel
  n_proc = jax.process_count()
  if cfg.batch_size % n_proc:
    raise ValueError(f"batch_size={cfg.batch_size} must be divisible by the number of "
                     f"processes ({n_proc}).")
  # Multi-host: every process reads its own shard and its share of the batch.
  return PipelineConfig(batch_size=cfg.batch_size // n_proc, teacher_len=cfg.teacher_len,
                        student_len=cfg.student_len, mode="pack" if job.pack else "pad",
                        seed=cfg.seed, num_workers=job.num_workers, align_constraint=align,
                        shard_index=jax.process_index(), shard_count=n_proc)


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
    alm.training.step.MethodNotAvailableError: the method's loss is missing.
    alm.training.checkpoint.CheckpointMismatchError: `resume` found a
      checkpoint of another run.
  """
  # pylint: disable=import-outside-toplevel
  from alm.data.pipeline import Pipeline
  from alm.data.sources import open_source
  from alm.models.loading import load_model
  from alm.tokenization.loading import load_tokenizer
  from alm.training.model import build_transfer_model, export_student
  from alm.training.step import check_method_available

  t0 = time.time()
  check_method_available(cfg)
  student_tok = load_tokenizer(job.target_tokenizer)
  train_src = open_source(job.data)
  heldout_src = open_source(job.heldout_data)
  dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[cfg.dtype]
  teacher, teacher_tok = load_model(job.model, dtype=dtype)
  logging.info("Loaded %s (%.1fs)", job.model, time.time() - t0)
  model = build_transfer_model(teacher, teacher_tok, student_tok, cfg)
  logging.info("Built the FVT student for %s (%.1fs)", job.target_tokenizer, time.time() - t0)
  train = Pipeline(train_src, teacher_tok, student_tok, _pipeline_config(cfg, job))
  heldout = take_batches(Pipeline(heldout_src, teacher_tok, student_tok,
                                  _pipeline_config(cfg, job, eval_=True)), job.eval_batches)
  fingerprint = {"model": job.model, "target_tokenizer": job.target_tokenizer,
                 "data": job.data, "pack": job.pack}
  extra = {"model": job.model, "target_tokenizer": job.target_tokenizer, "data": job.data,
           "heldout_rows": len(heldout) * job.eval_batch_size}
  if command:
    extra["command"] = command
  trainer = Trainer(model, teacher_tok, student_tok, cfg, train, heldout, opts,
                    fingerprint_extra=fingerprint, summary_extra=extra)
  try:
    summary = trainer.fit()
  finally:
    train.close()
  if job.export_dir and "stopped_at" not in summary:
    d = export_student(trainer.model(), job.export_dir, student_tok)
    summary["export_dir"] = str(d)
    logging.info("Exported the student to %s", d)
  summary["total_wall_s"] = time.time() - t0
  return summary


def format_summary(summary: dict[str, Any]) -> str:
  """A short human-readable result block for the end of a run."""
  keys = ("method", "steps", "seed", "teacher_bpb", "init_student_bpb", "final_student_bpb",
          "gap_closed", "total_wall_s", "export_dir")
  lines = []
  for k in keys:
    if k in summary:
      v = summary[k]
      lines.append(f"  {k:18s} {v:.4f}" if isinstance(v, float) else f"  {k:18s} {v}")
  return "\n".join(lines)


def report_path(opts: RunOptions) -> Path:
  """Where the run's markdown report is written."""
  return Path(opts.out_dir) / "report.md"
