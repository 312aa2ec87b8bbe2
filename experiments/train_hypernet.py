"""Train a ZeTT-style embedding hypernetwork with ALM (SPEC §11, docs/method.md §14).

  python -m experiments.train_hypernet --model=smollm2-135m-instruct --out_dir=runs/hn

Every step samples a random Unigram tokenizer from the substrings of recent
training documents, predicts the embeddings of the batch's tokens (+ random
negatives) with the hypernetwork, and trains it so that the frozen base model
with those embeddings matches the base model with its own tokenizer (ALM by
default; every method and term of the engine that reads only the teacher's
outputs applies). Held-out bits per byte: on a fixed sampled tokenizer never
used in training, and zero-shot on each --eval_tokenizers tokenizer (the whole
vocabulary predicted), at the start and the end (and every --eval_every steps).

Outputs in --out_dir: metrics.jsonl, report.md + report.png, summary.json,
checkpoints/ (resumed automatically), and the hypernetwork in --export_dir
(`alm.hypernet.student.load_hypernet` reads it; `alm.hypernet.transfer` applies
it to the base model and any tokenizer).
"""

from __future__ import annotations

import logging
import shlex
import sys

from absl import app, flags

from alm.hypernet.hypernet import HypernetConfig
from alm.hypernet.sampler import SamplerConfig
from alm.hypernet.train import HypernetJob
from alm.training import cli

FLAGS = flags.FLAGS
_J, _H, _S = HypernetJob, HypernetConfig(), SamplerConfig()
flags.DEFINE_string("model", _J.model, "The base model: asset name, .gguf file or HF directory.")
flags.DEFINE_string("data", _J.data, "Training documents (as experiments.transfer_tokenizer's).")
flags.DEFINE_string("heldout_data", _J.heldout_data, "Held-out documents.")
flags.DEFINE_list("eval_tokenizers", list(_J.eval_tokenizers), "Tokenizers scored zero-shot "
                  "at each evaluation (asset names or paths; never sampled in training).")
flags.DEFINE_integer("eval_batches", _J.eval_batches, "Held-out batches of 4 rows per "
                     "evaluated tokenizer.", lower_bound=1)
flags.DEFINE_integer("vocab_rows", _J.vocab_rows, "Rows of each batch's vocabulary (its tokens "
                     "+ random negatives for the output softmax).", lower_bound=2)
flags.DEFINE_bool("vocab_buckets", _J.vocab_buckets, "Lay the local vocabulary out in piece "
                  "buckets (rows of <= 1, 2, 4, ... pieces read with that many slots; "
                  "the same predictions, less work).")
flags.DEFINE_integer("sample_docs", _J.sample_docs, "Documents whose substrings make each "
                     "step's tokenizer.", lower_bound=1)
flags.DEFINE_integer("sampler_vocab_size", _S.vocab_size, "Pieces of each sampled tokenizer "
                     "(besides the 256 bytes).", lower_bound=1)
flags.DEFINE_float("sampler_noise", _S.noise_std, "Sigma of the sampler's log-normal noise.",
                   lower_bound=0.0)
flags.DEFINE_integer("max_pieces", _H.max_pieces, "Base-tokenizer pieces the hypernetwork "
                     "reads per token.", lower_bound=1)
flags.DEFINE_integer("hypernet_layers", _H.num_layers, "Encoder layers.", lower_bound=0)
flags.DEFINE_integer("hypernet_heads", _H.num_heads, "Attention heads.", lower_bound=1)
flags.DEFINE_integer("hypernet_dim", _H.dim, "Encoder width (0: the base's).", lower_bound=0)
flags.DEFINE_enum("residual", _H.residual, ["mean", "first"], "The heuristic the prediction "
                  "corrects: FVT's mean of the pieces, or the first piece.")
flags.DEFINE_bool("copy_shared", _H.copy_shared, "Tokens the base vocabulary also has keep "
                  "the base's embeddings (as FVT) and are not predicted; only new tokens are.")
cli.define_train_flags(default_preset="hypernet-demo")
cli.define_run_flags(default_out_dir="runs/hypernet")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.getLogger().setLevel(logging.INFO)
  cfg = cli.train_config_from_flags()
  try:
    job = HypernetJob(
        model=FLAGS.model, data=FLAGS.data, heldout_data=FLAGS.heldout_data,
        hypernet=HypernetConfig(max_pieces=FLAGS.max_pieces, num_layers=FLAGS.hypernet_layers,
                                num_heads=FLAGS.hypernet_heads, dim=FLAGS.hypernet_dim,
                                residual=FLAGS.residual, copy_shared=FLAGS.copy_shared),
        sampler=SamplerConfig(vocab_size=FLAGS.sampler_vocab_size, noise_std=FLAGS.sampler_noise),
        vocab_rows=FLAGS.vocab_rows, vocab_buckets=FLAGS.vocab_buckets,
        sample_docs=FLAGS.sample_docs,
        eval_tokenizers=tuple(FLAGS.eval_tokenizers), eval_batches=FLAGS.eval_batches,
        export_dir=FLAGS.export_dir if FLAGS.export_dir is not None
        else f"{FLAGS.out_dir}/hypernet")
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  # pylint: disable=import-outside-toplevel
  from alm.hypernet.hypernet import HypernetError
  from alm.hypernet.train import run_hypernet
  command = "python -m experiments.train_hypernet " + " ".join(shlex.quote(a)
                                                               for a in sys.argv[1:])
  try:
    summary = run_hypernet(job, cfg, cli.run_options_from_flags(), command=command)
  except cli.user_errors() + (HypernetError,) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(f"\nHypernetwork for {job.model} done (report: {FLAGS.out_dir}/report.md):")
  for k, v in summary.items():
    print(f"  {k}: {v}")


if __name__ == "__main__":
  app.run(main)
