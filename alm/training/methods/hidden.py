"""The hidden-state term (docs/method.md §6): add it to any method with add_terms="hidden=W"."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from alm.data.teacher_cache import HIDDEN_KEY
from alm.losses import hidden as hidden_lib
from alm.training.config import ObjectiveConfig, parse_layer_pairs
from alm.training.terms import BuildContext, Forward, Term, register_term


@register_term
class HiddenTerm(Term):
  """Normalised squared error of chunk-end hidden states for chosen layer pairs.

  The head is the learned projection student width -> teacher width (the
  identity, without parameters, when the widths agree). Under gradient
  accumulation `prepass` computes the teacher's per-channel mean squares over
  the whole batch, so the micro-batch losses add up to the whole batch's.

  Args:
    pairs: (teacher layer, student layer) pairs; negative counts from the end.
  """

  name = "hidden"
  teacher_reads = frozenset({"hidden"})

  def __init__(self, pairs: tuple[tuple[int, int], ...] = ((-1, -1),)):
    self.pairs = tuple(pairs)

  @classmethod
  def from_config(cls, objective: ObjectiveConfig) -> "HiddenTerm":
    return cls(parse_layer_pairs(objective.hidden_layers))

  def _layers(self, teacher_cfg, student_cfg) -> tuple[tuple[int, ...], tuple[int, ...]]:
    def norm(layer, n):
      return layer + n + 1 if layer < 0 else layer
    return (tuple(norm(t, teacher_cfg.num_layers) for t, _ in self.pairs),
            tuple(norm(s, student_cfg.num_layers) for _, s in self.pairs))

  def check(self, ctx: BuildContext) -> None:
    for side, layers, n in zip(("teacher", "student"),
                               self._layers(ctx.teacher_cfg, ctx.student_cfg),
                               (ctx.teacher_cfg.num_layers, ctx.student_cfg.num_layers)):
      bad = [l for l in layers if not 0 <= l <= n]
      if bad:
        raise ValueError(f"hidden_layers={ctx.objective.hidden_layers!r}: {side} layer(s) "
                         f"out of range for a {n}-layer model (valid: 0..{n} or "
                         f"-{n + 1}..-1).")

  def teacher_hidden_layers(self, teacher_cfg) -> tuple[int, ...]:
    n = teacher_cfg.num_layers
    return tuple(sorted({t + n + 1 if t < 0 else t for t, _ in self.pairs}))

  def hidden_layers(self, ctx: BuildContext):
    return self._layers(ctx.teacher_cfg, ctx.student_cfg)

  def head(self, ctx: BuildContext, rngs):
    return hidden_lib.HiddenProjector(ctx.student_cfg.hidden_size, ctx.teacher_cfg.hidden_size,
                                      rngs=rngs, param_dtype=ctx.param_dtype)

  def prepass(self, merge, micro, consts):
    model = merge()
    t_layers, _ = self._layers(model.teacher.transformer.cfg, model.student.transformer.cfg)
    d = model.teacher.transformer.cfg.hidden_size

    def sums(carry, mb):
      keys = [HIDDEN_KEY.format(layer=l) for l in t_layers]
      if all(k in mb for k in keys):  # a teacher cache's batch
        states = [mb[k].astype(jnp.float32) for k in keys]
      else:
        model = merge()
        seg = mb["teacher_segment_ids"]
        out = model.teacher(mb["teacher_ids"], attention_mask=seg > 0, segment_ids=seg,
                            positions=mb["teacher_positions"], hidden_layers=t_layers)
        states = [out.hidden_states[l] for l in t_layers]
      s, c = hidden_lib.chunk_end_square_sums(
          states, mb["teacher_chunk_ids"],
          mb["student_chunk_ids"], teacher_loss_mask=mb["teacher_loss_mask"],
          student_loss_mask=mb["student_loss_mask"])
      return (carry[0] + s, carry[1] + c), None

    (s, c), _ = jax.lax.scan(sums, (jnp.zeros((len(t_layers), d), jnp.float32),
                                    jnp.zeros((), jnp.float32)), micro)
    return {"channel_mean_square": s / jnp.maximum(c, 1.0)}

  def __call__(self, fwd: Forward):
    b = fwd.batch
    t_layers, s_layers = self._layers(fwd.model.teacher.transformer.cfg,
                                      fwd.model.student.transformer.cfg)
    ms = fwd.consts.get("channel_mean_square")
    return hidden_lib.hidden_state_loss(
        [fwd.teacher.hidden_states[l] for l in t_layers],
        [fwd.student.hidden_states[l] for l in s_layers], b["teacher_chunk_ids"],
        b["student_chunk_ids"], fwd.head, teacher_loss_mask=b["teacher_loss_mask"],
        student_loss_mask=b["student_loss_mask"],
        channel_mean_square=None if ms is None else list(ms))
