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

Options: every training option is a flag generated from `alm.training.config`
(same name, default and bounds); `--preset=demo` (the default here) is the
README's CPU recipe, `--preset=paper-transfer` the paper's settings, and any
flag given overrides the preset. `--print_config` prints the resulting config.

Multi-host: start one process per host with the same flags after
`jax.distributed.initialize()` (set --distributed); the mesh spans all
devices and each process reads its own shard of the data.
"""

from __future__ import annotations

from absl import app, flags

from alm.training import cli
from alm.training.transfer import TransferJob

FLAGS = flags.FLAGS

# What to transfer.
flags.DEFINE_string("model", TransferJob.model,
                    "Teacher model: asset name, .gguf file or HF-format directory.")
flags.DEFINE_string("target_tokenizer", TransferJob.target_tokenizer,
                    "The new tokenizer: asset name or path (tokenizer.json, .model, HF dir).")
flags.DEFINE_string("init_hypernet", TransferJob.init_hypernet, "Initialise the student's "
                    "embeddings with this hypernetwork (a zoo name, see experiments.hypernet_zoo "
                    "--list, or a directory written by experiments.train_hypernet) instead of "
                    "FVT.")
cli.define_data_flags(TransferJob)
cli.define_train_flags(default_preset="demo")
cli.define_run_flags(default_out_dir="runs/transfer")


def main(argv):
  cli.run_from_flags(argv, "experiments.transfer_tokenizer", model=FLAGS.model, target_tokenizer=FLAGS.target_tokenizer)


if __name__ == "__main__":
  app.run(main)
