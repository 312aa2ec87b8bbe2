"""Chunk alignment of a whole batch at once, vectorised over the batch.

Same result as calling `alm.align` on every pair (tested), but the per-pair
numpy call overhead is paid once per batch: the rows are concatenated, each
row's byte offsets shifted by `row * K` (K > every text length, so the
offsets of all rows form one sorted array), and the common boundaries, chunk
ids, constraints and dropping rules are computed for all rows together.
Only the pairing of special tokens at a byte position whose two sides have
different kinds of specials (e.g. a BOS on one side only) runs a tiny Python
longest-common-subsequence, per such position.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from alm.tokenization import alignment as _al
from alm.tokenization.base import Encoding


class _Side:
  """One side (teacher or student) of the batch, concatenated."""

  def __init__(self, encs: Sequence[Encoding], k: int, it: type, tokenizer, name: str):
    # `it`: int32 unless the shifted offsets need int64 (halves memory traffic).
    b = len(encs)
    self.lens = np.fromiter((e.ids.shape[0] for e in encs), it, b)
    self.offs = np.zeros(b + 1, it)
    np.cumsum(self.lens, out=self.offs[1:])
    self.ids = np.concatenate([e.ids for e in encs])
    starts = np.concatenate([e.starts for e in encs]).astype(it, copy=False)
    ends = np.concatenate([e.ends for e in encs]).astype(it, copy=False)
    self.special = np.concatenate([e.special for e in encs]).astype(bool, copy=False)
    self.row = np.repeat(np.arange(b, dtype=it), self.lens)
    base = self.row * k
    self.starts = starts + base
    self.ends = ends + base
    # Text tokens: non-special, non-empty (as in alignment._text_ends).
    text = (ends > starts) & ~self.special
    self.pos = np.flatnonzero(text)  # global token index of each text token
    self.end = self.ends[self.pos]  # sorted over the whole batch once validated
    self.trow = self.row[self.pos]
    self.name = name
    self.tokenizer = tokenizer
    self.encs = encs
    masks = [e.loss_mask for e in encs]
    self.loss_mask = None
    if any(x is not None for x in masks):
      self.loss_mask = np.concatenate([np.ones(e.ids.shape[0], bool) if x is None else np.asarray(x, bool)
                            for e, x in zip(encs, masks)])

  def validate(self, text_lens: np.ndarray, k: int) -> None:
    """Raises the per-pair error of the first row whose text tokens do not tile its text."""
    e, b = self.end, len(text_lens)
    cnt = np.bincount(self.trow, minlength=b)
    first = np.cumsum(cnt) - cnt
    has = cnt > 0
    bad = (~has) & (text_lens > 0)
    rows = np.flatnonzero(has)
    bad[rows] |= e[first[rows] + cnt[rows] - 1] != rows * k + text_lens[rows]
    bad[rows] |= e[first[rows]] <= rows * k
    if len(e) > 1:
      dec = np.flatnonzero(e[1:] <= e[:-1])
      bad[self.trow[dec + 1]] = True
    if bad.any():
      r = int(np.flatnonzero(bad)[0])
      try:
        _al._text_ends(self.encs[r], self.name)
      except _al.AlignmentError as err:
        raise _al.AlignmentError(f"Pair {r}: {err}") from None
      raise _al.AlignmentError(f"Pair {r}: the {self.name} encoding's text tokens do not tile "
                               "its text; build it with tokenizer.encode().")

  def kinds(self, idx: np.ndarray, both_tokenizers: bool) -> np.ndarray:
    """Kind of special tokens for matching: 1 BOS, 2 EOS, 3 other (0 for all without tokenizers)."""
    if not both_tokenizers:
      return np.zeros(len(idx), np.int64)
    i = self.ids[idx]
    return np.where(i == self.tokenizer.bos_id, 1, np.where(i == self.tokenizer.eos_id, 2, 3))


def _lcs_pairs(tk: list, sk: list) -> list[tuple[int, int]]:
  """Index pairs of a longest common subsequence (same tie-breaking as `alm.align`)."""
  n, m = len(tk), len(sk)
  dp = [[0] * (m + 1) for _ in range(n + 1)]
  for a in range(n - 1, -1, -1):
    for b in range(m - 1, -1, -1):
      dp[a][b] = dp[a + 1][b + 1] + 1 if tk[a] == sk[b] else max(dp[a + 1][b], dp[a][b + 1])
  out, a, b = [], 0, 0
  while a < n and b < m:
    if tk[a] == sk[b]:
      out.append((a, b))
      a += 1
      b += 1
    elif dp[a + 1][b] >= dp[a][b + 1]:
      a += 1
    else:
      b += 1
  return out


def _match_specials(t: _Side, s: _Side, common: np.ndarray, k: int
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Specials matched at shared positions: (global position, teacher index, student index)."""
  empty = np.zeros(0, np.int64)
  t_sp = np.flatnonzero(t.special)
  s_sp = np.flatnonzero(s.special)
  if not len(t_sp) or not len(s_sp):
    return empty, empty, empty
  t_p = t.starts[t_sp]  # sorted: specials follow text order
  s_p = s.starts[s_sp]
  shared = np.intersect1d(t_p, s_p)
  shared = shared[(shared % k == 0) | np.isin(shared, common)]
  if not len(shared):
    return empty, empty, empty
  t_lo, t_hi = np.searchsorted(t_p, shared), np.searchsorted(t_p, shared, side="right")
  s_lo, s_hi = np.searchsorted(s_p, shared), np.searchsorted(s_p, shared, side="right")
  both_tok = t.tokenizer is not None and s.tokenizer is not None
  tk, sk = t.kinds(t_sp, both_tok), s.kinds(s_sp, both_tok)
  ct, cs = t_hi - t_lo, s_hi - s_lo
  # Positions whose two kind sequences are equal pair up in order (the LCS is
  # the identity); the others go through the tiny LCS.
  same = ct == cs
  eq_pos = np.flatnonzero(same)
  rep = np.repeat(eq_pos, ct[eq_pos])
  within = np.arange(len(rep)) - np.repeat(np.cumsum(ct[eq_pos]) - ct[eq_pos], ct[eq_pos])
  ti, si = t_lo[rep] + within, s_lo[rep] + within
  mismatch = np.zeros(len(shared), bool)
  np.logical_or.at(mismatch, rep, tk[ti] != sk[si])
  good = ~mismatch[rep]
  pos, mt, ms = [shared[rep[good]]], [t_sp[ti[good]]], [s_sp[si[good]]]
  for q in np.flatnonzero(~same | mismatch).tolist():
    a0, b0 = int(t_lo[q]), int(s_lo[q])
    pairs = _lcs_pairs(tk[a0:int(t_hi[q])].tolist(), sk[b0:int(s_hi[q])].tolist())
    if pairs:
      pos.append(np.full(len(pairs), shared[q]))
      mt.append(t_sp[[a0 + a for a, _ in pairs]])
      ms.append(s_sp[[b0 + b for _, b in pairs]])
  pos, mt, ms = np.concatenate(pos), np.concatenate(mt), np.concatenate(ms)
  order = np.lexsort((mt, pos))  # text order; at one position, teacher order
  return pos[order], mt[order], ms[order]


