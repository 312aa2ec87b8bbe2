"""The absl flags the experiment binaries share, generated from the config dataclasses.

Every `TrainConfig` option becomes a flag of the same name, with the field's
default, help text and bounds (`alm.training.config`), so a flag can never
disagree with the library. `--preset=NAME` starts from a named recipe
(`alm.training.config.PRESETS`); any flag given on the command line overrides
it. `--print_config` prints the resulting config as JSON and exits.

Data, evaluation and output flags (`define_data_flags`, `define_run_flags`)
take their defaults from `alm.training.transfer.TransferJob` and
`alm.training.trainer.RunOptions` the same way.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from typing import Any, get_args

from absl import app, flags

from alm.training import config as config_lib

FLAGS = flags.FLAGS


def _bound_message(low, strict, high) -> str:
  parts = []
  if low is not None:
    parts.append(f"{'>' if strict else '>='} {low:g}")
  if high is not None:
    parts.append(f"<= {high:g}")
  return "must be a finite number " + " and ".join(parts)


def _define(name: str, default: Any, kind: Any, help_: str, meta: dict | None = None) -> None:
  meta = meta or {}
  if typing.get_origin(kind) is typing.Literal:
    flags.DEFINE_enum(name, default, list(get_args(kind)), help_)
  elif kind is bool:
    flags.DEFINE_bool(name, default, help_)
  elif kind is int:
    flags.DEFINE_integer(name, default, help_)
  elif kind is float:
    flags.DEFINE_float(name, default, help_)
  else:
    flags.DEFINE_string(name, default, help_)
  low, strict, high = meta.get("low"), meta.get("strict"), meta.get("high")
  if kind in (int, float) and (low is not None or high is not None):
    def ok(v, low=low, strict=strict, high=high):
      return v is None or (math.isfinite(v) and (low is None or (v > low if strict else v >= low))
                           and (high is None or v <= high))
    flags.register_validator(name, ok, message=_bound_message(low, strict, high))


def _register_minimums(minimums: dict[str, int]) -> None:
  """Integer flags refused below their minimum when the flags are parsed."""
  for name, low in minimums.items():
    flags.register_validator(name, lambda v, low=low: v is None or v >= low,
                             message=f"must be >= {low}")


def define_train_flags(default_preset: str | None = None) -> None:
  """One flag per `TrainConfig` option, plus --preset and --print_config."""
  presets = "; ".join(f"{k}: " + ", ".join(f"{n}={v}" for n, v in p.items())
                      for k, p in config_lib.PRESETS.items())
  flags.DEFINE_enum("preset", default_preset, list(config_lib.PRESETS),
                    f"Start from a named recipe; flags given override it. Presets: {presets}.")
  flags.DEFINE_bool("print_config", False, "Print the training config (after --preset and the "
                    "flags) as JSON and exit.")
  from alm.training import terms  # pylint: disable=import-outside-toplevel
  for name, (_, field, kind) in config_lib.flat_fields().items():
    if name == "method":  # refused when the flags are parsed, naming the registered methods
      kind = typing.Literal[tuple(sorted(terms.methods()))]
    _define(name, field.default, kind, field.metadata.get("help", name), field.metadata)


def preset_overrides() -> dict[str, Any]:
  """The chosen preset's values for the options not given on the command line."""
  if not FLAGS.preset:
    return {}
  return {k: v for k, v in config_lib.preset_values(FLAGS.preset).items()
          if not FLAGS[k].present}


def train_config_from_flags() -> config_lib.TrainConfig:
  """The `TrainConfig` of --preset and the flags (raises `app.UsageError` when invalid)."""
  values = {name: FLAGS[name].value for name in config_lib.flat_fields()}
  values.update({k: v for k, v in preset_overrides().items() if k in values})
  try:
    cfg = config_lib.TrainConfig.build(**values)
  except config_lib.TrainConfigError as e:
    raise app.UsageError(str(e)) from None
  if FLAGS.print_config:
    print(json.dumps({"preset": FLAGS.preset, **cfg.to_dict()}, indent=1))
    raise SystemExit(0)
  return cfg


def _job_field(cls, name: str) -> Any:
  return next(f.default for f in dataclasses.fields(cls) if f.name == name)


