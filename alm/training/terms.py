"""Objective terms and methods: the plug-in seam of the distillation engine.

A **term** is one loss (ALM, next-token prediction, the hidden-state loss,
DSKD, MinED, ULD). It declares what it reads and returns a `LossSum`; the
engine (`alm.training.step`) runs each model's forward once per micro-batch,
asking only for what the union of the terms needs, and never names a term:

    class MyTerm(Term):
      name = "mine"
      def __call__(self, fwd: Forward) -> LossSum: ...

    register_term(MyTerm)   # built from the ObjectiveConfig by MyTerm.from_config

A **method** is what a user names (`--method=alm+sft`): a list of terms with
their weights (a number, or the name of an `ObjectiveConfig` field such as
"ntp_weight"). More terms can be added to any method (`add_terms="hidden=0.5"`),
and the weighted terms are combined by fixed weights or by GradMag
(`ObjectiveConfig.combine`).

One file per method lives in `alm/training/methods/`, which imports every
module in it: adding a method or a term is one new file there. The losses in
`alm.losses` stay pure functions of arrays; terms adapt them to the engine's
forward outputs.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable

import numpy as np

from alm.training.config import ObjectiveConfig, TrainConfigError, parse_weighted_terms


@dataclasses.dataclass(frozen=True)
class BuildContext:
  """What a term may read when the run is set up (on the host).

  Attributes:
    teacher_tok: the teacher tokenizer.
    student_tok: the student tokenizer.
    teacher_cfg: the teacher's `alm.models.ModelConfig`.
    student_cfg: the student's `alm.models.ModelConfig`.
    objective: the objective options.
    param_dtype: dtype of new trainable parameters (heads).
    student_kind: the student kind's name (`StudentKind.name`, e.g. "shared_body",
      "hypernet"; "" when not known).
  """

  teacher_tok: Any
  student_tok: Any
  teacher_cfg: Any
  student_cfg: Any
  objective: ObjectiveConfig
  param_dtype: Any = np.float32
  student_kind: str = ""


@dataclasses.dataclass
class Forward:
  """What a term reads inside the step (one micro-batch).

  Attributes:
    batch: the pipeline batch (`teacher_*` / `student_*` arrays).
    teacher: the teacher's `ModelOutput` (None when no term needs it).
    student: the student's `ModelOutput`.
    model: the `DistillationModel` (for embedding tables and final norms).
    consts: this term's per-run constants (`Term.consts`, plus whole-batch
      values from `Term.prepass`).
    head: this term's trainable module (`Term.head`), or None.
  """

  batch: dict[str, Any]
  teacher: Any
  student: Any
  model: Any
  consts: dict[str, Any]
  head: Any = None


class Term:
  """One objective term (see the module docstring). Override what applies.

  Attributes:
    name: the term's name (the metric is `loss_<name>`).
    needs_teacher: whether the term reads the teacher's forward.
    teacher_reads: what it reads of the teacher's output: "logits" (the full
      distribution), "token_logprobs" (only the path and boundary log-probs of
      `alm.losses.chunks.token_logprobs`, which a teacher cache provides, SPEC
      §15), "hidden" (hidden states).
  """

  name: str = ""
  needs_teacher: bool = True
  teacher_reads: frozenset[str] = frozenset({"logits"})

  @classmethod
  def from_config(cls, objective: ObjectiveConfig) -> "Term":
    """The term with its options taken from the objective config."""
    del objective
    return cls()

  def hidden_layers(self, ctx: BuildContext) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(teacher layers, student layers) whose hidden states the term reads."""
    del ctx
    return (), ()

  def teacher_hidden_layers(self, teacher_cfg) -> tuple[int, ...]:
    """The teacher layers (0..L) whose hidden states the term reads; a teacher cache
    built for the run stores them."""
    del teacher_cfg
    return ()

  def data_constraint(self) -> str | None:
    """The chunk constraint the data pipeline must align with, or None if any will do."""
    return None

  def check(self, ctx: BuildContext) -> None:
    """Raises a clear error when the term cannot run on this teacher/student pair."""
    del ctx

  def consts(self, ctx: BuildContext) -> dict[str, np.ndarray]:
    """Per-run constant arrays (computed once on the host, replicated on the mesh)."""
    del ctx
    return {}

  def head(self, ctx: BuildContext, rngs) -> Any:
    """An extra trainable module (e.g. DSKD's projector), or None."""
    del ctx, rngs
    return None

  def prepass(self, merge: Callable[[], Any], micro: dict[str, Any],
              consts: dict[str, Any]) -> dict[str, Any]:
    """Whole-batch constants under gradient accumulation (default: none).

    Called inside the step, only when a step has several micro-batches, with
    the stacked micro-batches `[accum, b, ...]`; what it returns is added to
    the term's `consts`, so that the micro-batch losses add up to the whole
    batch's (DSKD normalises by std's over the batch). `merge()` returns the
    `DistillationModel` with the step's parameters; call it inside any
    `jax.lax.scan` body (NNX modules must not cross trace levels).
    """
    del merge, micro, consts
    return {}

  def __call__(self, fwd: Forward):
    raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class Method:
  """A named preset objective.

  Attributes:
    name: what users pass as `--method`.
    summary: one line for `--help` and the README.
    terms: (term name, weight) pairs; a weight is a number or the name of an
      `ObjectiveConfig` field (e.g. "ntp_weight").
  """

  name: str
  summary: str
  terms: tuple[tuple[str, float | str], ...]


