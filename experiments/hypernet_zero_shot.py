"""Zero-shot tokenizer transfer with a hypernetwork, against FVT and the original model.

  python -m experiments.hypernet_zero_shot --hypernet=smollm2-135m-unigram
  python -m experiments.hypernet_zero_shot --hypernet=runs/hypernet/hypernet \\
      --tokenizers=qwen3,llama3,mistral-v3,gemma3-270m --teacher_samples=32

For each tokenizer (never sampled in the hypernetwork's training) and each
held-out set (--heldout_data, and --teacher_samples texts sampled from the
base model itself), the held-out bits per byte of the original model with its
own tokenizer, of the base moved to the tokenizer with FVT embeddings, and
with the hypernetwork's, on the same rows; and the share of FVT's gap the
hypernetwork closes (`alm.hypernet.evaluate`). Writes zero_shot.json and
zero_shot.md into --out_dir (default: the zoo entry's directory, or the
hypernetwork's).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("hypernet", None, "A zoo name (alm.hypernet.zoo) or a directory written by "
                    "experiments.train_hypernet.", required=True)
flags.DEFINE_string("model", "", "The base model (default: the one the hypernetwork records).")
flags.DEFINE_list("tokenizers", [], "Tokenizers to transfer to (asset names or paths; not the "
                  "base's own). Default: qwen3, llama3, mistral-v3, gemma3-270m and "
                  "smollm2-135m-instruct, less the base's own tokenizer.")
flags.DEFINE_string("heldout_data", "default:heldout", "Held-out documents.")
flags.DEFINE_integer("teacher_samples", 32, "Also evaluate on this many texts sampled from the "
                     "base model (0: off).", lower_bound=0)
flags.DEFINE_integer("teacher_sample_tokens", 128, "Tokens per sampled text.", lower_bound=8)
flags.DEFINE_integer("length", 128, "Tokens per row on each side.", lower_bound=8)
flags.DEFINE_integer("eval_batches", 4, "Batches of 4 rows per held-out set.", lower_bound=1)
flags.DEFINE_string("out_dir", "", "Where zero_shot.json / .md go (default: the hypernetwork's "
                    "zoo entry or directory).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.getLogger().setLevel(logging.INFO)
  # pylint: disable=import-outside-toplevel
  from alm.data.sources import open_source
  from alm.hypernet import zoo
  from alm.hypernet.evaluate import (DEFAULT_TOKENIZERS, format_table, held_out_tokenizers,
                                     zero_shot_table)
  from alm.hypernet.hypernet import HypernetError
  from alm.models.loading import load_model
  from alm.tokenization.loading import load_tokenizer
  from alm.training import cli
  try:
    hn = zoo.load(FLAGS.hypernet)
    model_name = FLAGS.model or hn.base[0]
    if not model_name:
      raise HypernetError("The hypernetwork records no base model name; pass --model.")
    base, base_tok = load_model(model_name)
    names = FLAGS.tokenizers or DEFAULT_TOKENIZERS
    toks = held_out_tokenizers(base_tok, {name.rstrip("/").split("/")[-1]: load_tokenizer(name)
                                          for name in names}, explicit=bool(FLAGS.tokenizers))
    sets = {"corpus": open_source(FLAGS.heldout_data)}
    if FLAGS.teacher_samples:
      from alm.eval.teacher_samples import teacher_samples_file
      sets["teacher samples"] = open_source(str(teacher_samples_file(
          model_name, base, base_tok, num=FLAGS.teacher_samples,
          max_new_tokens=FLAGS.teacher_sample_tokens, seed=0)))
    rows = zero_shot_table(base, base_tok, hn, toks, sets, length=FLAGS.length,
                           n_batches=FLAGS.eval_batches)
  except cli.user_errors() + (HypernetError,) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  p = Path(FLAGS.hypernet).expanduser()
  out = Path(FLAGS.out_dir) if FLAGS.out_dir else (p if p.is_dir() else zoo.entry_dir(
      FLAGS.hypernet))
  out.mkdir(parents=True, exist_ok=True)
  table = format_table(rows)
  (out / "zero_shot.json").write_text(json.dumps(
      {"hypernet": FLAGS.hypernet, "model": model_name, "length": FLAGS.length,
       "eval_batches": FLAGS.eval_batches, "teacher_samples": FLAGS.teacher_samples,
       "rows": rows}, indent=1) + "\n")
  (out / "zero_shot.md").write_text(table + "\n")
  print(f"\nZero-shot transfer of {model_name} with {FLAGS.hypernet} ({out}/zero_shot.md):\n")
  print(table)


if __name__ == "__main__":
  app.run(main)
