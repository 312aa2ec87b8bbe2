"""Chunk constraints never merge across a document's end, and never train a cut chunk as whole.

docs/method.md §4: no constraint ever merges across the end of a document
(packed rows, segment ids): the end of a document always ends a chunk. And a row
cut from a longer document ends at a cut, not at the end of the text: a
merged chunk that reaches the cut with its boundary rejected is incomplete.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import losses_reference as ref
from alm.data import pipeline as pl
from alm.losses import alm as alm_lib
from alm.testing.tokenizers import GreedyTokenizer

V = 11


def _doc(rng, n_tokens, n_chunks_max):
  """One document's chunk ids (token 0 in no chunk, as the pipeline leaves it)."""
  cids, c, pos = [-1], 0, 1
  while pos < n_tokens:
    size = int(rng.integers(1, 3))
    for _ in range(min(size, n_tokens - pos)):
      cids.append(c)
      pos += 1
    c += 1
    if c >= n_chunks_max:
      break
  cids += [-1] * (n_tokens - len(cids))
  return np.asarray(cids, np.int32)


def _random_docs(seed, n_docs, min_len=3, max_len=7):
  rng = np.random.default_rng(seed)
  docs = []
  for _ in range(n_docs):
    out = {}
    n_t, n_s = int(rng.integers(min_len, max_len)), int(rng.integers(min_len, max_len))
    c = min(n_t, n_s) - 1
    ct, cs = _doc(rng, n_t, c), _doc(rng, n_s, c)
    # The same number of chunks on both sides.
    c = min(ct.max(), cs.max()) + 1
    ct[ct >= c], cs[cs >= c] = -1, -1
    for side, cid in (("teacher", ct), ("student", cs)):
      n = len(cid)
      out[side] = dict(logits=rng.normal(size=(n, V)).astype(np.float32) * 2.0,
                       ids=rng.integers(0, V, n).astype(np.int32), chunk_ids=cid)
    docs.append(out)
  return docs, rng.random(V) < 0.4


def _pack(docs, sides=("teacher", "student"), cut_last=False):
  """One packed row of `docs` (chunk ids renumbered along the row, segments 1, 2, ...)."""
  row = {}
  for side in sides:
    parts, offset = [], 0
    for k, d in enumerate(docs):
      cid = d[side]["chunk_ids"].copy()
      cid[cid >= 0] += offset
      offset += int(d[side]["chunk_ids"].max()) + 1
      parts.append((d[side], cid, k + 1))
    row[side] = dict(
        logits=np.concatenate([p["logits"] for p, _, _ in parts]),
        ids=np.concatenate([p["ids"] for p, _, _ in parts]),
        chunk_ids=np.concatenate([c for _, c, _ in parts]),
        segment_ids=np.concatenate([np.full(len(c), s, np.int32) for _, c, s in parts]),
        text_continues=np.concatenate([
            np.full(len(c), cut_last and s == len(docs), bool) for _, c, s in parts]))
  return row


def _batch(rows, boundary_mask, pad_to=None):
  """Stacks rows (dicts of 1-D arrays) into `Side`s, padding with segment 0."""
  out = []
  for side in ("teacher", "student"):
    t = pad_to or max(len(r[side]["ids"]) for r in rows)
    def pad(a, fill, t=t):
      return np.concatenate([a, np.full((t - len(a),) + a.shape[1:], fill, a.dtype)])
    get = lambda k, fill: np.stack([pad(r[side][k], fill) for r in rows])
    seg = (get("segment_ids", 0) if "segment_ids" in rows[0][side] else None)
    cont = (get("text_continues", False) if "text_continues" in rows[0][side] else None)
    out.append(alm_lib.Side(
        logits=jnp.asarray(get("logits", 0.0)), ids=jnp.asarray(get("ids", 0)),
        chunk_ids=jnp.asarray(get("chunk_ids", -1)), boundary_mask=jnp.asarray(boundary_mask),
        segment_ids=None if seg is None else jnp.asarray(seg),
        text_continues=None if cont is None else jnp.asarray(cont)))
  return out


@functools.partial(jax.jit, static_argnums=2)
def _loss_and_grad_jit(teacher, student, config):
  def f(logits):
    s = alm_lib.Side(logits, student.ids, student.chunk_ids, student.loss_mask,
                     student.boundary_mask, student.segment_ids, student.text_continues)
    out = alm_lib.alm_loss(teacher, s, config)
    return out.total, out
  (_, out), grad = jax.value_and_grad(f, has_aux=True)(student.logits)
  return out.total, out.count, grad


def _loss_and_grad(teacher, student, config):
  total, count, grad = _loss_and_grad_jit(teacher, student, config)
  return float(total), float(count), np.asarray(grad)


@pytest.mark.parametrize("constraint,seed", [("boundary_prob", 0), ("boundary_prob", 1),
                                             ("unconstrained", 2)])
