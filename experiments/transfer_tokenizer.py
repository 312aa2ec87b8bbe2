"""Tokenizer transfer by ALM self-distillation (the paper's first use case).

The defaults run the README's main job: SmolLM2-135M-Instruct moved to the
Qwen3 tokenizer on the offline default corpus, on a CPU, ending with the
held-out bits per byte of the teacher, the FVT-initialised student and the
trained student:

  python -m experiments.transfer_tokenizer

Other methods on the same data and seed, for comparison:

  python -m experiments.transfer_tokenizer --method=sft --out_dir=runs/sft
  python -m experiments.transfer_tokenizer --method=dskd --out_dir=runs/dskd  # or uld, mined

or all at once, into one table and plot (experiments/compare_methods.py):

  python -m experiments.compare_methods --methods=alm,sft --out_dir=runs/compare

The paper's "unbiased" chunks need the tokenization-bias tables of the pair
(built once):

  python -m experiments.compute_bias_tables --teacher=smollm2-135m-instruct \
      --student=qwen3 --out=bias/smollm2-qwen3
  python -m experiments.transfer_tokenizer --constraint=unbiased \
      --bias_tables=bias/smollm2-qwen3 --out_dir=runs/unbiased

Outputs in --out_dir: metrics.jsonl, tensorboard/, report.md + report.png,
summary.json, checkpoints/ (resumed automatically when present; --noresume to
start over), and the exported student (HF-format directory, `alm.load_model`
reads it) in --export_dir. One run at a time per --out_dir / --checkpoint_dir:
a second one is refused at once, naming the first (pid, host, command).

Multi-host: start one process per host with the same flags after
`jax.distributed.initialize()` (set --distributed); the mesh spans all
devices and each process reads its own shard of the data.
"""

from __future__ import annotations

import logging
import math
import shlex
import sys

from absl import app, flags

from alm.training import config as config_lib

FLAGS = flags.FLAGS

# What to transfer.
flags.DEFINE_string("model", "smollm2-135m-instruct",
                    "Teacher model: asset name, .gguf file or HF-format directory.")
flags.DEFINE_string("target_tokenizer", "qwen3",
                    "The new tokenizer: asset name or path (tokenizer.json, .model, HF dir).")
flags.DEFINE_string("data", "default", "Training documents: 'default' (offline corpus), a "
                    "JSONL / text / parquet file, directory or glob, or 'hf:NAME[:SPLIT]'.")
flags.DEFINE_string("heldout_data", "default:heldout", "Held-out documents for bits per byte.")
flags.DEFINE_multi_string("extra_heldout", [], "More held-out sets as LABEL=SPEC (repeatable), "
                          "e.g. text of another domain than --data; reported as "
                          "<key>@LABEL.")
flags.DEFINE_integer("teacher_samples", 32, "Also report bits per byte on this many texts "
                     "sampled from the teacher (held-out label 'teacher'; sampled once, then "
                     "cached): the gap there measures how far the student is from behaving like "
                     "the teacher, not domain fit. 0: off.", lower_bound=0)
flags.DEFINE_integer("teacher_sample_tokens", 128, "Tokens per teacher-sampled text.",
                     lower_bound=8)
flags.DEFINE_integer("eval_batches", 4, "Held-out batches (fixed: the first in file order).")
flags.DEFINE_integer("eval_batch_size", 4, "Rows per held-out batch.")
flags.DEFINE_bool("pack", False, "Pack several documents per row (else one per row, padded).")
flags.DEFINE_integer("num_workers", 0, "Grain worker processes for tokenisation + alignment.")
flags.DEFINE_string("text_field", "text", "JSONL key / parquet column holding the text, in "
                    "--data, --heldout_data and --extra_heldout.")
flags.register_validator("text_field", bool, message="must be a non-empty field name")
flags.DEFINE_enum("bad_documents", "skip", ["skip", "error"], "A document a tokenizer cannot "
                  "spell exactly (a lone surrogate, a byte its vocabulary lacks): 'skip' it "
                  "(counted as skipped_documents in the metrics and the report, the first "
                  "reasons logged), or 'error': stop naming it (checked before the model loads "
                  "when the data is a few MB at most).")
