"""Large-to-small distillation across model families (the paper's second use case).

A frozen teacher of one family teaches a smaller student of another, each with
its own tokenizer. The defaults distil Gemma 3 270M (262k-token vocabulary)
into SmolLM2-135M-Instruct (49k) on the offline default corpus, on a CPU,
ending with held-out bits per byte of the teacher, the student before and the
student after:

  python -m experiments.distill --out_dir=runs/distill

Methods on the same data and seed (docs/method.md §7, §10), for comparison:

  python -m experiments.distill --method=sft --out_dir=runs/distill-sft
  python -m experiments.distill --method=alm --out_dir=runs/distill-alm  # or dskd, mined, uld
  python -m experiments.distill --add_terms=hidden=1 --combine=gradmag    # + hidden states

Every training option is a flag generated from `alm.training.config`;
`--preset=distill-demo` (the default) is the CPU recipe, `--preset=paper-distill`
the paper's settings (full fine-tuning, LR 5e-6, 5k steps). The student is
fully fine-tuned by default (`--train_body`); `--lora_rank=64 --notrain_body`
LoRA-tunes it instead. `--teacher_param_dtype=bfloat16` stores the frozen
teacher in half the memory.

Outputs in --out_dir as for experiments/transfer_tokenizer.py: metrics.jsonl,
tensorboard/, report.md + report.png, summary.json, checkpoints/ (resumed
automatically), and the exported student (HF directory) in --export_dir.
"""

from __future__ import annotations

from absl import app, flags

from alm.training import cli
from alm.training.transfer import TransferJob

FLAGS = flags.FLAGS

flags.DEFINE_string("teacher", "gemma3-270m", "Teacher model: asset name, .gguf file or "
                    "HF-format directory (frozen).")
flags.DEFINE_string("student", "smollm2-135m-instruct", "Student model (another family, its own "
                    "tokenizer): asset name, .gguf file or HF-format directory.")
cli.define_data_flags(TransferJob)
cli.define_train_flags(default_preset="distill-demo")
cli.define_run_flags(default_out_dir="runs/distill")


def main(argv):
  if not FLAGS.student:
    raise app.UsageError("--student must name the student model (e.g. smollm2-135m-instruct).")
  cli.run_from_flags(argv, "experiments.distill", model=FLAGS.teacher, student_model=FLAGS.student)


if __name__ == "__main__":
  app.run(main)
