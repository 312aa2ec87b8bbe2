"""ULD: L1 distance between sorted probability vectors (docs/method.md §7), + λ NTP."""

from __future__ import annotations

from alm.losses import baselines
from alm.training.config import ObjectiveConfig
from alm.training.terms import Forward, Method, Term, register_method, register_term


@register_term
class ULDTerm(Term):
  """ULD pairs the k-th trained token of each side of a row.

  Args:
    top_k: compare only the K largest probabilities of each side, the rest as
      one tail mass (`alm.losses.baselines.uld_loss`); 0: the exact full sort.
  """

  name = "uld"

  def __init__(self, top_k: int = baselines.ULD_TOP_K):
    self.top_k = top_k

  @classmethod
  def from_config(cls, objective: ObjectiveConfig) -> "ULDTerm":
    return cls(objective.uld_top_k)

  def __call__(self, fwd: Forward):
    b = fwd.batch
    return baselines.uld_loss(fwd.teacher.logits, b["teacher_ids"], b["teacher_loss_mask"],
                              fwd.student.logits, b["student_ids"], b["student_loss_mask"],
                              top_k=self.top_k or None)


register_method(Method("uld", "ULD (sorted-probability L1) + ntp_weight * NTP.",
                       (("uld", 1.0), ("ntp", "ntp_weight"))))
