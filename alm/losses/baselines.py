"""Cross-tokenizer distillation baselines on the same interface as ALM.

  * SFT: next-token prediction on the student (`alm.losses.ntp`).
  * MinED: Wan et al. 2024, "Knowledge Fusion of Large Language Models"
    (FuseLLM): every student token is mapped to the teacher token of minimal
    edit distance; KL at one-to-one aligned positions.
  * ULD: Boizard et al. 2024, "Towards Cross-Tokenizer Distillation: the
    Universal Logit Distillation Loss for LLMs": L1 between sorted
    probability vectors, positions paired by index.

  * DSKD: Zhang et al. 2024, "Dual-Space Knowledge Distillation for Large
    Language Models", cross-model attention: `alm.losses.dskd` (re-exported
    here as `dskd_loss`, `DSKDSide`, `DSKDProjector`).

Each returns a `LossSum` of its distillation term; add NTP with
`alm.losses.ntp.combined_mean` as in the papers.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from rapidfuzz import process as rf_process
from rapidfuzz.distance import Levenshtein

from alm.losses import chunks as chunks_lib
from alm.losses.dskd import DSKDProjector, DSKDSide, dskd_loss  # noqa: F401
from alm.losses.ntp import next_token_loss
from alm.losses.reduce import LossSum

sft_loss = next_token_loss  # SFT = NTP on the student's own tokens.


def _frozen_rows(logits):
  """Row reader for the frozen teacher's [B, T, V] logits inside `lax.map`.

  The rows are read by index rather than mapped over: with float data as the
  map's input, XLA's CPU backend hoists a float32 convert of the whole
  [B, T, V] logits out of the loop (see `alm.losses.chunks._slice_block`).
  """
  logits = jax.lax.stop_gradient(logits)

  def row(i):
    x, i = jax.lax.optimization_barrier((logits, i))
    return jax.lax.dynamic_index_in_dim(x, i, axis=0, keepdims=False)

  return jnp.arange(logits.shape[0], dtype=jnp.int32), row


# ---------------------------------------------------------------------------
# ULD.
# ---------------------------------------------------------------------------


# `uld_loss`'s default `top_k`: probabilities sorted per side and position.
# Measured on SmolLM2-135M logits (V 49,152; students of 49,152 and 151,936
# ids, trained or untrained): loss within 5e-5 (relative) of the exact value,
# gradient cosine >= 0.99999 at every position; value+grad about 10x faster
# than the full sort on CPU at V 151,936 (benchmarks/bench_losses.py).
ULD_TOP_K = 4096


def _predicting_positions(ids, loss_mask):
  """Rows' predicting positions (t-1 of trained tokens t), compacted."""
  b, t = ids.shape
  keep = jnp.broadcast_to(jnp.arange(t)[None, :] > 0, (b, t))
  if loss_mask is not None:
    keep = keep & loss_mask.astype(bool)
  # Stable sort puts the kept positions first, in order.
  order = jnp.argsort(~keep, axis=1, stable=True).astype(jnp.int32)
  return order - 1, jnp.sum(keep, axis=1)


