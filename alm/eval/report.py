"""Evaluation runs and their tables: models × the task pack → markdown, JSON, PNG.

The library side of `experiments/evaluate.py` (which adds flags and resume):

  from alm.eval.report import evaluate_model, make_lm, write_results
  lm = make_lm(parse_model_specs(["smollm2-135m-instruct"])[0])
  record = evaluate_model(lm, tasks, task_manager=alm.eval.tasks.task_manager())
  write_results(out_dir, {"smollm2": record})

A model built in memory (an ensemble: `ALMLM(model=Ensemble(...), tokenizer=...,
name=...)`) goes through `evaluate_model` the same way.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import difflib
import json
import logging
import math
import os
import re
import time
from pathlib import Path
from typing import Any, Sequence

DTYPES = ("float32", "bfloat16")
LM_EVAL_BOOTSTRAP_ITERS = 100_000  # simple_evaluate's default
REQUEST_TYPES = ("loglikelihood", "loglikelihood_rolling", "generate_until")
_LABEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


ENSEMBLE_PREFIX = "ensemble:"


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """One entry of --models: a label (column and file name) and what to load.

  `source` is what `alm.load_model` reads, or `ensemble:A+B[+...][@MODE]`: an
  `alm.eval.ensemble.Ensemble` of those models (they must share a tokenizer),
  MODE "prob" (mean of probabilities, the default) or "logit".
  """
  label: str
  source: str

  def ensemble(self) -> tuple[list[str], str] | None:
    """(members, mode) of an ensemble entry, else None."""
    if not self.source.startswith(ENSEMBLE_PREFIX):
      return None
    body, _, mode = self.source[len(ENSEMBLE_PREFIX):].partition("@")
    members = [m for m in body.split("+") if m]
    if len(members) < 1:
      raise ValueError(f"--models: {self.label}={self.source}: an ensemble names its models as "
                       "ensemble:A+B[@prob|@logit].")
    return members, mode or "prob"


def parse_model_specs(entries: Sequence[str]) -> list[ModelSpec]:
  """`LABEL=NAME_OR_PATH` or `NAME_OR_PATH` entries -> specs with unique labels.

  Raises:
    ValueError: an empty entry, a label that is not a plain file name, or two
      entries with the same label (the message says to write LABEL=).
  """
  specs = []
  for e in entries:
    label, sep, source = e.partition("=")
    if not sep:
      source = e
      p = Path(e.rstrip("/"))
      label = p.stem if p.suffix == ".gguf" else p.name
    if not source or not label:
      raise ValueError(f"--models entry {e!r}: write LABEL=NAME_OR_PATH or NAME_OR_PATH.")
    if not _LABEL_RE.match(label):
      raise ValueError(f"--models entry {e!r}: label {label!r} is not a plain file name (letters, "
                       "digits, . _ + -); give one with LABEL=NAME_OR_PATH.")
    if label in {s.label for s in specs}:
      raise ValueError(f"--models: two models are labelled {label!r}; give them distinct labels "
                       "with LABEL=NAME_OR_PATH.")
    specs.append(ModelSpec(label, source))
  if not specs:
    raise ValueError("--models is empty; name at least one model.")
  return specs


def check_model_source(spec: ModelSpec) -> None:
  """Fails early (before any evaluation) when a model cannot be found.

  Raises:
    ValueError: names the model and why (missing path, not installed asset).
  """
  from alm.models.loading import resolve_model_path  # pylint: disable=import-outside-toplevel
  ens = spec.ensemble()
  if ens is not None and ens[1] not in ("prob", "logit"):
    raise ValueError(f"--models: {spec.label}={spec.source}: unknown ensemble mode {ens[1]!r}; "
                     "valid: prob, logit.")
  for source in ens[0] if ens is not None else [spec.source]:
    try:
      resolve_model_path(source)
    except (OSError, ValueError) as e:  # FileNotFoundError, AssetNotInstalledError, ...
      raise ValueError(f"--models: {spec.label}={source}: {e}") from None


def make_lm(spec: ModelSpec, *, batch_size: int = 8, max_length: int = 1024,
            dtype: str = "float32"):
  """Builds the lm-eval model of one --models entry (the one place models are built).

  Args:
    spec: label and what `alm.load_model` reads.
    batch_size, max_length, dtype: `ALMLM` options.

  Returns:
    An `alm.eval.harness.ALMLM` named `spec.label`.
  """
  from alm.eval.harness import ALMLM  # pylint: disable=import-outside-toplevel
  ens = spec.ensemble()
  if ens is None:
    return ALMLM(spec.source, batch_size=batch_size, max_length=max_length, dtype=dtype,
                 name=spec.label)
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from alm.eval.ensemble import load_ensemble  # pylint: disable=import-outside-toplevel
  model, tok = load_ensemble(ens[0], mode=ens[1], dtype=jnp.dtype(dtype))
  return ALMLM(model=model, tokenizer=tok, batch_size=batch_size, max_length=max_length,
               name=spec.label)


# ---------------------------------------------------------------------------
# Tasks.


def resolve_tasks(requested: Sequence[str], pack_dir: str | os.PathLike) -> list[str]:
  """Checks group / task names against a built pack.

  Args:
    requested: group or task names; empty means every group (and standalone
      task) of the pack.
    pack_dir: the pack.

  Returns:
    The names, in order, without duplicates.

  Raises:
    ValueError: an unknown name; the message lists close matches and every
      valid name.
  """
  from alm.eval.tasks import pack_tasks  # pylint: disable=import-outside-toplevel
  groups = pack_tasks(pack_dir)
  if not requested:
    return list(groups)
  valid = list(dict.fromkeys([*groups, *(t for ts in groups.values() for t in ts)]))
  bad = [t for t in requested if t not in valid]
  if bad:
    hints = []
    for t in bad:
      close = difflib.get_close_matches(t, valid, n=3, cutoff=0.6)
      hints.append(f"{t!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
    raise ValueError(f"--tasks: unknown {'; '.join(hints)}. Valid groups: {', '.join(groups)}; "
                     f"tasks: {', '.join(v for v in valid if v not in groups)}.")
  return list(dict.fromkeys(requested))


def _drop_fewshot_notes(record: logging.LogRecord) -> bool:
  return not str(record.msg).startswith("Overwriting default num_fewshot")


@contextlib.contextmanager
def quiet_lm_eval():
  """Keeps lm-eval and `datasets` to warnings: no per-task info lines or split bars."""
  import datasets  # pylint: disable=import-outside-toplevel
  import lm_eval.api.task  # pylint: disable=import-outside-toplevel
  logger = logging.getLogger("lm_eval")
  level = logger.level
  logger.setLevel(logging.WARNING)
  # One "Overwriting default num_fewshot" warning per task and model: --num_fewshot is meant.
  evaluator_logger = logging.getLogger("lm_eval.evaluator")
  evaluator_logger.addFilter(_drop_fewshot_notes)
  datasets.utils.logging.set_verbosity_error()
  bars = datasets.utils.logging.is_progress_bar_enabled()
  datasets.disable_progress_bars()
  # One "building requests" bar per task; the backend's own bars show progress.
  task_tqdm = getattr(lm_eval.api.task, "tqdm", None)
  if task_tqdm is not None:
    lm_eval.api.task.tqdm = lambda *a, **k: task_tqdm(*a, **{**k, "disable": True})
  try:
    yield
  finally:
    logger.setLevel(level)
    evaluator_logger.removeFilter(_drop_fewshot_notes)
    if bars:
      datasets.enable_progress_bars()
    if task_tqdm is not None:
      lm_eval.api.task.tqdm = task_tqdm


# ---------------------------------------------------------------------------
# One model.


def _log(msg: str) -> None:
  print(f"[evaluate] {msg}", flush=True)


def _short(names: Sequence[str], n: int = 4) -> str:
  return ", ".join(names[:n]) + (f", ... ({len(names)} in all)" if len(names) > n else "")


@contextlib.contextmanager
def _timed_requests(lm, label: str, timing: dict[str, Any]):
  """Logs and times each batch of requests lm-eval hands the model (one per type)."""
  saved = {}
  for kind in REQUEST_TYPES:
    saved[kind] = lm.__dict__.get(kind)
    method = getattr(lm, kind)

    def timed(requests, *args, _method=method, _kind=kind, **kwargs):
      tasks = sorted({str(getattr(r, "task_name", "?")) for r in requests})
      _log(f"{label}: {_kind}, {len(requests)} requests from {_short(tasks)}")
      t0 = time.perf_counter()
      out = _method(requests, *args, **kwargs)
      dt = time.perf_counter() - t0
      timing[_kind] = {"requests": len(requests), "seconds": round(dt, 3), "tasks": tasks}
      _log(f"{label}: {_kind} done in {dt:.1f} s")
      return out

    setattr(lm, kind, timed)  # an instance attribute shadows the method
  try:
    yield
  finally:
    for kind, old in saved.items():
      if old is None:
        lm.__dict__.pop(kind, None)
      else:
        setattr(lm, kind, old)


def _finite(x: Any) -> Any:
  """NaN / inf -> None, recursively: the files stay strict JSON."""
  if isinstance(x, float) and not math.isfinite(x):
    return None
  if isinstance(x, dict):
    return {k: _finite(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_finite(v) for v in x]
  return x


def evaluate_model(lm, tasks: Sequence[str], *, task_manager, limit: int | None = None,
                   num_fewshot: int = 0, seed: int = 0,
                   bootstrap_iters: int = LM_EVAL_BOOTSTRAP_ITERS,
                   apply_chat_template: bool = False) -> dict[str, Any]:
  """Runs one model through `lm_eval.simple_evaluate` on all `tasks` at once.

  Args:
    lm: an lm-eval `LM` (an `ALMLM`, e.g. over an `alm.eval.Ensemble`).
    tasks: group or task names the task manager knows.
    task_manager: `alm.eval.tasks.task_manager(pack_dir)`.
    limit: documents per task (None: all).
    num_fewshot: few-shot examples per prompt.
    seed: lm-eval's random, numpy, torch and few-shot seeds.
    bootstrap_iters: for the stderr of non-mean metrics (means use the closed
      form); 0 makes lm-eval skip every stderr.
    apply_chat_template: wrap prompts in the model's chat template.

  Returns:
    A JSON-able record: `results` (lm-eval's per-task and per-group metrics
    and stderr, e.g. `results[task]["acc,none"]`), `groups`, `group_subtasks`,
    `n-samples`, `n-shot`, `higher_is_better`, `versions`, `output_types`
    (task -> lm-eval output type), `model` (`lm.summary()` when it has one),
    `settings` (the arguments above) and `timing` (seconds, per request type).
  """
  import lm_eval  # pylint: disable=import-outside-toplevel
  label = getattr(lm, "name", type(lm).__name__)
  timing: dict[str, Any] = {}
  t0 = time.perf_counter()
  with quiet_lm_eval(), _timed_requests(lm, label, timing):
    res = lm_eval.simple_evaluate(
        model=lm, tasks=list(tasks), task_manager=task_manager, limit=limit,
        num_fewshot=num_fewshot, bootstrap_iters=bootstrap_iters, log_samples=False,
        apply_chat_template=apply_chat_template, random_seed=seed, numpy_random_seed=seed,
        torch_random_seed=seed, fewshot_random_seed=seed)
  eval_s = time.perf_counter() - t0
  summary = lm.summary() if hasattr(lm, "summary") else {"name": label}
  summary.update({k: getattr(lm, k) for k in ("batch_size", "max_batch_tokens")
                  if hasattr(lm, k)})
  return _finite({
      "model": summary,
      "settings": {"tasks": list(tasks), "limit": limit, "num_fewshot": num_fewshot,
                   "seed": seed, "bootstrap_iters": bootstrap_iters,
                   "apply_chat_template": apply_chat_template},
      "results": res["results"],
      "groups": res.get("groups", {}),
      "group_subtasks": res.get("group_subtasks", {}),
      "n-samples": res.get("n-samples", {}),
      "n-shot": res.get("n-shot", {}),
      "higher_is_better": res.get("higher_is_better", {}),
      "versions": res.get("versions", {}),
      "output_types": {t: c.get("output_type") for t, c in res.get("configs", {}).items()},
      "timing": {"eval_s": round(eval_s, 3), "requests": timing},
      "lm_eval_version": res.get("lm_eval_version"),
      "date": datetime.datetime.now().isoformat(timespec="seconds"),
  })


# ---------------------------------------------------------------------------
# The table.

# The main metric per lm-eval output type (groups: the first their results have).
_MAIN = {"loglikelihood": "acc", "multiple_choice": "acc", "generate_until": "exact_match",
         "loglikelihood_rolling": "bits_per_byte"}
_GROUP_METRICS = ("acc", "exact_match", "bits_per_byte")


def _metric_key(entry: dict, metric: str) -> str | None:
  """The `metric,filter` key of `entry` for `metric` (first filter), if any."""
  for k in entry:
    if k.partition(",")[0] == metric and "," in k:
      return k
  return None


def _cell(entry: dict | None, key: str | None) -> dict[str, Any] | None:
  if entry is None or key is None or key not in entry:
    return None
  metric, _, filt = key.partition(",")
  se = entry.get(f"{metric}_stderr,{filt}")
  v = entry[key]
  return {"value": v if isinstance(v, (int, float)) else None,
          "stderr": se if isinstance(se, (int, float)) else None}


def _task_order(records: dict[str, dict]) -> list[tuple[str, str | None]]:
  """(name, parent group) rows in the order requested: each group, then its tasks."""
  rows: dict[str, str | None] = {}

  def add(name, parent, subtasks):
    if name in subtasks:
      rows.setdefault(name, parent)
      for t in subtasks[name]:
        add(t, name, subtasks)
    else:
      rows.setdefault(name, parent)

  for r in records.values():
    for t in r["settings"]["tasks"]:
      add(t, None, r.get("group_subtasks", {}))
  return list(rows.items())


def table_rows(records: dict[str, dict], metric: str | None = None) -> list[dict[str, Any]]:
  """The rows of the results table.

  Args:
    records: {label: `evaluate_model` record}.
    metric: None for each task's main metric; else this metric (rows without
      it are left out), e.g. "acc_norm".

  Returns:
    One dict per task or group: `task`, `group` (its parent, or None), `is_group`,
    `metric`, `key` (lm-eval's `metric,filter`), `higher_is_better`, and
    `values` {label: {"value", "stderr", "n"} or None}.
  """
  rows = []
  for task, parent in _task_order(records):
    holders = [r for r in records.values() if task in r["results"]]
    if not holders:
      continue
    first = holders[0]
    is_group = task in first.get("group_subtasks", {})
    entry = first["results"][task]
    if metric is not None:
      key = _metric_key(entry, metric)
    elif is_group:
      key = next((k for m in _GROUP_METRICS if (k := _metric_key(entry, m))), None)
    else:
      key = _metric_key(entry, _MAIN.get(first["output_types"].get(task), "acc"))
    if key is None:
      continue
    name = key.partition(",")[0]
    hib = first.get("higher_is_better", {}).get(task, {}).get(name, name != "bits_per_byte")
    values = {}
    for label, r in records.items():
      c = _cell(r["results"].get(task), key)
      if c is not None:
        ns = r.get("n-samples", {})
        c["n"] = (sum(ns.get(t, {}).get("effective", 0) for t in r["group_subtasks"][task])
                  if is_group else ns.get(task, {}).get("effective"))
      values[label] = c
    rows.append({"task": task, "group": parent, "is_group": is_group, "metric": name,
                 "key": key, "higher_is_better": bool(hib), "values": values})
  return rows


def group_chance(chance: dict[str, float], record: dict[str, Any]) -> dict[str, float]:
  """Per-task chance plus each group's: its tasks' chance weighted by documents evaluated.

  A group gets one only when every task in it has one (multiple choice).
  """
  out = dict(chance)
  ns = record.get("n-samples", {})
  for group, tasks in record.get("group_subtasks", {}).items():
    if tasks and all(t in chance for t in tasks):
      w = [ns.get(t, {}).get("effective", 0) for t in tasks]
      if sum(w):
        out[group] = sum(wi * chance[t] for wi, t in zip(w, tasks)) / sum(w)
  return out


def _fmt(c: dict | None) -> str:
  if c is None or c["value"] is None:
    return "—"
  return f"{c['value']:.4f}" + (f" ± {c['stderr']:.4f}" if c["stderr"] is not None else "")


def _markdown_table(rows: list[dict], labels: list[str],
                    chance: dict[str, float] | None = None) -> list[str]:
  chance = chance or {}
  lines = ["| task | metric | n | chance | " + " | ".join(labels) + " |",
           "|---|---|---|---|" + "---|" * len(labels)]
  for row in rows:
    cells = [row["values"].get(m) for m in labels]
    vals = [c["value"] for c in cells if c is not None and c["value"] is not None]
    best = (max if row["higher_is_better"] else min)(vals) if len(vals) > 1 else None
    unique = best is not None and vals.count(best) == 1
    texts = [f"**{_fmt(c)}**" if unique and c and c["value"] == best else _fmt(c) for c in cells]
    ns = {c["n"] for c in cells if c is not None and c.get("n") is not None}
    name = f"**{row['task']}** (group)" if row["is_group"] else row["task"]
    metric = row["metric"] + ("" if row["higher_is_better"] else " ↓ (lower is better)")
    c = chance.get(row["task"]) if row["metric"] in ("acc", "acc_norm") else None
    lines.append(f"| {name} | {metric} | {'/'.join(map(str, sorted(ns))) or '—'} | "
                 f"{'—' if c is None else f'{c:.4f}'} | " + " | ".join(texts) + " |")
  return lines


def write_results(out_dir: str | os.PathLike, results: dict[str, dict[str, Any]]) -> Path:
  """Writes results.md, results.json and results.png for any set of evaluated models.

  Args:
    out_dir: where to write (created if needed).
    results: {label: `evaluate_model` record} (each may carry `spec`, `pack` and
      `timing.load_s`, which the table shows when present); one column each,
      in this order.

  Returns:
    The path of results.md.
  """
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  labels = list(results)
  main_rows, norm_rows = table_rows(results), table_rows(results, "acc_norm")
  first = next(iter(results.values()))
  s = first["settings"]
  pack = first.get("pack", {}).get("dir", "?")
  lines = ["# Evaluation", "",
           f"{len(labels)} model(s) on the task pack `{pack}`; "
           f"{'all' if s['limit'] is None else s['limit']} documents per task, "
           f"{s['num_fewshot']}-shot, seed {s['seed']}"
           f"{', chat template' if s['apply_chat_template'] else ''}. Each cell: metric ± "
           "stderr; the best of each row in bold; n: documents.", "",
           "| model | loaded from | tokenizer | max length | evaluation time |",
           "|---|---|---|---|---|"]
  for label, r in results.items():
    t = r.get("timing", {})
    lines.append(f"| {label} | `{r.get('spec', '—')}` | {r['model'].get('tokenizer', '—')} | "
                 f"{r['model'].get('max_length', '—')} | {t.get('eval_s', 0):.1f} s |")
  chance = group_chance(first.get("pack", {}).get("chance", {}), first)
  lines += ["", "## Main metric", "",
            "chance: the accuracy of a uniform guess among a multiple-choice task's "
            "options (over all its documents; a group's: its tasks' weighted by their "
            "documents evaluated).", "", *_markdown_table(main_rows, labels, chance)]
  if norm_rows:
    lines += ["", "## acc_norm (length-normalised accuracy)", "",
              *_markdown_table(norm_rows, labels, chance)]
  lines += ["", "![main metric per task](results.png)", ""]
  _plot(out / "results.png", main_rows, labels)
  md = out / "results.md"
  md.write_text("\n".join(lines) + "\n")
  (out / "results.json").write_text(json.dumps(_finite({
      "models": {m: {k: r.get(k) for k in ("spec", "model", "settings", "pack", "timing")}
                 for m, r in results.items()},
      "main": main_rows, "acc_norm": norm_rows,
      "results": {m: r["results"] for m, r in results.items()},
  }), indent=1))
  return md


def _plot(path: Path, rows: list[dict], labels: list[str]) -> None:
  """Grouped bars (one per model) of each task's main metric with stderr bars."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  panels = [(title, [r for r in rows if (r["metric"] == "bits_per_byte") == bpb])
            for title, bpb in (("accuracy / exact match (higher is better)", False),
                               ("bits per byte (lower is better)", True))]
  panels = [(t, rs) for t, rs in panels if rs]
  widths = [max(2, len(rs)) for _, rs in panels]
  fig, axes = plt.subplots(1, len(panels), figsize=(min(40, 2 + 0.45 * len(labels) * sum(widths)
                                                        + 1.5 * len(panels)), 5),
                           squeeze=False, gridspec_kw={"width_ratios": widths})
  w = 0.8 / len(labels)
  for ax, (title, rs) in zip(axes[0], panels):
    x = np.arange(len(rs))
    top = 0.0
    for i, m in enumerate(labels):
      v = np.array([(r["values"].get(m) or {}).get("value") for r in rs], float)  # None -> nan
      e = np.nan_to_num(np.array([(r["values"].get(m) or {}).get("stderr") for r in rs], float))
      ax.bar(x + (i - (len(labels) - 1) / 2) * w, v, w, yerr=e, capsize=2, label=m)
      top = max(top, float(np.nanmax(v + e, initial=0.0)))
    if "bits" not in title:  # a fraction: from 0, to the highest bar (at least 0.05)
      ax.set_ylim(0, min(1.0, max(0.05, top)) * 1.05)
    ax.set_xticks(x, [f"[{r['task']}]" if r["is_group"] else r["task"] for r in rs],
                  rotation=60, ha="right", fontsize=7)
    ax.set_title(title, fontsize=9)
    ax.grid(axis="y", alpha=0.3)
  axes[0][0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


# ---------------------------------------------------------------------------
# The binary.


def _pack_info(pack_dir: Path) -> dict[str, Any]:
  m = json.loads((pack_dir / "manifest.json").read_text())
  chance = {t["name"]: t["chance"] for t in m.get("tasks", []) if "chance" in t}
  return {"dir": str(pack_dir), "key": m.get("key"), "chance": chance}


def _fingerprint(record: dict[str, Any]) -> dict[str, Any]:
  """What must match for a saved record to stand in for a new run."""
  s, m = record.get("settings", {}), record.get("model", {})
  return {"model": record.get("spec"), "tasks": s.get("tasks"), "limit": s.get("limit"),
          "num_fewshot": s.get("num_fewshot"), "seed": s.get("seed"),
          "apply_chat_template": s.get("apply_chat_template"),
          "pack": record.get("pack", {}).get("key"), "max_length": m.get("max_length"),
          "dtype": record.get("dtype")}


def _reuse(path: Path, want: dict[str, Any], label: str) -> dict[str, Any]:
  try:
    record = json.loads(path.read_text())
  except ValueError as e:  # e.g. written by hand, or by another tool
    raise ValueError(f"{path} is not a result file ({e}); delete it or pass --rerun.") from None
  got = _fingerprint(record)
  diff = [f"{k} {got[k]!r} -> {v!r}" for k, v in want.items() if got.get(k) != v]
  if diff:
    raise ValueError(f"{path} was made with other settings ({'; '.join(diff)}); pass --rerun to "
                     f"evaluate {label} again, or choose another --out_dir.")
  return record
