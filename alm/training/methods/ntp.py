"""Next-token prediction of the student (`sft`; the "+ λ NTP" of the other methods)."""

from __future__ import annotations

from alm.losses.ntp import next_token_loss
from alm.training.terms import Forward, Method, Term, register_method, register_term


@register_term
class NTPTerm(Term):
  """Cross-entropy of the student's next token on its own tokenization (docs/method.md §6)."""

  name = "ntp"
  needs_teacher = False

  def __call__(self, fwd: Forward):
    b = fwd.batch
    return next_token_loss(fwd.student.logits, b["student_ids"], b["student_loss_mask"])


register_method(Method("sft", "Next-token prediction of the student only (no teacher).",
                       (("ntp", 1.0),)))
