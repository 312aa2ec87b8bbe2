"""Host-side training batches of a hypernetwork (SPEC §11): one sampled tokenizer per step.

Each step, documents are tokenized by the base tokenizer (the teacher side)
and by that step's sampled tokenizer (the student side), aligned and cut into
rows by the data pipeline's own `DocumentProcessor` (so the chunks are exactly
those of any other run), and the student side is re-indexed into a **local
vocabulary** of `vocab_rows` ids: the batch's own tokens, then random
negatives of the sampled tokenizer (the output softmax is over these rows, as
in ZeTT), padded. The hypernetwork predicts the embeddings of those rows only.

`hypernet_batch(...)` returns the pipeline's batch keys (`alm.data.pipeline`),
the student ids local, plus:
  student_vocab_ids      int32 [K]: the sampled tokenizer's id of each local row
  student_vocab_pieces   int32 [K, M]: base pieces of each row (0 pad)
  student_vocab_mask     bool  [K, M]
  student_vocab_predict  bool  [K]: predicted (else FVT's row: specials, bytes the
                         base lacks, padding rows, and with `copy_shared` the
                         tokens the base also has)
  student_vocab_valid    bool  [K]: a real row (padding rows get logit -inf)
  student_vocab_boundary bool  [K]: the row's token starts a pretoken (ALM)
  student_vocab_shared   bool  [K]: the row's token is also a base token (its FVT
                         row is the base's embedding: the lexical term's target)
and, as float32 [K, D] each, `student_vocab_fvt_in` / `student_vocab_fvt_out`
(FVT's rows, the heuristic and the fallback; `_out` only for untied bases).

**Piece buckets** (`bucket_rows`, docs/method.md §14): most tokens have one or
two pieces, so reading every row with all M piece slots wastes most of the
hypernetwork's work. With `bucket_rows` = (c_1, c_2, c_4, ..., c_M) (one
capacity per bucket of `alm.hypernet.hypernet.piece_buckets(M)`, summing to
K), the local vocabulary is laid out bucket by bucket: bucket b holds c_b rows
of tokens with at most m_b pieces, and its pieces are given with m_b slots
only, as `student_vocab_pieces_<m_b>` [c_b, m_b] / `student_vocab_mask_<m_b>`
(in place of `student_vocab_pieces` / `_mask`). The batch's own tokens go to
the smallest bucket that fits them (overflowing to larger ones: more slots
give the same prediction, the encoder being masked to the real pieces), and
each bucket's remaining rows are random negatives of its own piece counts, so
the shapes never change from step to step (one compilation).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from alm.data.pipeline import DocumentProcessor, PipelineConfig, _Skipped, _pad_id, pad_example
from alm.hypernet.hypernet import HypernetError, Pieces, piece_buckets
from alm.tokenization.vocab import shared_boundary_bytes


@dataclasses.dataclass(frozen=True)
class HypernetBatchConfig:
  """Shapes of a hypernetwork training batch.

  Attributes:
    batch_size: rows per step.
    teacher_len: base-tokenizer tokens per row.
    student_len: sampled-tokenizer tokens per row.
    vocab_rows: K, rows of the local vocabulary (the batch's tokens + negatives).
    bucket_rows: rows of each piece bucket (see the module docstring; they sum
      to `vocab_rows`), or () for one bucket of M slots.
  """

  batch_size: int = 8
  teacher_len: int = 128
  student_len: int = 128
  vocab_rows: int = 4096
  bucket_rows: tuple[int, ...] = ()

  def __post_init__(self):
    for name, low in (("batch_size", 1), ("teacher_len", 2), ("student_len", 2),
                      ("vocab_rows", 2)):
      if getattr(self, name) < low:
        raise ValueError(f"HypernetBatchConfig.{name} must be >= {low}, got "
                         f"{getattr(self, name)}.")
    if self.bucket_rows and (sum(self.bucket_rows) != self.vocab_rows
                             or min(self.bucket_rows) < 1):
      raise ValueError(f"HypernetBatchConfig.bucket_rows={self.bucket_rows} must be positive "
                       f"and sum to vocab_rows={self.vocab_rows} (see bucket_capacities).")


def piece_counts(pieces: Pieces) -> np.ndarray:
  """int [V_new]: the piece slots each new token needs (at least 1)."""
  return np.maximum(pieces.mask.sum(axis=1), 1)


def bucket_capacities(pieces: Pieces, vocab_rows: int, min_rows: int = 32) -> tuple[int, ...]:
  """`HypernetBatchConfig.bucket_rows` for K = `vocab_rows` rows: each bucket's share
  of a tokenizer's predicted tokens (`pieces`, e.g. a sampled tokenizer's), at
  least `min_rows` each, the first bucket taking the rest.

  Raises:
    HypernetError: K is too small for one bucket of `min_rows` rows each.
  """
  count = piece_counts(pieces)[_regular(pieces)]
  buckets = piece_buckets(pieces.mask.shape[1])
  share = [float(np.mean((count > lo) & (count <= hi))) if count.size else 0.0
           for lo, hi in buckets]
  caps = [max(min_rows, int(np.ceil(s * vocab_rows))) for s in share[1:]]
  first = vocab_rows - sum(caps)
  if first < min_rows:
    raise HypernetError(f"vocab_rows={vocab_rows} is too small to split into {len(buckets)} "
                        f"piece buckets of >= {min_rows} rows; raise vocab_rows or turn the "
                        "buckets off (--novocab_buckets).")
  return (first, *caps)


def hypernet_batch(docs: Sequence[dict[str, Any]], base_tok, sampled_tok, pieces: Pieces,
                   cfg: HypernetBatchConfig, rng: np.random.Generator | None = None, *,
                   full_vocab: bool = False) -> dict[str, np.ndarray]:
  """One training batch (see the module docstring).

  Args:
    docs: at least `cfg.batch_size` documents ({"text": ...}); the first that
      both tokenizers can spell are used, one row each (truncated).
    base_tok: the base model's tokenizer (teacher side).
    sampled_tok: this step's sampled tokenizer (student side).
    pieces: `new_vocab_pieces(base_tok, sampled_tok, ...)`.
    cfg: the shapes.
    rng: draws the negatives.
    full_vocab: the local vocabulary is the whole sampled tokenizer (local id =
      its id; `cfg.vocab_rows` is ignored): an exact softmax, for evaluation.

  Raises:
    HypernetError: too few usable documents, or the batch's own tokens need
      more than `vocab_rows` rows (raise it).
  """
  pcfg = PipelineConfig(batch_size=cfg.batch_size, teacher_len=cfg.teacher_len,
                        student_len=cfg.student_len, shuffle=False, num_epochs=1)
  proc = DocumentProcessor(base_tok, sampled_tok, pcfg)
  pad_ids = (_pad_id(base_tok), _pad_id(sampled_tok))
  rows = []
  for doc in docs:
    out = proc(doc)
    if isinstance(out, _Skipped) or not out:
      continue
    rows.append(pad_example(out[0], pcfg, pad_ids))
    if len(rows) == cfg.batch_size:
      break
  if len(rows) < cfg.batch_size:
    raise HypernetError(f"Only {len(rows)} of {len(docs)} documents are usable; a batch "
                        f"needs {cfg.batch_size}. Pass more documents per step.")
  batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
  mask = sampled_tok.boundary_token_mask(shared_boundary_bytes(base_tok, sampled_tok))
  if full_vocab:
    vocab = np.arange(sampled_tok.vocab_size, dtype=np.int32)
    return {**batch, **_vocab_arrays(vocab, np.ones(len(vocab), bool), pieces, mask)}
  ids = batch["student_ids"]
  used = np.unique(ids)  # includes the pad id
  k = cfg.vocab_rows
  if len(used) > k:
    raise HypernetError(f"The batch holds {len(used)} distinct tokens of the sampled "
                        f"tokenizer, more than vocab_rows={k}; raise vocab_rows (or use "
                        "smaller batches).")
  if cfg.bucket_rows:
    return _bucketed(batch, used, ids, pieces, cfg, rng, mask)
  pool = np.setdiff1d(np.flatnonzero(_regular(pieces)), used, assume_unique=False)
  n_neg = min(k - len(used), len(pool))
  negatives = np.sort(rng.choice(pool, n_neg, replace=False)) if n_neg else pool[:0]
  vocab = np.concatenate([used, negatives]).astype(np.int32)
  valid = np.ones(k, bool)
  if len(vocab) < k:  # pad with repeats of the last row, marked invalid
    valid[len(vocab):] = False
    vocab = np.concatenate([vocab, np.full(k - len(vocab), vocab[-1], np.int32)])
  local = np.searchsorted(used, ids).astype(np.int32)  # `used` is sorted, rows 0..len-1
  batch["student_ids"] = local
  return {**batch, **_vocab_arrays(vocab, valid, pieces, mask)}


def _bucketed(batch, used, ids, pieces: Pieces, cfg: HypernetBatchConfig, rng, boundary
              ) -> dict[str, np.ndarray]:
  """The local vocabulary laid out in piece buckets (see the module docstring)."""
  buckets = piece_buckets(pieces.mask.shape[1])
  if len(cfg.bucket_rows) != len(buckets):
    raise HypernetError(f"bucket_rows={cfg.bucket_rows} has {len(cfg.bucket_rows)} buckets; "
                        f"{pieces.mask.shape[1]} pieces make {len(buckets)} "
                        "(use bucket_capacities).")
  slots = np.array([hi for _, hi in buckets])
  need = np.searchsorted(slots, piece_counts(pieces))  # the smallest bucket that fits
  pool = np.setdiff1d(np.flatnonzero(_regular(pieces)), used, assume_unique=False)
  pool = pool[rng.permutation(len(pool))] if rng is not None else pool
  carry = used[:0]
  spare = pool[:0]  # negatives of smaller buckets not taken there (they fit here too)
  parts, valid = [], []
  for b, cap in enumerate(cfg.bucket_rows):
    mine = np.concatenate([carry, used[need[used] == b]])
    rows, carry = mine[:cap], mine[cap:]
    spare = np.concatenate([pool[need[pool] == b], spare])
    fill, spare = spare[:cap - len(rows)], spare[cap - len(rows):]
    rows = np.concatenate([rows, fill]).astype(np.int32)
    parts.append(np.concatenate([rows, np.full(cap - len(rows), used[0], np.int32)]))
    valid.append(np.arange(cap) < len(rows))
  if carry.size:
    raise HypernetError(f"The batch's own tokens overflow the piece buckets {cfg.bucket_rows} "
                        f"({carry.size} left over); raise vocab_rows or turn the buckets off "
                        "(--novocab_buckets).")
  vocab, valid = np.concatenate(parts), np.concatenate(valid)
  where = np.zeros(pieces.mask.shape[0], np.int32)
  real = np.flatnonzero(valid)
  where[vocab[real]] = real
  batch["student_ids"] = where[ids]
  out = {**batch, **_vocab_arrays(vocab, valid, pieces, boundary)}
  del out["student_vocab_pieces"], out["student_vocab_mask"]
  lo = 0
  for (_, m), cap in zip(buckets, cfg.bucket_rows):
    out[f"student_vocab_pieces_{m}"] = pieces.ids[vocab[lo:lo + cap], :m]
    msk = pieces.mask[vocab[lo:lo + cap], :m].copy()
    msk[~valid[lo:lo + cap]] = False
    msk[:, 0] = True  # padding and the few empty rows read one slot (their FVT row is kept)
    out[f"student_vocab_mask_{m}"] = msk
    lo += cap
  return out


def _regular(pieces: Pieces) -> np.ndarray:
  """bool [V_new]: the tokens a local vocabulary draws from (predicted or shared with
  the base: every token but the specials and the few the base cannot spell)."""
  return pieces.predicted if pieces.shared is None else pieces.predicted | pieces.shared


def _vocab_arrays(vocab: np.ndarray, valid: np.ndarray, pieces: Pieces, boundary
                  ) -> dict[str, np.ndarray]:
  out = {"student_vocab_ids": vocab,
         "student_vocab_pieces": pieces.ids[vocab],
         "student_vocab_mask": pieces.mask[vocab],
         "student_vocab_predict": pieces.predicted[vocab] & valid,
         "student_vocab_valid": valid,
         "student_vocab_boundary": np.asarray(boundary, bool)[vocab] & valid,
         "student_vocab_fvt_in": pieces.fvt_in[vocab]}
  if pieces.shared is not None:
    out["student_vocab_shared"] = pieces.shared[vocab] & valid
  if pieces.fvt_out is not None:
    out["student_vocab_fvt_out"] = pieces.fvt_out[vocab]
  return out
