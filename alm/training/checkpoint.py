"""Atomic Orbax checkpoints of everything a run needs to resume.

A checkpoint is a directory `step_NNNNNNNN/` holding
  state/       Orbax PyTree: the trainable parameters and the optimizer state
  meta.json    step, the data iterator's state, the training config and the
               run's fingerprint (model, tokenizers, data, parameter shapes)

Atomicity: a checkpoint is written into a hidden `.tmp-...` sibling and
renamed into place only once complete (a rename is atomic on POSIX), so an
interrupted or failed save never leaves a directory that looks like a
checkpoint; stale `.tmp-...` directories are removed when a `Checkpointer`
opens the directory, under the directory's run lock (`alm.training.rundir`),
so a live run's save in progress is never taken for a stale one. An OS error
while saving (a full disk) removes the temporary and raises one
`OutputDirError` line; the previous checkpoints are kept. Restoring refuses a
checkpoint whose fingerprint differs from the current run's, naming the fields
that differ.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from alm.training.rundir import (OutputDirError, RunLock, describe_os_error, find_os_error,
                                 quiet_library_errors)

_STEP_RE = re.compile(r"^step_(\d{8})$")


class CheckpointMismatchError(ValueError):
  """A checkpoint belongs to another model, tokenizer pair, data or config."""


def _diff(saved: Any, current: Any, prefix: str = "") -> list[str]:
  if isinstance(saved, dict) and isinstance(current, dict):
    out = []
    for k in sorted(set(saved) | set(current)):
      out += _diff(saved.get(k, "<absent>"), current.get(k, "<absent>"), f"{prefix}{k}.")
    return out
  if saved != current:
    return [f"{prefix.rstrip('.')}: checkpoint has {saved!r}, this run has {current!r}"]
  return []


def tree_signature(tree: Any) -> list[str]:
  """`path shape dtype` of every leaf: detects a checkpoint of another structure."""
  out = []
  for path, x in jax.tree_util.tree_leaves_with_path(tree):
    out.append(f"{jax.tree_util.keystr(path)} {tuple(x.shape)} {x.dtype}")
  return out


class Checkpointer:
  """Saves and restores training checkpoints under one directory.

  Args:
    directory: the checkpoint directory (created).
    fingerprint: JSON-serialisable description of the run; a checkpoint with
      a different fingerprint is refused on restore.
    keep: how many most recent checkpoints to keep (older ones are deleted
      after a newer one is complete).
  """

  def __init__(self, directory: str | os.PathLike, fingerprint: dict[str, Any], *, keep: int = 2):
    # Orbax needs absolute paths (a relative --checkpoint_dir is common).
    self.directory = Path(directory).expanduser().resolve()
    self.directory.mkdir(parents=True, exist_ok=True)
    self.fingerprint = json.loads(json.dumps(fingerprint))  # normalise tuples -> lists
    self.keep = max(int(keep), 1)
    # Only under the directory's lock: a `.tmp-` of a live run is its save in progress.
    # (Multi-host: process 0 alone holds the run's locks and cleans up.)
    if jax.process_index() == 0:
      with RunLock(self.directory, what="checkpoint_dir"):
        for stale in self.directory.glob(".tmp-*"):
          logging.warning("Removing incomplete checkpoint %s (an interrupted save).", stale)
          shutil.rmtree(stale, ignore_errors=True)

  def steps(self) -> list[int]:
    """Steps of the complete checkpoints present, ascending."""
    out = []
    for p in self.directory.iterdir():
      m = _STEP_RE.match(p.name)
      if m and (p / "meta.json").is_file():
        out.append(int(m.group(1)))
    return sorted(out)

  def latest_step(self) -> int | None:
    """The newest complete checkpoint's step, or None."""
    s = self.steps()
    return s[-1] if s else None

  def path(self, step: int) -> Path:
    """The directory of the checkpoint of `step`."""
    return self.directory / f"step_{step:08d}"

  def save(self, step: int, trainable: Any, opt_state: Any, data_state: Any,
           extra: dict[str, Any] | None = None) -> Path:
    """Writes the checkpoint of `step` atomically (see the module docstring).

    Args:
      step: optimizer steps taken.
      trainable: the trainable parameters (pytree of arrays).
      opt_state: the optimizer state.
      data_state: the data iterator's state (JSON-serialisable).
      extra: more JSON-serialisable metadata (e.g. the metrics so far).

    Returns:
      The checkpoint directory.

    Raises:
      OutputDirError: an OS error (e.g. a full disk) while writing; nothing
        half-written is left and the previous checkpoints are kept.
    """
    if jax.process_count() > 1:
      # The tmp-dir + rename protocol below is single-writer; several hosts
      # would race on it. Orbax's CheckpointManager is the multi-host path.
      raise NotImplementedError(
          "Checkpointer.save is single-process; for multi-host runs pass --checkpoint_dir= "
          "(disable) until multi-host checkpoints are implemented.")
    final = self.path(step)
    tmp = self.directory / f".tmp-step_{step:08d}-{os.getpid()}-{time.time_ns()}"
    tree = {"trainable": jax.tree.leaves(trainable), "opt_state": jax.tree.leaves(opt_state)}
    try:
      tmp.mkdir()
      with quiet_library_errors():
        ckptr = ocp.StandardCheckpointer()
        ckptr.save(tmp / "state", tree)
        ckptr.wait_until_finished()
        ckptr.close()
      meta = {"step": int(step), "data_state": data_state, "fingerprint": self.fingerprint,
              "signature": {"trainable": tree_signature(trainable),
                            "opt_state": tree_signature(opt_state)},
              "extra": extra or {}}
      (tmp / "meta.json").write_text(json.dumps(meta, indent=1, default=_json_default))
      if final.exists():  # re-saving the same step (e.g. a final save): replace it
        shutil.rmtree(final)
      os.replace(tmp, final)
    except BaseException as e:
      shutil.rmtree(tmp, ignore_errors=True)
      os_err = find_os_error(e)
      if os_err is None:
        raise
      kept = self.latest_step()
      # One line instead of orbax's wrapped tracebacks; the OS error says all there is.
      raise OutputDirError(
          f"Could not save the checkpoint of step {step} in {self.directory}: "
          f"{describe_os_error(os_err)}. Nothing half-written was left; "
          + (f"the checkpoint {self.path(kept).name} is kept." if kept is not None
             else "there is no earlier checkpoint.")) from None
    # Checkpoints of later steps belong to an abandoned run (one restarted with
    # resume off): left in place, they would be taken for this run's newest.
    for later in [s for s in self.steps() if s > step]:
      shutil.rmtree(self.path(later), ignore_errors=True)
    for old in self.steps()[:-self.keep]:
      shutil.rmtree(self.path(old), ignore_errors=True)
    return final

  def read_meta(self, step: int) -> dict[str, Any]:
    """The meta.json of a checkpoint."""
    return json.loads((self.path(step) / "meta.json").read_text())

  def check(self, step: int, trainable: Any, opt_state: Any) -> dict[str, Any]:
    """Raises `CheckpointMismatchError` unless checkpoint `step` belongs to this run.

    Returns:
      The checkpoint's metadata.
    """
    meta = self.read_meta(step)
    diffs = _diff(meta.get("fingerprint", {}), self.fingerprint)
    sig = meta.get("signature", {})
    if not diffs:
      for name, tree in (("trainable", trainable), ("opt_state", opt_state)):
        if sig.get(name) != tree_signature(tree):
          diffs.append(f"the {name} parameter shapes differ")
    if diffs:
      shown = "\n  ".join(diffs[:8]) + ("\n  ..." if len(diffs) > 8 else "")
      hint = ""
      if any(d.startswith("train_config.steps:") for d in diffs):
        # The learning-rate schedule (warm-up, then decay to `decay_to` at the
        # last step) is a function of `steps`: a finished run continued to more
        # steps would not be the run those steps describe, so it is refused.
        hint = ("A run cannot be extended to more steps: its learning-rate schedule decays "
                "to the end of the original steps. ")
      raise CheckpointMismatchError(
          f"The checkpoint {self.path(step)} was written by a different run:\n  {shown}\n"
          f"{hint}Resume with the same model, tokenizers, data and training flags; or start a "
          "new run with another --out_dir (or --checkpoint_dir); or pass --noresume "
          "(RunOptions(resume=False)) to start over in this directory, replacing its "
          "checkpoints.")
    return meta

  def restore(self, step: int, trainable: Any, opt_state: Any) -> tuple[Any, Any, dict]:
    """Restores checkpoint `step` into the structure (and shardings) of the given trees.

    Args:
      step: which checkpoint.
      trainable: the current trainable parameters (their structure, shapes
        and shardings are the template).
      opt_state: the current optimizer state (template).

    Returns:
      (trainable, opt_state, meta).

    Raises:
      CheckpointMismatchError: the checkpoint belongs to another run.
    """
    meta = self.check(step, trainable, opt_state)
    t_leaves, t_def = jax.tree.flatten(trainable)
    o_leaves, o_def = jax.tree.flatten(opt_state)
    abstract = {"trainable": [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
                              for x in t_leaves],
                "opt_state": [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
                              for x in o_leaves]}
    ckptr = ocp.StandardCheckpointer()
    tree = ckptr.restore(self.path(step) / "state", abstract)
    ckptr.close()
    return (jax.tree.unflatten(t_def, tree["trainable"]),
            jax.tree.unflatten(o_def, tree["opt_state"]), meta)


def _json_default(x):
  if isinstance(x, (np.integer,)):
    return int(x)
  if isinstance(x, (np.floating,)):
    return float(x)
  if isinstance(x, np.ndarray):
    return x.tolist()
  if isinstance(x, bytes):
    return x.decode("latin1")
  raise TypeError(f"Cannot store {type(x).__name__} in checkpoint metadata.")
