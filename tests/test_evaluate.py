"""experiments/evaluate.py: two tiny saved models x a tiny task pack -> one table.

The binary runs in a subprocess (its absl flags would clash with another
binary's in the test process); its table writing is checked in-process.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")  # the optional `eval` extra

from alm.eval.tasks import build_task_pack  # pylint: disable=wrong-import-position
from alm.models.loading import load_model, save_model  # pylint: disable=wrong-import-position
from alm.testing.models import tiny_model  # pylint: disable=wrong-import-position
from alm.testing.tokenizers import tiny_tokenizer  # pylint: disable=wrong-import-position
from alm.eval import report  # pylint: disable=wrong-import-position

ROOT = Path(__file__).resolve().parents[1]
LABELS = ("tiny-a", "tiny-b")


def _cli(tmp: Path, *args: str) -> subprocess.CompletedProcess:
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_DATASETS_OFFLINE": "1",
         "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp / "hf_datasets")}
  return subprocess.run([sys.executable, "-m", "experiments.evaluate", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=300, env=env)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("evaluate")
  tok = tiny_tokenizer("bpe", 300)
  models = {}
  for seed, label in enumerate(LABELS):
    d = save_model(tiny_model("llama", tok.vocab_size, seed=seed), tmp / label, tokenizer=tok)
    assert (d / "tokenizer.json").is_file()
    models[label] = d
  model, tok2 = load_model(models["tiny-a"])  # the saved directory reads back
  assert tok2.vocab_size == tok.vocab_size and model.cfg.vocab_size >= tok.vocab_size
  held = tmp / "heldout.jsonl"
  held.write_text("".join(json.dumps({"text": f"Held-out document {i}: some plain words, "
                                      f"{'and more ' * i}then an end."}) + "\n"
                          for i in range(5)))
  pack = build_task_pack(tmp / "pack", arithmetic_n=4, bigbench_tasks=(), bigbench_generate=(),
                         heldout_docs=3, heldout_files=[held])
  return tmp, models, pack


@pytest.fixture(scope="module")
def first_run(setup):
  tmp, models, pack = setup
  out = tmp / "out"
  t0 = time.perf_counter()
  r = _cli(tmp, f"--models={','.join(f'{m}={d}' for m, d in models.items())}",
           f"--pack_dir={pack}", f"--out_dir={out}", "--limit=3")
  assert r.returncode == 0, r.stderr[-3000:]
  return out, r, time.perf_counter() - t0


def test_outputs_and_numbers(first_run):
  out, r, _ = first_run
  for name in (*(f"{m}.json" for m in LABELS), "results.md", "results.json", "results.png"):
    assert (out / name).is_file(), name
  assert (out / "results.png").stat().st_size > 1000
  assert "[evaluate] model 1/2 tiny-a: loading" in r.stdout
  assert "loglikelihood_rolling, 3 requests from alm_heldout_bpb" in r.stdout

  per_model = {m: json.loads((out / f"{m}.json").read_text()) for m in LABELS}
  for rec in per_model.values():
    assert rec["model"]["name"] in LABELS and rec["timing"]["eval_s"] > 0
    assert rec["settings"]["limit"] == 3
    assert rec["n-samples"]["alm_arithmetic_2da"]["effective"] == 3

  md = (out / "results.md").read_text()
  header = next(l for l in md.splitlines() if l.startswith("| task |"))
  assert header == "| task | metric | n | chance | tiny-a | tiny-b |"
  assert "| **alm_arithmetic** (group) | acc | 30 | — |" in md
  assert "bits_per_byte ↓ (lower is better)" in md

  js = json.loads((out / "results.json").read_text())
  tasks = [row["task"] for row in js["main"]]
  assert tasks[:2] == ["alm_arithmetic", "alm_arithmetic_2da"] and "alm_heldout_bpb" in tasks
  assert len(tasks) == 12  # the group, its 10 tasks, the rolling task
  for row in js["main"]:
    for m in LABELS:
      cell = row["values"][m]
      res = per_model[m]["results"][row["task"]]
      assert cell["value"] == res[row["key"]], (m, row["task"])
      if row["metric"] == "acc":
        assert 0.0 <= cell["value"] <= 1.0
        assert cell["stderr"] == res[f"acc_stderr,{row['key'].split(',')[1]}"] >= 0.0
      else:
        assert row["metric"] == "bits_per_byte" and not row["higher_is_better"]
        assert cell["value"] > 0 and cell["stderr"] is None
  assert js["results"] == {m: per_model[m]["results"] for m in LABELS}
  # Two different random models: their bits per byte differ.
  bpb = next(row for row in js["main"] if row["task"] == "alm_heldout_bpb")
  assert bpb["values"]["tiny-a"]["value"] != bpb["values"]["tiny-b"]["value"]


def test_second_run_reuses_the_per_model_files(setup, first_run):
  tmp, models, pack = setup
  out, _, first_s = first_run
  stamps = {m: (out / f"{m}.json").stat().st_mtime_ns for m in LABELS}
  # Without the model directories a re-run would fail: only reuse can succeed.
  moved = tmp / "moved"
  moved.mkdir(exist_ok=True)
  for m, d in models.items():
    shutil.move(str(d), moved / m)
  try:
    (out / "results.md").unlink()
    r = _cli(tmp, f"--models={','.join(f'{m}={d}' for m, d in models.items())}",
             f"--pack_dir={pack}", f"--out_dir={out}", "--limit=3")
  finally:
    for m, d in models.items():
      shutil.move(str(moved / m), d)
  assert r.returncode == 0, r.stderr[-3000:]
  assert r.stdout.count("already done") == 2 and "loading" not in r.stdout
  assert {m: (out / f"{m}.json").stat().st_mtime_ns for m in LABELS} == stamps
  assert (out / "results.md").is_file()
  print(f"first run {first_s:.1f} s")

  # Other settings than the saved files': refused, naming --rerun.
  r = _cli(tmp, f"--models=tiny-a={models['tiny-a']}", f"--pack_dir={pack}",
           f"--out_dir={out}", "--limit=2")
  assert r.returncode != 0
  assert "limit 3 -> 2" in r.stderr and "--rerun" in r.stderr


def _one_line_error(r: subprocess.CompletedProcess) -> str:
  assert r.returncode != 0
  assert "Traceback" not in r.stderr, r.stderr[-3000:]
  lines = [l for l in r.stderr.splitlines() if l.strip()]
  assert lines and lines[-1].startswith("error: "), r.stderr[-3000:]
  return lines[-1]


def test_bad_input_is_one_line_naming_it(setup, tmp_path):
  tmp, models, pack = setup
  r = _cli(tmp, f"--models={models['tiny-a']}", f"--pack_dir={pack}",
           f"--out_dir={tmp_path / 'o'}", "--tasks=alm_arithmetc,alm_heldout_bpb")
  line = _one_line_error(r)
  assert "unknown 'alm_arithmetc'" in line and "did you mean alm_arithmetic" in line
  assert "alm_arithmetic_2da" in line  # the valid names are listed

  r = _cli(tmp, f"--models=a={models['tiny-a']},b={tmp / 'no_such_model'}",
           f"--pack_dir={pack}", f"--out_dir={tmp_path / 'o'}")
  line = _one_line_error(r)
  assert "b=" in line and "no_such_model" in line and "not found" in line
  assert not (tmp_path / "o").exists()  # nothing ran

  with pytest.raises(ValueError, match="labelled 'x'"):
    report.parse_model_specs(["x=a", "x=b"])
  assert report.parse_model_specs(["runs/a/student/", "m.gguf", "t=smollm2-135m-instruct"]) == [
      report.ModelSpec("student", "runs/a/student/"), report.ModelSpec("m", "m.gguf"),
      report.ModelSpec("t", "smollm2-135m-instruct")]


def test_write_results_with_a_model_missing_a_task(first_run, tmp_path):
  """An extra entry (e.g. an ensemble evaluated from Python) on fewer tasks slots in."""
  out, _, _ = first_run
  recs = {m: json.loads((out / f"{m}.json").read_text()) for m in LABELS}
  extra = json.loads(json.dumps(recs["tiny-a"]))
  extra["settings"]["tasks"] = ["alm_heldout_bpb"]
  extra["results"] = {"alm_heldout_bpb": extra["results"]["alm_heldout_bpb"]}
  md = report.write_results(tmp_path, {**recs, "ens": extra}).read_text()
  assert "| task | metric | n | chance | tiny-a | tiny-b | ens |" in md
  row = next(l for l in md.splitlines() if l.startswith("| alm_arithmetic_2da |"))
  assert row.endswith("| — |")


def test_ensemble_entry_builds_an_ensemble(setup):
  _, models, _ = setup
  from alm.eval.ensemble import Ensemble  # pylint: disable=import-outside-toplevel
  from lm_eval.api.instance import Instance  # pylint: disable=import-outside-toplevel
  spec, = report.parse_model_specs([f"ens=ensemble:{models['tiny-a']}+{models['tiny-b']}@logit"])
  report.check_model_source(spec)
  lm = report.make_lm(spec, max_length=64)
  assert isinstance(lm.model, Ensemble) and lm.model.mode == "logit" and lm.name == "ens"
  (lp, _), = lm.loglikelihood([Instance("loglikelihood", {}, ("1 + 1 =", " 2"), 0)],
                              disable_tqdm=True)
  assert lp < 0
  bad, = report.parse_model_specs([f"e=ensemble:{models['tiny-a']}+{models['tiny-b']}@median"])
  with pytest.raises(ValueError, match="unknown ensemble mode 'median'"):
    report.check_model_source(bad)
  missing, = report.parse_model_specs([f"e=ensemble:{models['tiny-a']}+/no/such/model"])
  with pytest.raises(ValueError, match="/no/such/model"):
    report.check_model_source(missing)


def test_group_chance_weights_tasks_by_documents():
  from alm.eval.report import group_chance  # pylint: disable=import-outside-toplevel
  record = {"n-samples": {"a": {"effective": 30}, "b": {"effective": 10},
                          "c": {"effective": 5}},
            "group_subtasks": {"mc": ["a", "b"], "mixed": ["a", "c"]}}
  got = group_chance({"a": 0.5, "b": 0.25}, record)
  assert got["mc"] == pytest.approx((30 * 0.5 + 10 * 0.25) / 40)
  assert "mixed" not in got  # c is not multiple choice: no chance for the group
  assert got["a"] == 0.5 and got["b"] == 0.25
