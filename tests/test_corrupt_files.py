"""Truncated or corrupt model files give one clear error naming the file, not a raw traceback."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

from alm.models import loading
from alm.models.gguf_file import GGUFFile, GGUFFormatError
from alm.testing.models import tiny_model
from alm.tokenization.bytes_tok import BytesTokenizer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  d = tmp_path_factory.mktemp("tiny")
  loading.save_model(tiny_model("llama", BytesTokenizer().vocab_size), d, BytesTokenizer())
  return d


def _copy_with(saved: Path, dst: Path, data: bytes) -> Path:
  dst.mkdir()
  for p in saved.iterdir():
    (dst / p.name).write_bytes(data if p.name == "model.safetensors" else p.read_bytes())
  return dst


def test_truncated_or_corrupt_safetensors(saved, tmp_path):
  from alm.models.loading import ModelFileError  # pylint: disable=import-outside-toplevel
  raw = (saved / "model.safetensors").read_bytes()
  n_header, = struct.unpack("<Q", raw[:8])
  cases = {
      "four_bytes": (raw[:4], r"truncated"),
      "mid_header": (raw[:8 + n_header // 2], r"truncated"),
      "mid_data": (raw[:len(raw) - 100], rf"truncated: expected {len(raw)} bytes, file has "
                                          rf"{len(raw) - 100}"),
      "garbage_header": (raw[:8] + b"\xff" * n_header + raw[8 + n_header:], r"header"),
  }
  for name, (data, msg) in cases.items():
    d = _copy_with(saved, tmp_path / name, data)
    with pytest.raises(ModelFileError, match=msg) as e:
      loading.load_model(d)
    assert "model.safetensors" in str(e.value), name
    assert "re-download" in str(e.value), name


def _write_gguf(path: Path) -> None:
  w = gguf.GGUFWriter(str(path), "llama")
  w.add_block_count(1)
  w.add_token_list([f"t{i}" for i in range(50)])
  w.add_tensor("a.weight", np.arange(64 * 8, dtype=np.float32).reshape(8, 64))
  w.add_tensor("b.weight", np.ones((8, 64), np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


def test_truncated_or_corrupt_gguf(tmp_path):
  good = tmp_path / "good.gguf"
  _write_gguf(good)
  raw = good.read_bytes()
  assert GGUFFile(good).tensor("b.weight").shape == (8, 64)
  cases = {"header": raw[:40], "kv": raw[:300], "data": raw[:len(raw) - 64],
           "count": raw[:8] + struct.pack("<Q", 2**40) + raw[16:]}
  for name, data in cases.items():
    p = tmp_path / f"{name}.gguf"
    p.write_bytes(data)
    with pytest.raises(GGUFFormatError, match=rf"{name}\.gguf.*(truncated|corrupt)") as e:
      f = GGUFFile(p)
      f.tensor("b.weight")
    assert "re-download" in str(e.value), name
  from alm.models.loading import ModelFileError  # pylint: disable=import-outside-toplevel
  assert issubclass(GGUFFormatError, ModelFileError)


def _binary(*flags: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "experiments.transfer_tokenizer", *flags],
                        cwd=ROOT, capture_output=True, text=True, timeout=300,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})


def test_binary_reports_bad_model_files_in_one_line(saved, tmp_path):
  not_gguf = tmp_path / "notes.gguf"
  not_gguf.write_text("this is not a model\n" * 10)
  raw = (saved / "model.safetensors").read_bytes()
  cut = _copy_with(saved, tmp_path / "cut", raw[:len(raw) // 2])
  for model, want in ((not_gguf, "is not a GGUF file"), (cut, "truncated")):
    r = _binary(f"--model={model}", "--target_tokenizer=bytes", "--teacher_samples=0",
                f"--out_dir={tmp_path / 'out'}", "--progress=false")
    assert r.returncode == 2, r.stderr[-3000:]
    errors = [l for l in r.stderr.splitlines() if l.startswith("error: ")]
    assert len(errors) == 1 and want in errors[0], r.stderr[-3000:]
    assert "Traceback" not in r.stderr