def define_data_flags(job_cls) -> None:
  """Data and held-out evaluation flags, with `job_cls`'s (TransferJob's) defaults."""
  d = lambda n: _job_field(job_cls, n)  # pylint: disable=unnecessary-lambda-assignment
  flags.DEFINE_string("data", d("data"), "Training documents: 'default' (offline corpus), a "
                      "JSONL / text / parquet file, directory or glob, or 'hf:NAME[:SPLIT]'.")
  flags.DEFINE_string("heldout_data", d("heldout_data"), "Held-out documents for bits per byte.")
  flags.DEFINE_multi_string("extra_heldout", [], "More held-out sets as LABEL=SPEC "
                            "(repeatable), e.g. text of another domain than --data; reported "
                            "as <key>@LABEL.")
  flags.DEFINE_integer("teacher_samples", d("teacher_samples"), "Also report bits per byte on "
                       "this many texts sampled from the teacher (held-out label 'teacher'; "
                       "sampled once, then cached): the gap there measures how far the student "
                       "is from behaving like the teacher, not domain fit. 0: off.")
  flags.DEFINE_integer("teacher_sample_tokens", d("teacher_sample_tokens"),
                       "Tokens per teacher-sampled text.")
  flags.DEFINE_integer("eval_batches", d("eval_batches"), "Held-out batches (fixed: the first "
                       "in file order).")
  flags.DEFINE_integer("eval_batch_size", d("eval_batch_size"), "Rows per held-out batch.")
  flags.DEFINE_bool("pack", d("pack"), "Pack several documents per row (else one per row, "
                    "padded).")
  flags.DEFINE_integer("num_workers", d("num_workers"), "Grain worker processes for "
                       "tokenisation + alignment.")
  flags.DEFINE_string("text_field", d("text_field"), "JSONL key / parquet column holding the "
                      "text, in --data, --heldout_data and --extra_heldout.")
  flags.register_validator("text_field", bool, message="must be a non-empty field name")
  flags.DEFINE_enum("bad_documents", d("bad_documents"), ["skip", "error"], "A document a "
                    "tokenizer cannot spell exactly (a lone surrogate, a byte its vocabulary "
                    "lacks): 'skip' it (counted as skipped_documents in the metrics and the "
                    "report, the first reasons logged), or 'error': stop naming it (checked "
                    "before the model loads when the data is a few MB at most).")
  flags.DEFINE_enum("text_normalization", d("text_normalization"), ["auto", "nfc", "none"],
                    "Normalize each text before both tokenizations: 'auto' is NFC when either "
                    "tokenizer NFC-normalizes (Qwen3's does; it cannot spell non-NFC text), "
                    "else none.")
  flags.DEFINE_string("bias_tables", None, "Tokenization-bias tables of this tokenizer pair "
                      "(a directory written by experiments.compute_bias_tables); needed by "
                      "--constraint=unbiased.")
  flags.DEFINE_string("teacher_cache", d("teacher_cache"), "Train from a teacher cache "
                      "(a directory written by experiments.cache_teacher for this run's "
                      "teacher, tokenizers, data and shapes): the rows and the teacher's "
                      "outputs are read from it, the teacher never runs in the step. ALM "
                      "methods only; a cache of another run is refused with the command that "
                      "builds the right one.")
  _register_minimums({"teacher_samples": 0, "teacher_sample_tokens": 8, "eval_batches": 1,
                      "eval_batch_size": 1, "num_workers": 0})


def extra_heldout_from_flags() -> tuple[tuple[str, str], ...]:
  """--extra_heldout LABEL=SPEC values, checked."""
  out = []
  for v in FLAGS.extra_heldout:
    label, sep, spec = v.partition("=")
    if not sep or not label or not spec or "@" in label:
      raise app.UsageError(f"--extra_heldout={v!r}: write LABEL=SPEC (a label without '@', then "
                           "a data spec like --heldout_data's).")
    out.append((label, spec))
  if len({l for l, _ in out}) != len(out):
    raise app.UsageError("--extra_heldout: a label is used twice.")
  return tuple(out)


def data_job_kwargs(job_cls) -> dict[str, Any]:
  """The data flags as `job_cls` keyword arguments (with the preset's job options)."""
  extra_heldout = extra_heldout_from_flags()
  kw = dict(data=FLAGS.data, heldout_data=FLAGS.heldout_data, extra_heldout=extra_heldout,
            eval_batches=FLAGS.eval_batches, eval_batch_size=FLAGS.eval_batch_size,
            pack=FLAGS.pack, num_workers=FLAGS.num_workers, bias_tables=FLAGS.bias_tables or "",
            teacher_samples=FLAGS.teacher_samples,
            teacher_sample_tokens=FLAGS.teacher_sample_tokens, text_field=FLAGS.text_field,
            bad_documents=FLAGS.bad_documents, text_normalization=FLAGS.text_normalization,
            teacher_cache=FLAGS.teacher_cache)
  if "init_hypernet" in FLAGS:  # experiments.transfer_tokenizer's
    kw["init_hypernet"] = FLAGS.init_hypernet
  job_names = {f.name for f in dataclasses.fields(job_cls)}
  kw.update({k: v for k, v in preset_overrides().items() if k in job_names})
  if kw["teacher_samples"] and "teacher" in dict(extra_heldout):
    raise app.UsageError("--extra_heldout: the label 'teacher' is taken by --teacher_samples "
                         "(rename the set, or pass --teacher_samples=0).")
  return kw


