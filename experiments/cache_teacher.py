"""Build a teacher cache: train ALM later without running the teacher (SPEC §15).

For a teacher, a tokenizer pair, the data and the run's shapes, writes the
aligned rows of `--steps` batches, in the order the training run reads them,
with the teacher's per-token path and boundary log-probs, as ArrayRecord
shards (`alm.data.teacher_cache`):

  python -m experiments.cache_teacher --model=smollm2-135m-instruct \\
      --target_tokenizer=qwen3 --preset=demo --steps=30 --out_dir=runs/cache-qwen3
  python -m experiments.transfer_tokenizer --preset=demo --steps=30 \\
      --teacher_cache=runs/cache-qwen3 --out_dir=runs/transfer-cached

Large-to-small distillation: `--student_model=NAME` instead of
`--target_tokenizer` (then `experiments.distill --teacher_cache=...`, which
never loads the teacher's weights); byte students: `--target_tokenizer=bytes`.

The run's held-out sets (--heldout_data, --extra_heldout, --teacher_samples,
--eval_batches, --eval_batch_size) are cached too, with the teacher's bits
per row, so the run's evaluations never run the teacher either; a set added
later is added by the same command with the new flag (the training rows are
kept).

The training flags that shape the data (lengths, batch size, seed, steps,
constraint, packing, dtype; --add_terms and --hidden_layers when the run has
the hidden-state term, whose teacher hidden states are then cached too, in
--hidden_dtype) must be the training run's: the cache records a
fingerprint of them, of the teacher's weights, both vocabularies and the data
files, and a run with anything different is refused, naming the fields and
the command that builds its cache. An interrupted build resumes where it
stopped (run the same command again). The ALM terms (ALM with any
constraint, alm+sft, alm_space) and the hidden-state term read a cache; DSKD,
MinED and ULD read the teacher's whole distribution and need the live teacher.
"""

from __future__ import annotations

import logging
import shlex
import sys

from absl import app, flags

from alm.training import cli
from alm.training.transfer import TransferJob

FLAGS = flags.FLAGS

flags.DEFINE_string("model", TransferJob.model,
                    "Teacher model: asset name, .gguf file or HF-format directory.")
flags.DEFINE_string("target_tokenizer", TransferJob.target_tokenizer,
                    "The student's tokenizer (tokenizer transfer; 'bytes' for a byte student).")
flags.DEFINE_string("student_model", "", "A separate student model (large-to-small "
                    "distillation): its tokenizer is the student side.")
flags.DEFINE_string("out_dir", "runs/teacher-cache", "The cache directory.")
flags.DEFINE_integer("rows_per_shard", 0, "Rows per shard file (0: 64 batches).")
flags.register_validator("rows_per_shard", lambda v: v >= 0, message="must be >= 0")
flags.DEFINE_enum("hidden_dtype", "bfloat16", ["bfloat16", "float32"], "Storage dtype of the "
                  "teacher's hidden states, cached when the run's objective has the "
                  "hidden-state term (--add_terms=hidden=W, --hidden_layers).")
flags.DEFINE_bool("progress", True, "Show a progress bar.")
cli.define_data_flags(TransferJob)
cli.define_train_flags(default_preset="demo")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.getLogger().setLevel(logging.INFO)
  cfg = cli.train_config_from_flags()
  kw = cli.data_job_kwargs(TransferJob)
  if kw.get("teacher_cache"):
    raise app.UsageError("--teacher_cache is what training reads; here the cache is --out_dir.")
  try:
    job = TransferJob(model=FLAGS.model, target_tokenizer=FLAGS.target_tokenizer,
                      student_model=FLAGS.student_model, **kw)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  # pylint: disable=import-outside-toplevel
  from alm.training.step import check_cacheable
  from alm.training.transfer import build_teacher_cache
  command = "python -m experiments.cache_teacher " + " ".join(shlex.quote(a)
                                                              for a in sys.argv[1:])
  try:
    check_cacheable(cfg)
    m = build_teacher_cache(job, cfg, FLAGS.out_dir, command=command,
                            rows_per_shard=FLAGS.rows_per_shard or None, progress=FLAGS.progress,
                            hidden_dtype=FLAGS.hidden_dtype)
  except cli.user_errors() as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  size = sum(s["bytes"] for s in m["shards"])
  st = m.get("stats", {})
  print(f"\nTeacher cache {FLAGS.out_dir}: {m['rows']} rows in {len(m['shards'])} shard(s), "
        f"{size / 1e6:.1f} MB; {st.get('teacher_tokens', 0)} teacher tokens in "
        f"{st.get('build_s', 0):.1f} s ({st.get('tokens_per_s', 0):.0f} tokens/s); "
        f"{size / max(st.get('teacher_tokens', 0), 1):.1f} MB per million teacher tokens.")
  sets = ", ".join(f"{label or 'main'} ({rows} rows)" for label, rows in m["heldout"].items())
  print(f"Held-out sets with the teacher's bits: {sets}.")


if __name__ == "__main__":
  app.run(main)
