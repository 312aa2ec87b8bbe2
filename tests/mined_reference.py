"""The pure-Python/numpy MinED map, kept as an independent reference.

`alm.losses.baselines.mined_vocab_map` before it moved to rapidfuzz (commit
f212eb4): the same map (byte-level Levenshtein, ties to the smallest teacher
id), computed by three exact stages of its own. Too slow for a full real
vocabulary pair (about 2 CPU-hours for SmolLM2 -> Qwen3); the tests compare it
with the fast map on samples.
"""

from __future__ import annotations

import numpy as np


def _edit_distances(s: bytes, cands: np.ndarray, lens: np.ndarray) -> np.ndarray:
  """Levenshtein distance of `s` to every candidate (uint8 [N, L], lengths)."""
  n, width = cands.shape
  prev = np.broadcast_to(np.arange(width + 1), (n, width + 1)).copy()
  for i, ch in enumerate(s, start=1):
    cur = np.empty_like(prev)
    cur[:, 0] = i
    sub = prev[:, :-1] + (cands != ch)
    for j in range(1, width + 1):
      cur[:, j] = np.minimum(np.minimum(prev[:, j] + 1, cur[:, j - 1] + 1),
                             sub[:, j - 1])
    prev = cur
  return prev[np.arange(n), lens]


def _deletions(tok: bytes) -> set[bytes]:
  """`tok` and every string obtained from it by deleting one byte."""
  return {tok} | {tok[:i] + tok[i + 1:] for i in range(len(tok))}


def _levenshtein(a: bytes, b: bytes) -> int:
  prev = list(range(len(b) + 1))
  for i, ca in enumerate(a, 1):
    cur = [i]
    for j, cb in enumerate(b, 1):
      cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
    prev = cur
  return prev[-1]


def mined_vocab_map_python(student_tokens: list[bytes], teacher_tokens: list[bytes]
                    ) -> np.ndarray:
  """Maps every student token to the teacher token of minimal edit distance.

  Byte-level Levenshtein distance; ties go to the smallest teacher id; exact.
  Three stages, each exact for the tokens it decides:
    1. an identical teacher token (distance 0): a dictionary look-up;
    2. distance 1: two strings are within distance 1 iff one-deletion
       neighbourhoods intersect (a substitution deletes the same position
       from both, an insertion is a deletion from the longer), so an index
       from every teacher token's one-deletion variants to its ids gives
       every teacher token at distance <= 1 (the symmetric-delete idea of
       SymSpell); the candidates are checked with the exact distance;
    3. the rest (no teacher token within distance 1) are searched among the
       teacher tokens whose length differs by at most 2, then, if none is
       that close, by at most the best distance found there (the length
       difference is a lower bound of the distance, so the second window
       holds the minimum), vectorised over candidates.

  Args:
    student_tokens: bytes of each student id (`tokenizer.token_bytes`).
    teacher_tokens: bytes of each teacher id.

  Returns:
    int32 [V_S] teacher id per student id.
  """
  exact: dict[bytes, int] = {}
  for i, tok in enumerate(teacher_tokens):
    exact.setdefault(tok, i)
  out = np.zeros(len(student_tokens), np.int32)
  rest = []
  deletion_index: dict[bytes, list[int]] | None = None
  for sid, tok in enumerate(student_tokens):
    if tok in exact:
      out[sid] = exact[tok]
      continue
    if deletion_index is None:  # built only when some token needs it
      deletion_index = {}
      for i, t in enumerate(teacher_tokens):
        for v in _deletions(t):
          deletion_index.setdefault(v, []).append(i)
    cands = {i for v in _deletions(tok) for i in deletion_index.get(v, ())}
    near = sorted(i for i in cands if _levenshtein(tok, teacher_tokens[i]) == 1)
    if near:
      out[sid] = near[0]
    else:
      rest.append(sid)
  if not rest:
    return out
  lens = np.array([len(t) for t in teacher_tokens])
  width = max(1, int(lens.max()))
  packed = np.zeros((len(teacher_tokens), width), np.int16)
  packed -= 1  # never equal to a byte
  for i, tok in enumerate(teacher_tokens):
    packed[i, :len(tok)] = np.frombuffer(tok, np.uint8)
  for sid in rest:
    tok = student_tokens[sid]
    gap = np.abs(lens - len(tok))  # a lower bound of the distance
    bound = max(2, int(gap.min()))
    while True:
      idx = np.flatnonzero(gap <= bound)
      w = max(1, int(lens[idx].max()))
      d = _edit_distances(tok, packed[idx, :w], lens[idx])
      j = int(np.argmin(d))  # first = smallest id among the minima
      if d[j] <= bound:
        # Every token outside the window is farther than `bound` >= d[j], so
        # this is the global minimum and the smallest id among its ties.
        out[sid] = int(idx[j])
        break
      # The minimum is <= d[j]: only tokens within length difference d[j]
      # can reach it. The next window contains this one, so it ends there.
      bound = int(d[j])
  return out
