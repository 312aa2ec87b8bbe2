"""Tokenization-bias tables of a tokenizer pair (docs/method.md §5).

For a token `v`, a *cover* is a token `w` that starts inside `v` at byte `i`
(`bytes(w) = bytes(v)[i:] + y` with a non-empty continuation `y`) such that
re-tokenizing `bytes(v)[:i] + bytes(w)` ends with `w`. Equivalently, since
`bytes(v)[:i] + bytes(w) == bytes(v) + y`: `y` is a continuation of `v` whose
tokenization's last token starts inside `v`. For one `(v, y)` that last token
is unique, so covers are keyed by their continuation `y` and a token's
implied exclusions are `E(v) = {y}`.

  b1(v_T, v_S) = sum of P_T(w) over teacher covers (y, w) of v_T with y not in E_S(v_S)
  b2(v_T, v_S) = sum of P_S(w) over student covers (y, w) of v_S with y not in E_T(v_T)

with unigram probabilities counted on a corpus. Two facts keep this fast:
  * A cover with P(w) = 0 adds nothing, so only covers by tokens seen in the
    counting corpus are enumerated (every cover when `smoothing > 0`).
  * `y in E_S(v_S)` is one re-tokenization: the last token of
    `tokenize_S(bytes(v_S) + y)` is longer than `y`. It is only run when some
    student token spells a suffix of `v_S` followed by `y` (a dictionary
    lookup), the necessary condition.
Only pairs where one token's bytes are a suffix of the other's can end at the
same byte, so only those are stored (sorted int64 keys `v_T * V_S + v_S`).
`observed_only=True` (the default for real vocabularies) restricts the pairs
to tokens seen in the counting corpus; a pair missing from the tables counts
as biased in `alm.align`. Every stored value is exact for the definition.

A re-tokenized string that is not valid UTF-8 (a cover splitting a character
whose prefix is not in `v`) cannot be tokenized as text: such covers are
invalid, as in the paper's reference code.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import time
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np

_FORMAT_VERSION = 1


# ---------------------------------------------------------------------------
# Re-tokenization, batched.
# ---------------------------------------------------------------------------


def last_token_lengths(tokenizer, texts: Sequence[bytes], batch_size: int = 8192) -> np.ndarray:
  """Byte length of the last token of each text's tokenization (-1 if it cannot be tokenized).

  Uses one multi-threaded Rust call per batch when the tokenizer wraps an HF
  `tokenizers.Tokenizer` (`hf_tokenizer`), else `encode_batch`/`encode`.

  Args:
    tokenizer: an `alm` ByteTokenizer.
    texts: UTF-8 byte strings (invalid UTF-8 gives -1).
    batch_size: texts per library call.

  Returns:
    int32 [len(texts)].
  """
  out = np.full(len(texts), -1, np.int32)
  tb = tokenizer.token_bytes
  lens = [len(b) for b in tb]  # a Python list: summing a few ids is faster than numpy
  hf = getattr(tokenizer, "hf_tokenizer", None)
  nfc = getattr(tokenizer, "_nfc", False)
  dummy = getattr(tokenizer, "dummy_prefix", b"") or b""
  for lo in range(0, len(texts), batch_size):
    chunk = texts[lo:lo + batch_size]
    strs, idx = [], []
    for k, t in enumerate(chunk):
      try:
        strs.append(t.decode("utf-8"))
        idx.append(k)
      except UnicodeDecodeError:
        pass
    if not strs:
      continue
    if hf is not None:
      if nfc:  # NFC would change a non-normalized text: not representable exactly
        keep = [unicodedata.is_normalized("NFC", x) for x in strs]
        strs = [x for x, k in zip(strs, keep) if k]
        idx = [i for i, k in zip(idx, keep) if k]
      encs = hf.encode_batch_fast(strs, add_special_tokens=False)
      get = lens.__getitem__
      extra = len(dummy)
      for k, e in zip(idx, encs):
        ids = e.ids
        # Exactness: the tokens must spell the text (no <unk>, no normalizer change).
        if ids and sum(map(get, ids)) == len(chunk[k]) + extra:
          out[lo + k] = get(ids[-1])
    else:
      for k, s in zip(idx, strs):
        try:
          e = tokenizer.encode(s, add_special_tokens=False)
        except ValueError:  # TokenizerError: not representable exactly
          continue
        text_pos = np.flatnonzero(~np.asarray(e.special))
        if len(text_pos):
          last = text_pos[-1]
          out[lo + k] = int(e.ends[last] - e.starts[last])
  return out


def count_tokens(tokenizer, texts: Iterable[str], progress: Callable[[int], None] | None = None
                 ) -> np.ndarray:
  """Unigram counts of a tokenizer's ids over texts (specials not added).

  Args:
    tokenizer: an `alm` ByteTokenizer.
    texts: the corpus, as strings.
    progress: called with the number of bytes of each text done.

  Returns:
    int64 [vocab_size].
  """
  counts = np.zeros(tokenizer.vocab_size, np.int64)
  batch: list[str] = []

  def flush():
    encs = (tokenizer.encode_batch(batch, add_special_tokens=False)
            if hasattr(tokenizer, "encode_batch") else
            [tokenizer.encode(t, add_special_tokens=False) for t in batch])
    for e in encs:
      counts[:] += np.bincount(np.asarray(e.ids, np.int64), minlength=len(counts))[:len(counts)]
      if progress:
        progress(len(e.text))
    batch.clear()

  for t in texts:
    batch.append(t)
    if len(batch) >= 256:
      flush()
  if batch:
    flush()
  return counts


# ---------------------------------------------------------------------------
# Covers.
# ---------------------------------------------------------------------------


def _prefix_upper(s: bytes) -> bytes | None:
  """Smallest byte string greater than every string with prefix `s` (None: no bound)."""
  b = bytearray(s)
  while b and b[-1] == 0xFF:
    b.pop()
  if not b:
    return None
  b[-1] += 1
  return bytes(b)


@dataclasses.dataclass
class Covers:
  """Valid covers of a set of tokens: parallel arrays sorted by token.

  Attributes:
    v: int32 [K] the covered token.
    w: int32 [K] the cover token.
    y: list of K continuations (bytes).
  """

  v: np.ndarray
  w: np.ndarray
  y: list


def compute_covers(tokenizer, tokens: np.ndarray, cover_candidates: np.ndarray,
                   progress: Callable[[str, int, int], None] | None = None) -> Covers:
  """Enumerates the valid covers of `tokens` among the tokens `cover_candidates`.

  Args:
    tokenizer: the `alm` ByteTokenizer both sets of ids belong to.
    tokens: ids `v` whose covers are wanted.
    cover_candidates: ids allowed as cover tokens `w`.
    progress: optional callback (stage, done, total).

  Returns:
    The valid covers (by re-tokenization).
  """
  tb = tokenizer.token_bytes
  cand = sorted((tb[i], int(i)) for i in cover_candidates if tb[i])
  keys = [b for b, _ in cand]
  cids = np.array([i for _, i in cand], np.int32)
  vv, ww, texts, yy = [], [], [], []
  for v in tokens.tolist():
    vb = tb[v]
    n = len(vb)
    for i in range(n):
      s = vb[i:]
      lo = bisect.bisect_right(keys, s)  # strictly longer strings with prefix s come after s
      up = _prefix_upper(s)
      hi = len(keys) if up is None else bisect.bisect_left(keys, up, lo)
      if hi <= lo:
        continue
      head = vb[:i]
      ls = n - i
      for k in range(lo, hi):
        wb = keys[k]
        vv.append(v)
        ww.append(cids[k])
        texts.append(head + wb)
        yy.append(wb[ls:])
  if progress:
    progress("candidates", len(texts), len(texts))
  last = _batched_last_lengths(tokenizer, texts, progress, "validity")
  wlen = np.array([len(tb[w]) for w in ww], np.int32) if ww else np.zeros(0, np.int32)
  ok = last == wlen
  sel = np.flatnonzero(ok)
  return Covers(np.asarray(vv, np.int32)[sel] if vv else np.zeros(0, np.int32),
                np.asarray(ww, np.int32)[sel] if ww else np.zeros(0, np.int32),
                [yy[k] for k in sel.tolist()])


def _batched_last_lengths(tokenizer, texts, progress, stage, step=200_000):
  parts = []
  for lo in range(0, len(texts), step):
    parts.append(last_token_lengths(tokenizer, texts[lo:lo + step]))
    if progress:
      progress(stage, min(lo + step, len(texts)), len(texts))
  return np.concatenate(parts) if parts else np.zeros(0, np.int32)


def suffix_pairs(t_bytes: Sequence[bytes], s_bytes: Sequence[bytes], t_tokens: np.ndarray,
                 s_tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """All (teacher, student) pairs where one token's bytes are a suffix of the other's.

  Args:
    t_bytes: teacher token bytes by id.
    s_bytes: student token bytes by id.
    t_tokens: teacher ids to consider.
    s_tokens: student ids to consider.

  Returns:
    (teacher ids, student ids), int32, unique pairs sorted by (teacher, student).
  """
  s_map: dict[bytes, list[int]] = {}
  for i in s_tokens.tolist():
    if s_bytes[i]:
      s_map.setdefault(s_bytes[i], []).append(i)
  t_map: dict[bytes, list[int]] = {}
  for i in t_tokens.tolist():
    if t_bytes[i]:
      t_map.setdefault(t_bytes[i], []).append(i)
  pt, ps = [], []
  for tb_, tids in t_map.items():
    for k in range(len(tb_)):  # student token is a suffix of the teacher token (k=0: equal)
      sids = s_map.get(tb_[k:])
      if sids:
        for a in tids:
          for b in sids:
            pt.append(a)
            ps.append(b)
  for sb_, sids in s_map.items():
    for k in range(1, len(sb_)):  # teacher token a proper suffix of the student token
      tids = t_map.get(sb_[k:])
      if tids:
        for a in tids:
          for b in sids:
            pt.append(a)
            ps.append(b)
  if not pt:
    return np.zeros(0, np.int32), np.zeros(0, np.int32)
  key = np.unique(np.asarray(pt, np.int64) * (max(len(s_bytes), 1)) + np.asarray(ps, np.int64))
  return (key // max(len(s_bytes), 1)).astype(np.int32), (key % max(len(s_bytes), 1)).astype(
      np.int32)


def _one_side(tok_a, covers_a: Covers, probs_a: np.ndarray, pa: np.ndarray, pb: np.ndarray,
              tok_b, progress, stage) -> np.ndarray:
  """sum P_a(w) over covers (y, w) of pa[k] with y not in E_b(pb[k]), for every pair k."""
  b_bytes = tok_b.token_bytes
  b_set = {b for i, b in enumerate(b_bytes) if b and i not in tok_b.special_ids}
  # Group the covers of each token a.
  order = np.argsort(covers_a.v, kind="stable")
  cv = covers_a.v[order]
  starts = np.searchsorted(cv, pa, side="left")
  stops = np.searchsorted(cv, pa, side="right")
  weight = probs_a[covers_a.w[order]]
  ys = [covers_a.y[k] for k in order.tolist()]
  total = np.zeros(len(pa), np.float64)
  csum = np.concatenate([[0.0], np.cumsum(weight)])
  total[:] = csum[stops] - csum[starts]
  # Candidate exclusions: y is excluded by b only if a token of b spells a
  # suffix of b followed by y; then re-tokenize b + y to decide.
  q_pair, q_cov, q_text = [], [], []
  for k in range(len(pa)):
    lo, hi = int(starts[k]), int(stops[k])
    if lo == hi:
      continue
    bb = b_bytes[int(pb[k])]
    sufs = [bb[j:] for j in range(len(bb))]
    for c in range(lo, hi):
      y = ys[c]
      for s in sufs:
        if s + y in b_set:
          q_pair.append(k)
          q_cov.append(c)
          q_text.append(bb + y)
          break
  # Many pairs share (b, y): re-tokenize each distinct text once.
  uniq: dict[bytes, int] = {}
  q_idx = np.fromiter((uniq.setdefault(x, len(uniq)) for x in q_text), np.int64, len(q_text))
  last = _batched_last_lengths(tok_b, list(uniq), progress, stage)[q_idx] if q_text else \
      np.zeros(0, np.int32)
  ylen = np.array([len(ys[c]) for c in q_cov], np.int32) if q_cov else np.zeros(0, np.int32)
  excluded = last > ylen
  q_pair = np.asarray(q_pair, np.int64)[excluded]
  q_cov = np.asarray(q_cov, np.int64)[excluded]
  sub = np.zeros(len(pa), np.float64)
  np.add.at(sub, q_pair, weight[q_cov])
  return np.maximum(total - sub, 0.0)


# ---------------------------------------------------------------------------
# Tables.
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class BiasTables:
  """Sparse b1/b2 tables and unigram counts of one (teacher, student) pair.

  Attributes:
    teacher: name of the teacher tokenizer.
    student: name of the student tokenizer.
    teacher_counts: int64 [V_T] unigram counts.
    student_counts: int64 [V_S] unigram counts.
    keys: int64 [P] sorted pair keys `teacher_id * V_S + student_id`.
    b1: float32 [P] teacher-side bias difference per pair.
    b2: float32 [P] student-side bias difference per pair.
    meta: metadata (corpus, smoothing, timings).
  """

  teacher: str
  student: str
  teacher_counts: np.ndarray
  student_counts: np.ndarray
  keys: np.ndarray
  b1: np.ndarray
  b2: np.ndarray
  meta: dict = dataclasses.field(default_factory=dict)

  @property
  def student_vocab_size(self) -> int:
    return int(len(self.student_counts))

  def lookup(self, teacher_ids, student_ids) -> tuple[np.ndarray, np.ndarray]:
    """b1, b2 of (teacher, student) last-token pairs; +inf for pairs not stored.

    Args:
      teacher_ids: int array of teacher ids.
      student_ids: int array of student ids, same shape.

    Returns:
      (b1, b2) float32 arrays of that shape.
    """
    q = np.asarray(teacher_ids, np.int64) * self.student_vocab_size + np.asarray(
        student_ids, np.int64)
    j = np.searchsorted(self.keys, q)
    jc = np.minimum(j, max(len(self.keys) - 1, 0))
    found = (self.keys[jc] == q) if len(self.keys) else np.zeros(q.shape, bool)
    b1 = np.where(found, self.b1[jc] if len(self.keys) else 0, np.inf).astype(np.float32)
    b2 = np.where(found, self.b2[jc] if len(self.keys) else 0, np.inf).astype(np.float32)
    return b1, b2

  def save(self, directory) -> None:
    """Writes `tables.npz` and `meta.json` into `directory` (created)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(d / "tables.npz", teacher_counts=self.teacher_counts,
                        student_counts=self.student_counts, keys=self.keys, b1=self.b1, b2=self.b2)
    meta = dict(self.meta, teacher=self.teacher, student=self.student,
                format_version=_FORMAT_VERSION, num_pairs=int(len(self.keys)))
    (d / "meta.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")

  @classmethod
  def load(cls, directory) -> "BiasTables":
    """Reads tables written by `save`.

    Raises:
      FileNotFoundError: the directory lacks `tables.npz` or `meta.json`.
    """
    d = Path(directory)
    if not (d / "tables.npz").exists() or not (d / "meta.json").exists():
      raise FileNotFoundError(f"{d} holds no bias tables (tables.npz + meta.json); compute them "
                              "with experiments/compute_bias_tables.py.")
    meta = json.loads((d / "meta.json").read_text(encoding="utf-8"))
    z = np.load(d / "tables.npz")
    return cls(meta.pop("teacher"), meta.pop("student"), z["teacher_counts"], z["student_counts"],
               z["keys"], z["b1"], z["b2"], meta)


