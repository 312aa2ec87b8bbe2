"""The typed configuration of a distillation run, composed of small parts.

    TrainConfig = objective + optimizer + adapters + shapes + mesh (+ seed)

Every option has exactly one home: a field of one part, with its default, its
help text and its bounds (in the field's metadata). The experiment binaries
generate their flags from these fields (`flat_fields`), so a flag can never
disagree with the dataclass. Field names are unique across the parts, so a
config can also be written flat:

    cfg = TrainConfig.build(preset="demo", method="alm+sft", steps=50)

Named presets (`PRESETS`: the CPU demo, the paper's settings) are data a user
can print (`python -m experiments.transfer_tokenizer --print_config`), copy and
edit. Every option with a fixed set of values is a `Literal`, validated when the
config is built: a typo is an error naming the valid values, never a silently
ignored string. `TrainConfig.to_dict()` is what checkpoints store and compare on
resume.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any, Literal, get_args

from alm._validation import check_choice

Divergence = Literal["kl", "tv", "reverse_kl"]
Constraint = Literal["unconstrained", "space", "unbiased", "boundary_prob"]
Combine = Literal["fixed", "gradmag"]
DType = Literal["float32", "bfloat16"]

DIVERGENCES: tuple[str, ...] = get_args(Divergence)
CONSTRAINTS: tuple[str, ...] = get_args(Constraint)
COMBINES: tuple[str, ...] = get_args(Combine)
DTYPES: tuple[str, ...] = get_args(DType)

# `alm.losses.alm.MIN_TAU` (= log 2 / -log 2^-126), restated so that option
# errors come before JAX is imported; a test checks that the two agree.
MIN_TAU = 1.0 / 126.0


class TrainConfigError(ValueError):
  """A training option has an invalid value; the message names the valid ones."""


def _opt(default: Any, help: str, *, low: float | None = None, strict: bool = False,  # pylint: disable=redefined-builtin
         high: float | None = None) -> Any:
  """A config field with its help text and numeric bounds (`low < x` when `strict`)."""
  return dataclasses.field(default=default,
                           metadata={"help": help, "low": low, "strict": strict, "high": high})


def _check_fields(part: Any) -> None:
  """Types, choices and bounds of every field of a config part, from its metadata."""
  hints = typing.get_type_hints(type(part))
  for f in dataclasses.fields(part):
    v, kind = getattr(part, f.name), hints[f.name]
    if typing.get_origin(kind) is Literal:
      check_choice(f.name, v, get_args(kind), error=TrainConfigError)
      continue
    if kind is bool:
      if not isinstance(v, bool):
        raise TrainConfigError(f"{f.name} must be True or False, got {v!r}.")
      continue
    if kind in (int, float):
      if isinstance(v, bool) or not isinstance(v, (int, float)) or (
          kind is int and not float(v).is_integer()):
        raise TrainConfigError(f"{f.name} must be {'an integer' if kind is int else 'a number'}"
                               f", got {v!r}.")
      if not math.isfinite(v):
        raise TrainConfigError(f"{f.name} must be a finite number, got {v}.")
      low, high, strict = f.metadata.get("low"), f.metadata.get("high"), f.metadata.get("strict")
      if low is not None and (v <= low if strict else v < low):
        raise TrainConfigError(f"{f.name} must be {'>' if strict else '>='} {low:g}, got {v}.")
      if high is not None and v > high:
        raise TrainConfigError(f"{f.name} must be <= {high:g}, got {v}.")
    elif kind is str and not isinstance(v, str):
      raise TrainConfigError(f"{f.name} must be a string, got {v!r}.")


def parse_weighted_terms(spec: str) -> tuple[tuple[str, float], ...]:
  """`"hidden=0.5,ntp=0.1"` -> (("hidden", 0.5), ("ntp", 0.1)); "" -> ()."""
  out = []
  for item in filter(None, (s.strip() for s in spec.split(","))):
    name, sep, w = item.partition("=")
    try:
      weight = float(w) if sep else 1.0
    except ValueError:
      weight = float("nan")
    if not name or not (math.isfinite(weight) and weight >= 0):
      raise TrainConfigError(f"add_terms: {item!r} is not TERM or TERM=WEIGHT with a finite "
                             "weight >= 0 (e.g. add_terms='hidden=0.5').")
    out.append((name.strip(), weight))
  return tuple(out)


def parse_layer_pairs(spec: str) -> tuple[tuple[int, int], ...]:
  """`"-1"` -> ((-1, -1),); `"12:6,-1:-1"` -> ((12, 6), (-1, -1)) (teacher:student)."""
  pairs = []
  for item in filter(None, (s.strip() for s in spec.split(","))):
    t, sep, s = item.partition(":")
    try:
      pairs.append((int(t), int(s if sep else t)))
    except ValueError:
      raise TrainConfigError(f"hidden_layers: {item!r} is not LAYER or TEACHER_LAYER:"
                             "STUDENT_LAYER (integers; -1 is the last layer).") from None
  if not pairs:
    raise TrainConfigError("hidden_layers must name at least one layer pair (e.g. '-1').")
  return tuple(pairs)


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
  """What the run minimises: a method's weighted terms, and their options."""

  method: str = _opt("alm", "Training method (a preset objective, alm/training/methods/): "
                     "alm, alm+sft, sft, dskd, mined, uld.")
  add_terms: str = _opt("", "More objective terms as TERM=WEIGHT, comma-separated (e.g. "
                        "'hidden=0.5': the hidden-state loss; 'ntp=0.1').")
  combine: Combine = _opt("fixed", "How the terms combine: 'fixed' weights, or 'gradmag' "
                          "(weights 1/|grad| on the last block, docs/method.md §6).")
  divergence: Divergence = _opt("kl", "ALM binarised f-divergence.")
  tau: float = _opt(100.0, "ALM temperature.", low=MIN_TAU)
  constraint: Constraint = _opt(
      "unconstrained", "ALM chunk constraint: 'space' / 'unbiased' merge chunks on the host "
      "(alm.align; 'unbiased' needs bias tables), 'boundary_prob' in the loss (merge until the "
      "teacher predicts a pretoken boundary with probability > gamma).")
  gamma: float = _opt(0.1, "Threshold of the unbiased / boundary_prob constraints, in (0, 1).",
                      low=0.0, strict=True, high=1.0)
  debias: bool = _opt(True, "Outcome-chunk debiasing of chunk likelihoods (docs/method.md §3).")
  ntp_weight: float = _opt(1.0, "lambda: the weight of next-token prediction in alm+sft, dskd, "
                           "mined and uld.", low=0.0)
  hidden_layers: str = _opt("-1", "Layer pairs of the hidden-state term, TEACHER:STUDENT "
                            "comma-separated ('-1': last with last).")
  uld_top_k: int = _opt(4096, "ULD: sort only the K largest probabilities of each side, the "
                        "rest as one tail mass (0: the exact full sort, ~10x slower at 150k "
                        "vocabularies; BUILD_NOTES has the error).", low=0)

  def __post_init__(self):
    # The specific messages first (the generic bounds below would pre-empt them).
    if isinstance(self.gamma, (int, float)) and not 0.0 < self.gamma < 1.0:  # also NaN
      raise TrainConfigError(f"gamma must be a probability threshold in (0, 1), got "
                             f"{self.gamma}.")
    if isinstance(self.tau, (int, float)) and 0 < self.tau < MIN_TAU:
      raise TrainConfigError(
          f"tau={self.tau} is too small: exp(L / tau) underflows float32 even for a chunk of "
          f"probability 1/2, so the ALM loss would be silently 0; use tau >= {MIN_TAU:.4f} "
          "(the paper's default is 100).")
    _check_fields(self)
    parse_weighted_terms(self.add_terms)
    parse_layer_pairs(self.hidden_layers)
    from alm.training import terms  # pylint: disable=import-outside-toplevel
    terms.check_objective(self)  # the method and term names exist, and the terms agree


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """Adam without weight decay on a warm-up + linear-decay schedule."""

  steps: int = _opt(100, "Optimizer steps (0: no training; evaluate and export the "
                     "initialised student, e.g. the FVT baseline).", low=0)
  learning_rate: float = _opt(1e-4, "Peak learning rate (Adam, no weight decay).", low=0.0,
                              strict=True)
  warmup_steps: int = _opt(10, "Linear warm-up steps from 0 to the peak.", low=0)
  decay_to: float = _opt(0.0, "Learning rate at the last step, as a fraction of the peak "
                         "(linear decay; the paper decays to 0).", low=0.0, high=1.0)
  grad_clip: float = _opt(1.0, "Global gradient-norm clip (0: off).", low=0.0)


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
  """What trains in the student (the teacher never trains)."""

  lora_rank: int = _opt(64, "LoRA rank on attention + MLP (0: no LoRA).", low=0)
  lora_alpha: float = _opt(64.0, "LoRA alpha (the delta is scaled by alpha / rank).", low=0.0,
                           strict=True)
  train_embeddings: bool = _opt(True, "Train the student's input (and output) embeddings.")
  train_body: bool = _opt(False, "Full fine-tuning: train every student parameter (a separate "
                          "student, or a byte student, whose body is then a copy; a "
                          "shared-body student would change its teacher).")
  projector: bool = _opt(False, "Train an embedding projector on the student's input "
                         "embeddings (docs/method.md §8).")
  projector_layers: int = _opt(3, "Projector depth.", low=1)
  projector_heads: int = _opt(12, "Projector attention heads (must divide the model width).",
                              low=1)
  ngram_embeddings: bool = _opt(True, "Byte students (target_tokenizer=bytes): add the "
                                "teacher's embedding of the longest teacher token ending at "
                                "each byte (the backtracked subword n-gram, kept frozen).")
  ngram_max_bytes: int = _opt(16, "Byte students: the longest n-gram looked up, in bytes.",
                              low=1, high=16)

  def __post_init__(self):
    _check_fields(self)
    if not (self.train_embeddings or self.lora_rank or self.projector or self.train_body):
      raise TrainConfigError("Nothing to train: enable train_embeddings, lora_rank > 0, "
                             "projector or train_body.")
    if self.train_body and self.lora_rank:
      raise TrainConfigError("train_body (full fine-tuning) and lora_rank > 0 exclude each "
                             "other: pass lora_rank=0 for full fine-tuning.")


