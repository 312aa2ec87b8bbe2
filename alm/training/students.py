"""Student kinds: what is trained, how it is built from the teacher, how it is exported.

Every run trains a `DistillationModel`:

    teacher  a frozen view of the teacher model (`Teacher`)
    student  the student (`Student`: a Transformer + an optional embedding projector)
    heads    the objective terms' trainable modules (DSKD's projector, the
             hidden-state projection), by term name

A student kind builds the teacher view and the student, and names what trains
(an NNX filter); the heads always train. Two kinds:

  `SharedBody`  tokenizer transfer: the student is the teacher's body with
                FVT-initialised embeddings for the new tokenizer + LoRA (+ a
                projector); the teacher is the same Variables with LoRA
                switched off, so one body is in memory.
  `Separate`    large-to-small distillation: another model with its own
                tokenizer, fully fine-tuned (`train_body`) or LoRA-tuned; the
                teacher is frozen and held once.

The optimizer state and the gradients never touch what does not train: the
split is by explicit filters (`trainable_filter`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from alm.hypernet import fvt
from alm.hypernet.projector import EmbeddingProjector, ProjectorConfig
from alm.models import lora as lora_lib
from alm.models.transformer import Transformer, abstract_transformer
from alm.tokenization.base import ByteTokenizer
from alm.training import terms as terms_lib
from alm.training.config import AdapterConfig, TrainConfig, TrainConfigError

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class Student(nnx.Module):
  """The student: a Transformer (+ projector), called like a `Transformer`.

  Args:
    transformer: the student Transformer.
    projector: optional `EmbeddingProjector` applied to input embeddings.
  """

  def __init__(self, transformer: Transformer, projector: EmbeddingProjector | None = None):
    self.transformer = transformer
    self.projector = projector

  def __call__(self, input_ids, *, attention_mask=None, segment_ids=None, positions=None,
               hidden_layers=()):
    t = self.transformer
    if self.projector is None:
      return t(input_ids, attention_mask=attention_mask, segment_ids=segment_ids,
               positions=positions, hidden_layers=hidden_layers)
    emb = self.projector(t.embed(input_ids))  # [B, T, D]
    return t(inputs_embeds=emb, attention_mask=attention_mask, segment_ids=segment_ids,
             positions=positions, hidden_layers=hidden_layers)


class Teacher(nnx.Module):
  """The teacher view: its Transformer with every LoRA delta switched off.

  Args:
    transformer: the teacher Transformer (with a shared-body student, the LoRA
      modules inside it are the student's, disabled while the teacher runs).
  """

  def __init__(self, transformer: Transformer):
    self.transformer = transformer

  def __call__(self, input_ids, *, attention_mask=None, segment_ids=None, positions=None,
               hidden_layers=()):
    with lora_lib.lora_disabled(self.transformer):
      return self.transformer(input_ids, attention_mask=attention_mask,
                              segment_ids=segment_ids, positions=positions,
                              hidden_layers=hidden_layers)


class AbsentTransformer(nnx.Module):
  """A teacher that is not in memory: its config, no weights (SPEC §15).

  A run that reads every teacher output from a teacher cache (a separate
  teacher, large-to-small distillation) builds its `Teacher` view on this, so
  the teacher's weights are never loaded; running it is an error.

  Args:
    cfg: the teacher's `ModelConfig` (`alm.models.loading.load_config`).
    param_dtype: the dtype its parameters would have.
  """

  def __init__(self, cfg, param_dtype=jnp.float32):
    self.cfg = cfg
    self.param_dtype = param_dtype

  def __call__(self, *args, **kwargs):
    raise RuntimeError("The teacher is not in memory: this run reads the teacher's outputs "
                       "from a teacher cache, and something asked to run it. Train without "
                       "--teacher_cache to run the teacher live.")


def teacher_in_memory(model: "DistillationModel") -> bool:
  """False when the model's teacher is an `AbsentTransformer` (a teacher-cache run)."""
  return not isinstance(model.teacher.transformer, AbsentTransformer)


class DistillationModel(nnx.Module):
  """Teacher, student and the terms' heads of one run (see the module docstring).

  Args:
    teacher: the teacher view.
    student: the student.
    heads: {term name: trainable module} (always trained).
    kind: the name of the `StudentKind` that built it (see `student_kind`).
  """

  def __init__(self, teacher: Teacher, student: Student,
               heads: dict[str, nnx.Module] | None = None, kind: str = "shared_body"):
    self.teacher = teacher
    self.student = student
    self.heads = nnx.Dict(dict(heads or {}))
    self.kind = kind


def _param_at(prefix: tuple[str, ...]):
  def f(path, value):
    return isinstance(value, nnx.Param) and tuple(path)[:len(prefix)] == prefix
  return f


def _new_embeddings(path, value) -> bool:
  p = tuple(path)
  return isinstance(value, nnx.Param) and p[:2] == ("student", "transformer") and (
      p[2:] == ("embedder", "embedding") or p[2:] == ("lm_head", "kernel"))


_KINDS: dict[str, type["StudentKind"]] = {}


def register_kind(cls: type["StudentKind"]) -> type["StudentKind"]:
  """Registers a student kind under its `name` (a decorator)."""
  _KINDS[cls.name] = cls
  return cls


def student_kind(name: str) -> type["StudentKind"]:
  """The registered student kind called `name`."""
  if name not in _KINDS:
    raise ValueError(f"Unknown student kind {name!r}; known: {', '.join(sorted(_KINDS))}.")
  return _KINDS[name]


class StudentKind:
  """How a student is built (`build`), what of it trains and how it is exported.

  `trainable` and `export` are class methods: a `DistillationModel` records its
  kind by name, and everything after building reads only the model.
  """

  name = ""

  def build(self, teacher: Transformer, teacher_tok: ByteTokenizer, student_tok: ByteTokenizer,
            adapters: AdapterConfig, rngs: nnx.Rngs) -> tuple[Teacher, Student]:
    raise NotImplementedError

  @classmethod
  def trainable(cls, adapters: AdapterConfig) -> list:
    """The NNX filters of the student's trained parameters (paths from the model root)."""
    parts = []
    if adapters.train_embeddings:
      parts.append(_new_embeddings)
    if adapters.lora_rank:
      parts.append(nnx.LoRAParam)
    if adapters.projector:
      parts.append(_param_at(("student", "projector")))
    return parts

  @classmethod
  def export(cls, model: DistillationModel, directory: str | Path,
             tokenizer: ByteTokenizer) -> Path:
    """Writes the trained student as an HF-format directory loadable by `alm.load_model`.

    LoRA deltas are folded into the kernels (`merge_lora`; with a shared body
    this also changes the teacher: export is the last thing a run does). A
    projector is folded into the input embedding table (it maps each token's
    embedding on its own); the output embeddings keep the unprojected table, so
    a tied model with a projector is exported untied.
    """
    from alm.models.loading import save_model  # pylint: disable=import-outside-toplevel

    st = model.student.transformer
    lora_lib.merge_lora(st)
    out = st
    if model.student.projector is not None:
      table = st.embedder.embedding[...]
      proj = nnx.jit(lambda p, x: p(x))
      rows = [np.asarray(proj(model.student.projector, table[i:i + 4096]))
              for i in range(0, table.shape[0], 4096)]
      new_cfg = st.cfg.replace(tie_embeddings=False) if st.lm_head is None else st.cfg
      out = abstract_transformer(new_cfg, dtype=st.dtype, param_dtype=st.param_dtype)
      out.embedder.embedding.set_value(jnp.asarray(np.concatenate(rows), st.param_dtype))
      head = table.T if st.lm_head is None else st.lm_head.kernel[...]
      out.lm_head.kernel.set_value(jnp.asarray(head, st.param_dtype))
      out.layers, out.final_norm = st.layers, st.final_norm
    return save_model(out, directory, tokenizer)

  @staticmethod
  def _projector(width: int, adapters: AdapterConfig, rngs: nnx.Rngs, like: Transformer):
    if not adapters.projector:
      return None
    return EmbeddingProjector(
        width, ProjectorConfig(num_layers=adapters.projector_layers,
                               num_heads=adapters.projector_heads),
        rngs=rngs, dtype=like.dtype, param_dtype=like.param_dtype)


@register_kind
class SharedBody(StudentKind):
  """Tokenizer transfer: the new tokenizer's embeddings on the teacher's body + LoRA.

  Args:
    init: `init(teacher, teacher_tok, student_tok) -> Transformer`, the student
      with its initial embeddings and the teacher's body shared (default:
      FVT, `fvt_student`; e.g. a hypernetwork's prediction,
      `alm.hypernet.transfer`).
  """

  name = "shared_body"

  def __init__(self, init=None):
    self.init = init or fvt_student

  def build(self, teacher, teacher_tok, student_tok, adapters, rngs):
    if adapters.train_body:
      raise TrainConfigError("train_body is not possible with a shared-body student: the "
                             "teacher is the same weights. Use lora_rank > 0, or distil into "
                             "a separate student (experiments/distill.py).")
    student = self.init(teacher, teacher_tok, student_tok)
    if adapters.lora_rank:
      lora_lib.apply_lora(teacher, lora_lib.LoRAConfig(rank=adapters.lora_rank,
                                                       alpha=adapters.lora_alpha), rngs=rngs)
    projector = self._projector(teacher.cfg.hidden_size, adapters, rngs, teacher)
    return Teacher(teacher), Student(student, projector)


@register_kind
class Separate(StudentKind):
  """Large-to-small: a separate student model with its own tokenizer; the teacher is frozen.

  Args:
    student: the student Transformer (its embedding rows must cover the
      student tokenizer's ids).
  """

  name = "separate"

  def __init__(self, student: Transformer):
    self.student = student

  def build(self, teacher, teacher_tok, student_tok, adapters, rngs):
    st = self.student
    if st is teacher:
      raise ValueError("The separate student is the teacher object itself; load the student "
                       "separately (or use the shared-body kind for tokenizer transfer).")
    rows = st.embedder.embedding.shape[0]
    if rows < student_tok.vocab_size:
      raise ValueError(f"The student has {rows} embedding rows but its tokenizer "
                       f"{student_tok.vocab_size} ids; pass the student model's own tokenizer.")
    if adapters.lora_rank:
      lora_lib.apply_lora(st, lora_lib.LoRAConfig(rank=adapters.lora_rank,
                                                  alpha=adapters.lora_alpha), rngs=rngs)
    projector = self._projector(st.cfg.hidden_size, adapters, rngs, st)
    return Teacher(teacher), Student(st, projector)

  @classmethod
  def trainable(cls, adapters):
    parts = super().trainable(adapters)
    if adapters.train_body:
      parts.append(_param_at(("student",)))
    return parts


def trainable_filter(model: DistillationModel, cfg: TrainConfig):
  """The NNX filter of what trains under `cfg`: the kind's parts + every head parameter.

  Paths are matched from the root of a `DistillationModel`, and only on the
  student's own submodules and the heads, so sharing the body with the teacher
  cannot make a frozen parameter trainable.
  """
  return nnx.Any(_param_at(("heads",)), *student_kind(model.kind).trainable(cfg.adapters))


def build_context(teacher: Transformer, student: Transformer, teacher_tok, student_tok,
                  cfg: TrainConfig, kind: str = "") -> terms_lib.BuildContext:
  return terms_lib.BuildContext(teacher_tok=teacher_tok, student_tok=student_tok,
                                teacher_cfg=teacher.cfg, student_cfg=student.cfg,
                                objective=cfg.objective, param_dtype=student.param_dtype,
                                student_kind=kind)


def build_model(kind: StudentKind, teacher: Transformer, teacher_tok: ByteTokenizer,
                student_tok: ByteTokenizer, cfg: TrainConfig) -> DistillationModel:
  """The `DistillationModel` of `cfg`: the kind's teacher and student, and the terms' heads.

  Args:
    kind: the student kind (`SharedBody()`, `Separate(student_model)`).
    teacher: the teacher model (with a shared body, modified in place: LoRA is
      added to its projections, shared with the student and off on the teacher path).
    teacher_tok: the teacher's tokenizer.
    student_tok: the student's tokenizer.
    cfg: the training config (adapters, seed, objective).

  Returns:
    The model.
  """
  rngs = nnx.Rngs(cfg.seed)
  t_view, student = kind.build(teacher, teacher_tok, student_tok, cfg.adapters, rngs)
  ctx = build_context(teacher, student.transformer, teacher_tok, student_tok, cfg, kind.name)
  heads = {}
  for term, _ in terms_lib.objective_terms(cfg.objective):
    term.check(ctx)
    h = term.head(ctx, rngs)
    if h is not None:
      heads[term.name] = h
  return DistillationModel(t_view, student, heads, kind.name)


def build_transfer_model(teacher: Transformer, teacher_tok: ByteTokenizer,
                         student_tok: ByteTokenizer, cfg: TrainConfig, *,
                         init=None) -> DistillationModel:
  """Tokenizer transfer's model: `build_model(SharedBody(init), ...)` (FVT by default)."""
  return build_model(SharedBody(init), teacher, teacher_tok, student_tok, cfg)


def build_distill_model(teacher: Transformer, teacher_tok: ByteTokenizer, student: Transformer,
                        student_tok: ByteTokenizer, cfg: TrainConfig) -> DistillationModel:
  """Large-to-small distillation's model: `build_model(Separate(student), ...)`."""
  return build_model(Separate(student), teacher, teacher_tok, student_tok, cfg)


def export_student(model: DistillationModel, directory: str | Path,
                   tokenizer: ByteTokenizer) -> Path:
  """Writes the trained student as an HF directory (see `StudentKind.export`)."""
  return student_kind(model.kind).export(model, directory, tokenizer)


def hash_vocab(h, tok: ByteTokenizer) -> None:
  """Feeds a vocabulary (size, token bytes, specials and their roles) into hashlib `h`."""
  h.update(str(tok.vocab_size).encode())
  for b in tok.token_bytes:
    h.update(len(b).to_bytes(2, "little") + b)
  h.update(json.dumps(sorted(int(i) for i in tok.special_ids)).encode())
  h.update(repr((tok.bos_id, tok.eos_id, getattr(tok, "pad_id", None))).encode())


def pair_hash(old: ByteTokenizer, new: ByteTokenizer) -> str:
  """A short hash of both vocabularies (bytes, specials and their roles)."""
  h = hashlib.sha256()
  for tok in (old, new):
    hash_vocab(h, tok)
  return h.hexdigest()[:20]


def _decomposition_cache(old: ByteTokenizer, new: ByteTokenizer) -> Path:
  from alm import assets  # pylint: disable=import-outside-toplevel
  return assets.cache_dir() / "fvt" / f"{pair_hash(old, new)}.npz"


def cached_decomposition(old: ByteTokenizer, new: ByteTokenizer) -> fvt.Decomposition:
  """`alm.hypernet.fvt.decompose`, cached on disk per tokenizer pair.

  Decomposing a 150k vocabulary takes about a minute on 2 CPU cores; the
  result depends only on the two vocabularies (hashed into the file name).
  """
  path = _decomposition_cache(old, new)
  if path.exists():
    try:
      z = np.load(path)
      return fvt.Decomposition(offsets=z["offsets"], flat=z["flat"], kind=z["kind"])
    except (OSError, ValueError, KeyError):
      logging.warning("Ignoring unreadable FVT cache %s", path)
  d = fvt.decompose(old, new)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(".tmp.npz")
  np.savez(tmp, offsets=d.offsets, flat=d.flat, kind=d.kind)
  tmp.replace(path)
  return d


def fvt_student(teacher: Transformer, old: ByteTokenizer, new: ByteTokenizer) -> Transformer:
  """`alm.hypernet.fvt.fvt_transformer` with the decomposition cached on disk.

  Returns:
    The student Transformer, body shared with `teacher`.
  """
  fvt.check_embedding_rows(teacher.embedder.embedding.shape[0], old)
  return fvt.fvt_transformer(teacher, old, new, decomposition=cached_decomposition(old, new))


def count_params(state) -> int:
  """Number of scalars in an NNX state (or any pytree of arrays)."""
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(state)))
