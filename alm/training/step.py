"""The jit-compiled train step: losses, exact gradient accumulation, mesh.

The model is split once into `(graphdef, trainable, frozen)` with the explicit
filter of `alm.training.model.trainable_filter`; the step is a pure function
of `(trainable, opt_state, frozen, batch, consts)` compiled with `jax.jit`,
donating `trainable` and `opt_state`.

Loss terms and their global-batch means. Every loss in `alm.losses` returns
a `LossSum` (sum over items, item count). The objective is
`sum_k w_k * T_k / C_k` where `T_k` and `C_k` are the term's sum and count
over the *global* batch (all micro-batches, all devices). The counts never
depend on the trained parameters, so

    grad = sum_k (w_k / C_k) * sum_micro grad(T_k, micro)

is exact for any split into micro-batches. With one micro-batch the step
does a single backward pass with cotangent `w_k / C_k`; with several, each
micro-batch's forward is differentiated once per loss term (`jax.vjp`,
reusing the forward) and the per-term gradient sums are combined at the end.

Baselines (SPEC section 7): "dskd", "mined" and "uld" are each their
distillation loss plus `ntp_weight` times NTP, on the same batches as ALM.
DSKD reads both models' final (normed) hidden states and trains the
`TransferModel.dskd_projector`; MinED reads the student -> teacher vocabulary
map (`consts["mined_map"]`, computed once per tokenizer pair and cached,
`alm.training.model.cached_mined_map`); ULD pairs the k-th trained token of
each side of a row (`alm.losses.baselines.uld_loss`). DSKD normalises by
std's of teacher quantities over the batch; under gradient accumulation the
step first computes them over the whole batch (one extra teacher forward per
micro-batch), so accumulation stays exact.

The "space" and "unbiased" chunk constraints are applied where the chunks are
made: the data pipeline aligns every document with them (`alm.align(...,
constraint="unbiased", bias_tables=...)`), and the step's ALM loss then
treats those already-merged chunks as unconstrained (`device_constraint`);
"boundary_prob" needs the teacher's probabilities and is applied by the loss.

Multi-device: the batch is sharded over the mesh's data (and fsdp) axes and
the parameters by their logical axes (`alm.models.sharding`); the step is
written for global arrays, so GSPMD inserts the collectives and the means
above are global without any `psum` in user code.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from alm.losses import alm as alm_loss_lib
from alm.losses import baselines as baselines_lib
from alm.losses import chunks as chunks_lib
from alm.losses import dskd as dskd_lib
from alm.losses.reduce import LossSum
from alm.models import sharding as sharding_lib
from alm.tokenization.vocab import shared_boundary_bytes
from alm.training.config import TrainConfig
from alm.training.model import TransferModel, trainable_filter

BATCH_KEYS = tuple(f"{side}_{f}" for side in ("teacher", "student")
                   for f in ("ids", "chunk_ids", "loss_mask", "segment_ids", "positions",
                             "num_bytes", "text_continues"))


class MethodNotAvailableError(NotImplementedError):
  """The chosen method's loss is not implemented in `alm.losses` (yet)."""


def _ntp_fn() -> Callable:
  """`alm.losses.ntp.next_token_loss(logits, ids, loss_mask) -> LossSum`, or a clear error."""
  try:
    mod = importlib.import_module("alm.losses.ntp")
  except ModuleNotFoundError as e:
    raise MethodNotAvailableError(
        "This method needs the next-token-prediction loss `alm.losses.ntp.next_token_loss`, which "
        "this checkout does not have yet; use --method=alm.") from e
  return mod.next_token_loss


def loss_terms(cfg: TrainConfig) -> tuple[str, ...]:
  """Names of the loss terms of `cfg.method`, in the order the step returns them."""
  if cfg.method == "alm":
    return ("alm",)
  if cfg.method == "alm+sft":
    return ("alm", "ntp")
  if cfg.method == "sft":
    return ("ntp",)
  return (cfg.method, "ntp")


def check_method_available(cfg: TrainConfig) -> None:
  """Raises `MethodNotAvailableError` (naming what is missing) before any work is done."""
  if "ntp" in loss_terms(cfg):
    _ntp_fn()


def uses_alm(cfg: TrainConfig) -> bool:
  """Whether the ALM loss is one of the terms (the chunk constraint only matters then)."""
  return "alm" in loss_terms(cfg)


def needs_bias_tables(cfg: TrainConfig) -> bool:
  """Whether the data pipeline must align with tokenization-bias tables."""
  return uses_alm(cfg) and cfg.constraint == "unbiased"