flags.DEFINE_enum("text_normalization", "auto", ["auto", "nfc", "none"], "Normalize each "
                  "text before both tokenizations: 'auto' is NFC when either tokenizer "
                  "NFC-normalizes (Qwen3's does; it cannot spell non-NFC text), else none.")

# Method and loss.
flags.DEFINE_enum("method", "alm", config_lib.METHODS, "Training objective.")
flags.DEFINE_enum("divergence", "kl", config_lib.DIVERGENCES, "ALM binarised f-divergence.")
flags.DEFINE_float("tau", 100.0, "ALM temperature.")
flags.DEFINE_enum("constraint", "boundary_prob", config_lib.CONSTRAINTS,
                  "ALM chunk constraint. Default boundary_prob (merge chunks until the teacher "
                  "predicts a pretoken boundary with probability > gamma): needs no "
                  "precomputation, and closed more of the gap than unconstrained chunks in "
                  "BUILD_NOTES' runs. 'unbiased' (the paper's) needs --bias_tables.")
flags.DEFINE_float("gamma", 0.1, "Threshold of the unbiased / boundary_prob constraints.")
flags.DEFINE_bool("debias", True, "Outcome-chunk debiasing of chunk likelihoods.")
flags.DEFINE_float("ntp_weight", 1.0, "lambda: weight of next-token prediction in alm+sft "
                   "(and in dskd, mined, uld).")
flags.DEFINE_string("bias_tables", None, "Tokenization-bias tables of this tokenizer pair "
                    "(a directory written by experiments.compute_bias_tables); needed by "
                    "--constraint=unbiased.")

# What trains.
flags.DEFINE_integer("lora_rank", 64, "LoRA rank on attention + MLP (0: no LoRA).")
flags.DEFINE_float("lora_alpha", 64.0, "LoRA alpha (delta scaled by alpha / rank).")
flags.DEFINE_bool("train_embeddings", True, "Train the new input/output embeddings.")
flags.DEFINE_bool("projector", False, "Train an embedding projector on the input embeddings.")
flags.DEFINE_integer("projector_layers", 3, "Projector depth.")
flags.DEFINE_integer("projector_heads", 12, "Projector heads (must divide the model width).")

# Schedule and batch.
flags.DEFINE_integer("steps", 30, "Optimizer steps.")
flags.DEFINE_float("learning_rate", 3e-4, "Peak learning rate (Adam, no weight decay).")
flags.DEFINE_integer("warmup_steps", 3, "Linear warm-up steps.")
flags.DEFINE_float("decay_to", 0.0, "Final learning rate as a fraction of the peak.")
flags.DEFINE_float("grad_clip", 1.0, "Global gradient-norm clip (0: off).")
flags.DEFINE_integer("batch_size", 4, "Rows per optimizer step (global batch).")
flags.DEFINE_integer("grad_accum", 1, "Micro-batches per step.")
flags.DEFINE_integer("teacher_len", 128, "Teacher tokens per row.")
flags.DEFINE_integer("student_len", 128, "Student tokens per row.")
flags.DEFINE_integer("seed", 0, "Seed of the data order and of the LoRA / projector init.")
flags.DEFINE_enum("dtype", "float32", config_lib.DTYPES, "Compute dtype.")

# Devices.
flags.DEFINE_integer("mesh_data", 1, "Data-parallel mesh axis size.")
flags.DEFINE_integer("mesh_fsdp", 1, "FSDP mesh axis size.")
flags.DEFINE_integer("mesh_tensor", 1, "Tensor-parallel mesh axis size.")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (multi-host).")

# Outputs.
flags.DEFINE_string("out_dir", "runs/transfer", "Metrics, report, summary (and checkpoints).")
flags.DEFINE_string("checkpoint_dir", None, "Checkpoints (default: <out_dir>/checkpoints; '' "
                    "disables).")