def test_a_packed_row_is_the_sum_of_its_documents(constraint, seed):
  """Loss sum, chunk count and gradient of a packed row equal those of its documents alone."""
  docs, bmask = _random_docs(seed, n_docs=4)
  config = alm_lib.ALMConfig(constraint=constraint, gamma=0.5, tau=1.0)
  packed = _batch([_pack(docs)], bmask)
  separate = _batch([_pack([d]) for d in docs], bmask)
  tot_p, cnt_p, g_p = _loss_and_grad(*packed, config)
  tot_s, cnt_s, g_s = _loss_and_grad(*separate, config)
  assert cnt_p == cnt_s > 0
  np.testing.assert_allclose(tot_p, tot_s, rtol=1e-5)
  # The packed row's gradient, cut back into documents.
  lens = [len(d["student"]["ids"]) for d in docs]
  starts = np.cumsum([0] + lens)
  for k, n in enumerate(lens):
    np.testing.assert_allclose(g_p[0, starts[k]:starts[k] + n], g_s[k, :n], rtol=1e-5,
                               atol=1e-7)


def _reference_groups(row, log_gamma):
  """Brute force: boundary_prob groups of one packed row, with document ends and cuts.

  Returns a list of (teacher positions, student positions, trained) per group.
  """
  t, s = row["teacher"], row["student"]
  path_t, bnd_t = ref.token_logprobs(t["logits"][None], t["ids"][None], row["bmask"])
  chunks = sorted(set(t["chunk_ids"][t["chunk_ids"] >= 0].tolist()))
  groups, cur_t, cur_s = [], [], []
  for c in chunks:
    tp = np.flatnonzero(t["chunk_ids"] == c).tolist()
    sp = np.flatnonzero(s["chunk_ids"] == c).tolist()
    cur_t += tp
    cur_s += sp
    doc = t["segment_ids"][tp[-1]]
    # Is chunk c the last chunk of its document in this row?
    later = [q for q in range(tp[-1] + 1, len(t["ids"]))
             if t["segment_ids"][q] == doc and t["chunk_ids"][q] >= 0]
    last_of_doc = not later
    keep = bnd_t[0, tp[-1]] > log_gamma
    if keep or last_of_doc:
      complete = keep or not t["text_continues"][tp[-1]]
      groups.append((cur_t, cur_s, complete))
      cur_t, cur_s = [], []
  return groups


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_boundary_prob_groups_match_a_brute_force_with_cuts(seed):
  """A row whose last document was cut: its unfinished last group is not trained."""
  docs, bmask = _random_docs(seed, n_docs=3, min_len=4, max_len=9)
  row = _pack(docs, cut_last=True)
  gamma = 0.5
  teacher, student = _batch([row], bmask)
  config = alm_lib.ALMConfig(constraint="boundary_prob", gamma=gamma, tau=1.0, debias=False)
  ch = alm_lib.aligned_chunk_logprobs(teacher, student, config)
  groups = _reference_groups(dict(row, bmask=bmask), math.log(gamma))
  path_t, _ = ref.token_logprobs(row["teacher"]["logits"][None], row["teacher"]["ids"][None],
                                 None)
  path_s, _ = ref.token_logprobs(row["student"]["logits"][None], row["student"]["ids"][None],
                                 None)
  want = [(sum(path_t[0, p] for p in tp), sum(path_s[0, p] for p in sp))
          for tp, sp, ok in groups if ok]
  valid = np.asarray(ch.valid[0])
  got = list(zip(np.asarray(ch.teacher[0])[valid], np.asarray(ch.student[0])[valid]))
  assert len(got) == len(want)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
  # The cut document's last group is rejected exactly when its boundary is.
  assert sum(not ok for _, _, ok in groups) <= 1


def test_a_cut_row_ending_in_a_rejected_boundary_trains_nothing_past_the_last_kept_one():
  """Every boundary rejected: a complete document is one chunk; a cut one trains no chunk."""
  docs, bmask = _random_docs(7, n_docs=2, min_len=5, max_len=8)
  for d in docs:  # the teacher never predicts a boundary
    d["teacher"]["logits"][:, bmask] = -30.0
  config = alm_lib.ALMConfig(constraint="boundary_prob", gamma=0.1, tau=1.0)
  whole = _batch([_pack(docs)], bmask)
  cut = _batch([_pack(docs, cut_last=True)], bmask)
  assert float(alm_lib.alm_loss(*whole, config).count) == 2  # one group per document
  assert float(alm_lib.alm_loss(*cut, config).count) == 1    # the cut document's is dropped


# ---------------------------------------------------------------------------
# The data pipeline marks cut pieces, and packed batches never merge documents.

TEACHER = GreedyTokenizer(["the", "he", " the", "ing", " a", "an", "and", " and", "ion", "  ",
                           "é"], name="T")
STUDENT = GreedyTokenizer(["th", "e ", "the ", "in", "ng", " an", "and ", "io", "on", " t"],
                          add_bos=False, name="S")
DOCS = ["the cat and the thing", "another one, and then the king sang",
        "and the king sang " * 6, "hello", "thin ice " * 3, "an é and the ion"]


