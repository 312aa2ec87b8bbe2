"""Texts sampled from the teacher: a held-out set that measures "behaves like the teacher".

In-domain held-out bits per byte rewards adapting to the training domain (an
SFT student can beat its own teacher there), which is not what tokenizer
transfer asks for. On texts sampled from the teacher itself (ancestral
sampling, temperature 1, from BOS),

  bpb(student) - bpb(teacher)  ~=  KL(teacher || student) per byte,

the sequence-level divergence of the student from the teacher (up to texts the
teacher generated through a non-canonical tokenization): zero only for a
student that gives every text the teacher's probability, whatever the
training domain. No student can do better than the teacher there in
expectation.

`teacher_samples_file` samples once and caches the JSONL under
`alm.assets.cache_dir()/heldout/`, keyed by the model and sampling settings.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Iterable

import numpy as np

# Bump when the sampling changes, so stale cached sets are not reused.
SAMPLES_VERSION = 1


def cut_at_special(ids: Iterable[int], special_ids) -> list[int]:
  """The ids before the first special token (EOS, chat marker): the sampled text."""
  out = []
  for i in ids:
    if int(i) in special_ids:
      break
    out.append(int(i))
  return out


def sample_texts(model, tokenizer, *, num: int, max_new_tokens: int, batch_size: int = 16,
                 temperature: float = 1.0, min_chars: int = 64, seed: int = 0,
                 log_progress: bool = True) -> list[str]:
  """`num` texts sampled from `model`, each from BOS and cut at its first special token.

  Args:
    model: an `alm.Transformer`.
    tokenizer: its tokenizer (needs a BOS or an EOS id to start from).
    num: texts to return.
    max_new_tokens: tokens sampled per text.
    batch_size: texts sampled at once.
    temperature: 1 samples the model's own distribution.
    min_chars: texts shorter than this (after stripping) are dropped and
      sampled again.
    seed: sampling seed.
    log_progress: log after every batch.

  Returns:
    The texts, deterministic for a given model, settings and seed.

  Raises:
    ValueError: no BOS/EOS to start from, or too few texts reach `min_chars`.
  """
  from alm.models.generate import SamplingConfig, generate  # pylint: disable=import-outside-toplevel

  start = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
  if start is None:
    raise ValueError("The tokenizer has neither BOS nor EOS to start sampling from.")
  texts: list[str] = []
  t0, rounds = time.perf_counter(), 0
  max_rounds = 4 * (num // batch_size + 1)
  while len(texts) < num:
    if rounds >= max_rounds:
      raise ValueError(f"Only {len(texts)} of {num} sampled texts reached min_chars={min_chars} "
                       f"characters after {rounds} batches; lower min_chars or raise "
                       "max_new_tokens.")
    out = generate(model, np.full((batch_size, 1), start, np.int32),
                   max_new_tokens=max_new_tokens, sampling=SamplingConfig(temperature),
                   seed=seed * 1_000_003 + rounds, eos_id=tokenizer.eos_id)
    rounds += 1
    for r in range(batch_size):
      ids = cut_at_special(out.tokens[r, :int(out.lengths[r])], tokenizer.special_ids)
      text = tokenizer.decode(ids)
      if len(text.strip()) >= min_chars and len(texts) < num:
        texts.append(text)
    if log_progress:
      logging.info("Sampled %d/%d teacher texts (%.0fs)", len(texts), num,
                   time.perf_counter() - t0)
  return texts


def write_jsonl(path: str | Path, texts: list[str], origin: str) -> Path:
  """Writes `{"text", "origin"}` lines atomically (a crash leaves no partial file)."""
  path = Path(path)
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
  return path


def teacher_samples_file(model_name: str, model, tokenizer, *, num: int, max_new_tokens: int,
                         seed: int = 0, temperature: float = 1.0,
                         cache_dir: str | Path | None = None) -> Path:
  """Samples `num` texts from the teacher once; later calls read the cached JSONL.

  Args:
    model_name: how the teacher was named (asset, directory or file); part of
      the cache key together with the settings below.
    model: the loaded teacher.
    tokenizer: its tokenizer.
    num: texts.
    max_new_tokens: tokens sampled per text.
    seed: sampling seed.
    temperature: sampling temperature (1: the teacher's own distribution).
    cache_dir: default `alm.assets.cache_dir()/heldout`.

  Returns:
    The JSONL path (a valid `--heldout_data` / `--extra_heldout` spec).
  """
  if cache_dir is None:
    from alm import assets  # pylint: disable=import-outside-toplevel
    cache_dir = assets.cache_dir() / "heldout"
  # A local model that changes on disk (its mtime) gets a new sample set.
  mtime = os.stat(model_name).st_mtime_ns if os.path.exists(model_name) else None
  key = json.dumps([SAMPLES_VERSION, str(model_name), mtime, tokenizer.vocab_size,
                    model.cfg.vocab_size, num, max_new_tokens, seed, temperature])
  digest = hashlib.sha256(key.encode()).hexdigest()[:16]
  stem = Path(str(model_name)).name.replace(".", "_") or "model"
  path = Path(cache_dir) / f"teacher-samples-{stem}-{digest}.jsonl"
  if path.exists():
    return path
  texts = sample_texts(model, tokenizer, num=num, max_new_tokens=max_new_tokens, seed=seed,
                       temperature=temperature)
  return write_jsonl(path, texts, f"{model_name}-T{temperature:g}-seed{seed}")
