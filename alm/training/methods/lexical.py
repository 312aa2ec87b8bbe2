"""ZeTT's lexical term for hypernetwork training (SPEC §11, docs/method.md §14).

Add it to a hypernetwork run with `add_terms="lexical=W"`: for every local
row whose token is also a base token (same bytes), the squared error between
its predicted embedding and the base's own embedding of that token, divided
by the squared norm of the base's embedding (a scale-free error: 1 means the
prediction is as far from the original as the original is from zero),
averaged over those rows. ZeTT used such an auxiliary MSE to keep the
hypernetwork faithful on the tokens the vocabularies share. With the FVT
residual the term is 0 at initialisation (FVT copies shared tokens).
"""

from __future__ import annotations

import jax.numpy as jnp

from alm.losses.reduce import LossSum
from alm.training.config import TrainConfigError
from alm.training.terms import BuildContext, Forward, Term, register_term

_ONLY_HYPERNET = ("The lexical term compares a hypernetwork's predicted embeddings with the base "
                  "model's, so it applies to hypernetwork training only "
                  "(experiments.train_hypernet --add_terms=lexical=W); drop it from this run's "
                  "add_terms.")


@register_term
class LexicalTerm(Term):
  """Relative squared error of predicted vs original embeddings of shared tokens."""

  name = "lexical"
  needs_teacher = False
  teacher_reads = frozenset()

  def check(self, ctx: BuildContext) -> None:
    if ctx.student_kind and ctx.student_kind != "hypernet":
      raise TrainConfigError(_ONLY_HYPERNET)

  def __call__(self, fwd: Forward) -> LossSum:
    rows = getattr(fwd.student, "rows", None)
    b = fwd.batch
    if rows is None or "student_vocab_shared" not in b:
      raise TrainConfigError(_ONLY_HYPERNET)
    target = b["student_vocab_fvt_in"]
    if "student_vocab_fvt_out" in b:
      target = jnp.concatenate([target, b["student_vocab_fvt_out"]], axis=-1)
    target = target.astype(jnp.float32)
    err = jnp.sum(jnp.square(rows.astype(jnp.float32) - target), axis=-1)
    rel = err / jnp.maximum(jnp.sum(jnp.square(target), axis=-1), 1e-12)
    keep = b["student_vocab_shared"].astype(bool)
    return LossSum(jnp.sum(jnp.where(keep, rel, 0.0)), jnp.sum(keep).astype(jnp.float32))
