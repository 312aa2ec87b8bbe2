"""Evaluation: bits per byte, and held-out texts sampled from the teacher.

Names are imported lazily: `import alm.eval` imports neither numpy nor JAX
until one of them is used.

Bits per byte (`alm.eval.bpb`):
  bits_per_byte, BpbResult  -- a likelihood measure comparable across tokenizers

Teacher samples (`alm.eval.teacher_samples`):
  teacher_samples_file      -- sample once, cache the JSONL, return its path
  sample_texts              -- ancestral samples of a model, as texts
"""

from __future__ import annotations

from alm._lazy import lazy_exports

_LAZY = {
    "BpbResult": "alm.eval.bpb",
    "bits_per_byte": "alm.eval.bpb",
    "sample_texts": "alm.eval.teacher_samples",
    "teacher_samples_file": "alm.eval.teacher_samples",
}

__all__ = sorted(_LAZY)

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