def pipeline_constraint(cfg: TrainConfig) -> str:
  """The constraint the data pipeline aligns with (`PipelineConfig.align_constraint`).

  "space" and "unbiased" merge chunks on the host; "boundary_prob" needs the
  teacher's probabilities and is applied by the loss. Methods without ALM get
  the finest (unconstrained) chunks: MinED's one-to-one positions are defined
  on them.
  """
  if uses_alm(cfg) and cfg.constraint in ("space", "unbiased"):
    return cfg.constraint
  return "unconstrained"


def device_constraint(cfg: TrainConfig) -> str:
  """The `ALMConfig.constraint` of the step.

  One implementation per constraint: "space" and "unbiased" need only the
  tokens (and the bias tables), so `alm.align` applies them where the chunks
  are made and they reach the step already merged ("unconstrained" here);
  "boundary_prob" needs the teacher's probabilities, so the loss applies it.
  """
  return "boundary_prob" if cfg.constraint == "boundary_prob" else "unconstrained"


def make_consts(cfg: TrainConfig, teacher_tok, student_tok) -> dict[str, np.ndarray]:
  """The constant (per-run) inputs of the step for `cfg`'s method.

  Args:
    cfg: the training config.
    teacher_tok: the teacher tokenizer.
    student_tok: the student tokenizer.

  Returns:
    {"teacher_boundary", "student_boundary": bool [V]} (ids starting with a
    boundary byte shared by both vocabularies, or EOS) and, for "mined",
    "mined_map": int32 [V_S] (computed once per tokenizer pair, then read
    from the cache; see `alm.training.model.cached_mined_map`).
  """
  # One set of boundary bytes for both sides: the debiasing event must be the
  # same on the two sides (see `shared_boundary_bytes`).
  shared = (shared_boundary_bytes(teacher_tok, student_tok)
            if uses_alm(cfg) and (cfg.debias or cfg.constraint == "boundary_prob")
            else None)
  consts = {"teacher_boundary": np.asarray(teacher_tok.boundary_token_mask(shared), bool),
            "student_boundary": np.asarray(student_tok.boundary_token_mask(shared), bool)}
  if cfg.method == "mined":
    from alm.training.model import cached_mined_map  # pylint: disable=import-outside-toplevel
    consts["mined_map"] = cached_mined_map(teacher_tok, student_tok)
  return consts


def _side_inputs(batch: dict[str, jax.Array], side: str) -> dict[str, jax.Array]:
  seg = batch[f"{side}_segment_ids"]
  return dict(attention_mask=seg > 0, segment_ids=seg, positions=batch[f"{side}_positions"])


def _final_hidden(transformer, out) -> jax.Array:
  """The normed last-layer hidden states, those the output matrix maps to the logits."""
  h = out.hidden_states[transformer.cfg.num_layers]
  return transformer.final_norm(h.astype(transformer.dtype))


def _unembedding(transformer) -> jax.Array:
  """[D, V] output matrix (the tied embedding transposed, or the lm_head kernel)."""
  if transformer.lm_head is None:
    return transformer.embedder.embedding[...].T
  return transformer.lm_head.kernel[...]


def dskd_side(transformer, out, batch: dict[str, jax.Array], side: str) -> dskd_lib.DSKDSide:
  """The `DSKDSide` of one model from its forward output (run with `hidden_layers=(-1,)`)."""
  return dskd_lib.DSKDSide(
      logits=out.logits, hidden=_final_hidden(transformer, out), ids=batch[f"{side}_ids"],
      embedding=transformer.embedder.embedding[...], unembedding=_unembedding(transformer),
      loss_mask=batch[f"{side}_loss_mask"])


def dskd_teacher_moments(model: TransferModel, batch: dict[str, jax.Array]) -> jax.Array:
  """`alm.losses.dskd.teacher_moments` of one (micro-)batch (a teacher forward)."""
  tr = model.teacher.transformer
  out = model.teacher(batch["teacher_ids"], **_side_inputs(batch, "teacher"), hidden_layers=(-1,))
  return dskd_lib.teacher_moments(batch["teacher_ids"], _final_hidden(tr, out),
                                  tr.embedder.embedding[...], batch["teacher_loss_mask"])


