"""The distillation engine: the jit-compiled train step of any objective and student.

The step never names a method or a term: the objective (`Objective`, from
`alm.training.terms`) says which terms run, which hidden layers each model
must return, whether the teacher runs, and the per-run constants; each
model's forward runs once per micro-batch and every term reads it.

The model is split once into `(graphdef, trainable, frozen)` with the
student kind's filter (`alm.training.students.trainable_filter`); the step is
a pure function of `(trainable, opt_state, frozen, batch, consts)` compiled
with `jax.jit`, donating `trainable` and `opt_state`.

Loss terms and their global-batch means. Every term returns a `LossSum` (sum
over items, item count). The objective is `sum_k w_k * T_k / C_k` where `T_k`
and `C_k` are the term's sum and count over the *global* batch (all
micro-batches, all devices). The counts never depend on the trained
parameters, so

    grad = sum_k (w_k / C_k) * sum_micro grad(T_k, micro)

is exact for any split into micro-batches. With one micro-batch and fixed
weights the step does a single backward pass with cotangent `w_k / C_k`;
otherwise each micro-batch's forward is differentiated once per term
(`jax.vjp`, reusing the forward) and the per-term gradient sums are combined
at the end. GradMag (docs/method.md §6) sets `w_k` from those per-term
gradients' norms on the student's last block, as constants (times the terms'
fixed weights; all 1 gives the paper's GradMag). A term whose loss
normalises by whole-batch statistics computes them first (`Term.prepass`),
so accumulation stays exact.

Multi-device: the batch is sharded over the mesh's data (and fsdp) axes and
the parameters by their logical axes (`alm.models.sharding`); the step is
written for global arrays, so GSPMD inserts the collectives and the means
above are global without any `psum` in user code.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from alm.data import teacher_cache as teacher_cache_lib
from alm.eval.bpb import sequence_bits
from alm.losses import chunks as chunks_lib
from alm.losses import gradmag as gradmag_lib
from alm.losses.reduce import LossSum
from alm.models import sharding as sharding_lib
from alm.training import students as students_lib
from alm.training import terms as terms_lib
from alm.training.config import TrainConfig
from alm.training.students import DistillationModel

BATCH_KEYS = tuple(f"{side}_{f}" for side in ("teacher", "student")
                   for f in ("ids", "chunk_ids", "loss_mask", "segment_ids", "positions",
                             "num_bytes", "text_continues"))
def side_inputs(batch: dict[str, jax.Array], side: str) -> dict[str, jax.Array]:
  """The attention inputs of one side of a pipeline batch (for a model call)."""
  seg = batch[f"{side}_segment_ids"]
  return dict(attention_mask=seg > 0, segment_ids=seg, positions=batch[f"{side}_positions"])


# What a teacher cache (alm.data.teacher_cache, SPEC §15) adds to a batch, and what of
# the teacher's output it stands for (a term's `teacher_reads`): the path and boundary
# log-probs always, the hidden states of chosen layers when built with them.
CACHE_KEYS = teacher_cache_lib.CACHE_KEYS
HIDDEN_KEY = teacher_cache_lib.HIDDEN_KEY  # "teacher_hidden@{layer}"
HELDOUT_BITS_KEY = teacher_cache_lib.HELDOUT_BITS_KEY  # [3] of a cached held-out row
CACHE_PROVIDES = frozenset({"token_logprobs", "hidden"})
# A batch's own student vocabulary (alm.hypernet.batches: the hypernetwork student's K
# local rows): per-batch constants, replicated and shared by the micro-batches, handed to
# the student as `vocab={name: array}`.
VOCAB_PREFIX = "student_vocab_"


def vocab_inputs(batch) -> dict[str, Any]:
  """The student's `vocab=` keyword from a batch's `student_vocab_*` arrays ({} if none)."""
  vocab = {k[len(VOCAB_PREFIX):]: v for k, v in batch.items() if k.startswith(VOCAB_PREFIX)}
  return {"vocab": vocab} if vocab else {}


@dataclasses.dataclass(frozen=True)
class CachedTeacher:
  """The teacher's output as a teacher cache gives it (no logits).

  Attributes:
    token_logprobs: the path and boundary log-probs of the teacher on its ids.
    hidden_states: {layer: [B, T, D] float32} of the cached layers.
  """

  token_logprobs: chunks_lib.TokenLogProbs
  hidden_states: dict[int, jax.Array]
  logits: None = None


def cache_keys(batch) -> tuple[str, ...]:
  """The teacher-cache arrays present in a batch."""
  return tuple(k for k in batch if k in CACHE_KEYS or k.startswith(HIDDEN_KEY.format(layer="")))


def teacher_cache_arrays(teacher, batch: dict[str, jax.Array], boundary_mask: jax.Array,
                         hidden_layers: tuple[int, ...] = (), hidden_dtype=jnp.bfloat16,
                         block_rows: int = chunks_lib.DEFAULT_BLOCK_ROWS) -> dict[str, jax.Array]:
  """What a teacher cache stores for a batch: {key: [B, T(, D)] array}.

  The teacher's path and boundary log-probs (float32; the same forward and
  vocabulary pass as the ALM term runs on the live teacher,
  `alm.losses.alm.aligned_chunk_logprobs`), and the hidden states of
  `hidden_layers` in `hidden_dtype`.
  """
  out = teacher(batch["teacher_ids"], **side_inputs(batch, "teacher"),
                hidden_layers=tuple(hidden_layers))
  lp = chunks_lib.token_logprobs(out.logits, batch["teacher_ids"], boundary_mask,
                                 block_rows=block_rows)
  arrays = {CACHE_KEYS[0]: lp.path.astype(jnp.float32),
            CACHE_KEYS[1]: lp.boundary.astype(jnp.float32)}
  for layer in hidden_layers:
    arrays[HIDDEN_KEY.format(layer=layer)] = out.hidden_states[layer].astype(hidden_dtype)
  return arrays


def cached_teacher(batch: dict[str, jax.Array]) -> CachedTeacher:
  """The `CachedTeacher` of a teacher cache's batch."""
  prefix = HIDDEN_KEY.format(layer="")
  hidden = {int(k[len(prefix):]): batch[k].astype(jnp.float32) for k in batch
            if k.startswith(prefix)}
  return CachedTeacher(chunks_lib.TokenLogProbs(path=batch[CACHE_KEYS[0]],
                                                boundary=batch[CACHE_KEYS[1]]), hidden)