flags.DEFINE_integer("checkpoint_every", 0, "Save every N steps (0: only at the end).")
flags.DEFINE_integer("keep_checkpoints", 2, "Recent checkpoints to keep.")
flags.DEFINE_bool("resume", True, "Resume from the newest checkpoint in --checkpoint_dir "
                  "(--noresume: start over, replacing that directory's checkpoints).")
flags.DEFINE_integer("eval_every", 0, "Held-out evaluation every N steps (0: start and end).")
flags.DEFINE_integer("log_every", 1, "Log training metrics every N steps.")
flags.DEFINE_string("export_dir", None, "Export the student here as an HF directory (default: "
                    "<out_dir>/export; '' disables).")
flags.DEFINE_bool("progress", True, "Show a progress bar.")
flags.DEFINE_integer("max_nonfinite_steps", 10, "Stop after this many consecutive steps with "
                     "a non-finite loss or gradient (each is skipped, not applied; the last "
                     "checkpoint is kept).")

# Every numeric flag is checked when the flags are parsed, before any work (a
# bad --log_every used to surface as a ZeroDivisionError after a minute).
# Bounds that TrainConfig also checks are repeated so that every numeric flag
# fails the same way: exit 1, "flag --NAME=VALUE: must be ...".
_INT_MIN = {"eval_batches": 1, "eval_batch_size": 1, "num_workers": 0, "lora_rank": 0,
            "projector_layers": 1, "projector_heads": 1, "steps": 1, "warmup_steps": 0,
            "batch_size": 1, "grad_accum": 1, "teacher_len": 2, "student_len": 2, "seed": 0,
            "mesh_data": 1, "mesh_fsdp": 1, "mesh_tensor": 1, "checkpoint_every": 0,
            "keep_checkpoints": 1, "eval_every": 0, "log_every": 1, "max_nonfinite_steps": 1}
# name -> (lowest value, whether it is excluded, highest value or None).
_FLOAT_RANGE = {"tau": (0.0, True, None), "gamma": (0.0, True, None),
                "ntp_weight": (0.0, False, None), "lora_alpha": (0.0, True, None),
                "learning_rate": (0.0, True, None), "decay_to": (0.0, False, 1.0),
                "grad_clip": (0.0, False, None)}


def _register_bounds() -> None:
  for name, low in _INT_MIN.items():
    flags.register_validator(name, lambda v, low=low: v is None or v >= low,
                             message=f"must be >= {low}")
  for name, (low, strict, high) in _FLOAT_RANGE.items():
    def ok(v, low=low, strict=strict, high=high):
      return v is None or (math.isfinite(v) and (v > low if strict else v >= low)
                           and (high is None or v <= high))
    bound = f"{'>' if strict else '>='} {low:g}" + (f" and <= {high:g}" if high is not None
                                                     else "")
    flags.register_validator(name, ok, message=f"must be a finite number {bound}")


_register_bounds()


