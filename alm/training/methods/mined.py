"""MinED: KL at one-to-one aligned positions through an edit-distance vocabulary map
(docs/method.md §7), + λ NTP."""

from __future__ import annotations

import logging

import numpy as np

from alm.losses import baselines
from alm.training.terms import BuildContext, Forward, Method, Term, register_method, register_term


def mined_map_cache(teacher_tok, student_tok):
  """Where the MinED vocabulary map of a tokenizer pair is cached (`~/.cache/alm/mined/`)."""
  from alm import assets  # pylint: disable=import-outside-toplevel
  from alm.training.students import pair_hash  # pylint: disable=import-outside-toplevel
  return assets.cache_dir() / "mined" / f"{pair_hash(teacher_tok, student_tok)}.npz"


def cached_mined_map(teacher_tok, student_tok) -> np.ndarray:
  """The MinED map (student id -> teacher id of minimal edit distance), cached on disk.

  `alm.losses.baselines.load_or_compute_mined_map` on the pair's token bytes,
  stored under `mined_map_cache(...)` (the file also holds a fingerprint of
  both vocabularies, so a stale file is recomputed, never reused). Special
  tokens carry no bytes, so the byte-level map would send every student
  special to the first teacher special; BOS and EOS are mapped to their
  counterparts instead (when both tokenizers have them).

  Returns:
    int32 [V_S] teacher id per student id.
  """
  path = mined_map_cache(teacher_tok, student_tok)
  if not path.exists():
    logging.info("Computing the MinED vocabulary map (%d x %d tokens; once per tokenizer "
                 "pair, cached in %s)", student_tok.vocab_size, teacher_tok.vocab_size, path)
  m = np.array(baselines.load_or_compute_mined_map(
      path, list(student_tok.token_bytes), list(teacher_tok.token_bytes)), np.int32)
  for role in ("bos_id", "eos_id"):
    s_id, t_id = getattr(student_tok, role, None), getattr(teacher_tok, role, None)
    if s_id is not None and t_id is not None:
      m[int(s_id)] = int(t_id)
  return m


@register_term
class MinEDTerm(Term):
  """MinED's KL; its one-to-one positions are defined on the finest chunks."""

  name = "mined"

  def data_constraint(self) -> str:
    return "unconstrained"

  def consts(self, ctx: BuildContext):
    return {"mined_map": cached_mined_map(ctx.teacher_tok, ctx.student_tok)}

  def __call__(self, fwd: Forward):
    b = fwd.batch
    return baselines.mined_loss(
        fwd.teacher.logits, b["teacher_ids"], b["teacher_chunk_ids"], fwd.student.logits,
        b["student_ids"], b["student_chunk_ids"], fwd.consts["mined_map"],
        teacher_loss_mask=b["teacher_loss_mask"], student_loss_mask=b["student_loss_mask"])


register_method(Method("mined", "MinED (edit-distance vocabulary map, KL) + ntp_weight * NTP.",
                       (("mined", 1.0), ("ntp", "ntp_weight"))))
