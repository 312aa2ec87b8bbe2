"""The train step on an 8-device (data 2 x fsdp 2 x tensor 2) CPU mesh equals 1 device.

For both kinds of student: the shared body of tokenizer transfer, and a separate
student of another width (teacher and student sharded on the same mesh).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SCRIPT = textwrap.dedent("""
    import json, sys, tempfile, pathlib
    sys.path.insert(0, {tests!r})
    import jax, numpy as np
    assert jax.device_count() == 8, jax.devices()
    import training_utils as tu
    from alm.data.pipeline import Pipeline, PipelineConfig
    from alm.models import sharding
    from alm.training.config import TrainConfig
    from alm.testing.models import tiny_model
    from alm.training.students import build_distill_model, build_transfer_model
    from alm.training.optim import make_optimizer
    from alm.training.step import Stepper

    tt, st = tu.teacher_tokenizer(), tu.student_tokenizer()
    corpus = tu.write_corpus(pathlib.Path(tempfile.mkdtemp()))
    pipe = Pipeline(str(corpus), tt, st, PipelineConfig(batch_size=8, teacher_len=24,
                                                        student_len=48, seed=0))
    batches = [next(pipe) for _ in range(2)]
    consts = {{"alm": {{"teacher_boundary": tt.boundary_token_mask(),
                       "student_boundary": st.boundary_token_mask()}}}}
    out = {{}}
    runs = [(kind, name, mesh) for kind in ("shared", "separate")
            for name, mesh in (("one", (1, 1, 1)), ("eight", (2, 2, 2)))]
    for kind, name, mesh in runs:
      student = dict(lora_rank=2, lora_alpha=4.0) if kind == "shared" else dict(
          lora_rank=0, train_body=True)
      cfg = TrainConfig.build(method="alm+sft", steps=2, batch_size=8, grad_accum=2,
                              teacher_len=24, student_len=48, learning_rate=1e-2,
                              warmup_steps=1, mesh_data=mesh[0], mesh_fsdp=mesh[1],
                              mesh_tensor=mesh[2], **student)
      if kind == "shared":
        model = build_transfer_model(tu.teacher_model(), tt, st, cfg)
      else:
        small = tiny_model("qwen2", vocab_size=st.vocab_size, seed=1, hidden_size=24,
                           num_heads=4, num_kv_heads=2, head_dim=6, intermediate_size=40)
        model = build_distill_model(tu.teacher_model(), tt, small, st, cfg)
      name = f"{{kind}}_{{name}}"
      s = Stepper(model, cfg, consts, make_optimizer(cfg), sharding.make_mesh(*mesh))
      losses = [float(s.step(b)["loss"]) for b in batches]
      leaves = jax.tree.leaves(s.state.trainable)
      devices = sorted({{len(x.sharding.device_set) for x in leaves}})
      specs = sorted({{str(x.sharding.spec) for x in leaves}})
      np.savez(f"{{sys.argv[1]}}/{{name}}.npz", *[np.asarray(x) for x in leaves])
      out[name] = {{"losses": losses, "devices": devices, "specs": specs}}
    print("RESULT" + json.dumps(out))
""")


@pytest.mark.slow
def test_eight_device_mesh_matches_one_device(tmp_path):
  import numpy as np  # pylint: disable=import-outside-toplevel
  tests = str(Path(__file__).parent)
  script = tmp_path / "mesh.py"
  script.write_text(SCRIPT.format(tests=tests))
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
         "JAX_PLATFORMS": "cpu"}
  r = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True,
                     text=True, env=env, timeout=900)
  assert r.returncode == 0, r.stderr[-3000:]
  line = next(l for l in r.stdout.splitlines() if l.startswith("RESULT"))
  res = json.loads(line[len("RESULT"):])
  for kind in ("shared", "separate"):
    one_r, eight_r = res[f"{kind}_one"], res[f"{kind}_eight"]
    np.testing.assert_allclose(one_r["losses"], eight_r["losses"], rtol=1e-5)
    assert eight_r["devices"] == [8]
    # Something really is split over the mesh (not everything replicated).
    assert any("fsdp" in s or "tensor" in s for s in eight_r["specs"]), eight_r["specs"]
    one = np.load(tmp_path / f"{kind}_one.npz")
    eight = np.load(tmp_path / f"{kind}_eight.npz")
    assert len(one.files) == len(eight.files) > 0
    # Adam divides by the gradient's running RMS, so a parameter whose gradient is
    # near 0 (full fine-tuning trains every one) turns summation-order noise into
    # a visible part of its step: allow 0.5 % of the most a parameter can move
    # (2 steps of lr 1e-2 = 2e-2). The shared-body run trains only LoRA and
    # embeddings, all with real gradients: tight.
    atol = 1e-6 if kind == "shared" else 1e-4
    for k in one.files:
      np.testing.assert_allclose(one[k], eight[k], rtol=1e-4, atol=atol, err_msg=f"{kind} {k}")