def _docs_file(tmp_path):
  import json  # pylint: disable=import-outside-toplevel
  p = tmp_path / "docs.jsonl"
  p.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
  return str(p)


@pytest.mark.parametrize("long_documents", ["truncate", "split"])
def test_pipeline_marks_pieces_cut_from_longer_documents(tmp_path, long_documents):
  cfg = pl.PipelineConfig(batch_size=1, teacher_len=24, student_len=24, mode="pad",
                          shuffle=False, num_epochs=1, long_documents=long_documents)
  rows = list(pl.Pipeline(_docs_file(tmp_path), TEACHER, STUDENT, cfg))
  seen_cut = seen_whole = False
  for batch in rows:
    for side, tok in (("teacher", TEACHER), ("student", STUDENT)):
      seg = batch[f"{side}_segment_ids"][0]
      cont = batch[f"{side}_text_continues"][0]
      assert not cont[seg == 0].any()  # padding is never "continued"
      assert len(set(cont[seg > 0].tolist())) <= 1  # one flag per piece
    cont = bool(batch["teacher_text_continues"][0].any())
    assert cont == bool(batch["student_text_continues"][0].any())
    seen_cut |= cont
    seen_whole |= not cont
  assert seen_cut and seen_whole
  if long_documents == "split":
    # Every document's final piece is whole: one uncut row per document.
    assert sum(not b["teacher_text_continues"][0].any() for b in rows) == len(DOCS)


def test_packed_pipeline_batches_never_merge_two_documents(tmp_path):
  """Boundary probability ~0 everywhere: every complete document is exactly one chunk."""
  cfg = pl.PipelineConfig(batch_size=2, teacher_len=40, student_len=40, mode="pack",
                          shuffle=False, num_epochs=1, long_documents="split")
  batches = list(pl.Pipeline(_docs_file(tmp_path), TEACHER, STUDENT, cfg))
  bmask_t = np.asarray(TEACHER.boundary_token_mask(), bool)
  bmask_s = np.asarray(STUDENT.boundary_token_mask(), bool)
  config = alm_lib.ALMConfig(constraint="boundary_prob", gamma=0.1, tau=1.0)
  rng = np.random.default_rng(0)
  n_docs_with_chunks = total = 0
  for b in batches:
    sides = []
    for side, bmask in (("teacher", bmask_t), ("student", bmask_s)):
      ids = b[f"{side}_ids"]
      logits = rng.normal(size=ids.shape + (len(bmask),)).astype(np.float32)
      if side == "teacher":
        logits[..., bmask] = -30.0  # no boundary is ever predicted: every chunk merges
      sides.append(alm_lib.Side(
          logits=jnp.asarray(logits), ids=jnp.asarray(ids),
          chunk_ids=jnp.asarray(b[f"{side}_chunk_ids"]),
          loss_mask=jnp.asarray(b[f"{side}_loss_mask"]), boundary_mask=jnp.asarray(bmask),
          segment_ids=jnp.asarray(b[f"{side}_segment_ids"]),
          text_continues=jnp.asarray(b[f"{side}_text_continues"])))
    total += float(alm_lib.alm_loss(*sides, config).count)
    for r in range(b["teacher_ids"].shape[0]):
      seg, cid = b["teacher_segment_ids"][r], b["teacher_chunk_ids"][r]
      cont = b["teacher_text_continues"][r]
      for doc in set(seg[seg > 0].tolist()):
        in_doc = seg == doc
        if (cid[in_doc] >= 0).any() and not cont[in_doc].any():
          n_docs_with_chunks += 1
  assert n_docs_with_chunks >= 3
  assert total == n_docs_with_chunks


def test_each_constraint_has_one_implementation():
  """"unbiased" only in alm.align (host), "boundary_prob" only in the loss (device); the
  main term's "space" in alm.align, and the loss's own "space" (the `alm_space` term) is
  checked equal to it in test_alm_space.py.

  Before, "space" ran both in the pipeline's alm.align and again in the loss for the
  same term, and the two disagreed when token 0 was text (the loss kept the rest of the
  first word, alm.align dropped the whole word; the loss's rule now drops it too).
  """
  from alm.training import step as step_lib  # pylint: disable=import-outside-toplevel
  from alm.training.config import TrainConfig  # pylint: disable=import-outside-toplevel
  from alm.training.methods.alm import ALMTerm  # pylint: disable=import-outside-toplevel
  device_constraint = lambda cfg: ALMTerm.from_config(cfg.objective).cfg.constraint
  for constraint in ("space", "unbiased"):
    cfg = TrainConfig.build(constraint=constraint)
    assert step_lib.Objective(cfg).data_constraint == constraint
    assert device_constraint(cfg) == "unconstrained"
  with pytest.raises(ValueError, match="alm.align"):
    alm_lib.ALMConfig(constraint="unbiased")
  cfg = TrainConfig.build(constraint="boundary_prob")
  assert step_lib.Objective(cfg).data_constraint == "unconstrained"
  assert device_constraint(cfg) == "boundary_prob"
