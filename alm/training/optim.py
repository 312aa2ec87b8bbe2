"""Optimizer and learning-rate schedule: Adam without weight decay, warm-up then decay.

The paper's recipe (docs/method.md §9): Adam (no weight decay), linear warm-up
from 0 to the peak over `warmup_steps`, then linear decay to `decay_to * peak`
at the last step. A global-norm gradient clip is optional (on by default at 1.0,
a common guard for freshly initialised embeddings; 0 disables it).
"""

from __future__ import annotations

import optax

from alm.training.config import TrainConfig


def learning_rate_schedule(cfg: TrainConfig) -> optax.Schedule:
  """Linear warm-up to `cfg.learning_rate`, then linear decay to `decay_to * peak`.

  Step `s` (0-based, the step being taken) gets
  `peak * (s + 1) / warmup` during warm-up (so the first step already moves),
  then decays linearly so that the last step `steps - 1` gets
  `decay_to * peak` (or slightly above it when `steps - warmup` is small).

  Args:
    cfg: the training config.

  Returns:
    An optax schedule (step -> learning rate).
  """
  o = cfg.optimizer
  peak = o.learning_rate
  warm = min(o.warmup_steps, o.steps)
  decay_steps = max(o.steps - warm, 1)
  end = o.decay_to * peak
  warmup = optax.linear_schedule(peak / max(warm, 1), peak, transition_steps=max(warm - 1, 1))
  decay = optax.linear_schedule(peak, end, transition_steps=decay_steps)
  if warm == 0:
    return decay
  return optax.join_schedules([warmup, decay], boundaries=[warm])


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
  """Adam (no weight decay) on the schedule, after an optional global-norm clip.

  Args:
    cfg: the training config.

  Returns:
    The optax transformation.
  """
  parts = []
  if cfg.optimizer.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(cfg.optimizer.grad_clip))
  parts.append(optax.adam(learning_rate_schedule(cfg)))
  return optax.chain(*parts)