_TERMS: dict[str, type[Term]] = {}
_METHODS: dict[str, Method] = {}


def register_term(cls: type[Term]) -> type[Term]:
  """Registers a `Term` subclass under its `name` (usable as a decorator)."""
  if not cls.name or cls.name in _TERMS and _TERMS[cls.name] is not cls:
    raise ValueError(f"Term name {cls.name!r} is empty or already registered.")
  _TERMS[cls.name] = cls
  return cls


def register_method(method: Method) -> Method:
  """Registers a `Method` under its name."""
  if method.name in _METHODS and _METHODS[method.name] != method:
    raise ValueError(f"Method {method.name!r} is already registered.")
  _METHODS[method.name] = method
  return method


def _load_plugins() -> None:
  importlib.import_module("alm.training.methods")


def methods() -> dict[str, Method]:
  """Every registered method, by name."""
  _load_plugins()
  return dict(_METHODS)


def term_names() -> tuple[str, ...]:
  """Every registered term name."""
  _load_plugins()
  return tuple(sorted(_TERMS))


def objective_terms(objective: ObjectiveConfig) -> list[tuple[Term, float]]:
  """The run's weighted terms: the method's, then `add_terms` (a term named twice adds up).

  Raises:
    TrainConfigError: an unknown method or term (naming the known ones).
  """
  _load_plugins()
  if objective.method not in _METHODS:
    raise TrainConfigError(f"method={objective.method!r} is not valid; choose one of: "
                           f"{', '.join(sorted(_METHODS))}.")
  weights: dict[str, float] = {}
  for name, w in _METHODS[objective.method].terms:
    weights[name] = weights.get(name, 0.0) + float(getattr(objective, w) if isinstance(w, str)
                                                   else w)
  for name, w in parse_weighted_terms(objective.add_terms):
    if name not in _TERMS:
      raise TrainConfigError(f"add_terms: unknown term {name!r}; known terms: "
                             f"{', '.join(sorted(_TERMS))}.")
    weights[name] = weights.get(name, 0.0) + w
  return [(_TERMS[name].from_config(objective), w) for name, w in weights.items()]


def data_constraint(terms: list[tuple[Term, float]]) -> str:
  """The one chunk constraint the pipeline aligns with (default "unconstrained").

  Raises:
    TrainConfigError: two terms need differently aligned data.
  """
  wanted = {t.name: t.data_constraint() for t, _ in terms if t.data_constraint() is not None}
  if len(set(wanted.values())) > 1:
    raise TrainConfigError(f"The objective's terms need differently aligned data: {wanted}; "
                           "drop one of them or change the constraint.")
  return next(iter(wanted.values()), "unconstrained")


def check_objective(objective: ObjectiveConfig) -> None:
  """Raises `TrainConfigError` when the objective cannot be built (used by the config)."""
  data_constraint(objective_terms(objective))


def needs_live_teacher(terms: list[tuple[Term, float]], provided: frozenset[str]) -> list[str]:
  """The terms that read more of the teacher than `provided` (e.g. a teacher cache's)."""
  return [t.name for t, _ in terms if t.needs_teacher and not t.teacher_reads <= provided]


def needs_teacher(terms: list[tuple[Term, float]]) -> bool:
  """Whether any term reads the teacher's forward."""
  return any(t.needs_teacher for t, _ in terms)


