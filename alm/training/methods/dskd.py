"""DSKD, dual-space knowledge distillation (docs/method.md §7), + λ NTP."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from alm.losses import dskd as dskd_lib
from alm.training.terms import BuildContext, Forward, Method, Term, register_method, register_term


def _final_hidden(transformer, out) -> jax.Array:
  """The normed last-layer hidden states, those the output matrix maps to the logits."""
  h = out.hidden_states[transformer.cfg.num_layers]
  return transformer.final_norm(h.astype(transformer.dtype))


def _unembedding(transformer) -> jax.Array:
  """[D, V] output matrix (the tied embedding transposed, or the lm_head kernel)."""
  if transformer.lm_head is None:
    return transformer.embedder.embedding[...].T
  return transformer.lm_head.kernel[...]


def _side(transformer, out, batch, side: str) -> dskd_lib.DSKDSide:
  return dskd_lib.DSKDSide(
      logits=out.logits, hidden=_final_hidden(transformer, out), ids=batch[f"{side}_ids"],
      embedding=transformer.embedder.embedding[...], unembedding=_unembedding(transformer),
      loss_mask=batch[f"{side}_loss_mask"])


@register_term
class DSKDTerm(Term):
  """DSKD's cross-model-attention loss; trains its projector (the term's head).

  DSKD normalises by std's of teacher quantities over the batch; under gradient
  accumulation `prepass` computes them over the whole batch first (one extra
  teacher forward per micro-batch), so accumulation stays exact.
  """

  name = "dskd"

  def hidden_layers(self, ctx: BuildContext):
    return (-1,), (-1,)

  def head(self, ctx: BuildContext, rngs):
    return dskd_lib.DSKDProjector(ctx.student_cfg.hidden_size, ctx.teacher_cfg.hidden_size,
                                  rngs=rngs, param_dtype=ctx.param_dtype)

  def prepass(self, merge, micro, consts):
    def moments(carry, mb):
      model = merge()
      tr = model.teacher.transformer
      seg = mb["teacher_segment_ids"]
      out = model.teacher(mb["teacher_ids"], attention_mask=seg > 0, segment_ids=seg,
                          positions=mb["teacher_positions"], hidden_layers=(-1,))
      m = dskd_lib.teacher_moments(mb["teacher_ids"], _final_hidden(tr, out),
                                   tr.embedder.embedding[...], mb["teacher_loss_mask"])
      return dskd_lib.merge_moments(carry, m), None

    mom, _ = jax.lax.scan(moments, jnp.zeros((3, 3), jnp.float32), micro)
    return {"dskd_scales": dskd_lib.scales_from_moments(mom)}

  def __call__(self, fwd: Forward):
    m, b = fwd.model, fwd.batch
    return dskd_lib.dskd_loss(_side(m.teacher.transformer, fwd.teacher, b, "teacher"),
                              _side(m.student.transformer, fwd.student, b, "student"), fwd.head,
                              scales=fwd.consts.get("dskd_scales"))


register_method(Method("dskd", "DSKD (cross-model attention) + ntp_weight * NTP.",
                       (("dskd", 1.0), ("ntp", "ntp_weight"))))
