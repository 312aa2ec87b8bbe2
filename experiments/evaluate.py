r"""Evaluates any list of models on the offline task pack; writes one table.

  python -m experiments.evaluate --models=smollm2-135m-instruct,gemma3-270m
  python -m experiments.evaluate --models=teacher=smollm2-135m-instruct,student=runs/x/export \
      --tasks=alm_arithmetic,alm_heldout_bpb --limit=100 --out_dir=runs/evaluate

Each model (`LABEL=NAME_OR_PATH` or `NAME_OR_PATH`: an asset name, an HF
directory, a .gguf file, an exported student) is loaded once and run through
`lm_eval.simple_evaluate` on every task (`alm.eval.tasks`; default: every group
of the pack). Outputs in --out_dir:

- `<label>.json` per model: lm-eval's results (metrics, stderr, sample counts),
  the `ALMLM` settings, the run's settings and timing. A model whose file
  exists is not evaluated again (unless --rerun), so an interrupted evaluation
  continues where it stopped.
- `results.md`: one row per task (and per group aggregate), one column per
  model, "metric ± stderr" of the task's main metric (acc; exact_match for
  generation; bits per byte, lower is better, for the rolling task), and a
  second table of acc_norm where tasks have it.
- `results.json` (every number of the tables, and each model's full results)
  and `results.png` (grouped bars with stderr; bits per byte on its own panel).

From Python (e.g. for a model built in memory, such as an ensemble; the
library side is `alm.eval.report`):

  from alm.eval.report import evaluate_model, write_results
  record = evaluate_model(ALMLM(model=..., tokenizer=..., name="ens"), tasks,
                          task_manager=alm.eval.tasks.task_manager(pack_dir))
  write_results(out_dir, {"ens": record, ...})

Importing this module defines no absl flags (they are defined when it runs as
a program), so it can be imported beside other binaries.
"""

from __future__ import annotations

import os

# Before anything imports `datasets`: the pack is local, nothing may be fetched.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json  # pylint: disable=wrong-import-position
import time  # pylint: disable=wrong-import-position
from pathlib import Path  # pylint: disable=wrong-import-position

from absl import app, flags  # pylint: disable=wrong-import-position

from alm.eval.report import (DTYPES, LM_EVAL_BOOTSTRAP_ITERS, _log, _pack_info, _reuse,  # pylint: disable=wrong-import-position
                             _fmt, _short, check_model_source, evaluate_model, make_lm,
                             parse_model_specs, resolve_tasks, table_rows, write_results)

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defines the binary's flags (called only when it runs as a program)."""
  flags.DEFINE_list("models", None, "Models to evaluate: LABEL=NAME_OR_PATH or NAME_OR_PATH "
                    "(asset name, HF directory, .gguf file, exported student); the label "
                    "defaults to the name / directory name.")
  flags.DEFINE_list("tasks", [], "Groups or tasks of the pack (default: every group of the "
                    "pack: alm_arithmetic, alm_bigbench, alm_bigbench_generate, "
                    "alm_heldout_bpb for the default pack).")
  flags.DEFINE_integer("limit", None, "Documents per task (default: all).", lower_bound=1)
  flags.DEFINE_integer("num_fewshot", 0, "Few-shot examples per prompt.", lower_bound=0)
  flags.DEFINE_integer("batch_size", 8, "Rows per forward.", lower_bound=1)
  flags.DEFINE_integer("max_length", 1024, "Longest input in tokens (longer ones keep their end).",
                       lower_bound=2)
  flags.DEFINE_enum("dtype", "float32", list(DTYPES), "Compute dtype of the loaded models.")
  flags.DEFINE_bool("apply_chat_template", False, "Wrap prompts in each model's chat template.")
  flags.DEFINE_string("pack_dir", None, "A built task pack (default: the default pack, built "
                      "if missing: `python -m alm.eval.tasks build`).")
  flags.DEFINE_string("out_dir", "runs/evaluate", "Per-model JSONs and the results table.")
  flags.DEFINE_bool("rerun", False, "Evaluate every model again even if its file exists.")
  flags.DEFINE_integer("seed", 0, "lm-eval's random, numpy, torch and few-shot seeds.",
                       lower_bound=0)
  flags.DEFINE_integer("bootstrap_iters", LM_EVAL_BOOTSTRAP_ITERS,
                       "Bootstrap iterations for the stderr of non-mean metrics (lm-eval's "
                       "default); 0 skips every stderr.", lower_bound=0)
  flags.mark_flag_as_required("models")


