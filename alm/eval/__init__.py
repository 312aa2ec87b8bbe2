"""Evaluation: scoring, bits per byte, lm-eval, and held-out texts sampled from the teacher.

Names are imported lazily: `import alm.eval` imports neither numpy nor JAX
until one of them is used.

Scoring (`alm.eval.scoring`, the one scoring core every evaluation uses):
  score_tokens, logit_scores, TokenScores -- per-token log-probs and greedy flags

lm-eval (`alm.eval.harness`, `alm.eval.tasks`; needs lm-eval, `make setup` installs it):
  ALMLM                     -- lm-eval `LM` over any model the toolkit loads
  build_task_pack           -- the offline task pack (arithmetic, BIG-bench, held-out bpb)
  task_manager              -- an lm-eval TaskManager over the pack

Ensembles (`alm.eval.ensemble`, models that share a tokenizer):
  Ensemble, load_ensemble   -- mean of probabilities or of logits; scores like a model
  generate_ensemble         -- lockstep generation, one KV cache per model

Bits per byte (`alm.eval.bpb`):
  bits_per_byte, BpbResult  -- a likelihood measure comparable across tokenizers

Teacher samples (`alm.eval.teacher_samples`):
  teacher_samples_file      -- sample once, cache the JSONL, return its path
  sample_texts              -- ancestral samples of a model, as texts
"""

from __future__ import annotations

from alm._lazy import lazy_exports

_LAZY = {
    "ALMLM": "alm.eval.harness",
    "Ensemble": "alm.eval.ensemble",
    "TokenScores": "alm.eval.scoring",
    "build_task_pack": "alm.eval.tasks",
    "generate_ensemble": "alm.eval.ensemble",
    "load_ensemble": "alm.eval.ensemble",
    "logit_scores": "alm.eval.scoring",
    "score_tokens": "alm.eval.scoring",
    "task_manager": "alm.eval.tasks",
    "BpbResult": "alm.eval.bpb",
    "bits_per_byte": "alm.eval.bpb",
    "sample_texts": "alm.eval.teacher_samples",
    "teacher_samples_file": "alm.eval.teacher_samples",
}

__all__ = sorted(_LAZY)

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