class Objective:
  """The run's weighted terms and everything the engine derives from them.

  Args:
    cfg: the training config (its `objective` names the method and terms).
  """

  def __init__(self, cfg: TrainConfig):
    self.cfg = cfg
    weighted = terms_lib.objective_terms(cfg.objective)
    self.terms = [t for t, _ in weighted]
    self.weights = tuple(w for _, w in weighted)
    self.names = tuple(t.name for t in self.terms)
    self.needs_teacher = terms_lib.needs_teacher(weighted)
    self.data_constraint = terms_lib.data_constraint(weighted)
    self.combine = cfg.objective.combine

  @property
  def needs_bias_tables(self) -> bool:
    """Whether the data pipeline must align with tokenization-bias tables."""
    return self.data_constraint == "unbiased"

  def hidden_layers(self, ctx: terms_lib.BuildContext) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The union of the terms' (teacher, student) hidden layers, sorted."""
    t, s = set(), set()
    for term in self.terms:
      lt, ls = term.hidden_layers(ctx)
      t.update(lt)
      s.update(ls)
    return tuple(sorted(t)), tuple(sorted(s))

  def consts(self, ctx: terms_lib.BuildContext) -> dict[str, dict[str, np.ndarray]]:
    """Every term's per-run constants, {term name: {key: array}}."""
    return {t.name: dict(t.consts(ctx)) for t in self.terms}


def cache_hidden_layers(cfg: TrainConfig, teacher_cfg) -> tuple[int, ...]:
  """The teacher layers whose hidden states a teacher cache of this run must hold."""
  return tuple(sorted({l for t in Objective(cfg).terms
                       for l in t.teacher_hidden_layers(teacher_cfg)}))


def check_cacheable(cfg: TrainConfig) -> None:
  """Raises TeacherCacheError when a term of `cfg` needs more than a teacher cache holds."""
  weighted = terms_lib.objective_terms(cfg.objective)
  live = terms_lib.needs_live_teacher(weighted, CACHE_PROVIDES)
  if live:
    raise teacher_cache_lib.TeacherCacheError(
        f"The term(s) {live} of method {cfg.objective.method!r}"
        + (f" + add_terms {cfg.objective.add_terms!r}" if cfg.objective.add_terms else "")
        + " read the teacher's full distribution, which a teacher cache does not hold (it "
        "holds the path and boundary log-probs that ALM reads, and hidden states). Run them "
        "with the live teacher (leave out --teacher_cache).")
  if not terms_lib.needs_teacher(weighted):
    raise teacher_cache_lib.TeacherCacheError(
        f"Method {cfg.objective.method!r} does not read the teacher; a teacher cache has "
        "nothing to give it (leave out --teacher_cache).")


