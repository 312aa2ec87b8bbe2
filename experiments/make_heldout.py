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

  python -m experiments.make_heldout --kind=teacher_samples --out=heldout/teacher.jsonl
  python -m experiments.make_heldout --kind=arithmetic --out=heldout/arith.jsonl
  python -m experiments.transfer_tokenizer \
      --extra_heldout=teacher=heldout/teacher.jsonl --extra_heldout=arith=heldout/arith.jsonl

Output: JSONL, one `{"text": ..., "origin": ...}` per line, written atomically.
"""

from __future__ import annotations

import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

from absl import app, flags

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


def cut_at_special(ids, special_ids) -> list[int]:
  """The ids before the first special token (EOS, chat marker): the sampled text."""
  out = []
  for i in ids:
    if int(i) in special_ids:
      break
    out.append(int(i))
  return out


def teacher_samples(model, tok, num: int, max_new_tokens: int, batch_size: int,
                    temperature: float, min_chars: int, seed: int) -> list[str]:
  """`num` texts sampled from `model` from BOS (each cut at its first special token)."""
  import numpy as np  # pylint: disable=import-outside-toplevel

  from alm.models.generate import SamplingConfig, generate  # pylint: disable=import-outside-toplevel

  start = tok.bos_id if tok.bos_id is not None else tok.eos_id
  if start is None:
    raise ValueError("The tokenizer has neither BOS nor EOS to start sampling from.")
  texts: list[str] = []
  t0, rounds = time.perf_counter(), 0
  while len(texts) < num:
    if rounds >= 4 * (num // batch_size + 1):
      raise ValueError(f"Only {len(texts)} of {num} samples reached {min_chars} characters "
                       f"after {rounds} rounds; lower --min_chars or raise --max_new_tokens.")
    out = generate(model, np.full((batch_size, 1), start, np.int32),
                   max_new_tokens=max_new_tokens, sampling=SamplingConfig(temperature),
                   seed=seed * 1_000_003 + rounds, eos_id=tok.eos_id)
    rounds += 1
    for r in range(batch_size):
      text = tok.decode(cut_at_special(out.tokens[r, :int(out.lengths[r])], tok.special_ids))
      if len(text.strip()) >= min_chars and len(texts) < num:
        texts.append(text)
    print(f"sampled {len(texts)}/{num} texts ({time.perf_counter() - t0:.0f}s)", flush=True)
  return texts


def write_jsonl(path: Path, texts: list[str], origin: str) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
  try:
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      for i, t in enumerate(texts):
        f.write(json.dumps({"text": t, "origin": f"{origin}:{i}"}, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
  except BaseException:
    Path(tmp).unlink(missing_ok=True)
    raise


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  out = Path(FLAGS.out)
  if FLAGS.kind == "arithmetic":
    texts = arithmetic_texts(FLAGS.num, FLAGS.lines_per_text, FLAGS.seed)
    origin = f"arithmetic-seed{FLAGS.seed}"
  else:
    import alm  # pylint: disable=import-outside-toplevel
    try:
      model, tok = alm.load_model(FLAGS.model)
      texts = teacher_samples(model, tok, FLAGS.num, FLAGS.max_new_tokens, FLAGS.batch_size,
                              FLAGS.temperature, FLAGS.min_chars, FLAGS.seed)
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
