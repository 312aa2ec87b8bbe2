r"""Loads a model, continues a prompt, and scores real held-out text in bits per byte.

  python -m experiments.generate --model=smollm2-135m-instruct \
      --prompt="The capital of France is" --max_new_tokens=16

The held-out text is the docstrings of a few Python standard-library modules
(present on every machine); the same words shuffled are scored as a control:
a working model gives them a far higher bits-per-byte.
"""

from __future__ import annotations

import inspect
import random
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "smollm2-135m-instruct",
                    "Asset name (see `python -m alm.assets`), HF directory or .gguf file.")
flags.DEFINE_string("prompt", "The capital of France is", "Prompt to continue.")
flags.DEFINE_integer("max_new_tokens", 16, "Tokens to generate.", lower_bound=1)
flags.DEFINE_float("temperature", 0.0, "0 = greedy.", lower_bound=0.0)
flags.DEFINE_integer("top_k", None, "Sample among the k most likely tokens.", lower_bound=1)
flags.DEFINE_float("top_p", None, "Nucleus sampling threshold in (0, 1].")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.DEFINE_integer("max_tokens", 256, "Tokens scored per held-out text.", lower_bound=8)

HELDOUT_MODULES = ("json", "csv", "argparse", "logging")


def heldout_texts() -> list[str]:
  """Real English prose that ships with Python: a few module docstrings."""
  import importlib  # pylint: disable=import-outside-toplevel
  return [inspect.getdoc(importlib.import_module(m)) for m in HELDOUT_MODULES]


def shuffled(text: str, seed: int = 0) -> str:
  words = text.split()
  random.Random(seed).shuffle(words)
  return " ".join(words)


def main(argv):
  del argv
  import numpy as np  # pylint: disable=import-outside-toplevel

  import alm  # pylint: disable=import-outside-toplevel
  from alm.eval.bpb import bits_per_byte  # pylint: disable=import-outside-toplevel
  from alm.models.generate import SamplingConfig, generate  # pylint: disable=import-outside-toplevel

  t0 = time.perf_counter()
  model, tok = alm.load_model(FLAGS.model)
  print(f"loaded {FLAGS.model}: {model.cfg.family}, {model.cfg.num_layers} layers, "
        f"vocab {tok.vocab_size}, in {time.perf_counter() - t0:.1f}s")

  enc = tok.encode(FLAGS.prompt)
  t0 = time.perf_counter()
  out = generate(model, enc.ids[None], max_new_tokens=FLAGS.max_new_tokens,
                 sampling=SamplingConfig(FLAGS.temperature, FLAGS.top_k, FLAGS.top_p),
                 seed=FLAGS.seed, eos_id=tok.eos_id)
  n = int(out.lengths[0])
  print(f"\n{FLAGS.prompt!r} -> {tok.decode(out.tokens[0, :n])!r}"
        f"   ({n} tokens in {time.perf_counter() - t0:.1f}s)\n")

  texts = heldout_texts()
  real = bits_per_byte(model, tok, texts, max_tokens=FLAGS.max_tokens)
  shuf = bits_per_byte(model, tok, [shuffled(t) for t in texts], max_tokens=FLAGS.max_tokens)
  print(f"held-out text ({', '.join(HELDOUT_MODULES)} docstrings, {real.bytes} bytes):")
  print(f"  bits/byte  real {real.bpb:.3f}   same words shuffled {shuf.bpb:.3f}")
  print(f"  perplexity real {np.exp(real.bits_per_token * np.log(2)):.2f}   "
        f"shuffled {np.exp(shuf.bits_per_token * np.log(2)):.2f}")


if __name__ == "__main__":
  app.run(main)
