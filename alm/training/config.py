"""The typed configuration of a tokenizer-transfer training run.

Every option with a fixed set of values is a `Literal`, validated when the
config is built: a typo is an error naming the valid values, never a silently
ignored string. `TrainConfig.to_dict()` is what checkpoints store and compare
on resume.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal, get_args

Method = Literal["alm", "alm+sft", "sft", "dskd", "mined", "uld"]
Divergence = Literal["kl", "tv", "reverse_kl"]
Constraint = Literal["unconstrained", "space", "unbiased", "boundary_prob"]
DType = Literal["float32", "bfloat16"]

METHODS: tuple[str, ...] = get_args(Method)
DIVERGENCES: tuple[str, ...] = get_args(Divergence)
CONSTRAINTS: tuple[str, ...] = get_args(Constraint)
DTYPES: tuple[str, ...] = get_args(DType)

# Methods whose loss needs the teacher forward on the teacher tokenization.
DISTILLATION_METHODS = frozenset({"alm", "alm+sft", "dskd", "mined", "uld"})
# Methods that add student next-token prediction.
NTP_METHODS = frozenset({"alm+sft", "sft", "dskd", "mined", "uld"})


# `alm.losses.alm.MIN_TAU` (= log 2 / -log 2^-126), restated so that option
# errors come before JAX is imported; a test checks that the two agree.
MIN_TAU = 1.0 / 126.0


class TrainConfigError(ValueError):
  """A training option has an invalid value; the message names the valid ones."""


def _choice(name: str, value: Any, valid: tuple[str, ...]) -> None:
  if value not in valid:
    raise TrainConfigError(f"{name}={value!r} is not valid; choose one of: {', '.join(valid)}.")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Everything that decides what a training run computes.

  Attributes:
    method: "alm" (ALM only), "alm+sft" (ALM + lambda * NTP), "sft"
      (student next-token prediction only), or a baseline ("dskd", "mined",
      "uld", when `alm.losses` provides it).
    steps: optimizer steps.
    learning_rate: peak learning rate (Adam, no weight decay).
    warmup_steps: linear warm-up from 0 to the peak.
    decay_to: the learning rate at the last step, as a fraction of the peak
      (linear decay; the paper decays to 0).
    grad_clip: global gradient-norm clip (0 disables).
    batch_size: rows per optimizer step (the global batch).
    grad_accum: micro-batches per step; `batch_size` must be a multiple.
    teacher_len: teacher tokens per row.
    student_len: student tokens per row.
    seed: seeds the data order, LoRA and projector init.
    divergence: ALM's binarised f-divergence ("kl", "tv", "reverse_kl").
    tau: ALM temperature.
    constraint: ALM chunk constraint ("unconstrained", "space", "unbiased",
      "boundary_prob").
    gamma: threshold of the "unbiased"/"boundary_prob" constraints, in (0, 1).
    debias: outcome-chunk debiasing (SPEC section 3).
    ntp_weight: lambda, the weight of NTP in "alm+sft" (and the baselines).
    lora_rank: LoRA r on attention and MLP (0: no LoRA, body frozen).
    lora_alpha: LoRA alpha (the delta is scaled by alpha / r).
    train_embeddings: train the new input (and output) embeddings.
    projector: train the embedding projector (SPEC section 8) on the student's
      input embeddings.
    projector_layers: projector depth.
    projector_heads: projector attention heads (must divide the width).
    dtype: compute dtype ("float32" or "bfloat16"); parameters stay float32.
    mesh_data, mesh_fsdp, mesh_tensor: device-mesh axis sizes.
  """

  method: Method = "alm"
  steps: int = 100
  learning_rate: float = 1e-4
  warmup_steps: int = 10
  decay_to: float = 0.0
  grad_clip: float = 1.0
  batch_size: int = 8
  grad_accum: int = 1
  teacher_len: int = 128
  student_len: int = 128
  seed: int = 0
  divergence: Divergence = "kl"
  tau: float = 100.0
  constraint: Constraint = "unconstrained"
  gamma: float = 0.1
  debias: bool = True
  ntp_weight: float = 1.0
  lora_rank: int = 64
  lora_alpha: float = 64.0
  train_embeddings: bool = True
  projector: bool = False
  projector_layers: int = 3
  projector_heads: int = 12
  dtype: DType = "float32"
  mesh_data: int = 1
  mesh_fsdp: int = 1
  mesh_tensor: int = 1

  def __post_init__(self):
    _choice("method", self.method, METHODS)
    _choice("divergence", self.divergence, DIVERGENCES)
    _choice("constraint", self.constraint, CONSTRAINTS)
    _choice("dtype", self.dtype, DTYPES)
    for name in ("steps", "batch_size", "grad_accum", "mesh_data", "mesh_fsdp", "mesh_tensor",
                 "projector_layers", "projector_heads"):
      if int(getattr(self, name)) < 1:
        raise TrainConfigError(f"{name} must be >= 1, got {getattr(self, name)}.")
    for name in ("warmup_steps", "lora_rank"):
      if int(getattr(self, name)) < 0:
        raise TrainConfigError(f"{name} must be >= 0, got {getattr(self, name)}.")
    if self.teacher_len < 2 or self.student_len < 2:
      raise TrainConfigError("teacher_len and student_len must be >= 2.")
    if self.batch_size % self.grad_accum:
      raise TrainConfigError(f"batch_size={self.batch_size} must be a multiple of "
                             f"grad_accum={self.grad_accum} (micro-batch = batch / accum).")
    data_par = self.mesh_data * self.mesh_fsdp
    if (self.batch_size // self.grad_accum) % data_par:
      raise TrainConfigError(
          f"The micro-batch ({self.batch_size // self.grad_accum} rows) must be divisible by "
          f"mesh_data * mesh_fsdp = {data_par}; change batch_size or grad_accum.")
    if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
      raise TrainConfigError(f"learning_rate must be a positive number, got {self.learning_rate}.")
    if not 0.0 <= self.decay_to <= 1.0:
      raise TrainConfigError(f"decay_to must be in [0, 1], got {self.decay_to}.")
    for name in ("learning_rate", "decay_to", "grad_clip", "tau", "ntp_weight",
                 "lora_alpha"):
      if not math.isfinite(float(getattr(self, name))):
        raise TrainConfigError(f"{name} must be a finite number, got {getattr(self, name)}.")
    if self.grad_clip < 0:
      raise TrainConfigError(f"grad_clip must be >= 0 (0 disables), got {self.grad_clip}.")
    if not (self.tau > 0 and math.isfinite(self.tau)):
      raise TrainConfigError(f"tau must be a finite positive number, got {self.tau}.")
    if self.tau < MIN_TAU:
      raise TrainConfigError(
          f"tau={self.tau} is too small: exp(L / tau) underflows float32 even for a chunk of "
          f"probability 1/2, so the ALM loss would be silently 0; use tau >= {MIN_TAU:.4f} "
          "(the paper's default is 100).")
    if not 0.0 < self.gamma < 1.0:  # also rejects NaN
      raise TrainConfigError(f"gamma must be a probability threshold in (0, 1), got "
                             f"{self.gamma}.")
    if self.lora_alpha <= 0:
      raise TrainConfigError(f"lora_alpha must be > 0, got {self.lora_alpha}.")
    if self.ntp_weight < 0:
      raise TrainConfigError(f"ntp_weight must be >= 0, got {self.ntp_weight}.")
    if not (self.train_embeddings or self.lora_rank or self.projector):
      raise TrainConfigError("Nothing to train: enable train_embeddings, lora_rank > 0 or "
                             "projector.")

  @property
  def micro_batch(self) -> int:
    """Rows per micro-batch."""
    return self.batch_size // self.grad_accum

  @property
  def needs_teacher(self) -> bool:
    """Whether the loss reads the teacher's forward pass."""
    return self.method in DISTILLATION_METHODS

  def to_dict(self) -> dict[str, Any]:
    """A JSON-serialisable dict of every field."""
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
    """The inverse of `to_dict` (unknown keys are an error)."""
    names = {f.name for f in dataclasses.fields(cls)}
    bad = sorted(set(d) - names)
    if bad:
      raise TrainConfigError(f"Unknown TrainConfig field(s) {bad}; known: {sorted(names)}.")
    return cls(**d)

  def replace(self, **changes) -> "TrainConfig":
    """A copy with `changes` applied (validated again)."""
    return dataclasses.replace(self, **changes)
