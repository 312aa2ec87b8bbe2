"""Approximate Likelihood Matching (docs/method.md §4), alone and with NTP."""

from __future__ import annotations

import numpy as np

from alm.losses import alm as alm_loss_lib
from alm.tokenization.vocab import shared_boundary_bytes
from alm.training.config import ObjectiveConfig
from alm.training.terms import BuildContext, Forward, Method, Term, register_method, register_term

# "space" and "unbiased" need only the tokens (and the bias tables), so `alm.align`
# applies them where the chunks are made and they reach the loss already merged;
# "boundary_prob" needs the teacher's probabilities, so the loss applies it.
HOST_CONSTRAINTS = ("space", "unbiased")


@register_term
class ALMTerm(Term):
  """The ALM loss over the batch's aligned chunks.

  Args:
    cfg: the loss options; `constraint` is the one the loss applies
      ("unconstrained" or "boundary_prob").
    data: the constraint the pipeline must align with.
  """

  name = "alm"
  teacher_reads = frozenset({"token_logprobs"})  # a teacher cache has all it needs

  def __init__(self, cfg: alm_loss_lib.ALMConfig, data: str = "unconstrained"):
    self.cfg, self.data = cfg, data

  @classmethod
  def from_config(cls, objective: ObjectiveConfig) -> "ALMTerm":
    c = objective.constraint
    return cls(alm_loss_lib.ALMConfig(
        divergence=objective.divergence, tau=objective.tau,
        constraint="boundary_prob" if c == "boundary_prob" else "unconstrained",
        gamma=objective.gamma, debias=objective.debias),
               data=c if c in HOST_CONSTRAINTS else "unconstrained")

  def data_constraint(self) -> str:
    return self.data

  def consts(self, ctx: BuildContext) -> dict[str, np.ndarray]:
    """Boundary-token masks of both vocabularies, from one set of shared boundary bytes.

    The debiasing event must be the same on the two sides (see
    `alm.tokenization.vocab.shared_boundary_bytes`).
    """
    tt, st = ctx.teacher_tok, ctx.student_tok
    shared = (shared_boundary_bytes(tt, st)
              if self.cfg.debias or self.cfg.constraint != "unconstrained" else None)
    return {"teacher_boundary": np.asarray(tt.boundary_token_mask(shared), bool),
            "student_boundary": np.asarray(st.boundary_token_mask(shared), bool)}

  def __call__(self, fwd: Forward):
    b, c = fwd.batch, fwd.consts

    def side(name, out):
      # A cached teacher (alm.training.step.CachedTeacher) has token log-probs, no logits;
      # a batch with its own student vocabulary (hypernetwork training) has its own
      # boundary rows.
      boundary = b.get(f"{name}_vocab_boundary", c[f"{name}_boundary"])
      return alm_loss_lib.Side(
          logits=out.logits, ids=b[f"{name}_ids"], chunk_ids=b[f"{name}_chunk_ids"],
          loss_mask=b[f"{name}_loss_mask"], boundary_mask=boundary,
          segment_ids=b[f"{name}_segment_ids"], text_continues=b[f"{name}_text_continues"],
          token_logprobs=getattr(out, "token_logprobs", None))

    return alm_loss_lib.alm_loss(side("teacher", fwd.teacher), side("student", fwd.student),
                                 self.cfg)


@register_term
class ALMSpaceTerm(ALMTerm):
  """ALM over chunks merged up to whitespace boundaries (the loss's "space" constraint).

  The byte-transfer recipe's second ALM term (docs/method.md §8): the same
  batch, the chunks merged where the next token on either side does not start
  a pretoken, so the chunks are close to words. It reads the chunks the main
  term asked the pipeline for.
  """

  name = "alm_space"

  @classmethod
  def from_config(cls, objective: ObjectiveConfig) -> "ALMSpaceTerm":
    c = objective.constraint
    return cls(alm_loss_lib.ALMConfig(divergence=objective.divergence, tau=objective.tau,
                                      constraint="space", gamma=objective.gamma,
                                      debias=objective.debias),
               data=c if c in HOST_CONSTRAINTS else "unconstrained")


register_method(Method("alm", "ALM: match the teacher's chunk likelihoods.", (("alm", 1.0),)))
register_method(Method("alm+sft", "ALM + ntp_weight * next-token prediction.",
                       (("alm", 1.0), ("ntp", "ntp_weight"))))
