"""Every numeric flag of experiments/transfer_tokenizer.py is validated before any work."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from alm.training.trainer import RunOptions
from alm.training.transfer import TransferJob

ROOT = Path(__file__).resolve().parents[1]

# flag -> values that must be refused.
BAD = {
    "teacher_samples": ["-1"], "teacher_sample_tokens": ["7"], "eval_batches": ["0"],
    "eval_batch_size": ["0"], "num_workers": ["-1"], "tau": ["0", "nan"], "gamma": ["0", "nan"],
    "ntp_weight": ["-1", "nan"], "lora_rank": ["-1"], "lora_alpha": ["0", "inf"],
    "projector_layers": ["0"], "projector_heads": ["0"], "ngram_max_bytes": ["0", "17"], "steps": ["-1"],
    "learning_rate": ["0", "nan"], "warmup_steps": ["-1"], "decay_to": ["1.5"],
    "grad_clip": ["-1", "nan"], "batch_size": ["0"], "grad_accum": ["0"], "teacher_len": ["1"],
    "student_len": ["1"], "seed": ["-1"], "mesh_data": ["0"], "mesh_fsdp": ["0"],
    "mesh_tensor": ["0"], "checkpoint_every": ["-1"], "keep_checkpoints": ["0"],
    "eval_every": ["-1"], "log_every": ["0"], "max_nonfinite_steps": ["0"], "uld_top_k": ["-1"],
}


# Parses each bad value with the binary's own flags and calls its main, with the run
# itself replaced by a tripwire. In a subprocess: the binary's absl flags would clash
# with another binary's (experiments.compare_methods) in the test process.
_PROBE = """
import json, sys
from absl import app, flags
from experiments import transfer_tokenizer as binary
import alm.training.transfer

def no_work(*a, **k):
  raise AssertionError("the run started")

alm.training.transfer.run_transfer = no_work
bad = json.loads(sys.argv[1])
results = {}
for name, values in bad.items():
  for value in values:
    flags.FLAGS.unparse_flags()
    try:
      flags.FLAGS(["transfer_tokenizer", f"--{name}={value}", "--out_dir=/nonexistent/x"])
      binary.main(["transfer_tokenizer"])
      results[f"{name}={value}"] = "accepted"
    except (flags.IllegalFlagValueError, app.UsageError) as e:
      results[f"{name}={value}"] = "refused: " + str(e)
    except BaseException as e:  # pylint: disable=broad-except
      results[f"{name}={value}"] = f"crashed: {type(e).__name__}: {e}"
# The binary's own flags and those generated for it by alm.training.cli.
numeric = sorted({f.name for m in (binary.__name__, "alm.training.cli")
                  for f in flags.FLAGS.get_flags_for_module(m)
                  if f.flag_type() in ("int", "float")})
print("RESULT " + json.dumps({"results": results, "numeric": numeric}))
"""


@pytest.fixture(scope="module")
def probe():
  r = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(BAD)], cwd=ROOT,
                     capture_output=True, text=True, timeout=300,
                     env={**os.environ, "JAX_PLATFORMS": "cpu"})
  lines = [l for l in r.stdout.splitlines() if l.startswith("RESULT ")]
  assert r.returncode == 0 and lines, r.stderr[-3000:]
  return json.loads(lines[-1][len("RESULT "):])


def test_every_numeric_flag_is_covered(probe):
  assert set(probe["numeric"]) == set(BAD)


def test_bad_numeric_flags_are_refused_before_any_work(probe):
  wrong = {k: v for k, v in probe["results"].items()
           if not (v.startswith("refused: ") and k.split("=")[0] in v)}
  assert not wrong, wrong


def test_log_every_zero_fails_at_once_with_a_usage_message(tmp_path):
  r = subprocess.run([sys.executable, "-m", "experiments.transfer_tokenizer", "--log_every=0",
                      f"--out_dir={tmp_path / 'out'}"], cwd=ROOT, capture_output=True, text=True,
                     timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert r.returncode == 1 and "--log_every" in r.stderr and ">= 1" in r.stderr, r.stderr
  assert "Traceback" not in r.stderr and not (tmp_path / "out").exists()


def test_library_objects_validate_the_same():
  for kw in ({"log_every": 0}, {"eval_every": -1}, {"checkpoint_every": -1},
             {"keep_checkpoints": 0}, {"stop_after": -1}):
    with pytest.raises(ValueError, match=next(iter(kw))):
      RunOptions(out_dir="x", **kw)
  for kw in ({"eval_batches": 0}, {"eval_batch_size": 0}, {"num_workers": -1}):
    with pytest.raises(ValueError, match=next(iter(kw))):
      TransferJob(**kw)
