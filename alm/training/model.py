"""The teacher/student pair of tokenizer transfer, sharing one copy of the body.

    teacher = base body + teacher embeddings, LoRA switched off
    student = the same body Variables + LoRA + FVT-initialised embeddings for
              the new tokenizer (+ an optional embedding projector on the
              student's input embeddings)

`TransferModel` holds both; `trainable_filter(cfg)` selects exactly what
trains (new embeddings, LoRA adapters, projector) by explicit NNX filters, so
the optimizer state and the gradients never touch the frozen body or the
teacher embeddings.
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
from alm.training.config import TrainConfig

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class Student(nnx.Module):
  """The student: shared body + new embeddings (+ projector), a model-like callable.

  Called like a `Transformer` (`student(ids, attention_mask=...)`), so the
  evaluation code treats teacher and student alike.

  Args:
    transformer: the student Transformer (its body shared with the teacher).
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
  """The teacher view: the base Transformer with every LoRA delta switched off.

  Args:
    transformer: the teacher Transformer (LoRA modules inside it are shared
      with the student and disabled while the teacher runs).
  """

  def __init__(self, transformer: Transformer):
    self.transformer = transformer

  def __call__(self, input_ids, *, attention_mask=None, segment_ids=None, positions=None,
               hidden_layers=()):
    with lora_lib.lora_disabled(self.transformer):
      return self.transformer(input_ids, attention_mask=attention_mask,
                              segment_ids=segment_ids, positions=positions,
                              hidden_layers=hidden_layers)


class TransferModel(nnx.Module):
  """Teacher and student of a tokenizer transfer (one body in memory).

  Args:
    teacher: the teacher view.
    student: the student.
    dskd_projector: the learned cross-model attention maps of the DSKD
      baseline (`alm.losses.dskd.DSKDProjector`), trained with the student
      when the method is "dskd"; None otherwise.
  """

  def __init__(self, teacher: Teacher, student: Student, dskd_projector=None):
    self.teacher = teacher
    self.student = student
    self.dskd_projector = dskd_projector


def trainable_filter(cfg: TrainConfig):
  """The NNX filter of what trains under `cfg`.

  New embeddings: the student Transformer's `embedder.embedding` (and its
  `lm_head.kernel` when the model is untied); LoRA: every `nnx.LoRAParam`;
  projector: every parameter under `student.projector`; method "dskd": every
  parameter under `dskd_projector` (always trained). The body, the norms
  and the teacher's embeddings are never selected. Paths are matched from
  the root of a `TransferModel`, and only on the student's own (unshared)
  submodules, so sharing the body cannot make a frozen parameter trainable.

  Args:
    cfg: the training config.

  Returns:
    A filter usable with `nnx.split`, `nnx.state`, `nnx.Optimizer(wrt=...)`.
  """
  def new_embeddings(path, value):
    p = tuple(path)
    return isinstance(value, nnx.Param) and p[:2] == ("student", "transformer") and (
        p[2:] == ("embedder", "embedding") or p[2:] == ("lm_head", "kernel"))

  def projector(path, value):
    return isinstance(value, nnx.Param) and tuple(path)[:2] == ("student", "projector")

  def dskd_projector(path, value):
    return isinstance(value, nnx.Param) and tuple(path)[:1] == ("dskd_projector",)

  parts = []
  if cfg.method == "dskd":
    parts.append(dskd_projector)
  if cfg.train_embeddings:
    parts.append(new_embeddings)
  if cfg.lora_rank:
    parts.append(nnx.LoRAParam)
  if cfg.projector:
    parts.append(projector)
  return nnx.Any(*parts)


def _pair_hash(old: ByteTokenizer, new: ByteTokenizer) -> str:
  """A short hash of both vocabularies (bytes, specials and their roles)."""
  h = hashlib.sha256()
  for tok in (old, new):
    h.update(str(tok.vocab_size).encode())
    for b in tok.token_bytes:
      h.update(len(b).to_bytes(2, "little") + b)
    h.update(json.dumps(sorted(int(i) for i in tok.special_ids)).encode())
    h.update(repr((tok.bos_id, tok.eos_id, getattr(tok, "pad_id", None))).encode())
  return h.hexdigest()[:20]


def _decomposition_cache(old: ByteTokenizer, new: ByteTokenizer) -> Path:
  from alm import assets  # pylint: disable=import-outside-toplevel
  return assets.cache_dir() / "fvt" / f"{_pair_hash(old, new)}.npz"


def mined_map_cache(teacher_tok: ByteTokenizer, student_tok: ByteTokenizer) -> Path:
  """Where the MinED vocabulary map of a tokenizer pair is cached (`~/.cache/alm/mined/`)."""
  from alm import assets  # pylint: disable=import-outside-toplevel
  return assets.cache_dir() / "mined" / f"{_pair_hash(teacher_tok, student_tok)}.npz"