def _pack_dir() -> Path:
  from alm.eval import tasks as tasks_lib  # pylint: disable=import-outside-toplevel
  if FLAGS.pack_dir:
    d = Path(FLAGS.pack_dir).expanduser().resolve()
    tasks_lib.pack_tasks(d)  # a clear error when it is not a pack
    return d
  t0 = time.perf_counter()
  d = tasks_lib.build_task_pack()  # reused when it exists
  _log(f"task pack: {d} ({time.perf_counter() - t0:.1f} s)")
  return d


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  try:
    specs = parse_model_specs(FLAGS.models)
    pack = _pack_dir()
    tasks = resolve_tasks(FLAGS.tasks, pack)
    out = Path(FLAGS.out_dir).resolve()
    info = _pack_info(pack)
    settings = {"tasks": tasks, "limit": FLAGS.limit, "num_fewshot": FLAGS.num_fewshot,
                "seed": FLAGS.seed, "apply_chat_template": FLAGS.apply_chat_template,
                "pack": info["key"], "max_length": FLAGS.max_length, "dtype": FLAGS.dtype}
    done = {}
    for spec in specs:  # every saved record and every model path, before any work
      path = out / f"{spec.label}.json"
      if path.exists() and not FLAGS.rerun:
        done[spec.label] = _reuse(path, {**settings, "model": spec.source}, spec.label)
      else:
        check_model_source(spec)
  except (ValueError, OSError) as e:  # bad input: one line that names it
    raise SystemExit(f"error: {e}") from None
  out.mkdir(parents=True, exist_ok=True)
  _log(f"{len(specs)} model(s) x {len(tasks)} task group(s)/task(s) ({_short(tasks)}), limit "
       f"{FLAGS.limit}, {FLAGS.num_fewshot}-shot -> {out}")
  from alm.eval.tasks import task_manager  # pylint: disable=import-outside-toplevel
  tm = None
  results = {}
  for i, spec in enumerate(specs, 1):
    head = f"model {i}/{len(specs)} {spec.label}"
    if spec.label in done:
      _log(f"{head}: already done ({out / (spec.label + '.json')})")
      results[spec.label] = done[spec.label]
      continue
    t0 = time.perf_counter()
    _log(f"{head}: loading {spec.source}")
    lm = make_lm(spec, batch_size=FLAGS.batch_size, max_length=FLAGS.max_length,
                 dtype=FLAGS.dtype)
    load_s = time.perf_counter() - t0
    _log(f"{head}: loaded in {load_s:.1f} s; evaluating")
    if tm is None:
      tm = task_manager(pack)
    record = evaluate_model(lm, tasks, task_manager=tm, limit=FLAGS.limit,
                            num_fewshot=FLAGS.num_fewshot, seed=FLAGS.seed,
                            bootstrap_iters=FLAGS.bootstrap_iters,
                            apply_chat_template=FLAGS.apply_chat_template)
    record.update(label=spec.label, spec=spec.source, dtype=FLAGS.dtype, pack=info)
    record["timing"]["load_s"] = round(load_s, 3)
    path = out / f"{spec.label}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, path)  # a file only once the model is fully evaluated
    results[spec.label] = record
    for row in table_rows({spec.label: record}):
      _log(f"{head}: {row['task']:<28} {row['metric']:<14} {_fmt(row['values'][spec.label])}")
    _log(f"{head}: done in {time.perf_counter() - t0:.1f} s -> {path}")
    del lm
  md = write_results(out, results)
  print()
  print(md.read_text())


if __name__ == "__main__":
  define_flags()
  app.run(main)