@dataclasses.dataclass(frozen=True)
class ShapeConfig:
  """Batch and sequence shapes, and the compute dtype."""

  batch_size: int = _opt(8, "Rows per optimizer step (the global batch).", low=1)
  grad_accum: int = _opt(1, "Micro-batches per step; batch_size must be a multiple.", low=1)
  teacher_len: int = _opt(128, "Teacher tokens per row.", low=2)
  student_len: int = _opt(128, "Student tokens per row.", low=2)
  dtype: DType = _opt("float32", "Compute dtype (the trained parameters stay float32).")
  teacher_param_dtype: DType = _opt("float32", "Storage dtype of a separate teacher's "
                                    "parameters (bfloat16 halves its memory).")

  def __post_init__(self):
    _check_fields(self)
    if self.batch_size % self.grad_accum:
      raise TrainConfigError(f"batch_size={self.batch_size} must be a multiple of "
                             f"grad_accum={self.grad_accum} (micro-batch = batch / accum).")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Device-mesh axis sizes (data, fsdp, tensor)."""

  mesh_data: int = _opt(1, "Data-parallel mesh axis size.", low=1)
  mesh_fsdp: int = _opt(1, "FSDP mesh axis size.", low=1)
  mesh_tensor: int = _opt(1, "Tensor-parallel mesh axis size.", low=1)

  def __post_init__(self):
    _check_fields(self)


_PARTS: dict[str, type] = {"objective": ObjectiveConfig, "optimizer": OptimizerConfig,
                           "adapters": AdapterConfig, "shapes": ShapeConfig, "mesh": MeshConfig}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Everything that decides what a training run computes (see the module docstring).

  Attributes:
    objective: the loss terms and their options.
    optimizer: steps and the learning-rate schedule.
    adapters: what trains in the student.
    shapes: batch, lengths, dtype.
    mesh: device-mesh axis sizes.
    seed: seeds the data order and the initialisation of LoRA, projectors and
      the terms' heads.
  """

  objective: ObjectiveConfig = dataclasses.field(default_factory=ObjectiveConfig)
  optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
  adapters: AdapterConfig = dataclasses.field(default_factory=AdapterConfig)
  shapes: ShapeConfig = dataclasses.field(default_factory=ShapeConfig)
  mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
  seed: int = _opt(0, "Seed of the data order and of the LoRA / projector / head init.", low=0)

  def __post_init__(self):
    for name, kind in _PARTS.items():
      if not isinstance(getattr(self, name), kind):
        raise TrainConfigError(f"TrainConfig.{name} must be a {kind.__name__}, got "
                               f"{type(getattr(self, name)).__name__}.")
    if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
      raise TrainConfigError(f"seed must be an integer >= 0, got {self.seed!r}.")
    data_par = self.mesh.mesh_data * self.mesh.mesh_fsdp
    if self.micro_batch % data_par:
      raise TrainConfigError(
          f"The micro-batch ({self.micro_batch} rows) must be divisible by "
          f"mesh_data * mesh_fsdp = {data_par}; change batch_size or grad_accum.")

  @property
  def micro_batch(self) -> int:
    """Rows per micro-batch."""
    return self.shapes.batch_size // self.shapes.grad_accum

  # -- flat access (flags, presets, `build`) ------------------------------------

  @classmethod
  def build(cls, preset: str | None = None, **flat: Any) -> "TrainConfig":
    """A config from a preset (default: the dataclass defaults) and flat overrides.

    Args:
      preset: a name in `PRESETS`, or None.
      **flat: any field of any part by its own name (`method="sft"`, `steps=50`,
        `lora_rank=0`, `seed=1`).

    Raises:
      TrainConfigError: an unknown preset or field, or an invalid value.
    """
    fields = flat_fields()
    # A preset may also hold options of the run around the training (e.g. the job's
    # teacher_samples); those are the binaries' business.
    values = ({k: v for k, v in preset_values(preset).items() if k in fields} if preset
              else {})
    values.update(flat)
    bad = sorted(set(values) - set(fields))
    if bad:
      raise TrainConfigError(f"Unknown option(s) {bad}; known: {sorted(fields)}.")
    parts = {p: {} for p in _PARTS}
    top = {}
    for k, v in values.items():
      (parts[fields[k][0]] if fields[k][0] else top)[k] = v
    return cls(**{p: _PARTS[p](**kw) for p, kw in parts.items()}, **top)

  def flat(self) -> dict[str, Any]:
    """Every option by its flat name (the inverse of `build`)."""
    out = {}
    for p in _PARTS:
      out.update(dataclasses.asdict(getattr(self, p)))
    out["seed"] = self.seed
    return out

  def replace(self, **flat: Any) -> "TrainConfig":
    """A copy with flat `changes` applied (validated again)."""
    return TrainConfig.build(**{**self.flat(), **flat})

  def to_dict(self) -> dict[str, Any]:
    """A JSON-serialisable nested dict of every field."""
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
    """The inverse of `to_dict` (unknown keys are an error)."""
    known = set(_PARTS) | {"seed"}
    bad = sorted(set(d) - known)
    if bad:
      raise TrainConfigError(f"Unknown TrainConfig field(s) {bad}; known: {sorted(known)}.")
    flat = {k: v for k, v in d.items() if k == "seed"}
    for p in _PARTS:
      flat.update(d.get(p, {}))
    return cls.build(**flat)