def cached_mined_map(teacher_tok: ByteTokenizer, student_tok: ByteTokenizer) -> np.ndarray:
  """The MinED map (student id -> teacher id of minimal edit distance), cached on disk.

  `alm.losses.baselines.load_or_compute_mined_map` on the pair's token bytes,
  stored under `mined_map_cache(...)` (the file also holds a fingerprint of
  both vocabularies, so a stale file is recomputed, never reused). Special
  tokens carry no bytes, so the byte-level map would send every student
  special to the first teacher special; BOS and EOS are mapped to their
  counterparts instead (when both tokenizers have them).

  Args:
    teacher_tok: the teacher tokenizer.
    student_tok: the student tokenizer.

  Returns:
    int32 [V_S] teacher id per student id.
  """
  from alm.losses import baselines  # pylint: disable=import-outside-toplevel
  path = mined_map_cache(teacher_tok, student_tok)
  if not path.exists():
    logging.info("Computing the MinED vocabulary map (%d x %d tokens; once per tokenizer "
                 "pair, cached in %s)", student_tok.vocab_size, teacher_tok.vocab_size, path)
  m = np.array(baselines.load_or_compute_mined_map(
      path, list(student_tok.token_bytes), list(teacher_tok.token_bytes)), np.int32)
  for role in ("bos_id", "eos_id"):
    s_id, t_id = getattr(student_tok, role, None), getattr(teacher_tok, role, None)
    if s_id is not None and t_id is not None:
      m[int(s_id)] = int(t_id)
  return m


def cached_decomposition(old: ByteTokenizer, new: ByteTokenizer) -> fvt.Decomposition:
  """`alm.hypernet.fvt.decompose`, cached on disk per tokenizer pair.

  Decomposing a 150k vocabulary takes about a minute on 2 CPU cores; the
  result depends only on the two vocabularies (hashed into the file name).

  Args:
    old: the teacher tokenizer.
    new: the student tokenizer.

  Returns:
    The decomposition.
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
  """Like `alm.hypernet.fvt.fvt_transformer`, with the decomposition cached on disk.

  Args:
    teacher: the teacher Transformer.
    old: its tokenizer.
    new: the student tokenizer.

  Returns:
    The student Transformer, body shared with `teacher`.
  """
  cfg = teacher.cfg
  if teacher.embedder.embedding.shape[0] < old.vocab_size:
    raise ValueError(f"The teacher has {teacher.embedder.embedding.shape[0]} embedding rows "
                     f"but its tokenizer {old.vocab_size} ids; pass the model's own tokenizer.")
  d = cached_decomposition(old, new)
  emb_in = np.asarray(teacher.embedder.embedding[...])
  new_in = fvt.apply_decomposition(emb_in, d)
  new_out = None
  if teacher.lm_head is not None:
    new_out = fvt.apply_decomposition(np.asarray(teacher.lm_head.kernel[...]).T, d)
  new_cfg = cfg.replace(vocab_size=new.vocab_size, bos_token_id=new.bos_id,
                        eos_token_id=new.eos_id, pad_token_id=getattr(new, "pad_id", None))
  student = abstract_transformer(new_cfg, dtype=teacher.dtype, param_dtype=teacher.param_dtype)
  pdt = teacher.param_dtype
  student.embedder.embedding.set_value(jnp.asarray(new_in, pdt))
  if student.lm_head is not None:
    student.lm_head.kernel.set_value(jnp.asarray(new_out.T, pdt))
  student.layers = teacher.layers  # the same Variables: one body in memory
  student.final_norm = teacher.final_norm
  return student


def build_transfer_model(teacher: Transformer, teacher_tok: ByteTokenizer,
                         student_tok: ByteTokenizer, cfg: TrainConfig) -> TransferModel:
  """The teacher/student pair for `cfg`: FVT student, LoRA, optional projector.

  Args:
    teacher: the pretrained model (modified in place: LoRA is added to its
      projections, shared with the student and off on the teacher path).
    teacher_tok: its tokenizer.
    student_tok: the target tokenizer.
    cfg: the training config (LoRA rank/alpha, projector, seed; method "dskd"
      adds the DSKD projector).

  Returns:
    The `TransferModel`.
  """
  student = fvt_student(teacher, teacher_tok, student_tok)
  rngs = nnx.Rngs(cfg.seed)
  if cfg.lora_rank:
    lora_lib.apply_lora(teacher, lora_lib.LoRAConfig(rank=cfg.lora_rank, alpha=cfg.lora_alpha),
                        rngs=rngs)
  projector = None
  if cfg.projector:
    projector = EmbeddingProjector(
        teacher.cfg.hidden_size,
        ProjectorConfig(num_layers=cfg.projector_layers, num_heads=cfg.projector_heads),
        rngs=rngs, dtype=teacher.dtype, param_dtype=teacher.param_dtype)
  dskd_projector = None
  if cfg.method == "dskd":
    from alm.losses.dskd import DSKDProjector  # pylint: disable=import-outside-toplevel
    width = teacher.cfg.hidden_size  # the student shares the body: same width
    dskd_projector = DSKDProjector(width, width, rngs=rngs, param_dtype=teacher.param_dtype)
  return TransferModel(Teacher(teacher), Student(student, projector), dskd_projector)


def export_student(model: TransferModel, directory: str | Path, tokenizer: ByteTokenizer) -> Path:
  """Writes the trained student as an HF-format directory loadable by `alm.load_model`.

  LoRA deltas are folded into the kernels (`merge_lora`, which also changes
  the shared teacher body: export is the last thing a run does). A projector
  is folded into the input embedding table (it maps each token's embedding on
  its own); the output embeddings keep the unprojected table, so a tied model
  with a projector is exported untied.

  Args:
    model: the trained `TransferModel`.
    directory: where to write (created).
    tokenizer: the student tokenizer (written next to the weights).

  Returns:
    The directory.
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


def count_params(state) -> int:
  """Number of scalars in an NNX state (or any pytree of arrays)."""
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(state)))