def make_consts(model: DistillationModel, cfg: TrainConfig, teacher_tok, student_tok
                ) -> dict[str, dict[str, np.ndarray]]:
  """The per-run constant inputs of the step: {term name: {key: array}}.

  Computed once on the host (MinED's vocabulary map is computed once per
  tokenizer pair, then read from its cache).
  """
  ctx = students_lib.build_context(model.teacher.transformer, model.student.transformer,
                                   teacher_tok, student_tok, cfg, model.kind)
  return Objective(cfg).consts(ctx)


def compute_losses(model: DistillationModel, batch: dict[str, jax.Array],
                   consts: dict[str, dict[str, Any]], objective: Objective,
                   hidden: tuple[tuple[int, ...], tuple[int, ...]] = ((), ())
                   ) -> dict[str, LossSum]:
  """Every term of the objective on one (micro-)batch, as `LossSum`s.

  Each model's forward runs once, with the union of the hidden layers the
  terms read; the teacher's only when a term needs it.

  Args:
    model: the `DistillationModel`.
    batch: a pipeline batch (see `alm.data.pipeline`), as arrays.
    consts: {term name: constants} (`Objective.consts`, plus prepass values).
    objective: the run's objective.
    hidden: (teacher layers, student layers) to return hidden states of.

  Returns:
    {term name: LossSum}, in the objective's order.
  """
  t_layers, s_layers = hidden
  s_out = model.student(batch["student_ids"], **side_inputs(batch, "student"),
                        hidden_layers=s_layers, **vocab_inputs(batch))
  t_out = None
  if objective.needs_teacher and CACHE_KEYS[0] in batch:  # a teacher cache's batch
    t_out = cached_teacher(batch)
  elif objective.needs_teacher:
    t_out = model.teacher(batch["teacher_ids"], **side_inputs(batch, "teacher"),
                          hidden_layers=t_layers)
  heads = model.heads
  return {t.name: t(terms_lib.Forward(batch=batch, teacher=t_out, student=s_out, model=model,
                                      consts=consts.get(t.name, {}),
                                      head=heads[t.name] if t.name in heads else None))
          for t in objective.terms}


def gradmag_subset(trainable) -> Callable[[tuple, Any], bool]:
  """GradMag's parameter subset: the trained leaves of the student's last block.

  Falls back to every trained leaf when no block parameter trains (embeddings
  only). Heads are never in the subset.
  """
  flat = jax.tree_util.tree_flatten_with_path(trainable)[0]

  def block(path):
    keys = [getattr(k, "key", getattr(k, "idx", None)) for k in path]
    if not keys or keys[0] != "student" or "layers" not in keys:
      return None
    i = keys.index("layers")
    return keys[i + 1] if i + 1 < len(keys) and isinstance(keys[i + 1], int) else None

  blocks = [b for b in (block(p) for p, _ in flat) if b is not None]
  last = max(blocks) if blocks else None

  def in_subset(path, leaf):
    del leaf
    keys = [getattr(k, "key", getattr(k, "idx", None)) for k in path]
    if last is None:
      return bool(keys) and keys[0] != "heads"
    return block(path) == last

  return in_subset


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

  def model(self) -> DistillationModel:
    """The model with the current parameters (shares the state's arrays)."""
    return nnx.merge(self.graphdef, self.trainable, self.frozen)