def compute_losses(model: TransferModel, batch: dict[str, jax.Array], consts: dict[str, Any],
                   cfg: TrainConfig) -> dict[str, LossSum]:
  """Every loss term of `cfg.method` on one (micro-)batch, as `LossSum`s.

  Args:
    model: the `TransferModel`.
    batch: a pipeline batch (see `alm.data.pipeline`), as arrays.
    consts: `make_consts(...)`: `{"teacher_boundary": bool [V_T],
      "student_boundary": bool [V_S]}`, "mined_map" for MinED, and optionally
      "dskd_scales" (`alm.losses.dskd.DSKDScales` of the whole batch; default:
      this batch's own).
    cfg: the training config.

  Returns:
    {term name: LossSum}, in the order of `loss_terms(cfg)`.
  """
  terms = loss_terms(cfg)
  hidden = (-1,) if "dskd" in terms else ()
  s_ids, t_ids = batch["student_ids"], batch["teacher_ids"]
  s_out = model.student(s_ids, **_side_inputs(batch, "student"), hidden_layers=hidden)
  out: dict[str, LossSum] = {}
  t_out = None
  if cfg.needs_teacher:
    t_out = model.teacher(t_ids, **_side_inputs(batch, "teacher"), hidden_layers=hidden)
  if "alm" in terms:
    acfg = alm_loss_lib.ALMConfig(divergence=cfg.divergence, tau=cfg.tau,
                                  constraint=device_constraint(cfg), gamma=cfg.gamma,
                                  debias=cfg.debias)
    teacher = alm_loss_lib.Side(
        logits=t_out.logits, ids=batch["teacher_ids"], chunk_ids=batch["teacher_chunk_ids"],
        loss_mask=batch["teacher_loss_mask"], boundary_mask=consts["teacher_boundary"],
        segment_ids=batch["teacher_segment_ids"], text_continues=batch["teacher_text_continues"])
    student = alm_loss_lib.Side(
        logits=s_out.logits, ids=s_ids, chunk_ids=batch["student_chunk_ids"],
        loss_mask=batch["student_loss_mask"], boundary_mask=consts["student_boundary"],
        segment_ids=batch["student_segment_ids"], text_continues=batch["student_text_continues"])
    out["alm"] = alm_loss_lib.alm_loss(teacher, student, acfg)
  if "dskd" in terms:
    out["dskd"] = dskd_lib.dskd_loss(
        dskd_side(model.teacher.transformer, t_out, batch, "teacher"),
        dskd_side(model.student.transformer, s_out, batch, "student"), model.dskd_projector,
        scales=consts.get("dskd_scales"))
  if "mined" in terms:
    out["mined"] = baselines_lib.mined_loss(
        t_out.logits, t_ids, batch["teacher_chunk_ids"], s_out.logits, s_ids,
        batch["student_chunk_ids"], consts["mined_map"],
        teacher_loss_mask=batch["teacher_loss_mask"],
        student_loss_mask=batch["student_loss_mask"])
  if "uld" in terms:
    out["uld"] = baselines_lib.uld_loss(t_out.logits, t_ids, batch["teacher_loss_mask"],
                                        s_out.logits, s_ids, batch["student_loss_mask"])
  if "ntp" in terms:
    out["ntp"] = _ntp_fn()(s_out.logits, s_ids, batch["student_loss_mask"])
  return {k: out[k] for k in terms}


def term_weights(cfg: TrainConfig) -> tuple[float, ...]:
  """The weight `w_k` of every term of `loss_terms(cfg)` (NTP gets `ntp_weight`)."""
  return tuple(cfg.ntp_weight if (t == "ntp" and cfg.method != "sft") else 1.0
               for t in loss_terms(cfg))


@dataclasses.dataclass
class TrainState:
  """Everything a step reads and writes besides the batch.

  Attributes:
    graphdef: the model's static structure.
    trainable: the trained parameters (an `nnx.State`).
    frozen: everything else (base body, teacher embeddings, ...).
    opt_state: the optax state of `trainable`.
    step: optimizer steps taken.
  """

  graphdef: Any
  trainable: Any
  frozen: Any
  opt_state: Any
  step: int = 0

  def model(self) -> TransferModel:
    """The model with the current parameters (shares the state's arrays)."""
    return nnx.merge(self.graphdef, self.trainable, self.frozen)


