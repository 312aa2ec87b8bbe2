r"""Builds held-out sets that measure how closely a student behaves like its teacher.

In-domain held-out bits per byte rewards adapting to the training domain: an
SFT student can beat its own teacher there. Tokenizer transfer wants the
opposite: the student should behave like the teacher *everywhere*. Two sets
measure that:

- `teacher_samples`: texts sampled from the teacher itself (ancestral sampling,
  temperature 1, from BOS). On these, `bpb(student) - bpb(teacher)` estimates
  the sequence-level KL(teacher || student) per byte, up to the teacher's
  non-canonical tokenizations: zero only for a student that
  assigns every text the teacher's probability, whatever the training domain.
- `arithmetic`: "a + b = c" and "a * b = c" lines with random operands, the
  domain where the paper saw SFT forget most (digits tokenize differently
  across tokenizers).

  python -m experiments.make_heldout --kind=teacher_samples --num=64 \
      --max_new_tokens=256 --out=heldout/teacher64.jsonl
  python -m experiments.make_heldout --kind=arithmetic --out=heldout/arith.jsonl
  python -m experiments.transfer_tokenizer --extra_heldout=teacher64=heldout/teacher64.jsonl \
      --extra_heldout=arith=heldout/arith.jsonl

(The label `teacher` belongs to the binary's own `--teacher_samples` set.)

Output: JSONL, one `{"text": ..., "origin": ...}` per line, written atomically.
`experiments.transfer_tokenizer --teacher_samples=N` builds (and caches) the
teacher-sampled set by itself; this binary is for other sizes, other models,
or the arithmetic set.
"""

from __future__ import annotations

import logging
import os
import random
import sys
from pathlib import Path

from absl import app, flags

from alm.eval.teacher_samples import sample_texts, write_jsonl

FLAGS = flags.FLAGS
flags.DEFINE_enum("kind", "teacher_samples", ["teacher_samples", "arithmetic"],
                  "Which held-out set to build.")
flags.DEFINE_string("out", None, "Output JSONL path.", required=True)
flags.DEFINE_string("model", "smollm2-135m-instruct",
                    "Teacher to sample from (asset name, HF directory or .gguf file).")
flags.DEFINE_integer("num", 64, "Texts to write.", lower_bound=1)
flags.DEFINE_integer("max_new_tokens", 256, "Tokens sampled per text (teacher_samples).",
                     lower_bound=8)
flags.DEFINE_integer("batch_size", 16, "Texts sampled at once (teacher_samples).", lower_bound=1)
flags.DEFINE_float("temperature", 1.0, "Sampling temperature; 1 samples the teacher's own "
                   "distribution (anything else measures a different distribution).",
                   lower_bound=0.0)
flags.DEFINE_integer("min_chars", 64, "Drop sampled texts shorter than this.", lower_bound=1)
flags.DEFINE_integer("lines_per_text", 8, "Equations per text (arithmetic).", lower_bound=1)
flags.DEFINE_integer("seed", 0, "Sampling seed.")


def arithmetic_texts(num: int, lines_per_text: int, seed: int) -> list[str]:
  """`num` texts of `lines_per_text` true equations each ("17 + 305 = 322")."""
  rng = random.Random(seed)
  texts = []
  for _ in range(num):
    lines = []
    for _ in range(lines_per_text):
      if rng.random() < 0.5:
        a, b = rng.randint(0, 9999), rng.randint(0, 9999)
        lines.append(f"{a} + {b} = {a + b}")
      else:
        a, b = rng.randint(0, 999), rng.randint(0, 99)
        lines.append(f"{a} * {b} = {a * b}")
    texts.append("\n".join(lines))
  return texts


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.getLogger().setLevel(logging.INFO)
  out = Path(FLAGS.out)
  # Check where the result goes before minutes of sampling, not after.
  try:
    out.parent.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    print(f"error: cannot create the directory of --out={out}: {e}", file=sys.stderr)
    sys.exit(2)
  if out.is_dir() or not os.access(out.parent, os.W_OK):
    print(f"error: --out={out} is not a writable file path; pass a .jsonl path in a writable "
          "directory.", file=sys.stderr)
    sys.exit(2)
  if FLAGS.kind == "arithmetic":
    texts = arithmetic_texts(FLAGS.num, FLAGS.lines_per_text, FLAGS.seed)
    origin = f"arithmetic-seed{FLAGS.seed}"
  else:
    import alm  # pylint: disable=import-outside-toplevel
    try:
      model, tok = alm.load_model(FLAGS.model)
      texts = sample_texts(model, tok, num=FLAGS.num, max_new_tokens=FLAGS.max_new_tokens,
                           batch_size=FLAGS.batch_size, temperature=FLAGS.temperature,
                           min_chars=FLAGS.min_chars, seed=FLAGS.seed)
    except (ValueError, FileNotFoundError) as e:
      # Bad input: the message names the problem and the fix; a traceback adds nothing.
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)
    origin = f"{FLAGS.model}-T{FLAGS.temperature:g}-seed{FLAGS.seed}"
  write_jsonl(out, texts, origin)
  print(f"wrote {len(texts)} texts ({sum(len(t.encode()) for t in texts)} bytes) to {out}",
        file=sys.stderr)


if __name__ == "__main__":
  app.run(main)
