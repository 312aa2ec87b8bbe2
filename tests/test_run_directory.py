"""A run directory that cannot be corrupted: one run at a time, torn metrics, unwritable outputs."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import orbax.checkpoint as ocp
import pytest

from alm.training.checkpoint import Checkpointer, CheckpointMismatchError
from alm.training.config import TrainConfig
from alm.training.metrics import read_history, write_report

import training_utils as tu

ROOT = Path(__file__).resolve().parents[1]
T_LEN, S_LEN = 24, 48


def _cfg(**kw):
  base = dict(method="alm", steps=4, batch_size=2, teacher_len=T_LEN, student_len=S_LEN,
              lora_rank=2, lora_alpha=4.0, learning_rate=1e-2, warmup_steps=1)
  return TrainConfig.build(**{**base, **kw})


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  return tu.write_corpus(tmp_path_factory.mktemp("corpus"))


def _trainer(corpus, out, cfg, **opts):
  return tu.tiny_trainer(corpus, out, cfg, **opts)


def _binary(*flags: str, timeout: int = 300) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "experiments.transfer_tokenizer", *flags],
                        cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})


# -- one run per directory ----------------------------------------------------------


@pytest.fixture
def holder(tmp_path):
  """A live process holding the run lock of tmp_path/run (as a running training would)."""
  out = tmp_path / "run"
  code = textwrap.dedent(f"""
      import sys
      from alm.training.rundir import RunLock
      RunLock({str(out)!r}, what="out_dir", command="python -m fake_training --x=1").acquire()
      RunLock({str(out / 'checkpoints')!r}, what="checkpoint_dir", command="fake").acquire()
      print("held", flush=True)
      sys.stdin.read()
  """)
  p = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                       stdout=subprocess.PIPE, text=True, cwd=ROOT)
  assert p.stdout.readline().strip() == "held"
  yield out, p
  if p.poll() is None:
    p.kill()
    p.wait()


def test_second_run_on_a_live_run_directory_is_refused_naming_the_holder(holder, corpus):
  from alm.training.rundir import RunDirectoryLockedError  # pylint: disable=import-outside-toplevel
  out, proc = holder
  # The live run's in-progress checkpoint must survive the second run's attempt.
  live_tmp = out / "checkpoints" / f".tmp-step_00000002-{proc.pid}-1"
  live_tmp.mkdir(parents=True)
  with pytest.raises(RunDirectoryLockedError,
                     match=rf"(?s)in use by another run: pid {proc.pid} on .*fake_training"):
    _trainer(corpus, out, _cfg())
  with pytest.raises(RunDirectoryLockedError, match=f"pid {proc.pid}"):
    Checkpointer(out / "checkpoints", {"run": 1})
  assert live_tmp.is_dir()
  assert not (out / "metrics.jsonl").exists()
  # The binary refuses at once (before loading the model), one line, exit 2.
  r = _binary(f"--out_dir={out}", "--teacher_samples=0", "--progress=false")
  assert r.returncode == 2, r.stderr[-3000:]
  assert f"pid {proc.pid}" in r.stderr and "Traceback" not in r.stderr
  assert "Loaded" not in r.stderr
  # A dead holder does not block: the kernel drops its lock.
  proc.kill()
  proc.wait()
  t = _trainer(corpus, out, _cfg(steps=1))
  t.fit()
  holder_text = (out / ".lock").read_text()
  assert str(os.getpid()) in holder_text or holder_text == ""


# -- torn metrics and the history of a resumed run --------------------------------


def test_read_history_skips_a_torn_last_line(tmp_path):
  recs = [{"step": 0, "kind": "eval", "teacher_bpb": 1.0, "student_bpb": 2.0},
          {"step": 1, "kind": "train", "loss": 0.5}]
  (tmp_path / "metrics.jsonl").write_text(
      "".join(json.dumps(r) + "\n" for r in recs) + '{"step": 2, "kind": "tr')
  with pytest.warns(UserWarning, match=r"metrics.jsonl:3: skipping a torn record"):
    assert [r["step"] for r in read_history(tmp_path)] == [0, 1]
  with pytest.warns(UserWarning):
    write_report(tmp_path, {"method": "alm"})


def test_resume_after_a_torn_write_keeps_the_uninterrupted_history(corpus, tmp_path):
  out = tmp_path / "run"
  stopped = _trainer(corpus, out, _cfg(), checkpoint_every=2, stop_after=3)
  assert stopped.fit() == {"stopped_at": 3}
  # Killed in the middle of writing step 4's record: a torn last line.
  with open(out / "metrics.jsonl", "a") as f:
    f.write('{"step": 4, "kind": "train", "lo')
  resumed = _trainer(corpus, out, _cfg(), checkpoint_every=2)
  with pytest.warns(UserWarning, match="metrics.jsonl:.*torn record"):
    resumed.fit()
  lines = (out / "metrics.jsonl").read_text().splitlines()
  recs = [json.loads(l) for l in lines]  # every line parses
  # Step 3 (after the step-2 checkpoint) was redone: it appears once, from the resumed run.
  assert [r["step"] for r in recs if r["kind"] == "train"] == [1, 2, 3, 4]
  assert [r["step"] for r in recs if r["kind"] == "eval"] == [0, 4]


# -- outputs that cannot be written --------------------------------------------------


def test_unwritable_output_directories_are_refused_before_loading(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a directory")
  for flag in ("out_dir", "checkpoint_dir", "export_dir"):
    other = {f"--{f}={tmp_path / f}" for f in ("out_dir", "checkpoint_dir", "export_dir")
             if f != flag}
    r = _binary(f"--{flag}={blocker / 'sub'}", *sorted(other), "--teacher_samples=0",
                "--progress=false")
    assert r.returncode == 2, (flag, r.stderr[-3000:])
    assert f"error: --{flag}={blocker / 'sub'}" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and "Loaded" not in r.stderr


def test_disk_full_during_checkpoint_save_is_one_clear_error(corpus, tmp_path, monkeypatch):
  from alm.training.rundir import OutputDirError  # pylint: disable=import-outside-toplevel
  t = _trainer(corpus, tmp_path / "run", _cfg(steps=1))
  st = t.stepper.state
  ck = t.checkpointer
  ck.save(1, st.trainable, st.opt_state, {"pos": 1})

  # As the OS raises it, and as orbax / tensorstore wrap it (measured on a full tmpfs).
  for err in (OSError(errno.ENOSPC, "No space left on device"),
              ValueError("RESOURCE_EXHAUSTED: Error writing local file \"x/_sharding\": Failed "
                         "to write 13414 bytes to file 8: No space left on device "
                         "[os_error_code='28']")):
    def full(*a, err=err, **k):
      raise err

    monkeypatch.setattr(ocp.StandardCheckpointer, "save", full)
    with pytest.raises(OutputDirError, match=r"disk full.*step_00000001.* is kept") as e:
      ck.save(2, st.trainable, st.opt_state, {"pos": 2})
    assert "\n" not in str(e.value)
    assert sorted(p.name for p in ck.directory.iterdir() if p.name != ".lock") == [
        "step_00000001"]
  t.close()


def test_export_is_atomic_and_disk_full_is_one_clear_error(tmp_path, monkeypatch):
  from alm.training.rundir import OutputDirError, atomic_directory  # pylint: disable=import-outside-toplevel
  final = tmp_path / "export"
  with atomic_directory(final, "--export_dir") as d:
    (d / "model.safetensors").write_text("weights")
    assert not final.exists()  # nothing looks valid until complete
  assert (final / "model.safetensors").read_text() == "weights"
  with pytest.raises(OutputDirError, match=r"--export_dir=.*disk full"):
    with atomic_directory(final, "--export_dir") as d:
      (d / "config.json").write_text("{}")
      raise OSError(errno.ENOSPC, "No space left on device")
  # The previous complete export is untouched and no temporary directory is left.
  assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
  assert sorted(p.name for p in final.iterdir()) == ["model.safetensors"]


# -- extending a finished run ------------------------------------------------------


def test_extending_a_finished_run_names_noresume(corpus, tmp_path):
  out = tmp_path / "run"
  _trainer(corpus, out, _cfg(steps=2)).fit()
  with pytest.raises(CheckpointMismatchError,
                     match=r"(?s)steps: checkpoint has 2, this run has 3.*--noresume"):
    _trainer(corpus, out, _cfg(steps=3)).fit()
  # --noresume starts over in the same directory: the old run's later checkpoints and
  # metrics do not leak into the new one.
  fresh = _trainer(corpus, out, _cfg(steps=1), resume=False)
  fresh.fit()
  assert Checkpointer(out / "checkpoints", fresh.fingerprint).steps() == [1]
  recs = [json.loads(l) for l in open(out / "metrics.jsonl")]
  assert [r["step"] for r in recs if r["kind"] == "train"] == [1]