def _micro_split(batch: dict[str, np.ndarray], accum: int) -> dict[str, np.ndarray]:
  """[B, ...] -> [accum, B / accum, ...] (consecutive rows per micro-batch)."""
  return {k: v.reshape(accum, v.shape[0] // accum, *v.shape[1:]) for k, v in batch.items()}


class Stepper:
  """Builds and runs the compiled train step for a model, config and mesh.

  Args:
    model: the `TransferModel` (its arrays are placed on `mesh`).
    cfg: the training config.
    consts: `make_consts(cfg, ...)` (see `compute_losses`).
    tx: the optax optimizer.
    mesh: a (data, fsdp, tensor) mesh, or None for a single device.
  """

  def __init__(self, model: TransferModel, cfg: TrainConfig, consts: dict[str, np.ndarray],
               tx: optax.GradientTransformation, mesh: jax.sharding.Mesh | None = None):
    check_method_available(cfg)
    if cfg.method == "mined" and "mined_map" not in consts:
      raise ValueError("method='mined' needs consts['mined_map'] (the student -> teacher "
                       "vocabulary map); build consts with make_consts(cfg, teacher_tok, "
                       "student_tok).")
    if cfg.method == "dskd" and getattr(model, "dskd_projector", None) is None:
      raise ValueError("method='dskd' needs TransferModel.dskd_projector; build the model "
                       "with build_transfer_model(..., cfg) for this cfg.")
    self.cfg, self.tx = cfg, tx
    self.mesh = mesh or sharding_lib.make_mesh(1, 1, 1)
    sharding_lib.shard_model(model, self.mesh)
    graphdef, trainable, frozen = nnx.split(model, trainable_filter(cfg), ...)
    if not jax.tree.leaves(trainable):
      raise ValueError("The trainable filter selected no parameters; check train_embeddings, "
                       "lora_rank and projector.")
    rep = NamedSharding(self.mesh, PartitionSpec())
    self.consts = {k: jax.device_put(jnp.asarray(v), rep) for k, v in consts.items()}
    # Optimizer moments live where their parameters live (sharded like them),
    # and every step returns arrays with exactly the input shardings, so the
    # step compiles once.
    param_sh = jax.tree.map(lambda x: x.sharding, trainable)
    opt_sh = optax.tree_map_params(tx, lambda _, s: s, jax.eval_shape(tx.init, trainable),
                                   param_sh, transform_non_params=lambda _: rep)
    opt_state = jax.jit(tx.init, out_shardings=opt_sh)(trainable)
    self.state = TrainState(graphdef, trainable, frozen, opt_state, 0)
    self.terms = loss_terms(cfg)
    self.weights = term_weights(cfg)
    self._shard_out = (jax.tree.map(lambda x: x.sharding, trainable),
                       jax.tree.map(lambda x: x.sharding, opt_state))
    self._step = jax.jit(self._step_fn, donate_argnums=(0, 1),
                         out_shardings=(*self._shard_out, rep))

  # -- the pure step ----------------------------------------------------------

  def _step_fn(self, trainable, opt_state, frozen, micro, consts):
    graphdef, cfg, terms = self.state.graphdef, self.cfg, self.terms
    w = jnp.asarray(self.weights, jnp.float32)

    def totals(params, mb):
      model = nnx.merge(graphdef, params, frozen)
      losses = compute_losses(model, mb, consts, cfg)
      tot = jnp.stack([losses[k].total for k in terms])
      cnt = jnp.stack([losses[k].count for k in terms])
      return tot, cnt

    accum = micro[next(iter(micro))].shape[0]
    if cfg.method == "dskd" and accum > 1:
      # DSKD's std's over the whole batch (teacher-only, so no gradient), so
      # that the micro-batch losses add up to the whole batch's.
      def moments(carry, mb):
        m = dskd_teacher_moments(nnx.merge(graphdef, trainable, frozen), mb)
        return dskd_lib.merge_moments(carry, m), None

      mom, _ = jax.lax.scan(moments, jnp.zeros((3, 3), jnp.float32), micro)
      consts = {**consts, "dskd_scales": dskd_lib.scales_from_moments(mom)}
    zeros = jax.tree.map(jnp.zeros_like, trainable)
    if accum == 1:
      mb = jax.tree.map(lambda x: x[0], micro)
      tot, vjp_fn, cnt = jax.vjp(lambda p: totals(p, mb), trainable, has_aux=True)
      (grads,) = vjp_fn(w / jnp.maximum(cnt, 1.0))
      tot_sum, cnt_sum = tot, cnt
    else:
      def body(carry, mb):
        g_acc, t_acc, c_acc = carry
        tot, vjp_fn, cnt = jax.vjp(lambda p: totals(p, mb), trainable, has_aux=True)
        eye = jnp.eye(len(terms), dtype=jnp.float32)
        g_acc = tuple(jax.tree.map(jnp.add, g, vjp_fn(eye[k])[0]) for k, g in enumerate(g_acc))
        return (g_acc, t_acc + tot, c_acc + cnt), None

      init = (tuple(zeros for _ in terms), jnp.zeros(len(terms)), jnp.zeros(len(terms)))
      (g_terms, tot_sum, cnt_sum), _ = jax.lax.scan(body, init, micro)
      scale = w / jnp.maximum(cnt_sum, 1.0)
      grads = jax.tree.map(lambda *gs: sum(s * g for s, g in zip(scale, gs)), *g_terms)
    means = tot_sum / jnp.maximum(cnt_sum, 1.0)
    loss, grad_norm = jnp.sum(w * means), optax.global_norm(grads)
    updates, new_opt_state = self.tx.update(grads, opt_state, trainable)
    # A non-finite loss or gradient (or an update that overflows) must not reach the
    # parameters or Adam's moments: such a step keeps both as they were. The
    # optimizer's own step count stays too, so its schedule resumes where it was.
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(optax.global_norm(updates))
    keep = lambda new, old: jnp.where(ok, new, old)
    trainable = jax.tree.map(keep, optax.apply_updates(trainable, updates), trainable)
    opt_state = jax.tree.map(keep, new_opt_state, opt_state)
    metrics = {"loss": loss, "grad_norm": grad_norm,
               "skipped_nonfinite": 1.0 - ok.astype(jnp.float32)}
    for k, name in enumerate(terms):
      metrics[f"loss_{name}"] = means[k]
      metrics[f"count_{name}"] = cnt_sum[k]
    return trainable, opt_state, metrics

  # -- host side --------------------------------------------------------------

  def put_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """Splits a batch into micro-batches and shards them over the mesh.

    Single process: `batch` is the global batch. Multi-host (after
    `jax.distributed.initialize()`): `batch` is this process's share of the
    global batch (`batch_size / process_count` rows, its own data shard), and
    the global arrays are assembled with `jax.make_array_from_process_local_data`.
    """
    micro = _micro_split({k: np.asarray(batch[k]) for k in BATCH_KEYS}, self.cfg.grad_accum)
    data = sharding_lib.batch_sharding(self.mesh, 2)
    spec = PartitionSpec(None, *data.spec)
    out = {}
    for k, v in micro.items():
      sh = NamedSharding(self.mesh, PartitionSpec(*spec[:v.ndim]))
      if jax.process_count() > 1:
        shape = (v.shape[0], v.shape[1] * jax.process_count(), *v.shape[2:])
        out[k] = jax.make_array_from_process_local_data(sh, v, shape)
      else:
        out[k] = jax.device_put(v, sh)
    return out

  def step(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """One optimizer step on a global batch; returns the step's metrics (device arrays)."""
    s = self.state
    micro = self.put_batch(batch)
    s.trainable, s.opt_state, metrics = self._step(s.trainable, s.opt_state, s.frozen, micro,
                                                   self.consts)
    s.step += 1
    return metrics

  def model(self) -> TransferModel:
    """The model with the current parameters."""
    return self.state.model()

  def compile(self, batch: dict[str, np.ndarray]):
    """The compiled step for batches shaped like `batch` (for benchmarks).

    Call it as `trainable, opt_state, metrics = c(trainable, opt_state, frozen,
    micro, consts)` with `micro = self.put_batch(batch)`; its
    `memory_analysis()` gives XLA's buffer sizes of the step.
    """
    s = self.state
    return self._step.lower(s.trainable, s.opt_state, s.frozen, self.put_batch(batch),
                            self.consts).compile()


def path_bits(model_fn: Callable, batch: dict[str, jax.Array], side: str
              ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Bits, predicted bytes and predicted tokens of one side of a pipeline batch.

  Targets are the side's loss-mask tokens (never position 0, never specials or
  padding); bytes are their text bytes, so bits / bytes is bits per byte.

  Args:
    model_fn: teacher or student (called like a Transformer).
    batch: a pipeline batch.
    side: "teacher" or "student".

  Returns:
    (bits, bytes, tokens) float32 scalars.
  """
  ids = batch[f"{side}_ids"]
  out = model_fn(ids, **_side_inputs(batch, side))
  lp = chunks_lib.token_logprobs(out.logits, ids).path  # [B, T], 0 at t = 0
  m = batch[f"{side}_loss_mask"] & (batch[f"{side}_num_bytes"] > 0)
  m = m.at[:, 0].set(False)
  bits = -jnp.sum(jnp.where(m, lp, 0.0)) / jnp.log(2.0)
  nbytes = jnp.sum(jnp.where(m, batch[f"{side}_num_bytes"], 0)).astype(jnp.float32)
  return bits, nbytes, jnp.sum(m).astype(jnp.float32)
