"""Training a hypernetwork with ALM (SPEC §11): the data, the evaluation, the run.

  run_hypernet(HypernetJob(model="smollm2-135m-instruct"), TrainConfig.build(...),
               RunOptions(out_dir="runs/hn"))

Every step samples a tokenizer from the texts of the last `sample_docs`
documents (`alm.hypernet.sampler`, seeded by the run's seed and the step),
builds the batch's rows with it (`alm.hypernet.batches`: base tokenizer vs
sampled tokenizer, the sampled side in a local vocabulary of the batch's
tokens + negatives) and trains the hypernetwork by the run's objective (ALM
by default) against the frozen base with its own tokenizer, through the
engine (`HypernetKind`). Batches depend only on (seed, step), so a run resumes
exactly from any checkpoint.

Evaluation, at the start, every `eval_every` steps and at the end: bits per
byte on held-out rows of (a) a fixed sampled tokenizer (`HELDOUT_SEED`, never
a training seed), with the whole vocabulary predicted (an exact softmax), as the
main held-out set, and (b) each of `eval_tokenizers` (real tokenizers never
sampled: zero-shot), the whole vocabulary predicted by `transfer` —
`student_bpb@<tokenizer>` against the base's `teacher_bpb@<tokenizer>` on the
same text.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import jax
import numpy as np
from flax import nnx

from alm.hypernet.batches import HypernetBatchConfig, bucket_capacities, hypernet_batch
from alm.hypernet.hypernet import (HypernetConfig, HypernetError, Hypernetwork, base_tables,
                                   new_vocab_pieces, num_params, piece_buckets, transfer)
from alm.hypernet.sampler import SamplerConfig, sample_tokenizer

# The seed of the held-out sampled tokenizer; training uses seed * 1_000_003 + step.
HELDOUT_SEED = 2**31 - 1


@dataclasses.dataclass(frozen=True)
class HypernetJob:
  """What to train a hypernetwork for, on which data.

  Attributes:
    model: the base model (asset name, HF directory, .gguf).
    data: training documents (`open_source` spec).
    heldout_data: held-out documents.
    hypernet: the hypernetwork's sizes.
    sampler: the tokenizer sampler's options.
    vocab_rows: K, rows of each batch's local vocabulary (tokens + negatives).
    vocab_buckets: lay the K rows out in piece buckets (`alm.hypernet.batches`;
      capacities from the held-out sampled tokenizer's piece counts): each row
      read with only the piece slots its bucket needs.
    sample_docs: documents whose substrings make each step's tokenizer (the
      step's own and the ones before it).
    eval_tokenizers: real tokenizers scored zero-shot at each evaluation.
    eval_batches: held-out batches (of 4 rows) per evaluated tokenizer.
    export_dir: where the trained hypernetwork is written ("" : nowhere).
  """

  model: str = "smollm2-135m-instruct"
  data: str = "default"
  heldout_data: str = "default:heldout"
  hypernet: HypernetConfig = HypernetConfig()
  sampler: SamplerConfig = SamplerConfig()
  vocab_rows: int = 4096
  vocab_buckets: bool = True
  sample_docs: int = 64
  eval_tokenizers: tuple[str, ...] = ("qwen3",)
  eval_batches: int = 2
  export_dir: str = ""


class HypernetBatches:
  """The training batches of a hypernetwork run (the `Pipeline` interface).

  Step k reads documents k·B .. k·B + B - 1 of a seeded permutation of the
  source (more if some cannot be spelled), samples its tokenizer from the
  `sample_docs` documents ending there (wrapping around to the permutation's
  end in the first steps), and builds the batch.
  """

  def __init__(self, source, base, base_tok, cfg: HypernetBatchConfig, job: HypernetJob,
               seed: int):
    self.source, self.base_tok, self.cfg, self.job, self.seed = source, base_tok, cfg, job, seed
    self.tables = base_tables(base)
    self.order = np.random.default_rng(seed).permutation(len(source))
    self.step = 0
    self.host_s = 0.0  # host time spent making batches (sampling, decomposing, aligning)

  def _docs(self, lo: int, n: int) -> list[dict]:
    return [self.source[int(self.order[i % len(self.order)])] for i in range(lo, lo + n)]

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    t0 = time.time()
    b, k = self.cfg.batch_size, self.step
    lo = k * b
    # The window wraps around the permutation, so the first steps' tokenizers are built
    # from as many documents as the later ones (all of them training documents).
    n = min(self.job.sample_docs, len(self.order))
    texts = [d.get("text", "") for d in self._docs(lo + b - n, n)]
    tok = sample_tokenizer(self.base_tok, texts, seed=self.seed * 1_000_003 + k,
                           cfg=self.job.sampler, name=f"sampled-{k}")
    # Logged for the first step only (every step's tokenizer is decomposed alike).
    pieces = new_vocab_pieces(self.base_tok, tok, *self.tables, self.job.hypernet.max_pieces,
                              copy_shared=self.job.hypernet.copy_shared, log=k == 0)
    batch = hypernet_batch(self._docs(lo, 4 * b), self.base_tok, tok, pieces, self.cfg,
                           np.random.default_rng((self.seed, k)))
    self.step += 1
    self.host_s += time.time() - t0
    return batch

  def state(self) -> dict[str, Any]:
    return {"hypernet_step": self.step}

  def restore(self, state: dict[str, Any]) -> None:
    self.step = int(state["hypernet_step"])

  def close(self) -> None:
    pass


def eval_hook(base, base_tok, tokenizers: dict[str, Any], heldout_src, *, teacher_len: int,
              student_len: int, n_batches: int):
  """The trainer's `eval_hook`: zero-shot bits per byte of each tokenizer (see the module doc)."""
  # pylint: disable=import-outside-toplevel
  from alm.data.pipeline import Pipeline, PipelineConfig
  from alm.training import step as step_lib
  from alm.training.trainer import take_batches
  batches = {}
  for label, tok in tokenizers.items():
    pipe = Pipeline(heldout_src, base_tok, tok, PipelineConfig(
        batch_size=4, teacher_len=teacher_len, student_len=student_len, shuffle=False,
        num_epochs=1, seed=0))
    batches[label] = [{k: jax.numpy.asarray(v) for k, v in b.items()}
                      for b in take_batches(pipe, n_batches)]
  bits = nnx.jit(step_lib.path_bits, static_argnames=("side",))
  teacher = {label: np.sum([np.asarray(bits(base, b, side="teacher"), np.float64)
                            for b in bs], axis=0) for label, bs in batches.items()}

  def hook(model) -> dict[str, dict[str, float]]:
    hn = model.student.hypernet
    out = {}
    for label, tok in tokenizers.items():
      student = transfer(base, base_tok, tok, hn)
      s = np.sum([np.asarray(bits(student, b, side="student"), np.float64)
                  for b in batches[label]], axis=0)
      t = teacher[label]
      out[label] = {"teacher_bpb": float(t[0] / max(t[1], 1.0)),
                    "student_bpb": float(s[0] / max(s[1], 1.0))}
    return out

  return hook


def run_hypernet(job: HypernetJob, cfg, opts, *, command: str | None = None) -> dict[str, Any]:
  """Trains a hypernetwork (see the module docstring); returns the run's summary."""
  # pylint: disable=import-outside-toplevel
  from alm.data.sources import open_source
  from alm.hypernet.student import HypernetKind, save_hypernet
  from alm.models.loading import load_model
  from alm.tokenization.loading import load_tokenizer
  from alm.training.students import build_model
  from alm.training.terms import objective_terms
  from alm.training.trainer import Trainer
  if job.hypernet.copy_shared and any(t.name == "lexical"
                                      for t, _ in objective_terms(cfg.objective)):
    raise HypernetError("The lexical term pulls predicted embeddings of shared tokens back to "
                        "the base's, but with copy_shared no shared token is predicted, so "
                        "the term is always 0; use one of the two (drop lexical from "
                        "add_terms, or --nocopy_shared).")
  t0 = time.time()
  # Labelled by name (a path by its last component): student_bpb@qwen3.
  eval_toks = {name.rstrip("/").split("/")[-1]: load_tokenizer(name)
               for name in job.eval_tokenizers}
  base, base_tok = load_model(job.model)
  hn = Hypernetwork.for_model(base, base_tok, job.hypernet, name=job.model,
                              rngs=nnx.Rngs(cfg.seed))
  logging.info("Hypernetwork for %s: %d parameters", job.model, num_params(hn))
  shapes = cfg.shapes
  # The main held-out set: a fixed sampled tokenizer (never a training seed), whole vocabulary.
  held_src = open_source(job.heldout_data)
  held_docs = [held_src[i] for i in range(min(len(held_src), 64))]
  fixed = sample_tokenizer(base_tok, [d["text"] for d in held_docs], seed=HELDOUT_SEED,
                           cfg=job.sampler, name="sampled-heldout")
  pieces = new_vocab_pieces(base_tok, fixed, *base_tables(base), job.hypernet.max_pieces,
                            copy_shared=job.hypernet.copy_shared)
  buckets = bucket_capacities(pieces, job.vocab_rows) if job.vocab_buckets else ()
  if buckets:
    logging.info("Local vocabulary of %d rows in piece buckets of %s slots: %s rows",
                 job.vocab_rows, [m for _, m in piece_buckets(job.hypernet.max_pieces)],
                 list(buckets))
  bcfg = HypernetBatchConfig(batch_size=shapes.batch_size, teacher_len=shapes.teacher_len,
                             student_len=shapes.student_len, vocab_rows=job.vocab_rows,
                             bucket_rows=buckets)
  model = build_model(HypernetKind(hn), base, base_tok, base_tok, cfg)
  train = HypernetBatches(open_source(job.data), base, base_tok, bcfg, job, cfg.seed)
  ecfg = dataclasses.replace(bcfg, batch_size=4, bucket_rows=())
  heldout = [hypernet_batch(held_docs[i * 8:(i + 1) * 8], base_tok, fixed, pieces, ecfg,
                            full_vocab=True) for i in range(job.eval_batches)]
  hook = eval_hook(base, base_tok, eval_toks, held_src, teacher_len=shapes.teacher_len,
                   student_len=shapes.student_len, n_batches=job.eval_batches)
  extra = {"model": job.model, "data": job.data,
           "heldout": ", ".join(["a held-out sampled tokenizer", *job.eval_tokenizers]),
           "hypernet_params": num_params(hn)}
  if command:
    extra["command"] = command
  trainer = Trainer(model, base_tok, base_tok, cfg, train, heldout, opts,
                    fingerprint_extra={"model": job.model, "data": job.data,
                                       "hypernet": dataclasses.asdict(job.hypernet),
                                       "sampler": dataclasses.asdict(job.sampler),
                                       "vocab_rows": job.vocab_rows,
                                       "vocab_buckets": list(buckets),
                                       "sample_docs": job.sample_docs},
                    summary_extra=extra, title="Hypernetwork", eval_hook=hook)
  summary = trainer.fit()
  summary["host_batch_s_per_step"] = train.host_s / max(train.step, 1)
  if job.export_dir and "stopped_at" not in summary:
    save_hypernet(trainer.model().student.hypernet, job.export_dir)
    summary["export_dir"] = job.export_dir
  summary["total_wall_s"] = time.time() - t0
  return summary