def align_batch_vectorized(pairs: Sequence[tuple[Encoding, Encoding]], *,
                           pad_to: tuple[int, int], constraint: str = "unconstrained",
                           bias_tables=None, gamma: float = 0.1, teacher_tokenizer=None,
                           student_tokenizer=None) -> tuple[np.ndarray, np.ndarray]:
  """`alm.tokenization.alignment.align_batch`, vectorised over the batch (see there)."""
  if constraint != "unconstrained":
    _al._check_constraint(constraint)
  if constraint == "unbiased" and bias_tables is None:
    raise ValueError("constraint='unbiased' needs bias_tables (alm.tokenization.bias."
                     "BiasTables.load(dir) or compute_bias_tables(...)).")
  if constraint == "space" and (teacher_tokenizer is None or student_tokenizer is None):
    raise ValueError("constraint='space' needs teacher_tokenizer and student_tokenizer "
                     "(for their boundary_bytes).")
  tt, ts = pad_to
  b = len(pairs)
  texts = []
  for r, (te, se) in enumerate(pairs):
    if te.ids.shape[0] > tt or se.ids.shape[0] > ts:  # Encoding.__len__ is a slow Python call
      raise ValueError(f"Pair {r} has {len(te)} teacher / {len(se)} student tokens, more than "
                       f"pad_to={pad_to}; truncate both at a common boundary first.")
    if te.text != se.text:
      raise _al.AlignmentError(
          f"Pair {r}: teacher and student encodings encode different texts ({len(te.text)} vs "
          f"{len(se.text)} bytes); encode the same text with both tokenizers.")
    texts.append(te.text)
  out_t = np.full((b, tt), -1, np.int32)
  out_s = np.full((b, ts), -1, np.int32)
  if not b:
    return out_t, out_s
  text_lens = np.fromiter((len(x) for x in texts), np.int64, b)
  k = int(text_lens.max()) + 1  # row r's offsets live in [r*k, r*k + len_r]
  it = np.int32 if b * k + 1 < 2**31 else np.int64
  t = _Side([p[0] for p in pairs], k, it, teacher_tokenizer, "teacher")
  s = _Side([p[1] for p in pairs], k, it, student_tokenizer, "student")
  t.validate(text_lens, k)
  s.validate(text_lens, k)

  # Common boundaries of the whole batch: byte-indexed mark tables over the
  # shifted offsets (O(total), where one searchsorted of ~30k sorted offsets
  # costs milliseconds).
  size = b * k + 1
  t_mark = np.zeros(size, bool)
  t_mark[t.end] = True
  both = np.zeros(size, bool)
  both[s.end] = True
  both &= t_mark
  hit = both[t.end]
  common = t.end[hit]
  c_row = t.trow[hit]
  mp, mt, ms = _match_specials(t, s, common, k)

  # Constraints: which common boundaries to keep; rows whose last chunk drops.
  drop_last_rows = np.zeros(b, bool)
  keep = np.ones(len(common), bool)
  if constraint != "unconstrained" and len(common):
    t_last = np.flatnonzero(hit)
    s_index = np.zeros(size, it)  # byte offset -> index of the student text token ending there
    s_index[s.end] = np.arange(len(s.end))
    s_last = s_index[common]
    forced = np.isin(common, mp)
    is_end = common == c_row * k + text_lens[c_row]
    if constraint == "space":
      data = np.frombuffer(b"".join(texts), np.uint8)
      text_off = np.concatenate([[0], np.cumsum(text_lens)])
      ok = np.ones(len(common), bool)
      for side, tok, last in ((t, teacher_tokenizer, t_last), (s, student_tokenizer, s_last)):
        bmask = np.zeros(256, bool)
        bmask[list(tok.boundary_bytes)] = True
        nxt = np.minimum(last + 1, len(side.pos) - 1)
        has_next = (last + 1 < len(side.pos)) & (side.trow[nxt] == c_row)
        rel = side.starts[side.pos[nxt]] - side.trow[nxt] * k
        byte = data[np.clip(text_off[side.trow[nxt]] + rel, 0, max(len(data) - 1, 0))] \
            if len(data) else np.zeros(len(nxt), np.uint8)
        ok &= ~has_next | bmask[byte]
      keep = ok | forced | is_end
    else:  # unbiased
      b1, b2 = bias_tables.lookup(t.ids[t.pos[t_last]], s.ids[s.pos[s_last]])
      keep = ((b1 <= gamma) & (b2 <= gamma)) | forced
      drop_last_rows[c_row[is_end & ~keep]] = True
      keep |= is_end
  kept = common[keep]
  k_row = c_row[keep]
  n_text = len(kept)

  # Global chunk ranks over the batch: text chunks and matched specials in
  # text order (specials at p come after the text chunk ending at p).
  text_rank = np.arange(n_text) + np.searchsorted(mp, kept, side="left")
  sp_rank = np.searchsorted(kept, mp, side="right") + np.arange(len(mp))
  n_chunks = n_text + len(mp)
  chunk_row = np.empty(n_chunks, it)
  chunk_row[text_rank] = k_row
  chunk_row[sp_rank] = mp // k
  valid = np.ones(n_chunks, bool)
  if drop_last_rows.any():
    # The last kept boundary of such a row is its end: its chunk drops.
    last_of_row = np.flatnonzero(np.diff(np.append(k_row, b)) != 0)
    rows_last = k_row[last_of_row]
    valid[text_rank[last_of_row[drop_last_rows[rows_last]]]] = False

  # A text token's chunk is the number of kept boundaries before its end.
  if n_text != len(common):
    both = np.zeros(size, bool)
    both[kept] = True
  ids = []
  for side, m_idx in ((t, mt), (s, ms)):
    g = np.empty(len(side.ids), it)
    g.fill(-1)
    if n_text:
      at_kept = both[side.end]
      before = np.add.accumulate(at_kept, dtype=it)
      before -= at_kept
      g[side.pos] = text_rank[before] if len(mp) else before
    g[m_idx] = sp_rank
    ids.append(g)
  # Token 0 of every row is never predicted; loss masks drop whole chunks.
  for side, g in zip((t, s), ids):
    firsts = side.offs[:-1][side.lens > 0]
    c0 = g[firsts]
    valid[c0[c0 >= 0]] = False
    if side.loss_mask is not None:
      valid[g[(~side.loss_mask) & (g >= 0)]] = False
  # Renumber the valid chunks from 0 within each row: one lookup table, whose
  # last entry (read by id -1) is -1.
  new = np.cumsum(valid, dtype=it) - 1
  per_row = np.bincount(chunk_row[valid], minlength=b).astype(it)
  row_base = np.cumsum(per_row, dtype=it) - per_row
  table = np.empty(n_chunks + 1, it)
  table[:-1] = np.where(valid, new - row_base[chunk_row], -1)
  table[-1] = -1
  for side, g, out, width in ((t, ids[0], out_t, tt), (s, ids[1], out_s, ts)):
    flat = np.arange(len(g), dtype=it) + (np.arange(b, dtype=it) * width - side.offs[:-1])[side.row]
    out.reshape(-1)[flat] = table[g]
  return out_t, out_s