def _extra_heldout(values: list[str]) -> tuple[tuple[str, str], ...]:
  out = []
  for v in values:
    label, sep, spec = v.partition("=")
    if not sep or not label or not spec or "@" in label:
      raise app.UsageError(f"--extra_heldout={v!r}: write LABEL=SPEC (a label without '@', then "
                           "a data spec like --heldout_data's).")
    out.append((label, spec))
  if len({l for l, _ in out}) != len(out):
    raise app.UsageError("--extra_heldout: a label is used twice.")
  return tuple(out)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.getLogger().setLevel(logging.INFO)
  # Option errors surface before JAX is even imported.
  try:
    cfg = config_lib.TrainConfig(
        method=FLAGS.method, steps=FLAGS.steps, learning_rate=FLAGS.learning_rate,
        warmup_steps=FLAGS.warmup_steps, decay_to=FLAGS.decay_to, grad_clip=FLAGS.grad_clip,
        batch_size=FLAGS.batch_size, grad_accum=FLAGS.grad_accum, teacher_len=FLAGS.teacher_len,
        student_len=FLAGS.student_len, seed=FLAGS.seed, divergence=FLAGS.divergence,
        tau=FLAGS.tau, constraint=FLAGS.constraint, gamma=FLAGS.gamma, debias=FLAGS.debias,
        ntp_weight=FLAGS.ntp_weight, lora_rank=FLAGS.lora_rank, lora_alpha=FLAGS.lora_alpha,
        train_embeddings=FLAGS.train_embeddings, projector=FLAGS.projector,
        projector_layers=FLAGS.projector_layers, projector_heads=FLAGS.projector_heads,
        dtype=FLAGS.dtype, mesh_data=FLAGS.mesh_data, mesh_fsdp=FLAGS.mesh_fsdp,
        mesh_tensor=FLAGS.mesh_tensor)
  except config_lib.TrainConfigError as e:
    raise app.UsageError(str(e)) from None

  extra_heldout = _extra_heldout(FLAGS.extra_heldout)
  if FLAGS.teacher_samples and "teacher" in dict(extra_heldout):
    raise app.UsageError("--extra_heldout: the label 'teacher' is taken by --teacher_samples "
                         "(rename the set, or pass --teacher_samples=0).")

  import jax  # pylint: disable=import-outside-toplevel
  if FLAGS.distributed:
    jax.distributed.initialize()
  # pylint: disable=import-outside-toplevel
  from alm.data.sources import DataError
  from alm.models.loading import ModelFileError
  from alm.tokenization.base import TokenizerError
  from alm.training.checkpoint import CheckpointMismatchError
  from alm.training.rundir import OutputDirError
  from alm.training.step import MethodNotAvailableError
  from alm.training.trainer import NonFiniteTrainingError, RunOptions
  from alm.training.transfer import (BiasTablesError, TransferJob, format_summary, report_path,
                                     run_transfer)

  export = FLAGS.export_dir if FLAGS.export_dir is not None else f"{FLAGS.out_dir}/export"
  job = TransferJob(model=FLAGS.model, target_tokenizer=FLAGS.target_tokenizer, data=FLAGS.data,
                    heldout_data=FLAGS.heldout_data,
                    extra_heldout=extra_heldout, eval_batches=FLAGS.eval_batches,
                    eval_batch_size=FLAGS.eval_batch_size, pack=FLAGS.pack,
                    num_workers=FLAGS.num_workers, export_dir=export,
                    bias_tables=FLAGS.bias_tables or "",
                    teacher_samples=FLAGS.teacher_samples,
                    teacher_sample_tokens=FLAGS.teacher_sample_tokens,
                    text_field=FLAGS.text_field, bad_documents=FLAGS.bad_documents,
                    text_normalization=FLAGS.text_normalization)
  opts = RunOptions(out_dir=FLAGS.out_dir, checkpoint_dir=FLAGS.checkpoint_dir,
                    checkpoint_every=FLAGS.checkpoint_every,
                    keep_checkpoints=FLAGS.keep_checkpoints, resume=FLAGS.resume,
                    eval_every=FLAGS.eval_every, log_every=FLAGS.log_every,
                    max_nonfinite_steps=FLAGS.max_nonfinite_steps,
                    progress=FLAGS.progress and jax.process_index() == 0)
  command = "python -m experiments.transfer_tokenizer " + " ".join(
      shlex.quote(a) for a in sys.argv[1:])
  try:
    summary = run_transfer(job, cfg, opts, command=command)
  except (TokenizerError, DataError, MethodNotAvailableError, CheckpointMismatchError,
          BiasTablesError, FileNotFoundError, ModelFileError, OutputDirError,
          NonFiniteTrainingError) as e:
    # Bad input: the message says what and how to fix it; a traceback adds nothing.
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(f"\nTokenizer transfer {FLAGS.model} -> {FLAGS.target_tokenizer} done "
        f"(report: {report_path(opts)}):")
  print(format_summary(summary))


if __name__ == "__main__":
  app.run(main)
