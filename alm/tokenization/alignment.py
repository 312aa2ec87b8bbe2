"""Greedy chunk alignment of two tokenizations of the same text (docs/method.md §2).

Both tokenizations encode the same bytes, so the chunk boundaries are the byte
offsets at which a token ends on both sides. They are found by intersecting
the two sorted end-offset arrays, and every token's chunk is one
`searchsorted` away: no Python loop over tokens.

Conventions (shared with `alm.losses`):
  * Chunk ids are int32, one per token, contiguous `0..C-1` in text order; `-1`
    marks a token in no chunk (padding, a special token present on one side
    only, a chunk dropped by the rules below).
  * Token `t`'s log-prob is read from the logits at position `t - 1`. Position
    0 of a sequence is never predicted, so the chunk that contains token 0 of
    *either* side is dropped (-1): its likelihood would miss a term on that
    side. Loss code can therefore treat every chunk id >= 0 as valid.
  * A chunk's last token on each side (where the boundary log-prob of
    docs/method.md §3 is read) is the largest position carrying its id; see
    `last_token_indices` (on device: `jax.ops.segment_max` over positions).
  * With `loss_mask`s (chat data), a chunk that contains a token outside the
    mask on either side is dropped: only chunks made entirely of target
    tokens are compared.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, get_args

import numpy as np

from alm.tokenization.base import Encoding

Constraint = Literal["unconstrained", "space", "unbiased"]
CONSTRAINTS: tuple[str, ...] = get_args(Constraint)


class AlignmentError(ValueError):
  """Two encodings cannot be aligned (different texts, malformed spans)."""


def _check_constraint(constraint: str) -> None:
  if constraint not in CONSTRAINTS:
    raise ValueError(f"Unknown chunk constraint {constraint!r}; valid: {', '.join(CONSTRAINTS)}. "
                     "('boundary_prob' merging is applied in the loss, on device.)")


# `np.count_nonzero` is a Python wrapper around this C function; the wrapper's
# overhead is a visible share of aligning one ~500-token pair.
_count_nonzero = getattr(getattr(getattr(np, "_core", None), "multiarray", None), "count_nonzero",
                         np.count_nonzero)


def _tiles(e: np.ndarray, size: int) -> bool:
  """Whether text-token ends increase strictly from > 0 up to `size` (the tokens tile the text).

  This is what makes the mark tables of `align` exact (every end a distinct
  byte offset in [1, size]), so it runs on every call: an Encoding holds
  mutable arrays and is built in several places, so no earlier check is
  trusted.
  """
  k = e.shape[0]
  if not k:
    return not size
  return bool(e[-1] == size and e[0] > 0 and (k == 1 or not _count_nonzero(e[1:] <= e[:-1])))


def _text_ends(enc: Encoding, side: str) -> tuple[np.ndarray | int | None, np.ndarray]:
  """Positions of the text tokens and their ends, validated.

  Text tokens are the non-special tokens with a non-empty span: specials, and
  zero-length text tokens (a SentencePiece dummy-prefix piece whose byte was
  stripped), cover no bytes and are in no text chunk.

  Returns:
    (positions, ends): positions is None when every token is text, an int
    `j` when the text tokens are exactly tokens `j..n-1` (specials such as a
    BOS only in front), else an index array. The common cases skip most numpy
    calls, which dominate the cost at ~500 tokens. `ends` is an intp array:
    it indexes byte tables several times, and numpy converts narrower index
    arrays on every indexing.

  Raises:
    AlignmentError: the text tokens' ends do not increase strictly from > 0
      to len(text) (the tokens do not tile the text).
  """
  ends = enc.ends
  special = enc.special
  n = ends.shape[0]
  size = len(enc.text)
  n_sp = int(_count_nonzero(special))
  if not n_sp or (n_sp < n and _count_nonzero(special[:n_sp]) == n_sp):
    # Specials (if any) only in front: the rest are the text tokens if none of
    # them is empty, and then they must tile the text. Anything else (an
    # empty token, or ends that do not tile) takes the general path, which
    # decides exactly as if there were no fast path.
    e = ends[n_sp:]
    k = n - n_sp
    if (not size) if not k else (
        e[-1] == size and e[0] > 0 and not _count_nonzero(e <= enc.starts[n_sp:]) and
        (k == 1 or not _count_nonzero(e[1:] <= e[:-1]))):
      return (n_sp or None), e.astype(np.intp, copy=False)
  text = ends > enc.starts
  text &= ~special
  pos = text.nonzero()[0]
  e = ends[pos]
  if not _tiles(e, size):
    if not len(e):
      raise AlignmentError(f"The {side} encoding has text but no text tokens.")
    raise AlignmentError(
        f"The {side} encoding's text tokens do not tile its text (ends must increase strictly "
        f"and the last must be len(text)={size}); build it with tokenizer.encode().")
  return (None if len(pos) == n else pos), e.astype(np.intp, copy=False)


def _match_specials(t: Encoding, s: Encoding, common: np.ndarray, tokenizers) -> list:
  """Pairs up special tokens at the same byte position, in order.

  A special at byte position p can only be its own chunk if both sides split
  the text at p (p == 0, or p is a common text boundary). At one position the
  specials are matched by kind (BOS, EOS, other: known from the tokenizers
  when given) with a longest-common-subsequence, so a BOS that only one side
  has does not steal the other side's chat marker.

  Returns:
    A list of (position, teacher_index, student_index) in text order.
  """
  t_sp = np.flatnonzero(t.special)
  s_sp = np.flatnonzero(s.special)
  if not len(t_sp) or not len(s_sp):
    return []
  t_pos = np.asarray(t.starts)[t_sp]
  s_pos = np.asarray(s.starts)[s_sp]
  shared = np.intersect1d(t_pos, s_pos)
  ok = (shared == 0) | np.isin(shared, common)
  out = []

  def kind(tok, i, j):
    if tok is None:
      return 0
    if i == tok.bos_id:
      return 1
    if i == tok.eos_id:
      return 2
    return 3

  t_tok, s_tok = tokenizers
  for p in shared[ok].tolist():
    ti = t_sp[t_pos == p]
    si = s_sp[s_pos == p]
    tk = [kind(t_tok, int(t.ids[i]), i) for i in ti]
    sk = [kind(s_tok, int(s.ids[i]), i) for i in si]
    if t_tok is None or s_tok is None:
      tk = [0] * len(ti)
      sk = [0] * len(si)
    # LCS over a handful of specials (chat markers, BOS/EOS): tiny DP.
    n, m = len(tk), len(sk)
    dp = [[0] * (m + 1) for _ in range(n + 1)]
    for a in range(n - 1, -1, -1):
      for b in range(m - 1, -1, -1):
        dp[a][b] = dp[a + 1][b + 1] + 1 if tk[a] == sk[b] else max(dp[a + 1][b], dp[a][b + 1])
    a = b = 0
    while a < n and b < m:
      if tk[a] == sk[b]:
        out.append((p, int(ti[a]), int(si[b])))
        a += 1
        b += 1
      elif dp[a + 1][b] >= dp[a][b + 1]:
        a += 1
      else:
        b += 1
  return out


def align(teacher_enc: Encoding, student_enc: Encoding, *,
          constraint: Constraint = "unconstrained", bias_tables=None, gamma: float = 0.1,
          teacher_tokenizer=None, student_tokenizer=None) -> tuple[np.ndarray, np.ndarray]:
  """Aligns two tokenizations of one text into chunks (docs/method.md §2, §4).

  Args:
    teacher_enc: the teacher's encoding.
    student_enc: the student's encoding of the same text (same `text` bytes).
    constraint: which boundaries to keep. "unconstrained": every common token
      end. "space": only where the next token on both sides starts with a
      pretoken-boundary byte (needs both tokenizers for `boundary_bytes`), or
      where a matched special token or the end of the sequence follows.
      "unbiased": only where both bias differences of the boundary's last
      token pair are <= `gamma` (needs `bias_tables`); a biased chunk is merged
      into the next one. A boundary followed by a matched special token is
      always kept (the text provably ends there on both sides). The final
      boundary of the sequence is judged by the tables like any other; if it
      is biased, the final chunk is dropped (-1). Pairs missing from the
      tables count as biased.
    bias_tables: an `alm.tokenization.bias.BiasTables` for this tokenizer pair
      (teacher first), for "unbiased".
    gamma: the bias threshold of "unbiased", a probability in (0, 1).
    teacher_tokenizer: used to tell BOS/EOS apart when matching specials, and
      for "space".
    student_tokenizer: same for the student.

  Returns:
    (teacher_chunk_ids int32 [n], student_chunk_ids int32 [m]); see the module
    docstring for the conventions (-1, token 0, loss masks). The two may be
    views of one buffer.

  Raises:
    AlignmentError: the encodings encode different texts or are malformed.
    ValueError: an unknown constraint, or one whose inputs are missing.
  """
  if constraint != "unconstrained":
    _check_constraint(constraint)
  if not 0.0 < gamma < 1.0:  # a probability threshold; also rejects NaN
    raise ValueError(f"gamma must be a probability threshold in (0, 1), got {gamma}; "
                     ">= 1 would keep no biased boundary and merge every row into one chunk.")
  t, s = teacher_enc, student_enc
  if t.text != s.text:
    raise AlignmentError(
        f"Teacher and student encodings encode different texts ({len(t.text)} vs {len(s.text)} "
        "bytes); encode the same text with both tokenizers (same normalization).")
  t_pos, t_end = _text_ends(t, "teacher")
  s_pos, s_end = _text_ends(s, "student")
  n, m = t.ids.shape[0], s.ids.shape[0]

  # Common ends of two sorted unique arrays of byte offsets in [1, len(text)]
  # (`_text_ends` checked this): byte-indexed mark tables are O(n + m +
  # len(text)) and cheaper than a sort (np.intersect1d) or a binary search.
  # s_mark[t_end[i]] is 1 when teacher text token i ends where a student text
  # token ends (at a common boundary), and t_mark[s_end[j]] likewise. Numpy
  # calls dominate at ~500 tokens, so the paths below take as few as they can.
  size = len(t.text) + 1
  t_mark = np.zeros(size, np.int32)
  t_mark[t_end] = 1
  s_mark = np.zeros(size, np.int32)
  s_mark[s_end] = 1

  matched = []
  if len(t_end) < n and len(s_end) < m:
    matched = _match_specials(t, s, t_end[s_mark[t_end] > 0],
                              (teacher_tokenizer, student_tokenizer))

  plain = constraint == "unconstrained" and not matched and t.loss_mask is None and \
      s.loss_mask is None
  if plain and size > 1 and not isinstance(t_pos, np.ndarray) and \
      not isinstance(s_pos, np.ndarray):
    # Fast path: non-empty text, specials (if any) only in front. A text
    # token's chunk is the number of common boundaries strictly before its
    # end, i.e. of hits before it on its own side: one running sum over a
    # buffer holding both sides, [t specials | shift, t hits[:-1] | s specials
    # | -(t hits[:-1]), s hits[:-1]], so the student part restarts at `shift`.
    # shift = -1 drops chunk 0 when it holds token 0 of either side (token 0
    # is text there); when token 0 is a special on both sides it is in no
    # chunk and nothing is dropped.
    pt, ps = t_pos or 0, s_pos or 0
    buf = np.zeros(n + m, np.int32)
    buf[pt] = -1 if not (pt and ps) else 0
    seg = buf[pt + 1:n]
    s_mark.take(t_end[:-1], out=seg, mode="clip")  # ends are in range; "clip" is unbuffered
    buf[n + ps] = -int(_count_nonzero(seg))
    t_mark.take(s_end[:-1], out=buf[n + ps + 1:], mode="clip")
    np.add.accumulate(buf, out=buf)
    if pt:
      buf[:pt] = -1
    if ps:
      buf[n:n + ps] = -1
    return buf[:n], buf[n:]

  hit = s_mark[t_end] > 0  # teacher text tokens ending at a common boundary
  s_hit = t_mark[s_end] > 0
  if plain:
    # Specials elsewhere (one-sided, unmatched) or an empty text: the same
    # running count per side, scattered to the text positions.
    drop = (len(t_end) and (t_pos is None or (not isinstance(t_pos, int) and t_pos[0] == 0))) or \
        (len(s_end) and (s_pos is None or (not isinstance(s_pos, int) and s_pos[0] == 0)))
    drop = -1 if drop else 0
    return _hits_before(hit, t_pos, n, drop), _hits_before(s_hit, s_pos, m, drop)

  if isinstance(t_pos, int):
    t_pos = np.arange(t_pos, n)
  if isinstance(s_pos, int):
    s_pos = np.arange(s_pos, m)
  common = t_end[hit]
  kept = common
  drop_last = False
  if constraint != "unconstrained" and len(common):
    t_pos_ = np.arange(n) if t_pos is None else t_pos
    s_pos_ = np.arange(m) if s_pos is None else s_pos
    keep, drop_last = _constraint_keep(constraint, t, s, t_pos_, t_end, s_pos_, s_end, common, hit,
                                       matched, bias_tables, gamma, teacher_tokenizer,
                                       student_tokenizer)
    kept = common[keep]
    t_chunk = np.searchsorted(kept, t_end).astype(np.int32)
    s_chunk = np.searchsorted(kept, s_end).astype(np.int32)
  else:
    # Text chunk k covers the text tokens whose ends fall in (kept[k-1], kept[k]].
    t_chunk = np.add.accumulate(hit, dtype=np.int32)
    t_chunk -= hit
    s_chunk = np.add.accumulate(s_hit, dtype=np.int32)
    s_chunk -= s_hit
  n_text = len(kept)
  t_ids = np.full(n, -1, np.int32)
  s_ids = np.full(m, -1, np.int32)
  t_pos = np.arange(n) if t_pos is None else t_pos
  s_pos = np.arange(m) if s_pos is None else s_pos
  valid = np.ones(n_text + len(matched), bool)
  if drop_last and n_text:
    valid[n_text - 1] = False
  if matched:
    sp_pos = np.array([p for p, _, _ in matched], np.int64)
    # Specials at p come after the text chunk ending at p: shift chunk ranks.
    text_rank = np.arange(n_text) + np.searchsorted(sp_pos, kept, side="left")
    sp_rank = np.searchsorted(kept, sp_pos, side="right") + np.arange(len(matched))
    if n_text:
      t_chunk = text_rank[t_chunk]
      s_chunk = text_rank[s_chunk]
    full_valid = np.empty(n_text + len(matched), bool)
    full_valid[text_rank] = valid[:n_text]
    full_valid[sp_rank] = True
    valid = full_valid
    t_ids[t_pos] = t_chunk
    s_ids[s_pos] = s_chunk
    t_ids[[ti for _, ti, _ in matched]] = sp_rank
    s_ids[[si for _, _, si in matched]] = sp_rank
  else:
    t_ids[t_pos] = t_chunk
    s_ids[s_pos] = s_chunk

  # Token 0 of either side is never predicted: its chunk is dropped.
  if n and t_ids[0] >= 0:
    valid[t_ids[0]] = False
  if m and s_ids[0] >= 0:
    valid[s_ids[0]] = False
  for enc, ids in ((t, t_ids), (s, s_ids)):
    if enc.loss_mask is not None:
      bad = ids[(~np.asarray(enc.loss_mask, bool)) & (ids >= 0)]
      valid[bad] = False
  if not valid.all():
    new = np.cumsum(valid, dtype=np.int32) - 1
    new[~valid] = -1
    t_ids = np.where(t_ids >= 0, new[np.maximum(t_ids, 0)], -1).astype(np.int32)
    s_ids = np.where(s_ids >= 0, new[np.maximum(s_ids, 0)], -1).astype(np.int32)
  return t_ids, s_ids


def _hits_before(hit: np.ndarray, pos, n: int, shift: int) -> np.ndarray:
  """Per-token chunk ids of the fast path: `shift` + the number of hits before each text token.

  Args:
    hit: bool [k] whether each text token ends at a common boundary.
    pos: the text tokens' positions, as from `_text_ends`.
    n: the number of tokens; tokens that are not text get -1.
    shift: 0, or -1 to drop chunk 0 (and shift the others down).

  Returns:
    int32 [n] chunk ids, written in place into one buffer (an exclusive
    cumulative sum), with no index arrays built.
  """
  k = hit.shape[0]
  out = np.empty(n, np.int32)  # np.full is a slower Python wrapper
  if pos is None:
    seg = out
  elif isinstance(pos, int):
    out[:pos] = -1
    seg = out[pos:]
  else:
    out.fill(-1)
    seg = np.empty(k, np.int32)
  if k:
    seg[0] = shift
    seg[1:] = hit[:-1]
    np.add.accumulate(seg, out=seg)
  if pos is not None and not isinstance(pos, int):
    out[pos] = seg
  return out


def _constraint_keep(constraint, t, s, t_pos, t_end, s_pos, s_end, common, hit, matched,
                     bias_tables, gamma, t_tok, s_tok) -> tuple[np.ndarray, bool]:
  """Which common boundaries a constraint keeps, and whether to drop the last chunk."""
  # Index (among text tokens) of the last token ending at each common boundary.
  t_last = np.flatnonzero(hit)
  s_last = np.searchsorted(s_end, common)
  forced = np.zeros(len(common), bool)
  if matched:
    forced |= np.isin(common, np.array([p for p, _, _ in matched]))
  is_end = np.zeros(len(common), bool)
  is_end[-1] = True  # the sequence's final boundary
  drop_last = False
  if constraint == "space":
    if t_tok is None or s_tok is None:
      raise ValueError("constraint='space' needs teacher_tokenizer and student_tokenizer "
                       "(for their boundary_bytes).")
    ok = np.ones(len(common), bool)
    for tok, enc, pos, last in ((t_tok, t, t_pos, t_last), (s_tok, s, s_pos, s_last)):
      bmask = np.zeros(256, bool)
      bmask[list(tok.boundary_bytes)] = True
      nxt = last + 1  # next text token on this side
      has_next = nxt < len(pos)
      starts = np.asarray(enc.starts)[pos[np.minimum(nxt, len(pos) - 1)]]
      data = np.frombuffer(enc.text, np.uint8)
      first_byte = data[np.minimum(starts, max(len(data) - 1, 0))] if len(data) else starts
      ok &= ~has_next | bmask[first_byte]
    keep = ok | forced | is_end
  else:  # unbiased
    if bias_tables is None:
      raise ValueError("constraint='unbiased' needs bias_tables (alm.tokenization.bias."
                       "BiasTables.load(dir) or compute_bias_tables(...)).")
    vt = np.asarray(t.ids)[t_pos[t_last]]
    vs = np.asarray(s.ids)[s_pos[s_last]]
    b1, b2 = bias_tables.lookup(vt, vs)
    ok = (b1 <= gamma) & (b2 <= gamma)
    keep = ok | forced
    drop_last = not bool(keep[-1])
    keep = keep | is_end
  return keep, drop_last


def last_token_indices(chunk_ids: np.ndarray, num_chunks: int | None = None) -> np.ndarray:
  """Position of the last token of every chunk (where boundary log-probs are read).

  Args:
    chunk_ids: int [T] chunk ids of one side (-1 = no chunk).
    num_chunks: number of chunks C (default: max id + 1).

  Returns:
    int32 [C] largest position carrying each chunk id (-1 for an absent id).
  """
  chunk_ids = np.asarray(chunk_ids)
  c = int(chunk_ids.max(initial=-1)) + 1 if num_chunks is None else num_chunks
  out = np.full(c, -1, np.int64)
  sel = chunk_ids >= 0
  np.maximum.at(out, chunk_ids[sel], np.flatnonzero(sel))
  return out.astype(np.int32)


def align_batch(pairs: Sequence[tuple[Encoding, Encoding]], *, pad_to: tuple[int, int],
                **kwargs) -> tuple[np.ndarray, np.ndarray]:
  """Aligns a batch of encoding pairs into padded chunk-id arrays.

  Row `b` is `align(*pairs[b], **kwargs)` followed by -1 padding. (One
  alignment engine: an earlier batch-vectorised copy of `align` was faster
  per pair only for tiny pairs and duplicated every rule, so it was removed;
  the data pipeline aligns per document in its workers anyway.)

  Args:
    pairs: (teacher_encoding, student_encoding) per example.
    pad_to: (T_teacher, T_student) lengths of the output rows.
    **kwargs: as for `align` (constraint, bias_tables, gamma, teacher_tokenizer,
      student_tokenizer).

  Returns:
    (teacher int32 [B, T_teacher], student int32 [B, T_student]); -1 on padding.

  Raises:
    ValueError: an encoding is longer than its `pad_to` length (truncate the
      pair at a common boundary first, e.g. with the data pipeline), or bad
      constraint arguments.
    AlignmentError: a pair's encodings differ in text or are malformed (the
      message names the pair).
  """
  out_t = np.full((len(pairs), pad_to[0]), -1, np.int32)
  out_s = np.full((len(pairs), pad_to[1]), -1, np.int32)
  for i, (t, s) in enumerate(pairs):
    for side, enc, cap in (("teacher", t, pad_to[0]), ("student", s, pad_to[1])):
      if len(enc) > cap:
        raise ValueError(f"Pair {i}: the {side} encoding has {len(enc)} tokens, more than "
                         f"pad_to={cap}; cut the pair at a common boundary first (the data "
                         "pipeline does).")
    try:
      ct, cs = align(t, s, **kwargs)
    except AlignmentError as e:
      raise AlignmentError(f"Pair {i}: {e}") from e
    out_t[i, :len(ct)] = ct
    out_s[i, :len(cs)] = cs
  return out_t, out_s
