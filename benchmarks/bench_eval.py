"""lm-eval log-likelihood throughput: the output layer on the scored positions vs on all.

  python -m benchmarks.bench_eval [--model=smollm2-135m-instruct --tasks=alm_bigbench \\
      --limit=20 --repeats=2]

Builds the loglikelihood requests of `--tasks` from the offline task pack
(`--limit` documents per task), then times `ALMLM.loglikelihood` on them with
the continuation scored by `alm.eval.scoring.score_positions` (the output
layer runs on the continuation's tokens only) and with every position scored
(`score_tokens`, the output layer on every position), alternating the two.
Reported: the median of `--repeats` passes after one warm-up pass per mode
(compilation excluded), requests/s, the ratio, and the largest difference of
the two modes' log-likelihoods (they compute the same numbers).
"""

from __future__ import annotations

import statistics
import time

import numpy as np
from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "smollm2-135m-instruct", "What alm.load_model loads.")
flags.DEFINE_list("tasks", ["alm_bigbench"], "Groups or tasks of the pack.")
flags.DEFINE_integer("limit", 20, "Documents per task.", lower_bound=1)
flags.DEFINE_integer("repeats", 2, "Timed passes per mode.", lower_bound=1)
flags.DEFINE_integer("batch_size", 8, "Rows per forward.", lower_bound=1)


def loglikelihood_requests(tasks, limit):
  """The loglikelihood Instances lm-eval builds for `tasks` (first `limit` docs each)."""
  from alm.eval.report import quiet_lm_eval, resolve_tasks  # pylint: disable=import-outside-toplevel
  from alm.eval.tasks import task_manager, task_pack_dir  # pylint: disable=import-outside-toplevel
  pack = task_pack_dir()
  out = []
  with quiet_lm_eval():
    for task in task_manager(pack).load(resolve_tasks(tasks, pack))["tasks"].values():
      task.build_all_requests(limit=limit, rank=0, world_size=1)
      out += [i for i in task.instances if i.request_type == "loglikelihood"]
  return out


def main(argv):
  del argv
  from alm.eval import harness  # pylint: disable=import-outside-toplevel
  reqs = loglikelihood_requests(FLAGS.tasks, FLAGS.limit)
  lm = harness.ALMLM(FLAGS.model, batch_size=FLAGS.batch_size)
  buckets = harness._SCORED_BUCKETS  # pylint: disable=protected-access
  modes = {"scored positions": buckets, "every position": ()}
  times = {m: [] for m in modes}
  results = {}
  for rep in range(FLAGS.repeats + 1):  # pass 0 compiles
    for mode, b in modes.items():
      harness._SCORED_BUCKETS = b  # pylint: disable=protected-access
      t0 = time.perf_counter()
      results[mode] = lm.loglikelihood(reqs, disable_tqdm=True)
      if rep:
        times[mode].append(time.perf_counter() - t0)
  harness._SCORED_BUCKETS = buckets  # pylint: disable=protected-access
  a = np.array([r[0] for r in results["scored positions"]])
  b = np.array([r[0] for r in results["every position"]])
  same_greedy = all(x[1] == y[1] for x, y in zip(results["scored positions"],
                                                   results["every position"]))
  n_tok = sum(len(lm.encode_pair(*r.args)[0]) for r in reqs)
  print(f"{FLAGS.model}: {len(reqs)} loglikelihood requests ({n_tok} tokens) from "
        f"{', '.join(FLAGS.tasks)}, {FLAGS.limit} docs per task, batch {FLAGS.batch_size}")
  for mode, ts in times.items():
    med = statistics.median(ts)
    print(f"  {mode:18s} {med:8.2f} s  {len(reqs) / med:7.1f} requests/s  (runs: "
          f"{', '.join(f'{t:.2f}' for t in ts)})")
  print(f"  every / scored:    {statistics.median(times['every position']) / statistics.median(times['scored positions']):.2f}x")
  print(f"  max |log-likelihood difference| {np.abs(a - b).max():.2e} "
        f"(relative {np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-6)):.2e}); "
        f"is_greedy identical: {same_greedy}")


if __name__ == "__main__":
  app.run(main)