def unigram_probs(counts: np.ndarray, smoothing: float = 0.0) -> np.ndarray:
  """Unigram probabilities from counts with additive smoothing (`smoothing * total` per id)."""
  c = counts.astype(np.float64)
  c = c + smoothing * max(c.sum(), 1.0)
  tot = c.sum()
  return c / tot if tot > 0 else c


def compute_bias_tables(teacher, student, teacher_counts: np.ndarray, student_counts: np.ndarray,
                        *, smoothing: float = 0.0, observed_only: bool = True,
                        progress: Callable[[str, int, int], None] | None = None,
                        meta: dict | None = None) -> BiasTables:
  """Computes the sparse b1/b2 tables of a tokenizer pair (docs/method.md §5).

  Args:
    teacher: teacher `alm` ByteTokenizer.
    student: student `alm` ByteTokenizer.
    teacher_counts: int [V_T] unigram counts of the teacher on the corpus.
    student_counts: int [V_S] unigram counts of the student on the corpus.
    smoothing: additive smoothing of the unigram probabilities (0: exact
      counts; > 0 makes every token a possible cover, which is only feasible
      for small vocabularies).
    observed_only: store only pairs of tokens seen in the counting corpus.
    progress: optional callback (stage, done, total).
    meta: extra metadata stored with the tables.

  Returns:
    The tables.
  """
  t0 = time.time()
  pt_probs = unigram_probs(teacher_counts, smoothing)
  ps_probs = unigram_probs(student_counts, smoothing)

  def ids(tok, probs, counts, only_seen):
    tb = tok.token_bytes
    text = np.array([bool(tb[i]) and i not in tok.special_ids for i in range(tok.vocab_size)])
    m = text & (counts > 0) if only_seen else text
    return np.flatnonzero(m).astype(np.int32), np.flatnonzero(text & (probs > 0)).astype(np.int32)

  t_tokens, t_cands = ids(teacher, pt_probs, teacher_counts, observed_only)
  s_tokens, s_cands = ids(student, ps_probs, student_counts, observed_only)
  pa, pb = suffix_pairs(teacher.token_bytes, student.token_bytes, t_tokens, s_tokens)
  if progress:
    progress("pairs", len(pa), len(pa))
  # Only tokens in some pair need covers.
  t_cov = compute_covers(teacher, np.unique(pa), t_cands,
                         progress and (lambda s, a, b: progress("teacher " + s, a, b)))
  s_cov = compute_covers(student, np.unique(pb), s_cands,
                         progress and (lambda s, a, b: progress("student " + s, a, b)))
  b1 = _one_side(teacher, t_cov, pt_probs, pa, pb, student, progress, "teacher exclusions")
  b2 = _one_side(student, s_cov, ps_probs, pb, pa, teacher, progress, "student exclusions")
  keys = pa.astype(np.int64) * student.vocab_size + pb.astype(np.int64)
  info = dict(meta or {}, smoothing=smoothing, observed_only=observed_only,
              teacher_covers=int(len(t_cov.v)), student_covers=int(len(s_cov.v)),
              seconds=round(time.time() - t0, 1))
  return BiasTables(getattr(teacher, "name", "teacher"), getattr(student, "name", "student"),
                    np.asarray(teacher_counts, np.int64), np.asarray(student_counts, np.int64),
                    keys, b1.astype(np.float32), b2.astype(np.float32), info)