def uld_loss(teacher_logits: jax.Array, teacher_ids: jax.Array,
             teacher_loss_mask: jax.Array | None, student_logits: jax.Array,
             student_ids: jax.Array, student_loss_mask: jax.Array | None,
             *, top_k: int | None = ULD_TOP_K) -> LossSum:
  """Universal Logit Distillation (Boizard et al., 2024).

  For the k-th trained token of each side (positions paired by index, as in
  the paper), with the next-token distributions `p_T`, `p_S` that predict it:
  `sum_i |sort(p_T)_i - sort(p_S)_i|` (both sorted descending, the smaller
  vocabulary padded with zeros). Rows are processed one at a time so the
  sorted [T, V] float32 probabilities exist for one row only.

  With `top_k=K` only the K largest probabilities of each side are sorted
  (`jax.lax.top_k`, far cheaper than a full sort of a large vocabulary) and
  the rest, each side's tail mass `r = 1 - sum of its top K`, enters as
  `|r_T - r_S|`: a lower bound of the tail's exact L1, which lies in
  `[|r_T - r_S|, r_T + r_S]`. Each position's value is therefore at most
  `2 * min(r_T, r_S)` below the exact one (and exact when K covers both
  vocabularies). The gradient is the exact one on the top K entries' sorted
  differences; the tail entries all get the sign of `r_S - r_T` instead of
  their own.

  Args:
    teacher_logits: [B, T_T, V_T]; gradients are stopped.
    teacher_ids: int [B, T_T].
    teacher_loss_mask: optional bool [B, T_T].
    student_logits: [B, T_S, V_S].
    student_ids: int [B, T_S].
    student_loss_mask: optional bool [B, T_S].
    top_k: number of largest probabilities sorted per side; None sorts the
      whole vocabularies (exact).

  Returns:
    `LossSum` over the paired positions.

  Raises:
    ValueError: if `top_k` is not None and < 1.
  """
  if top_k is not None and top_k < 1:
    raise ValueError(f"uld_loss: top_k must be None or >= 1, got {top_k}")
  pt, nt = _predicting_positions(teacher_ids, teacher_loss_mask)
  ps, ns = _predicting_positions(student_ids, student_loss_mask)
  k = min(pt.shape[1], ps.shape[1])
  n = jnp.minimum(nt, ns)  # [B]
  vt, vs = teacher_logits.shape[-1], student_logits.shape[-1]
  width = max(vt, vs) if top_k is None else min(top_k, max(vt, vs))
  rows, teacher_row = _frozen_rows(teacher_logits)

  def sorted_head(logits, pos, v):
    """[k, width] largest probabilities, descending, and [k] the rest's mass."""
    p = jax.nn.softmax(jnp.take(logits, jnp.maximum(pos[:k], 0), axis=0)
                       .astype(jnp.float32), axis=-1)
    if width >= v:  # the whole vocabulary: exact
      p, tail = -jnp.sort(-p, axis=-1), jnp.zeros(p.shape[:-1], p.dtype)
    else:
      p = jax.lax.top_k(p, width)[0]
      tail = 1.0 - jnp.sum(p, axis=-1)
    return jnp.pad(p, ((0, 0), (0, width - p.shape[-1]))), tail

  def row(args):
    i, ls, rpt, rps, rn = args
    ht, rt = sorted_head(teacher_row(i), rpt, vt)
    hs, rs = sorted_head(ls, rps, vs)
    d = jnp.sum(jnp.abs(ht - hs), axis=-1) + jnp.abs(rt - rs)
    return jnp.sum(jnp.where(jnp.arange(k) < rn, d, 0.0))

  # Rematerialised: otherwise the map's VJP keeps every row's float32
  # [T, V] intermediates, i.e. [B, T, V] float32 residuals.
  totals = jax.lax.map(jax.checkpoint(row),
                       (rows, student_logits, pt, ps, n))
  return LossSum(total=jnp.sum(totals), count=jnp.sum(n).astype(jnp.float32))


# ---------------------------------------------------------------------------
# MinED.
# ---------------------------------------------------------------------------


# Rows of the distance matrix computed at once: at most this many bytes of
# int32 distances per chunk of student tokens.
_MINED_CHUNK_BYTES = 256 << 20


