"""Training metrics: progress bar, JSONL log, TensorBoard, and the final report.

`MetricsLogger` writes every record to `metrics.jsonl` (one JSON object per
line: `{"step": ..., "kind": "train"|"eval", ...}`) and to TensorBoard
(tensorboardX, under `tensorboard/`), and shows a tqdm bar with the loss and
throughput. `write_report` turns the JSONL history into `report.md` and
`report.png` (losses and held-out bits per byte over steps).
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any, Iterable, Sequence


def _num(v: Any) -> float | int | str:
  try:
    f = float(v)
  except (TypeError, ValueError):
    return str(v)
  return int(f) if f.is_integer() and abs(f) < 2**53 and not isinstance(v, float) else f


class MetricsLogger:
  """Logs training and evaluation records.

  Args:
    out_dir: where `metrics.jsonl` and `tensorboard/` go (created).
    total_steps: the run's length (for the progress bar).
    initial_step: where a resumed run starts.
    progress: show a tqdm progress bar.
    tensorboard: also write TensorBoard event files.
    keep_until: if given, first rewrite `metrics.jsonl` keeping only the
      readable records of steps <= this (a resumed run passes its restored
      step, a fresh run -1), so the file is the uninterrupted run's history.
      TensorBoard events past it are left: TensorBoard shows the newest
      event of a step, which the resumed run rewrites.
  """

  def __init__(self, out_dir: str | Path, total_steps: int, *, initial_step: int = 0,
               progress: bool = True, tensorboard: bool = True, keep_until: int | None = None):
    self.out_dir = Path(out_dir)
    self.out_dir.mkdir(parents=True, exist_ok=True)
    if keep_until is not None:
      _truncate_history(self.out_dir / "metrics.jsonl", keep_until)
    self._jsonl = open(self.out_dir / "metrics.jsonl", "a", encoding="utf-8")
    self._tb = None
    if tensorboard:
      from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
      self._tb = SummaryWriter(str(self.out_dir / "tensorboard"))
    self._bar = None
    if progress:
      from tqdm import tqdm  # pylint: disable=import-outside-toplevel
      self._bar = tqdm(total=total_steps, initial=initial_step, desc="train", unit="step",
                       dynamic_ncols=True)

  def log(self, step: int, kind: str, values: dict[str, Any]) -> dict[str, Any]:
    """Records `values` at `step` (kind "train" or "eval"); returns the record."""
    rec = {"step": int(step), "kind": kind, "time": time.time(),
           **{k: _num(v) for k, v in values.items()}}
    self._jsonl.write(json.dumps(rec) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for k, v in rec.items():
        if k not in ("step", "kind", "time") and isinstance(v, (int, float)) and math.isfinite(v):
          self._tb.add_scalar(f"{kind}/{k}".replace("@", "_at_"), v, step)  # "@" is no TB tag char
    if self._bar is not None:
      if kind == "train":
        self._bar.update(max(int(step) - self._bar.n, 0))
        post = {"loss": f"{rec.get('loss', float('nan')):.4g}"}
        if "tokens_per_s" in rec:
          post["tok/s"] = f"{rec['tokens_per_s']:.0f}"
        self._bar.set_postfix(post, refresh=True)
      else:
        msg = ", ".join(f"{k}={v:.4f}" for k, v in values.items() if isinstance(v, float))
        self._bar.write(f"step {step} eval: {msg}")
    return rec

  def close(self) -> None:
    """Flushes and closes the outputs."""
    if self._bar is not None:
      self._bar.close()
    if self._tb is not None:
      self._tb.close()
    self._jsonl.close()


def _records(path: Path) -> Iterable[dict[str, Any]]:
  """The readable records of a metrics.jsonl, warning about torn or foreign lines."""
  for i, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
    if not line.strip():
      continue
    try:
      r = json.loads(line)
      if isinstance(r, dict) and "step" in r and "kind" in r:
        yield r
        continue
    except json.JSONDecodeError:
      pass
    # A run killed mid-write leaves a torn last line; it must not break every later run.
    warnings.warn(f"{path}:{i}: skipping a torn record (a run killed while writing it?): "
                  f"{line[:80]!r}", stacklevel=2)


def _truncate_history(path: Path, keep_until: int) -> None:
  if not path.exists():
    return
  kept = [r for r in _records(path) if r["step"] <= keep_until]
  tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
  tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
  os.replace(tmp, path)  # atomic: a kill here leaves the old or the new file, whole


def read_history(out_dir: str | Path) -> list[dict[str, Any]]:
  """The records of `metrics.jsonl` (the last record wins for a repeated step and kind).

  Unreadable lines (a torn last line of a killed run) are skipped with a warning.
  """
  p = Path(out_dir) / "metrics.jsonl"
  if not p.exists():
    return []
  by_key: dict[tuple, dict] = {}
  for r in _records(p):
    by_key[(r["kind"], r["step"])] = r
  return sorted(by_key.values(), key=lambda r: (r["step"], r["kind"]))


def heldout_suffixes(keys: Iterable[str], key: str = "student_bpb") -> list[str]:
  """Key suffixes of the held-out sets found in `keys`: "" (the main set), then "@label"s.

  Extra held-out sets are reported as `<key>@<label>`; e.g. keys
  {"student_bpb", "student_bpb@teacher"} give ["", "@teacher"].
  """
  return [""] + sorted({"@" + k.split("@", 1)[1] for k in keys if k.startswith(key + "@")})


def _plot(history: Sequence[dict], path: Path, title: str) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  train = [r for r in history if r["kind"] == "train"]
  evals = [r for r in history if r["kind"] == "eval"]
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
  keys = sorted({k for r in train for k in r if k.startswith("loss")})
  for k in keys:
    pts = [(r["step"], r[k]) for r in train if k in r]
    ax1.plot([p[0] for p in pts], [p[1] for p in pts], label=k)
  ax1.set_xlabel("step")
  ax1.set_ylabel("training loss")
  if keys:
    ax1.set_yscale("log")
    ax1.legend()
  else:  # steps=0: nothing was trained
    ax1.text(0.5, 0.5, "no training steps", ha="center", va="center", transform=ax1.transAxes)
  # Every held-out set: the student (solid) and its teacher (dashed, same colour).
  for i, sfx in enumerate(heldout_suffixes(k for r in evals for k in r)):
    for k, style in ((f"student_bpb{sfx}", "o-"), (f"teacher_bpb{sfx}", "--")):
      pts = [(r["step"], r[k]) for r in evals if k in r]
      if pts:
        ax2.plot([p[0] for p in pts], [p[1] for p in pts], style, color=f"C{i % 10}", label=k)
  ax2.set_xlabel("step")
  ax2.set_ylabel("held-out bits per byte")
  ax2.legend(fontsize="small")
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def write_report(out_dir: str | Path, summary: dict[str, Any], *, title: str = "Tokenizer transfer"
                 ) -> Path:
  """Writes `report.md` and `report.png` from `metrics.jsonl` and a summary.

  Args:
    out_dir: the run's output directory (holding `metrics.jsonl`).
    summary: key results (e.g. teacher / FVT-init / final student bits per
      byte, the command, the seed, wall time); rendered as a table.
    title: the report's heading.

  Returns:
    The path of `report.md`.
  """
  out = Path(out_dir)
  history = read_history(out)
  _plot(history, out / "report.png", title)
  lines = [f"# {title}", "", "| quantity | value |", "|---|---|"]
  for k, v in summary.items():
    shown = f"{v:.4f}" if isinstance(v, float) else (f"`{v}`" if k == "command" else str(v))
    lines.append(f"| {k} | {shown} |")
  evals = [r for r in history if r["kind"] == "eval"]
  if evals:
    # One teacher / student column pair per held-out set (main first, then `@label`s).
    sfxs = heldout_suffixes(k for r in evals for k in r)
    head = " | ".join(f"teacher{s} | student{s}" for s in sfxs)
    lines += ["", "## Held-out bits per byte", "", f"| step | {head} |",
              "|---" * (1 + 2 * len(sfxs)) + "|"]
    for r in evals:
      cells = " | ".join(f"{r.get(f'teacher_bpb{s}', float('nan')):.4f} | "
                         f"{r.get(f'student_bpb{s}', float('nan')):.4f}" for s in sfxs)
      lines.append(f"| {r['step']} | {cells} |")
  lines += ["", "![losses and held-out bits per byte](report.png)", ""]
  (out / "report.md").write_text("\n".join(lines))
  return out / "report.md"