def define_run_flags(default_out_dir: str) -> None:
  """Output, checkpoint and logging flags, with `RunOptions`' defaults."""
  from alm.training.trainer import RunOptions  # pylint: disable=import-outside-toplevel
  d = lambda n: _job_field(RunOptions, n)  # pylint: disable=unnecessary-lambda-assignment
  flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (multi-host).")
  flags.DEFINE_string("out_dir", default_out_dir, "Metrics, report, summary (and checkpoints).")
  flags.DEFINE_string("checkpoint_dir", None, "Checkpoints (default: <out_dir>/checkpoints; '' "
                      "disables).")
  flags.DEFINE_integer("checkpoint_every", d("checkpoint_every"), "Save every N steps (0: only "
                       "at the end).")
  flags.DEFINE_integer("keep_checkpoints", d("keep_checkpoints"), "Recent checkpoints to keep.")
  flags.DEFINE_bool("resume", d("resume"), "Resume from the newest checkpoint in "
                    "--checkpoint_dir (--noresume: start over, replacing that directory's "
                    "checkpoints).")
  flags.DEFINE_integer("eval_every", d("eval_every"), "Held-out evaluation every N steps (0: "
                       "start and end).")
  flags.DEFINE_integer("log_every", d("log_every"), "Log training metrics every N steps.")
  flags.DEFINE_string("export_dir", None, "Export the student here as an HF directory (default: "
                      "<out_dir>/export; '' disables).")
  flags.DEFINE_enum("export_subword", "copy", ["copy", "reference"], "Byte students: store "
                    "the frozen subword table in the export ('copy', self-contained) or only "
                    "the base model's name and vocabulary fingerprint ('reference': "
                    "alm.load_model reads the table from that base).")
  flags.DEFINE_bool("progress", d("progress"), "Show a progress bar.")
  flags.DEFINE_integer("max_nonfinite_steps", d("max_nonfinite_steps"), "Stop after this many "
                       "consecutive steps with a non-finite loss or gradient (each is skipped, "
                       "not applied; the last checkpoint is kept).")
  _register_minimums({"checkpoint_every": 0, "keep_checkpoints": 1, "eval_every": 0,
                      "log_every": 1, "max_nonfinite_steps": 1})


def run_options_from_flags():
  """`RunOptions` of the output flags (the progress bar on process 0 only)."""
  import jax  # pylint: disable=import-outside-toplevel
  from alm.training.trainer import RunOptions  # pylint: disable=import-outside-toplevel
  return RunOptions(out_dir=FLAGS.out_dir, checkpoint_dir=FLAGS.checkpoint_dir,
                    checkpoint_every=FLAGS.checkpoint_every,
                    keep_checkpoints=FLAGS.keep_checkpoints, resume=FLAGS.resume,
                    eval_every=FLAGS.eval_every, log_every=FLAGS.log_every,
                    max_nonfinite_steps=FLAGS.max_nonfinite_steps,
                    progress=FLAGS.progress and jax.process_index() == 0)


def export_dir_from_flags() -> str:
  """--export_dir, defaulting to <out_dir>/export ('' disables)."""
  return FLAGS.export_dir if FLAGS.export_dir is not None else f"{FLAGS.out_dir}/export"


# The errors a run reports as one line (bad input: the message says what and how to fix).
def user_errors() -> tuple[type[BaseException], ...]:
  # pylint: disable=import-outside-toplevel
  from alm.data.sources import DataError
  from alm.models.loading import ModelFileError
  from alm.tokenization.base import TokenizerError
  from alm.training.checkpoint import CheckpointMismatchError
  from alm.training.config import TrainConfigError
  from alm.training.rundir import OutputDirError
  from alm.training.trainer import NonFiniteTrainingError
  from alm.training.transfer import BiasTablesError
  from alm.hypernet.hypernet import HypernetError
  return (TokenizerError, DataError, CheckpointMismatchError, BiasTablesError, FileNotFoundError,
          ModelFileError, OutputDirError, NonFiniteTrainingError, TrainConfigError,
          HypernetError)


def run_from_flags(argv, binary: str, **job_fields: Any) -> None:
  """The body of an experiment binary's `main`: config, job, run, one-line errors, summary.

  Args:
    argv: `main`'s argv (no positional arguments are accepted).
    binary: the module name (`experiments.distill`), for the recorded command.
    **job_fields: the job's model fields (`model=`, `target_tokenizer=` or
      `student_model=`); the data and export fields come from the flags.
  """
  import logging  # pylint: disable=import-outside-toplevel
  import shlex  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  from alm.training.transfer import TransferJob  # pylint: disable=import-outside-toplevel
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.getLogger().setLevel(logging.INFO)
  # Option errors surface before any model is loaded.
  cfg = train_config_from_flags()
  try:
    job = TransferJob(export_dir=export_dir_from_flags(), export_subword=FLAGS.export_subword,
                      **job_fields,
                      **data_job_kwargs(TransferJob))
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  import jax  # pylint: disable=import-outside-toplevel
  if FLAGS.distributed:
    jax.distributed.initialize()
  # pylint: disable=import-outside-toplevel
  from alm.training.transfer import format_summary, report_path, run_transfer
  opts = run_options_from_flags()
  command = f"python -m {binary} " + " ".join(shlex.quote(a) for a in sys.argv[1:])
  try:
    summary = run_transfer(job, cfg, opts, command=command)
  except user_errors() as e:
    # Bad input: the message says what and how to fix it; a traceback adds nothing.
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  what = "Distillation" if job.student_model else "Tokenizer transfer"
  print(f"\n{what} {job.model} -> {job.student_model or job.target_tokenizer} done (report: "
        f"{report_path(opts)}):")
  print(format_summary(summary))
