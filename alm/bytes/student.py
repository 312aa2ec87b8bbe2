"""The byte student kind: tokenizer transfer to raw bytes (SPEC §10, docs/method.md §8).

`ByteStudent` builds a `alm.bytes.model.ByteTransformer` from the teacher:
FVT byte tables, untied output, the backtracked subword n-gram embeddings
(`adapters.ngram_embeddings`, the teacher's input table, frozen), and either
the teacher's body shared and LoRA-tuned (the teacher path switches LoRA off,
as in `SharedBody`) or copied and fully fine-tuned (`train_body`, the paper's
recipe). `experiments/transfer_tokenizer.py --target_tokenizer=bytes` uses it;
nothing in the step or the trainer knows it is bytes.
"""

from __future__ import annotations

from alm.models import lora as lora_lib
from alm.training.config import TrainConfigError
from alm.training.students import (DistillationModel, Student, StudentKind, Teacher, _param_at,
                                   register_kind)


@register_kind
class ByteStudent(StudentKind):
  """Tokenizer transfer to bytes (see the module docstring)."""

  name = "bytes"

  def __init__(self, subword_storage: str = "copy"):
    """subword_storage: how the export stores the subword table ("copy" / "reference")."""
    self.subword_storage = subword_storage

  def build(self, teacher, teacher_tok, student_tok, adapters, rngs):
    from alm.bytes.model import byte_student  # pylint: disable=import-outside-toplevel
    if adapters.projector:
      raise TrainConfigError("A byte student takes no embedding projector (its input is a sum "
                             "of two tables, which a projector cannot be folded into); pass "
                             "projector=False.")
    student, _ = byte_student(teacher, teacher_tok, ngram=adapters.ngram_embeddings,
                              max_bytes=adapters.ngram_max_bytes, copy_body=adapters.train_body,
                              byte_tok=student_tok)
    student.subword_storage = self.subword_storage  # read by `export`
    if adapters.lora_rank:  # on the shared body; the teacher path runs with LoRA off
      lora_lib.apply_lora(teacher, lora_lib.LoRAConfig(rank=adapters.lora_rank,
                                                       alpha=adapters.lora_alpha), rngs=rngs)
    return Teacher(teacher), Student(student, None)

  @classmethod
  def trainable(cls, adapters):
    parts = super().trainable(adapters)
    if adapters.train_body:  # the copied body; never the frozen subword table
      parts += [_param_at(("student", "transformer", "layers")),
                _param_at(("student", "transformer", "final_norm"))]
    return parts

  @classmethod
  def export(cls, model: DistillationModel, directory, tokenizer):
    """Writes the byte student (`alm.bytes.model.save_byte_student`; LoRA merged first)."""
    from alm.bytes.model import save_byte_student  # pylint: disable=import-outside-toplevel
    st = model.student.transformer
    lora_lib.merge_lora(st)
    return save_byte_student(st, directory, tokenizer,
                             subword=getattr(st, "subword_storage", "copy"))
