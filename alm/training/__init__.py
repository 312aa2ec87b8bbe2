"""Training: one distillation engine for every use case.

Configuration (`alm.training.config`):
  TrainConfig          objective + optimizer + adapters + shapes + mesh (+ seed);
                       `TrainConfig.build(preset=..., **options)`
  ObjectiveConfig, OptimizerConfig, AdapterConfig, ShapeConfig, MeshConfig
  PRESETS              named recipes (the demo, the paper's settings)

Objectives (`alm.training.terms`, plug-ins in `alm/training/methods/`):
  Term, Method, register_term, register_method, methods, term_names

Students (`alm.training.students`):
  build_transfer_model   tokenizer transfer: FVT embeddings + LoRA on the teacher's body
  build_distill_model    large-to-small: a separate student, its own tokenizer
  build_model, SharedBody, Separate, StudentKind, DistillationModel, export_student

Running (`alm.training.trainer`, `alm.training.transfer`, `alm.training.distill`):
  Trainer, RunOptions, run_transfer, TransferJob

Importing `alm.training` is cheap; the names load on first use.
"""

from __future__ import annotations

from alm._lazy import lazy_exports

_LAZY = {
    "TrainConfig": "alm.training.config",
    "ObjectiveConfig": "alm.training.config",
    "OptimizerConfig": "alm.training.config",
    "AdapterConfig": "alm.training.config",
    "ShapeConfig": "alm.training.config",
    "MeshConfig": "alm.training.config",
    "PRESETS": "alm.training.config",
    "TrainConfigError": "alm.training.config",
    "Term": "alm.training.terms",
    "Method": "alm.training.terms",
    "register_term": "alm.training.terms",
    "register_method": "alm.training.terms",
    "methods": "alm.training.terms",
    "term_names": "alm.training.terms",
    "build_model": "alm.training.students",
    "build_transfer_model": "alm.training.students",
    "build_distill_model": "alm.training.students",
    "export_student": "alm.training.students",
    "DistillationModel": "alm.training.students",
    "StudentKind": "alm.training.students",
    "SharedBody": "alm.training.students",
    "Separate": "alm.training.students",
    "Trainer": "alm.training.trainer",
    "RunOptions": "alm.training.trainer",
    "run_transfer": "alm.training.transfer",
    "TransferJob": "alm.training.transfer",
    "make_consts": "alm.training.step",
    "Stepper": "alm.training.step",
}

__all__ = sorted(_LAZY)

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