def _micro_split(batch: dict[str, np.ndarray], accum: int) -> dict[str, np.ndarray]:
  """[B, ...] -> [accum, B / accum, ...] (consecutive rows per micro-batch)."""
  return {k: v.reshape(accum, v.shape[0] // accum, *v.shape[1:]) for k, v in batch.items()}


class Stepper:
  """Builds and runs the compiled train step for a model, config and mesh.

  Args:
    model: the `DistillationModel` (its arrays are placed on `mesh`).
    cfg: the training config.
    consts: `make_consts(model, cfg, teacher_tok, student_tok)`.
    tx: the optax optimizer.
    mesh: a (data, fsdp, tensor) mesh, or None for a single device.
    teacher_cache: batches come from a teacher cache (they carry
      `CACHE_KEYS`): the teacher never runs in the step.

  Raises:
    TeacherCacheError: `teacher_cache` with a term that needs more of the
      teacher than a cache holds (names the terms).
  """

  def __init__(self, model: DistillationModel, cfg: TrainConfig,
               consts: dict[str, dict[str, np.ndarray]], tx: optax.GradientTransformation,
               mesh: jax.sharding.Mesh | None = None, *, teacher_cache: bool = False):
    self.cfg, self.tx = cfg, tx
    self.objective = obj = Objective(cfg)
    self.teacher_cache = teacher_cache
    if teacher_cache:
      check_cacheable(cfg)
    ctx = students_lib.build_context(model.teacher.transformer, model.student.transformer,
                                     None, None, cfg, model.kind)
    for term in obj.terms:
      term.check(ctx)
      if type(term).head is not terms_lib.Term.head and term.name not in model.heads:
        raise ValueError(f"The {term.name!r} term trains a module of its own that this model "
                         "lacks; build the model with alm.training.build_model(..., cfg) for "
                         "this cfg.")
      if type(term).consts is not terms_lib.Term.consts and term.name not in consts:
        raise ValueError(f"The {term.name!r} term needs its per-run constants; build them with "
                         "alm.training.make_consts(model, cfg, teacher_tok, student_tok).")
    self.hidden = obj.hidden_layers(ctx)
    # The teacher layers whose hidden states a cache must hold (the terms that read them).
    self.cached_hidden = (cache_hidden_layers(cfg, ctx.teacher_cfg) if teacher_cache else ())
    self.mesh = mesh or sharding_lib.make_mesh(1, 1, 1)
    sharding_lib.shard_model(model, self.mesh)
    graphdef, trainable, frozen = nnx.split(model, students_lib.trainable_filter(model, cfg), ...)
    if not jax.tree.leaves(trainable):
      raise ValueError("The trainable filter selected no parameters; check train_embeddings, "
                       "lora_rank, projector and train_body.")
    rep = NamedSharding(self.mesh, PartitionSpec())
    self.consts = jax.tree.map(lambda v: jax.device_put(jnp.asarray(v), rep), consts)
    # Optimizer moments live where their parameters live (sharded like them),
    # and every step returns arrays with exactly the input shardings, so the
    # step compiles once.
    param_sh = jax.tree.map(lambda x: x.sharding, trainable)
    opt_sh = optax.tree_map_params(tx, lambda _, s: s, jax.eval_shape(tx.init, trainable),
                                   param_sh, transform_non_params=lambda _: rep)
    opt_state = jax.jit(tx.init, out_shardings=opt_sh)(trainable)
    self.state = TrainState(graphdef, trainable, frozen, opt_state, 0)
    self.terms = obj.names
    self.weights = obj.weights
    self._subset = gradmag_subset(trainable)
    self._shard_out = (jax.tree.map(lambda x: x.sharding, trainable),
                       jax.tree.map(lambda x: x.sharding, opt_state))
    self._step = jax.jit(self._step_fn, donate_argnums=(0, 1),
                         out_shardings=(*self._shard_out, rep))

  # -- the pure step ----------------------------------------------------------

  def _step_fn(self, trainable, opt_state, frozen, micro, consts):
    graphdef, obj, terms = self.state.graphdef, self.objective, self.terms
    w = jnp.asarray(self.weights, jnp.float32)
    # The batch's student vocabulary is the same for every micro-batch.
    vocab = {k: v for k, v in micro.items() if k.startswith(VOCAB_PREFIX)}
    micro = {k: v for k, v in micro.items() if not k.startswith(VOCAB_PREFIX)}

    def totals(params, mb, consts):
      model = nnx.merge(graphdef, params, frozen)
      losses = compute_losses(model, {**mb, **vocab}, consts, obj, self.hidden)
      tot = jnp.stack([losses[k].total for k in terms])
      cnt = jnp.stack([losses[k].count for k in terms])
      return tot, cnt

    accum = micro[next(iter(micro))].shape[0]
    if accum > 1:
      # Whole-batch statistics a term would otherwise take from its micro-batch.
      def merge():
        return nnx.merge(graphdef, trainable, frozen)

      for t in obj.terms:
        if type(t).prepass is not terms_lib.Term.prepass:
          extra = t.prepass(merge, micro, consts.get(t.name, {}))
          consts = {**consts, t.name: {**consts.get(t.name, {}), **extra}}
    zeros = jax.tree.map(jnp.zeros_like, trainable)
    metrics = {}
    if accum == 1 and obj.combine == "fixed":
      mb = jax.tree.map(lambda x: x[0], micro)
      tot, vjp_fn, cnt = jax.vjp(lambda p: totals(p, mb, consts), trainable, has_aux=True)
      (grads,) = vjp_fn(w / jnp.maximum(cnt, 1.0))
      tot_sum, cnt_sum = tot, cnt
    else:
      # One backward pass per term (reusing the forward), summed over micro-batches:
      # exact accumulation, and GradMag's per-term gradients.
      def body(carry, mb):
        g_acc, t_acc, c_acc = carry
        tot, vjp_fn, cnt = jax.vjp(lambda p: totals(p, mb, consts), trainable, has_aux=True)
        eye = jnp.eye(len(terms), dtype=jnp.float32)
        g_acc = tuple(jax.tree.map(jnp.add, g, vjp_fn(eye[k])[0]) for k, g in enumerate(g_acc))
        return (g_acc, t_acc + tot, c_acc + cnt), None

      init = (tuple(zeros for _ in terms), jnp.zeros(len(terms)), jnp.zeros(len(terms)))
      (g_terms, tot_sum, cnt_sum), _ = jax.lax.scan(body, init, micro)
      if obj.combine == "gradmag":
        # docs/method.md §6: weights from the gradient norms of the terms' means on
        # the last block, treated as constants; the forward ran once per micro-batch.
        norms = jnp.stack([jnp.sqrt(sum(
            jnp.sum(jnp.square(leaf.astype(jnp.float32)))
            for path, leaf in jax.tree_util.tree_flatten_with_path(g)[0]
            if self._subset(path, leaf))) / jnp.maximum(c, 1.0)
                           for g, c in zip(g_terms, cnt_sum)])
        w = gradmag_lib.balance_weights(norms, w)
        for k, name in enumerate(terms):
          metrics[f"weight_{name}"] = w[k]
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
    metrics.update({"loss": loss, "grad_norm": grad_norm,
                    "skipped_nonfinite": 1.0 - ok.astype(jnp.float32)})
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
    keys = BATCH_KEYS
    if self.teacher_cache:
      keys += CACHE_KEYS + tuple(HIDDEN_KEY.format(layer=l) for l in self.cached_hidden)
    missing = [k for k in keys if k not in batch]
    if missing:
      raise (teacher_cache_lib.TeacherCacheError if self.teacher_cache else ValueError)(
          f"The batch lacks {missing}" + (
              ": the teacher cache holds no hidden states of these teacher layers, which the "
              "hidden-state term reads; build the cache with this run's --add_terms and "
              "--hidden_layers" if any(k.startswith("teacher_hidden") for k in missing)
              else "") + ".")
    micro = _micro_split({k: np.asarray(batch[k]) for k in keys}, self.cfg.shapes.grad_accum)
    rep = NamedSharding(self.mesh, PartitionSpec())
    vocab = {k: jax.device_put(np.asarray(v), rep) for k, v in batch.items()
             if k.startswith(VOCAB_PREFIX)}
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
    return {**out, **vocab}

  def step(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """One optimizer step on a global batch; returns the step's metrics (device arrays)."""
    s = self.state
    micro = self.put_batch(batch)
    s.trainable, s.opt_state, metrics = self._step(s.trainable, s.opt_state, s.frozen, micro,
                                                   self.consts)
    s.step += 1
    return metrics

  def model(self) -> DistillationModel:
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


def path_bits(model_fn: Callable, batch: dict[str, jax.Array], side: str, *,
              per_row: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Bits, predicted bytes and predicted tokens of one side of a pipeline batch.

  Targets are the side's loss-mask tokens (never position 0, never specials or
  padding); bytes are their text bytes, so bits / bytes is bits per byte
  (`alm.eval.bpb.sequence_bits`, the one implementation).

  Args:
    model_fn: teacher or student (called like a Transformer).
    batch: a pipeline batch.
    side: "teacher" or "student".
    per_row: each row's sums ([B] arrays): the teacher's held-out bits, which
      a teacher cache stores per row (`HELDOUT_BITS_KEY`).

  Returns:
    (bits, bytes, tokens) float32 scalars ([B] with `per_row`).
  """
  ids = batch[f"{side}_ids"]
  out = model_fn(ids, **side_inputs(batch, side), **(vocab_inputs(batch) if side == "student"
                                                      else {}))
  nb = batch[f"{side}_num_bytes"]
  return sequence_bits(out.logits, ids, batch[f"{side}_loss_mask"] & (nb > 0), nb,
                       per_row=per_row)
