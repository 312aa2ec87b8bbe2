"""The training loop: steps, held-out evaluation, checkpoints, metrics, report.

    trainer = Trainer(model, teacher_tok, student_tok, cfg, pipeline, eval_batches,
                      RunOptions(out_dir="runs/x", checkpoint_every=50))
    summary = trainer.fit()

Held-out evaluation is bits per byte (bits of the predicted tokens over their
text bytes, so it is comparable across tokenizers) of the teacher on the
teacher tokenization and of the student on the student tokenization of the
same held-out rows. The pipeline cuts rows at byte offsets where both
tokenizations have a token boundary, so both sides see the same text.

Resuming: with `resume=True` and a checkpoint in `checkpoint_dir`, `fit`
restores the trainable parameters, the optimizer state, the data iterator and
the step, after checking that the checkpoint belongs to this run; the rest of
the run is then the same as if it had never stopped. A run interrupted between
checkpoints resumes from the last complete one, and `metrics.jsonl` is cut back
to the restored step so that it holds the uninterrupted run's history.

One run per directory: a `Trainer` holds the run locks of `out_dir` and the
checkpoint directory (`alm.training.rundir.RunLock`) from construction until
`fit` returns (or `close()`); a second run on them is refused at once, naming
the holder.

Non-finite steps: a step whose loss or gradient is not finite is not applied
(the step returns `skipped_nonfinite` = 1 and leaves the parameters and the
optimizer state as they were). Each is logged; `max_nonfinite_steps`
consecutive ones stop the run with `NonFiniteTrainingError`, and no checkpoint
is written while such a streak lasts, so the last checkpoint is a good one.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from alm.models import sharding as sharding_lib
from alm.tokenization.base import ByteTokenizer
from alm.training import step as step_lib
from alm.training.checkpoint import Checkpointer
from alm.training.config import TrainConfig
from alm.training.metrics import MetricsLogger, heldout_suffixes, read_history, write_report
from alm.training.students import DistillationModel, count_params, teacher_in_memory
from alm.training.optim import learning_rate_schedule, make_optimizer
from alm.training.rundir import RunLock


@dataclasses.dataclass(frozen=True)
class RunOptions:
  """Where a run writes, and how often it evaluates and checkpoints.

  Attributes:
    out_dir: metrics.jsonl, tensorboard/, report.md/png go here.
    checkpoint_dir: checkpoint directory (None: `out_dir/checkpoints`; "" : no
      checkpoints).
    checkpoint_every: save every this many steps (0: only at the end).
    keep_checkpoints: how many recent checkpoints to keep.
    resume: continue from the newest checkpoint in `checkpoint_dir`, if any.
    eval_every: held-out evaluation every this many steps (0: only at the
      start and the end).
    log_every: fetch and log training metrics every this many steps (each
      fetch waits for the device).
    progress: show a progress bar.
    tensorboard: write TensorBoard events.
    stop_after: stop after this many total steps without the end-of-run
      evaluation and save (simulates an interruption; for tests).
    max_nonfinite_steps: stop with `NonFiniteTrainingError` after this many
      consecutive steps with a non-finite loss or gradient (each is skipped,
      not applied).
  """

  out_dir: str
  checkpoint_dir: str | None = None
  checkpoint_every: int = 0
  keep_checkpoints: int = 2
  resume: bool = True
  eval_every: int = 0
  log_every: int = 1
  progress: bool = True
  tensorboard: bool = True
  stop_after: int | None = None
  max_nonfinite_steps: int = 10

  def __post_init__(self):
    # A bad value would otherwise surface minutes into the run (log_every=0: a
    # ZeroDivisionError after the first evaluation).
    for name, low in (("checkpoint_every", 0), ("keep_checkpoints", 1), ("eval_every", 0),
                      ("log_every", 1), ("max_nonfinite_steps", 1)):
      if int(getattr(self, name)) < low:
        raise ValueError(f"RunOptions.{name} must be >= {low}, got {getattr(self, name)}.")
    if self.stop_after is not None and self.stop_after < 0:
      raise ValueError(f"RunOptions.stop_after must be None or >= 0, got {self.stop_after}.")


class NonFiniteTrainingError(RuntimeError):
  """`max_nonfinite_steps` consecutive steps had a non-finite loss or gradient."""


def _json_safe(x: Any) -> Any:
  return json.loads(json.dumps(x, default=str))


def run_fingerprint(model: DistillationModel, teacher_tok: ByteTokenizer, student_tok: ByteTokenizer,
                    cfg: TrainConfig, extra: dict[str, Any] | None = None) -> dict[str, Any]:
  """What a checkpoint must match to be resumed by this run.

  Args:
    model: the distillation model.
    teacher_tok: the teacher tokenizer.
    student_tok: the student tokenizer.
    cfg: the training config.
    extra: more identifying information (model name, data spec, pipeline).

  Returns:
    A JSON-serialisable dict.
  """
  def tok(t):
    return {"name": str(getattr(t, "name", type(t).__name__)), "vocab_size": int(t.vocab_size)}
  return _json_safe({
      "teacher_model": dataclasses.asdict(model.teacher.transformer.cfg),
      "student_kind": model.kind,
      "student_model": dataclasses.asdict(model.student.transformer.cfg),
      "teacher_tokenizer": tok(teacher_tok),
      "student_tokenizer": tok(student_tok),
      "train_config": cfg.to_dict(),
      **(extra or {}),
  })


class Trainer:
  """Runs distillation training of any objective and student kind (see the module docstring).

  Args:
    model: the `DistillationModel` (`alm.training.build_transfer_model`,
      `build_distill_model` or `build_model`).
    teacher_tok: the teacher tokenizer.
    student_tok: the student tokenizer.
    cfg: the training config.
    train_data: an `alm.data.pipeline.Pipeline` (iterator with `state()` /
      `restore()`) of training batches of `cfg.shapes.batch_size` rows, or a
      teacher cache's batches (`alm.data.teacher_cache.CacheBatches`: the
      step then reads the teacher's outputs from them, SPEC §15).
    eval_batches: fixed held-out batches (same feature layout).
    extra_eval: more held-out sets, {label: batches}, evaluated like
      `eval_batches` and reported under `<key>@<label>` (e.g. text of another
      domain than the training data, to see what training forgets).
    opts: output, evaluation and checkpoint options.
    fingerprint_extra: identifying information stored with checkpoints.
    summary_extra: added to the report's summary table (e.g. the command).
    title: the report's title (default: "Distillation").
    eval_hook: more held-out numbers computed from the current model at each
      evaluation, `{label: {"teacher_bpb": ..., "student_bpb": ...}}`,
      reported as `<key>@<label>` like `extra_eval` (a hypernetwork run scores
      whole tokenizers it predicts, `alm.hypernet.train`).
  """

  def __init__(self, model: DistillationModel, teacher_tok: ByteTokenizer,
               student_tok: ByteTokenizer, cfg: TrainConfig, train_data,
               eval_batches: Sequence[dict[str, np.ndarray]], opts: RunOptions, *,
               extra_eval: dict[str, Sequence[dict[str, np.ndarray]]] | None = None,
               fingerprint_extra: dict[str, Any] | None = None,
               summary_extra: dict[str, Any] | None = None, title: str = "Distillation",
               eval_hook: Callable[[DistillationModel], dict[str, dict[str, float]]] | None
               = None):
    self.cfg, self.opts, self.title = cfg, opts, title
    self.eval_hook = eval_hook
    self.teacher_tok, self.student_tok = teacher_tok, student_tok
    self.data = train_data
    self.summary_extra = dict(summary_extra or {})
    self.mesh = sharding_lib.make_mesh(cfg.mesh.mesh_data, cfg.mesh.mesh_fsdp,
                                       cfg.mesh.mesh_tensor)
    self.fingerprint = run_fingerprint(model, teacher_tok, student_tok, cfg, fingerprint_extra)
    data_cfg = getattr(train_data, "cfg", None)
    want = step_lib.Objective(cfg).data_constraint
    got = getattr(data_cfg, "align_constraint", None)
    if got is not None and got != want:
      # "space" / "unbiased" chunks are merged by the pipeline only (the step treats
      # them as unconstrained), so a mismatch would silently train on the wrong chunks.
      obj = cfg.objective
      raise ValueError(
          f"The training data is aligned with constraint={got!r}, but method={obj.method!r} "
          f"with constraint={obj.constraint!r} needs {want!r} chunks from the pipeline: "
          f"PipelineConfig(align_constraint={want!r})"
          + (" and align_fn=alm.training.transfer.bias_tables_align_fn(tables, gamma)"
             if want == "unbiased" else "") + ".")
    consts = step_lib.make_consts(model, cfg, teacher_tok, student_tok)
    # Batches of a teacher cache (alm.data.teacher_cache) carry the teacher's outputs.
    self.stepper = step_lib.Stepper(model, cfg, consts, make_optimizer(cfg), self.mesh,
                                    teacher_cache=bool(getattr(train_data, "teacher_cache",
                                                               False)))
    self.schedule = learning_rate_schedule(cfg)
    self.eval_batches = [self._put_eval(b) for b in eval_batches]
    self.extra_eval = {k: [self._put_eval(b) for b in v] for k, v in (extra_eval or {}).items()}
    bad = [k for k in self.extra_eval if not k or "@" in k]
    if bad:
      raise ValueError(f"Held-out set labels must be non-empty and without '@': {bad}.")
    graphdef = self.stepper.state.graphdef

    def eval_fn(trainable, frozen, batch, side):
      m = nnx.merge(graphdef, trainable, frozen)
      # The teacher's sums per row: what a teacher cache's held-out rows store.
      return step_lib.path_bits(getattr(m, side), batch, side, per_row=side == "teacher")

    # The teacher is frozen (every student kind's filter leaves it out), so its
    # held-out bits are computed once per batch and reused by every later evaluation;
    # a teacher cache's held-out batches carry them (SPEC §15).
    self._eval = jax.jit(eval_fn, static_argnames=("side",))
    self._teacher_bits: dict[tuple[int, int], np.ndarray] = {}
    for placed, raw in [(self.eval_batches, eval_batches),
                        *((self.extra_eval[k], v) for k, v in (extra_eval or {}).items())]:
      for i, b in enumerate(raw):
        if step_lib.HELDOUT_BITS_KEY in b:
          self._teacher_bits[(id(placed), i)] = np.asarray(
              b[step_lib.HELDOUT_BITS_KEY], np.float64).sum(axis=0)
        elif not teacher_in_memory(model):
          raise ValueError("The teacher is not in memory (its outputs come from a teacher "
                           "cache), so every held-out batch must carry the teacher's bits "
                           f"({step_lib.HELDOUT_BITS_KEY!r}): take the held-out batches from "
                           "the cache (alm.data.teacher_cache.TeacherCache.all_batches).")
    ckdir = opts.checkpoint_dir
    if ckdir is None:
      ckdir = str(Path(opts.out_dir) / "checkpoints")
    # Before the Checkpointer: it removes stale save temporaries, which must be ours.
    # Multi-host: process 0 holds them (the directories may be shared).
    self._locks = []
    if jax.process_index() == 0:
      self._locks = [RunLock(d, what=w) for w, d in (("out_dir", opts.out_dir),
                                                     ("checkpoint_dir", ckdir)) if d]
    self._lock()
    self.checkpointer = (Checkpointer(ckdir, self.fingerprint, keep=opts.keep_checkpoints)
                         if ckdir else None)
    st = self.stepper.state
    logging.info("Trainable parameters: %d (frozen: %d)", count_params(st.trainable),
                 count_params(st.frozen))

  def _lock(self) -> None:
    try:
      for lock in self._locks:
        lock.acquire()
    except BaseException:
      self.close()
      raise

  def close(self) -> None:
    """Releases the run's directories (`fit` does it when it returns)."""
    for lock in reversed(self._locks):
      lock.release()

  def _put_eval(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    n = next(iter(batch.values())).shape[0]
    axes = sharding_lib.batch_sharding(self.mesh, 1).spec[0]
    axes = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
    par = int(np.prod([self.mesh.shape[a] for a in axes]))
    # Rows split over the data axes when they divide evenly, else replicated.
    first = (axes[0] if len(axes) == 1 else axes) if axes and n % par == 0 else None
    rep = NamedSharding(self.mesh, PartitionSpec())
    return {**{k: jax.device_put(np.asarray(batch[k]), NamedSharding(
        self.mesh, PartitionSpec(first, *([None] * (np.ndim(batch[k]) - 1)))))
               for k in step_lib.BATCH_KEYS},
            # A batch's own student vocabulary (hypernetwork runs), replicated.
            **{k: jax.device_put(np.asarray(v), rep) for k, v in batch.items()
               if k.startswith(step_lib.VOCAB_PREFIX)}}

  # -- evaluation -------------------------------------------------------------

  def bits_per_byte(self, batches: Sequence[dict[str, jax.Array]] | None = None
                    ) -> dict[str, float]:
    """Held-out bits per byte of the teacher and the student (current parameters).

    Args:
      batches: placed held-out batches (default: the main held-out set).

    Returns:
      {"teacher_bpb", "student_bpb", and the predicted bytes / tokens of each}.
    """
    st = self.stepper.state
    sums = np.zeros((2, 3))
    batches = self.eval_batches if batches is None else batches
    for i, b in enumerate(batches):
      key = (id(batches), i)
      if key not in self._teacher_bits:
        self._teacher_bits[key] = np.asarray(jax.device_get(
            self._eval(st.trainable, st.frozen, b, side="teacher")), np.float64).sum(axis=1)
      sums[0] += self._teacher_bits[key]
      sums[1] += np.asarray(jax.device_get(self._eval(st.trainable, st.frozen, b,
                                                      side="student")), np.float64)
    out = {}
    for i, side in enumerate(("teacher", "student")):
      out[f"{side}_bpb"] = float(sums[i, 0] / max(sums[i, 1], 1.0))
      out[f"{side}_bytes"], out[f"{side}_tokens"] = float(sums[i, 1]), float(sums[i, 2])
    return out

  def evaluate(self) -> dict[str, float]:
    """`teacher_bpb` / `student_bpb` on every held-out set (`<key>@<label>` for the extra ones)."""
    sets = {"": None, **{f"@{k}": v for k, v in self.extra_eval.items()}}
    out = {}
    for suffix, batches in sets.items():
      ev = self.bits_per_byte(batches)
      out[f"teacher_bpb{suffix}"], out[f"student_bpb{suffix}"] = (ev["teacher_bpb"],
                                                                  ev["student_bpb"])
    if self.eval_hook is not None:
      for label, ev in self.eval_hook(self.model()).items():
        if not label or "@" in label or f"@{label}" in sets:
          raise ValueError(f"eval_hook label {label!r} is empty, has '@' or is taken.")
        out[f"teacher_bpb@{label}"], out[f"student_bpb@{label}"] = (ev["teacher_bpb"],
                                                                    ev["student_bpb"])
    return out

  # -- the loop ---------------------------------------------------------------

  def _restore(self) -> dict[str, Any] | None:
    ck = self.checkpointer
    if ck is None or not self.opts.resume:
      return None
    step = ck.latest_step()
    if step is None:
      return None
    st = self.stepper.state
    st.trainable, st.opt_state, meta = ck.restore(step, st.trainable, st.opt_state)
    st.step = int(meta["step"])
    self.data.restore(meta["data_state"])
    logging.info("Resumed from %s (step %d).", ck.path(step), st.step)
    return meta

  def _save(self, extra: dict[str, Any]) -> None:
    if self.checkpointer is None:
      return
    st = self.stepper.state
    self.checkpointer.save(st.step, st.trainable, st.opt_state, self.data.state(), extra)

  def _skipped_documents(self) -> dict[str, int]:
    # Cumulative over a resumed run: the count is part of the data state in checkpoints.
    n = getattr(self.data, "num_skipped", None)
    return {} if n is None else {"skipped_documents": int(n)}

  def _nonfinite_error(self, last_bad: int) -> NonFiniteTrainingError:
    k = self.opts.max_nonfinite_steps
    latest = self.checkpointer.latest_step() if self.checkpointer is not None else None
    kept = (f"the last checkpoint, of step {latest} ({self.checkpointer.path(latest)}), is kept"
            if latest is not None else "no checkpoint was written")
    return NonFiniteTrainingError(
        f"{k} consecutive steps (steps {last_bad - k + 1}-{last_bad}) had a non-finite loss or "
        f"gradient; they were not applied to the parameters. Stopped at step "
        f"{self.stepper.state.step}; {kept}. Lower the learning rate, check the data, or allow "
        "longer streaks (--max_nonfinite_steps, RunOptions.max_nonfinite_steps).")

  def fit(self) -> dict[str, Any]:
    """Trains to `cfg.steps` (resuming if possible); returns the summary.

    Returns:
      A dict with the teacher's, the FVT-initialised and the final student's
      held-out bits per byte, the steps, wall time, throughput and the number
      of skipped non-finite steps; `skipped_documents` (cumulative over resumes)
      when the data pipeline counts the bad documents it skipped.

    Raises:
      NonFiniteTrainingError: `max_nonfinite_steps` consecutive non-finite steps.
    """
    self._lock()
    try:
      return self._fit()
    finally:
      self.close()

  def _fit(self) -> dict[str, Any]:
    t_start = time.time()
    st = self.stepper.state
    meta = self._restore()
    # The history is cut back to the restored step (a fresh run: emptied), so records
    # of steps that are about to be redone, or of an abandoned run, do not linger.
    steps = self.cfg.optimizer.steps
    logger = MetricsLogger(self.opts.out_dir, steps, initial_step=st.step,
                           progress=self.opts.progress, tensorboard=self.opts.tensorboard,
                           keep_until=st.step if meta is not None else -1)
    try:
      if meta is not None:
        base = dict(meta["extra"])
      else:
        ev = self.evaluate()
        base = {k.replace("student_bpb", "init_student_bpb"): v for k, v in ev.items()}
        logger.log(0, "eval", ev)
      last_t, last_step, tokens = time.time(), st.step, 0
      pending: list[tuple[int, dict]] = []
      streak, last_bad = 0, None  # consecutive non-finite steps, as last fetched
      end = steps if self.opts.stop_after is None else min(steps, self.opts.stop_after)
      while st.step < end:
        batch = next(self.data)
        tokens += int((np.asarray(batch["student_segment_ids"]) > 0).sum())
        lr = float(self.schedule(st.step))
        metrics = self.stepper.step(batch)
        pending.append((st.step, {**metrics, "learning_rate": lr, **self._skipped_documents()}))
        save_now = (self.opts.checkpoint_every and st.step % self.opts.checkpoint_every == 0
                    and st.step < steps)
        # Fetched before a save too: a checkpoint is written only outside a non-finite streak.
        if st.step % self.opts.log_every == 0 or st.step == end or save_now:
          jax.block_until_ready(metrics)
          now = time.time()
          rate = tokens / max(now - last_t, 1e-9)
          for s, m in pending:
            vals = {k: float(v) for k, v in m.items()}
            vals["student_tokens_per_s"] = rate
            vals["steps_per_s"] = (st.step - last_step) / max(now - last_t, 1e-9)
            logger.log(s, "train", {**vals, "tokens_per_s": rate})
            streak = streak + 1 if vals.get("skipped_nonfinite") else 0
            if streak >= self.opts.max_nonfinite_steps and last_bad is None:
              last_bad = s
          pending, last_t, last_step, tokens = [], now, st.step, 0
          if last_bad is not None:
            raise self._nonfinite_error(last_bad)
        if self.opts.eval_every and st.step % self.opts.eval_every == 0 and st.step < end:
          logger.log(st.step, "eval", self.evaluate())
        if save_now:
          if streak:
            logging.warning("Step %d: no checkpoint during a streak of %d non-finite steps.",
                            st.step, streak)
          else:
            self._save(base)
      if self.opts.stop_after is not None and st.step < steps:
        return {"stopped_at": st.step}
      if st.step == 0 and meta is None:
        # steps=0: nothing was trained; the initial evaluation is the final one and
        # there is no state worth a checkpoint (the export is the product).
        ev = {k.replace("init_student_bpb", "student_bpb"): v for k, v in base.items()}
      else:
        ev = self.evaluate()
        logger.log(st.step, "eval", ev)
        self._save(base)
    finally:
      logger.close()
    summary = {"method": self.cfg.objective.method, "steps": st.step, "seed": self.cfg.seed,
               "skipped_nonfinite_steps": int(sum(
                   r.get("skipped_nonfinite", 0) for r in read_history(self.opts.out_dir)
                   if r["kind"] == "train"))}
    for suffix in heldout_suffixes(base.keys(), "init_student_bpb"):
      teacher, init = base[f"teacher_bpb{suffix}"], base[f"init_student_bpb{suffix}"]
      gap0 = init - teacher
      summary.update({
          f"teacher_bpb{suffix}": teacher, f"init_student_bpb{suffix}": init,
          f"final_student_bpb{suffix}": ev[f"student_bpb{suffix}"],
          f"gap_closed{suffix}": (init - ev[f"student_bpb{suffix}"]) / gap0 if gap0
                                 else float("nan")})
    summary.update({"wall_s": time.time() - t_start, **self._skipped_documents(),
                    **self.summary_extra})
    write_report(self.opts.out_dir, summary,
                 title=f"{self.title} ({self.cfg.objective.method}, {st.step} steps)")
    (Path(self.opts.out_dir) / "summary.json").write_text(json.dumps(_json_safe(summary),
                                                                     indent=1))
    return summary

  def model(self) -> DistillationModel:
    """The model with the current parameters."""
    return self.stepper.model()


def take_batches(data: Iterator[dict[str, np.ndarray]], n: int) -> list[dict[str, np.ndarray]]:
  """The first `n` batches of an iterator (fewer if it ends), e.g. for held-out evaluation."""
  out = []
  for _ in range(n):
    try:
      out.append(next(data))
    except StopIteration:
      break
  if not out:
    raise ValueError("The held-out data gave no batch; use more held-out documents or a smaller "
                     "batch size.")
  return out