def mined_vocab_map(student_tokens: list[bytes], teacher_tokens: list[bytes]
                    ) -> np.ndarray:
  """Maps every student token to the teacher token of minimal edit distance.

  Byte-level Levenshtein distance (unit insertion, deletion, substitution);
  ties go to the smallest teacher id; exact. Two stages:
    1. an identical teacher token (distance 0): a dictionary look-up;
    2. every other student token: its distance to every teacher token with
       `rapidfuzz.process.cdist` (bit-parallel Levenshtein on the raw bytes,
       all CPU cores), in chunks of student tokens that bound the int32
       distance matrix to `_MINED_CHUNK_BYTES`; `argmin` over a row returns
       its first minimum, i.e. the smallest teacher id among the ties.

  Args:
    student_tokens: bytes of each student id (`tokenizer.token_bytes`).
    teacher_tokens: bytes of each teacher id.

  Returns:
    int32 [V_S] teacher id per student id.

  Raises:
    ValueError: if `teacher_tokens` is empty.
  """
  if not teacher_tokens:
    raise ValueError("mined_vocab_map needs at least one teacher token")
  teacher = [bytes(t) for t in teacher_tokens]
  exact: dict[bytes, int] = {}
  for i, tok in enumerate(teacher):
    exact.setdefault(tok, i)
  out = np.zeros(len(student_tokens), np.int32)
  rest = []
  for sid, tok in enumerate(student_tokens):
    j = exact.get(bytes(tok))
    if j is None:
      rest.append(sid)
    else:
      out[sid] = j
  rows = max(1, _MINED_CHUNK_BYTES // (4 * len(teacher)))
  for lo in range(0, len(rest), rows):
    sids = rest[lo:lo + rows]
    d = rf_process.cdist([bytes(student_tokens[s]) for s in sids], teacher,
                         scorer=Levenshtein.distance, dtype=np.int32,
                         workers=-1)
    out[sids] = np.argmin(d, axis=1)  # first minimum = smallest teacher id
  return out


def _fingerprint(student_tokens, teacher_tokens) -> str:
  h = hashlib.sha256()
  for toks in (student_tokens, teacher_tokens):
    h.update(len(toks).to_bytes(8, "little"))
    for t in toks:
      h.update(len(t).to_bytes(4, "little") + t)
  return h.hexdigest()


def load_or_compute_mined_map(path: str | Path, student_tokens: list[bytes],
                              teacher_tokens: list[bytes]) -> np.ndarray:
  """The MinED map of a tokenizer pair, computed once and saved to `path`.

  The file (.npz) stores a fingerprint of both vocabularies; a file made for
  another pair is recomputed rather than silently reused.

  Args:
    path: .npz file to read or write.
    student_tokens, teacher_tokens: bytes of every id.

  Returns:
    int32 [V_S] teacher id per student id.
  """
  path = Path(path)
  fp = _fingerprint(student_tokens, teacher_tokens)
  if path.exists():
    with np.load(path) as f:
      if str(f["fingerprint"]) == fp:
        return f["map"]
  m = mined_vocab_map(student_tokens, teacher_tokens)
  path.parent.mkdir(parents=True, exist_ok=True)
  np.savez(path, map=m, fingerprint=np.array(fp))
  return m


def mined_loss(teacher_logits: jax.Array, teacher_ids: jax.Array,
               teacher_chunk_ids: jax.Array, student_logits: jax.Array,
               student_ids: jax.Array, student_chunk_ids: jax.Array,
               vocab_map: jax.Array, *, teacher_loss_mask=None,
               student_loss_mask=None) -> LossSum:
  """MinED distillation (Wan et al., 2024, FuseLLM).

  At every one-to-one aligned token pair (a chunk made of exactly one token
  on each side, predicted and trained), the teacher's next-token distribution
  is carried to the student vocabulary through the MinED map,
  `q(v) = p_T(map[v]) / sum_u p_T(map[u])`, and `KL(q || p_S)` is summed.

  Args:
    teacher_logits: [B, T_T, V_T]; gradients are stopped.
    teacher_ids, teacher_chunk_ids: int [B, T_T].
    student_logits: [B, T_S, V_S].
    student_ids, student_chunk_ids: int [B, T_S].
    vocab_map: int [V_S] from `mined_vocab_map`.
    teacher_loss_mask, student_loss_mask: optional bool masks.

  Returns:
    `LossSum` over the one-to-one positions.
  """
  c = min(teacher_ids.shape[1], student_ids.shape[1])
  sides = []
  for ids, cids, lm in ((teacher_ids, teacher_chunk_ids, teacher_loss_mask),
                        (student_ids, student_chunk_ids, student_loss_mask)):
    ones = chunks_lib.TokenLogProbs(path=jnp.ones(ids.shape, jnp.float32),
                                    boundary=None)
    sides.append(chunks_lib.chunk_logprobs(ones, cids, c, lm))
  ct, cs = sides
  one = ct.valid & cs.valid & (ct.path == 1) & (cs.path == 1)  # [B, C]
  pt, ps = jnp.maximum(ct.last - 1, 0), jnp.maximum(cs.last - 1, 0)
  rows, teacher_row = _frozen_rows(teacher_logits)

  def row(args):
    i, ls, rpt, rps, rone = args
    lt = teacher_row(i)
    q = jax.nn.log_softmax(
        jnp.take(jnp.take(lt, rpt, axis=0), vocab_map, axis=-1)
        .astype(jnp.float32), axis=-1)  # [C, V_S]
    logp = jax.nn.log_softmax(jnp.take(ls, rps, axis=0).astype(jnp.float32),
                              axis=-1)
    kl = jnp.sum(jnp.exp(q) * (q - logp), axis=-1)
    return jnp.sum(jnp.where(rone, kl, 0.0))

  # Rematerialised: otherwise the map's VJP keeps every row's float32
  # [T, V] intermediates, i.e. [B, T, V] float32 residuals.
  totals = jax.lax.map(jax.checkpoint(row),
                       (rows, student_logits, pt, ps, one))
  return LossSum(total=jnp.sum(totals), count=jnp.sum(one).astype(jnp.float32))
