"""DSKD: dual-space knowledge distillation with cross-model attention.

Source: Zhang, Zhang, Xu, Wang, Chen, Xu, "Dual-Space Knowledge Distillation
for Large Language Models" (EMNLP 2024), the cross-model attention (CMA)
variant for teachers and students with different vocabularies, following the
authors' reference criterion (`dual_space_kd_with_cma`). A baseline of the
ALM paper (docs/method.md §7).

For student position i (input token `s_i`, target `s_{i+1}`) and teacher
position j (input `t_j`, target `t_{j+1}`), with frozen embedding tables
`E_S`, `E_T`, final hidden states `h^S`, `h^T` and unembedding matrices
`W_S` [D_S, V_S], `W_T` [D_T, V_T] (both frozen):

  q_i = P_q([E_S s_i ; E_S s_{i+1}])                          [2 D_T]
  k_j = [E_T t_j ; E_T t_{j+1}] / std(k)                      [2 D_T]
  A_ij = q_i . k_j / sqrt(2 D_T)      (masked to trained positions)
  t2s_i = softmax_j(A_ij) . P_t2s(h^T_j / std(h^T) + E_T t_{j+1} / std(E_T t))
  s2t_j = softmax_i(A_ij) . P_s2t(h^S_i)
  loss = sum_i CE(t2s_i W_S, s_{i+1})                      (trains P_q, P_t2s)
       + sum_i [argmax t2s_i W_S = s_{i+1}] KL(sg(t2s_i W_S) || z^S_i)
       + sum_j KL(z^T_j || s2t_j W_T)                (student space -> teacher)

over the trained positions (`z` are the models' own logits, KLs at
temperature `temperature`), returned as a `LossSum` whose count is the number
of trained student positions (the reference code divides the summed terms by
the number of student target tokens). The std's are scalars over every
element of the trained positions of the (micro-)batch; the reference code
takes them over the padded batch, which would make padding change the loss.
Add the student's NTP with `alm.losses.ntp.combined_mean` (the paper's
`(1 - kd_rate) * CE + kd_rate * KD`, kd_rate 0.5).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from alm.losses.reduce import LossSum

_NEG = -1e5  # the reference code's additive attention mask


class DSKDProjector(nnx.Module):
  """The learned parts of DSKD's cross-model attention (three linear maps).

  Attributes:
    query: `P_q`, [2 D_S] -> [2 D_T] (student index embeddings to queries).
    s2t: `P_s2t`, [D_S] -> [D_T] (student hidden states, attention values).
    t2s: `P_t2s`, [D_T] -> [D_S] (teacher values into the student space).
  """

  def __init__(self, student_dim: int, teacher_dim: int, *, rngs: nnx.Rngs,
               param_dtype=jnp.float32):
    """Builds the three maps (with biases, as in the reference code).

    Args:
      student_dim: the student's hidden width D_S.
      teacher_dim: the teacher's hidden width D_T.
      rngs: NNX random streams for the initialisers.
      param_dtype: parameter dtype.
    """
    kw = dict(rngs=rngs, param_dtype=param_dtype)
    self.query = nnx.Linear(2 * student_dim, 2 * teacher_dim, **kw)
    self.s2t = nnx.Linear(student_dim, teacher_dim, **kw)
    self.t2s = nnx.Linear(teacher_dim, student_dim, **kw)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DSKDSide:
  """One model's inputs to DSKD.

  Attributes:
    logits: [B, T, V] the model's logits on `ids`.
    hidden: [B, T, D] its final hidden states (those `unembedding` maps to
      the logits).
    ids: int [B, T] token ids.
    embedding: [V, D] its input embedding table (frozen here).
    unembedding: [D, V] its output matrix (frozen here), e.g. the tied
      embedding transposed or the `lm_head` kernel.
    loss_mask: optional bool [B, T]; token t is trained iff True (position 0
      is never predicted).
  """

  logits: jax.Array
  hidden: jax.Array
  ids: jax.Array
  embedding: jax.Array
  unembedding: jax.Array
  loss_mask: jax.Array | None = None


def _targets_and_mask(side: DSKDSide):
  """(input ids, target ids, trained) for positions 0..T-2."""
  ids = side.ids.astype(jnp.int32)
  keep = jnp.ones(ids.shape, bool) if side.loss_mask is None else (
      side.loss_mask.astype(bool))
  return ids[:, :-1], ids[:, 1:], keep[:, 1:]


def _masked_std(x, mask):
  """Population std over all elements of x[mask] (mask over leading dims)."""
  m = jnp.broadcast_to(mask[..., None], x.shape).astype(x.dtype)
  n = jnp.maximum(jnp.sum(m), 1.0)
  mean = jnp.sum(x * m) / n
  var = jnp.sum(jnp.square(x - mean) * m) / n
  return jnp.sqrt(jnp.maximum(var, 1e-24))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DSKDScales:
  """The three normalising std's of DSKD (scalars; module docstring).

  By default `dskd_loss` computes them over the trained positions of the
  batch it is given. A trainer that splits a batch into micro-batches passes
  the std's of the whole batch instead (`teacher_moments` per micro-batch,
  `merge_moments`, `scales_from_moments`), so that accumulating gradients
  over micro-batches gives exactly the gradient of the whole batch.

  Attributes:
    index: std of the teacher index embeddings `[E_T t_j ; E_T t_{j+1}]`.
    hidden: std of the teacher hidden states `h^T_j`.
    target: std of the teacher target embeddings `E_T t_{j+1}`.
  """

  index: jax.Array
  hidden: jax.Array
  target: jax.Array


def _moments(x, mask):
  """[count, mean, M2] of the elements of x[mask] (two-pass, mask over leading dims)."""
  m = jnp.broadcast_to(mask[..., None], x.shape).astype(x.dtype)
  n = jnp.sum(m)
  mean = jnp.sum(x * m) / jnp.maximum(n, 1.0)
  return jnp.stack([n, mean, jnp.sum(jnp.square(x - mean) * m)])


def teacher_moments(ids: jax.Array, hidden: jax.Array, embedding: jax.Array,
                    loss_mask: jax.Array | None = None) -> jax.Array:
  """Moments of the three teacher quantities DSKD normalises, for one (micro-)batch.

  Args:
    ids: int [B, T] teacher token ids.
    hidden: [B, T, D] teacher final hidden states (as in `DSKDSide`).
    embedding: [V, D] teacher input embedding table.
    loss_mask: optional bool [B, T].

  Returns:
    float [3, 3]: (count, mean, M2) of the index embeddings, the hidden
    states and the target embeddings; combine micro-batches with
    `merge_moments`.
  """
  f32 = jnp.promote_types(jnp.float32, hidden.dtype)
  ids = ids.astype(jnp.int32)
  keep = jnp.ones(ids.shape, bool) if loss_mask is None else loss_mask.astype(bool)
  t_in, t_tg, t_keep = ids[:, :-1], ids[:, 1:], keep[:, 1:]  # as `_targets_and_mask`
  e_t = jax.lax.stop_gradient(embedding).astype(f32)
  t_target = e_t[t_tg]
  t_index = jnp.concatenate([e_t[t_in], t_target], -1)
  h_t = jax.lax.stop_gradient(hidden[:, :-1]).astype(f32)
  return jnp.stack([_moments(t_index, t_keep), _moments(h_t, t_keep),
                    _moments(t_target, t_keep)])


def merge_moments(a: jax.Array, b: jax.Array) -> jax.Array:
  """Moments of the union of two sets from theirs (Chan et al.'s parallel update)."""
  na, ma, m2a = a[..., 0], a[..., 1], a[..., 2]
  nb, mb, m2b = b[..., 0], b[..., 1], b[..., 2]
  n = na + nb
  safe = jnp.maximum(n, 1.0)
  delta = mb - ma
  mean = ma + delta * nb / safe
  m2 = m2a + m2b + jnp.square(delta) * na * nb / safe
  return jnp.stack([n, mean, m2], axis=-1)


def scales_from_moments(moments: jax.Array) -> DSKDScales:
  """The `DSKDScales` (population std's) of moments from `teacher_moments`."""
  n = jnp.maximum(moments[:, 0], 1.0)
  std = jnp.sqrt(jnp.maximum(moments[:, 2] / n, 1e-24))
  return DSKDScales(index=std[0], hidden=std[1], target=std[2])


def _kl(p_logits, q_logits, temperature, dtype):
  """`KL(softmax(p / T) || softmax(q / T))` over the last axis."""
  lp = jax.nn.log_softmax(p_logits.astype(dtype) / temperature, -1)
  lq = jax.nn.log_softmax(q_logits.astype(dtype) / temperature, -1)
  return jnp.sum(jnp.exp(lp) * (lp - lq), axis=-1)


def _check(name, side):
  b, t = side.ids.shape
  if side.logits.shape[:2] != (b, t) or side.hidden.shape[:2] != (b, t):
    raise ValueError(
        f"{name}: logits {side.logits.shape} and hidden {side.hidden.shape} "
        f"must both start with the ids' shape {(b, t)}")
  d, v = side.hidden.shape[-1], side.logits.shape[-1]
  if side.embedding.shape != (v, d) or side.unembedding.shape != (d, v):
    raise ValueError(
        f"{name}: embedding must be [V, D] = {(v, d)} and unembedding "
        f"[D, V] = {(d, v)}; got {side.embedding.shape} and "
        f"{side.unembedding.shape} (pass the unembedding transposed?)")
  if t < 2:
    raise ValueError(f"{name}: need at least 2 tokens per row, got {t}")


def dskd_loss(teacher: DSKDSide, student: DSKDSide, projector: DSKDProjector,
              *, temperature: float = 1.0, scales: DSKDScales | None = None) -> LossSum:
  """DSKD with cross-model attention (Zhang et al., 2024); module docstring.

  Gradients reach the student's logits and hidden states and the projector;
  the teacher and both models' embedding/unembedding matrices are frozen.

  Args:
    teacher: the teacher's `DSKDSide`.
    student: the student's `DSKDSide`.
    projector: a `DSKDProjector(D_S, D_T)` (trained with the student).
    temperature: KL temperature of both KD terms (> 0).
    scales: the normalising std's (`DSKDScales`); default: those of this
      batch's trained positions.

  Returns:
    `LossSum(total = the three summed terms, count = trained student
    positions)`.
  """
  if not (temperature > 0 and math.isfinite(temperature)):
    raise ValueError(f"temperature must be finite and > 0, got {temperature}")
  _check("teacher", teacher)
  _check("student", student)
  if teacher.ids.shape[0] != student.ids.shape[0]:
    raise ValueError(f"batch sizes differ: teacher {teacher.ids.shape[0]}, "
                     f"student {student.ids.shape[0]}")
  # float32 at least (bf16 inputs), float64 when the inputs are (tests).
  f32 = jnp.promote_types(jnp.float32, student.logits.dtype)
  sg = jax.lax.stop_gradient
  s_in, s_tg, s_keep = _targets_and_mask(student)  # [B, T_S - 1]
  t_in, t_tg, t_keep = _targets_and_mask(teacher)  # [B, T_T - 1]
  e_s, e_t = sg(student.embedding).astype(f32), sg(teacher.embedding).astype(f32)
  d_t = e_t.shape[-1]
  s_index = jnp.concatenate([e_s[s_in], e_s[s_tg]], -1)  # [B, S, 2 D_S]
  t_target = e_t[t_tg]  # [B, J, D_T]
  t_index = jnp.concatenate([e_t[t_in], t_target], -1)  # [B, J, 2 D_T]
  h_t = sg(teacher.hidden[:, :-1]).astype(f32)  # [B, J, D_T]
  h_s = student.hidden[:, :-1].astype(f32)  # [B, S, D_S]

  if scales is None:
    k_std, h_std, tg_std = (_masked_std(t_index, t_keep), _masked_std(h_t, t_keep),
                            _masked_std(t_target, t_keep))
  else:
    k_std, h_std, tg_std = (sg(jnp.asarray(x, f32)) for x in (scales.index, scales.hidden,
                                                               scales.target))
  q = projector.query(s_index).astype(f32)  # [B, S, 2 D_T]
  k = t_index / k_std
  v_t = projector.t2s(h_t / h_std + t_target / tg_std).astype(f32)
  v_s = projector.s2t(h_s).astype(f32)  # [B, S, D_T]
  align = jnp.einsum("bsd,bjd->bsj", q, k) / math.sqrt(2 * d_t)
  pair = s_keep[:, :, None] & t_keep[:, None, :]
  align = jnp.where(pair, align, align + _NEG)

  # Teacher space -> student space.
  t2s_h = jnp.einsum("bsj,bjd->bsd", jax.nn.softmax(align, -1), v_t)
  t2s_logits = t2s_h @ sg(student.unembedding).astype(f32)  # [B, S, V_S]
  t2s_lp = jax.nn.log_softmax(t2s_logits, -1)
  t2s_ce = -jnp.take_along_axis(t2s_lp, s_tg[..., None], -1)[..., 0]
  correct = jnp.argmax(t2s_logits, -1) == s_tg
  t2s_kd = _kl(sg(t2s_logits), student.logits[:, :-1], temperature, f32)

  # Student space -> teacher space.
  s2t_h = jnp.einsum("bsj,bsd->bjd", jax.nn.softmax(align, 1), v_s)
  s2t_logits = s2t_h @ sg(teacher.unembedding).astype(f32)  # [B, J, V_T]
  s2t_kd = _kl(sg(teacher.logits[:, :-1]), s2t_logits, temperature, f32)

  total = (jnp.sum(jnp.where(s_keep, t2s_ce, 0.0))
           + jnp.sum(jnp.where(s_keep & correct, t2s_kd, 0.0))
           + jnp.sum(jnp.where(t_keep, s2t_kd, 0.0)))
  return LossSum(total=total, count=jnp.sum(s_keep).astype(f32))
