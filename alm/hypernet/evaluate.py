"""Zero-shot tokenizer transfer, measured: hypernetwork vs FVT vs the original model.

For a base model, a hypernetwork and a set of tokenizers never sampled in its
training, on each held-out text set: the bits per byte of the original model
(its own tokenizer), of the base moved to each tokenizer with FVT embeddings,
and with the hypernetwork's — on the same rows (the data pipeline's, both
tokenizations covering the same bytes). The share of FVT's gap the
hypernetwork closes is `(fvt - hypernet) / (fvt - original)` (1: as good as
the original model; 0: no better than FVT; negative: worse).
"""

from __future__ import annotations

import functools
import time
from typing import Any

import numpy as np
from flax import nnx


@functools.cache
def _jitted_path_bits():
  from alm.training import step as step_lib  # pylint: disable=import-outside-toplevel
  return nnx.jit(step_lib.path_bits, static_argnames=("side",))


def _bits(model, batches, side: str) -> np.ndarray:
  f = _jitted_path_bits()  # one wrapper, so a shape compiles once across models and sets
  return np.sum([np.asarray(f(model, b, side=side), np.float64) for b in batches], axis=0)


# The real tokenizers a zero-shot table transfers to by default: one of them is
# usually the base's own, which `held_out_tokenizers` drops, leaving four.
DEFAULT_TOKENIZERS = ("qwen3", "llama3", "mistral-v3", "gemma3-270m", "smollm2-135m-instruct")


def same_tokenizer(a, b) -> bool:
  """Whether two tokenizers have the same vocabulary (ids, bytes, specials and their
  roles), as the toolkit's caches see it (`alm.training.students.hash_vocab`)."""
  import hashlib  # pylint: disable=import-outside-toplevel
  from alm.training.students import hash_vocab  # pylint: disable=import-outside-toplevel
  digests = []
  for tok in (a, b):
    h = hashlib.sha256()
    hash_vocab(h, tok)
    digests.append(h.digest())
  return digests[0] == digests[1]


def held_out_tokenizers(base_tok, tokenizers: dict[str, Any], *,
                        explicit: bool) -> dict[str, Any]:
  """`tokenizers` without the base model's own tokenizer.

  Zero-shot transfer to the base's own vocabulary is the original model, so a
  row for it measures nothing (and FVT leaves no gap to close). A default
  list drops it; a list the user gave that names it is refused.

  Raises:
    HypernetError: `explicit` and one of `tokenizers` is the base's own, or
      nothing is left.
  """
  from alm.hypernet.hypernet import HypernetError  # pylint: disable=import-outside-toplevel
  own = [label for label, tok in tokenizers.items() if same_tokenizer(tok, base_tok)]
  if own and explicit:
    raise HypernetError(f"{', '.join(own)} is the base model's own tokenizer: zero-shot transfer "
                        "to it is the original model, with no gap to measure. Drop it from "
                        "--tokenizers.")
  kept = {label: tok for label, tok in tokenizers.items() if label not in own}
  if not kept:
    raise HypernetError("No tokenizer to transfer to: pass --tokenizers with tokenizers other "
                        "than the base model's own.")
  return kept


def zero_shot_table(base, base_tok, hypernet, tokenizers: dict[str, Any],
                    sets: dict[str, Any], *, length: int = 128, n_batches: int = 4,
                    batch_size: int = 4) -> list[dict[str, Any]]:
  """One row per (held-out set, tokenizer): original / FVT / hypernetwork bits per byte.

  Args:
    base: the base `alm.Transformer`.
    base_tok: its tokenizer.
    hypernet: an `alm.hypernet.Hypernetwork` of this base.
    tokenizers: {label: tokenizer} to transfer to.
    sets: {label: `alm.data.sources` source} of held-out documents.
    length: tokens per row on each side.
    n_batches: batches per set (the first ones, in file order).
    batch_size: rows per batch.

  Returns:
    [{"set", "tokenizer", "vocab_size", "original_bpb", "fvt_bpb",
      "hypernet_bpb", "gap_closed", "bytes", "predict_s"}].
  """
  # pylint: disable=import-outside-toplevel
  import jax
  from alm.data.pipeline import Pipeline, PipelineConfig
  from alm.hypernet.fvt import fvt_transformer
  from alm.hypernet.hypernet import transfer
  from alm.training.trainer import take_batches
  rows = []
  for tok_label, tok in tokenizers.items():
    t0 = time.time()
    students = {"fvt": fvt_transformer(base, base_tok, tok),
                "hypernet": transfer(base, base_tok, tok, hypernet)}
    predict_s = time.time() - t0
    for set_label, src in sets.items():
      pipe = Pipeline(src, base_tok, tok, PipelineConfig(
          batch_size=batch_size, teacher_len=length, student_len=length, shuffle=False,
          num_epochs=1, seed=0))
      batches = [{k: jax.numpy.asarray(v) for k, v in b.items()}
                 for b in take_batches(pipe, n_batches)]
      pipe.close()
      t = _bits(base, batches, "teacher")
      row = {"set": set_label, "tokenizer": tok_label, "vocab_size": tok.vocab_size,
             "original_bpb": float(t[0] / max(t[1], 1.0)), "bytes": float(t[1]),
             "predict_s": round(predict_s, 1)}
      for name, m in students.items():
        s = _bits(m, batches, "student")
        row[f"{name}_bpb"] = float(s[0] / max(s[1], 1.0))
      gap = row["fvt_bpb"] - row["original_bpb"]
      row["gap_closed"] = (row["fvt_bpb"] - row["hypernet_bpb"]) / gap if gap > 0 else float("nan")
      rows.append(row)
  return rows


def format_table(rows: list[dict[str, Any]]) -> str:
  """The rows as a markdown table."""
  out = ["| held-out set | tokenizer | original | FVT | hypernetwork | FVT gap closed |",
         "|---|---|---|---|---|---|"]
  for r in rows:
    out.append(f"| {r['set']} | {r['tokenizer']} ({r['vocab_size']:,}) | "
               f"{r['original_bpb']:.3f} | {r['fvt_bpb']:.3f} | {r['hypernet_bpb']:.3f} | "
               f"{100 * r['gap_closed']:.1f} % |")
  return "\n".join(out)