def flat_fields() -> dict[str, tuple[str | None, dataclasses.Field, Any]]:
  """Every option: flat name -> (part name or None for top level, field, type)."""
  out: dict[str, tuple[str | None, dataclasses.Field, Any]] = {}
  for p, kind in _PARTS.items():
    hints = typing.get_type_hints(kind)
    for f in dataclasses.fields(kind):
      assert f.name not in out, f"duplicate option name {f.name}"
      out[f.name] = (p, f, hints[f.name])
  seed = next(f for f in dataclasses.fields(TrainConfig) if f.name == "seed")
  out["seed"] = (None, seed, int)
  return out


# Named recipes: flat overrides of the dataclass defaults. A user starts from one
# (`--preset=NAME`) and overrides any option on top. Keys that are not TrainConfig
# options (teacher_samples) are options of the binaries' jobs.
PRESETS: dict[str, dict[str, Any]] = {
    # The README's CPU demo (SmolLM2-135M -> Qwen3 tokenizer, 30 steps in ~15 min).
    "demo": dict(steps=30, learning_rate=3e-4, warmup_steps=3, batch_size=4,
                 constraint="boundary_prob", teacher_samples=32),
    # The paper's tokenizer-transfer settings (docs/method.md §9): GPU scale.
    "paper-transfer": dict(steps=20_000, learning_rate=1e-5, warmup_steps=2_000, batch_size=64,
                           teacher_len=512, student_len=512, lora_rank=64, lora_alpha=64.0,
                           divergence="kl", tau=100.0, gamma=0.1, constraint="unbiased"),
    # CPU-sized large-to-small distillation (experiments/distill.py).
    "distill-demo": dict(method="alm+sft", steps=30, learning_rate=1e-4, warmup_steps=3,
                         batch_size=4, lora_rank=0, train_body=True, train_embeddings=True,
                         constraint="boundary_prob", teacher_samples=32),
    # The paper's large-to-small settings (maths, docs/method.md §9 and §10): full
    # fine-tuning, length 1024, batch 64, 5k steps, LR 5e-6 (the paper gives no
    # warm-up for it: 10 % here).
    "paper-distill": dict(method="alm+sft", steps=5_000, learning_rate=5e-6, warmup_steps=500,
                          batch_size=64, teacher_len=1024, student_len=1024, lora_rank=0,
                          train_body=True, constraint="unbiased"),
    # Transfer to bytes (docs/method.md §8; --target_tokenizer=bytes): the paper's objective
    # (ALM + ALM over space chunks + the hidden-state loss, balanced by GradMag), full
    # fine-tuning of a copied body, no projector; the student row ~4x the teacher's in
    # bytes. CPU-sized:
    "bytes-demo": dict(method="alm", add_terms="alm_space=1,hidden=1", combine="gradmag",
                       steps=30, learning_rate=1e-4, warmup_steps=3, batch_size=4,
                       teacher_len=64, student_len=256, lora_rank=0, train_body=True,
                       constraint="boundary_prob", teacher_samples=32),
    # Hypernetwork training (experiments/train_hypernet.py, docs/method.md §14): only the
    # hypernetwork trains, by ALM against the base with its own tokenizer. CPU-sized:
    "hypernet-demo": dict(method="alm", steps=30, learning_rate=3e-4, warmup_steps=3,
                          batch_size=4, teacher_len=64, student_len=64, lora_rank=0),
    # ... and the paper's (LR 3e-5, batch 32, 2048 bytes per 512 teacher tokens).
    "paper-bytes": dict(method="alm", add_terms="alm_space=1,hidden=1", combine="gradmag",
                        steps=20_000, learning_rate=3e-5, warmup_steps=2_000, batch_size=32,
                        teacher_len=512, student_len=2048, lora_rank=0, train_body=True,
                        divergence="kl", tau=100.0, gamma=0.1, constraint="unbiased"),
}


def preset_values(name: str) -> dict[str, Any]:
  """The flat overrides of preset `name` (raises naming the known presets)."""
  check_choice("preset", name, tuple(PRESETS), error=TrainConfigError)
  return dict(PRESETS[name])
